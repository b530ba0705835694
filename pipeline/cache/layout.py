"""Store layout arithmetic: array sizes, unit boundaries, shard and inner-chunk rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StoreLayout:
    """Everything that fixes array shapes, chunking and unit boundaries."""

    n_images: int
    n_texts: int
    embed_dim: int
    num_patches: int
    views: int = 0
    relevance_tokens: list[str] = field(default_factory=list)
    dtype: str = "float16"
    compressor: str = "zstd"
    clevel: int = 3
    image_rows_per_unit: int = 512
    text_rows_per_unit: int = 4096
    target_chunk_bytes: int = 1 << 20
    image_rows_per_shard: int = 0  # divides image_rows_per_unit; 0 = one shard per unit (stores before it)
    text_chunk_bytes: int = 1 << 15
    text_shard_rows: int = 1  # S: token rows owned by one text unit (set by ``text_token_layout``)
    text_chunk_rows: int = 1

    @property
    def n_image_units(self) -> int:
        return math.ceil(self.n_images / self.image_rows_per_unit)

    @property
    def n_text_units(self) -> int:
        return math.ceil(self.n_texts / self.text_rows_per_unit)

    @property
    def token_itemsize(self) -> int:
        return 1 if self.dtype == "int8" else 2

    def token_dtype(self) -> str:
        return "int8" if self.dtype == "int8" else "float16"

    @property
    def image_shard_rows(self) -> int:
        return self.image_rows_per_shard or self.image_rows_per_unit

    def image_chunk_rows(self, row_bytes: int) -> int:
        return chunk_rows_for(self.image_shard_rows, row_bytes, self.target_chunk_bytes)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def chunk_rows_for(shard_rows: int, row_bytes: int, target_bytes: int) -> int:
    """Inner chunk rows: the smallest divisor of the shard's rows whose chunk reaches target_bytes (zarr needs
    chunks to tile a shard exactly), or the whole shard when even the shard is smaller than the target."""
    want = max(1, math.ceil(target_bytes / max(1, row_bytes)))
    if want >= shard_rows:
        return shard_rows
    return next(d for d in range(want, shard_rows + 1) if shard_rows % d == 0)


def text_token_layout(lengths: Sequence[int], rows_per_unit: int, row_bytes: int, target_bytes: int) -> tuple:
    """(offsets [M+1], shard rows S, chunk rows c). Each text unit's tokens start at unit·S, S = the largest
    unit's token count rounded up to whole inner chunks of ≈ target_bytes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    m = len(lengths)
    n_units = max(1, math.ceil(m / rows_per_unit))
    per_unit = [int(lengths[u * rows_per_unit : (u + 1) * rows_per_unit].sum()) for u in range(n_units)]
    most = max(1, max(per_unit))
    c = min(most, max(1, math.ceil(target_bytes / max(1, row_bytes))))
    s = math.ceil(most / c) * c
    offsets = np.zeros(m + 1, dtype=np.int64)
    for u in range(n_units):
        lo, hi = u * rows_per_unit, min(m, (u + 1) * rows_per_unit)
        if hi > lo:
            offsets[lo:hi] = u * s + np.cumsum(lengths[lo:hi]) - lengths[lo:hi]
    offsets[m] = n_units * s if m else 0
    return offsets, s, c
