"""Teacher targets for a batch: read from the cache, or computed by a teacher inside the loop.

Both sources return the same dictionaries, so ``teacher_batch`` (which builds the loss inputs and the §5
confidence weights) is shared: the online mode exists to prove that the cache equals online targets and to
measure what the cache saves, never as a different code path through the loss.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import fsspec
import numpy as np
import torch
import zarr
from torch import Tensor

from pipeline.cache import MANIFEST, TeacherCache, apply_view, checksum, committed_units
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


class CacheCorrupt(RuntimeError):
    """A unit's stored bytes differ from the crc32 its manifest entry recorded when it was committed (bit rot,
    a foreign writer), or the manifest itself cannot be read; names the store, array, unit and rows."""


class NonFiniteTarget(ValueError):
    """A teacher target holds NaN/Inf; names the array, row and image or text (not a loss-term error: these
    targets are wrong data, so ``train.on_nonfinite=skip`` must not skip past them)."""


def _unreadable_manifest_entry(url: str) -> str:
    """The manifest file that does not parse ("" when every one does)."""
    fs, path = fsspec.core.url_to_fs(url)
    for p in fs.ls(f"{path.rstrip('/')}/{MANIFEST}", detail=False):
        if p.endswith(".json"):
            try:
                json.loads(fs.cat_file(p))
            except ValueError:
                return p
    return ""


def manifest_regions(url: str) -> dict[str, list[tuple[int, int, str, str]]]:
    """{array path: [(lo, hi, unit, crc32)] sorted by lo}: the rows each committed unit owns in each array."""
    hint = f"run python -m stages.verify_cache {url}, then re-extract"
    try:
        units = committed_units(url)
    except (ValueError, OSError) as e:
        where = _unreadable_manifest_entry(url) or f"{url}/{MANIFEST}"
        raise CacheCorrupt(f"{where}: unreadable manifest entry ({type(e).__name__}: {e}); {hint}") from None
    regions: dict[str, list[tuple[int, int, str, str]]] = defaultdict(list)
    for name, rec in units.items():
        try:
            for key, info in rec.get("arrays", {}).items():
                lo, hi = (int(v) for v in info["region"])
                regions[key].append((lo, hi, name, str(info["crc32"])))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CacheCorrupt(
                f"{url}/{MANIFEST}/{name}.json: malformed manifest entry ({type(e).__name__}: {e}); {hint}"
            ) from None
    return {k: sorted(v) for k, v in regions.items()}


class _VerifiedGroup:
    """The store's group whose arrays check, the first time a read touches a unit's rows, that those rows
    still hash to the crc32 of the unit's manifest entry: each unit of each array read is verified once per
    run, which costs one extra decode of what the run reads (``verify_cache`` decodes the whole store)."""

    def __init__(self, group: Any, url: str):
        self.group, self.url = group, url
        self.regions = manifest_regions(url)
        self.verified: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self._arrays: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self.group[name]
            # An array no entry records a crc32 for (a hand-made or pre-checksum store) is read as before;
            # once any entry covers an array, every row read must belong to a verified unit.
            if isinstance(a, zarr.Array) and name in self.regions:
                a = _VerifiedArray(a, self, self.regions[name])
            self._arrays[name] = a
        return a

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)

    def check(self, array: Any, key: str, lo: int, hi: int, unit: str, crc: str) -> None:
        with self.lock:
            if (key, unit) in self.verified:
                return
            hint = f"run python -m stages.verify_cache {self.url}, then re-extract the store"
            try:
                got = checksum(array[lo:hi])
            except Exception as e:  # noqa: BLE001 - undecodable bytes are this unit's corruption
                raise CacheCorrupt(
                    f"teacher cache {self.url}: {key} rows [{lo}, {hi}) of unit {unit} are unreadable "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); {hint}"
                ) from None
            if got != crc:
                raise CacheCorrupt(
                    f"teacher cache {self.url}: {key} rows [{lo}, {hi}) of unit {unit} have crc32 {got}, "
                    f"but the manifest recorded {crc} (the bytes changed after extraction); {hint}"
                )
            self.verified.add((key, unit))


class _VerifiedArray:
    """A zarr array whose row reads (slices, orthogonal row selections) verify the units they touch first."""

    def __init__(self, array: Any, group: _VerifiedGroup, regions: list[tuple[int, int, str, str]]):
        self.array, self.group, self.regions = array, group, regions
        self.shape, self.dtype, self.path = array.shape, array.dtype, array.path
        self._starts = np.array([r[0] for r in regions], dtype=np.int64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def _verify(self, idx: Sequence[int]) -> None:
        for i in idx:
            lo, hi, unit, crc = self.regions[i]
            self.group.check(self.array, self.path, lo, hi, unit, crc)

    def _uncovered(self, row: int) -> CacheCorrupt:
        return CacheCorrupt(
            f"teacher cache {self.group.url}: row {row} of {self.path} belongs to no committed unit in the "
            "manifest (an entry is missing or was rewritten); "
            f"run python -m stages.verify_cache {self.group.url}"
        )

    def _verify_rows(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        rows = np.unique(rows)
        idx = np.searchsorted(self._starts, rows, side="right") - 1
        his = np.array([r[1] for r in self.regions], dtype=np.int64)
        outside = (idx < 0) | (rows >= his[np.clip(idx, 0, None)] if len(his) else True)
        if np.any(outside):
            raise self._uncovered(int(rows[np.flatnonzero(outside)[0]]))
        self._verify(sorted({int(i) for i in idx}))

    def _verify_span(self, lo: int, hi: int) -> None:
        touched = [i for i, r in enumerate(self.regions) if r[0] < hi and r[1] > lo]
        covered = lo
        for i in touched:  # regions are sorted: walk them, any gap is a row no unit owns
            if self.regions[i][0] > covered:
                break
            covered = max(covered, self.regions[i][1])
        if covered < hi:
            raise self._uncovered(covered)
        self._verify(touched)

    def __getitem__(self, sel: Any) -> np.ndarray:
        if isinstance(sel, slice) and sel.step in (None, 1):
            self._verify_span(*sel.indices(self.shape[0])[:2])
        elif isinstance(sel, (int, np.integer)):
            self._verify_rows(np.array([int(sel) % self.shape[0]]))
        else:
            self._verify_span(0, self.shape[0])
        return self.array[sel]

    def get_orthogonal_selection(self, sel: Any) -> np.ndarray:
        if isinstance(sel, tuple) and len(sel) == 1 and not isinstance(sel[0], slice):
            self._verify_rows(np.asarray(sel[0], dtype=np.int64))
        else:
            self._verify_span(0, self.shape[0])
        return self.array.get_orthogonal_selection(sel)


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
            cached = isinstance(a, (zarr.Array, _VerifiedArray))
            a = self._arrays[name] = _ChunkCachedArray(a, self.lru) if cached else a
        return a

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)


class CachedTargets:
    """Targets from the Zarr store: one batched, sorted read per array per batch, through an LRU of decoded
    inner chunks (``chunk_cache_bytes``; 0 turns it off) so that a chunk is decompressed once while the
    training stream keeps coming back to it, not once per batch. With ``verify`` (the default), every unit a
    read touches is checked once against its manifest crc32 (``CacheCorrupt`` names the array and unit)."""

    def __init__(self, cache: TeacherCache, chunk_cache_bytes: int = 256 << 20, verify: bool = True):
        self.cache = cache
        self.grid = cache.grid
        self.logit_scale = float(cache.attrs["logit_scale"])
        if verify and not isinstance(cache.group, (_VerifiedGroup, _ChunkCachedGroup)):
            cache.group = _VerifiedGroup(cache.group, cache.url)
        if chunk_cache_bytes > 0 and not isinstance(cache.group, _ChunkCachedGroup):
            cache.group = _ChunkCachedGroup(cache.group, chunk_cache_bytes)

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
        ok = torch.isfinite(t.reshape(len(t), -1)).all(1)
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
    return tb
