"""The training reader's chunk LRU (student.targets.CachedTargets): identical targets to the plain reader
for any batch order, under eviction, and each inner chunk decoded once while it stays cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import cache as C
from student.targets import CachedTargets
from tests.conftest import hand_store


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("budget", [1 << 20, 100])  # holds the whole store / evicts at every put
@pytest.mark.parametrize("threads", [1, 3])  # on the caller / a pool decoding a batch's missing chunks
# zstd: decoded chunks in the LRU; none: rows read from the shard files into the batch once checked
@pytest.mark.parametrize("compressor", ["zstd", "none"])
@pytest.mark.parametrize("verify", [True, False])
def test_chunk_cache_returns_what_the_store_holds(tmp_path, dtype, budget, threads, compressor, verify):
    url = str(tmp_path / "s.zarr")
    h = hand_store(url, dtype, compressor, logit_scale=100.0)
    plain = C.TeacherCache(url)
    cached = CachedTargets(C.TeacherCache(url), chunk_cache_bytes=budget, read_threads=threads, verify=verify)
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
    assert lru.bytes <= max(budget, max((a.nbytes for a in lru.chunks.values()), default=0))


def test_chunk_cache_decodes_each_chunk_once(tmp_path):
    url = str(tmp_path / "s.zarr")
    hand_store(url, logit_scale=100.0)
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


# ------------------------------------------------------------------------------- checksum-on-read by block


def _extract(root, **cache) -> str:
    """A store from a real extraction: one image unit of 8 rows, one row per inner chunk of image/tokens."""
    import dataclasses

    from pipeline import extract as X
    from pipeline.config import CacheParams
    from tests.conftest import build_dataset, tiny_teacher_files

    torch.set_num_threads(1)
    cfg, ckpt = tiny_teacher_files(root)
    ds = build_dataset(root / "train", 8)
    cp = dataclasses.replace(
        CacheParams(), image_rows_per_unit=8, text_rows_per_unit=8, batch_size=4, num_workers=0,
        **{"target_chunk_bytes": 2048, **cache},
    )  # fmt: skip
    url = str(root / "s.zarr")
    X.extract(
        [ds], url, X.TeacherSpec(str(cfg), str(ckpt), "fp32", "cpu"), cp, scheduler="sync", progress=False
    )
    return url


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> str:
    return _extract(tmp_path_factory.mktemp("blocks"), compressor="zstd")


@pytest.fixture(scope="module")
def extracted_raw(tmp_path_factory) -> str:
    """The same extraction, stored uncompressed (``cache.compressor: none``)."""
    return _extract(tmp_path_factory.mktemp("raw"), compressor="none")


def _copy(url: str, dst) -> str:
    import shutil

    shutil.copytree(url, dst)
    return str(dst)


def test_manifest_keeps_a_crc_per_inner_chunk_that_chains_to_the_unit_crc(extracted):
    g = C.open_group(extracted, mode="r")
    for rec in C.committed_units(extracted).values():
        for key, info in rec["arrays"].items():
            (lo, hi), rows = info["region"], info["block_rows"]
            assert rows == g[key].chunks[0]
            starts = range(lo, hi, rows)
            assert info["block_crc32"] == [C.checksum(g[key][s : min(hi, s + rows)]) for s in starts]
            crc = 0
            for s, c in zip(starts, info["block_crc32"], strict=True):
                part = g[key][s : min(hi, s + rows)]
                crc = int(c, 16) if s == lo else C.crc32_combine(crc, int(c, 16), part.nbytes)
            assert f"{crc:08x}" == info["crc32"] == C.checksum(g[key][lo:hi])


def _tamper(url: str, row: int) -> list[str]:
    """Rewrite image/tokens row ``row`` (the manifest untouched); the image ids by row."""
    g = C.open_group(url, mode="r+")
    g["image/tokens"][row : row + 1] = g["image/tokens"][row : row + 1] + np.float16(1)
    return g["image/ids"][:].tolist()


def test_training_reads_check_the_chunks_they_read_not_the_whole_unit(extracted, tmp_path):
    url = _copy(extracted, tmp_path / "s.zarr")
    ids = _tamper(url, 6)
    src = CachedTargets(C.TeacherCache(url))  # verify on, as training reads
    clean = src.images(ids[:4], None)  # rows 0-3: their chunks are checked, row 6's is not read
    assert torch.equal(clean["tokens"], C.TeacherCache(extracted).image_targets(ids[:4])["tokens"])
    with pytest.raises(
        C.CacheCorrupt, match=r"image/tokens rows \[0, 8\) of unit image-000000: rows \[6, \d+\)"
    ):
        src.images([ids[6]], None)
    plain = CachedTargets(C.TeacherCache(url), chunk_cache_bytes=0)  # without the LRU: the same check
    plain.images(ids[:4], None)
    with pytest.raises(C.CacheCorrupt, match=r"rows \[6, \d+\) have crc32"):
        plain.images(ids[5:8], None)


def test_stores_without_block_crcs_check_the_whole_unit(extracted, tmp_path):
    url = _copy(extracted, tmp_path / "s.zarr")
    ids = _tamper(url, 6)
    for name, rec in C.committed_units(url).items():  # as a store written before block crcs
        for info in rec["arrays"].values():
            del info["block_rows"], info["block_crc32"]
        C.commit_unit(url, name, rec)
    with pytest.raises(C.CacheCorrupt, match=r"image/tokens rows \[0, 8\) of unit image-000000 have crc32"):
        CachedTargets(C.TeacherCache(url)).images(ids[:1], None)


def test_float16_targets_are_the_stored_values_for_a_device_to_convert(tmp_path):
    url = str(tmp_path / "s.zarr")
    h = hand_store(url, logit_scale=100.0)
    f32 = CachedTargets(C.TeacherCache(url))
    f16 = CachedTargets(C.TeacherCache(url), token_dtype=torch.float16)
    ids, texts = [f"im{i}" for i in (3, 0, 7, 3)], [h["texts"][i] for i in (1, 4, 1)]
    want, got = f32.images(ids, None), f16.images(ids, None)
    assert got["tokens"].dtype == torch.float16 and got["pooled"].dtype == torch.float32
    assert torch.equal(got["tokens"].float(), want["tokens"]) and torch.equal(got["pooled"], want["pooled"])
    want, got = f32.texts(texts), f16.texts(texts)
    assert all(g.dtype == torch.float16 for g in got["tokens"])
    assert all(torch.equal(a.float(), b) for a, b in zip(got["tokens"], want["tokens"], strict=True))
    with pytest.raises(ValueError, match="token_dtype"):
        CachedTargets(C.TeacherCache(url), token_dtype=torch.bfloat16)


def test_direct_chunk_reads_equal_zarr_including_unstored_chunks(tmp_path):
    from pipeline.cache.direct import DirectArray, direct_array

    url = str(tmp_path / "s.zarr")
    hand_store(url, "int8", logit_scale=100.0)
    g = C.open_group(url, mode="r")
    for name in ("image/tokens", "image/tokens_scale", "image/pooled", "text/tokens", "text/pooled"):
        a = g[name]
        d = direct_array(a)
        assert isinstance(d, DirectArray), name  # the store's own layout is one it reads
        cr = int(a.chunks[0])
        for lo in range(0, a.shape[0], cr):  # every inner chunk, text slack (not stored) included
            hi = min(a.shape[0], lo + cr)
            got, want = d[lo:hi], a[lo:hi]
            assert got.dtype == want.dtype and np.array_equal(got, want), (name, lo)
        assert np.array_equal(d[1:3], a[1:3])  # not chunk-aligned: zarr's read


def test_uncompressed_store_checks_each_chunk_once_then_reads_rows_straight_into_the_batch(
    extracted_raw, extracted, tmp_path
):
    url = _copy(extracted_raw, tmp_path / "s.zarr")
    ids = _tamper(url, 6)
    want = C.TeacherCache(extracted).image_targets(ids)  # the zstd store's values: the codec changes nothing
    src = CachedTargets(C.TeacherCache(url))  # verify on, as training reads
    lru = src.cache.group.lru
    got = src.images(ids[:4], None)
    assert all(torch.equal(got[k], want[k][:4]) for k in got)
    first = lru.misses
    assert first > 0 and lru.bytes == 0  # chunks read whole once to be checked; no decoded copies kept
    back = [3, 2, 1, 0]
    again = src.images(
        [ids[i] for i in back], None
    )  # checked already: rows come from the file into the batch
    assert all(torch.equal(again[k], want[k][back]) for k in got)
    assert lru.misses == first and lru.hits > 0
    with pytest.raises(
        C.CacheCorrupt, match=r"image/tokens rows \[0, 8\) of unit image-000000: rows \[6, \d+\) have crc32"
    ):
        src.images([ids[7], ids[6]], None)
    unchecked = CachedTargets(C.TeacherCache(url), verify=False).images([ids[6], ids[0]], None)
    assert not torch.equal(unchecked["tokens"][0], want["tokens"][6])  # the tampered row, as stored
    assert torch.equal(unchecked["tokens"][1], want["tokens"][0])


def test_uncompressed_first_reads_hash_the_rows_a_batch_does_not_ask_for(tmp_path_factory, extracted):
    url = _extract(tmp_path_factory.mktemp("raw4"), compressor="none", target_chunk_bytes=4096)
    assert C.open_group(url, mode="r")["image/tokens"].chunks[0] == 4  # rows 4-7 share an inner chunk
    want = C.TeacherCache(extracted).image_targets(C.TeacherCache(url).group["image/ids"][:].tolist())
    src = CachedTargets(C.TeacherCache(url))
    ids = _tamper(url, 6)
    got = src.images([ids[1], ids[2], ids[1]], None)  # rows 0 and 3 are hashed too, not handed out
    assert all(torch.equal(got[k], want[k][[1, 2, 1]]) for k in got)
    with pytest.raises(
        C.CacheCorrupt, match=r"image/tokens rows \[0, 8\) of unit image-000000: rows \[4, 8\)"
    ):
        src.images([ids[5]], None)  # row 6 is not asked for, but its chunk is checked


@pytest.mark.parametrize("compressor", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_direct_shard_writes_are_the_bytes_zarr_writes(tmp_path, compressor, dtype):
    """Image units write whole shards past zarr (``DirectArray.write_rows``): the files must be zarr's own,
    the array's last, partial shard and partial inner chunk included."""
    import zarr

    from pipeline.cache.direct import DirectArray, direct_array

    shape = (21, 4, 8) if dtype == "float16" else (21,)
    data = (np.random.default_rng(0).normal(size=shape) * 20).astype(dtype)
    made = []
    for name in ("zarr", "direct"):
        g = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w")
        made.append(
            g.create_array(
                "x", shape=shape, dtype=dtype, chunks=(3, *shape[1:]), shards=(12, *shape[1:]), fill_value=0,
                compressors=C.compressors_for(compressor, 3, np.dtype(dtype).itemsize),
            ).with_config({"write_empty_chunks": True})
        )  # fmt: skip
    by_zarr, d = made[0], direct_array(made[1])
    assert isinstance(d, DirectArray) and d.writable
    assert not d.write_rows(3, data[3:15])  # not whole shards: left to zarr, nothing written
    assert not list((tmp_path / "direct.zarr" / "x").rglob("c*"))
    for lo, hi in ((0, 12), (12, 21)):
        by_zarr[lo:hi] = data[lo:hi]
        crcs = d.write_rows(lo, data[lo:hi])  # and each inner chunk's crc32, for the manifest
        assert crcs == [C.crc32(data[c : min(hi, c + 3)]) for c in range(lo, hi, 3)]
    files = sorted(
        p.relative_to(tmp_path / "zarr.zarr") for p in (tmp_path / "zarr.zarr").rglob("*") if p.is_file()
    )
    assert len([f for f in files if f.name != "zarr.json"]) == 2
    for f in files:
        assert (tmp_path / "direct.zarr" / f).read_bytes() == (tmp_path / "zarr.zarr" / f).read_bytes(), f
    assert np.array_equal(zarr.open_array(str(tmp_path / "direct.zarr" / "x"))[:], data)
    assert not list((tmp_path / "direct.zarr").rglob("*.partial"))  # written beside, renamed into place


@pytest.mark.parametrize("lost", ["folder", "entry"])
def test_a_store_whose_manifest_lost_planned_units_is_refused_at_open(extracted, tmp_path, lost):
    """The whole manifest/ lost left no array covered, so checked reads read everything unchecked (a lost
    shard then read as zeros); one entry lost failed only once a read reached its rows."""
    import shutil
    from pathlib import Path

    url = _copy(extracted, tmp_path / "s.zarr")
    if lost == "folder":
        shutil.rmtree(Path(url) / "manifest")
    else:
        (Path(url) / "manifest" / "text-000000.json").unlink()
    n = len(C.committed_units(extracted)) if lost == "folder" else 1
    first = "image-000000" if lost == "folder" else "text-000000"
    with pytest.raises(
        C.CacheCorrupt,
        match=rf"^{url}: {n} unit\(s\) its segments plan have no manifest entry \(first: {first};",
    ):
        CachedTargets(C.TeacherCache(url))
    # A store made by hand plans no units: it reads as before, checking what its entries cover.
    hand = str(tmp_path / "hand.zarr")
    want = hand_store(hand, logit_scale=100.0)
    got = CachedTargets(C.TeacherCache(hand)).images([f"im{i}" for i in range(10)], None)["tokens"]
    assert np.allclose(got.numpy(), want["img"], atol=1e-2)
