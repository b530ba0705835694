"""Creating a store: every group and array the schema lists, and what the coordinator knows up front."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import zarr

from .codec import compressors_for
from .errors import CacheFormatError
from .layout import StoreLayout
from .schema import ALIAS_ROWS_KEPT, FORMAT, FORMAT_VERSION, MANIFEST, array_specs
from .store import foreign_message, inspect_location, open_group


def index_writes() -> object:
    """Context for writing the index arrays: every chunk is written, even one that holds only the fill
    value. zarr skips such a chunk by default, and then a chunk lost later cannot be told from one never
    written: a lost ``image/alias_rows`` chunk would read as every alias pointing at row 0, a valid row."""
    return zarr.config.set({"array.write_empty_chunks": True})


def create_store(
    url: str,
    layout: StoreLayout,
    attrs: dict,
    image_ids: Sequence[str],
    text_ids: Sequence[str],
    text_lengths: Sequence[int],
    text_offsets: np.ndarray,
    alias_ids: Sequence[str] = (),
    alias_rows: Sequence[int] = (),
    image_sha1: Sequence[str] | None = None,
) -> zarr.Group:
    """Create every group and array, and write what the coordinator knows up front (ids, lengths, offsets,
    attrs). Units fill the rest. Metadata is only ever written here (and by ``grow.extend_store``), by one
    process. ``image_sha1``: each row's image SHA-1, what lets an append recognise images the store holds."""
    # Only ever in a new or empty folder: whatever else is there was not made by this call and is not deleted
    # (the caller removes a store it has recognised as ours first).
    kind, _, why = inspect_location(url)
    if kind == "foreign":
        raise CacheFormatError(foreign_message(url, why))
    if kind == "cache":
        raise CacheFormatError(f"{url}: a teacher cache is already there; remove it first (remove_store)")
    g = open_group(
        url, mode="a", attributes={"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False}
    )
    n_tok = int(text_offsets[-1]) if len(text_offsets) else 0
    values = {
        "image/ids": (list(image_ids), object),
        "image/sha1": (list(image_sha1 or [""] * len(image_ids)), object),
        "image/alias_ids": (list(alias_ids), object),
        "image/alias_rows": (alias_rows, np.int64),
        "text/ids": (list(text_ids), object),
        "text/lengths": (text_lengths, np.int32),
        "text/offsets": (text_offsets, np.int64),
    }
    for name, spec in array_specs(layout, n_tok, len(alias_ids)).items():
        dtype = str if spec.dtype == "str" else spec.dtype
        if spec.shards is None:
            g.create_array(name, shape=spec.shape, dtype=dtype, chunks=spec.chunks)
        else:
            # zarr rejects zero-length chunk sides; an empty array still gets a valid (unused) grid.
            g.create_array(
                name,
                shape=spec.shape,
                dtype=dtype,
                chunks=tuple(max(1, c) for c in spec.chunks),
                shards=tuple(max(1, s) for s in spec.shards),
                compressors=compressors_for(layout.compressor, layout.clevel, spec.itemsize),
                fill_value=0,
            )
        if name in values and len(values[name][0]):
            with index_writes():
                g[name][:] = np.asarray(values[name][0], dtype=values[name][1])
    g.create_group(MANIFEST, attributes={"what": "one JSON per committed work unit: <unit>.json"})
    kept = {ALIAS_ROWS_KEPT: True} if len(alias_ids) else {}
    g.attrs.update({**attrs, "layout": layout.to_json(), "complete": False, **kept})
    return g
