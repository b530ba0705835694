"""Stage `study_cell`: one cell of the evidence study — train the student, then score it on the test split."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import click

from pipeline.study import INITS, StudyError, load_study, override_args
from stages.common import params_options, stage_params, write_json
from student.losses import METHODS


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--study", "study_path", default="study/params.yaml", help="The study's parameters (study.*).")
@click.option("--task", type=click.Choice(["vqa", "snli_ve", "vcr"]), required=True)
@click.option("--condition", required=True, help="full, shift or lowshot-F.")
@click.option("--method", type=click.Choice(METHODS), required=True)
@click.option("--seed", type=int, required=True)
@click.option(
    "--init", type=click.Choice(INITS), required=True, help="Student initialisation (student.init)."
)
@click.option("--cache", default=None, help="Teacher cache the cell distils from [default: cache.store].")
@click.option(
    "--teacher-checkpoint",
    default=None,
    help="The teacher checkpoint that cache was extracted with (a dose-response snapshot) [default: "
    "teacher.pretrained].",
)
@click.option("--data", "data_root", default=None, help="Prepared splits [default: data.out/data.source].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@params_options
def main(
    study_path,
    task,
    condition,
    method,
    seed,
    init,
    cache,
    teacher_checkpoint,
    data_root,
    out,
    params_path,
    overrides,
):
    """Train one study cell from scratch (params.yaml + study.overrides + --set, student.init=INIT) and write
    OUT/student.pt, OUT/train.json and OUT/eval.json (the resume checkpoint is removed once the cell is done).
    eval.json's `cell` records init, teacher cache, the cell's own wall seconds and when it started and ended
    (the study report sums them into its wall time).

    eval.json is written last, so a cell killed part-way has none and DVC reruns it on the next `make study`.
    """
    from stages.evaluate import ExportError, evaluate_run
    from stages.train_student import USER_ERRORS
    from student.train import RunSpec, run_student

    started = time.time()
    try:
        sp = load_study(study_path)
    except StudyError as e:
        raise click.UsageError(str(e)) from None
    extra = {"student__init": init}
    if teacher_checkpoint:
        extra["teacher__pretrained"] = teacher_checkpoint
    params = stage_params(params_path, (*override_args(sp, **extra), *overrides))
    run = RunSpec(
        task=task,
        condition=condition,
        method=method,
        seed=seed,
        data_root=data_root or str(Path(params.data.out) / params.data.source),
        cache=cache or params.cache.store,
        out=str(out),
    )
    try:
        run_student(params, run, resume=False, progress=False)
        result = evaluate_run(out, params)
    except (*USER_ERRORS, ExportError) as e:
        raise click.ClickException(f"{out}: " + (" ".join(str(e).split()) or type(e).__name__)) from None
    finished = time.time()
    result["cell"] = {
        "init": init,
        "cache": run.cache,
        "teacher_checkpoint": params.teacher.pretrained,
        "wall_seconds": round(finished - started, 2),
        "started": round(started, 2),
        "finished": round(finished, 2),
        "machine": platform.node(),
    }
    # The resume state (optimizer moments: three times the student) is of no use once the cell is done, and
    # 600 of them would fill the disk; this run wrote it, so this run removes it.
    (out / "checkpoint.pt").unlink(missing_ok=True)
    write_json(out / "eval.json", result, newline=False)
    click.echo(f"{out}: {result['primary_metric']} = {result['primary']:.4f} in {finished - started:.0f}s")


if __name__ == "__main__":
    main()
