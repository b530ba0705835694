"""Run every benchmark (``make bench``): extraction, student training, reads, storage, scaling.

Each writes ``<out>/<name>.json`` and prints one verdict line per target; this prints them again at the end
with a summary. Each runs in its own process, so none inherits another's state (a Trainer sets torch's
process-wide thread count to ``train.threads``; thread pools, allocator and monkeypatched timers stay behind).
The student benchmarks share one scratch folder, so the synthetic world and its caches are built once. Exit status 0 even when a target is missed (a benchmark is a measurement, not a test); 1 only if
a benchmark crashed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import bench_eval, bench_extract, bench_read, bench_scaling, bench_storage, bench_train
from benchmarks.common import DEFAULT_OUT, ROOT, Scratch, machine

# Cheapest first; the student benchmarks reuse the world bench_train builds.
BENCHMARKS = {
    "storage": bench_storage,
    "train": bench_train,
    "eval": bench_eval,
    "read": bench_read,
    "scaling": bench_scaling,
    "extract": bench_extract,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--work", default="", help="shared scratch folder (default: a temporary one)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not numbers to quote")
    args = p.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    print(f"machine: {json.dumps(machine())}", flush=True)
    failed, t0 = [], time.perf_counter()
    with Scratch(args.work) as work:
        for name in names:
            print(f"== {name}", flush=True)
            argv_b = ["--out", args.out, "--work", str(work)] + (["--quick"] if args.quick else [])
            t = time.perf_counter()
            cmd = [sys.executable, "-m", BENCHMARKS[name].__name__, *argv_b]
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            if rc:  # reported, and the other benchmarks still run
                print(f"== {name}: exit status {rc}", flush=True)
                failed.append(name)
            print(f"== {name}: {time.perf_counter() - t:.0f} s", flush=True)
    print(f"\nsummary ({time.perf_counter() - t0:.0f} s, results in {args.out}):")
    for name in names:
        path = Path(args.out) / f"{name}.json"
        if name in failed or not path.exists():
            print(f"  {name}: CRASHED")
            continue
        for target, t in json.loads(path.read_text())["targets"].items():
            mark = "PASS" if t["passed"] else "MISS"
            print(f"  [{mark}] {name}: {target}: {t['value']:.4g} {t['op']} {t['threshold']:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
