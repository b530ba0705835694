"""benchmarks/bench_read.py's byte counter: the read-amplification targets rest on it seeing every read."""

import pytest

from benchmarks.bench_read import ByteCounter
from pipeline import cache as C
from tests.conftest import hand_store


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_byte_counter_sees_the_token_bytes_a_read_needs(tmp_path, compressor):
    # With the training reader's chunk LRU on, shards are read by pipeline/cache/direct.py, not by zarr: a
    # counter that only watched zarr reported 0 bytes, and every amplification target passed with it.
    url = str(tmp_path / "s.zarr")
    hand_store(url, compressor=compressor)
    cache = C.TeacherCache(url)
    cache.configure_reads(chunk_cache_bytes=1 << 20)
    ids = [f"im{i}" for i in range(10)]
    with ByteCounter() as counter:
        cache.image_targets(ids)
    # Beyond the array's metadata (zarr.json, which zarr reads either way): the shard bytes of the float16
    # image tokens of every image; zstd keeps about as many of them (they are noise).
    metadata = (tmp_path / "s.zarr" / "image" / "tokens" / "zarr.json").stat().st_size
    needed = 10 * 4 * 8 * 2
    assert counter.by_array.get("image/tokens", 0) - metadata >= 0.5 * needed, counter.by_array


def test_the_scale_benchmark_counts_each_byte_it_reads_once(tmp_path, monkeypatch):
    # bench_scale once patched direct.py's reads itself on top of ByteCounter, which counts them too: a store
    # read once through an LRU larger than it reported a read amplification of 2.0.
    from benchmarks import bench_scale
    from benchmarks.bench_scale import measure_reader

    monkeypatch.setattr(bench_scale, "BATCH", 2)  # the hand store holds a few images, not batches of 64
    url = str(tmp_path / "s.zarr")
    hand_store(url, compressor="none", logit_scale=100.0)
    r = measure_reader(url, window=2, lru_mb=64, verify=False, max_batches=10_000)
    # What a read needs of the three image arrays, beyond their zarr.json (zarr reads those either way and,
    # at this store's few hundred data bytes, they would swamp the ratio).
    metadata = sum(
        (tmp_path / "s.zarr" / "image" / a / "zarr.json").stat().st_size
        for a in ("tokens", "pooled", "valid")
    )
    assert r["samples"] > 0 and 0.8 <= (r["bytes_read"] - metadata) / r["bytes_needed"] <= 1.2, r


def test_the_scale_benchmarks_host_arms_pool_over_runs_as_pass_pairs(tmp_path):
    """docs/scale.md's one-unit-against-two figure comes from ``bench_scale --summarize``: every pass pair of
    every run, paired in the order measured, and the disk rates' range."""
    import json

    from benchmarks.bench_scale import summarize_host

    paths = []
    for i, (one, two, mb) in enumerate([([0.5, 0.6], [0.4, 0.45], 400.0), ([0.55, 0.5], [0.5, 0.41], 350.0)]):
        sim = {"host_only": {"one_unit": one, "two_units": two}, "disk": {"mb_per_s": mb}}
        path = tmp_path / f"run{i}.json"
        path.write_text(json.dumps({"measurements": {"extraction": {"gpu_teacher_sim": sim}}}))
        paths.append(str(path))
    got = summarize_host(paths)
    assert got["one_minus_two"]["n"] == 4 and abs(got["one_minus_two"]["mean"] - 0.0975) < 1e-9
    assert got["one_minus_two"]["ci95"][0] < 0.0975 < got["one_minus_two"]["ci95"][1]
    assert got["one_unit_ms"] == [0.5, 0.6] and got["two_units_ms"] == [0.4, 0.5]
    assert got["disk_mb_per_s"] == [350.0, 400.0]
