"""Computing a unit: the teacher over its images or texts, screened, written shard by shard, committed.

An image unit is a short pipeline of small steps: ``decode.unit_batches`` yields collated uint8 batches in
row order; ``ImageUnit.take`` checks each one (order, undecodable images); ``ImageUnit.forward`` runs the
teacher and fills the unit's buffers in the store encoding (``UnitBuffers``); every whole shard the teacher
has finished goes to a ``UnitWriter`` thread, which screens and writes it while the next batches run.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import numpy as np
import torch

from .. import cache as C
from .decode import UnitImages, pil_steps, unit_batches
from .errors import ImageError
from .plan import UnitJob
from .screen import screen_image_rows, screen_texts
from .teachers import get_teacher
from .writer import UnitWriter, write_threads

log = logging.getLogger("clip_td.extract")

# Names of units computed by this process, in order: lets tests count what a rerun recomputed.
UNIT_RUNS: list[str] = []


def _token_buffers(shape: tuple, dtype: str) -> dict[str, np.ndarray]:
    """Zeroed arrays of ``C.encode_tokens``'s output for float32 tokens of ``shape``."""
    if dtype == "int8":
        return {"": np.zeros(shape, np.int8), C.SCALE_SUFFIX: np.zeros(shape[:-1], np.float16)}
    return {"": np.zeros(shape, np.float16)}


def _encode_batch(x: torch.Tensor, dtype: str) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Float32 tokens [..., E] (on any device) -> (``C.encode_tokens(x)``, the decoded float32 tokens). float16
    is converted by torch on the teacher's device (round-to-nearest-even, the same bits as numpy's astype), so
    a GPU ships half the bytes; int8 goes through ``C.quantize_int8`` itself."""
    if dtype == "int8":
        enc = C.encode_tokens(x.cpu().numpy(), dtype)
        return enc, torch.from_numpy(C.decode_tokens(enc[""], enc[C.SCALE_SUFFIX]))
    y = x.half()
    return {"": y.cpu().numpy()}, y.float()


def _token_cosine(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``C.reconstruction_cosine`` in torch on the batch (multi-threaded, on the teacher's device): per-token
    cosine of the teacher output and what the store gives back, all-zero tokens left out."""
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1]).to(x.device)
    nx, ny = torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1)
    ok = (nx > 0) & (ny > 0)
    return ((x * y).sum(1)[ok] / (nx * ny)[ok]).cpu().numpy()


class UnitBuffers:
    """One image unit's outputs in the store encoding, every view of every row, filled batch by batch (never
    a float32 copy of the unit). ``arrays`` maps each array the schema says an image unit writes to its rows
    here; view 0 of every encoded buffer is the image/ array (per-token encodings: slicing equals
    re-encoding)."""

    def __init__(self, job: UnitJob, num_patches: int, embed_dim: int):
        n, k = len(job.items), max(1, job.views)
        self.shape = (n, k, num_patches, embed_dim)
        self.sources = C.token_sources(job.relevance)
        self.tokens = {s: _token_buffers(self.shape, job.dtype) for s in self.sources}
        self.pooled = np.zeros((n, k, embed_dim), np.float16)
        self.boxes = np.zeros((n, k, 4), np.float32)
        self.flips = np.zeros((n, k), np.uint8)
        self.valid = np.ones(n, np.uint8)
        per_view = {"pooled": self.pooled, "boxes": self.boxes, "flip": self.flips}
        self.arrays: dict[str, np.ndarray] = {}
        for key in C.unit_arrays("image", job.dtype, job.views, job.relevance):
            group, leaf = key.split("/", 1)
            if leaf == "valid":
                self.arrays[key] = self.valid
                continue
            src = leaf.removesuffix(C.SCALE_SUFFIX)
            a = self.tokens[src][leaf[len(src) :]] if src in self.tokens else per_view[leaf]
            self.arrays[key] = a[:, 0] if group == "image" else a

    def fill(
        self, idx: np.ndarray, encoded: dict[str, dict[str, np.ndarray]], pooled: np.ndarray, bx, fl
    ) -> None:
        """Rows ``idx``: each source's encoded tokens [B·K, P, E], pooled [B·K, E], boxes and flips."""
        b, k = len(idx), self.shape[1]
        for s, enc in encoded.items():
            for suffix, a in enc.items():
                self.tokens[s][suffix][idx] = a.reshape(b, k, *a.shape[1:])
        self.pooled[idx] = pooled.reshape(b, k, -1)
        self.boxes[idx], self.flips[idx] = bx, fl


class ImageUnit:
    """Runs the teacher over one image unit's images and writes its shards. Each whole shard is screened and
    written on a writer thread as soon as the teacher has filled its rows, so in a unit of many shards only
    the last batch's shards are written after the last forward."""

    def __init__(self, job: UnitJob, teacher: Any):
        self.job, self.teacher = job, teacher
        self.buf = UnitBuffers(job, teacher.num_patches, teacher.embed_dim)
        self.n = len(job.items)
        self.shard = job.shard_rows or self.n
        self.done = 0  # rows [0, done) are computed
        self.handed = 0  # rows [0, handed) are handed to the writer
        self.bad: list[tuple[str, int]] = []  # (image id, row) of undecodable images
        self.cos: dict[str, list[np.ndarray]] = {s: [] for s in self.buf.sources}

    def run(self) -> tuple[dict, dict]:
        """(the arrays' manifest records, info: invalid image ids, reconstruction cosines, nonfinite ids)."""
        job, teacher, k = self.job, self.teacher, max(1, self.job.views)
        steps = pil_steps(teacher.preprocess)
        data = UnitImages(
            job.dataset_paths, job.items, steps, teacher.image_size, job.views, teacher.resize_mode
        )
        # A batch of images × views stays ≈ batch_size forward passes.
        batches = unit_batches(
            data, max(1, job.batch_size // k), job.num_workers, steps, teacher.device.type == "cuda"
        )
        self.writer = UnitWriter(job, list(self.buf.arrays), write_threads(job.write_threads))
        try:
            for batch in batches:
                self.forward(*self.take(*batch))
                self.hand_over(self.done)
            self.hand_over(self.n)
            records, results = self.writer.finish()
        finally:
            self.writer.close()  # on an error: no shard write outlives the unit
            batches.close()  # stops the decode workers now, also when a batch raised
            data.close()  # the in-process reads (first batch, num_workers=0) left tar handles open here
        return records, self.info(sorted({i for ids in results for i in ids}))

    def take(self, idx: np.ndarray, u8: torch.Tensor, bx, fl, ok: list, why: list) -> tuple:
        """A decoded batch, checked: rows in order; an undecodable image fails the unit (on_error=fail) or is
        kept as an invalid, zero-filled row."""
        job = self.job
        if len(idx) and (int(idx[0]) != self.done or int(idx[-1]) != self.done + len(idx) - 1):
            raise RuntimeError(
                f"unit {job.name}: batch rows {idx[0]}.. arrived out of order (expected {self.done})"
            )
        for j, good in enumerate(ok):
            if not good:
                di, image_id, _ = job.items[int(idx[j])]
                err = ImageError(job.dataset_paths[di], image_id, why[j])
                if job.on_error == "fail":
                    raise err
                log.warning("%s (zero-filled, image/valid = 0)", err)
                self.bad.append((image_id, int(idx[j])))
                self.buf.valid[int(idx[j])] = 0
        return idx, u8, bx, fl, ok

    def forward(self, idx: np.ndarray, u8: torch.Tensor, bx, fl, ok: list) -> None:
        """The teacher on one batch of every view; its outputs encoded into the unit's buffers."""
        teacher, (_, k, p, e) = self.teacher, self.buf.shape
        b = len(idx)
        pixels = teacher.normalize_uint8(u8.view(b * k, *u8.shape[2:]).to(teacher.device, non_blocking=True))
        out = teacher.encode_images(pixels, relevance=self.job.relevance)
        keep = None  # rows of undecodable images stay zero
        if not all(ok):
            keep = torch.tensor(ok, dtype=torch.float32, device=pixels.device).repeat_interleave(k)
        encoded = {}
        for s in self.buf.sources:
            x = out["tokens" if s == "tokens" else s[: -len("_tokens")]]
            x = x if keep is None else x * keep[:, None, None]
            encoded[s], dec = _encode_batch(x, self.job.dtype)
            self.cos[s].append(_token_cosine(x.reshape(b, k, p, e)[:, 0], dec.reshape(b, k, p, e)[:, 0]))
        pooled = out["pooled"] if keep is None else out["pooled"] * keep[:, None]
        self.buf.fill(idx, encoded, pooled.half().cpu().numpy(), bx, fl)
        self.done += b

    def hand_over(self, upto: int) -> None:
        """Hand every whole shard within rows [0, upto) not yet handed to the writer."""
        self.writer.raise_failed()  # a failed shard stops the unit now, not after its last forward
        while self.handed < self.n and min(self.n, self.handed + self.shard) <= upto:
            hi = min(self.n, self.handed + self.shard)
            self.writer.submit(self.write_block, self.handed, hi)
            self.handed = hi

    def write_block(self, lo: int, hi: int) -> list[str]:
        """On a writer thread: screen rows [lo, hi), write them; the ids screening marked invalid."""
        arrays = self.buf.arrays
        ids = screen_image_rows(self.job, arrays, lo, hi)
        for key in sorted(arrays):
            self.writer.write(key, self.job.row0 + lo, arrays[key][lo:hi])
        return ids

    def info(self, nonfinite: list[str]) -> dict:
        cos_all = np.concatenate(
            [c for s in self.buf.sources for c in self.cos[s]] or [np.zeros(0, np.float32)]
        )
        info = {"invalid": sorted({image_id for image_id, _ in self.bad} | set(nonfinite)), "cos": cos_all}
        if nonfinite:
            info["nonfinite"] = nonfinite
            info["cos"] = cos_all[np.isfinite(cos_all)]
        return info


def _text_unit(job: UnitJob, teacher: Any) -> tuple[dict, dict]:
    n, e = len(job.texts), teacher.embed_dim
    want = np.asarray(job.lengths, dtype=np.int64)
    local = np.cumsum(want) - want  # each text's first row inside this unit's shard
    buf = np.zeros((job.tok_rows, e), np.float32)  # slack rows at the end stay zero = fill value, not stored
    pooled = np.zeros((n, e), np.float32)
    bs = max(1, job.batch_size)
    for lo in range(0, n, bs):
        ids = teacher.tokenizer(list(job.texts[lo : lo + bs]))
        out = teacher.encode_texts(ids)
        got = out["lengths"].cpu().numpy()
        if not np.array_equal(got, want[lo : lo + bs]):
            raise RuntimeError(f"unit {job.name}: token lengths differ from the plan (tokenizer changed?)")
        toks = out["tokens"].cpu().numpy()
        for j, L in enumerate(got):
            buf[local[lo + j] : local[lo + j] + L] = toks[j, :L]
        pooled[lo : lo + len(got)] = out["pooled"].cpu().numpy()
    enc = C.encode_tokens(buf, job.dtype)
    real = np.concatenate([np.arange(s, s + L) for s, L in zip(local, want, strict=True)]) if n else []
    cos = C.reconstruction_cosine(buf[real], {k_: a[real] for k_, a in enc.items()})
    arrays = {f"text/tokens{suffix}": (job.tok0, a) for suffix, a in enc.items()}
    arrays["text/pooled"] = (job.row0, pooled.astype(np.float16))
    return arrays, {"invalid": [], "cos": cos}


def _write_text_unit(job: UnitJob, arrays: dict) -> dict[str, dict]:
    """A text unit's arrays (one shard each) through a ``UnitWriter``; their manifest records."""
    writer = UnitWriter(job, sorted(arrays))
    try:

        def write_all() -> None:
            for key in sorted(arrays):
                writer.write(key, *arrays[key])

        writer.submit(write_all)
        return writer.finish()[0]
    finally:
        writer.close()


def _check_compute_dtype(job: UnitJob, teacher: Any) -> None:
    """The store's fingerprint records the precision the coordinator's teacher computes in; a worker resolves
    device/precision "auto" on its own machine (a GPU worker: bf16 under a CPU coordinator's float32), which
    would label a bf16 store float32, or mix the two in one store on a resume elsewhere."""
    from pipeline.teacher import autocast_dtype

    fp = (C.read_store_attrs(job.store_url) or {}).get("fingerprint") or {}
    want = (fp.get("teacher") or {}).get("compute_dtype")
    have = str(autocast_dtype(teacher.device, teacher.precision) or torch.float32)
    if want and want != have:
        raise RuntimeError(
            f"unit {job.name} of {job.store_url}: this worker ({socket.gethostname()}, {teacher.device}) "
            f"computes in {have}, the store records {want}: give extract_teacher --device and "
            "teacher.precision explicitly, so that the coordinator and every worker resolve them alike"
        )


def run_unit(job: UnitJob) -> dict:
    """Compute one unit, write its shards, commit its manifest entry; returns the manifest record."""
    t0 = time.time()
    log.debug("unit %s: start (pid %d)", job.name, os.getpid())  # names the unit in flight if the run dies
    try:
        teacher = get_teacher(job.teacher, job.threads)
        _check_compute_dtype(job, teacher)
        if job.kind == "image":
            record_arrays, info = ImageUnit(job, teacher).run()
        else:
            arrays, info = _text_unit(job, teacher)
            screen_texts(job, arrays)
            record_arrays = _write_text_unit(job, arrays)
    except Exception as e:
        # A fault the unit's own checks do not name (a decode worker killed, CUDA out of memory) otherwise
        # reaches the user, through dask too, without saying which unit and rows it stopped.
        e.add_note(f"in unit {job.name} ({job.kind} rows {job.row0}-{job.row1}) of {job.store_url}")
        raise
    cos = info["cos"]
    record = {
        "unit": job.name,
        "kind": job.kind,
        "rows": [job.row0, job.row1],
        "items": job.row1 - job.row0,
        "arrays": record_arrays,
        "invalid": info["invalid"],
        "nonfinite": info.get("nonfinite", []),
        "reconstruction_cosine": {
            "mean": float(cos.mean()) if len(cos) else 1.0,
            "min": float(cos.min()) if len(cos) else 1.0,
            "n": int(len(cos)),
        },
        "seconds": round(time.time() - t0, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if job.kind == "text":
        record["token_rows"] = [job.tok0, job.tok0 + job.tok_rows]
    C.commit_unit(job.store_url, job.name, record)
    UNIT_RUNS.append(job.name)
    return record
