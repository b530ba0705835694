"""A store that grows: its segments (the first extraction, then one per append), the committed part of its
index, and extending its arrays for a new segment.

A segment is a run of rows that one extraction added: ``images`` [lo, hi) of the image arrays, ``texts`` [lo,
hi) of the text arrays, ``tokens`` [lo, hi) of ``text/tokens``, ``aliases`` [lo, hi) of the alias arrays, and
the names of its units (``image_unit0``, ``text_unit0`` onwards). An append's rows start on a shard boundary
(images: an image shard; texts: a text unit, the shard of ``text/pooled``), so its units write shards no
earlier unit touched and every committed row and checksum stays as it was; the rows skipped to reach that
boundary are padding (``schema.pad_id``, never written, zero = invalid). An appended text unit owns as many
whole ``text/tokens`` shards as its texts need (``token_rows_per_unit``): the shard size was fixed by the
first extraction's texts.

The root attrs are the truth: ``segments`` lists every segment whose index is written, and an array longer
than the segments say (an append cut short before its attrs were written) is extended again, over its
unrecorded tail, by the next run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .create import index_writes
from .schema import ALIAS_ROWS_KEPT, pad_id, unit_name
from .store import _fs, open_group

SEGMENTS = "segments"
# Present while an append's units are not all committed: {"datasets": {label: fingerprint}, "paths": [...]},
# what the store will cover once they are (the fingerprint names only datasets whose rows are all committed).
APPENDING = "appending"


def store_segments(attrs: dict) -> list[dict]:
    """The store's segments; a store from before appends has one, implied by its layout."""
    segs = attrs.get(SEGMENTS)
    if segs:
        return [dict(s) for s in segs]
    lay = attrs.get("layout") or {}
    n, m = int(lay.get("n_images", 0)), int(lay.get("n_texts", 0))
    rt, s = max(1, int(lay.get("text_rows_per_unit", 1))), int(lay.get("text_shard_rows", 1))
    n_tok = math.ceil(m / rt) * s if m else 0
    return [initial_segment(n, m, n_tok, s, -1)]


def recorded_aliases(attrs: dict, held: int) -> int:
    """How many of the ``held`` alias rows the store's recorded segments cover: the rows past them belong to
    an append in flight (or cut short), which readers do not see. A store never grown records none: all."""
    segs = attrs.get(SEGMENTS)
    return min(held, max(int(s["aliases"][1]) for s in segs)) if segs else held


def alias_rows_state(url: str, group: Any) -> str:
    """ "" when every chunk of ``image/alias_rows`` that holds a recorded alias is there; else "lost" in a
    store whose every chunk was written (``ALIAS_ROWS_KEPT``), "unknown" in an older one, where a chunk of
    aliases of row 0 was never written and a lost chunk reads the same (``create.index_writes``). Rows past
    the recorded segments belong to an append in flight (or cut short), which writes them after resizing."""
    a = group["image/alias_rows"]
    n = recorded_aliases(dict(group.attrs), a.shape[0])
    if n <= 0:
        return ""
    fs, root = _fs(url)
    folder = f"{root}/image/alias_rows"
    held = {p[len(folder) + 1 :] for p in fs.find(f"{folder}/c")} if fs.exists(f"{folder}/c") else set()
    rows = int(a.chunks[0])
    if all(a.metadata.encode_chunk_key((i,)) in held for i in range(-(-n // rows))):
        return ""
    return "lost" if group.attrs.get(ALIAS_ROWS_KEPT) else "unknown"


def initial_segment(
    n_images: int, n_texts: int, n_tokens: int, token_rows_per_unit: int, n_aliases: int
) -> dict:
    """The first extraction's segment (``n_aliases`` -1: unknown, the alias arrays' length)."""
    return {
        "images": [0, n_images],
        "image_unit0": 0,
        "texts": [0, n_texts],
        "text_unit0": 0,
        "tokens": [0, n_tokens],
        "token_rows_per_unit": token_rows_per_unit,
        "aliases": [0, n_aliases],
    }


@dataclass
class Extents:
    """Where the recorded segments end: rows (padding included), units, token rows, aliases."""

    images: int
    texts: int
    tokens: int
    aliases: int
    image_units: int
    text_units: int


def extents(
    segments: Sequence[dict], image_rows_per_unit: int, text_rows_per_unit: int, n_aliases: int
) -> Extents:
    units = segment_units(segments, image_rows_per_unit, text_rows_per_unit)
    last = segments[-1]
    return Extents(
        images=max(s["images"][1] for s in segments),
        texts=max(s["texts"][1] for s in segments),
        tokens=max(s["tokens"][1] for s in segments),
        aliases=n_aliases if last["aliases"][1] < 0 else max(s["aliases"][1] for s in segments),
        image_units=sum(1 for u in units if u[1] == "image"),
        text_units=sum(1 for u in units if u[1] == "text"),
    )


def segment_units(
    segments: Sequence[dict], image_rows_per_unit: int, text_rows_per_unit: int
) -> list[tuple[str, str, int, int, int, int]]:
    """(name, kind, first row, end row, first token row, end token row) of every unit of every segment, image
    units, text units, then padding units (token rows are 0, 0 but for text units). A padding unit (kind
    "pad", ``pad-image-<segment>`` / ``pad-text-<segment>``) computes nothing: its manifest entry, which the
    coordinator commits, records the crc32 of the rows an append skipped, so a reader decoding a whole chunk
    finds every row it touches in a committed unit."""
    r, rt = max(1, image_rows_per_unit), max(1, text_rows_per_unit)
    images, texts, pads = [], [], []
    for i, seg in enumerate(segments):
        lo, hi = seg["images"]
        for k in range(math.ceil((hi - lo) / r)):
            images.append(
                (
                    unit_name("image", seg["image_unit0"] + k),
                    "image",
                    lo + k * r,
                    min(hi, lo + (k + 1) * r),
                    0,
                    0,
                )
            )
        lo, hi = seg["texts"]
        ts, t0 = int(seg["token_rows_per_unit"]), seg["tokens"][0]
        for k in range(math.ceil((hi - lo) / rt)):
            texts.append(
                (unit_name("text", seg["text_unit0"] + k), "text", lo + k * rt, min(hi, lo + (k + 1) * rt),
                 t0 + k * ts, t0 + (k + 1) * ts)
            )  # fmt: skip
        for kind in ("image", "text"):
            lo, hi = seg.get(f"pad_{kind}s", (0, 0))
            if hi > lo:
                pads.append((f"pad-{kind}-{i:06d}", "pad", lo, hi, 0, 0))
    return images + texts + pads


def pad_record(url: str, name: str, lo: int, hi: int, keys: Sequence[str]) -> dict:
    """The manifest entry of padding unit ``name``: the crc32 of rows [lo, hi) of each array in ``keys`` as
    they read (never written: zero, the fill value)."""
    from .checksum import checksum

    g = open_group(url, mode="r")
    arrays = {}
    for key in keys:
        a = g[key][lo:hi]
        arrays[key] = {"region": [lo, hi], "crc32": checksum(a), "bytes": int(a.nbytes)}
    return {"unit": name, "kind": "pad", "rows": [lo, hi], "items": 0, "arrays": arrays, "invalid": []}


@dataclass
class StoreIndex:
    """The committed index of a store (the rows its recorded segments cover, padding included)."""

    image_ids: list[str]
    image_sha1: list[str] | None  # None: a store from before image/sha1
    alias_ids: list[str]
    alias_rows: list[int]
    text_ids: list[str]
    text_lengths: np.ndarray
    text_offsets: np.ndarray  # [texts + 1]
    ext: Extents


def read_index(url: str, attrs: dict) -> StoreIndex:
    g = open_group(url, mode="r")
    lay = attrs.get("layout") or {}
    segs = store_segments(attrs)
    ext = extents(
        segs, int(lay["image_rows_per_unit"]), int(lay["text_rows_per_unit"]), g["image/alias_ids"].shape[0]
    )
    n, m, a = ext.images, ext.texts, ext.aliases
    return StoreIndex(
        image_ids=g["image/ids"][:n].tolist() if n else [],
        image_sha1=(g["image/sha1"][:n].tolist() if n else []) if "sha1" in g["image"] else None,
        alias_ids=g["image/alias_ids"][:a].tolist() if a else [],
        alias_rows=[int(x) for x in g["image/alias_rows"][:a]] if a else [],
        text_ids=g["text/ids"][:m].tolist() if m else [],
        text_lengths=g["text/lengths"][:m] if m else np.zeros(0, np.int32),
        text_offsets=g["text/offsets"][: m + 1],
        ext=ext,
    )


def new_segment(
    ext: Extents, layout: dict, n_images: int, n_aliases: int, lengths: Sequence[int]
) -> tuple[dict, np.ndarray]:
    """(the segment of an append of ``n_images`` images, ``n_aliases`` aliases and texts of ``lengths``
    tokens, the offsets [ext.texts, texts end] of its rows, padding included)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rs = max(1, int(layout.get("image_rows_per_shard") or layout["image_rows_per_unit"]))
    rt, s = max(1, int(layout["text_rows_per_unit"])), max(1, int(layout["text_shard_rows"]))
    img_lo = math.ceil(ext.images / rs) * rs if n_images else ext.images
    txt_lo = math.ceil(ext.texts / rt) * rt if len(lengths) else ext.texts
    n_units = math.ceil(len(lengths) / rt)
    per_unit = [int(lengths[u * rt : (u + 1) * rt].sum()) for u in range(n_units)]
    ts = math.ceil(max([1, *per_unit]) / s) * s  # whole shards of the first extraction's size
    tok_lo = ext.tokens
    offsets = np.full(txt_lo - ext.texts + len(lengths) + 1, tok_lo, dtype=np.int64)
    for u in range(n_units):
        part = lengths[u * rt : (u + 1) * rt]
        base = txt_lo - ext.texts + u * rt
        offsets[base : base + len(part)] = tok_lo + u * ts + np.cumsum(part) - part
    offsets[-1] = tok_lo + n_units * ts
    seg = {
        "images": [img_lo, img_lo + n_images],
        "image_unit0": ext.image_units,
        "texts": [txt_lo, txt_lo + len(lengths)],
        "text_unit0": ext.text_units,
        "tokens": [tok_lo, tok_lo + n_units * ts],
        "token_rows_per_unit": ts,
        "aliases": [ext.aliases, ext.aliases + n_aliases],
        "pad_images": [ext.images, img_lo],
        "pad_texts": [ext.texts, txt_lo],
    }
    return seg, offsets


def _resize(a, rows: int) -> None:
    if a.shape[0] != rows:
        a.resize((rows, *a.shape[1:]))


def extend_store(
    url: str,
    ext: Extents,
    seg: dict,
    image_ids: Sequence[str],
    image_sha1: Sequence[str],
    alias_ids: Sequence[str],
    alias_rows: Sequence[int],
    text_ids: Sequence[str],
    lengths: Sequence[int],
    offsets: np.ndarray,
) -> None:
    """Grow every array to the segment's end and write its index (padding ids for the rows skipped to reach a
    shard boundary). Rows before ``ext`` are not written: zarr rewrites an index chunk they share whole, with
    the same values, in one atomic file write; a data array only changes its shape. The caller records the
    segment in the attrs afterwards: until then the store's readers see what they saw before."""
    g = open_group(url, mode="r+")
    n1, m1, t1 = (
        seg["images"][1] if image_ids else ext.images,
        seg["texts"][1] if text_ids else ext.texts,
        seg["tokens"][1],
    )
    t1 = max(t1, ext.tokens)
    a1 = ext.aliases + len(alias_ids)
    pads = [pad_id(r) for r in range(ext.images, n1 - len(image_ids))]
    for group in ("image", "views"):
        if group not in g:
            continue
        for name, a in g[group].arrays():
            key = f"{group}/{name}"
            _resize(a, a1 if key in ("image/alias_ids", "image/alias_rows") else n1)
    if n1 > ext.images:
        g["image/ids"][ext.images : n1] = np.asarray(pads + list(image_ids), dtype=object)
        if "sha1" in g["image"]:
            g["image/sha1"][ext.images : n1] = np.asarray([""] * len(pads) + list(image_sha1), dtype=object)
    if a1 > ext.aliases:
        g["image/alias_ids"][ext.aliases : a1] = np.asarray(list(alias_ids), dtype=object)
        with index_writes():
            g["image/alias_rows"][ext.aliases : a1] = np.asarray(alias_rows, dtype=np.int64)
    text_pads = [pad_id(r) for r in range(ext.texts, m1 - len(text_ids))]
    for name in ("ids", "lengths", "pooled"):
        _resize(g[f"text/{name}"], m1)
    _resize(g["text/offsets"], m1 + 1)
    for name, a in g["text"].arrays():
        if name.startswith("tokens"):
            _resize(a, t1)
    if m1 > ext.texts:
        g["text/ids"][ext.texts : m1] = np.asarray(text_pads + list(text_ids), dtype=object)
        g["text/lengths"][ext.texts : m1] = np.asarray([0] * len(text_pads) + list(lengths), dtype=np.int32)
        g["text/offsets"][ext.texts : m1 + 1] = np.asarray(offsets, dtype=np.int64)
