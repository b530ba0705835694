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
