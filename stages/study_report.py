"""Stage `study_report`: the evidence study's results.md, summary.json, targets.json, selection.json and plots
(study.png, dose.png, lowshot.png)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.report import ReportError
from pipeline.study import StudyError, load_study


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--study", "study_path", default="study/params.yaml", help="The study's parameters (study.*).")
@click.option(
    "--runs",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("study/runs"),
    help="The study's work folder: RUNS/<init>-<teacher>/<cell>/eval.json, RUNS/zeroshot/<teacher>.json, "
    "RUNS/selection/<teacher>.json, RUNS/metrics/{teacher,extract}-step<N>.json.",
)
@click.option(
    "--teacher",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("study/runs/metrics/teacher-full.json"),
    help="The finished teacher's metrics (its steps and retrieval score, for the dose-response table), as "
    "the study_teacher stage records them.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/study"))
@click.option(
    "--lock",
    "root_lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("dvc.lock"),
    help="The pipeline's lock: the shared artifacts it records (backbone, teacher cache, data) are the ones "
    "every cell must have been run on.",
)
@click.option(
    "--study-lock",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("study/dvc.lock"),
    help="The study's lock: what each cell was run on. A cell run on other inputs than this checkout's (a "
    "rerun after an artifact, the code or a param changed, not finished) is refused, naming the first input "
    "that differs; missing lock files check nothing.",
)
def main(study_path, runs, teacher, out, root_lock, study_lock) -> None:
    """Aggregate every finished cell of the current grid with pipeline/report/stats.py's paired t statistics:
    per init and teacher a table per task with the blind floor and the teacher's zero-shot score beside every
    condition; the teacher dose-response; the ablations against clip_td; the selection diagnostic; a verdict
    per study target (docs/study.md) computed from these numbers; the wall time; the main grid's methods
    against the labelled fraction (lowshot.png). A study still running gives a report marked incomplete; one
    whose cells were run on two versions of their inputs is refused (--study-lock) and nothing is written.
    Everything is written beside OUT and renamed into place once all of it succeeded."""
    from pipeline.study.aggregate import collect_study
    from pipeline.study.freshness import check_current
    from pipeline.study.report import write_study_report

    try:
        sp = load_study(study_path)
    except StudyError as e:
        raise click.UsageError(str(e)) from None
    try:
        rows, _ = collect_study(sp, runs)
        check_current([r["path"] for rs in rows.values() for r in rs], root_lock, study_lock)
        result = write_study_report(sp, runs, out, teacher_path=teacher)
    except (ReportError, StudyError, OSError, ValueError) as e:
        raise click.ClickException(" ".join(str(e).split())) from None
    for t in result["targets"]:
        click.echo(f"{t['status']:>10}  {t['target']}: {t['value']}")
    if result["missing"]:
        click.echo(f"incomplete: {len(result['missing'])} cell(s) not finished")
    click.echo(
        f"-> {out}/results.md, summary.json, targets.json, selection.json, study.png, dose.png, lowshot.png"
    )


if __name__ == "__main__":
    main()
