"""The evidence study (issue 25): its grid, where each cell's run lives, and the study report.

The study is a second DVC pipeline (study/dvc.yaml) over the same stages as the quick default: every
(task, condition, method, seed, init, teacher) cell is its own stage, so an interrupted study resumes at the
first cell not yet finished. study/params.yaml holds the grid; DVC's ``matrix`` is a full product, so each
part of the grid that is not one (pooled_fd only on some conditions, ablations on low-shot, a scratch init
for some methods, weaker teachers for clip_td) is a group of its own, and ``cells`` expands the groups the
same way the matrices do.

A cell's run directory is ``RUNS/<init>-<teacher>/<task>-<condition>-<method>-s<seed>``: ``teacher`` is
``full`` (the main pipeline's teacher and cache) or ``step<N>`` (the teacher after N of its pretraining steps,
with its own cache). Everything the report says is computed from those directories' eval.json files, the
teachers' zero-shot files and the selection diagnostic; every verdict on the issue's targets is computed
here, never typed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .config import TASKS
from .protocol import Condition
from .report import (
    BLIND,
    ZEROSHOT,
    ReportError,
    collect,
    compare,
    format_cell,
    load_optional_json,
    summarise,
)
from .report.markdown import fmt, fmt_p

INITS = ("pretrained", "scratch")
FULL_TEACHER = "full"
BASELINE = "baseline"
# The fields the issue fixes for every summary.json entry; ``init`` and ``teacher`` are the study's extra keys.
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
    ablation: Group = field(default_factory=Group)
    dose: DoseGroup = field(default_factory=DoseGroup)
    # Instances per task (train split, first N) the selection diagnostic scores.
    selection_instances: int = 1000

    GROUPS = ("main", "scratch", "extra", "ablation", "dose")


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


# --------------------------------------------------------------------------------------------- aggregation


def collect_study(sp: StudyParams, runs: str | Path) -> tuple[dict[str, list[dict]], list[Cell]]:
    """Evaluated rows per variant (``<init>-<teacher>``), only of cells in the grid (a folder left by an
    older grid is ignored), and the cells not finished yet."""
    grid = cells(sp)
    wanted = {(c.variant, c.task, c.condition, c.method, c.seed) for c in grid}
    rows: dict[str, list[dict]] = {}
    for variant in sorted({c.variant for c in grid}):
        folder = Path(runs) / variant
        if not any(folder.glob("*/eval.json")):
            continue
        for r in collect(folder):
            if (variant, r["task"], r["condition"], r["method"], r["seed"]) in wanted:
                # report.collect keeps the metrics only; the cell's own timing is read beside them.
                r["cell"] = json.loads(Path(r["path"]).read_text()).get("cell") or {}
                rows.setdefault(variant, []).append(r)
    done = {(v, r["task"], r["condition"], r["method"], r["seed"]) for v, rs in rows.items() for r in rs}
    missing = [c for c in grid if (c.variant, c.task, c.condition, c.method, c.seed) not in done]
    return rows, missing


def summarise_study(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """report.summarise per variant. A weaker-teacher variant runs clip_td only: its Δ is paired against the
    same init's baseline (and blind floor) with the full teacher, which no teacher changes."""
    out = {}
    for variant, rs in rows.items():
        init, teacher = variant.split("-", 1)
        if teacher != FULL_TEACHER:
            own = {(r["task"], r["condition"]) for r in rs}
            shared = [
                r
                for r in rows.get(f"{init}-{FULL_TEACHER}", [])
                if r["method"] in (BASELINE, BLIND) and (r["task"], r["condition"]) in own
            ]
            summary = [s for s in summarise(rs + shared) if s["method"] not in (BASELINE, BLIND)]
        else:
            summary = summarise(rs)
        out[variant] = summary
    return out


def _entry(s: dict, init: str, teacher: str) -> dict:
    paired = s["paired"] or {}
    return {
        "task": s["task"],
        "condition": s["condition"],
        "method": s["method"],
        "metric": s["primary_metric"],
        "n_seeds": s["n"],
        "mean": s["mean"],
        "std": s["std"],
        "delta_mean": paired.get("mean"),
        "ci95": paired.get("ci95"),
        "p": paired.get("p"),
        "rel_gain_pct": s["gain_pct"],
        "init": init,
        "teacher": teacher,
    }


def summary_entries(summaries: dict[str, list[dict]], zeroshot: dict[str, dict]) -> list[dict]:
    """summary.json: one entry per task × condition × method × (init, teacher), with the issue's keys (delta
    fields null for the baseline), plus a ``teacher_zeroshot`` entry per teacher, task and condition."""
    out = [_entry(s, *v.split("-", 1)) for v, ss in sorted(summaries.items()) for s in ss]
    metric = {s["task"]: s["primary_metric"] for ss in summaries.values() for s in ss}
    for teacher, by_task in sorted(zeroshot.items()):
        for task, conds in by_task.items():
            for cond, z in conds.items():
                out.append(
                    {
                        "task": task,
                        "condition": cond,
                        "method": ZEROSHOT,
                        "metric": z.get("metric", metric.get(task)),
                        "n_seeds": None,
                        "mean": z["score"],
                        "std": None,
                        "delta_mean": None,
                        "ci95": None,
                        "p": None,
                        "rel_gain_pct": None,
                        "init": None,
                        "teacher": teacher,
                    }
                )
    return out


def load_zeroshot_files(paths: dict[str, Path]) -> dict[str, dict]:
    """{teacher: {task: {condition: {score, metric, chance, ...}}}} from the study's zero-shot files."""
    out = {}
    for teacher, path in paths.items():
        data = load_optional_json(path)
        if data is None:
            continue
        for task, conds in data.items():
            for cond, z in conds.items():
                z = z if isinstance(z, dict) else {"score": z}
                if not isinstance(z.get("score"), (int, float)):
                    raise ReportError(f"{path}: key '{task}.{cond}': no numeric score")
                out.setdefault(teacher, {}).setdefault(task, {})[cond] = z
    return out


# ------------------------------------------------------------------------------------------------ targets


def _cell(summary: Sequence[dict], task: str, cond: str, method: str) -> dict | None:
    return next(
        (s for s in summary if (s["task"], s["condition"], s["method"]) == (task, cond, method)), None
    )


def smallest_lowshot(conditions: Iterable[str]) -> str | None:
    low = [c for c in conditions if Condition.parse(c).kind == "lowshot"]
    return min(low, key=lambda c: Condition.parse(c).fraction) if low else None


def _head_to_head(rows: Sequence[dict], task: str, cond: str, a: str, b: str) -> dict | None:
    """Paired comparison of method a against method b (per seed), as report.compare does against the baseline."""
    va = {
        r["seed"]: r["primary"] for r in rows if (r["task"], r["condition"], r["method"]) == (task, cond, a)
    }
    vb = {
        r["seed"]: r["primary"] for r in rows if (r["task"], r["condition"], r["method"]) == (task, cond, b)
    }
    if not va or not vb:
        return None
    return compare(va, vb)


def explain(
    task: str,
    cond: str,
    summary: Sequence[dict],
    zeroshot: dict,
    selection: dict | None,
    dose: Sequence[dict],
) -> list[str]:
    """Which diagnostic accounts for a missed target in one cell, each from the numbers."""
    why = []
    base, blind = _cell(summary, task, cond, BASELINE), _cell(summary, task, cond, BLIND)
    if base and blind and base["mean"] is not None and blind["mean"] is not None:
        gap = base["mean"] - blind["mean"]
        if gap < 0.10:
            why.append(f"the baseline uses the image little (baseline − blind = {gap:+.3f} < 0.10)")
    z = zeroshot.get(FULL_TEACHER, {}).get(task, {}).get(cond)
    if z is not None and base and base["mean"] is not None and z["score"] <= base["mean"]:
        why.append(
            f"the teacher's zero-shot score {z['score']:.3f} is not above the baseline's "
            f"{base['mean']:.3f} (little task knowledge to distil)"
        )
    sel = (selection or {}).get("teachers", {}).get(FULL_TEACHER, {}).get("tasks", {}).get(task)
    if sel and sel.get("ci95") and sel["ci95"][0] <= 0:
        why.append(
            f"token selection is not better than random on {task} "
            f"(selected {sel['selected_share']:.3f} vs random {sel['random_share']:.3f})"
        )
    rnd = [d for d in dose if d["task"] == task and d["condition"] == cond and d["steps"] == 0]
    if rnd and rnd[0]["verdict"] == "gain":
        why.append("the random (step-0) teacher gives a gain too: the gain is not the teacher's knowledge")
    return why or ["no diagnostic flags this cell (the effect is within seed noise)"]


def dose_table(
    sp: StudyParams,
    summaries: dict[str, list[dict]],
    teacher_steps: int | None,
    zeroshot: dict,
    snapshots: dict | None,
) -> list[dict]:
    """clip_td's Δ against the baseline per teacher (snapshots and the finished teacher), per dose cell."""
    g = sp.dose
    out = []
    steps = sorted(set(g.steps)) + [None]
    for init in g.inits:
        for task in sp.tasks:
            for cond in g.conditions:
                for method in g.methods:
                    for s in steps:
                        teacher = teacher_name(s)
                        cell = _cell(summaries.get(f"{init}-{teacher}", []), task, cond, method)
                        z = zeroshot.get(teacher, {}).get(task, {}).get(cond)
                        retr = None
                        if s is not None and snapshots:
                            retr = snapshots.get(str(s), {}).get("all", {}).get("random_top1")
                        elif s is None and snapshots:
                            retr = snapshots.get("full")
                        paired = (cell or {}).get("paired") or {}
                        out.append(
                            {
                                "init": init,
                                "task": task,
                                "condition": cond,
                                "method": method,
                                "teacher": teacher,
                                "steps": teacher_steps if s is None else s,
                                "retrieval_top1": retr,
                                "zeroshot": z["score"] if z else None,
                                "n_seeds": (cell or {}).get("n"),
                                "delta_mean": paired.get("mean"),
                                "ci95": paired.get("ci95"),
                                "p": paired.get("p"),
                                "verdict": (cell or {}).get("verdict"),
                            }
                        )
    return out


def _dose_order(d: dict) -> tuple:
    # The finished teacher last, whether or not its step count is known (metrics/teacher.json).
    return (d["teacher"] == FULL_TEACHER, d["steps"] or 0)


def _status(ok: bool | None) -> str:
    return {True: "met", False: "missed", None: "incomplete"}[ok]


def targets(
    sp: StudyParams,
    summaries: dict[str, list[dict]],
    rows: dict[str, list[dict]],
    zeroshot: dict,
    selection: dict | None,
    dose: Sequence[dict],
) -> list[dict]:
    """Every target of issue 25, decided from the numbers: status met | missed | incomplete (a cell it needs
    has fewer than 2 paired seeds or was not run), the numbers it rests on, and for a miss the diagnostics."""
    variant = (
        f"pretrained-{FULL_TEACHER}"
        if "pretrained" in sp.main.inits
        else f"{sp.main.inits[0]}-{FULL_TEACHER}"
    )
    summary, vrows = summaries.get(variant, []), rows.get(variant, [])
    low = smallest_lowshot(sp.main.conditions)
    conds = [c for c in (low, "shift") if c and c in sp.main.conditions]
    out = []

    def cell_info(task: str, cond: str, method: str = "clip_td") -> dict:
        c = _cell(summary, task, cond, method)
        paired = (c or {}).get("paired") or {}
        return {
            "task": task,
            "condition": cond,
            "method": method,
            "delta_mean": paired.get("mean"),
            "ci95": paired.get("ci95"),
            "p": paired.get("p"),
            "rel_gain_pct": (c or {}).get("gain_pct"),
            "verdict": (c or {}).get("verdict"),
        }

    def decided(infos: list[dict]) -> bool:
        return all(i["ci95"] is not None for i in infos)

    # 1. clip_td's interval above 0 in >= 4 of the 6 task x {smallest low-shot, shift} cells.
    infos = [cell_info(t, c) for t in sp.tasks for c in conds]
    wins = sum(i["verdict"] == "gain" for i in infos)
    need = math.ceil(4 / 6 * len(infos)) if infos else 1
    ok = True if wins >= need else (False if decided(infos) else None)
    out.append(
        {
            "id": "gain_cells",
            "target": f"clip_td beats baseline (95% CI above 0) in >= {need} of "
            f"{len(infos)} task x {{{', '.join(conds)}}} cells",
            "value": f"{wins} of {len(infos)}",
            "status": _status(ok),
            "cells": infos,
        }
    )

    # 2. Relative gains: VCR >= 10% low-shot and shift; VQA and SNLI-VE >= 5% low-shot.
    wanted = [("vcr", low, 10.0), ("vcr", "shift", 10.0), ("vqa", low, 5.0), ("snli_ve", low, 5.0)]
    for task, cond, pct in wanted:
        if task not in sp.tasks or cond not in sp.main.conditions:
            continue
        i = cell_info(task, cond)
        g = i["rel_gain_pct"]
        ok = None if g is None else g >= pct
        out.append(
            {
                "id": f"rel_gain_{task}_{cond}",
                "target": f"clip_td relative gain >= +{pct:.0f}% on {task} {cond}",
                "value": "n/a" if g is None else f"{g:+.1f}%",
                "status": _status(ok),
                "cells": [i],
            }
        )
    # Full data: clip_td not worse (interval includes or exceeds 0).
    if "full" in sp.main.conditions:
        infos = [cell_info(t, "full") for t in sp.tasks]
        bad = [i for i in infos if i["ci95"] is not None and i["ci95"][1] < 0]
        ok = False if bad else (True if decided(infos) else None)
        out.append(
            {
                "id": "full_not_worse",
                "target": "full data: clip_td not worse than baseline (CI includes or "
                "exceeds 0) on every task",
                "value": f"{len(bad)} task(s) worse",
                "status": _status(ok),
                "cells": infos,
            }
        )

    # 3. clip_td > naive_kd (paired, CI above 0) on >= 2 of 3 tasks in low-shot.
    if low:
        h2h = []
        for t in sp.tasks:
            c = _head_to_head(vrows, t, low, "clip_td", "naive_kd")
            paired = (c or {}).get("paired") or {}
            h2h.append(
                {
                    "task": t,
                    "condition": low,
                    "method": "clip_td vs naive_kd",
                    "delta_mean": paired.get("mean"),
                    "ci95": paired.get("ci95"),
                    "p": paired.get("p"),
                    "rel_gain_pct": (c or {}).get("gain_pct"),
                    "verdict": (c or {}).get("verdict"),
                }
            )
        wins = sum(i["verdict"] == "gain" for i in h2h)
        need = math.ceil(2 / 3 * len(h2h))
        ok = True if wins >= need else (False if decided(h2h) else None)
        out.append(
            {
                "id": "beats_naive_kd",
                "target": f"clip_td > naive_kd (95% CI above 0) on >= {need} of {len(h2h)} tasks in {low}",
                "value": f"{wins} of {len(h2h)}",
                "status": _status(ok),
                "cells": h2h,
            }
        )

    # 4. Dose-response: the gain grows with teacher quality and vanishes for the random teacher.
    if dose:
        keys = sorted({(d["init"], d["task"], d["condition"]) for d in dose if d["method"] == "clip_td"})
        rows_ = []
        for init, task, cond in keys:
            ds = sorted(
                [
                    d
                    for d in dose
                    if (d["init"], d["task"], d["condition"]) == (init, task, cond)
                    and d["method"] == "clip_td"
                ],
                key=_dose_order,
            )
            deltas = [d["delta_mean"] for d in ds]
            if any(x is None for x in deltas) or any(d["ci95"] is None for d in ds):
                rows_.append({"task": task, "condition": cond, "init": init, "ok": None, "deltas": deltas})
                continue
            # A gain that is not there with the finished teacher cannot grow with it: that is a miss too.
            gain = ds[-1]["verdict"] == "gain"
            grows = all(a <= b for a, b in zip(deltas, deltas[1:], strict=False))
            vanishes = ds[0]["steps"] != 0 or ds[0]["verdict"] != "gain"
            rows_.append(
                {
                    "task": task,
                    "condition": cond,
                    "init": init,
                    "ok": gain and grows and vanishes,
                    "gain_with_full_teacher": gain,
                    "grows": grows,
                    "vanishes_at_random": vanishes,
                    "deltas": deltas,
                }
            )
        oks = [r["ok"] for r in rows_]
        ok = None if None in oks or not oks else all(oks)
        out.append(
            {
                "id": "dose_response",
                "target": "clip_td gains with the finished teacher, the gain grows "
                "with teacher pretraining and is no gain for the random teacher, in every dose cell",
                "value": f"{sum(o is True for o in oks)} of {len(oks)} cells",
                "status": _status(ok),
                "cells": rows_,
            }
        )

    # 5. Selection: the selected tokens fall on named objects more often than random tokens.
    sel = (selection or {}).get("teachers", {}).get(FULL_TEACHER, {}).get("tasks", {})
    if sel:
        better = {t: s["ci95"] is not None and s["ci95"][0] > 0 for t, s in sel.items()}
        out.append(
            {
                "id": "selection",
                "target": "selected image tokens fall on the objects the text names more "
                "often than random tokens (95% CI of the difference above 0) on every task",
                "value": ", ".join(
                    f"{t}: {s['selected_share']:.3f} vs {s['random_share']:.3f}" for t, s in sel.items()
                ),
                "status": _status(all(better.values())),
            }
        )

    for t in out:
        if t["status"] == "missed":
            t["diagnostics"] = {}
            for i in t.get("cells", []):
                if i.get("verdict") != "gain" or "rel_gain" in t["id"]:
                    key = f"{i['task']} {i['condition']}"
                    t["diagnostics"][key] = explain(
                        i["task"], i["condition"], summary, zeroshot, selection, dose
                    )
    return out


# ------------------------------------------------------------------------------------------------ report


def wall_time(rows: dict[str, list[dict]], stage_metrics: Sequence[dict]) -> dict:
    """Seconds the study took on this machine: the sum of every cell's own wall time (train + evaluate, as the
    cell stage measured it) plus the teacher snapshot, extraction and diagnostic stages, and the span from the
    first cell's start to the last cell's end (across sittings, when the study was resumed)."""
    cells_ = [r.get("cell") or {} for rs in rows.values() for r in rs]
    secs = [c["wall_seconds"] for c in cells_ if isinstance(c.get("wall_seconds"), (int, float))]
    starts = [c["started"] for c in cells_ if isinstance(c.get("started"), (int, float))]
    ends = [c["finished"] for c in cells_ if isinstance(c.get("finished"), (int, float))]
    other = sum(float(m.get("seconds", 0) or 0) for m in stage_metrics)
    return {
        "cells": len(secs),
        "cell_seconds": round(sum(secs), 1),
        "mean_cell_seconds": round(statistics.fmean(secs), 2) if secs else None,
        "other_stage_seconds": round(other, 1),
        "total_seconds": round(sum(secs) + other, 1),
        "span_seconds": round(max(ends) - min(starts), 1) if starts and ends else None,
    }


def _ci(ci: list | None) -> str:
    return "n/a" if ci is None else f"[{fmt(ci[0], sign=True)}, {fmt(ci[1], sign=True)}]"


def markdown(
    sp: StudyParams,
    summaries: dict[str, list[dict]],
    zeroshot: dict,
    dose: Sequence[dict],
    tgts: Sequence[dict],
    selection: dict | None,
    wall: dict,
    missing: Sequence[Cell],
) -> str:
    from .report import condition_order, method_order, task_order

    lines = [
        "# The evidence study (issue 25)",
        "",
        "Generated by `python -m stages.study_report` from the study's eval.json files, the teachers' zero-shot "
        "scores and the selection diagnostic; nothing here is typed by hand.",
        "",
        f"Seeds {sp.seeds} (hyperparameters were tuned on seeds {sp.tuning_seeds}, never on these, and on "
        "validation only). Each cell: mean ± std (seeds) of the test metric; below it the paired per-seed Δ "
        "against the baseline of the same init, its 95% t interval (n − 1 df), the p-value and the relative "
        "gain. ▲/▼ only when the interval excludes 0. Floor: `blind` (image blanked); ceiling: the teacher's "
        "zero-shot score.",
        "",
    ]
    if missing:
        lines += [
            f"**Incomplete: {len(missing)} cell(s) not finished** (e.g. {missing[0].variant}/{missing[0].name}); "
            "rerun `make study` to resume.",
            "",
        ]

    lines += ["## Verdicts", "", "| target | value | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | **{t['status']}** |" for t in tgts]
    for t in tgts:
        for key, why in t.get("diagnostics", {}).items():
            lines.append(f"- {t['id']} · {key}: " + "; ".join(why))
    lines.append("")

    for variant, summary in sorted(
        summaries.items(), key=lambda kv: (kv[0].split("-", 1)[1] != FULL_TEACHER, kv[0])
    ):
        init, teacher = variant.split("-", 1)
        lines += [f"## Init {init}, teacher {teacher}", ""]
        for task in sorted({s["task"] for s in summary}, key=task_order):
            ss = [s for s in summary if s["task"] == task]
            conds = sorted({s["condition"] for s in ss}, key=condition_order)
            methods = sorted({s["method"] for s in ss}, key=lambda m: method_order(m, BASELINE, BLIND))
            lines += [
                f"### {task} ({ss[0]['primary_metric']})",
                "",
                "| method | " + " | ".join(conds) + " |",
                "|---|" + "---|" * len(conds),
            ]
            for m in methods:
                texts = [format_cell(c) if (c := _cell(ss, task, cond, m)) else "·" for cond in conds]
                label = "blind (text only)" if m == BLIND else m
                lines.append(f"| {label} | " + " | ".join(texts) + " |")
            z = zeroshot.get(teacher, {}).get(task, {})
            lines.append(
                "| teacher zero-shot | "
                + " | ".join(fmt(z[c]["score"]) if c in z else "not measured" for c in conds)
                + " |"
            )
            lines.append("")

    if dose:
        lines += [
            "## Teacher dose-response",
            "",
            "clip_td's paired Δ against the baseline (same init, seeds) when distilled from the teacher after "
            "N pretraining steps (0 = random init).",
            "",
            "| init | task | condition | teacher steps | teacher retrieval top-1 | teacher zero-shot | Δ | "
            "95% CI | p |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in dose:
            lines.append(
                f"| {d['init']} | {d['task']} | {d['condition']} | {d['steps']} | {fmt(d['retrieval_top1'])} "
                f"| {fmt(d['zeroshot'])} | {fmt(d['delta_mean'], sign=True)} | {_ci(d['ci95'])} | "
                f"{fmt_p(d['p'])} |"
            )
        lines.append("")

    abl = [m for m in sp.ablation.methods]
    if abl:
        lines += [
            "## Ablations (against clip_td, paired per seed)",
            "",
            "| task | condition | ablation | Δ vs baseline | Δ vs clip_td | 95% CI (vs clip_td) | p |",
            "|---|---|---|---|---|---|---|",
        ]
        summary = summaries.get(f"{sp.ablation.inits[0]}-{FULL_TEACHER}", []) if sp.ablation.inits else []
        for task in sp.tasks:
            for cond in sp.ablation.conditions:
                for m in abl:
                    c = _cell(summary, task, cond, m)
                    if c is None:
                        continue
                    h = c.get("_vs_clip_td") or {}
                    lines.append(
                        f"| {task} | {cond} | {m} | {fmt(((c.get('paired') or {}).get('mean')), sign=True)} | "
                        f"{fmt(h.get('mean'), sign=True)} | {_ci(h.get('ci95'))} | {fmt_p(h.get('p'))} |"
                    )
        lines.append("")

    if selection:
        lines += [
            "## Selection quality",
            "",
            "Share of the selected image tokens (clip_td's top-ρ_v on the student grid, computed from the cache "
            "as in training) that fall on objects the instance's text names, against random selection of as "
            "many tokens (its expected share). Δ: paired per instance, 95% t interval.",
            "",
            "| teacher | task | n | selected | random | Δ | 95% CI |",
            "|---|---|---|---|---|---|---|",
        ]
        for teacher, s in selection.get("teachers", {}).items():
            for task, r in s.get("tasks", {}).items():
                lines.append(
                    f"| {teacher} | {task} | {r['n']} | {fmt(r['selected_share'])} | {fmt(r['random_share'])} "
                    f"| {fmt(r['delta_mean'], sign=True)} | {_ci(r['ci95'])} |"
                )
        lines.append("")

    span = "n/a" if wall["span_seconds"] is None else f"{wall['span_seconds'] / 3600:.2f} h"
    lines += [
        "## Wall time",
        "",
        f"{wall['cells']} cells, {wall['cell_seconds']:.0f} s of cell time "
        f"(mean {fmt(wall['mean_cell_seconds'], 1)} s per cell) + {wall['other_stage_seconds']:.0f} s for teacher snapshots, caches and diagnostics = "
        f"**{wall['total_seconds'] / 3600:.2f} h**; first start to last end: "
        f"{span}.",
        "",
    ]
    return "\n".join(lines)


def _add_ablation_h2h(sp: StudyParams, summaries: dict[str, list[dict]], rows: dict[str, list[dict]]) -> None:
    for init in sp.ablation.inits:
        v = f"{init}-{FULL_TEACHER}"
        for s in summaries.get(v, []):
            if s["method"] in sp.ablation.methods:
                c = _head_to_head(rows.get(v, []), s["task"], s["condition"], s["method"], "clip_td")
                s["_vs_clip_td"] = (c or {}).get("paired")


def plot(summaries: dict[str, list[dict]], dose: Sequence[dict], path: Path, dose_path: Path) -> None:
    """study.png: clip_td's paired Δ (95% CI) per task and condition, per init; dose.png: Δ per teacher."""
    from .report import condition_order, task_order
    from .report.plots import _pyplot

    plt = _pyplot()
    tasks = sorted({s["task"] for ss in summaries.values() for s in ss}, key=task_order) or ["none"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        # One x position per condition of any init, so the inits' points for a condition sit side by side.
        conds = sorted(
            {s["condition"] for ss in summaries.values() for s in ss if s["task"] == task},
            key=condition_order,
        )
        for k, (variant, ss) in enumerate(sorted(summaries.items())):
            if not variant.endswith(f"-{FULL_TEACHER}"):
                continue
            cs = [
                s
                for s in ss
                if s["task"] == task and s["method"] == "clip_td" and s["paired"] and s["paired"]["ci95"]
            ]
            xs = [conds.index(s["condition"]) + 0.15 * k for s in cs]
            ys = [s["paired"]["mean"] for s in cs]
            err = [
                [s["paired"]["mean"] - s["paired"]["ci95"][0] for s in cs],
                [s["paired"]["ci95"][1] - s["paired"]["mean"] for s in cs],
            ]
            if cs:
                ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=variant.split("-")[0])
        ax.set_xticks(range(len(conds)), conds, rotation=30, fontsize=7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{task}: clip_td − baseline (95% CI)", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key in sorted({(d["init"], d["task"], d["condition"]) for d in dose}):
        ds = sorted(
            [
                d
                for d in dose
                if (d["init"], d["task"], d["condition"]) == key and d["delta_mean"] is not None
            ],
            key=_dose_order,
        )
        if ds:
            xs = [d["steps"] if d["steps"] is not None else max(x["steps"] or 0 for x in ds) + 1 for d in ds]
            ax.plot(xs, [d["delta_mean"] for d in ds], "o-", label=" ".join(key[1:]))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("teacher pretraining steps")
    ax.set_ylabel("clip_td − baseline")
    ax.set_title("teacher dose-response", fontsize=9)
    if ax.lines[1:]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dose_path, dpi=100)
    plt.close(fig)


def teachers(sp: StudyParams) -> list[str]:
    """The study's teachers: the finished one, then each dose snapshot."""
    return [FULL_TEACHER] + [teacher_name(s) for s in sorted(set(sp.dose.steps)) if sp.dose.methods]


def write_study_report(
    sp: StudyParams, runs: str | Path, out_dir: str | Path, teacher_path: str | Path | None = None
) -> dict:
    """Aggregate the study into OUT/results.md, summary.json, targets.json, selection.json, study.png and
    dose.png, written beside the destination and renamed into place together once all succeeded. Reads the
    files of the current grid's teachers only (layout in stages/study_report.py). Returns the targets."""
    runs = Path(runs)
    rows, missing = collect_study(sp, runs)
    if not rows:
        raise ReportError(f"{runs}: no evaluated study cell yet (run `make study`)")
    summaries = summarise_study(rows)
    _add_ablation_h2h(sp, summaries, rows)
    names = teachers(sp)
    zeroshot = load_zeroshot_files({t: runs / "zeroshot" / f"{t}.json" for t in names})
    selection: dict | None = None
    for t in names:
        part = load_optional_json(runs / "selection" / f"{t}.json")
        if part:
            selection = selection or {k: v for k, v in part.items() if k not in ("teachers", "seconds")}
            selection.setdefault("teachers", {}).update(part.get("teachers", {}))
    snaps: dict = {}
    timed = [runs / "zeroshot" / f"{t}.time.json" for t in names]
    timed += [runs / "selection" / f"{t}.json" for t in names]
    for s in sorted(set(sp.dose.steps)):
        snap = load_optional_json(runs / "metrics" / f"teacher-step{s}.json") or {}
        snaps.update(snap.get("snapshots", {}))
        timed += [runs / "metrics" / f"teacher-step{s}.json", runs / "metrics" / f"extract-step{s}.json"]
    teacher = load_optional_json(teacher_path) if teacher_path else None
    if teacher and "all" in teacher:
        snaps["full"] = teacher["all"].get("random_top1")
    dose = dose_table(sp, summaries, (teacher or {}).get("steps"), zeroshot, snaps) if sp.dose.methods else []
    tgts = targets(sp, summaries, rows, zeroshot, selection, dose)
    wall = wall_time(rows, [m for p in timed if (m := load_optional_json(p))])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "results": "results.md",
        "summary": "summary.json",
        "targets": "targets.json",
        "selection": "selection.json",
        "plot": "study.png",
        "dose": "dose.png",
    }
    with tempfile.TemporaryDirectory(dir=out, prefix=".study-") as tmp_dir:
        tmp = {k: Path(tmp_dir) / n for k, n in files.items()}
        tmp["results"].write_text(markdown(sp, summaries, zeroshot, dose, tgts, selection, wall, missing))
        tmp["summary"].write_text(json.dumps(summary_entries(summaries, zeroshot), indent=1) + "\n")
        tmp["targets"].write_text(
            json.dumps(
                {"targets": tgts, "dose": dose, "wall_time": wall, "missing_cells": len(missing)}, indent=1
            )
            + "\n"
        )
        tmp["selection"].write_text(json.dumps(selection or {}, indent=1) + "\n")
        plot(summaries, dose, tmp["plot"], tmp["dose"])
        for k, n in files.items():
            os.replace(tmp[k], out / n)
    return {"targets": tgts, "missing": missing, "wall": wall}
