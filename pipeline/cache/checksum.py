"""crc32 of stored rows, and combining the crc32s of consecutive row blocks (a unit's shards are checksummed
by whichever writer thread writes them; its manifest entry keeps one crc per array)."""

from __future__ import annotations

import functools

import numpy as np

# ISA-L's crc32 (python-isal): zlib's polynomial and values, computed with PCLMUL. Every chunk a reader hands
# out for the first time and every shard a writer writes is hashed; with it a first epoch's reader CPU per
# sample fell 41-43% against zlib's crc32 in the same runs (docs/scale.md). It releases the GIL, as zlib's
# does, so the prefetch and writer threads run beside it.
from isal.isal_zlib import crc32 as crc32_update


def checksum(a: np.ndarray) -> str:
    """crc32 of the array's bytes as stored (C order, store dtype)."""
    return f"{crc32(a):08x}"


def crc32(a: np.ndarray) -> int:
    """``checksum`` as an int, to chain over row blocks with ``crc32_combine``."""
    # A flat uint8 view, not tobytes(): the copy took two thirds of the time on a unit's 100 MB of tokens.
    return crc32_update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _gf2_times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The operator ``a ∘ b`` (apply b, then a)."""
    return tuple(_gf2_times(a, col) for col in b)


@functools.lru_cache(maxsize=64)
def _crc32_shift(n_bytes: int) -> tuple[int, ...]:
    """The GF(2) operator that appends n_bytes zero bytes to a crc32 register (zlib's crc32_combine method,
    composed once per length and cached: a unit's full shards all have the same length)."""
    op = (0xEDB88320, *(1 << k for k in range(31)))  # one zero bit
    for _ in range(3):
        op = _gf2_compose(op, op)  # one zero byte
    acc = tuple(1 << k for k in range(32))  # identity
    while n_bytes:
        if n_bytes & 1:
            acc = _gf2_compose(op, acc)
        n_bytes >>= 1
        if n_bytes:
            op = _gf2_compose(op, op)
    return acc


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A + B from crc32(A), crc32(B) and len(B) in bytes (zlib has it in C, Python's zlib does not
    expose it): a unit's shards are checksummed by whichever writer thread writes them, and the unit's record
    keeps one crc per array over its rows in order, as ``verify`` recomputes it."""
    return (_gf2_times(_crc32_shift(len2), crc1) ^ crc2) if len2 > 0 else crc1
