"""How long the scheduler's recheck of recorded stages takes: per stage (what ``pipeline.repro.still_changed``
does) against one status call for the whole pipeline file, and against ``repo.status`` given the stages as
targets (which re-collects each one), on the same stages of one pipeline.

The whole-file call is what the recheck did before; it read-locks every stage, so it failed with LockError while
another stage ran (pipeline/repro.py). ``python -m benchmarks.bench_recheck --out benchmarks/results/recheck``;
``--targets N`` sets how many stages the third way is timed on (it is linear in them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import log, machine
from pipeline.dvc_scope import scoped_repo
from pipeline.repro import _status, still_changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    p.add_argument("--target", default="study/dvc.yaml")
    p.add_argument(
        "--match", default="@", help="recheck the stages whose name holds this (default: every item)"
    )
    p.add_argument("--targets", type=int, default=30, help="stages timed through repo.status(targets=...)")
    p.add_argument("--out", default="benchmarks/results/recheck")
    args = p.parse_args(argv)
    with scoped_repo(".", args.target, _wait_for_lock=True) as repo:
        # The target file's own stages (the scoped index also holds the pipelines upstream of it).
        names = [s.addressing for s in repo.index.stages if s.addressing.startswith(f"{args.target}:")]
        t = time.perf_counter()
        whole = _status(repo, args.target)
        whole_s = time.perf_counter() - t
        t = time.perf_counter()
        repo.status(targets=names[: args.targets])
        targets_s = time.perf_counter() - t
    t = time.perf_counter()
    per_stage = still_changed(".", args.target, names)
    per_stage_s = time.perf_counter() - t
    agree = set(per_stage) == {n for n in names if n in whole}
    result = {
        "benchmark": "recheck",
        "machine": machine(),
        "target": args.target,
        "stages": len(names),
        "seconds": {
            "per_stage (still_changed, parse included)": round(per_stage_s, 1),
            "whole_file_status": round(whole_s, 1),
            f"repo_status_targets ({min(args.targets, len(names))} stages)": round(targets_s, 1),
        },
        "same_stages_reported_changed": agree,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recheck.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"{len(names)} stages: {result['seconds']}; same changed set: {agree}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
