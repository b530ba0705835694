"""A unit's images decoded for the teacher: uint8 pixels of every view, by DataLoader worker processes or
threads beside the teacher."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .. import cache as C
from ..data.shards import PreparedDataset, decode_image

MP_CONTEXT_ENV = "CLIP_TD_DATALOADER_CONTEXT"
# Threads decoding a unit's batches in this process (when it starts no DataLoader workers), each a batch ahead.
# One: on 2 cores a second thread cost CPU and bought no wall time (bench_scale's decode_arms, three quiet runs:
# unit wall 0.90-1.05 of PIL's with two threads, 0.79-0.85 with one; docs/scale.md).
DECODE_THREADS = 1


def pil_steps(preprocess: Any) -> list:
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
        self,
        dataset_paths: Sequence[str],
        items: Sequence[tuple],
        pil_steps: list,
        size: int,
        views: int,
        resize_mode: str | None = "shortest",
    ):
        self.dataset_paths, self.items = list(dataset_paths), list(items)
        self.pil_steps, self.size, self.k = pil_steps, size, max(1, views)
        # The teacher's: which region of the image view 0 (``pil_steps``) shows.
        self.resize_mode = resize_mode
        self.steps_keep_own_size = _steps_keep_own_size(pil_steps, size)
        # JPEGs stored at the teacher's size (as img2dataset-style corpora are) go through libjpeg-turbo via
        # torchvision straight to CHW: the same pixels as PIL's decode, at ~0.6 of its CPU. Turned off for
        # the rest of the unit at the first JPEG of another size, which would pay a decode twice.
        # (torchvision 0.29 marks its image codecs deprecated for TorchCodec; it is pinned, and the test
        # that compares this path with PIL fails loudly if a later one drops them.)
        self.jpeg_fast = self.k == 1 and self.steps_keep_own_size
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
        return self.decode_into(i, np.zeros((self.k, 3, self.size, self.size), np.uint8))

    def decode_into(self, i: int, u8: np.ndarray) -> tuple:
        """Item ``i`` with its pixels written into ``u8`` [K, 3, S, S] (a slot of a batch buffer: zeroed
        when the image does not decode); the same tuple as ``__getitem__``."""
        di, image_id, sha = self.items[i]
        boxes = np.zeros((self.k, 4), np.float32)
        flips = np.zeros(self.k, np.uint8)
        try:
            ds = self._open.get(di) or self._open.setdefault(di, PreparedDataset(self.dataset_paths[di]))
            raw = ds.image_bytes(image_id)
            if self.jpeg_fast and self._decode_jpeg_at_size(raw, u8[0]):
                boxes[0] = C.eval_view_box(self.size, self.size)
                return i, u8, boxes, flips, True, ""
            img = decode_image(raw)
            eval_img = img
            if not (self.steps_keep_own_size and img.size == (self.size, self.size)):
                for t in self.pil_steps:
                    eval_img = t(eval_img)
            u8[0] = _to_uint8(eval_img)
            boxes[0] = C.eval_view_box(*img.size, self.resize_mode)
            for v in range(1, self.k):
                rng = np.random.default_rng(C.view_seed(sha, v))
                box = C.sample_view_box(rng, *img.size)
                flip = bool(rng.random() < 0.5)
                u8[v] = _to_uint8(C.apply_view(img, box, flip, self.size))
                boxes[v], flips[v] = box, int(flip)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported with the image id below
            u8[...] = 0  # an invalid row is zero-filled, whatever a reused buffer held
            return i, u8, boxes, flips, False, f"cannot decode image: {type(e).__name__}: {e}"
        return i, u8, boxes, flips, True, ""

    def _decode_jpeg_at_size(self, raw: bytes, out: np.ndarray) -> bool:
        """Decode ``raw`` into ``out`` [3, S, S] when it is a JPEG of exactly the teacher's size; False leaves
        the image to PIL (another format, another size, or bytes libjpeg refuses: PIL then names the fault)."""
        if raw[:3] != b"\xff\xd8\xff":
            return False
        try:
            # bytearray: torch wants a writable buffer; the copy is a few dozen KB.
            x = decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return False
        if tuple(x.shape) != (3, self.size, self.size):
            self.jpeg_fast = False
            return False
        out[...] = x.numpy()
        return True


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


def unit_batches(
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

    # Each image is decoded straight into its slot of a batch buffer, and the buffers are reused: collating
    # per-image arrays into a fresh batch copied every pixel again into memory that had to be faulted in
    # (0.19 of 0.61 CPU ms per 224 px image). With DECODE_THREADS batches decoding ahead, a batch's buffer is
    # rewritten DECODE_THREADS + 2 batches later, when the caller has long finished with it (it asks for the
    # next batch only once it is done with this one).
    ahead_n = max(1, DECODE_THREADS)
    ring: list[np.ndarray | None] = [None] * (ahead_n + 2)

    def decode(lo: int) -> tuple:
        hi = min(n, lo + batch_size)
        slot = (lo // batch_size) % len(ring)
        buf = ring[slot]
        if buf is None or len(buf) != hi - lo:
            buf = ring[slot] = np.empty((hi - lo, data.k, 3, data.size, data.size), np.uint8)
        items = [data.decode_into(i, buf[j]) for j, i in enumerate(range(lo, hi))]
        idx, _, boxes, flips, ok, why = zip(*items, strict=True)
        return (
            np.asarray(idx, dtype=np.int64),
            torch.from_numpy(buf),
            np.stack(boxes),
            np.stack(flips),
            list(ok),
            list(why),
        )

    # In-process decode runs ahead on threads, so it overlaps the teacher's forward instead of alternating
    # with it (PIL and libjpeg decode and torch computes with the GIL released). With a GPU teacher decode is
    # the host's longest phase: one thread left the unit waiting on it for most of its time.
    with ThreadPoolExecutor(ahead_n, thread_name_prefix="clip-td-decode") as pool:
        pending = collections.deque(
            pool.submit(decode, lo) for lo in range(0, min(n, ahead_n * batch_size), batch_size)
        )
        nxt = ahead_n * batch_size
        while pending:
            batch = pending.popleft().result()
            if nxt < n:
                pending.append(pool.submit(decode, nxt))
                nxt += batch_size
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
                "pipeline.extract.decode",
            ]
        )
    return ctx
