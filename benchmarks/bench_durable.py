"""What flushing commit points to disk costs (pipeline/durable.py): ``prepare`` (a synthetic split written
and renamed into place) and ``extract`` (the embedded tiny teacher over that split into a fresh store), each
timed with the flushes and with them replaced by no-ops, in alternating order, in one process. Reported: the
median of the per-pair ratios (with ÷ without) and their range. The tiny teacher's forward is cheap, so the
extraction ratio is close to the worst case: with a real teacher the forward dominates and the flushes run
on writer threads behind it.

Target: each median ratio ≤ 1.10 (docs/benchmarks.md)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from unittest import mock

from benchmarks.common import TINY_TEACHER, Result, Scratch, cache_params, log, make_world, median, parser

SCENES, QUICK_SCENES = {"train": 1200}, {"train": 300}
PAIRS, QUICK_PAIRS = 4, 2


@contextlib.contextmanager
def flushes(on: bool):
    """The pipeline as it is, or with every flush it does at a commit point replaced by a no-op."""
    if on:
        yield
        return
    with contextlib.ExitStack() as stack:
        for target in (
            "pipeline.data.shards.sync_tree",
            "pipeline.data.shards.sync_dir",
            "pipeline.extract.writer.sync_files",
            "pipeline.cache.manifest.sync_dir",
        ):
            stack.enter_context(mock.patch(target, lambda *a, **k: None))
        yield


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    from pipeline import extract as X
    from pipeline.data.shards import PreparedDataset

    scenes, pairs = (QUICK_SCENES, QUICK_PAIRS) if args.quick else (SCENES, PAIRS)
    res = Result("durable", settings={"scenes": scenes, "pairs": pairs, "teacher": "clip-td-tiny, 64 px"})
    with Scratch(args.work) as work:
        work = Path(work)
        spec = X.TeacherSpec(TINY_TEACHER, "", "fp32", "cpu")
        ds = PreparedDataset(make_world(work / "src", scenes)[0])
        times: dict[str, dict[bool, list[float]]] = {
            "prepare": {True: [], False: []},
            "extract": {True: [], False: []},
        }
        for i in range(pairs):
            for on in (True, False) if i % 2 == 0 else (False, True):
                out = work / f"prep-{int(on)}"
                shutil.rmtree(out, ignore_errors=True)
                with flushes(on):
                    t = time.perf_counter()
                    make_world(out, scenes)
                    times["prepare"][on].append(time.perf_counter() - t)
                    cp = dataclasses.replace(cache_params(), store=str(work / f"s-{int(on)}.zarr"))
                    t = time.perf_counter()
                    X.extract([ds], cp.store, spec, cp, scheduler="sync", progress=False, overwrite=True)
                    times["extract"][on].append(time.perf_counter() - t)
                log(f"pair {i} flushes={'on' if on else 'off'}: prepare {times['prepare'][on][-1]:.2f} s, "
                    f"extract {times['extract'][on][-1]:.2f} s")  # fmt: skip
    for what, t in times.items():
        ratios = [a / b for a, b in zip(t[True], t[False], strict=True)]
        res.measurements[what] = {
            "seconds_with": [round(x, 3) for x in t[True]],
            "seconds_without": [round(x, 3) for x in t[False]],
            "ratio_median": round(median(ratios), 4),
            "ratio_range": [round(min(ratios), 4), round(max(ratios), 4)],
        }
        res.target(f"{what} time with flushes ÷ without", median(ratios), "<=", 1.10, f"{pairs} pairs")
    res.write(args.out)


if __name__ == "__main__":
    main()
