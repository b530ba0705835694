"""The study's report over only the cells run on the inputs this checkout records, while a rerun is under
way: `python -m benchmarks.study_current` (writes benchmarks/results/study-rerun/).

When a shared input changes (the student backbone, the teacher's cache, the code or params a cell reads),
every cell that reads it is stale, and `make study` reruns them over several sittings; until the last one,
study/runs holds cells of both versions and `reports/study/` stays the previous complete report. This takes
the cells that are current (pipeline/study/freshness.py) and whose eval.json is the file their entry
recorded, copies them (with the study's shared zero-shot, selection and teacher metrics) into a scratch
folder and runs `stages.study_report` on it: an incomplete report of the rerun so far, with the same
statistics as the final one. Earlier reruns' records stay beside it (study-rerun-itm: the backbone's ITM fix).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import click

from pipeline.study.freshness import Inputs

RECORD = Path("benchmarks/results/study-rerun")  # the latest rerun's report: interim until its last cell
SHARED = ("zeroshot", "selection", "metrics")  # study/runs folders of the stages every cell's report shares


def current_outputs(root_lock: Path, study_lock: Path) -> list[Path]:
    """The files that the stages run on this checkout's inputs output, where each is the file its entry
    recorded (a folder output, such as a weaker teacher's cache, is no file of a report and is left out)."""
    inputs = Inputs(root_lock, study_lock)
    found = []
    for entry in inputs.stages.values():
        if inputs.stale(entry) is not None:
            continue  # run on the previous version, not rerun yet
        for o in entry.get("outs", []):
            p = Path(o["path"])
            if p.is_file() and hashlib.md5(p.read_bytes()).hexdigest() == o["md5"]:
                found.append(p)
    return sorted(found)


def _cells(outputs: list[Path]) -> list[Path]:
    return [p.parent for p in outputs if p.name == "eval.json"]


def current_cells(root_lock: Path, study_lock: Path) -> list[Path]:
    """Run folders of the cells run on this checkout's inputs, with the eval.json their entries recorded."""
    return _cells(current_outputs(root_lock, study_lock))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--runs", default="study/runs", show_default=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option("--lock", "root_lock", default="dvc.lock", show_default=True, type=click.Path(path_type=Path))
@click.option("--study-lock", default="study/dvc.lock", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default=RECORD, show_default=True, type=click.Path(file_okay=False, path_type=Path))
def main(runs: Path, root_lock: Path, study_lock: Path, out: Path) -> None:
    """Write the study report of the cells run on this checkout's inputs to OUT."""
    from stages.study_report import main as study_report

    found = current_outputs(root_lock, study_lock)
    cells = _cells(found)
    if not cells:
        raise click.ClickException(
            f"{study_lock}: no cell was run on the inputs {root_lock} and this checkout record (none rerun yet)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "runs"
        for p in found:  # the shared stages' files only where they are current too: else "not measured"
            if p.parent.name in SHARED and p.parent.parent == runs:
                (scratch / p.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, scratch / p.parent.name / p.name)
        for cell in cells:
            shutil.copytree(
                cell, scratch / cell.relative_to(runs), ignore=shutil.ignore_patterns("*.pt", ".*")
            )
        study_report.main(
            [
                "--runs",
                str(scratch),
                "--teacher",
                str(scratch / "metrics" / "teacher-full.json"),
                "--out",
                str(out),
            ],
            standalone_mode=False,
        )
    (out / "cells.txt").write_text("".join(f"{c}\n" for c in cells))
    click.echo(f"{len(cells)} current cells -> {out}")


if __name__ == "__main__":
    main()
