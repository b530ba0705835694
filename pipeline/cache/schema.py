"""The store's schema, written out once: format constants, every array's name, shape, dtype and chunking,
which writer fills it, the work-unit names, and the root attributes. ``create_store`` creates what this
module lists, extraction's units fill it, ``pipeline.verify`` checks a store against it and the reader reads
it (see ``pipeline.cache`` for the layout in words)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..names import RELEVANCE_SOURCES  # noqa: F401 - re-exported: one token array per source
from .layout import StoreLayout, chunk_rows_for

FORMAT = "clip-td-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest"
# Who computed a unit and how long it took: beside the manifest, not in it, because it differs run to run and
# the rest of a store does not (see ``commit_unit``).
PROVENANCE = "provenance"
PROVENANCE_KEYS = ("host", "pid", "seconds")
RUN_RECORD = "extract"  # provenance/extract.json: the last extraction run's metrics (``record_run``)
# The single-writer lock (pipeline.lock) lives inside the store; removing or recreating a store keeps it.
LOCK_FILE = ".lock"
# A replaced store is renamed to <store>.tmp-old-<random> and then deleted (``replace_store``).
TRASH_INFIX = ".tmp-old-"
SCALE_SUFFIX = "_scale"
# Arrays the coordinator writes before any unit runs, whose lengths come from the data, not the attrs.
ID_ARRAYS = ("image/ids", "image/sha1", "image/alias_ids", "image/alias_rows", "text/ids")
# Root attribute of a store whose every image/alias_rows chunk was written (``create.index_writes``), so a
# missing one was lost. Stores written before lack it (zarr skipped a chunk of zeros: aliases of row 0), and
# so do stores without aliases, whose bytes stay as they were.
ALIAS_ROWS_KEPT = "alias_rows_kept"
# The id of a row no image or text fills: an append starts its rows on a shard boundary (a unit never writes
# into a shard another unit owns), so the rows between the last store's end and that boundary stay empty.
# The unit separator character never occurs in a prepared dataset's ids nor in a text hash.
PAD_PREFIX = "\x1fpad:"


def pad_id(row: int) -> str:
    return f"{PAD_PREFIX}{row}"


def is_pad_id(value: str) -> bool:
    return str(value).startswith(PAD_PREFIX)


UnitKind = Literal["image", "text"]
Writer = Literal["coordinator", "image", "text"]


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store.
    ``shards`` None: an index array, plain chunks and zarr's default codec; ``itemsize`` picks the
    compressor's typesize; ``writer`` is who fills it (a unit kind, or the
    coordinator before any unit runs)."""

    shape: tuple[int, ...]
    dtype: str
    writer: Writer
    shards: tuple[int, ...] | None = None
    chunks: tuple[int, ...] | None = None
    itemsize: int = 2


def token_sources(layout_or_relevance: StoreLayout | Any) -> list[str]:
    """Array names of the token sources: "tokens" plus "<src>_tokens" per relevance source (from a layout
    or a sequence of relevance source names)."""
    rel = getattr(layout_or_relevance, "relevance_tokens", layout_or_relevance)
    return ["tokens", *(f"{s}_tokens" for s in rel or ())]


def array_specs(layout: StoreLayout, n_text_tokens: int, n_aliases: int = 0) -> dict[str, ArraySpec]:
    """Every array of a store with this layout and ``n_text_tokens`` rows of ``text/tokens``, by path."""
    n, m, p, e, k = layout.n_images, layout.n_texts, layout.num_patches, layout.embed_dim, layout.views
    r, rt = max(1, layout.image_shard_rows), max(1, layout.text_rows_per_unit)
    tdt, isz = layout.token_dtype(), layout.token_itemsize
    int8 = layout.dtype == "int8"
    # Index arrays: plain chunks (no shards, zarr's default codec), written once by the coordinator.
    out: dict[str, ArraySpec] = {
        "image/ids": ArraySpec((n,), "str", "coordinator", chunks=(max(1, min(n, 1 << 16)),)),
        # The SHA-1 of each row's image bytes: an append recognises an image it holds by content, under any id.
        "image/sha1": ArraySpec((n,), "str", "coordinator", chunks=(max(1, min(n, 1 << 16)),)),
        "image/alias_ids": ArraySpec(
            (n_aliases,), "str", "coordinator", chunks=(max(1, min(n_aliases, 1 << 16)),)
        ),
        "image/alias_rows": ArraySpec((n_aliases,), "int64", "coordinator", chunks=(max(1, n_aliases),)),
    }

    def add(name: str, shape: tuple, dtype: str, writer: Writer, shards: tuple, chunks: tuple) -> None:
        out[name] = ArraySpec(shape, dtype, writer, shards, chunks, isz if dtype == tdt else 2)

    ci = layout.image_chunk_rows(p * e * isz)
    for src in token_sources(layout):
        add(f"image/{src}", (n, p, e), tdt, "image", (r, p, e), (ci, p, e))
        if int8:
            add(f"image/{src}{SCALE_SUFFIX}", (n, p), "float16", "image", (r, p), (r, p))
    add("image/pooled", (n, e), "float16", "image", (r, e), (r, e))
    add("image/valid", (n,), "uint8", "image", (r,), (r,))
    if k > 0:
        cv = layout.image_chunk_rows(k * p * e * isz)
        for src in token_sources(layout):
            add(f"views/{src}", (n, k, p, e), tdt, "image", (r, k, p, e), (cv, k, p, e))
            if int8:
                add(f"views/{src}{SCALE_SUFFIX}", (n, k, p), "float16", "image", (r, k, p), (r, k, p))
        add("views/pooled", (n, k, e), "float16", "image", (r, k, e), (r, k, e))
        add("views/boxes", (n, k, 4), "float32", "image", (r, k, 4), (r, k, 4))
        add("views/flip", (n, k), "uint8", "image", (r, k), (r, k))
    s, c = layout.text_shard_rows, layout.text_chunk_rows
    out["text/ids"] = ArraySpec((m,), "str", "coordinator", chunks=(max(1, min(m, 1 << 16)),))
    out["text/lengths"] = ArraySpec((m,), "int32", "coordinator", chunks=(max(1, min(m, 1 << 20)),))
    out["text/offsets"] = ArraySpec((m + 1,), "int64", "coordinator", chunks=(max(1, min(m + 1, 1 << 20)),))
    add("text/tokens", (n_text_tokens, e), tdt, "text", (s, e), (c, e))
    if int8:
        add(f"text/tokens{SCALE_SUFFIX}", (n_text_tokens,), "float16", "text", (s,), (c,))
    add(
        "text/pooled",
        (m, e),
        "float16",
        "text",
        (rt, e),
        (chunk_rows_for(rt, e * 2, layout.text_chunk_bytes), e),
    )
    return out


def unit_arrays(kind: UnitKind, dtype: str, views: int, relevance: Any = ()) -> list[str]:
    """The arrays every unit of ``kind`` writes (and its manifest entry covers), sorted."""
    lay = StoreLayout(0, 0, 1, 1, views=views, relevance_tokens=list(relevance), dtype=dtype)
    return sorted(k for k, a in array_specs(lay, 0).items() if a.writer == kind)


def unit_name(kind: UnitKind, index: int) -> str:
    """The name of a work unit, as its manifest entry ``manifest/<name>.json`` is called."""
    return f"{kind}-{index:06d}"


def planned_units(
    n_images: int,
    n_texts: int,
    image_rows_per_unit: int,
    text_rows_per_unit: int,
    n_image_units: int | None = None,
    n_text_units: int | None = None,
) -> Iterator[tuple[str, UnitKind, int, int]]:
    """(name, kind, first row, end row) of every work unit in order: image units then text units."""
    r, rt = max(1, image_rows_per_unit), max(1, text_rows_per_unit)
    nu = math.ceil(n_images / r) if n_image_units is None else int(n_image_units)
    for u in range(nu):
        yield unit_name("image", u), "image", u * r, min(n_images, (u + 1) * r)
    nt = math.ceil(n_texts / rt) if n_text_units is None else int(n_text_units)
    for u in range(nt):
        yield unit_name("text", u), "text", u * rt, min(n_texts, (u + 1) * rt)


def root_attrs(
    layout: StoreLayout,
    *,
    package_version: str,
    teacher: dict,
    grid: int,
    context_length: int,
    logit_scale: float,
    data: dict,
    fingerprint: dict,
) -> dict:
    """The root group's attributes of a new store (``layout`` and ``complete`` are added by
    ``create_store``, ``extract`` by the run that completes it)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version,
        "teacher": teacher,
        "embed_dim": layout.embed_dim,
        "num_patches": layout.num_patches,
        "grid": grid,
        "context_length": context_length,
        "logit_scale": logit_scale,
        "dtype": layout.dtype,
        "codec": {
            "compressor": layout.compressor,
            "clevel": layout.clevel,
            "shuffle": "byte" if layout.compressor != "none" else None,
            "int8": "per-token symmetric: x ≈ q * tokens_scale" if layout.dtype == "int8" else None,
        },
        "views": layout.views,
        "relevance_tokens": list(layout.relevance_tokens),
        "units": {
            "total": layout.n_image_units + layout.n_text_units,
            "image": layout.n_image_units,
            "text": layout.n_text_units,
            "image_rows_per_unit": layout.image_rows_per_unit,
            "image_rows_per_shard": layout.image_rows_per_shard,
            "text_rows_per_unit": layout.text_rows_per_unit,
            "text_token_rows_per_unit": layout.text_shard_rows,
        },
        "data": data,
        "fingerprint": fingerprint,
    }


def attrs_problems(attrs: dict) -> list[str]:
    """What in a complete store's root attributes no extraction writes (a hand edit, a damaged copy), each
    naming the attribute: readers trust these numbers to shape every read, so a wrong type must stop them
    with the file's name, not in a conversion deep inside."""
    out = []
    # The shape numbers every read needs; the others are checked where present (a store of an older writer,
    # or one made by hand for a test, may lack them, and their readers say so).
    for key in ("embed_dim", "num_patches", "grid", "context_length"):
        v = attrs.get(key)
        if (key != "context_length" or key in attrs) and (
            not isinstance(v, int) or isinstance(v, bool) or v < 1
        ):
            out.append(f"{key} = {v!r} (an integer >= 1)")
    v = attrs.get("views", 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        out.append(f"views = {v!r} (an integer >= 0)")
    v = attrs.get("logit_scale", 1.0)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        out.append(f"logit_scale = {v!r} (a finite number)")
    if not isinstance(attrs.get("dtype"), str):
        out.append(f"dtype = {attrs.get('dtype')!r} (a dtype name)")
    for key in ("units", "data", "fingerprint", "teacher"):
        if not isinstance(attrs.get(key, {}), dict):
            out.append(f"{key} = {attrs.get(key)!r} (an object)")
    rel = attrs.get("relevance_tokens", [])
    if not isinstance(rel, list) or not all(isinstance(r, str) for r in rel):
        out.append(f"relevance_tokens = {rel!r} (a list of names)")
    return out


def damaged_attrs_message(url: str, problems: list[str]) -> str:
    return (
        f"{url}/zarr.json: damaged root attributes: {'; '.join(problems)}; rebuild the store "
        "(python -m stages.extract_teacher ... --overwrite)"
    )
