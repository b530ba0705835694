"""The study's grid: study/params.yaml loaded and checked, and the cells (run directories) it expands to."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import TASKS
from ..protocol import Condition

INITS = ("pretrained", "scratch")
FULL_TEACHER = "full"
BASELINE = "baseline"
# The fields every summary.json entry has (docs/study.md); ``init`` and ``teacher`` are the study's extra keys.
ENTRY_KEYS = (
    "task",
    "condition",
    "method",
    "metric",
    "n_seeds",
    "mean",
    "std",
    "delta_mean",
    "ci95",
    "p",
    "rel_gain_pct",
)


class StudyError(ValueError):
    """study/params.yaml is invalid; the message names the file and the dotted key."""


@dataclass
class Group:
    """One DVC matrix of the study: every task × condition × method × seed × init."""

    conditions: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    inits: list[str] = field(default_factory=lambda: ["pretrained"])


@dataclass
class DoseGroup(Group):
    # Teacher snapshots, in pretraining steps (0 = the random init); the finished teacher is the main one.
    steps: list[int] = field(default_factory=lambda: [0, 150])


@dataclass
class StudyParams:
    seeds: list[int] = field(default_factory=lambda: [100, 101, 102, 103, 104])
    # The seeds hyperparameters were tuned on (benchmarks/tune_val.py); the study's must be disjoint.
    tuning_seeds: list[int] = field(default_factory=lambda: [0, 1])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    # Dotted params.yaml keys applied on top of params.yaml in every study stage (fixed before the study).
    overrides: dict[str, Any] = field(default_factory=dict)
    main: Group = field(default_factory=Group)
    scratch: Group = field(default_factory=Group)
    extra: Group = field(default_factory=Group)
    unlabeled: Group = field(default_factory=Group)
    ablation: Group = field(default_factory=Group)
    dose: DoseGroup = field(default_factory=DoseGroup)
    # Instances per task (train split, first N) the selection diagnostic scores.
    selection_instances: int = 1000

    GROUPS = ("main", "scratch", "extra", "unlabeled", "ablation", "dose")


def _check_list(where: str, value: Any, kind: type) -> list:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise StudyError(f"{where}: expected a list of {kind.__name__}, got {value!r}")
    return value


def _group(path: str, key: str, raw: Any, cls: type[Group]) -> Group:
    from pipeline.names import METHODS

    if not isinstance(raw, dict):
        raise StudyError(f"{path}: key 'study.{key}': expected a mapping, got {raw!r}")
    allowed = {f.name for f in fields(cls)}
    for k in raw:
        if k not in allowed:
            raise StudyError(
                f"{path}: key 'study.{key}.{k}': unknown (allowed: {', '.join(sorted(allowed))})"
            )
    g = cls(**raw)
    where = f"{path}: key 'study.{key}"
    for c in _check_list(f"{where}.conditions'", g.conditions, str):
        try:
            Condition.parse(c)
        except ValueError as e:
            raise StudyError(f"{where}.conditions': {e}") from None
    for m in _check_list(f"{where}.methods'", g.methods, str):
        if m not in METHODS:
            raise StudyError(f"{where}.methods': unknown method {m!r} (allowed: {', '.join(METHODS)})")
    for i in _check_list(f"{where}.inits'", g.inits, str):
        if i not in INITS:
            raise StudyError(f"{where}.inits': unknown init {i!r} (allowed: {', '.join(INITS)})")
    if isinstance(g, DoseGroup):
        for s in _check_list(f"{where}.steps'", g.steps, int):
            if s < 0:
                raise StudyError(f"{where}.steps': a teacher snapshot step must be >= 0, got {s}")
    return g


def load_study(path: str | Path) -> StudyParams:
    """study/params.yaml's ``study`` section, validated: an unknown key or a bad value names the key."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise StudyError(f"{p}: not a readable YAML file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("study"), dict):
        raise StudyError(f"{p}: expected a top-level 'study' mapping")
    raw = dict(data["study"])
    allowed = {f.name for f in fields(StudyParams)}
    for k in raw:
        if k not in allowed:
            raise StudyError(f"{p}: key 'study.{k}': unknown (allowed: {', '.join(sorted(allowed))})")
    groups = {
        k: _group(str(p), k, raw.pop(k), DoseGroup if k == "dose" else Group)
        for k in StudyParams.GROUPS
        if k in raw
    }
    sp = StudyParams(**raw, **groups)
    seeds = _check_list(f"{p}: key 'study.seeds'", sp.seeds, int)
    tuning = _check_list(f"{p}: key 'study.tuning_seeds'", sp.tuning_seeds, int)
    if not seeds:
        raise StudyError(f"{p}: key 'study.seeds': at least one seed")
    shared = sorted(set(seeds) & set(tuning))
    if shared:
        raise StudyError(
            f"{p}: key 'study.seeds': {shared} also tuned hyperparameters (study.tuning_seeds); "
            "the study's seeds must be disjoint from the tuning seeds"
        )
    for t in _check_list(f"{p}: key 'study.tasks'", sp.tasks, str):
        if t not in TASKS:
            raise StudyError(f"{p}: key 'study.tasks': unknown task {t!r} (allowed: {', '.join(TASKS)})")
    if not isinstance(sp.overrides, dict):
        raise StudyError(f"{p}: key 'study.overrides': expected a mapping of dotted params.yaml keys")
    if not isinstance(sp.selection_instances, int) or sp.selection_instances < 1:
        raise StudyError(f"{p}: key 'study.selection_instances': must be an integer >= 1")
    return sp


def override_args(sp: StudyParams, **extra: Any) -> list[str]:
    """``key=value`` overrides (values as YAML) for ``pipeline.config.load_params``: the study's, then ``extra``
    (dotted keys given with ``__`` for ``.``)."""
    items = {**sp.overrides, **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"{k}={json.dumps(v)}" for k, v in items.items()]


def teacher_name(step: int | None) -> str:
    return FULL_TEACHER if step is None else f"step{step}"


@dataclass(frozen=True)
class Cell:
    group: str
    task: str
    condition: str
    method: str
    seed: int
    init: str
    teacher: str = FULL_TEACHER

    @property
    def variant(self) -> str:
        return f"{self.init}-{self.teacher}"

    @property
    def name(self) -> str:
        return f"{self.task}-{self.condition}-{self.method}-s{self.seed}"

    def run_dir(self, runs: str | Path) -> Path:
        return Path(runs) / self.variant / self.name


def cells(sp: StudyParams) -> list[Cell]:
    """Every cell of the study, group by group, as the study/dvc.yaml matrices expand them; a cell that two
    groups share (same run directory) is listed once."""
    out: dict[Path, Cell] = {}
    for gname in StudyParams.GROUPS:
        g = getattr(sp, gname)
        teachers = [teacher_name(s) for s in g.steps] if isinstance(g, DoseGroup) else [FULL_TEACHER]
        for task in sp.tasks:
            for cond in g.conditions:
                for method in g.methods:
                    for seed in sp.seeds:
                        for init in g.inits:
                            for teacher in teachers:
                                c = Cell(gname, task, cond, method, seed, init, teacher)
                                out.setdefault(c.run_dir(""), c)
    return list(out.values())


def teachers(sp: StudyParams) -> list[str]:
    """The study's teachers: the finished one, then each dose snapshot."""
    return [FULL_TEACHER] + [teacher_name(s) for s in sorted(set(sp.dose.steps)) if sp.dose.methods]
