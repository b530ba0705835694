"""The teacher-cache store itself (pipeline.cache): layout arithmetic, int8 quantisation, shards owned by
one writer with unit slack left unstored, the manifest, fingerprints and the batched reader. No teacher:
the arrays are written by hand the way extraction units write them."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from pipeline import cache as C
from tests.conftest import hand_store


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ arithmetic


def test_chunk_rows_tile_the_shard_and_reach_the_target():
    assert C.chunk_rows_for(512, 64 * 128 * 2, 1 << 20) == 64  # 16 KiB rows -> 1 MiB chunks
    assert C.chunk_rows_for(10, 1000, 1 << 20) == 10  # shard smaller than the target: one chunk
    assert C.chunk_rows_for(12, 100, 500) == 6  # want 5 rows; 6 is the smallest divisor of 12 that reaches it
    assert C.chunk_rows_for(7, 100, 150) == 7  # a prime shard has no smaller tiling chunk


def test_text_token_layout_starts_every_unit_on_its_shard():
    lengths = [3, 5, 2, 7, 1]
    offsets, s, c = C.text_token_layout(lengths, rows_per_unit=2, row_bytes=10, target_bytes=40)
    # unit sums 8, 9, 1 -> largest 9, chunks of 4 rows -> S = 12 rows per unit shard
    assert (s, c) == (12, 4)
    assert offsets.tolist() == [0, 3, 12, 14, 24, 36]
    for i, n in enumerate(lengths):
        assert offsets[i] + n <= offsets[i + 1]


def test_int8_per_token_quantisation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16, 64)).astype(np.float32) * rng.uniform(0.01, 20, size=(50, 16, 1))
    x[3, 2] = 0.0  # an all-zero token stays exactly zero
    q, s = C.quantize_int8(x)
    assert q.dtype == np.int8 and s.dtype == np.float16 and s.shape == (50, 16)
    assert np.abs(q).max() <= 127 and (np.abs(q).max(-1) >= 126).sum() > 0.9 * q.shape[0] * q.shape[1]
    y = C.dequantize_int8(q, s)
    assert np.all(y[3, 2] == 0)
    cos = C.reconstruction_cosine(x, {"": q, "_scale": s})
    print(f"int8 reconstruction cosine on gaussian tokens: mean {cos.mean():.5f} min {cos.min():.5f}")
    assert cos.min() > 0.99 and len(cos) == 50 * 16 - 1
    assert C.reconstruction_cosine(x, C.encode_tokens(x, "float16")).min() > 0.9999


# ----------------------------------------------------------------------------------------- a hand store


def _stored_inner_chunks(shard_file: str, n_chunks: int) -> int:
    """Inner chunks present in a shard: its index (at the end, before a crc32c) holds (offset, nbytes)
    pairs, 2**64-1 for chunks that were never stored."""
    with open(shard_file, "rb") as f:
        raw = f.read()
    index = np.frombuffer(raw[-(n_chunks * 16 + 4) : -4], dtype="<u8").reshape(n_chunks, 2)
    return int((index[:, 0] != np.iinfo(np.uint64).max).sum())


def test_store_layout_shards_and_unstored_slack(tmp_path):
    url = str(tmp_path / "s.zarr")
    h = hand_store(url)
    g = zarr.open_group(url, mode="r")
    assert g["image/tokens"].shape == (10, 4, 8) and g["image/tokens"].shards == (4, 4, 8)
    assert g["image/tokens"].dtype == np.float16 and g["image/pooled"].shards == (4, 8)
    # text shards: S rows per unit; inner chunks of 4 rows (≈ the 64-byte target)
    s, c = h["layout"].text_shard_rows, h["layout"].text_chunk_rows
    assert (s, c) == (12, 4) and g["text/tokens"].shards == (s, 8) and g["text/tokens"].chunks == (c, 8)
    assert g["text/tokens"].shape == (3 * s, 8) and g["text/offsets"][-1] == 3 * s
    codec = g["text/tokens"].metadata.to_dict()["codecs"][0]["configuration"]["codecs"][1]
    assert codec["name"] == "blosc" and codec["configuration"]["cname"] == "zstd"
    assert codec["configuration"]["shuffle"] == "shuffle"
    # unit 2 holds a single 2-token text: 1 inner chunk stored, the 2 chunks of pure slack are not
    assert _stored_inner_chunks(str(tmp_path / "s.zarr/text/tokens/c/2/0"), s // c) == 1
    assert _stored_inner_chunks(str(tmp_path / "s.zarr/text/tokens/c/1/0"), s // c) == 3  # 6+2 = 8 of 12 rows
    assert C.bytes_on_disk(url) > 0


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_reader_shuffled_batches(tmp_path, dtype):
    url = f"file://{tmp_path}/r.zarr"
    h = hand_store(url, dtype)
    tc = C.TeacherCache(url)
    tol = 1e-2 if dtype == "float16" else 5e-2
    order = [7, 0, 9, 7, 3, 2]  # unsorted, repeated, spanning the three shards
    out = tc.image_targets([f"im{i}" for i in order])
    assert out["tokens"].dtype == torch.float32 and out["tokens"].shape == (6, 4, 8)
    np.testing.assert_allclose(out["tokens"].numpy(), h["img"][order], atol=tol * np.abs(h["img"]).max())
    np.testing.assert_allclose(out["pooled"].numpy(), h["pooled"][order], atol=1e-2)
    assert torch.equal(tc.image_targets(["alias9"])["tokens"][0], tc.image_targets(["im9"])["tokens"][0])
    pick = [3, 0, 3, 4, 1]
    tt = tc.text_targets([h["texts"][i] for i in pick])
    assert tt["lengths"].tolist() == [8, 3, 8, 2, 6]
    for j, i in enumerate(pick):
        np.testing.assert_allclose(tt["tokens"][j].numpy(), h["txt"][i], atol=tol * np.abs(h["txt"][i]).max())
    np.testing.assert_allclose(tt["pooled"].numpy(), h["tpooled"][pick], atol=1e-2)
    with pytest.raises(KeyError, match="'im99' is not in the teacher cache"):
        tc.image_targets(["im99"])
    with pytest.raises(ValueError, match="relevance source 'value' not cached"):
        tc.image_targets(["im1"], relevance="value")


def test_read_rows_dedupes_sorts_and_scatters(tmp_path):
    g = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    a = g.create_array("a", shape=(100, 3), chunks=(10, 3), dtype="int32")
    a[:] = np.arange(300).reshape(100, 3)
    for rows in ([5], [5, 6, 7], [99, 0, 42, 0, 43], []):
        np.testing.assert_array_equal(C.read_rows(a, np.array(rows, dtype=np.int64)), a[:][rows])


def test_reader_refuses_incomplete_foreign_and_missing(tmp_path):
    url = str(tmp_path / "s.zarr")
    hand_store(url)
    C.open_group(url, mode="r+").attrs["complete"] = False
    with pytest.raises(C.CacheFormatError, match=r"incomplete \(3/6 units committed\)"):
        C.TeacherCache(url)
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(C.CacheFormatError, match="not a teacher cache"):
        C.TeacherCache(str(tmp_path / "other.zarr"))
    with pytest.raises(C.CacheFormatError, match="no teacher cache here"):
        C.TeacherCache(str(tmp_path / "nothing.zarr"))


@pytest.mark.parametrize(("damage", "says"), [
    ("offsets-chunk-lost", r"text/offsets: offsets\[0\] \+ text/lengths\[0\] = 3 > offsets\[1\] = 0"),
    ("lengths-chunk-lost", r"text/lengths: text row 0 has length 0"),
    ("offsets-past-tokens", r"text/offsets: offsets\[5\] = 999 > \d+ rows of text/tokens"),
    ("offsets-decrease", r"text/offsets decrease at text 2"),
    ("alias-out-of-range", r"image/alias_rows: alias 'alias9' points at row 10, outside \[0, 10\)"),
    ("alias-negative", r"image/alias_rows: alias 'alias9' points at row -1"),
    ("alias-chunk-lost", r"image/alias_rows: a chunk is missing"),
])  # fmt: skip
def test_reader_refuses_an_index_that_contradicts_the_layout(tmp_path, damage, says):
    """No checksum covers the index arrays, and a lost chunk of them reads as zeros: every text then read
    another's token rows, through checked reads too. Their consistency is checked at open instead."""
    import shutil

    url = str(tmp_path / "s.zarr")
    hand_store(url)
    C.TeacherCache(url)  # intact: opens
    g = C.open_group(url, mode="r+")
    if damage == "alias-chunk-lost":
        shutil.rmtree(tmp_path / "s.zarr" / "image" / "alias_rows" / "c")
    elif damage.endswith("chunk-lost"):
        shutil.rmtree(tmp_path / "s.zarr" / "text" / damage.split("-")[0] / "c")
    elif damage == "offsets-past-tokens":
        g["text/offsets"][5] = 999
    elif damage == "offsets-decrease":
        g["text/offsets"][3] = 1
    else:
        g["image/alias_rows"][0] = 10 if damage == "alias-out-of-range" else -1
    with pytest.raises(C.CacheCorrupt, match=rf"^{url}: {says}.* \(the index was damaged after extraction\)"):
        C.TeacherCache(url)


def test_an_alias_of_row_0_is_kept_and_its_lost_chunk_is_found(tmp_path):
    """An index chunk that holds only zeros is still written: otherwise it could not be told from a lost one,
    which reads as zeros, and a lost ``image/alias_rows`` chunk would send every alias to row 0 unnoticed."""
    import shutil

    from pipeline.verify import verify_store

    url = str(tmp_path / "s.zarr")
    hand_store(url, alias_row=0)
    tc = C.TeacherCache(url)
    assert torch.equal(tc.image_targets(["alias9"])["tokens"][0], tc.image_targets(["im0"])["tokens"][0])
    before = verify_store(url, scan=False).failed()  # a hand store carries no checksums: those checks fail
    assert "ids" not in before
    shutil.rmtree(tmp_path / "s.zarr" / "image" / "alias_rows" / "c")
    report = verify_store(url, scan=False)
    assert report.failed() == sorted([*before, "ids"], key=[c.name for c in report.checks].index)
    assert "image/alias_rows: a chunk is missing" in next(c for c in report.checks if c.name == "ids").line()
    with pytest.raises(C.CacheCorrupt, match="image/alias_rows: a chunk is missing"):
        C.TeacherCache(url)


def test_an_older_store_without_its_alias_chunk_is_read_with_a_warning(tmp_path):
    """Before every index chunk was kept, a store whose aliases all share row 0 had no alias_rows chunk:
    it still opens (its aliases read row 0, as they always did), warning that a lost chunk reads the same."""
    import shutil

    from pipeline.verify import verify_store

    url = str(tmp_path / "s.zarr")
    hand_store(url, alias_row=0)
    g = C.open_group(url, mode="r+")
    attrs = dict(g.attrs)
    del attrs[C.ALIAS_ROWS_KEPT]
    g.attrs.put(attrs)  # as the older writer left it
    shutil.rmtree(tmp_path / "s.zarr" / "image" / "alias_rows" / "c")
    with pytest.warns(UserWarning, match="image/alias_rows lacks a chunk.*re-extract the store to be sure"):
        tc = C.TeacherCache(url)
    assert torch.equal(tc.image_targets(["alias9"])["tokens"][0], tc.image_targets(["im0"])["tokens"][0])
    ids = next(c for c in verify_store(url, scan=False).checks if c.name == "ids")
    assert ids.ok and "image/alias_rows lacks a chunk (an older store" in ids.line()


def test_an_append_cut_short_leaves_the_recorded_aliases_readable(tmp_path, monkeypatch):
    """An append resizes the index arrays before it writes them, and records its segment only after: a
    reader meanwhile (or after a kill in between) reads the aliases the store records, whole, and is not
    told the store is damaged."""
    from pipeline.cache import grow

    url = str(tmp_path / "s.zarr")
    hand_store(url, alias_row=3)
    g = C.open_group(url, mode="r+")
    segments = C.store_segments(dict(g.attrs))
    segments[0]["aliases"] = [0, 1]  # as an extraction records its first segment
    g.attrs.put({**g.attrs, C.SEGMENTS: segments})
    attrs = C.read_store_attrs(url)
    index = C.read_index(url, attrs)
    seg, offsets = C.new_segment(index.ext, attrs["layout"], 1, 2, [])
    resize = grow._resize

    def killed_after_the_image_index(a, rows):
        # At the first text array: every image array is resized by then, none written. (Killing after
        # image/ids instead depended on the order zarr lists a group's arrays in, which the filesystem
        # decides: alias_rows came after ids in one run of the suite.)
        if a.path.startswith("text/"):
            raise KeyboardInterrupt("killed in extend_store")
        resize(a, rows)

    monkeypatch.setattr(grow, "_resize", killed_after_the_image_index)
    with pytest.raises(KeyboardInterrupt):
        C.extend_store(url, index.ext, seg, ["new0"], ["sha"], ["aliasA", "aliasB"], [0, 1], [], [], offsets)
    assert C.open_group(url, mode="r")["image/alias_rows"].shape[0] == 3  # resized, not written
    tc = C.TeacherCache(url)
    assert torch.equal(tc.image_targets(["alias9"])["tokens"][0], tc.image_targets(["im3"])["tokens"][0])
    with pytest.raises(KeyError, match="aliasA"):
        tc.image_targets(["aliasA"])


# ------------------------------------------------------------------------------ manifest and fingerprint


@pytest.mark.parametrize("where", ["local", "memory"])
def test_manifest_commit_is_whole_files(tmp_path, where):
    url = str(tmp_path / "m.zarr") if where == "local" else f"memory://clip-td-test-{os.getpid()}/m.zarr"
    rec = {"unit": "image-000003", "rows": [12, 16], "arrays": {"image/tokens": {"crc32": "0badf00d"}}}
    C.commit_unit(url, "image-000003", rec)
    C.commit_unit(url, "text-000000", {"unit": "text-000000"})
    assert C.committed_units(url) == {"image-000003": rec, "text-000000": {"unit": "text-000000"}}
    if where == "local":  # the temp file of the atomic rename never stays behind
        assert sorted(os.listdir(tmp_path / "m.zarr" / "manifest")) == [
            "image-000003.json",
            "text-000000.json",
        ]
        (tmp_path / "m.zarr" / "manifest" / "text-000001.json.tmp-abc").write_text("{half")
        assert sorted(C.committed_units(url)) == ["image-000003", "text-000000"]


def test_a_manifest_entry_that_fails_to_write_leaves_nothing_in_the_store(tmp_path, monkeypatch):
    """A full disk while a unit commits: the entry is not published and no temporary stays in manifest/, which
    DVC hashes with the store (a stray file would make every stage downstream of it stale)."""
    url = str(tmp_path / "m.zarr")
    C.commit_unit(url, "image-000000", {"unit": "image-000000"})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        C.commit_unit(url, "image-000001", {"unit": "image-000001"})
    assert os.listdir(tmp_path / "m.zarr" / "manifest") == ["image-000000.json"]
    assert sorted(C.committed_units(url)) == ["image-000000"]


def test_check_fingerprint_names_dotted_fields():
    store = {
        "fingerprint": {"format_version": 1, "teacher": {"model": "a", "sha": "1"}, "data": {"hash": "x"}}
    }
    assert C.check_fingerprint(store, {"teacher": {"model": "a", "sha": "1"}, "data": {"hash": "x"}}) == []
    assert C.check_fingerprint(store, {"teacher": {"model": "b", "sha": "1"}, "data": {"hash": "y"}}) == [
        "data.hash",
        "teacher.model",
    ]
    assert C.check_fingerprint(store, {"data": {"hash": "x", "new": 1}}) == [
        "data.new"
    ]  # missing = differing
    assert (
        C.check_fingerprint(store["fingerprint"], {"data": {"hash": "x"}}) == []
    )  # the dict itself works too
    err = C.StaleCacheError("s.zarr", ["data.hash", "teacher.model"])
    assert "data.hash, teacher.model" in str(err) and "--overwrite" in str(err)
    assert pickle.loads(pickle.dumps(err)).fields == ["data.hash", "teacher.model"]  # crosses dask workers


# ------------------------------------------------------------------------------------------------ views


def test_view_boxes_and_replay():
    assert C.eval_view_box(40, 32) == pytest.approx((0.1, 0.0, 0.9, 1.0))
    assert C.eval_view_box(32, 32) == (0.0, 0.0, 1.0, 1.0)
    a = C.sample_view_box(np.random.default_rng(C.view_seed("abc", 1)), 64, 48)
    b = C.sample_view_box(np.random.default_rng(C.view_seed("abc", 1)), 64, 48)
    c = C.sample_view_box(np.random.default_rng(C.view_seed("abc", 2)), 64, 48)
    assert a == b != c and 0 <= a[0] < a[2] <= 1 and 0 <= a[1] < a[3] <= 1
    img = Image.new("RGB", (40, 20))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    out = C.apply_view(img, (0.0, 0.0, 0.5, 1.0), False, 8)
    assert out.size == (8, 8) and out.getpixel((4, 4)) == (255, 0, 0)
    flipped = C.apply_view(img, (0.25, 0.0, 0.75, 1.0), True, 8)
    assert flipped.getpixel((7, 4))[0] > 200 and flipped.getpixel((0, 4))[0] < 50  # red ends up on the right


def test_crc32_combine_equals_the_crc32_of_the_concatenation():
    import zlib

    rng = np.random.default_rng(0)
    for n1, n2 in [(0, 0), (0, 5), (5, 0), (1, 1), (3, 1 << 20), *rng.integers(0, 5000, (40, 2)).tolist()]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert C.crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b), (n1, n2)


def test_checksums_are_zlibs_crc32_so_stores_written_before_stay_valid():
    # The manifest format is zlib's crc32 of the stored bytes, whichever library computes it.
    import zlib

    rng = np.random.default_rng(1)
    for shape, dtype in [
        ((0,), np.uint8),
        ((1,), np.uint8),
        ((7, 3), np.float16),
        ((4, 196, 64), np.float32),
    ]:
        a = rng.standard_normal(shape).astype(dtype)
        assert C.checksum(a) == f"{zlib.crc32(a.tobytes()):08x}"
        assert C.checksum(a.T) == f"{zlib.crc32(a.T.tobytes()):08x}"  # not C-contiguous: hashed as stored
        # Chained over blocks, as a reader hashes a chunk row by row.
        assert C.crc32_update(a[1:].tobytes(), C.crc32_update(a[:1].tobytes())) == zlib.crc32(a.tobytes())


def test_only_a_recognisable_store_is_removed_and_its_lock_kept(tmp_path):
    url = str(tmp_path / "s.zarr")
    assert C.inspect_location(url)[0] == "absent"
    os.makedirs(url)
    (tmp_path / "s.zarr" / C.LOCK_FILE).write_text("{}")
    assert C.inspect_location(url)[0] == "empty"  # a writer's lock alone is not a user's file
    hand_store(url)
    assert C.inspect_location(url)[:2] == ("cache", dict(C.open_group(url).attrs))
    C.remove_store(url)
    assert os.listdir(url) == [C.LOCK_FILE]
    (tmp_path / "s.zarr" / "notes.txt").write_text("mine")
    kind, _, why = C.inspect_location(url)
    assert kind == "foreign" and "no zarr.json" in why
    with pytest.raises(C.CacheFormatError, match="not a clip-td teacher cache"):
        C.remove_store(url)
    with pytest.raises(C.CacheFormatError, match="not a clip-td teacher cache"):
        hand_store(url)  # create_store never writes into it either
    assert sorted(os.listdir(url)) == [C.LOCK_FILE, "notes.txt"]


def test_damaged_manifest_entry_names_its_file(tmp_path):
    url = str(tmp_path / "m.zarr")
    C.commit_unit(url, "image-000000", {"unit": "image-000000", "arrays": {}})
    (tmp_path / "m.zarr" / "manifest" / "image-000001.json").write_text('{"arrays": [1]}')
    entries, bad = C.read_manifest(url)
    assert list(entries) == ["image-000000"] and list(bad) == ["image-000001"]
    with pytest.raises(C.CacheFormatError, match=r"manifest/image-000001\.json: not a manifest entry"):
        C.committed_units(url)


def test_truncated_root_metadata_names_the_file(tmp_path):
    url = str(tmp_path / "s.zarr")
    hand_store(url)
    meta = tmp_path / "s.zarr" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:50])
    for call in (C.TeacherCache, C.inspect_location, C.remove_store):
        with pytest.raises(C.CacheFormatError, match=rf"{meta}: not valid JSON"):
            call(url)
    assert meta.exists()


def test_store_recognition_and_removal_on_an_fsspec_url():
    import fsspec

    base = f"clip-td-test-{os.getpid()}-recognise"
    url, fs = f"memory://{base}/s.zarr", fsspec.filesystem("memory")
    g = C.open_group(url, mode="a", attributes={"format": C.FORMAT})
    g.create_array("image/ids", shape=(2,), dtype="int64", chunks=(2,))
    fs.pipe_file(f"/{base}/s.zarr/{C.LOCK_FILE}", b"{}")
    assert C.inspect_location(url)[0] == "cache" and not C.is_local(url) and C.local_path(url) is None
    C.remove_store(url)
    assert fs.ls(f"/{base}/s.zarr", detail=False) == [f"/{base}/s.zarr/{C.LOCK_FILE}"]
    fs.pipe_file(f"/{base}/f/notes.txt", b"x")
    with pytest.raises(C.CacheFormatError, match="notes.txt.*not a clip-td teacher cache"):
        C.remove_store(f"memory://{base}/f")
    assert fs.cat_file(f"/{base}/f/notes.txt") == b"x"
