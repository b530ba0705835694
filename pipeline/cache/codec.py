"""How token states are encoded in the store: float16, or per-token int8 with a float16 scale; and the
Blosc compressors."""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec

from .schema import SCALE_SUFFIX


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8: q = round(x / s), s = max|x| / 127 over the last axis, s stored as float16.
    The rounding uses the float16 scale actually stored, so dequantisation sees no second rounding error."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint(np.divide(x, s, out=np.zeros_like(x), where=s > 0)), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


def encode_tokens(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Token states (float32, last axis E) in the store's encoding: {"": values} plus {"_scale": scale} for int8."""
    if dtype == "int8":
        q, s = quantize_int8(x)
        return {"": q, SCALE_SUFFIX: s}
    return {"": np.asarray(x).astype(np.float16)}


def decode_tokens(values: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    if values.dtype == np.int8:
        return dequantize_int8(values, scale)
    return values.astype(np.float32)


def reconstruction_cosine(x: np.ndarray, encoded: dict[str, np.ndarray]) -> np.ndarray:
    """Per-token cosine between the float32 teacher output and what the store gives back (all-zero tokens,
    e.g. zero-filled invalid images, are left out)."""
    y = decode_tokens(encoded[""], encoded.get(SCALE_SUFFIX))
    x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    ok = (nx > 0) & (ny > 0)
    return (x[ok] * y[ok]).sum(1) / (nx[ok] * ny[ok])


def compressors_for(compressor: str, clevel: int, itemsize: int) -> list:
    if compressor == "none":
        return []
    # Byte shuffle groups the high and low bytes of float16 values, which is what makes zstd/lz4 pay off.
    return [BloscCodec(cname=compressor, clevel=clevel, shuffle="shuffle", typesize=itemsize)]
