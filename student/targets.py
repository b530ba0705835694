"""Teacher targets for a batch: read from the cache, or computed by a teacher inside the loop.

Both sources return the same dictionaries, so ``teacher_batch`` (which builds the loss inputs and the §5
confidence weights) is shared: the online mode exists to prove that the cache equals online targets and to
measure what the cache saves, never as a different code path through the loss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import zarr
from torch import Tensor

from pipeline.cache import TeacherCache, apply_view
from pipeline.data.shards import PreparedDataset, decode_image
from student.data import Batch, ImageViews
from student.losses import MethodSettings, TeacherBatch, confidence_weights


class TargetSource(Protocol):
    logit_scale: float
    grid: int

    def images(
        self, image_ids: Sequence[str], relevance: str | None, views: ImageViews | None = None
    ) -> dict[str, Tensor]: ...

    def texts(self, texts: Sequence[str], tokens: bool = True) -> dict: ...


class _ChunkLRU:
    """Decoded inner chunks (store dtype) by (array path, chunk index), least recently used evicted first."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self.chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        a = self.chunks.get(key)
        if a is not None:
            self.chunks.move_to_end(key)
        return a

    def put(self, key: tuple[str, int], a: np.ndarray) -> None:
        self.chunks[key] = a
        self.bytes += a.nbytes
        while self.bytes > self.max_bytes and len(self.chunks) > 1:
            _, old = self.chunks.popitem(last=False)
            self.bytes -= old.nbytes


class _ChunkCachedArray:
    """A zarr array whose row reads (``a[i:j]``, ``a.get_orthogonal_selection((rows,))``: all that
    ``pipeline.cache.read_rows`` uses) decode each inner chunk once and keep it in a shared LRU. A training
    batch needs a few rows of many chunks; the stream (shards in order, a shuffle buffer) comes back to the same
    chunks batch after batch, so without the LRU every batch would decompress whole chunks for a few rows."""

    def __init__(self, array: Any, lru: _ChunkLRU):
        self.array, self.lru = array, lru
        self.shape, self.dtype, self.path = array.shape, array.dtype, array.path
        self.rows_per_chunk = max(1, int(array.chunks[0]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def __getitem__(self, sel: Any) -> np.ndarray:
        if isinstance(sel, slice) and sel.step in (None, 1) and len(self.shape) > 0:
            return self.rows(np.arange(*sel.indices(self.shape[0])[:2]))
        return self.array[sel]

    def get_orthogonal_selection(self, sel: Any) -> np.ndarray:
        if isinstance(sel, tuple) and len(sel) == 1 and not isinstance(sel[0], slice):
            return self.rows(np.asarray(sel[0], dtype=np.int64))
        return self.array.get_orthogonal_selection(sel)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        cr, n = self.rows_per_chunk, self.shape[0]
        chunk = srt // cr
        uniq, starts = np.unique(chunk, return_index=True)
        have = {int(c): self.lru.get((self.path, int(c))) for c in uniq}
        missing = [c for c, a in have.items() if a is None]
        self.lru.hits += len(uniq) - len(missing)
        self.lru.misses += len(missing)
        # Missing chunks are read as whole-chunk slices, one per run of adjacent chunks: zarr decodes each
        # once, and slicing is far cheaper than an orthogonal selection listing every row of the chunks.
        run: list[int] = []
        for c in [*missing, None]:
            if run and (c is None or c != run[-1] + 1):
                block = self.array[run[0] * cr : min(n, (run[-1] + 1) * cr)]
                for j, rc in enumerate(run):
                    part = block[j * cr : (j + 1) * cr]
                    # Own memory per chunk, so evicting one frees it (a view would pin the whole run).
                    have[rc] = part = part.copy() if len(run) > 1 else part
                    self.lru.put((self.path, rc), part)
                run = []
            if c is not None:
                run.append(c)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        stops = [*starts[1:], len(srt)]
        for c, lo, hi in zip(uniq.tolist(), starts.tolist(), stops, strict=True):
            out[order[lo:hi]] = have[c][srt[lo:hi] - c * cr]
        return out


class _ChunkCachedGroup:
    """The store's group with its arrays opened once (no metadata read per batch) and row reads cached."""

    def __init__(self, group: Any, max_bytes: int):
        self.group, self.lru = group, _ChunkLRU(max_bytes)
        self._arrays: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self.group[name]
            a = self._arrays[name] = _ChunkCachedArray(a, self.lru) if isinstance(a, zarr.Array) else a
        return a

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)


class CachedTargets:
    """Targets from the Zarr store: one batched, sorted read per array per batch, through an LRU of decoded
    inner chunks (``chunk_cache_bytes``; 0 turns it off) so that a chunk is decompressed once while the
    training stream keeps coming back to it, not once per batch."""

    def __init__(self, cache: TeacherCache, chunk_cache_bytes: int = 256 << 20):
        self.cache = cache
        self.grid = cache.grid
        self.logit_scale = float(cache.attrs["logit_scale"])
        if chunk_cache_bytes > 0 and not isinstance(cache.group, _ChunkCachedGroup):
            cache.group = _ChunkCachedGroup(cache.group, chunk_cache_bytes)

    def images(
        self, image_ids: Sequence[str], relevance: str | None, views: ImageViews | None = None
    ) -> dict[str, Tensor]:
        index = views.index.tolist() if views is not None else None
        return self.cache.image_targets(image_ids, relevance=relevance, views=index)

    def texts(self, texts: Sequence[str], tokens: bool = True) -> dict:
        return self.cache.text_targets(texts, tokens=tokens)


class OnlineTargets:
    """The same targets computed by running the teacher on the batch (what training without a cache costs).

    Outputs are rounded through the cache's dtype (float16) so cached and online runs see the same numbers."""

    def __init__(
        self, teacher, datasets: Sequence[PreparedDataset], round_to: torch.dtype | None = torch.float16
    ):
        self.teacher = teacher
        self.grid = teacher.grid
        self.logit_scale = float(teacher.logit_scale)
        self._owner = {i: ds for ds in datasets for i in ds.index}
        self.round_to = round_to

    def _round(self, x: Tensor) -> Tensor:
        return x.to(self.round_to).float() if self.round_to is not None else x.float()

    def _pixels(self, image_id: str, views: ImageViews | None, j: int) -> Tensor:
        img = decode_image(self._owner[image_id].image_bytes(image_id))
        if views is None or int(views.index[j]) == 0:
            return self.teacher.preprocess(img)  # view 0 is the eval transform, as extraction makes it
        # Extraction's path for view v ≥ 1: crop + resize + flip, then uint8 → the teacher's normalisation.
        view = apply_view(img, views.boxes[j].tolist(), bool(views.flip[j]), self.teacher.image_size)
        u8 = torch.from_numpy(np.asarray(view.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        return self.teacher.normalize_uint8(u8[None])[0]

    @torch.no_grad()
    def images(
        self, image_ids: Sequence[str], relevance: str | None, views: ImageViews | None = None
    ) -> dict[str, Tensor]:
        pixels = torch.stack([self._pixels(i, views, j) for j, i in enumerate(image_ids)])
        extra = (relevance,) if relevance not in (None, "last") else ()
        out = self.teacher.encode_images(pixels, relevance=extra)
        res = {"tokens": self._round(out["tokens"]).cpu(), "pooled": self._round(out["pooled"]).cpu()}
        if relevance is not None:
            res["relevance"] = res["tokens"] if relevance == "last" else self._round(out[relevance]).cpu()
        res["valid"] = torch.ones(len(image_ids), dtype=torch.bool)
        return res

    @torch.no_grad()
    def texts(self, texts: Sequence[str], tokens: bool = True) -> dict:
        out = self.teacher.encode_texts(self.teacher.tokenizer(list(texts)))
        lengths = out["lengths"].cpu()
        res = {"pooled": self._round(out["pooled"]).cpu(), "lengths": lengths}
        if tokens:
            tok = self._round(out["tokens"]).cpu()
            res["tokens"] = [tok[i, : int(lengths[i])] for i in range(len(texts))]
        return res


def pad_tokens(per_text: Sequence[Tensor]) -> Tensor:
    width = max(int(t.shape[0]) for t in per_text)
    out = per_text[0].new_zeros(len(per_text), width, per_text[0].shape[-1])
    for i, t in enumerate(per_text):
        out[i, : t.shape[0]] = t
    return out


def read_targets(batch: Batch, source: TargetSource, cfg: MethodSettings) -> tuple[dict, dict, dict | None]:
    """Everything a batch's loss inputs come from, read once: image targets (in the views the student was
    shown), the distill texts' tokens and pooled embeddings, and, only when §5 weights are on, the candidate
    texts' pooled embeddings (one read for every candidate of the batch; their tokens are never needed)."""
    relevance = cfg.relevance_source if cfg.kd == "tokens" and cfg.relevance_source != "last" else None
    img = source.images(batch.image_ids, relevance, batch.views)
    txt = source.texts([t.distill for t in batch.teacher_texts])
    cand = None
    if cfg.weight:
        cand_texts = [c for t in batch.teacher_texts for c in t.candidates + t.rationale_candidates]
        if cand_texts:
            cand = source.texts(cand_texts, tokens=False)
    return img, txt, cand


def teacher_batch(
    batch: Batch, source: TargetSource, cfg: MethodSettings, task: str
) -> tuple[TeacherBatch, Tensor]:
    """Loss inputs for the batch's labelled instances and their detached §5 confidence weights [B]."""
    img, txt, cand = read_targets(batch, source, cfg)
    b = len(batch.teacher_texts)
    tb: TeacherBatch = {
        "img_tokens": img["tokens"],
        "img_pooled": img["pooled"],
        "txt_tokens": pad_tokens(txt["tokens"]),
        "txt_lengths": txt["lengths"],
        "txt_pooled": txt["pooled"],
    }
    if "relevance" in img:
        tb["rel_img_tokens"] = img["relevance"]
    weights = torch.ones(b)
    if cfg.weight:
        tau = source.logit_scale
        if task == "snli_ve":
            labels = torch.tensor([i.label for i in batch.instances])
            weights = confidence_weights(
                img["pooled"], tau, snli_labels=labels, e_txt=tb["txt_pooled"], clip=cfg.weight_clip
            )
        else:
            cand_pooled = cand["pooled"]
            k = len(batch.teacher_texts[0].candidates)
            cands = (
                cand_pooled[: b * k].view(b, k, -1)
                if task == "vqa"
                else cand_pooled.view(b, 2 * k, -1)[:, :k]
            )
            gold = torch.tensor([t.gold for t in batch.teacher_texts])
            weights = confidence_weights(img["pooled"], tau, cand=cands, gold=gold, clip=cfg.weight_clip)
            if task == "vcr":
                # QA→R agreement too: the instance's weight is the mean of its Q→A and QA→R weights.
                rat = cand_pooled.view(b, 2 * k, -1)[:, k:]
                rgold = torch.tensor([t.rationale_gold for t in batch.teacher_texts])
                weights = 0.5 * (
                    weights
                    + confidence_weights(img["pooled"], tau, cand=rat, gold=rgold, clip=cfg.weight_clip)
                )
    return tb, weights


def unlabeled_teacher_batch(
    image_ids: Sequence[str], source: TargetSource, cfg: MethodSettings
) -> TeacherBatch:
    """Image-only targets for the KD-only term (no text: txt_lengths 0, weights 1 per §5)."""
    relevance = cfg.relevance_source if cfg.relevance_source != "last" else None
    img = source.images(image_ids, relevance)
    b, e = img["pooled"].shape
    tb: TeacherBatch = {
        "img_tokens": img["tokens"],
        "img_pooled": img["pooled"],
        "txt_tokens": torch.zeros(b, 1, e),
        "txt_lengths": torch.zeros(b, dtype=torch.long),
        "txt_pooled": torch.zeros(b, e),
    }
    if "relevance" in img:
        tb["rel_img_tokens"] = img["relevance"]
    return tb
