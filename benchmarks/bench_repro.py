"""``make repro``'s stage commands timed without DVC: ``python -m benchmarks.bench_repro [--jobs N]``.

For a machine where DVC is not installed (the lent GPU machine: its Python has torch but no DVC, and DVC's
dependencies cannot be fetched as wheels there), so that ``make repro``'s "≤ 5 min on one GPU" can be measured.
The stages of dvc.yaml are expanded as DVC expands them (``foreach``, ``matrix``, ``${item…}`` and params
references) and run from scratch by pipeline.repro's own scheduler, in its order and parallelism (stages marked
``meta: {cores: 1}`` up to ``--jobs`` at a time, every other stage alone), in a copy of the code under
``--work`` so that nothing of this checkout (data/, artifacts/, runs/, README.md) is touched. What it leaves
out is DVC's own work per stage (hashing dependencies and outputs, writing dvc.lock), so ``make repro`` takes
this plus that. Writes ``repro.json`` (total wall, each stage's, the machine) and the run's ``results.md``,
and keeps what explains each stage's time under ``<out>/repro-stages/``: the stages' ``metrics/*.json``, every
run's ``train.json`` and each stage's log (a lent machine is gone after the run).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import Result, Scratch, log, parser
from pipeline.config import usable_cores
from pipeline.repro import OUTPUT_KEYS, Plan, entry_paths, gpu_cores, one_core, overlaps

ROOT = Path(__file__).resolve().parents[1]
# What the stage commands read from the checkout (report writes its results section into README.md).
CODE = ("pipeline", "stages", "student", "dvc.yaml", "params.yaml", "README.md")
_REF = re.compile(r"\$\{([^}]+)\}")


def _lookup(params: dict, dotted: str):
    node = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"dvc.yaml: ${{{dotted}}} is not in params.yaml")
        node = node[key]
    return node


def _resolve(value, params: dict, item=None):
    """``value`` with every ``${…}`` replaced: ``item`` / ``item.key`` from the foreach/matrix item, anything
    else from params.yaml; a string that is one whole reference keeps the referenced value's type."""
    if isinstance(value, dict):
        return {_resolve(k, params, item): _resolve(v, params, item) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, params, item) for v in value]
    if not isinstance(value, str):
        return value

    def one(ref: str):
        if ref == "item":
            return item
        if ref.startswith("item."):
            return item[ref[5:]]
        return _lookup(params, ref)

    whole = _REF.fullmatch(value)
    if whole:
        return one(whole.group(1))
    return _REF.sub(lambda m: str(one(m.group(1))), value)


def expand(dvcyaml: dict, params: dict) -> dict[str, dict]:
    """Every stage of a dvc.yaml, named as DVC names them (``prepare@train``, ``train_student@vqa-full-…``)."""
    stages: dict[str, dict] = {}
    for name, body in dvcyaml["stages"].items():
        if "foreach" in body:
            for item in _resolve(body["foreach"], params):
                stages[f"{name}@{item}"] = _resolve(body["do"], params, item)
        elif "matrix" in body:
            dims = {k: _resolve(v, params) for k, v in body["matrix"].items()}
            rest = {k: v for k, v in body.items() if k != "matrix"}
            for combo in itertools.product(*dims.values()):
                item = dict(zip(dims, combo, strict=True))
                stages[f"{name}@{'-'.join(str(v) for v in combo)}"] = _resolve(rest, params, item)
        else:
            stages[name] = _resolve(body, params)
    return stages


def _paths(entries) -> list[str]:
    return [os.path.normpath(p) for p in entry_paths(entries)]


def plan(stages: dict[str, dict]):
    """pipeline.repro's Plan of every stage: a stage needs each stage whose output is, holds or lies inside one
    of its dependencies."""
    outs = {n: [p for key in OUTPUT_KEYS for p in _paths(s.get(key))] for n, s in stages.items()}
    needs = {
        n: {
            m
            for m in stages
            if m != n and any(overlaps(d, o) for d in _paths(s.get("deps")) for o in outs[m])
        }
        for n, s in stages.items()
    }
    single = {n for n, s in stages.items() if one_core(s.get("meta"))}
    on_gpu = {n: c for n, s in stages.items() if (c := gpu_cores(s.get("meta"))) is not None}
    p = Plan(list(stages), needs, single, gpu_cores=on_gpu)
    p.prioritise()
    return p


def keep_stage_records(work: Path, dest: Path) -> int:
    """Copy what explains each stage's seconds from the run's copy of the repository to ``dest`` (metrics/,
    runs/*/train.json, pipeline.repro's stage logs), keeping their relative paths; how many files."""
    from pipeline.repro import LOG_DIR

    found = [
        *(work / "metrics").glob("*.json"),
        *(work / "runs").glob("*/train.json"),
        *(work / LOG_DIR).glob("*.log"),
    ]
    for f in found:
        to = dest / f.relative_to(work)
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, to)
    return len(found)


def argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    # The interpreter running this benchmark (a machine may have no ``python`` on its PATH).
    return [sys.executable, *words[1:]] if words and words[0] in ("python", "python3") else words


def main(args_list: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument(
        "--jobs", type=int, default=0, help="one-core stages at a time; 0 = one per core (as make repro)"
    )
    p.add_argument(
        "--minutes", type=float, default=0.0,
        help="the target in minutes (default: 5 where CUDA is available, else 30: the project's two)",
    )  # fmt: skip
    p.add_argument(
        "--params",
        default="",
        help="a params.yaml to run with instead of the checkout's (a small one: a smoke run)",
    )
    args = p.parse_args(args_list)
    if args.quick:
        p.error("--quick: not used here; a smoke run gives a small params file with --params")
    import torch

    from pipeline import repro

    cuda = torch.cuda.is_available()
    minutes = args.minutes or (5.0 if cuda else 30.0)
    res = Result("repro")
    with Scratch(args.work) as work:
        for name in CODE:
            src, dst = ROOT / name, work / name
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)
        if args.params:
            shutil.copy2(args.params, work / "params.yaml")
        stages = expand(
            yaml.safe_load((work / "dvc.yaml").read_text()),
            yaml.safe_load((work / "params.yaml").read_text()),
        )
        pl = plan(stages)
        pl.gpu = cuda  # stages marked meta: {gpu_cores: N} run beside others, as make repro runs them there
        jobs = args.jobs or usable_cores()
        res.settings = {
            "params": args.params or "params.yaml",
            "jobs": jobs,
            "stages": len(stages),
            "one_core": len(pl.one_core),
            "gpu_cores": pl.gpu_cores if cuda else {},
            "cuda": cuda,
        }
        log(f"{len(stages)} stages, {len(pl.one_core)} of them up to {jobs} at a time, in {work}")
        seconds: dict[str, float] = {}
        here = Path.cwd()
        os.chdir(work)  # the stage commands' paths are relative to the repository root
        stopped = False
        try:
            t = time.perf_counter()
            try:
                failed = repro.run(pl, jobs, command=lambda name: argv(stages[name]["cmd"]), seconds=seconds)
            except KeyboardInterrupt:  # stopped at a time limit (gpu_check.sh): keep what finished
                failed, stopped = [], True
            wall = time.perf_counter() - t
            # A time limit's later SIGTERMs must not kill the writing of what was measured (its SIGKILL,
            # much later, still can).
            term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        finally:
            os.chdir(here)
        stage_seconds = {n: round(v, 1) for n, v in seconds.items()}
        res.measurements = {
            "wall_s": round(wall, 1), "failed": failed, "stage_seconds": stage_seconds, "stopped": stopped,
        }  # fmt: skip
        if stopped:  # no time for make repro: only that it takes longer than this
            log(f"stopped after {wall:.0f} s with {len(seconds)} of {len(stages)} stages finished: no target")
        else:
            res.target(f"make repro's stage commands, minutes ({'GPU' if cuda else 'CPU'}, DVC's own work not "
                       "included)", wall / 60, "<=", minutes)  # fmt: skip
        results = work / "reports" / "results.md"
        if results.is_file():
            Path(args.out).mkdir(parents=True, exist_ok=True)
            shutil.copy2(results, Path(args.out) / "repro-results.md")
        kept = keep_stage_records(work, Path(args.out) / "repro-stages")
        log(f"kept {kept} stage record(s) under {Path(args.out) / 'repro-stages'}")
    res.write(args.out, complete=not stopped)
    signal.signal(signal.SIGTERM, term)
    return 1 if failed or stopped else 0


if __name__ == "__main__":
    raise SystemExit(main())
