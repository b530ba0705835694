"""Run the frozen teacher once over every unique image and text of the prepared datasets into the cache.

The coordinator (``extract``) plans the work: unique images (deduplicated by SHA-1 across datasets, first
seen first, i.e. data-shard order), unique texts (every text ``pipeline.texts.instance_texts`` gives for any
instance, deduplicated by ``text_hash``), their token lengths, and the store layout. It creates the store
(or reopens a matching one), then hands out *work units* as dask tasks. A unit owns whole Zarr shards: image
unit u = rows [u·R, (u+1)·R), text unit t = texts [t·R_t, (t+1)·R_t) and one shard of token rows (see
``pipeline.cache``). A unit loads the teacher once per worker process, reads its images through a torch
DataLoader (worker processes decode and resize only; they never touch zarr), runs the teacher batch by
batch, writes each image shard on a writer thread as soon as the teacher has filled its rows (behind the next
batches' forward) and, once every shard is written, commits ``manifest/<unit>.json``. A rerun skips committed
units, so an interrupted extraction resumes where it stopped; a unit that died half-way is recomputed and
overwrites its own shards.

Test hook: the environment variable ``CLIP_TD_EXTRACT_FAIL_UNIT=<unit name>`` makes that unit raise after it
has written its first array and before it commits (a crash in the worst place); ``<unit name>:kill`` makes
the process SIGKILL itself there instead (no ``finally`` runs: the lock is left behind, as after an OOM kill).

One writer per store: ``extract`` holds ``<store>/.lock`` (``pipeline.lock``) for its whole run, so a second
extraction of the same store is refused naming the holder, and a lock left by a killed run is taken over.
Teacher outputs are screened before they are written: a NaN/Inf row fails the unit naming the image (or
text) under ``on_error=fail``, and under ``skip`` an image's rows are zero-filled with ``image/valid = 0``.

Nothing is deleted that extraction did not make: a store location holding anything but a teacher cache (or
inside, equal to or around a dataset) is refused before anything is written. A new store is built in place
(there is nothing to lose, and a killed run resumes there). A store replaced under ``overwrite`` or
``rebuild_stale`` is rebuilt beside it, in ``<store>.tmp-rebuild`` (which a rerun resumes), and swapped into
place only once complete, so a failed rebuild leaves the previous store as it was (on an object store,
which has no directory rename, a replaced store is rebuilt in place). A rerun that computes nothing leaves
the store byte-identical (DVC sees no change).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cache as C
from .data.errors import DataError
from .data.shards import PreparedDataset, decode_image
from .texts import instance_texts, text_hash

log = logging.getLogger("clip_td.extract")

FAIL_ENV = "CLIP_TD_EXTRACT_FAIL_UNIT"
MP_CONTEXT_ENV = "CLIP_TD_DATALOADER_CONTEXT"
# Names of units computed by this process, in order: lets tests count what a rerun recomputed.
UNIT_RUNS: list[str] = []


class ImageError(DataError):
    """An image the teacher cannot read; names the dataset directory and the image id."""

    def __reduce__(self) -> tuple:  # DataError's 3-argument __init__ breaks default exception pickling (dask)
        return (type(self), (self.file, self.where, self.reason))


class TextError(DataError):
    """A teacher text with no content; names the dataset directory and the instance key."""

    def __reduce__(self) -> tuple:
        return (type(self), (self.file, self.where, self.reason))


class InjectedFailure(RuntimeError):
    """Raised by the test hook ``CLIP_TD_EXTRACT_FAIL_UNIT``."""


class UnitWriteError(RuntimeError):
    """Writing a unit's arrays failed (disk full, store went read-only, …); names the unit, the array, the rows
    and the store. The unit is not committed, so a rerun recomputes it."""

    def __init__(self, store: str, unit: str, key: str, rows: tuple[int, int], reason: str):
        self.store, self.unit, self.key, self.rows, self.reason = store, unit, key, tuple(rows), reason
        super().__init__(
            f"unit {unit}: writing {key} rows [{rows[0]}, {rows[1]}) of {store} failed: {reason}; "
            "the unit was not committed (rerun to resume)"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.store, self.unit, self.key, self.rows, self.reason))


class StoreLocationError(ValueError):
    """The store location would overlap a dataset it is extracted from; names both."""


class NonFiniteOutput(FloatingPointError):
    """The teacher returned NaN/Inf; names the unit, the arrays and the images (or texts) at fault."""

    def __init__(self, unit: str, items: list[str], arrays: list[str], kind: str = "image"):
        self.unit, self.items, self.arrays, self.kind = unit, list(items), list(arrays), kind
        shown = ", ".join(repr(i) for i in self.items[:10]) + (" …" if len(self.items) > 10 else "")
        hint = (
            "set cache.on_error=skip to store them as invalid (image/valid = 0)"
            if kind == "image"
            else "texts have no validity flag: fix the teacher precision or the text"
        )
        super().__init__(
            f"unit {unit}: teacher output is not finite (NaN/Inf in {', '.join(self.arrays)}) for "
            f"{len(self.items)} {kind}(s): {shown}; nothing of this unit was written; {hint}"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.unit, self.items, self.arrays, self.kind))


# ----------------------------------------------------------------------------------------------- teacher


@dataclass(frozen=True)
class TeacherSpec:
    model: str
    pretrained: str = ""
    precision: str = "auto"
    device: str = "auto"  # "auto": CUDA when available, else CPU

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


_TEACHERS: dict[TeacherSpec, Any] = {}


def get_teacher(spec: TeacherSpec, threads: int = 0) -> Any:
    """The teacher for a spec, loaded once per process (every unit a worker runs reuses it)."""
    from .teacher import create_teacher

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    t = _TEACHERS.get(spec)
    if t is None:
        if not spec.pretrained:
            # Random init must give the same weights in every worker process as in the coordinator.
            torch.manual_seed(0)
        t = _TEACHERS[spec] = create_teacher(
            spec.model, spec.pretrained, spec.resolved_device(), spec.precision
        )
    return t


def weights_sha256(teacher: Any) -> str:
    h = hashlib.sha256()
    for name, p in sorted(teacher.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """What the teacher must see, in store row order."""

    dataset_paths: list[str]
    images: list[tuple[int, str, str]]  # (dataset index, image id, sha1) per unique image
    alias_ids: list[str]  # ids whose bytes equal an earlier row's (different id, same content)
    alias_rows: list[int]
    texts: list[str]
    text_ids: list[str]
    vqa_vocab: list[str]
    vqa_vocab_from: str
    counts: dict
    data_fingerprint: dict
    skipped_texts: list[dict] = field(default_factory=list)


def _vocab_source(datasets: Sequence[PreparedDataset]) -> PreparedDataset | None:
    with_answers = [d for d in datasets if d.info.get("answer_counts")]
    train = [d for d in with_answers if d.info.get("split") == "train"]
    return (train or with_answers or list(datasets) or [None])[0]


def _dataset_fingerprints(datasets: Sequence[PreparedDataset]) -> dict[str, str]:
    """{dataset directory name: fingerprint}, so a stale check names the dataset that changed (``data.datasets.
    train``); names that repeat (vqa/train, snli_ve/train) get their parent folder in front."""
    names = [Path(ds.path).name for ds in datasets]
    out = {}
    for ds, name in zip(datasets, names, strict=True):
        key = name if names.count(name) == 1 else f"{Path(ds.path).parent.name}/{name}"
        out[key] = ds.fingerprint
    return out


def plan_extraction(
    datasets: Sequence[PreparedDataset], vqa_candidates: int = 4, on_error: str = "fail"
) -> Plan:
    """Unique images and texts over all datasets, with counts and the data fingerprint."""
    images: list[tuple[int, str, str]] = []
    by_id: dict[str, tuple[str, int]] = {}  # image id -> (sha1, row)
    by_sha: dict[str, int] = {}
    alias_ids, alias_rows = [], []
    images_total = id_repeats = 0
    for di, ds in enumerate(datasets):
        for image_id in ds.image_ids():
            images_total += 1
            sha = ds.image_sha1(image_id)
            if image_id in by_id:
                if by_id[image_id][0] != sha:
                    first = datasets[images[by_id[image_id][1]][0]].path
                    raise DataError(ds.path, image_id, f"image id also in {first} with different bytes")
                id_repeats += 1
                continue
            if sha in by_sha:  # same bytes under another id: one row, the id becomes an alias
                by_id[image_id] = (sha, by_sha[sha])
                alias_ids.append(image_id)
                alias_rows.append(by_sha[sha])
                continue
            by_sha[sha] = by_id.setdefault(image_id, (sha, len(images)))[1]
            images.append((di, image_id, sha))

    src = _vocab_source(datasets)
    vocab = src.answer_vocab() if src is not None else []
    texts, text_ids, seen = [], [], set()
    instances = texts_total = 0
    skipped: list[dict] = []
    for ds in datasets:
        for inst in ds.iter_instances():
            instances += 1
            for t in instance_texts(inst, vocab, vqa_candidates).all():
                texts_total += 1
                if not t.strip():
                    err = TextError(ds.path, inst.key, f"empty teacher text for task {inst.task!r}")
                    if on_error == "fail":
                        raise err
                    skipped.append({"file": err.file, "where": err.where, "reason": err.reason})
                    continue
                h = text_hash(t)
                if h not in seen:
                    seen.add(h)
                    texts.append(t)
                    text_ids.append(h)

    digest = hashlib.sha256()
    for ds in datasets:
        digest.update(f"ds\0{ds.fingerprint}\n".encode())
    for _, image_id, sha in images:
        digest.update(f"img\0{image_id}\0{sha}\n".encode())
    for a, r in zip(alias_ids, alias_rows, strict=True):
        digest.update(f"alias\0{a}\0{r}\n".encode())
    for h in text_ids:
        digest.update(f"txt\0{h}\n".encode())
    counts = {
        "datasets": len(datasets),
        "instances": instances,
        "images_total": images_total,
        "unique_images": len(images),
        "image_duplicates_removed": images_total - len(images),
        "image_aliases": len(alias_ids),
        "texts_total": texts_total,
        "unique_texts": len(texts),
        "text_duplicates_removed": texts_total - len(texts) - len(skipped),
        "texts_skipped": len(skipped),
    }
    fingerprint = {
        "hash": digest.hexdigest(),
        "datasets": _dataset_fingerprints(datasets),
        "vqa_candidates": vqa_candidates,
    }
    return Plan(
        dataset_paths=[str(ds.path) for ds in datasets],
        images=images,
        alias_ids=alias_ids,
        alias_rows=alias_rows,
        texts=texts,
        text_ids=text_ids,
        vqa_vocab=vocab,
        vqa_vocab_from=str(src.path) if src is not None else "",
        counts=counts,
        data_fingerprint=fingerprint,
        skipped_texts=skipped,
    )


# --------------------------------------------------------------------------------------------- the units


@dataclass
class UnitJob:
    """Everything one unit needs, shipped to a dask worker (small: ids and texts, never pixels)."""

    name: str
    kind: str  # "image" | "text"
    row0: int
    row1: int
    store_url: str
    teacher: TeacherSpec
    dtype: str
    views: int
    relevance: tuple[str, ...]
    batch_size: int
    num_workers: int
    on_error: str
    threads: int = 0
    dataset_paths: tuple[str, ...] = ()
    items: tuple[tuple[int, str, str], ...] = ()  # image units: (dataset index, image id, sha1)
    texts: tuple[str, ...] = ()  # text units
    lengths: tuple[int, ...] = ()
    tok0: int = 0
    tok_rows: int = 0
    shard_rows: int = 0  # image units: rows per image shard (0: the whole unit)
    write_threads: int = -1  # cache.write_threads, resolved where the unit runs


def _pil_steps(preprocess: Any) -> list:
    """The PIL part of open_clip's eval transform (resize, crop, mode), i.e. everything before ToTensor; the
    normalisation runs on the model's device (Teacher.normalize_uint8) so workers ship compact uint8."""
    steps = list(getattr(preprocess, "transforms", []))
    idx = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
    return steps[:idx]


def _to_uint8(img: Any) -> np.ndarray:
    """PIL image -> uint8 [3, H, W] (a transposed view: the caller's assignment is the only copy)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _steps_keep_own_size(pil_steps: Sequence[Any], size: int) -> bool:
    """Whether the eval transform returns an RGB image of its own output size unchanged (open_clip's resize,
    centre crop and mode conversion do), so images stored at the teacher's size skip it: at 64 px the
    transform's Python overhead costs as much as the PNG decode. Probed once with a random image, so a
    transform that does change such an image (any filter or colour step) keeps running on every image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    probe = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    out = probe
    try:
        for t in pil_steps:
            out = t(out)
    except Exception:  # noqa: BLE001 - a transform that cannot take the probe: run the steps on every image
        return False
    return (
        getattr(out, "size", None) == probe.size
        and getattr(out, "mode", None) == "RGB"
        and np.array_equal(np.asarray(out), np.asarray(probe))
    )


class UnitImages(torch.utils.data.Dataset):
    """One unit's images as uint8 views [K, 3, S, S] (view 0 = the eval transform). Runs in DataLoader worker
    processes, so it holds only paths and transforms and opens the datasets lazily in each process; decode
    errors come back as data (``ok`` = False + reason) because a DataLoader re-raises worker exceptions as a
    bare RuntimeError that would lose the image id."""

    def __init__(
        self, dataset_paths: Sequence[str], items: Sequence[tuple], pil_steps: list, size: int, views: int
    ):
        self.dataset_paths, self.items = list(dataset_paths), list(items)
        self.pil_steps, self.size, self.k = pil_steps, size, max(1, views)
        self.steps_keep_own_size = _steps_keep_own_size(pil_steps, size)
        self._open: dict[int, PreparedDataset] = {}

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        """Close the tar handles PreparedDataset keeps open (it has no close of its own)."""
        for ds in self._open.values():
            for f in getattr(ds, "_files", {}).values():
                f.close()
        self._open.clear()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # open file handles stay in the process that opened them

    def __getitem__(self, i: int) -> tuple:
        # numpy per item (small torch tensors cost more to create than the copy itself); collate makes the
        # one tensor per batch that travels through shared memory.
        di, image_id, sha = self.items[i]
        u8 = np.zeros((self.k, 3, self.size, self.size), np.uint8)
        boxes = np.zeros((self.k, 4), np.float32)
        flips = np.zeros(self.k, np.uint8)
        try:
            ds = self._open.get(di) or self._open.setdefault(di, PreparedDataset(self.dataset_paths[di]))
            img = decode_image(ds.image_bytes(image_id))
            eval_img = img
            if not (self.steps_keep_own_size and img.size == (self.size, self.size)):
                for t in self.pil_steps:
                    eval_img = t(eval_img)
            u8[0] = _to_uint8(eval_img)
            boxes[0] = C.eval_view_box(*img.size)
            for v in range(1, self.k):
                rng = np.random.default_rng(C.view_seed(sha, v))
                box = C.sample_view_box(rng, *img.size)
                flip = bool(rng.random() < 0.5)
                u8[v] = _to_uint8(C.apply_view(img, box, flip, self.size))
                boxes[v], flips[v] = box, int(flip)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported with the image id below
            return i, u8, boxes, flips, False, f"cannot decode image: {type(e).__name__}: {e}"
        return i, u8, boxes, flips, True, ""


def collate_images(batch: list[tuple]) -> tuple:
    """(rows int64 [B], uint8 pixels [B, K, 3, S, S] as a tensor, boxes [B, K, 4], flips [B, K], ok, why)."""
    idx, u8, boxes, flips, ok, why = zip(*batch, strict=True)
    return (
        np.asarray(idx, dtype=np.int64),
        torch.from_numpy(np.stack(u8)),
        np.stack(boxes),
        np.stack(flips),
        list(ok),
        list(why),
    )


def _unit_batches(
    data: UnitImages, batch_size: int, num_workers: int, pil_steps: Sequence[Any], pin: bool
) -> Iterator[tuple]:
    """The unit's collated batches in row order. Worker processes decode every batch but the first, which
    is decoded here while they start: otherwise each unit would stall the teacher for a worker's start-up
    plus a batch's decode. A unit of a single batch starts no worker at all."""
    n = len(data)
    head = min(n, batch_size)
    rest = None
    if num_workers > 0 and n > head:
        workers = min(num_workers, -(-(n - head) // batch_size))
        rest = iter(  # started now: the workers start and decode while the first batch is decoded here
            torch.utils.data.DataLoader(
                torch.utils.data.Subset(data, range(head, n)),
                batch_size=batch_size,
                num_workers=workers,
                collate_fn=collate_images,
                multiprocessing_context=_loader_context(workers, pil_steps),
                pin_memory=pin,
            )
        )
    if rest is not None:
        yield collate_images([data[i] for i in range(head)])
        yield from rest
        return

    def decode(lo: int) -> tuple:
        return collate_images([data[i] for i in range(lo, min(n, lo + batch_size))])

    # In-process decode runs one batch ahead on a thread, so it overlaps the teacher's forward instead of
    # alternating with it (PIL decodes and torch computes with the GIL released).
    with ThreadPoolExecutor(1, thread_name_prefix="clip-td-decode") as pool:
        ahead = pool.submit(decode, 0) if n else None
        for lo in range(batch_size, n + batch_size, batch_size):
            batch = ahead.result()
            ahead = pool.submit(decode, lo) if lo < n else None
            yield batch


def _loader_context(num_workers: int, pil_steps: Sequence[Any] = ()) -> Any:
    """Fresh worker processes from a fork server, never plain fork: a forked child inherits zarr's event-loop
    thread (and any lock it held) from a unit that already wrote, and can deadlock."""
    if num_workers <= 0:
        return None
    import multiprocessing as mp

    method = os.environ.get(MP_CONTEXT_ENV, "forkserver")
    ctx = mp.get_context(method)
    if method == "forkserver":
        # Imported once into the fork server (which starts on first use), so each unit's workers fork with
        # torch, PIL and the transforms' modules (open_clip, torchvision) loaded instead of spending seconds
        # importing them while unpickling the dataset.
        mods = {type(t).__module__ for t in pil_steps}
        ctx.set_forkserver_preload(
            [
                "torch",
                "PIL.Image",
                "PIL.PngImagePlugin",
                "PIL.JpegImagePlugin",
                *sorted(mods),
                "pipeline.extract",
            ]
        )
    return ctx


def _maybe_fail(name: str) -> None:
    want = os.environ.get(FAIL_ENV, "")
    if want == f"{name}:kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if want == name:
        raise InjectedFailure(f"injected failure in unit {name} ({FAIL_ENV})")


def _image_unit(job: UnitJob, teacher: Any) -> tuple[dict, dict]:
    """Run the teacher over the unit's images and write its shards; returns (the arrays' manifest records,
    info). Each shard is screened and written on a writer thread as soon as the teacher has filled its rows,
    so in a unit of many shards only the last batch's shards are written after the last forward."""
    n, k = len(job.items), max(1, job.views)
    p, e = teacher.num_patches, teacher.embed_dim
    sources = ["tokens", *(f"{s}_tokens" for s in job.relevance)]
    # The unit's buffers hold the store encoding, filled batch by batch (never a float32 copy of the unit).
    tok = {s: _token_buffers((n, k, p, e), job.dtype) for s in sources}
    pooled = np.zeros((n, k, e), np.float16)
    boxes = np.zeros((n, k, 4), np.float32)
    flips = np.zeros((n, k), np.uint8)
    valid = np.ones(n, np.uint8)

    # View 0 of every encoded array is the image/ array (per-token encodings: slicing equals re-encoding).
    arrays: dict[str, np.ndarray] = {}
    for s in sources:
        for suffix, a in tok[s].items():
            arrays[f"image/{s}{suffix}"] = a[:, 0]
            if job.views > 0:
                arrays[f"views/{s}{suffix}"] = a
    arrays["image/pooled"] = pooled[:, 0]
    arrays["image/valid"] = valid
    if job.views > 0:
        arrays["views/pooled"] = pooled
        arrays["views/boxes"] = boxes
        arrays["views/flip"] = flips

    shard = job.shard_rows or n
    written = 0  # rows [0, written) are handed to the writer

    def write_block(lo: int, hi: int) -> list[str]:  # on a writer thread
        ids = _screen_image_rows(job, arrays, lo, hi)
        for key in sorted(arrays):
            writer.write(key, job.row0 + lo, arrays[key][lo:hi])
        return ids

    def computed(upto: int) -> None:
        nonlocal written
        writer.raise_failed()  # a failed shard stops the unit now, not after its last forward
        while written < n and min(n, written + shard) <= upto:
            hi = min(n, written + shard)
            writer.submit(write_block, written, hi)
            written = hi

    steps = _pil_steps(teacher.preprocess)
    data = UnitImages(job.dataset_paths, job.items, steps, teacher.image_size, job.views)
    # A batch of images × views stays ≈ batch_size forward passes.
    batches = _unit_batches(
        data, max(1, job.batch_size // k), job.num_workers, steps, teacher.device.type == "cuda"
    )
    writer = UnitWriter(job, list(arrays), write_threads(job.write_threads))
    try:
        bad, cos = _run_image_batches(
            job, teacher, batches, (k, p, e), tok, pooled, boxes, flips, valid, computed
        )
        computed(n)
        records, results = writer.finish()
    finally:
        writer.close()  # on an error: no shard write outlives the unit
        batches.close()  # stops the decode workers now, also when a batch raised
        data.close()  # the in-process reads (first batch, num_workers=0) left tar handles open here
    nonfinite = sorted({i for ids in results for i in ids})
    cos_all = np.concatenate([c for s in sources for c in cos[s]] or [np.zeros(0, np.float32)])
    info = {"invalid": sorted({image_id for image_id, _ in bad} | set(nonfinite)), "cos": cos_all}
    if nonfinite:
        info["nonfinite"] = nonfinite
        info["cos"] = cos_all[np.isfinite(cos_all)]
    return records, info


def write_threads(setting: int = -1) -> int:
    """Writer threads per image unit for ``cache.write_threads`` (-1: automatic). Shard compression (Blosc
    releases the GIL) must keep up with a GPU teacher's forward, but on a small CPU machine the teacher and
    the decode already fill the cores."""
    if setting > 0:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // 4))


class UnitWriter:
    """Writes one unit's arrays, a block of whole shards per task, on writer threads, and returns each array's
    manifest record (region, crc32 over its rows in row order, bytes) once every block is written. Blocks
    of one unit never share a shard, so the writer threads never write the same shard file."""

    def __init__(self, job: UnitJob, keys: Sequence[str], threads: int = 1):
        self.job = job
        g = C.open_group(job.store_url, mode="r+")
        self.arrays = {}
        for key in keys:
            arr = g[key]
            if job.kind == "image":
                # Image rows are dense, so skip zarr's empty-chunk test: it compares every chunk with the fill
                # value through a void view, which cost more than the compression at ViT-B-16 sizes. Text units
                # keep it, so their all-slack inner chunks stay out of the shard (see pipeline.cache).
                arr = arr.with_config({"write_empty_chunks": True})
            self.arrays[key] = arr
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="clip-td-write")
        self.tasks: list[Future] = []
        self.parts: dict[str, list[tuple[int, int, int, int]]] = {k: [] for k in keys}
        self.lock = threading.Lock()
        self.first = True

    def submit(self, fn: Callable, *args: Any) -> None:
        self.tasks.append(self.pool.submit(fn, *args))

    def write(self, key: str, start: int, a: np.ndarray) -> None:
        """Rows [start, start + len(a)) of ``key`` (whole shards); called on a writer thread."""
        try:
            self.arrays[key][start : start + len(a)] = a
        except Exception as e:  # noqa: BLE001 - any storage failure is reported with the unit and array
            raise UnitWriteError(
                self.job.store_url, self.job.name, key, (start, start + len(a)), f"{type(e).__name__}: {e}"
            ) from e
        crc = C.crc32(a)
        with self.lock:
            self.parts[key].append((start, start + len(a), crc, int(a.nbytes)))
            first, self.first = self.first, False
        if first:
            _maybe_fail(self.job.name)

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
            for (_, stop, _, _), (start, _, c, b) in itertools.pairwise(parts):
                if start != stop:  # a bug, never data: the unit must not commit with rows unwritten
                    raise RuntimeError(f"unit {self.job.name}: {key} has unwritten rows [{stop}, {start})")
                crc, nbytes = C.crc32_combine(crc, c, b), nbytes + b
            region = [parts[0][0], parts[-1][1]] if parts else [0, 0]
            records[key] = {"region": region, "crc32": f"{crc:08x}", "bytes": nbytes}
        return records, results

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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


def _run_image_batches(
    job: UnitJob,
    teacher: Any,
    batches: Any,
    kpe: tuple,
    tok: dict,
    pooled: Any,
    boxes: Any,
    flips: Any,
    valid: Any,
    computed: Callable[[int], None],
) -> tuple[list[tuple[str, int]], dict[str, list[np.ndarray]]]:
    """Run the teacher over the batches (in row order), filling the unit's (encoded) buffers in place and
    calling ``computed(rows)`` once rows [0, rows) are final. Returns (image id, row) of every image that
    could not be decoded (under on_error=skip, with ``valid`` 0; under fail the first one raises) and the
    view-0 reconstruction cosines per token source, batch by batch."""
    k, p, e = kpe
    bad = []
    cos: dict[str, list[np.ndarray]] = {s: [] for s in tok}
    done = 0
    for idx, u8, bx, fl, ok, why in batches:
        if len(idx) and (int(idx[0]) != done or int(idx[-1]) != done + len(idx) - 1):
            raise RuntimeError(
                f"unit {job.name}: batch rows {idx[0]}.. arrived out of order (expected {done})"
            )
        for j, good in enumerate(ok):
            if not good:
                di, image_id, _ = job.items[int(idx[j])]
                err = ImageError(job.dataset_paths[di], image_id, why[j])
                if job.on_error == "fail":
                    raise err
                log.warning("%s (zero-filled, image/valid = 0)", err)
                bad.append((image_id, int(idx[j])))
                valid[int(idx[j])] = 0
        b = len(idx)
        pixels = teacher.normalize_uint8(u8.view(b * k, *u8.shape[2:]).to(teacher.device, non_blocking=True))
        out = teacher.encode_images(pixels, relevance=job.relevance)
        keep = None  # rows of undecodable images stay zero
        if not all(ok):
            keep = torch.tensor(ok, dtype=torch.float32, device=pixels.device).repeat_interleave(k)
        for s, buf in tok.items():
            x = out["tokens" if s == "tokens" else s[: -len("_tokens")]]
            x = x if keep is None else x * keep[:, None, None]
            enc, dec = _encode_batch(x, job.dtype)
            for suffix, a in enc.items():
                buf[suffix][idx] = a.reshape(b, k, *a.shape[1:])
            cos[s].append(_token_cosine(x.reshape(b, k, p, e)[:, 0], dec.reshape(b, k, p, e)[:, 0]))
        pooled_b = out["pooled"] if keep is None else out["pooled"] * keep[:, None]
        pooled[idx] = pooled_b.half().cpu().numpy().reshape(b, k, e)
        boxes[idx], flips[idx] = bx, fl
        done += b
        computed(done)
    return bad, cos


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


def nonfinite_rows(a: np.ndarray, block_bytes: int = 1 << 21) -> np.ndarray:
    """bool [len(a)]: which rows of ``a`` hold a NaN or an Inf. float16 is tested on its bits (exponent all
    ones <=> ``bits & 0x7FFF >= 0x7C00``) a few MB of rows at a time into one reused buffer: numpy has no
    native float16 arithmetic, and over a unit's 100 MB of tokens ``isfinite`` took 14× as long and a
    whole-array temporary 3× (its fresh pages)."""
    if a.size == 0:
        return np.zeros(len(a), bool)
    flat = a.reshape(len(a), -1)
    if flat.dtype != np.float16:
        return ~np.isfinite(flat).all(axis=1)
    bits, out = flat.view(np.uint16), np.empty(len(a), bool)
    step = max(1, block_bytes // bits[0].nbytes)
    buf = np.empty((min(step, len(a)), bits.shape[1]), np.uint16)
    for lo in range(0, len(a), step):
        hi = min(len(a), lo + step)
        out[lo:hi] = np.bitwise_and(bits[lo:hi], 0x7FFF, out=buf[: hi - lo]).max(axis=1) >= 0x7C00
    return out


def _screen_image_rows(job: UnitJob, arrays: dict[str, np.ndarray], lo: int, hi: int) -> list[str]:
    """Never commit NaN/Inf. Checked on the encoded rows [lo, hi) of the unit's arrays, i.e. what would be
    stored (a finite float32 value beyond float16's range becomes Inf only there). Fails naming the image ids,
    or under ``on_error=skip`` zero-fills the teacher outputs of those rows and marks them invalid, like
    undecodable images; returns the ids so marked."""
    floats = {k: a for k, a in arrays.items() if a.dtype.kind == "f" and not k.endswith("/boxes")}
    bad, where = np.zeros(hi - lo, bool), []
    for key, a in floats.items():
        rows = nonfinite_rows(a[lo:hi])
        if rows.any():
            bad |= rows
            where.append(key)
    if not bad.any():
        return []
    rows = lo + np.flatnonzero(bad)
    ids = [job.items[r][1] for r in rows]
    if job.on_error == "fail":
        raise NonFiniteOutput(job.name, ids, sorted(where))
    for a in floats.values():
        a[rows] = 0
    arrays["image/valid"][rows] = 0
    log.warning("unit %s: non-finite teacher output for %s (zero-filled, image/valid = 0)", job.name, ids)
    return ids


def _screen_texts(job: UnitJob, arrays: dict) -> None:
    """``_screen_image_rows`` for a text unit: text rows have no validity flag, so a non-finite text always
    fails naming the text."""
    lengths = np.asarray(job.lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    bad_texts, where = set(), []
    for key, (_, a) in arrays.items():
        rows = nonfinite_rows(a) if a.dtype.kind == "f" else np.zeros(len(a), bool)
        if not rows.any():
            continue
        where.append(key)
        if key.startswith("text/tokens"):  # token rows -> the texts owning them
            owner = np.searchsorted(starts, np.flatnonzero(rows), side="right") - 1
            bad_texts |= {int(j) for j in owner if 0 <= j < len(lengths)}
        else:
            bad_texts |= {int(j) for j in np.flatnonzero(rows)}
    if where:
        raise NonFiniteOutput(job.name, [job.texts[j] for j in sorted(bad_texts)], sorted(where), "text")


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


def run_unit(job: UnitJob) -> dict:
    """Compute one unit, write its shards, commit its manifest entry; returns the manifest record."""
    t0 = time.time()
    log.debug("unit %s: start (pid %d)", job.name, os.getpid())  # names the unit in flight if the run dies
    teacher = get_teacher(job.teacher, job.threads)
    if job.kind == "image":
        record_arrays, info = _image_unit(job, teacher)
    else:
        arrays, info = _text_unit(job, teacher)
        _screen_texts(job, arrays)
        record_arrays = _write_text_unit(job, arrays)
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


# ------------------------------------------------------------------------------------------- coordinator


def _text_lengths(teacher: Any, texts: Sequence[str], batch: int = 4096) -> np.ndarray:
    out = [
        teacher.text_lengths(teacher.tokenizer(list(texts[i : i + batch])))
        for i in range(0, len(texts), batch)
    ]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def local_cluster(n_workers: int, cluster_kwargs: dict | None = None) -> Any:
    """The ``local`` scheduler's LocalCluster: n worker processes, one dask thread each (one unit at a time;
    torch inside it gets the worker's cores), non-daemonic so a unit's DataLoader may start processes.
    dask's worker environment loses ``MALLOC_TRIM_THRESHOLD_``: any explicit trim threshold turns off
    glibc's adaptive mmap threshold, so every large torch buffer became a fresh mmap whose pages fault in
    again (the default repro's extract units: 27.7 s with it, 15.7 s without; ``metrics/extract.json``)."""
    import dask
    from distributed import LocalCluster

    spawn = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    spawn.pop("MALLOC_TRIM_THRESHOLD_", None)
    kwargs = {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}
    kwargs.update(cluster_kwargs or {})
    with dask.config.set({"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": spawn}):
        return LocalCluster(**kwargs)


def _run_units(
    jobs: list[UnitJob],
    scheduler: str,
    n_workers: int,
    progress: bool,
    cluster_kwargs: dict,
    torch_threads: int,
) -> list:
    from tqdm import tqdm

    records: list[dict] = []
    bar = tqdm(total=len(jobs), unit="unit", disable=not progress, desc="extract")
    t0, items = time.time(), 0

    def done(rec: dict) -> None:
        nonlocal items
        records.append(rec)
        items += rec["items"]
        bar.update(1)
        bar.set_postfix(items_per_s=f"{items / max(time.time() - t0, 1e-9):.1f}")

    try:
        if scheduler == "sync":
            for job in jobs:
                done(run_unit(job))
            return records
        from distributed import Client, as_completed

        cluster = None
        if scheduler == "local":
            cores = os.cpu_count() or 1
            n = max(1, n_workers)
            threads = torch_threads or max(1, cores // n)
            cluster = local_cluster(n, cluster_kwargs)
            for j in jobs:
                j.threads = threads
            client = Client(cluster)
        else:
            client = Client(scheduler)
        try:
            futures = [
                client.submit(run_unit, j, key=f"clip-td-{j.name}-{os.getpid()}-{time.time_ns()}")
                for j in jobs
            ]
            for fut in as_completed(futures):
                if fut.status == "error":
                    client.cancel([f for f in futures if not f.done()])
                    fut.result()  # re-raises the unit's exception here
                done(fut.result())
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return records
    finally:
        bar.close()


def extract(
    datasets: Sequence[PreparedDataset],
    store_url: str,
    teacher_spec: TeacherSpec | tuple | dict,
    cache_params: Any,
    scheduler: str = "local",
    progress: bool = True,
    *,
    overwrite: bool = False,
    rebuild_stale: bool = False,
    vqa_candidates: int = 4,
    cluster_kwargs: dict | None = None,
    torch_threads: int = 0,
) -> dict:
    """Extract the teacher cache for ``datasets`` into ``store_url``; returns the metrics dict.

    ``teacher_spec``: a TeacherSpec, a (model, pretrained, precision) tuple or a dict of those keys.
    ``cache_params``: a pipeline.config.CacheParams. ``scheduler``: "local" (a LocalCluster of
    ``cache_params.n_workers`` processes), "sync" (in this process, one unit after the other) or the address
    of a running dask scheduler (its workers must see the datasets and the store at the same paths/URLs).
    ``cluster_kwargs`` go to LocalCluster; ``torch_threads`` per local worker (0: cores // n_workers).
    An existing store built from another teacher, data or layout raises StaleCacheError naming the fields,
    unless ``overwrite`` (always rebuild it) or ``rebuild_stale`` (rebuild it only when stale, so a pipeline
    runner can both resume an interrupted store and replace one built from an older teacher). A replaced
    local store is rebuilt beside it and swapped in when complete (see the module docstring). A location
    holding anything but a teacher cache raises CacheFormatError and is never written; one that overlaps a
    dataset raises StoreLocationError.

    The store's lock (``pipeline.lock``) is held throughout: a second extraction of the same store is refused
    with ``StoreLocked`` naming the holder, a location that cannot be written fails with ``StoreNotWritable``
    naming the path before any work, and a lock left by a killed run is taken over with a warning.
    """
    from .lock import StoreLock

    check_store_outside(store_url, [ds.path for ds in datasets])
    # Checked again under the lock (another process may act in between); checked here first so that a
    # foreign folder does not even get a lock file written into it.
    kind, _, why = C.inspect_location(store_url)
    if kind == "foreign":
        raise C.CacheFormatError(C.foreign_message(store_url, why))
    with StoreLock(store_url, purpose=f"extract-teacher (scheduler {scheduler})"):
        return _extract_locked(
            datasets, store_url, teacher_spec, cache_params, scheduler, progress, overwrite=overwrite,
            rebuild_stale=rebuild_stale, vqa_candidates=vqa_candidates, cluster_kwargs=cluster_kwargs,
            torch_threads=torch_threads,
        )  # fmt: skip


def _extract_locked(
    datasets: Sequence[PreparedDataset],
    store_url: str,
    teacher_spec: TeacherSpec | tuple | dict,
    cache_params: Any,
    scheduler: str,
    progress: bool,
    *,
    overwrite: bool,
    rebuild_stale: bool,
    vqa_candidates: int,
    cluster_kwargs: dict | None,
    torch_threads: int,
) -> dict:
    t_start = time.time()
    spec = _as_spec(teacher_spec)
    cp = cache_params
    relevance = tuple(getattr(cp, "relevance_tokens", None) or ())
    bad = [r for r in relevance if r not in C.RELEVANCE_SOURCES]
    if bad:
        raise ValueError(f"cache.relevance_tokens: unknown source(s) {bad}; allowed {C.RELEVANCE_SOURCES}")

    plan = plan_extraction(datasets, vqa_candidates, cp.on_error)
    c = plan.counts
    if not plan.images or not plan.texts:  # a store without rows is never what a caller wants: say why
        raise DataError(
            ", ".join(plan.dataset_paths) or "(no datasets)",
            "dataset",
            f"nothing to extract: {c['unique_images']} images, {c['unique_texts']} texts "
            f"({c['instances']} instances, {c['texts_skipped']} empty texts skipped)",
        )
    log.info(
        "plan: %d instances; images %d -> %d unique (%d duplicates removed, %d aliases); texts %d -> %d unique "
        "(%d duplicates removed, %d empty skipped)",
        c["instances"], c["images_total"], c["unique_images"], c["image_duplicates_removed"], c["image_aliases"],
        c["texts_total"], c["unique_texts"], c["text_duplicates_removed"], c["texts_skipped"],
    )  # fmt: skip

    teacher = get_teacher(spec)
    describe = teacher.describe()
    lengths = _text_lengths(teacher, plan.texts)
    layout = C.StoreLayout(
        n_images=len(plan.images),
        n_texts=len(plan.texts),
        embed_dim=teacher.embed_dim,
        num_patches=teacher.num_patches,
        views=int(cp.views),
        relevance_tokens=list(relevance),
        dtype=cp.dtype,
        compressor=cp.compressor,
        clevel=int(cp.clevel),
        image_rows_per_unit=int(cp.image_rows_per_unit),
        text_rows_per_unit=int(cp.text_rows_per_unit),
        target_chunk_bytes=int(cp.target_chunk_bytes),
        text_chunk_bytes=int(cp.text_chunk_bytes),
    )
    # Image shards: the largest image array's rows (tokens, with their views) reaching image_shard_bytes.
    image_row_bytes = max(1, layout.views) * layout.num_patches * layout.embed_dim * layout.token_itemsize
    layout.image_rows_per_shard = C.chunk_rows_for(
        layout.image_rows_per_unit, image_row_bytes, int(cp.image_shard_bytes)
    )
    row_bytes = teacher.embed_dim * layout.token_itemsize
    offsets, layout.text_shard_rows, layout.text_chunk_rows = C.text_token_layout(
        lengths, layout.text_rows_per_unit, row_bytes, layout.text_chunk_bytes
    )

    from .teacher import autocast_dtype

    tfp = C.teacher_fingerprint(
        describe, weights_sha256(teacher) if describe.get("pretrained_kind") == "random" else ""
    )
    tfp["compute_dtype"] = str(autocast_dtype(teacher.device, teacher.precision) or torch.float32)
    fingerprint = {
        "format_version": C.FORMAT_VERSION,
        "teacher": tfp,
        "data": plan.data_fingerprint,
        "store": {
            "dtype": layout.dtype,
            "compressor": layout.compressor,
            "clevel": layout.clevel,
            "views": layout.views,
            "relevance_tokens": list(relevance),
            "image_rows_per_unit": layout.image_rows_per_unit,
            "image_shard_bytes": int(cp.image_shard_bytes),
            "text_rows_per_unit": layout.text_rows_per_unit,
            "target_chunk_bytes": layout.target_chunk_bytes,
            "text_chunk_bytes": layout.text_chunk_bytes,
        },
    }

    # Stores from before image_shard_bytes hold one shard per unit: they resume as they are when this setting
    # also gives one shard per unit.
    legacy = (
        {"image_shard_bytes": int(cp.image_shard_bytes)}
        if layout.image_shard_rows == layout.image_rows_per_unit
        else {}
    )
    target = _open_or_check(store_url, fingerprint, overwrite, rebuild_stale, legacy)
    build_url = target.url
    n_units = layout.n_image_units + layout.n_text_units
    if target.fresh:
        attrs = {
            "format": C.FORMAT,
            "format_version": C.FORMAT_VERSION,
            "package_version": C.package_version(),
            "teacher": describe,
            "embed_dim": teacher.embed_dim,
            "num_patches": teacher.num_patches,
            "grid": teacher.grid,
            "context_length": teacher.context_length,
            "logit_scale": teacher.logit_scale,
            "dtype": layout.dtype,
            "codec": {
                "compressor": layout.compressor,
                "clevel": layout.clevel,
                "shuffle": "byte" if layout.compressor != "none" else None,
                "int8": "per-token symmetric: x ≈ q * tokens_scale" if layout.dtype == "int8" else None,
            },
            "views": layout.views,
            "relevance_tokens": list(relevance),
            "units": {
                "total": n_units,
                "image": layout.n_image_units,
                "text": layout.n_text_units,
                "image_rows_per_unit": layout.image_rows_per_unit,
                "image_rows_per_shard": layout.image_rows_per_shard,
                "text_rows_per_unit": layout.text_rows_per_unit,
                "text_token_rows_per_unit": layout.text_shard_rows,
            },
            "data": {
                **plan.data_fingerprint,
                "paths": plan.dataset_paths,
                "counts": plan.counts,
                "vqa_vocab_from": plan.vqa_vocab_from,
                "vqa_vocab": plan.vqa_vocab,
            },
            "fingerprint": fingerprint,
        }
        C.create_store(
            build_url,
            layout,
            attrs,
            [i for _, i, _ in plan.images],
            plan.text_ids,
            lengths,
            offsets,
            plan.alias_ids,
            plan.alias_rows,
        )

    jobs = _make_jobs(plan, layout, lengths, offsets, build_url, spec, cp, relevance)
    committed = C.committed_units(build_url)
    todo = [j for j in jobs if j.name not in committed]
    log.info(
        "units: %d total, %d already committed, %d to compute", len(jobs), len(jobs) - len(todo), len(todo)
    )
    records = _run_units(todo, scheduler, int(cp.n_workers), progress, cluster_kwargs or {}, torch_threads)
    committed = C.committed_units(build_url)
    missing = [j.name for j in jobs if j.name not in committed]
    if missing:  # cannot happen unless a unit lied; never mark such a store complete
        raise RuntimeError(f"{build_url}: units not committed after extraction: {missing[:5]}")

    seconds = time.time() - t_start
    metrics = _metrics(build_url, plan, layout, lengths, committed, records, len(jobs), seconds)
    metrics["store"] = store_url
    # A run that computed nothing on a complete store writes nothing: its seconds in zarr.json would make
    # DVC see a new store and retrain every student that depends on it.
    if records or not target.complete:
        g = C.open_group(build_url, mode="r+")
        g.attrs.update({"complete": True, "extract": metrics})
    if target.replace:
        log.info("%s: rebuilt store complete, swapping it into place", build_url)
        C.replace_store(build_url, store_url)
    return metrics


def _as_spec(t: TeacherSpec | tuple | dict) -> TeacherSpec:
    if isinstance(t, TeacherSpec):
        return t
    if isinstance(t, dict):
        return TeacherSpec(**t)
    return TeacherSpec(*t)


REBUILD_SUFFIX = ".tmp-rebuild"


def rebuild_url(url: str) -> str:
    """Where a replacement for the store at ``url`` is built: beside it, so it can be renamed into place."""
    return url.rstrip("/") + REBUILD_SUFFIX


@dataclass
class _Target:
    url: str  # where the units write: the store itself, or its rebuild beside it
    fresh: bool  # the store must be created there first
    replace: bool = False  # swap it into the place of the store once complete
    complete: bool = False  # already marked complete (then a run that computes nothing writes nothing)


def _differing(attrs: dict, fingerprint: dict, legacy: dict | None) -> list[str]:
    fp = attrs.get("fingerprint", {})
    fp = fp if isinstance(fp, dict) else {}
    if isinstance(fp.get("store"), dict) and legacy:
        fp = {**fp, "store": {**legacy, **fp["store"]}}
    return sorted(set(C.check_fingerprint(fp, fingerprint)) | set(C.check_fingerprint(fingerprint, fp)))


def _open_or_check(
    url: str, fingerprint: dict, overwrite: bool, rebuild_stale: bool = False, legacy: dict | None = None
) -> _Target:
    """Where to build and whether to create the store there; raises StaleCacheError for a store built from
    something else, CacheFormatError for a location holding anything but a teacher cache. ``legacy``: values
    of store settings newer than the store, equivalent to what it was built with."""
    kind, attrs, why = C.inspect_location(url)
    if kind == "foreign":
        raise C.CacheFormatError(C.foreign_message(url, why))
    if kind in ("absent", "empty"):
        return _unswapped_rebuild(url, fingerprint, legacy) or _Target(url, fresh=True)
    if not attrs.get("layout"):  # our store, but its creation was interrupted: nothing was committed yet
        C.remove_store(url)
        return _Target(url, fresh=True)
    diff = _differing(attrs, fingerprint, legacy)
    if not diff and not overwrite:
        C.check_metadata(url)
        return _Target(url, fresh=False, complete=bool(attrs.get("complete")))
    if diff and not (overwrite or rebuild_stale):
        raise C.StaleCacheError(url, diff)
    if diff:
        log.warning("%s is stale (differs in %s): rebuilding it", url, ", ".join(diff))
    return _rebuild_target(url, fingerprint, legacy, resume=not overwrite)


def _unswapped_rebuild(url: str, fingerprint: dict, legacy: dict | None) -> _Target | None:
    """A matching rebuild beside a missing store: a swap cut short between its two renames (where the kernel
    has no atomic exchange), or a store deleted by hand. Resumed and moved into place, not recomputed."""
    if not C.is_local(url):
        return None
    tmp = rebuild_url(url)
    kind, attrs, _ = C.inspect_location(tmp)
    if kind != "cache" or not attrs.get("layout") or _differing(attrs, fingerprint, legacy):
        return None  # anything else there is left alone
    C.check_metadata(tmp)
    log.warning("%s is missing; resuming the rebuild at %s and moving it into place", url, tmp)
    return _Target(tmp, fresh=False, replace=True, complete=bool(attrs.get("complete")))


def _rebuild_target(url: str, fingerprint: dict, legacy: dict | None, resume: bool) -> _Target:
    """A replacement for the (recognised) store at ``url``: built beside it and swapped in when complete.
    ``resume``: continue a matching rebuild that an earlier run left (``overwrite`` starts it over)."""
    if not C.is_local(url):
        # An object store has no directory rename (a "rename" copies every object), so the store is
        # replaced in place there: deleted now, rebuilt, resumable if the run is interrupted.
        C.remove_store(url)
        return _Target(url, fresh=True)
    tmp = rebuild_url(url)
    kind, attrs, why = C.inspect_location(tmp)
    if kind == "foreign":
        raise C.CacheFormatError(C.foreign_message(tmp, why))
    if kind == "cache":
        if resume and attrs.get("layout") and not _differing(attrs, fingerprint, legacy):
            C.check_metadata(tmp)
            log.info("%s: resuming the rebuild an earlier run left at %s", url, tmp)
            return _Target(tmp, fresh=False, replace=True, complete=bool(attrs.get("complete")))
        C.remove_store(tmp, keep_lock=False)
    log.info("%s: building its replacement at %s (swapped in when complete)", url, tmp)
    return _Target(tmp, fresh=True, replace=True)


def check_store_outside(store_url: str, folders: Sequence[str | Path]) -> None:
    """Refuse a local store location equal to, inside or containing any of ``folders`` (the datasets it is
    extracted from): the store would write into a dataset, or a rebuild would replace it."""
    path = C.local_path(store_url)
    if path is None:
        return
    store = Path(path).resolve()
    for f in folders:
        folder = Path(f).resolve()
        if store == folder:
            rel = "is"
        elif folder in store.parents:
            rel = "is inside"
        elif store in folder.parents:
            rel = "contains"
        else:
            continue
        raise StoreLocationError(
            f"teacher cache {store_url} {rel} the dataset folder {f}: put the store outside the datasets it is "
            "extracted from (nothing was written)"
        )


def open_datasets(paths: Sequence[str | Path]) -> list[PreparedDataset]:
    """PreparedDataset for each path; a dataset.json or images.index.json that cannot be parsed or lacks what
    extraction reads raises DataError naming the file (PreparedDataset itself would fail on it with a bare
    JSON or key error, or later, mid-plan)."""
    out = []
    for p in paths:
        try:
            ds = PreparedDataset(p)
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            _diagnose_dataset(Path(p))
            raise DataError(p, "dataset", f"cannot be read: {type(e).__name__}: {e}") from None
        _diagnose_dataset(Path(p), ds)
        out.append(ds)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "file", "missing (rerun `python -m stages.prepare_data`)") from None
    except (UnicodeDecodeError, ValueError) as e:
        where = f"line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "json"
        raise DataError(path, where, f"not valid JSON ({e}); rerun `python -m stages.prepare_data`") from None
    except OSError as e:
        raise DataError(path, "file", f"cannot be read: {e}") from None


def _diagnose_dataset(path: Path, ds: PreparedDataset | None = None) -> None:
    """Raise DataError naming the file at fault when a prepared dataset's metadata is not what extraction
    reads: dataset.json an object with string lists ``instance_shards`` and ``image_shards`` and a string
    ``fingerprint``, images.index.json an object of [shard, offset, size, ext, sha1] entries."""
    from .data.shards import INDEX_FILE, INFO_FILE

    info = ds.info if ds is not None else _read_json(path / INFO_FILE)
    if not isinstance(info, dict):
        raise DataError(path / INFO_FILE, "json", "not a JSON object")
    for key in ("instance_shards", "image_shards"):
        v = info.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise DataError(path / INFO_FILE, key, f"expected a list of shard file names, got {v!r:.80}")
    if not isinstance(info.get("fingerprint"), str):
        raise DataError(
            path / INFO_FILE, "fingerprint", f"expected a string, got {info.get('fingerprint')!r:.80}"
        )
    index = ds.index if ds is not None else _read_json(path / INDEX_FILE)
    if not isinstance(index, dict):
        raise DataError(path / INDEX_FILE, "json", "not a JSON object (image id -> entry)")
    n = len(info["image_shards"])
    for image_id, e in index.items():
        if not (
            isinstance(e, list)
            and len(e) == 5
            and isinstance(e[0], int)
            and 0 <= e[0] < n
            and all(isinstance(x, int) and x >= 0 for x in e[1:3])
            and all(isinstance(x, str) for x in e[3:])
        ):
            raise DataError(
                path / INDEX_FILE, image_id, f"expected [shard < {n}, offset, size, ext, sha1], got {e!r:.80}"
            )


def decode_workers(num_workers: int, device: str) -> int:
    """``cache.num_workers`` resolved: -1 picks in-process decoding for a CPU teacher (its torch threads already
    use every core) and up to 4 worker processes, leaving a core to the coordinator, for a GPU teacher."""
    if num_workers >= 0:
        return num_workers
    if not device.startswith("cuda"):
        return 0
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _make_jobs(plan, layout, lengths, offsets, url, spec, cp, relevance) -> list[UnitJob]:
    common = dict(
        store_url=url,
        teacher=spec,
        dtype=layout.dtype,
        views=layout.views,
        relevance=relevance,
        batch_size=int(cp.batch_size),
        num_workers=decode_workers(int(cp.num_workers), spec.resolved_device()),
        on_error=cp.on_error,
    )
    jobs = []
    r = layout.image_rows_per_unit
    for u in range(layout.n_image_units):
        lo, hi = u * r, min(layout.n_images, (u + 1) * r)
        jobs.append(
            UnitJob(
                name=f"image-{u:06d}",
                kind="image",
                row0=lo,
                row1=hi,
                dataset_paths=tuple(plan.dataset_paths),
                items=tuple(plan.images[lo:hi]),
                shard_rows=layout.image_shard_rows,
                write_threads=int(cp.write_threads),
                **common,
            )
        )
    rt, s = layout.text_rows_per_unit, layout.text_shard_rows
    for u in range(layout.n_text_units):
        lo, hi = u * rt, min(layout.n_texts, (u + 1) * rt)
        assert offsets[lo] == u * s  # every text unit starts on its own shard boundary
        jobs.append(
            UnitJob(
                name=f"text-{u:06d}",
                kind="text",
                row0=lo,
                row1=hi,
                texts=tuple(plan.texts[lo:hi]),
                lengths=tuple(int(x) for x in lengths[lo:hi]),
                tok0=u * s,
                tok_rows=s,
                **common,
            )
        )
    return jobs


def _metrics(url, plan, layout, lengths, committed, records, n_units, seconds) -> dict:
    g = C.open_group(url, mode="r")
    uncompressed = 0
    for group in ("image", "views", "text"):
        if group not in g:
            continue
        for name, a in g[group].arrays():
            if a.dtype.kind in "OUT":  # ids are strings: not teacher output
                continue
            n = a.nbytes
            if group == "text" and name.startswith("tokens"):  # count real rows, not unit slack
                n = int(lengths.sum()) * (a.nbytes // max(1, a.shape[0]))
            uncompressed += n
    disk = C.bytes_on_disk(url)
    cos = [c for r in committed.values() if (c := r.get("reconstruction_cosine") or {}).get("n")]
    total_n = sum(c["n"] for c in cos)
    items = sum(r["items"] for r in records)
    invalid = sorted(i for r in committed.values() for i in r.get("invalid", []))
    return {
        **plan.counts,
        "store": url,
        "dtype": layout.dtype,
        "compressor": layout.compressor,
        "views": layout.views,
        "relevance_tokens": layout.relevance_tokens,
        "units_total": n_units,
        "units_computed": len(records),
        "units_skipped": n_units - len(records),
        "computed_units": sorted(r["unit"] for r in records),
        "items_computed": items,
        "seconds": round(seconds, 3),
        "unit_seconds": round(sum(r["seconds"] for r in records), 3),
        "items_per_s": round(items / seconds, 2) if seconds > 0 else 0.0,
        "bytes_on_disk": disk,
        "uncompressed_bytes": uncompressed,
        "compression_ratio": round(uncompressed / disk, 3) if disk else 0.0,
        "reconstruction_cosine": {
            "mean": sum(c["mean"] * c["n"] for c in cos) / total_n if total_n else 1.0,
            "min": min((c["min"] for c in cos), default=1.0),
            "tokens": total_n,
        },
        "images_invalid": len(invalid),
        "images_nonfinite": sum(len(r.get("nonfinite", [])) for r in committed.values()),
        "invalid_images": invalid[:100],
        "skipped_texts": plan.skipped_texts[:100],
        "text_token_rows": int(lengths.sum()),
        "text_token_slack_rows": int(layout.n_text_units * layout.text_shard_rows - lengths.sum()),
        "text_token_rows_per_unit": layout.text_shard_rows,
    }


def default_metrics_path(store_url: str) -> Path | None:
    """``<store>.extract.json`` beside a local store: the metrics follow the store they describe, so
    extracting some other store never overwrites the pipeline's metrics/extract.json. None for a remote URL."""
    path = C.local_path(store_url)
    return Path(path + ".extract.json") if path is not None else None


def write_metrics(path: str | Path, metrics: dict) -> None:
    """Written beside and renamed into place: a reader never sees half a file, and a symlink at ``path`` is
    replaced, not followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, path)


def find_default_datasets(root: str = "data/shards/synthetic") -> list[str]:
    """Every prepared dataset under root except the caption corpora (those train the embedded teacher)."""
    from .data.shards import find_datasets

    out = []
    for p in find_datasets(root):
        rel = Path(p).relative_to(root).parts if Path(p) != Path(root) else ()
        if not any(part.startswith("captions") for part in rel):
            out.append(str(p))
    return out
