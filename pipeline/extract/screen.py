"""Screening teacher outputs before they are written: never commit NaN/Inf."""

from __future__ import annotations

import logging

import numpy as np

from .errors import NonFiniteOutput
from .plan import UnitJob

log = logging.getLogger("clip_td.extract")


def nonfinite_rows(a: np.ndarray, block_bytes: int = 1 << 21) -> np.ndarray:
    """bool [len(a)]: which rows of ``a`` hold a NaN or an Inf. float16 is tested on its bits (exponent all
    ones <=> ``bits & 0x7FFF >= 0x7C00``) a few MB of rows at a time into one reused buffer: numpy has no
    native float16 arithmetic, and over a unit's 100 MB of tokens ``isfinite`` took 14× as long and a
    whole-array temporary 3× (its fresh pages)."""
    if a.size == 0:
        return np.zeros(len(a), bool)
    flat = a.reshape(len(a), -1)
    if flat.dtype != np.float16:
        return ~np.isfinite(flat).all(axis=1)
    bits, out = flat.view(np.uint16), np.empty(len(a), bool)
    step = max(1, block_bytes // bits[0].nbytes)
    buf = np.empty((min(step, len(a)), bits.shape[1]), np.uint16)
    for lo in range(0, len(a), step):
        hi = min(len(a), lo + step)
        out[lo:hi] = np.bitwise_and(bits[lo:hi], 0x7FFF, out=buf[: hi - lo]).max(axis=1) >= 0x7C00
    return out


def screen_image_rows(job: UnitJob, arrays: dict[str, np.ndarray], lo: int, hi: int) -> list[str]:
    """Never commit NaN/Inf. Checked on the encoded rows [lo, hi) of the unit's arrays, i.e. what would be
    stored (a finite float32 value beyond float16's range becomes Inf only there). Fails naming the image ids,
    or under ``on_error=skip`` zero-fills the teacher outputs of those rows and marks them invalid, like
    undecodable images; returns the ids so marked."""
    floats = {k: a for k, a in arrays.items() if a.dtype.kind == "f" and not k.endswith("/boxes")}
    bad, where = np.zeros(hi - lo, bool), []
    for key, a in floats.items():
        rows = nonfinite_rows(a[lo:hi])
        if rows.any():
            bad |= rows
            where.append(key)
    if not bad.any():
        return []
    rows = lo + np.flatnonzero(bad)
    ids = [job.items[r][1] for r in rows]
    if job.on_error == "fail":
        raise NonFiniteOutput(job.name, ids, sorted(where))
    for a in floats.values():
        a[rows] = 0
    arrays["image/valid"][rows] = 0
    log.warning("unit %s: non-finite teacher output for %s (zero-filled, image/valid = 0)", job.name, ids)
    return ids


def screen_texts(job: UnitJob, arrays: dict) -> None:
    """``screen_image_rows`` for a text unit: text rows have no validity flag, so a non-finite text always
    fails naming the text."""
    lengths = np.asarray(job.lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    bad_texts, where = set(), []
    for key, (_, a) in arrays.items():
        rows = nonfinite_rows(a) if a.dtype.kind == "f" else np.zeros(len(a), bool)
        if not rows.any():
            continue
        where.append(key)
        if key.startswith("text/tokens"):  # token rows -> the texts owning them
            owner = np.searchsorted(starts, np.flatnonzero(rows), side="right") - 1
            bad_texts |= {int(j) for j in owner if 0 <= j < len(lengths)}
        else:
            bad_texts |= {int(j) for j in np.flatnonzero(rows)}
    if where:
        raise NonFiniteOutput(job.name, [job.texts[j] for j in sorted(bad_texts)], sorted(where), "text")
