"""The targets' NaN/Inf check on ViT-B/16-shaped token batches: ``python -m benchmarks.bench_finite``.

student/targets.py's ``_first_nonfinite`` decides by row sums (a finite sum proves a finite row) and runs the
exact ``isfinite`` over every element only when a sum is not finite. This times it against that exact check
alone (what it did before), interleaved, on one torch thread as the trainer's prefetch thread runs it: 32
images × 196 tokens × 512 (ViT-B/16) in float16 (as a CUDA trainer hands them over) and float32 (a CPU one).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import Result, median, parser
from student.targets import _first_nonfinite

SHAPE = (32, 196, 512)


def _exact(t: torch.Tensor) -> int | None:
    ok = torch.isfinite(t.reshape(len(t), -1)).all(1)
    return None if bool(ok.all()) else int((~ok).nonzero()[0])


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=30, help="timed pairs per dtype (default %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = Result("finite")
    res.settings = {"shape": list(SHAPE), "reps": args.reps, "torch_threads": 1}
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
        assert _first_nonfinite(x) is None and _exact(x) is None
        pairs = []
        for _ in range(args.reps + 2):
            t0 = time.perf_counter()
            _exact(x)
            t1 = time.perf_counter()
            _first_nonfinite(x)
            t2 = time.perf_counter()
            pairs.append((t1 - t0, t2 - t1))
        pairs = pairs[2:]  # warm-up
        name = str(dtype).removeprefix("torch.")
        m = {
            "exact_ms": round(1e3 * median([a for a, _ in pairs]), 3),
            "row_sums_ms": round(1e3 * median([b for _, b in pairs]), 3),
            "ratio_pairs": round(median([b / a for a, b in pairs]), 4),
        }
        res.measurements[name] = m
        print(f"{name}: exact {m['exact_ms']} ms, row sums first {m['row_sums_ms']} ms per batch", flush=True)
        res.target(f"{name}: check by row sums / exact check", m["ratio_pairs"], "<=", 0.5)
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
