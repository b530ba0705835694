"""Scoring a student: encoded batches kept between passes against reading them again, and VCR with each image
read once against each image repeated for its 8 texts.

On the benchmark world (``benchmarks.world``), per task, a Trainer's student scores the test split three ways:

* ``read``: ``evaluate`` as it was, the shards read, the images decoded and the texts tokenised again;
* ``kept``: the same instances from ``student.evaluation.BatchCache`` (filled by an untimed pass), as a run's
  later validations and an evaluate process's later runs of a test split get them;
* ``repeated`` (VCR): ``kept``, but the student fed each image 8 times, as scoring did before
  ``student.model.images_for_texts`` (``shares_images`` turned off on the instance).

``--reps`` rounds, the arms in alternating order within each, one torch thread (as validation and each
evaluate process run); per round the ratios read/kept and repeated/kept, reported as median, quartiles, min
and max. Equality is checked, not assumed: every arm's scores must equal the ``read`` arm's, and for VCR the
pooled outputs of every batch must be bit-equal with and without the repeat, or the benchmark fails.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import Result, Scratch, log, median, parser, quartiles
from benchmarks.world import build

TASKS = ("vqa", "snli_ve", "vcr")


def _timed(fn) -> tuple[float, dict]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _spread(xs: list[float]) -> dict:
    return {"median": round(median(xs), 4), "quartiles": [round(q, 4) for q in quartiles(xs)],
            "min": round(min(xs), 4), "max": round(max(xs), 4)}  # fmt: skip


def measure(world, task: str, reps: int, work: Path) -> dict:
    from student.evaluation import EVAL_BATCH, BatchCache, evaluate
    from student.train import RunSpec, Trainer

    run = RunSpec(task, "full", "baseline", 0, str(world.root), world.store(), str(work / f"eval-{task}"))
    tr = Trainer(world.params(), run, progress=False)
    student, heads, ds, keys, spec = tr.student, tr.heads, tr.test_ds, tr.split.test, tr.spec
    cache = BatchCache()

    def kept() -> dict:
        return evaluate(
            student, heads, ds, keys, spec, batches=cache.batches(ds, keys, spec, EVAL_BATCH, "t")
        )

    def repeated() -> dict:
        student.shares_images = False
        try:
            return kept()
        finally:
            del student.shares_images  # back to the class's value

    arms = {"read": lambda: evaluate(student, heads, ds, keys, spec), "kept": kept}
    if task == "vcr":
        arms["repeated"] = repeated
    reference = kept()  # fills the cache
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(reps):
        for arm in arms if r % 2 == 0 else reversed(list(arms)):
            s, result = _timed(arms[arm])
            if result != reference:
                raise AssertionError(f"{task}: the {arm} pass scored differently from the kept batches")
            seconds[arm].append(s)
    out = {"task": task, "instances": len(keys), "rounds": reps,
           "seconds_median": {a: round(median(v), 4) for a, v in seconds.items()},
           "read_over_kept": _spread([r / k for r, k in zip(seconds["read"], seconds["kept"], strict=True)])}  # fmt: skip
    if task == "vcr":
        with torch.no_grad():
            student.eval()
            for b in cache.batches(ds, keys, spec, EVAL_BATCH, "t"):
                n, k2, length = b.text_ids.shape
                ids = b.text_ids.view(n * k2, length)
                if not torch.equal(
                    student(b.pixels, ids).pooled, student(b.pixels.repeat_interleave(k2, 0), ids).pooled
                ):
                    raise AssertionError("vcr: pooled outputs differ between shared and repeated images")
        out["repeated_over_kept"] = _spread(
            [r / k for r, k in zip(seconds["repeated"], seconds["kept"], strict=True)]
        )
        out["pooled_bit_equal"] = True
    log(f"{task}: " + ", ".join(f"{a} {s:.3f} s" for a, s in out["seconds_median"].items()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, overrides=True)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {TASKS}")
    p.add_argument("--reps", type=int, default=10, help="rounds of every arm (default %(default)s)")
    args = p.parse_args(argv)
    reps = max(3, args.reps // 3) if args.quick else args.reps
    torch.set_num_threads(1)
    res = Result("scoring")  # not eval.json: that name is a run's result
    with Scratch(args.work) as work:
        world = build(work, args.quick, overrides=tuple(args.set))
        res.settings = {"tasks": args.tasks, "reps": reps, "torch_threads": 1, "quick": args.quick,
                        "overrides": args.set}  # fmt: skip
        for task in args.tasks.split(","):
            res.measurements[task] = m = measure(world, task, reps, work)
            res.target(f"{task}: read pass / kept pass", m["read_over_kept"]["median"], ">=", 1.0)
            if task == "vcr":
                res.target("vcr: images repeated / read once", m["repeated_over_kept"]["median"], ">=", 1.0)
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
