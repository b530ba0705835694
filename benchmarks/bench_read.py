"""Cache reads during training: read rate ÷ student consumption rate, and read amplification.

Training-shaped batches (``Trainer.batches()`` of a cached ``clip_td`` run with params.yaml's defaults, as many
as one run takes: ``train.steps``) are read in training order exactly as ``teacher_batch`` reads them
(``student.targets.read_targets``): the batch's images, its distill texts (tokens and pooled) and, for the
§5 weights, every candidate text (pooled only).

* rate: targets (images + texts) per second read, over the whole stream from a cold reader, ÷ targets per
  second a cached ``clip_td`` student step consumes (median step time, steps on the same batches).
* amplification: bytes the zarr store handed out (every ``LocalStore`` read is counted: shard indexes, inner
  chunks, metadata) ÷ bytes needed, i.e. the on-disk (compressed) bytes of the distinct rows each batch asks
  for, summed over batches. Measured with the reader's chunk LRU at its default size (``train.target_cache_mb``),
  at a quarter of the store (so the figure does not come from holding the whole store), and off (one decode
  per batch), in the default random order; and with ``train.order=chunked`` (instances grouped by the inner
  chunk of their image, shuffled within windows of ``train.order_window`` = 1 chunk) at a quarter of the
  store. Bytes read are also split by array (``bytes_read_by_array``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Result, Scratch, log, median, parser
from benchmarks.world import build

TASKS = ("vqa", "snli_ve", "vcr")


class ByteCounter:
    """Counts the bytes read from the store's files: zarr's LocalStore (its module-level ``_get`` does every
    read) and pipeline/cache/direct.py, which reads shards itself (its ``_read`` / ``_read_into``)."""

    def __init__(self):
        import zarr.storage._local as local

        import pipeline.cache.direct as direct

        self._patched = [(local, "_get"), (direct, "_read"), (direct, "_read_into")]
        self._orig = {(m, n): getattr(m, n) for m, n in self._patched}
        self.bytes = self.calls = 0
        self.by_array: dict[str, int] = {}

    def _count(self, path: Any, n: int) -> None:
        self.calls += 1
        self.bytes += n
        # <store>/<group>/<array>/c/<i>/<j>... or <store>/<group>/<array>/zarr.json
        where = str(path).split("/c/")[0] if "/c/" in str(path) else str(Path(path).parent)
        key = "/".join(Path(where).parts[-2:])
        self.by_array[key] = self.by_array.get(key, 0) + n

    def __enter__(self) -> ByteCounter:
        get, read, read_into = (self._orig[p] for p in self._patched)

        def counting_get(path, prototype, byte_range):
            buf = get(path, prototype, byte_range)
            self._count(path, len(buf) if buf is not None else 0)
            return buf

        def counting_read(f, n, offset):
            out = read(f, n, offset)
            self._count(f.name, len(out))
            return out

        def counting_read_into(f, buf, offset):
            n = read_into(f, buf, offset)
            self._count(f.name, n)
            return n

        for (m, name), fn in zip(
            self._patched, (counting_get, counting_read, counting_read_into), strict=True
        ):
            setattr(m, name, fn)
        return self

    def __exit__(self, *exc) -> None:
        for (m, name), fn in self._orig.items():
            setattr(m, name, fn)


def disk_bytes_per_row(store: str, cache) -> dict[str, float]:
    """On-disk bytes per stored row of every array a training batch reads (text/tokens: per real token row,
    its shard's unused slack rows are not stored)."""
    real_rows = {"text/tokens": int(cache._lengths.sum())}
    res = {}
    for name in ("image/tokens", "image/tokens_scale", "image/pooled", "image/valid", "text/tokens",
                 "text/tokens_scale", "text/pooled"):  # fmt: skip
        folder = Path(store) / name
        if not folder.exists():
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")
        rows = real_rows.get(name.removesuffix("_scale"), cache.group[name].shape[0])
        res[name] = size / max(1, rows)
    return res


def needed_bytes(batch, cache, per_row: dict[str, float], weighted: bool) -> float:
    """Compressed bytes of the distinct rows a batch asks for: every image array's rows, the distill texts'
    token and pooled rows, and the candidate texts' pooled rows when §5 weights are on."""
    rows = np.unique(cache.image_rows(batch.image_ids))
    drows = np.unique(cache.text_rows([t.distill for t in batch.teacher_texts]))
    cands = (
        [c for t in batch.teacher_texts for c in t.candidates + t.rationale_candidates] if weighted else []
    )
    prows = np.union1d(drows, cache.text_rows(cands))
    tok_rows = int(cache._lengths[drows].sum())
    total = 0.0
    for name, bpr in per_row.items():
        if name.startswith("image/"):
            total += len(rows) * bpr
        elif name.startswith("text/tokens"):
            total += tok_rows * bpr
        else:
            total += len(prows) * bpr
    return total


def read_batch(source, batch, cfg) -> int:
    """What teacher_batch reads (``student.targets.read_targets``); returns the number of targets (images
    + texts)."""
    from student.targets import read_targets

    _, txt, cand = read_targets(batch, source, cfg)
    return len(batch.image_ids) + len(txt["pooled"]) + (len(cand["pooled"]) if cand is not None else 0)


def measure_task(world, task: str, n_batches: int, steps: int, work: Path) -> dict:
    from pipeline.cache import TeacherCache
    from student.targets import CachedTargets
    from student.train import RunSpec, Trainer

    run = RunSpec(task, "full", "clip_td", 0, str(world.root), world.store(), str(work / f"read-{task}"))
    tr = Trainer(world.params(), run, progress=False)
    stream = tr.batches()
    batches = [next(stream) for _ in range(n_batches)]
    # Window 1: the quarter-store LRU here holds about 8 decoded 1 MB image chunks, so the default window of 8
    # would not fit beside the text chunks; a store of gigabytes under the 256 MB default fits it many times.
    chunked = Trainer(
        world.params("train.order=chunked", "train.order_window=1"), run, progress=False
    ).batches()
    orders = {"random": batches, "chunked": [next(chunked) for _ in range(n_batches)]}
    store_bytes = sum(f.stat().st_size for f in Path(world.store()).rglob("*") if f.is_file())
    small = max(1 << 20, store_bytes // 4)
    default = world.params().train.target_cache_mb << 20
    out: dict = {"task": task, "batches": n_batches, "store_bytes": store_bytes}
    arms = (
        ("default", "random", default),
        ("quarter_store", "random", small),
        ("off", "random", 0),
        ("chunked_quarter_store", "chunked", small),
    )
    for label, order, budget in arms:
        batches = orders[order]
        cache = TeacherCache(world.store())
        source = CachedTargets(cache, chunk_cache_bytes=budget)
        per_row = disk_bytes_per_row(world.store(), cache)
        needs = [needed_bytes(b, cache, per_row, tr.cfg.weight) for b in batches]
        need = sum(needs)
        half = n_batches // 2
        targets = 0
        with ByteCounter() as counter:
            t = time.perf_counter()
            for i, b in enumerate(batches):
                if i == half:
                    read_first_half = counter.bytes
                targets += read_batch(source, b, tr.cfg)
            seconds = time.perf_counter() - t
        lru = getattr(cache.group, "lru", None)
        out[label] = {
            "order": order,
            "chunk_cache_bytes": lru.max_bytes if lru is not None else 0,
            "bytes_read": counter.bytes,
            "store_reads": counter.calls,
            "bytes_needed": round(need),
            "amplification": round(counter.bytes / need, 4),
            "bytes_read_by_array": dict(sorted(counter.by_array.items(), key=lambda kv: -kv[1])),
            # From a cold reader the first batches pay for whole chunks; the second half shows the steady state.
            "amplification_second_half": round((counter.bytes - read_first_half) / sum(needs[half:]), 4),
            "read_seconds_per_batch": round(seconds / n_batches, 5),
            "targets_per_batch": targets / n_batches,
            "read_targets_per_s": round(targets / seconds, 1),
            "chunk_hits": lru.hits if lru is not None else 0,
            "chunk_misses": lru.misses if lru is not None else 0,
        }
    # Consumption: cached clip_td steps on the same batches (the Trainer above reads with the default LRU).
    batches = orders["random"]
    step_s = []
    for i, b in enumerate(batches[: steps + 1]):  # one warm-up step
        t = time.perf_counter()
        tr.train_step(b, None)
        if i >= 1:
            step_s.append(time.perf_counter() - t)
    step = median(step_s)
    per_batch = out["default"]["targets_per_batch"]
    out["step_seconds_median"] = round(step, 5)
    out["consume_targets_per_s"] = round(per_batch / step, 1)
    for label, *_ in arms:
        out[label]["read_over_consume"] = round(
            out[label]["read_targets_per_s"] / out["consume_targets_per_s"], 2
        )
    d = out["default"]
    log(
        f"{task}: read {d['read_targets_per_s']:.0f} targets/s vs consumed {out['consume_targets_per_s']:.0f}/s "
        f"(x{d['read_over_consume']}); amplification {d['amplification']} (LRU {d['chunk_cache_bytes'] >> 20} MB), "
        f"{out['quarter_store']['amplification']} (LRU {out['quarter_store']['chunk_cache_bytes'] >> 20} MB), "
        f"{out['off']['amplification']} (no LRU); chunked order {out['chunked_quarter_store']['amplification']} "
        f"(LRU {out['quarter_store']['chunk_cache_bytes'] >> 20} MB)"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, overrides=True)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument(
        "--batches",
        type=int,
        default=0,
        help="batches read in streaming order per task (default: train.steps, i.e. one default training run)",
    )
    p.add_argument("--steps", type=int, default=3, help="student steps timed for the consumption rate")
    args = p.parse_args(argv)
    res = Result("read")
    with Scratch(args.work) as work:
        world = build(work, args.quick, overrides=tuple(args.set))
        # A fixed number of batches would cover less of the store for a task with small batches (VCR: 4
        # instances), so from a cold reader every chunk would be read for a fraction of its rows: the default
        # is what a training run reads.
        n = args.batches or world.params().train.steps
        n = max(10, n // 4) if args.quick else n
        res.settings = {
            "overrides": args.set,
            "tasks": args.tasks,
            "batches": n,
            "steps": args.steps,
            "condition": "full",
        }
        for task in args.tasks.split(","):
            res.measurements[task] = m = measure_task(world, task, n, args.steps, work)
            res.target(f"{task}: read rate / consumption rate", m["default"]["read_over_consume"], ">=", 10)
            res.target(
                f"{task}: read amplification (training order, default LRU)",
                m["default"]["amplification"],
                "<=",
                2,
            )
            res.target(
                f"{task}: read amplification (train.order=chunked, LRU a quarter of the store)",
                m["chunked_quarter_store"]["amplification"],
                "<=",
                2,
            )
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
