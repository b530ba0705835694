"""Writing a unit's shards on writer threads, with the crc32 of each array over the unit's rows."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import cache as C
from ..cache.direct import DirectArray, array_folder, direct_array, shard_files
from ..config import usable_cores
from ..durable import sync_files
from .errors import UnitWriteError, maybe_fail
from .plan import UnitJob


def write_threads(setting: int = -1) -> int:
    """Writer threads per image unit for ``cache.write_threads`` (-1: automatic). Shard compression (Blosc
    releases the GIL) must keep up with a GPU teacher's forward, but on a small CPU machine the teacher and
    the decode already fill the cores."""
    if setting > 0:
        return setting
    cores = usable_cores()
    return max(1, min(4, cores // 4))


def block_crcs(a: np.ndarray, rows: int) -> tuple[int, list[str]]:
    """(crc32 of ``a``, [crc32 of each ``rows``-row block, hex]): the blocks' crcs are chained into the whole
    one, so the rows are hashed once. ``a`` starts on a block boundary (a unit writes whole shards)."""
    if len(a) <= rows:
        crc = C.crc32(a)
        return crc, [f"{crc:08x}"]
    crc, out = 0, []
    for lo in range(0, len(a), rows):
        part = a[lo : lo + rows]
        c = C.crc32(part)
        crc = c if lo == 0 else C.crc32_combine(crc, c, int(part.nbytes))
        out.append(f"{c:08x}")
    return crc, out


def chain_crcs(crcs: list[int], a: np.ndarray, rows: int) -> tuple[int, list[str]]:
    """``block_crcs`` from the crc32 of each ``rows``-row block of ``a``, already computed."""
    row_bytes = a.nbytes // max(1, len(a))
    crc = crcs[0]
    for b in range(1, len(crcs)):
        crc = C.crc32_combine(crc, crcs[b], (min(len(a), (b + 1) * rows) - b * rows) * row_bytes)
    return crc, [f"{c:08x}" for c in crcs]


class UnitWriter:
    """Writes one unit's arrays, a block of whole shards per task, on writer threads, and returns each array's
    manifest record (region, crc32 over its rows in row order, bytes) once every block is written. Blocks
    of one unit never share a shard, so the writer threads never write the same shard file."""

    def __init__(self, job: UnitJob, keys: Sequence[str], threads: int = 1):
        self.job = job
        g = C.open_group(job.store_url, mode="r+")
        self.arrays = {}
        self.direct: dict[str, Any] = {}
        for key in keys:
            arr = g[key]
            if job.kind == "image":
                # Image rows are dense, so skip zarr's empty-chunk test: it compares every chunk with the fill
                # value through a void view, which cost more than the compression at ViT-B-16 sizes. Text units
                # keep it, so their all-slack inner chunks stay out of the shard (see pipeline.cache).
                arr = arr.with_config({"write_empty_chunks": True})
                # Whole shards written past zarr where the layout is one pipeline.cache.direct writes (the
                # same bytes, every chunk stored): zarr's per-chunk machinery cost more than the writing
                # itself (docs/scale.md).
                d = direct_array(arr)
                if isinstance(d, DirectArray) and d.writable:
                    self.direct[key] = d
            self.arrays[key] = arr
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="clip-td-write")
        self.tasks: list[Future] = []
        self.parts: dict[str, list[tuple[int, int, int, int, list[str]]]] = {k: [] for k in keys}
        # One crc per inner chunk's rows as well: a training read checks the chunks it decodes, not the unit.
        self.block_rows = {k: max(1, int(a.chunks[0])) if a.ndim else 1 for k, a in self.arrays.items()}
        self.lock = threading.Lock()
        self.first = True

    def submit(self, fn: Callable, *args: Any) -> None:
        self.tasks.append(self.pool.submit(fn, *args))

    def write(self, key: str, start: int, a: np.ndarray) -> None:
        """Rows [start, start + len(a)) of ``key`` (whole shards); called on a writer thread."""
        try:
            d = self.direct.get(key)
            chunk_crcs = d.write_rows(start, a) if d is not None else None
            if chunk_crcs is None:
                self.arrays[key][start : start + len(a)] = a
            # On disk before the unit's manifest entry says so: a unit committed over shards a crash lost
            # would never be recomputed (only a checked read would notice).
            arr = self.arrays[key]
            sync_files(shard_files(arr, start, start + len(a)), up_to=array_folder(arr))
        except Exception as e:  # noqa: BLE001 - any storage failure is reported with the unit and array
            raise UnitWriteError(
                self.job.store_url, self.job.name, key, (start, start + len(a)), f"{type(e).__name__}: {e}"
            ) from e
        rows = self.block_rows[key]
        if chunk_crcs is not None and d.chunk_rows == rows:
            crc, blocks = chain_crcs(chunk_crcs, a, rows)  # hashed by the direct writer, chunk by chunk
        else:
            crc, blocks = block_crcs(a, rows)
        with self.lock:
            self.parts[key].append((start, start + len(a), crc, int(a.nbytes), blocks))
            first, self.first = self.first, False
        if first:
            maybe_fail(self.job.name)

    def raise_failed(self) -> None:
        for t in self.tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()

    def finish(self) -> tuple[dict[str, dict], list]:
        """Wait for every block; (records by array, the blocks' return values in submission order). The first
        failed block (in submission order) raises."""
        results = [t.result() for t in self.tasks]
        records = {}
        for key, parts in self.parts.items():
            parts.sort()
            crc, nbytes = (parts[0][2], parts[0][3]) if parts else (0, 0)
            for (_, stop, *_), (start, _, c, b, _) in itertools.pairwise(parts):
                if start != stop:  # a bug, never data: the unit must not commit with rows unwritten
                    raise RuntimeError(f"unit {self.job.name}: {key} has unwritten rows [{stop}, {start})")
                crc, nbytes = C.crc32_combine(crc, c, b), nbytes + b
            region = [parts[0][0], parts[-1][1]] if parts else [0, 0]
            records[key] = {
                "region": region,
                "crc32": f"{crc:08x}",
                "bytes": nbytes,
                "block_rows": self.block_rows[key],
                "block_crc32": [h for p in parts for h in p[4]],
            }
        return records, results

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
