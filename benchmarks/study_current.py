"""The study's report over only the cells trained from the current student backbone, while a rerun is under
way: `python -m benchmarks.study_current --out benchmarks/results/study-rerun-itm`.

When `pretrain_student` changes (the ITM fix), every cell that fine-tunes the backbone is stale, and
`make study` reruns them over several sittings; until the last one, study/runs holds cells from both
backbones and `reports/study/` stays the previous complete report. This takes the cells whose
study/dvc.lock entry records the backbone that dvc.lock's `pretrain_student` stage now outputs or no backbone
at all (scratch cells, which a backbone change leaves current), and whose eval.json is the file that entry
recorded, copies them (with the study's shared zero-shot, selection and
teacher metrics) into a scratch folder and runs `stages.study_report` on it: an incomplete report of the
rerun so far, with the same statistics as the final one.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import click

from pipeline.study.backbone import backbone, entries

RECORD = Path("benchmarks/results/study-rerun-itm")  # the committed interim report of the rerun under way
SHARED = ("zeroshot", "selection", "metrics")  # study/runs folders no backbone change touches


def current_cells(root_lock: Path, study_lock: Path) -> list[Path]:
    """Run folders of the cells trained from the backbone ``root_lock`` records, and of the cells that read no
    backbone (student.init: scratch), with the outputs their entries recorded."""
    current = backbone(root_lock)
    cells = []
    for md5, entry in entries(study_lock):
        if md5 is not None and md5 != current:
            continue  # a cell of the previous backbone
        for o in entry.get("outs", []):
            p = Path(o["path"])
            if p.name == "eval.json" and p.exists() and hashlib.md5(p.read_bytes()).hexdigest() == o["md5"]:
                cells.append(p.parent)
    return sorted(cells)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--runs", default="study/runs", show_default=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option("--lock", "root_lock", default="dvc.lock", show_default=True, type=click.Path(path_type=Path))
@click.option("--study-lock", default="study/dvc.lock", show_default=True, type=click.Path(path_type=Path))
@click.option("--out", default=RECORD, show_default=True, type=click.Path(file_okay=False, path_type=Path))
def main(runs: Path, root_lock: Path, study_lock: Path, out: Path) -> None:
    """Write the study report of the cells trained from the current backbone to OUT."""
    from stages.study_report import main as study_report

    cells = current_cells(root_lock, study_lock)
    if not cells:
        raise click.ClickException(f"{study_lock}: no cell records the backbone {root_lock} names")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "runs"
        for name in SHARED:
            if (runs / name).is_dir():
                shutil.copytree(runs / name, scratch / name)
        for cell in cells:
            shutil.copytree(
                cell, scratch / cell.relative_to(runs), ignore=shutil.ignore_patterns("*.pt", ".*")
            )
        study_report.main(
            [
                "--runs",
                str(scratch),
                "--teacher",
                str(runs / "metrics" / "teacher-full.json"),
                "--out",
                str(out),
            ],
            standalone_mode=False,
        )
    (out / "cells.txt").write_text("".join(f"{c}\n" for c in cells))
    click.echo(f"{len(cells)} cells from the current backbone -> {out}")


if __name__ == "__main__":
    main()
