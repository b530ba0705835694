"""Which student backbone trained each study cell, read from the two lock files.

When `pretrain_student` changes, dvc.lock records the new backbone at once, while study/dvc.lock keeps, per
cell, the backbone that cell was trained from until `make study` reruns it: over several sittings
study/runs holds cells of both. A report over all of them would pair a method's runs on one backbone with
the baseline's on the other, so the study report refuses such a folder (``check_current``; benchmarks/study_current.py
reports the current cells alone). The study's cells and its teacher stages never import this module (it
reads the lock files, which are no input of theirs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from ..dvc_lockfile import fast_load
from .grid import StudyError

BACKBONE = "artifacts/student_pretrained"


def backbone(root_lock: Path) -> str:
    """The pretrained student's md5 as the root dvc.lock records it (``pretrain_student``'s output)."""
    stage = fast_load(root_lock.read_text())["stages"]["pretrain_student"]
    return next(o["md5"] for o in stage["outs"] if o["path"] == BACKBONE)


def entry_backbone(entry: dict) -> str | None:
    """The backbone's md5 a study lock entry recorded, None when the stage reads none (scratch cells)."""
    return next((d.get("md5") for d in entry.get("deps", []) if d["path"] == BACKBONE), None)


def entries(study_lock: Path) -> Iterator[tuple[str | None, dict]]:
    """(``entry_backbone``, the entry) per stage."""
    for entry in fast_load(study_lock.read_text())["stages"].values():
        yield entry_backbone(entry), entry


def stale_cells(root_lock: Path, study_lock: Path) -> int:
    """How many cells study/dvc.lock records with another backbone than dvc.lock's: > 0 while a rerun is
    under way (then reports/study is the previous backbone's report and cannot be regenerated here)."""
    current = backbone(root_lock)
    return sum(1 for md5, _ in entries(study_lock) if md5 is not None and md5 != current)


def stale_evals(paths: Iterable[str | Path], root_lock: Path, study_lock: Path) -> list[str]:
    """Those of ``paths`` (eval.json files) whose study/dvc.lock entry records another backbone than
    dvc.lock's. Lock paths are relative to the repository (the lock files' folder above study/); a path no
    entry records (a copy elsewhere, a test's folder) is not judged. No lock file, or no backbone recorded in
    dvc.lock: nothing is."""
    if not (root_lock.is_file() and study_lock.is_file()):
        return []
    try:
        current = backbone(root_lock)
    except (KeyError, StopIteration, TypeError):  # no pretrain_student recorded: no backbone to judge by
        return []
    root = root_lock.resolve().parent
    trained = {
        (root / o["path"]).resolve(): md5
        for md5, entry in entries(study_lock)
        if md5 is not None
        for o in entry.get("outs", [])
        if o["path"].endswith("eval.json")
    }
    return [str(p) for p in paths if trained.get(Path(p).resolve(), current) != current]


def check_current(evals: Iterable[str | Path], root_lock: Path, study_lock: Path) -> None:
    """Raise ``StudyError`` when any of ``evals`` was trained from another backbone than dvc.lock's."""
    stale = stale_evals(evals, root_lock, study_lock)
    if stale:
        raise StudyError(
            f"{study_lock}: {len(stale)} cell(s) were trained from another student backbone than {root_lock} "
            f"records (e.g. {stale[0]}): a report would pair runs of two backbones. Rerun them with "
            "`make study`; `python -m benchmarks.study_current` reports the current cells alone"
        )
