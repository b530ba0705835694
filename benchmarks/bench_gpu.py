"""The GPU check: a real-size teacher's extraction against its bare forward, and student steps cached vs online.

Run as one command where a CUDA device is lent (``python -m benchmarks.bench_gpu``; a few minutes on one H100):

* Extraction (as bench_extract measures it, unit by unit against the bare forward on the same images):
  ViT-B-16 with random init at its real size (224 px), fp16 autocast, batch 256, for each decode-worker
  setting in ``--workers`` (``-1`` = the automatic choice, ``cache.num_workers``'s default), one unit at a
  time and two at a time (``cache.n_workers: 2`` on the sync scheduler, whole passes). Target ≥ 0.95.
* Students (bench_train's measurements, the student on the GPU): cached ``clip_td`` ÷ ``baseline`` per step
  and as the training loop runs them (target ≤ 1.10), and online teacher ÷ cached (the cache's saving, ≥ 2
  expected), once with the embedded tiny teacher and once with ViT-B-16 as the teacher (its own cache of the
  same synthetic world).

* The host's share (bench_extract's ``host-vit-b-16-224px`` on this machine's CPU, forward stubbed): what one
  worker's CPU spends per image around the forward, and after each unit's last forward.

``--quick`` shrinks every size so the script can be smoke-tested on a CPU; its numbers are not the check's.
Without ``--quick`` a machine without CUDA is refused: CPU numbers are bench_extract's and bench_train's.
"""

from __future__ import annotations

import torch

from benchmarks import bench_extract, bench_train
from benchmarks.common import TINY_TEACHER, Result, Scratch, log, parser
from benchmarks.world import build

MODEL, SIZE, BATCH, PRECISION = "ViT-B-16", 224, 256, "fp16"
IMAGES, REPS = 4096, 3
QUICK_IMAGES, QUICK_REPS = 96, 2
STUDENT_TASKS = ("vqa", "snli_ve")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, overrides=True)
    p.add_argument(
        "--workers", default="-1,8", help="cache.num_workers settings to measure (default %(default)s)"
    )
    p.add_argument("--steps", type=int, default=30, help="timed student steps per arm (default %(default)s)")
    p.add_argument(
        "--teachers",
        default=f"tiny,{MODEL.lower()}",
        help="teachers of the student check, of tiny and %(default)s; empty: extraction only (a --quick run on "
        f"a CPU spends most of its ~18 minutes extracting and running {MODEL} for the students)",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        p.error(
            "no CUDA device here: the GPU check needs one (--quick runs it small on the CPU as a smoke test)"
        )
    known = {"tiny": TINY_TEACHER, MODEL.lower(): MODEL}
    teachers = [x for x in args.teachers.split(",") if x]
    unknown = [x for x in teachers if x not in known]
    if unknown:
        p.error(f"--teachers: unknown {unknown} (allowed: {', '.join(known)})")
    n, reps = (QUICK_IMAGES, QUICK_REPS) if args.quick else (IMAGES, REPS)
    # fp16 autocast on a CPU is many times slower than fp32: a --quick smoke run there keeps fp32.
    precision = PRECISION if torch.cuda.is_available() else "auto"
    res = Result("gpu")
    res.settings = {
        "model": MODEL, "image_size": SIZE, "batch_size": BATCH, "precision": precision, "images": n,
        "repetitions": reps, "workers": args.workers, "steps": args.steps, "teachers": args.teachers,
        "quick": args.quick, "overrides": args.set,
    }  # fmt: skip
    with Scratch(args.work) as work:
        for w in (int(x) for x in args.workers.split(",") if x):
            # Units of 2048 images (8 batches of 256, 16 shards): a unit's shards are written behind its next
            # batches' forward, so only its last batch's are written after its last forward (an eighth of them).
            sets = (
                f"cache.batch_size={BATCH}",
                "cache.image_rows_per_unit=2048",
                f"cache.num_workers={w}",
                *args.set,
            )
            name = f"extract-{MODEL.lower()}-workers{'auto' if w < 0 else w}"
            # Also two units at a time (cache.n_workers: 2 on the sync scheduler): one unit's host work beside
            # the other's, the lever the first check left to measure (docs/benchmarks.md).
            m = bench_extract.measure(
                name, MODEL, SIZE, n, reps, work, sets, precision=precision, units_at_once=2
            )
            res.measurements[name] = m
            bench_extract.add_target(res, name, m)
            res.write(args.out, complete=False)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next setting starts from the same free memory
        # The host's share around a stubbed forward on this machine's CPU: what the ratios above leave to it.
        name = f"host-{MODEL.lower()}-{SIZE}px"
        res.measurements[name] = bench_extract.measure_host(
            name, MODEL, SIZE, min(n, 1024), reps, work, (f"cache.batch_size={BATCH}", *args.set)
        )
        res.write(args.out, complete=False)
        steps = max(3, args.steps // 5) if args.quick else args.steps
        for label in teachers:
            model = known[label]
            world = build(
                work, args.quick, overrides=tuple(args.set), teacher_model=model, precision=precision
            )
            for task in STUDENT_TASKS:
                m = bench_train.measure_task(world, task, steps, work)
                m["teacher"] = label
                res.measurements[f"students-{label}-{task}"] = m
                res.target(f"{label} teacher, {task}: cached clip_td step / baseline step",
                           m["cached_over_baseline"], "<=", 1.10)  # fmt: skip
                res.target(f"{label} teacher, {task}: online-teacher step / cached step",
                           m["online_over_cached"], ">=", 2.0)  # fmt: skip
                loop = bench_train.measure_loop(world, task, steps, work)
                res.measurements[f"students-{label}-{task}@loop"] = loop
                res.target(f"{label} teacher, {task}: cached clip_td step / baseline step, training loop",
                           loop["loop_cached_over_baseline"], "<=", 1.10)  # fmt: skip
                res.write(args.out, complete=False)
            log(f"students with the {label} teacher done")
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
