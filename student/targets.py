"""Teacher targets for a batch: read from the cache, or computed by a teacher inside the loop.

Both sources return the same dictionaries, so ``teacher_batch`` (which builds the loss inputs and the §5
confidence weights) is shared: the online mode exists to prove that the cache equals online targets and to
measure what the cache saves, never as a different code path through the loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from pipeline.cache import CacheCorrupt, TeacherCache, apply_view, read_threads_for  # noqa: F401 - CacheCorrupt: raised by reads here
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


class NonFiniteTarget(ValueError):
    """A teacher target holds NaN/Inf; names the array, row and image or text (not a loss-term error: these
    targets are wrong data, so ``train.on_nonfinite=skip`` must not skip past them)."""


class CachedTargets:
    """Targets from the Zarr store: one batched, sorted read per array per batch, through an LRU of decoded
    inner chunks (``chunk_cache_bytes``; 0 turns it off) so that a chunk is decompressed once while the
    training stream keeps coming back to it, not once per batch. With ``verify`` (the default), every unit a
    read touches is checked once against its manifest crc32 (``CacheCorrupt`` names the array and unit).
    ``token_dtype`` torch.float16 hands token targets out as a float16 store holds them, for a trainer on a
    CUDA device (the losses convert them to float32 there: ``prepare_teacher``); float32 otherwise.
    ``read_threads`` > 1 decode a batch's missing chunks concurrently (-1: min(4, cores)); the default, 1,
    decodes on the caller: on 2 busy cores the pool measured ~7 % slower (docs/scale.md)."""

    def __init__(
        self,
        cache: TeacherCache,
        chunk_cache_bytes: int = 256 << 20,
        verify: bool = True,
        token_dtype: torch.dtype = torch.float32,
        read_threads: int = 1,
    ):
        if token_dtype not in (torch.float32, torch.float16):
            raise ValueError(f"token_dtype must be torch.float32 or torch.float16, got {token_dtype}")
        self.cache, self.token_dtype = cache, token_dtype
        self.grid = cache.grid
        self.logit_scale = float(cache.attrs["logit_scale"])
        cache.configure_reads(verify, chunk_cache_bytes, read_threads_for(read_threads))

    def locate(self, kind: str, field: str, key: str, viewed: bool = False) -> str:
        """Where a target comes from, for an error: the store, the array, the row and the id."""
        if kind == "image":
            row = int(self.cache.image_rows([key])[0])
            array = f"{'views' if viewed else 'image'}/{field}"
            return f"teacher cache {self.cache.url}: {array} row {row} (image {key!r})"
        row = int(self.cache.text_rows([key])[0])
        what = "the token rows of text row" if field == "tokens" else "row"
        return f"teacher cache {self.cache.url}: text/{field} {what} {row} (text {key!r})"

    def images(
        self, image_ids: Sequence[str], relevance: str | None, views: ImageViews | None = None
    ) -> dict[str, Tensor]:
        index = views.index.tolist() if views is not None else None
        return self.cache.image_targets(
            image_ids, relevance=relevance, views=index, token_dtype=self.token_dtype
        )

    def texts(self, texts: Sequence[str], tokens: bool = True) -> dict:
        return self.cache.text_targets(texts, tokens=tokens, token_dtype=self.token_dtype)


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

    def locate(self, kind: str, field: str, key: str, viewed: bool = False) -> str:
        return f"online teacher: {kind} {field} of {kind} {key!r}"

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


def _first_nonfinite(t: Tensor | Sequence[Tensor] | None) -> int | None:
    """Index of the first item (row of a tensor, or tensor of a list) with NaN/Inf; None when all finite."""
    if t is None:
        return None
    if isinstance(t, Tensor):
        if not len(t):
            return None
        rows = t.reshape(len(t), -1)
        # NaN and Inf carry into a sum, so a finite row sum proves the row finite; only finite values so large
        # that their float32 sum overflows (never float16's) fall through to the exact check, which decides.
        # The sum is 6-15x cheaper than isfinite over every element, which took 8 ms of a batch of ViT-B/16
        # tokens on one host thread, a GPU student's step being ~10 ms (benchmarks/bench_finite.py).
        if rows.is_floating_point() and bool(torch.isfinite(rows.sum(1, dtype=torch.float32)).all()):
            return None
        ok = torch.isfinite(rows).all(1)
        return None if bool(ok.all()) else int((~ok).nonzero()[0])
    return next((i for i, x in enumerate(t) if not bool(torch.isfinite(x).all())), None)


def check_targets_finite(
    source: TargetSource, image_ids: Sequence[str], img: dict,
    texts: Sequence[str] = (), txt: dict | None = None,
    cand_texts: Sequence[str] = (), cand: dict | None = None, viewed: bool = False,
) -> None:  # fmt: skip
    """Name a non-finite target (array, row, id) before the loss turns it into a confusing error elsewhere."""
    parts = [("image", f, image_ids, img.get(f)) for f in ("pooled", "tokens", "relevance")]
    if txt is not None:
        parts += [("text", f, texts, txt.get(f)) for f in ("pooled", "tokens")]
    if cand is not None:
        parts.append(("text", "pooled", cand_texts, cand.get("pooled")))
    for kind, fld, keys, t in parts:
        i = _first_nonfinite(t)
        if i is not None:
            locate = getattr(source, "locate", None)
            where = locate(kind, fld, keys[i], viewed) if locate else f"teacher {kind} {fld} of {keys[i]!r}"
            raise NonFiniteTarget(f"{where}: teacher target holds NaN/Inf (non-finite)")


def assemble_teacher_batch(img: dict, txt: dict) -> TeacherBatch:
    """The loss's teacher-side inputs from an image read (``image_targets``) and a text read with tokens."""
    tb: TeacherBatch = {
        "img_tokens": img["tokens"],
        "img_pooled": img["pooled"],
        "txt_tokens": pad_tokens(txt["tokens"]),
        "txt_lengths": txt["lengths"],
        "txt_pooled": txt["pooled"],
    }
    if "relevance" in img:
        tb["rel_img_tokens"] = img["relevance"]
    return tb


def pad_candidates(flat: Tensor, counts: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Each instance's candidates ([ΣC, E], instance after instance, ``counts`` each) as [B, max C, E] with the
    mask of the real ones [B, max C]. VQA distractors share the question's answer type, and a type may have
    fewer than K − 1 other answers (the synthetic world's yes/no has one), so a batch's instances can hold
    different numbers of candidates; a missing one gets no probability in p_gold."""
    n = torch.tensor(list(counts), device=flat.device)
    mask = torch.arange(max(counts, default=0), device=flat.device)[None, :] < n[:, None]
    out = flat.new_zeros(len(counts), mask.shape[1], flat.shape[-1])
    out[mask] = flat  # row-major: instance by instance, its candidates in order
    return out, mask


def teacher_batch(
    batch: Batch, source: TargetSource, cfg: MethodSettings, task: str
) -> tuple[TeacherBatch, Tensor]:
    """Loss inputs for the batch's labelled instances and their detached §5 confidence weights [B]."""
    img, txt, cand = read_targets(batch, source, cfg)
    check_targets_finite(
        source, batch.image_ids, img, [t.distill for t in batch.teacher_texts], txt,
        [c for t in batch.teacher_texts for c in t.candidates + t.rationale_candidates], cand,
        viewed=batch.views is not None,
    )  # fmt: skip
    b = len(batch.teacher_texts)
    tb = assemble_teacher_batch(img, txt)
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
            if task == "vqa":
                cands, mask = pad_candidates(cand_pooled, [len(t.candidates) for t in batch.teacher_texts])
            else:
                cands, mask = cand_pooled.view(b, 2 * k, -1)[:, :k], None
            gold = torch.tensor([t.gold for t in batch.teacher_texts])
            weights = confidence_weights(
                img["pooled"], tau, cand=cands, gold=gold, cand_mask=mask, clip=cfg.weight_clip
            )
            if task == "vcr":
                # QA→R agreement too: the instance's weight is the mean of its Q→A and QA→R weights.
                rat = cand_pooled.view(b, 2 * k, -1)[:, k:]
                rgold = torch.tensor([t.rationale_gold for t in batch.teacher_texts])
                weights = 0.5 * (
                    weights
                    + confidence_weights(img["pooled"], tau, cand=rat, gold=rgold, clip=cfg.weight_clip)
                )
    return tb, weights * _valid(img)


def _valid(img: dict) -> Tensor | float:
    """1 per image with teacher targets, 0 where the store marks the image invalid (``image/valid``: with
    cache.on_error=skip, an image that did not decode or whose teacher output was not finite is stored as
    zeros): distilled toward zeros with a weight, such an instance learnt a wrong target, silently."""
    valid = img["valid"]
    if bool(valid.all()):
        return 1.0
    warnings.warn(
        "some images have no teacher targets (image/valid = 0 in the cache: they did not decode or the "
        "teacher's output was not finite at extraction); their instances train on the task loss alone",
        stacklevel=3,
    )
    return valid.to(torch.float32)


def unlabeled_teacher_batch(
    image_ids: Sequence[str], source: TargetSource, cfg: MethodSettings
) -> tuple[TeacherBatch, Tensor]:
    """Image-only targets for the KD-only term (no text: txt_lengths 0) and their weights: 1 per §5, 0 for an
    image the store marks invalid (``_valid``)."""
    relevance = cfg.relevance_source if cfg.relevance_source != "last" else None
    img = source.images(image_ids, relevance)
    check_targets_finite(source, image_ids, img)
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
    return tb, torch.ones(b) * _valid(img)
