"""Stage `train_student`: one student run (task × condition × method × seed) from the shards and the teacher cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from pipeline.cache import CacheFormatError, StaleCacheError
from pipeline.conditions import Condition
from pipeline.data.errors import DataError
from pipeline.lock import StoreNotWritable
from pipeline.names import TASKS
from pipeline.splits import resolve_splits
from pipeline.teacher import TeacherError
from stages.common import one_line, stage_command, stage_params
from student.errors import RunError
from student.losses import METHODS
from student.model import StudentParamsError
from student.targets import CacheCorrupt, NonFiniteTarget
from student.train import RunSpec, run_student

# What a user can cause and fix (bad data, cache, checkpoint, params met at run time, a locked --out, a loss
# gone NaN under train.on_nonfinite=fail): one line each, no traceback. Anything else is a bug and keeps its.
USER_ERRORS = (
    RunError, CacheFormatError, StaleCacheError, CacheCorrupt, NonFiniteTarget, DataError, StoreNotWritable,
    FloatingPointError, FileNotFoundError, StudentParamsError, TeacherError,
)  # fmt: skip


@stage_command(user_errors=USER_ERRORS)
@click.option("--task", type=click.Choice(TASKS), required=True, help="Which task head to train.")
@click.option(
    "--condition",
    default="full",
    help="Protocol condition: full, shift (train on source domains, test on protocol.shift_target_domain) or "
    "lowshot-F (a stratified, nested fraction F of the labelled training instances).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=None,
    help="Distillation method [default: distill.method].",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    help="Run seed: weights, data order and the low-shot subset.",
)
@click.option(
    "--data",
    "data_root",
    default=None,
    help="Directory with the prepared splits, as prepare_data wrote them (e.g. data/shards/vqa holding train2014 "
    "and val2014); roles from the source's standard ones or protocol.splits [default: data.out/data.source].",
)
@click.option(
    "--cache", default=None, help="Teacher cache (Zarr store path or fsspec URL) [default: cache.store]."
)
@click.option(
    "--out", default=None, help="Run directory [default: runs/<task>-<condition>-<method>-s<seed>]."
)
@click.option(
    "--online-teacher",
    is_flag=True,
    help="Compute the teacher targets by running the teacher inside the loop instead of reading the cache "
    "(to check that the cache equals online targets and to measure what the cache saves).",
)
@click.option("--quiet", is_flag=True, help="No progress bar (for pipelines that log to files).")
@click.option(
    "--no-resume",
    is_flag=True,
    help="Start from scratch even if the run directory holds a checkpoint. Without it, a checkpoint is "
    "resumed only if it is this run's (same task, condition, method, seed, training params, data and cache); "
    "otherwise the run stops naming what differs.",
)
def main(
    task,
    condition,
    method,
    seed,
    data_root,
    cache,
    out,
    online_teacher,
    quiet,
    no_resume,
    params_path,
    overrides,
) -> None:
    """Train one student with the CLIP-TD loss (or a baseline, or the blind floor) and select it on validation.

    Writes OUT/student.pt (the exported student at its best validation step: backbone + task head, no
    distillation heads), OUT/train.json (split sizes, best validation score and step, steps, seconds, the last
    step's losses, parameter count) and OUT/checkpoint.pt (resume state, with the run's identity). The test split
    is not scored here: `python -m stages.evaluate OUT` does that. OUT/.lock is held while training.
    Under torchrun each rank streams its own shards and gradients are averaged over ranks.
    """
    try:
        Condition.parse(condition)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--condition") from None
    params = stage_params(params_path, overrides)
    method = method or params.distill.method
    run = RunSpec(
        task=task,
        condition=condition,
        method=method,
        seed=seed,
        data_root=data_root or str(Path(params.data.out) / params.data.source),
        cache=cache or params.cache.store,
        out=out or f"runs/{task}-{condition}-{method}-s{seed}",
    )
    resolve_splits(run.data_root, params.protocol.splits)  # a missing role fails here, before torch starts
    try:
        metrics = run_student(
            params, run, online_teacher=online_teacher, resume=not no_resume, progress=not quiet
        )
    except FloatingPointError as e:
        raise click.ClickException(
            f"{run.name}: training stopped, not finite: {one_line(e)} (train.on_nonfinite=skip skips such steps)"
        ) from None
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not one per torchrun rank
        summary = {
            "run": run.name,
            "best_val": metrics["best_val"],
            "seconds": round(metrics["train_seconds"], 1),
        }
        click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
