"""Student step time: cached ``clip_td`` ÷ ``baseline`` (what distilling from the cache costs) and online
teacher ÷ cached ``clip_td`` (what the cache saves).

Three Trainers built from params.yaml (student, train, distill defaults; the embedded teacher) take
``Trainer.train_step`` on the same pre-collected training batches, round-robin step by step so that machine
load hits all three alike; after a few warm-up steps the median of N steps is reported. The cached step's
time inside ``CachedTargets`` (the reads) is reported as well: bench_read turns it into a rate. The
training-loop arm (``measure_loop``) times the steps as ``Trainer.fit`` runs them, with the next step's
targets read on the prefetch thread: that is the ratio a run pays.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import Result, Scratch, log, median, parser, quartiles
from benchmarks.world import build

TASKS = ("vqa", "snli_ve", "vcr")
DEFAULT_TASKS = ("vqa", "snli_ve")  # vcr steps cost 8 student passes (4 Q→A + 4 QA→R): --tasks adds it
WARMUP = 3


class _Timed:
    """Wraps a TargetSource, adding up the seconds spent in its images/texts calls."""

    def __init__(self, source):
        self.source, self.seconds = source, 0.0
        self.grid, self.logit_scale = source.grid, source.logit_scale

    def _call(self, name, *a, **k):
        t = time.perf_counter()
        try:
            return getattr(self.source, name)(*a, **k)
        finally:
            self.seconds += time.perf_counter() - t

    def images(self, *a, **k):
        return self._call("images", *a, **k)

    def texts(self, *a, **k):
        return self._call("texts", *a, **k)

    def __getattr__(self, name):
        return getattr(self.source, name)


def measure_task(world, task: str, steps: int, work: Path, threads: int = 0, online: bool = True) -> dict:
    import student.train as T
    from student.train import RunSpec, Trainer

    params = world.params(*([f"train.threads={threads}"] if threads else []))
    arms = {"baseline": ("baseline", False), "clip_td": ("clip_td", False), "online": ("clip_td", True)}
    if not online:
        del arms["online"]
    trainers = {}
    for arm, (method, online) in arms.items():
        run = RunSpec(
            task, "full", method, 0, str(world.root), world.store(), str(work / f"run-{task}-{arm}")
        )
        trainers[arm] = tr = Trainer(params, run, online_teacher=online, progress=False)
        if tr.source is not None:
            tr.source = _Timed(tr.source)
    stream = trainers["baseline"].batches()
    batches = [next(stream) for _ in range(WARMUP + steps)]
    times: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    source_s: dict[str, list[float]] = {a: [] for a in arms}
    # Seconds inside teacher_batch (reads + padding + §5 weights) and distill_loss (the loss forward; its
    # backward shows only in the step), per step: where a cached step's extra time goes.
    parts: dict[str, dict[str, list[float]]] = {a: {"teacher_batch": [], "distill_loss": []} for a in arms}
    spent = {"teacher_batch": 0.0, "distill_loss": 0.0}
    originals = {name: getattr(T, name) for name in spent}

    def timing(name):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return originals[name](*a, **k)
            finally:
                spent[name] += time.perf_counter() - t

        return wrapper

    for name in spent:
        setattr(T, name, timing(name))
    order = list(arms)
    for i, batch in enumerate(batches):
        # Rotate who goes first, so no arm always runs right after the same other one.
        for arm in order[i % len(order) :] + order[: i % len(order)]:
            tr = trainers[arm]
            if tr.source is not None:
                tr.source.seconds = 0.0
            spent.update(teacher_batch=0.0, distill_loss=0.0)
            t, c = time.perf_counter(), time.process_time()
            tr.train_step(batch, None)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if i >= WARMUP:
                times[arm].append(dt)
                cpu[arm].append(dc)
                source_s[arm].append(tr.source.seconds if tr.source is not None else 0.0)
                for name, v in spent.items():
                    parts[arm][name].append(v)
    for name, f in originals.items():
        setattr(T, name, f)
    med = {a: median(v) for a, v in times.items()}
    pair_cached = [c / b for c, b in zip(times["clip_td"], times["baseline"], strict=True)]
    b = len(batches[0].instances)
    texts_per_step = sum(
        1 + len(t.candidates) + len(t.rationale_candidates) for t in batches[0].teacher_texts
    )
    out = {
        "task": task,
        "torch_threads": torch.get_num_threads(),
        "batch_size": b,
        "targets_per_step": {"images": b, "texts": texts_per_step},
        "steps_timed": steps,
        "warmup_steps": WARMUP,
        "step_seconds_median": {a: round(v, 5) for a, v in med.items()},
        "step_seconds": {a: [round(x, 5) for x in v] for a, v in times.items()},
        "target_read_seconds_median": {
            a: round(median(v), 5) for a, v in source_s.items() if a != "baseline"
        },
        # Medians of the per-step ratios (each pair measured back to back) and the ratio of the medians.
        "cached_over_baseline": round(median(pair_cached), 4),
        "cached_over_baseline_of_medians": round(med["clip_td"] / med["baseline"], 4),
        # CPU seconds per step (this process, all threads): less sensitive to other load on the machine.
        "cpu_seconds_median": {a: round(median(v), 5) for a, v in cpu.items()},
        "cpu_cached_over_baseline": round(median(cpu["clip_td"]) / median(cpu["baseline"]), 4),
        "read_share_of_cached_step": round(median(source_s["clip_td"]) / med["clip_td"], 4),
        "seconds_median_in": {
            a: {name: round(median(v), 5) for name, v in parts[a].items()} for a in arms if a != "baseline"
        },
    }
    if "online" in arms:
        pair_online = [o / c for o, c in zip(times["online"], times["clip_td"], strict=True)]
        out["online_over_cached"] = round(median(pair_online), 4)
        out["online_over_cached_of_medians"] = round(med["online"] / med["clip_td"], 4)
        out["cpu_online_over_cached"] = round(median(cpu["online"]) / median(cpu["clip_td"]), 4)
    log(
        f"{task} ({out['torch_threads']} threads): step "
        + " / ".join(f"{a} {med[a] * 1e3:.0f}" for a in arms)
        + f" ms: cached÷baseline {out['cached_over_baseline']}"
        + (f", online÷cached {out['online_over_cached']}" if "online" in arms else "")
    )
    return out


def cuda_syncs_per_step(trainer, pending) -> int | None:
    """How often one training step makes the host wait for the device, as torch's sync debug mode reports
    it (each wait keeps the host from queueing the rest of the step); None when the trainer is not on CUDA.
    The step's batch is fetched and the next one prefetched before counting, so only the step is counted."""
    if trainer.device.type != "cuda":
        return None
    item = pending.next()
    pending.future.result()  # the prefetch thread's copies are not the step's
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(*item)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_loop(world, task: str, steps: int, work: Path, block: int = 10) -> dict:
    """Seconds per step as the training loop pays them: ``Trainer.fit``'s prefetch thread makes step n+1's
    batch and teacher targets while step n runs. The two arms take turns in blocks of ``block`` steps (a
    prefetch thread overlaps only its own arm's steps, as in a real run); per-step time = block time /
    block, and the ratio is the median over back-to-back block pairs."""
    from student.train import RunSpec, Trainer, _Prefetch

    params = world.params()
    trainers = {
        arm: Trainer(params, RunSpec(task, "full", arm, 0, str(world.root), world.store(),
                                     str(work / f"loop-{task}-{arm}")), progress=False)
        for arm in ("baseline", "clip_td")
    }  # fmt: skip
    stream = trainers["baseline"].batches()
    blocks = max(2, steps // block) + 1  # the first block of each arm warms up
    batches = [next(stream) for _ in range(blocks * block + 2)]  # + the sync count's step and its prefetch
    pending = {arm: _Prefetch(tr, iter(batches), None) for arm, tr in trainers.items()}
    per_step: dict[str, list[float]] = {arm: [] for arm in trainers}
    try:
        for i in range(blocks):
            for arm in ("baseline", "clip_td") if i % 2 else ("clip_td", "baseline"):
                t = time.perf_counter()
                for _ in range(block):
                    trainers[arm].train_step(*pending[arm].next())
                if i:
                    per_step[arm].append((time.perf_counter() - t) / block)
        syncs = {arm: cuda_syncs_per_step(tr, pending[arm]) for arm, tr in trainers.items()}
    finally:
        for p in pending.values():
            p.close()
    pairs = [c / b for c, b in zip(per_step["clip_td"], per_step["baseline"], strict=True)]
    out = {
        "task": task,
        "torch_threads": torch.get_num_threads(),
        "block_steps": block,
        "blocks_timed": blocks - 1,
        "loop_step_seconds_median": {a: round(median(v), 5) for a, v in per_step.items()},
        "loop_cached_over_baseline": round(median(pairs), 4),
        # Every back-to-back block pair, so the README can show the spread around the median.
        "loop_pair_ratios": [round(r, 4) for r in pairs],
        "loop_pair_quartiles": [round(q, 4) for q in quartiles(pairs)],
        # On a CUDA device: the host waits torch's sync debug mode reports in one step (None elsewhere).
        "cuda_syncs_per_step": syncs,
    }
    log(
        f"{task} training loop ({out['torch_threads']} threads, targets prefetched): step "
        + " / ".join(f"{a} {median(v) * 1e3:.0f}" for a, v in per_step.items())
        + f" ms: cached÷baseline {out['loop_cached_over_baseline']}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, overrides=True)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, of {TASKS}")
    p.add_argument(
        "--single-thread",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also measure with torch on 1 thread (the load-insensitive compute ratio; the same as the main "
        "arms unless --set train.threads=N>1, since the shipped train.threads is 1)",
    )
    p.add_argument("--steps", type=int, default=60, help=f"timed steps per arm (after {WARMUP} warm-up)")
    p.add_argument(
        "--loop-steps",
        type=int,
        default=300,
        help="timed steps per arm of the training-loop measurement (blocks of 10; its pair ratios spread "
        "widely on a shared 2-core machine, so it takes more steps than the per-step arms)",
    )
    args = p.parse_args(argv)
    steps = max(3, args.steps // 3) if args.quick else args.steps
    loop_steps = max(20, args.loop_steps // 10) if args.quick else args.loop_steps
    res = Result("train")
    with Scratch(args.work) as work:
        world = build(work, args.quick, overrides=tuple(args.set))
        params = world.params()
        res.settings = {
            "overrides": args.set,
            "tasks": args.tasks,
            "steps": steps,
            "loop_steps": loop_steps,
            "warmup": WARMUP,
            "condition": "full",
            "student": vars(params.student),
            "batch_size": params.train.batch_size,
            "teacher": Path(world.teacher_model).stem,
            "teacher_weights": "trained" if world.trained_teacher else "random init",
            "torch_threads": torch.get_num_threads(),
            "quick": args.quick,
        }
        default_threads = torch.get_num_threads()
        for task in args.tasks.split(","):
            res.measurements[task] = m = measure_task(world, task, steps, work)
            res.measurements[f"{task}@loop"] = loop = measure_loop(world, task, loop_steps, work)
            q1, _, q3 = loop["loop_pair_quartiles"]
            res.target(
                f"{task}: cached clip_td step / baseline step, training loop (targets prefetched)",
                loop["loop_cached_over_baseline"],
                "<=",
                1.10,
                f"median of {loop['blocks_timed']} block pairs, quartiles {q1} - {q3}",
            )
            res.target(
                f"{task}: cached clip_td step / baseline step, step alone (reads not overlapped)",
                m["cached_over_baseline"],
                "<=",
                1.10,
            )
            res.target(f"{task}: online-teacher step / cached step", m["online_over_cached"], ">=", 2.0)
            if args.single_thread and default_threads > 1:
                # One thread: no OpenMP barrier waits, which on a machine shared with other work inflate
                # the many small ops of a KD step far more than a baseline step's; the compute ratio.
                m1 = measure_task(world, task, steps, work, threads=1, online=False)
                torch.set_num_threads(default_threads)
                res.measurements[f"{task}@1thread"] = m1
                res.target(
                    f"{task}: cached clip_td step / baseline step, 1 thread",
                    m1["cached_over_baseline"],
                    "<=",
                    1.10,
                )
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
