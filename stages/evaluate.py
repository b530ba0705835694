"""Stage `evaluate`: score an exported student on the test split of its protocol condition, per domain."""

from __future__ import annotations

import functools
import json
import multiprocessing as mp
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import torch

from pipeline.config import usable_cores
from pipeline.data.errors import DataError
from pipeline.data.shards import PreparedDataset
from pipeline.metrics import PRIMARY, UnlabelledInstance
from pipeline.protocol import SplitError, make_split
from pipeline.splits import recorded_splits, resolve_splits
from stages.common import stage_command, stage_params, write_json
from student.data import open_prepared
from student.evaluation import EVAL_BATCH, BatchCache, ExportError, evaluate, export_spec, load_student


@functools.cache
def _instances(split_dir: Path) -> tuple[PreparedDataset, tuple]:
    """A split's dataset and parsed instances, once per process: the grid's runs share the same splits, and
    parsing the train shards again for each of 54 runs was most of this stage's time."""
    ds = open_prepared(split_dir)
    return ds, tuple(ds.iter_instances())


# The test batches a process's runs share: the grid's runs of a task (but the blind ones) read the same ones.
_TEST_BATCHES = BatchCache()


def _train_record(run_dir: Path) -> dict:
    """RUN_DIR/train.json (what training recorded: steps, seconds, best validation score), or {} without one."""
    path = run_dir / "train.json"
    if not path.exists():
        return {}
    fix = "train_student writes it: rerun this run"
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ExportError(f"{path}: not a JSON object ({type(e).__name__}: {e}); {fix}") from None
    if not isinstance(record, dict):
        raise ExportError(f"{path}: not a JSON object; {fix}")
    return record


def recorded_shift(exported: dict, pp) -> dict:
    """The shift key and target domain the student was trained with (its export records them): a shift
    student scored on another domain than it was held out from would measure nothing. Exports made before
    they were recorded fall back to the params evaluate runs with."""
    rec = exported.get("protocol")
    if isinstance(rec, dict) and all(
        isinstance(rec.get(k), str) for k in ("shift_key", "shift_target_domain")
    ):
        return {k: rec[k] for k in ("shift_key", "shift_target_domain")}
    return {"shift_key": pp.shift_key, "shift_target_domain": pp.shift_target_domain}


def evaluate_run(run_dir: Path, params) -> dict:
    exported, student, heads = load_student(run_dir / "student.pt")
    run = exported["run"]
    # The folders training recorded; a student exported before roles were recorded resolves them now.
    recorded = exported.get("splits")
    dirs = (
        recorded_splits(run["data_root"], recorded)
        if isinstance(recorded, dict)
        else resolve_splits(run["data_root"], params.protocol.splits)
    )
    test_ds, test_instances = _instances(dirs.test)
    shift = recorded_shift(exported, params.protocol)
    try:
        # The split training drew (its val split too, or a slice of train), for its test keys; the low-shot
        # subset's size warning was training's to give.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"lowshot-", category=UserWarning)
            split = make_split(
                run["task"], run["condition"], run["seed"], _instances(dirs.train)[1], test_instances,
                _instances(dirs.val)[1] if dirs.val else None,
                shift_key=shift["shift_key"], target=shift["shift_target_domain"],
            )  # fmt: skip
    except SplitError as e:  # e.g. a shift target no test instance has: a score of 0 on nothing is no score
        raise DataError(run_dir, "protocol", str(e)) from None
    train = _train_record(run_dir)
    spec = export_spec(exported, run_dir / "student.pt", params.distill)
    batches = _TEST_BATCHES.batches(test_ds, split.test, spec, EVAL_BATCH, exported["teacher_model"])
    result = evaluate(student, heads, test_ds, split.test, spec, batches=batches)
    return {
        "run": {k: run[k] for k in ("task", "condition", "method", "seed")},
        "protocol": shift,
        "primary_metric": PRIMARY[run["task"]],
        "primary": result["primary"],
        "metrics": result["metrics"],
        "train": {k: train.get(k) for k in ("steps", "train_seconds", "best_val", "student_parameters")},
    }


def grid_run_dirs(params, runs: Path) -> list[Path]:
    """The run directory of every cell of the protocol grid in params (the DVC matrix's cells)."""
    pp = params.protocol
    return [
        runs / f"{t}-{c}-{m}-s{s}"
        for t in pp.tasks
        for c in pp.conditions
        for m in pp.methods
        for s in pp.seeds
    ]


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _scored(run_dirs: list[Path], params, jobs: int, cores: int) -> Iterator[tuple[Path, dict]]:
    """(run folder, result) in ``run_dirs``' order, scored by ``jobs`` processes side by side, each with its
    share of the cores (docs/time-budget.md measures one against several)."""
    if jobs <= 1:
        for run_dir in run_dirs:
            yield run_dir, evaluate_run(run_dir, params)
        return
    # spawn, not fork: a forked child of a process holding torch's thread pools can hang.
    with ProcessPoolExecutor(
        jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(max(1, cores // jobs),)
    ) as pool:
        futures = [pool.submit(evaluate_run, run_dir, params) for run_dir in run_dirs]
        try:
            # A run's user error (ExportError, DataError) is raised here as the run raised it.
            for run_dir, future in zip(run_dirs, futures, strict=True):
                yield run_dir, future.result()
        finally:
            for future in futures:
                future.cancel()


@stage_command(user_errors=(ExportError, DataError, FileNotFoundError, UnlabelledInstance))
@click.argument("run_dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--runs",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    help="With no RUN_DIRS: evaluate every cell of the protocol grid (protocol.tasks × conditions × methods × "
    "seeds) found as RUNS/<task>-<condition>-<method>-s<seed>.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write OUT/<run name>/eval.json instead of RUN_DIR/eval.json (dvc.yaml keeps evaluation outputs apart "
    "from the training stages' outputs).",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=0),
    default=0,
    help="Score this many runs side by side, each in a process of its own with its share of the cores "
    "(0 = one per core, at most one per run). Each run's scores do not depend on it.",
)
def main(run_dirs, runs, out, jobs, params_path, overrides) -> None:
    """Score each RUN_DIR's exported student (student.pt) on its condition's test split.

    VQA score over the 10 human answers, SNLI-VE accuracy, VCR Q→A, QA→R and Q→AR, overall and per domain;
    written to RUN_DIR/eval.json (or OUT/<run name>/eval.json). The test split is read here only, never during
    training or model selection. A few processes (--jobs) score the whole grid, so the pipeline pays torch's
    start-up once per process, not per run.
    """
    params = stage_params(params_path, overrides)
    run_dirs = list(run_dirs) or grid_run_dirs(params, runs)
    missing = [str(d) for d in run_dirs if not (d / "student.pt").exists()]
    if missing:
        raise click.ClickException(
            f"no student.pt in {', '.join(missing)} (train first with python -m stages.train_student)"
        )
    if out:  # OUT/<name>/eval.json: two run folders of one name would overwrite each other's result
        names = [d.name for d in run_dirs]
        clash = sorted({str(d) for d in run_dirs if names.count(d.name) > 1})
        if clash:
            raise click.ClickException(
                f"--out {out}: run folders {', '.join(clash)} share a name, so their eval.json would overwrite "
                "each other's; evaluate them into different --out folders"
            )
    cores = usable_cores()
    for run_dir, result in _scored(run_dirs, params, min(jobs or cores, len(run_dirs)), cores):
        dest = (out / run_dir.name) if out else run_dir
        write_json(dest / "eval.json", result, newline=False)  # a failed write leaves the previous eval.json
        click.echo(
            f"{run_dir}: {result['primary_metric']} = {result['primary']:.4f} (n={result['metrics']['n']})"
        )


if __name__ == "__main__":
    main()
