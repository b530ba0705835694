"""The training reader's chunk LRU (student.targets.CachedTargets): identical targets to the plain reader
for any batch order, under eviction, and each inner chunk decoded once while it stays cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import cache as C
from student.targets import CachedTargets
from tests.conftest import hand_store as _store_by_hand


def _hand_store(url: str, dtype: str = "float16") -> dict:
    h = _store_by_hand(url, dtype)
    C.open_group(url, mode="r+").attrs["logit_scale"] = (
        100.0  # CachedTargets reads it; the hand store has none
    )
    return h


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("budget", [1 << 20, 100])  # holds the whole store / evicts at every put
def test_chunk_cache_returns_what_the_store_holds(tmp_path, dtype, budget):
    url = str(tmp_path / "s.zarr")
    h = _hand_store(url, dtype)
    plain, cached = C.TeacherCache(url), CachedTargets(C.TeacherCache(url), chunk_cache_bytes=budget)
    rng = np.random.default_rng(0)
    for _ in range(20):  # unsorted, repeated, across shards and inner chunks
        ids = [f"im{i}" for i in rng.integers(0, 10, size=rng.integers(1, 8))] + ["alias9"]
        want, got = plain.image_targets(ids), cached.images(ids, None)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        texts = [h["texts"][i] for i in rng.integers(0, 5, size=rng.integers(1, 6))]
        want, got = plain.text_targets(texts), cached.texts(texts)
        assert torch.equal(want["pooled"], got["pooled"]) and torch.equal(want["lengths"], got["lengths"])
        assert all(torch.equal(a, b) for a, b in zip(want["tokens"], got["tokens"], strict=True))
        pooled_only = cached.texts(texts, tokens=False)  # the §5 candidates: no token rows read
        assert "tokens" not in pooled_only and torch.equal(pooled_only["pooled"], want["pooled"])
        assert torch.equal(pooled_only["lengths"], want["lengths"])
    lru = cached.cache.group.lru
    assert lru.bytes <= max(budget, max(a.nbytes for a in lru.chunks.values()))


def test_chunk_cache_decodes_each_chunk_once(tmp_path):
    url = str(tmp_path / "s.zarr")
    _hand_store(url)
    cached = CachedTargets(C.TeacherCache(url))
    ids = [f"im{i}" for i in range(10)]
    cached.images(ids, None)
    lru = cached.cache.group.lru
    misses = lru.misses
    for _ in range(3):
        cached.images(ids[::-1], None)
    assert lru.misses == misses and lru.hits > 0  # everything came from the LRU the second time round
    off = CachedTargets(C.TeacherCache(url), chunk_cache_bytes=0)
    assert not hasattr(off.cache.group, "lru")  # 0 turns the LRU off: the plain zarr group


def test_epoch_order_random_is_the_plain_permutation_and_chunked_stays_local():
    from student.data import epoch_order

    n = 500
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert np.array_equal(epoch_order(a, None, n), b.permutation(n))  # random order: what it always was
    groups = np.random.default_rng(1).integers(0, 40, n)  # 40 chunks, instances in no particular row order
    rng = np.random.default_rng(7)
    first, second = epoch_order(rng, groups, n, window=4), epoch_order(rng, groups, n, window=4)
    for order in (first, second):
        assert np.array_equal(np.sort(order), np.arange(n))  # every instance once per epoch
        # Each window's instances are contiguous: the groups seen so far change in runs of 4.
        g = groups[order]
        starts = [0] + [i for i in range(1, n) if not set(g[i:]) & set(g[:i]) and g[i] != g[i - 1]]
        for lo, hi in zip(starts, starts[1:] + [n], strict=True):
            assert len(set(g[lo:hi])) <= 4
        assert len(starts) == 10  # 40 groups / 4 per window
    assert not np.array_equal(first, second)  # a new draw every epoch
    again = np.random.default_rng(7)
    assert np.array_equal(epoch_order(again, groups, n, window=4), first)  # seeded
