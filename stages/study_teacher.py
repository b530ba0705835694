"""Stage `study_teacher`: the finished teacher's metrics, recorded with the study's cells."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from pipeline.report import ReportError
from pipeline.study.report import teacher_record


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--teacher",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("metrics/teacher.json"),
    help="pretrain_teacher's metrics of the teacher the cells distil from (dvc.yaml's pretrain_teacher).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("study/runs/metrics/teacher-full.json"),
    help="The record the study report reads (its --teacher).",
)
def main(teacher, out) -> None:
    """Copy the finished teacher's steps and retrieval scores into the study's folder, without its timings.

    The study report's dose-response puts the finished teacher beside the snapshots; reading it from here
    rather than from metrics/teacher.json, which the last `make repro` on this machine wrote, keeps
    reports/study a function of the study's committed files: a CPU with other float kernels trains a teacher
    with other scores (docs/study.md, 'Resuming on another machine'). Without the timings, retraining the
    same teacher leaves the record, and so the report's inputs, byte for byte as they were."""
    try:
        metrics = json.loads(teacher.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise click.ClickException(
            f"{teacher}: unreadable teacher metrics ({' '.join(str(e).split())})"
        ) from None
    try:
        record = teacher_record(metrics, teacher)
    except ReportError as e:
        raise click.ClickException(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    # stages.common.write_text's way, written out: importing it would add a dep to this stage's lock entry.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves the previous record and nothing beside it
    click.echo(f"teacher: {record['steps']} steps, top-1 {record['all']['random_top1']:.4f} -> {out}")


if __name__ == "__main__":
    main()
