"""Which study cells are current: run on the inputs this checkout records, read from the two lock files.

When a shared input changes (the student backbone, the teacher's cache, the data, the code a cell imports or
a param it reads), study/dvc.lock keeps, per cell, what that cell was run on until `make study` reruns it:
over several sittings study/runs holds cells of both. A report over all of them would pair a method's runs on
one set of inputs with the baseline's on another, so the study report refuses such a folder
(``check_current``; benchmarks/study_current.py reports the current cells alone).

A cell is current when every dep its entry recorded has the hash this checkout gives it, judged without the
artifacts themselves (a fresh clone holds none): a path a lock file records as a stage's output (the root
dvc.lock's backbone, cache and shards; study/dvc.lock's weaker teachers' caches) by that record, any other
path (code) by hashing it as DVC does; and every param it recorded has its value in the params file now. The
study's cells and its teacher stages never import this module (it reads the lock files, which are no input of
theirs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from ..dvc_lockfile import fast_load, path_hash
from .grid import StudyError

BACKBONE = "artifacts/student_pretrained"


def backbone(root_lock: Path) -> str:
    """The pretrained student's md5 as the root dvc.lock records it (``pretrain_student``'s output)."""
    stage = fast_load(root_lock.read_text())["stages"]["pretrain_student"]
    return next(o["md5"] for o in stage["outs"] if o["path"] == BACKBONE)


def entry_backbone(entry: dict) -> str | None:
    """The backbone's md5 a study lock entry recorded, None when the stage reads none (scratch cells)."""
    return next((d.get("md5") for d in entry.get("deps", []) if d["path"] == BACKBONE), None)


def entries(study_lock: Path) -> Iterator[tuple[str, dict]]:
    """(stage name, entry) per stage of a lock file."""
    yield from fast_load(study_lock.read_text())["stages"].items()


def _evals(entry: dict) -> list[str]:
    return [o["path"] for o in entry.get("outs", []) if o["path"].endswith("eval.json")]


_MISSING = object()


class Inputs:
    """The inputs a checkout records now, to judge lock entries by (``stale``)."""

    def __init__(self, root_lock: Path, study_lock: Path) -> None:
        self.root = root_lock.resolve().parent
        self.stages = dict(entries(study_lock))  # the study lock's entries, parsed once
        self.outputs = {
            o["path"]: o.get("md5")
            for stages in (dict(entries(root_lock)), self.stages)
            for entry in stages.values()
            for o in entry.get("outs", [])
        }
        self._hashes: dict[str, str | None] = {}
        self._params: dict[str, Any] = {}

    def _hash(self, path: str) -> str | None:
        if path not in self._hashes:
            p = self.root / path
            self._hashes[path] = path_hash(p) if p.exists() else None
        return self._hashes[path]

    def _param(self, file: str, key: str) -> Any:
        if file not in self._params:
            p = self.root / file
            self._params[file] = yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else None
        value = self._params[file]
        for part in key.split("."):  # DVC's dotted keys name nested sections
            if not isinstance(value, dict) or part not in value:
                return _MISSING
            value = value[part]
        return value

    def stale(self, entry: dict) -> str | None:
        """Why the entry's recorded run is not of these inputs (the first dep or param that differs), or None."""
        for dep in entry.get("deps", []):
            path, md5 = dep["path"], dep.get("md5")
            now = self.outputs[path] if path in self.outputs else self._hash(path)
            if now != md5:
                return f"{path} {'is missing' if now is None else 'changed'}"
        for file, params in (entry.get("params") or {}).items():
            for key, value in params.items():
                if self._param(file, key) != value:
                    return f"{file}: {key} changed"
        return None


def _judged(root_lock: Path, study_lock: Path) -> bool:
    # A root lock that records no pretrained student is not this pipeline's (or it never ran): nothing to
    # judge the cells by.
    if not (root_lock.is_file() and study_lock.is_file()):
        return False
    try:
        backbone(root_lock)
    except (KeyError, StopIteration, TypeError):
        return False
    return True


def stale_cells(root_lock: Path, study_lock: Path) -> dict[str, str]:
    """Cell (stage name) -> why it is stale, for the cells study/dvc.lock records on other inputs than this
    checkout's: not empty while a rerun is under way (then reports/study is the previous complete report and
    cannot be regenerated here)."""
    if not _judged(root_lock, study_lock):
        return {}
    inputs = Inputs(root_lock, study_lock)
    found = {}
    for name, entry in inputs.stages.items():
        if _evals(entry) and (why := inputs.stale(entry)) is not None:
            found[name] = why
    return found


def stale_evals(paths: Iterable[str | Path], root_lock: Path, study_lock: Path) -> list[tuple[str, str]]:
    """(path, why) for those of ``paths`` (eval.json files) whose study/dvc.lock entry was run on other inputs
    than this checkout's. Lock paths are relative to the repository (the lock files' folder above study/); a
    path no entry records (a copy elsewhere, a test's folder) is not judged. No lock file, or no backbone
    recorded in dvc.lock: nothing is."""
    if not _judged(root_lock, study_lock):
        return []
    inputs = Inputs(root_lock, study_lock)
    root = inputs.root
    recorded = {(root / p).resolve(): e for e in inputs.stages.values() for p in _evals(e)}
    out = []
    for p in paths:
        entry = recorded.get(Path(p).resolve())
        if entry is not None and (why := inputs.stale(entry)) is not None:
            out.append((str(p), why))
    return out


def check_current(evals: Iterable[str | Path], root_lock: Path, study_lock: Path) -> None:
    """Raise ``StudyError`` when any of ``evals`` was run on other inputs than this checkout records."""
    stale = stale_evals(evals, root_lock, study_lock)
    if stale:
        path, why = stale[0]
        raise StudyError(
            f"{study_lock}: {len(stale)} cell(s) were run on other inputs than {root_lock} and this checkout "
            f"record (e.g. {path}: {why}): a report would pair runs of two versions. Rerun them with "
            "`make study`; `python -m benchmarks.study_current` reports the current cells alone"
        )
