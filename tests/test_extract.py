"""Teacher extraction (docs/method.md §1): the cache equals a direct teacher forward, unique inputs are
computed once, an interrupted run resumes to the same store, stores from another teacher or store settings and
bad inputs are refused by name."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import cache as C
from pipeline import extract as X
from pipeline.config import CacheParams
from pipeline.data.errors import DataError
from pipeline.data.shards import DatasetWriter, PreparedDataset, decode_image
from pipeline.teacher import create_teacher
from pipeline.texts import instance_texts, text_hash
from tests.conftest import TINY_CFG, png_bytes, snli_instance, vcr_instance, vqa_instance


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------- fixtures


def make_dataset(
    path: Path, split: str, n_images: int, seed: int = 0, extra: list | None = None
) -> PreparedDataset:
    """n_images images; per image 2 VQA questions, one SNLI hypothesis (shared wording across images) and one
    VCR question, so images and texts repeat the way the real tasks do."""
    with DatasetWriter(path, source="synthetic", split=split, shard_size=7, image_shard_size=5) as w:
        for i in range(n_images):
            iid = f"img-{seed}-{i}"
            w.add_image(iid, png_bytes(seed * 1000 + i), "png")
            w.add_instance(
                vqa_instance(f"{split}-vqa-{i}-a", iid, split, f"what colour is shape {i % 3}?", "red")
            )
            w.add_instance(
                vqa_instance(f"{split}-vqa-{i}-b", iid, split, "how many shapes?", ["two", "three"][i % 2])
            )
            w.add_instance(snli_instance(f"{split}-snli-{i}", iid, split, "there is a square"))
            w.add_instance(vcr_instance(f"{split}-vcr-{i}", iid, split, f"why is shape {i % 2} here?"))
        for image_id, data, inst in extra or []:
            if data is not None and not w.has_image(image_id):
                w.add_image(image_id, data, "png")
            w.add_instance(inst)
    return PreparedDataset(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world")
    cfg = root / "tiny-test.json"
    cfg.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    t = create_teacher(str(cfg), "")
    ckpt = root / "teacher.pt"
    torch.save(t.model.state_dict(), ckpt)
    torch.manual_seed(1)
    other = root / "other.pt"
    torch.save(create_teacher(str(cfg), "").model.state_dict(), other)
    train = make_dataset(root / "train", "train", 9, seed=0)
    # val holds one image byte-identical to a train image under its own id (an alias) and one under the
    # same id (a plain repeat), plus a text that train already has.
    val = make_dataset(
        root / "val",
        "val",
        4,
        seed=1,
        extra=[
            (
                "dup-of-train-0",
                png_bytes(0),
                snli_instance("val-snli-dup", "dup-of-train-0", "val", "there is a square"),
            ),
            (
                "img-0-1",
                png_bytes(1),
                snli_instance("val-snli-same-id", "img-0-1", "val", "a brand new sentence"),
            ),
        ],
    )
    spec = X.TeacherSpec(str(cfg), str(ckpt), "fp32", "cpu")
    teacher = X.get_teacher(spec)
    return {"root": root, "cfg": str(cfg), "ckpt": str(ckpt), "other": str(other), "train": train, "val": val,
            "spec": spec, "teacher": teacher}  # fmt: skip


def params(**kw) -> CacheParams:
    base = dict(
        image_rows_per_unit=4, text_rows_per_unit=16, batch_size=3, num_workers=0, target_chunk_bytes=2048
    )
    return dataclasses.replace(CacheParams(), **{**base, **kw})


@pytest.fixture(scope="module")
def baseline(world) -> dict:
    url = str(world["root"] / "base.zarr")
    X.UNIT_RUNS.clear()
    m = X.extract(
        [world["train"], world["val"]], url, world["spec"], params(), scheduler="sync", progress=False
    )
    return {"url": url, "metrics": m, "runs": list(X.UNIT_RUNS)}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def _direct_images(teacher, datasets, ids):
    by_id = {i: ds for ds in datasets for i in ds.image_ids()}
    px = torch.stack([teacher.preprocess(decode_image(by_id[i].image_bytes(i))) for i in ids])
    return teacher.encode_images(px)


def _all_texts(datasets, vocab, types):
    """Every teacher text of ``datasets``' instances, VQA candidates from ``vocab`` and ``types`` (a store's)."""
    return [
        t
        for ds in datasets
        for inst in ds.iter_instances()
        for t in instance_texts(inst, vocab, 4, types).all()
    ]


# ---------------------------------------------------------------------------------------------- tests


def test_cache_equals_direct_teacher_forward(world, baseline):
    tc = C.TeacherCache(baseline["url"])
    teacher = world["teacher"]
    assert (tc.embed_dim, tc.grid, tc.num_patches) == (32, 4, 16)
    ids = list(tc.group["image/ids"][:])
    got = tc.image_targets(ids)
    want = _direct_images(teacher, [world["train"], world["val"]], ids)
    assert got["tokens"].shape == (len(ids), 16, 32)
    assert _cos(got["tokens"], want["tokens"]).min() >= 0.999
    assert _cos(got["pooled"], want["pooled"]).min() >= 0.999
    assert bool(got["valid"].all())

    texts = _all_texts([world["train"], world["val"]], *C.vqa_answer_space(baseline["url"], tc.attrs))
    uniq = list(dict.fromkeys(texts))
    tt = tc.text_targets(uniq)
    direct = teacher.encode_texts(teacher.tokenizer(uniq))
    for i, L in enumerate(direct["lengths"].tolist()):
        assert tt["tokens"][i].shape == (L, 32)  # SOT … EOT only: no padding to the context length
        assert _cos(tt["tokens"][i], direct["tokens"][i, :L]).min() >= 0.999
    assert _cos(tt["pooled"], direct["pooled"]).min() >= 0.999
    assert torch.equal(tt["lengths"], direct["lengths"])


def test_text_tokens_ragged_offsets_and_unit_shards(world, baseline):
    tc = C.TeacherCache(baseline["url"])
    g = tc.group
    lengths, offsets = g["text/lengths"][:].astype(int), g["text/offsets"][:].astype(int)
    m = baseline["metrics"]
    s = tc.attrs["units"]["text_token_rows_per_unit"]
    assert lengths.sum() == m["text_token_rows"] and lengths.max() < 16  # nothing padded to the context (16)
    assert g["text/tokens"].shape[0] == offsets[-1] == tc.attrs["units"]["text"] * s
    rt = tc.attrs["units"]["text_rows_per_unit"]
    for i in range(len(lengths)):
        if (i + 1) % rt and i + 1 < len(lengths):
            assert offsets[i + 1] == offsets[i] + lengths[i]  # packed back to back inside a unit
        else:
            assert offsets[i] + lengths[i] <= offsets[i + 1]  # the unit's slack follows its last text
    assert all(offsets[u * rt] == u * s for u in range(tc.attrs["units"]["text"]))  # units start on shards
    assert g["text/tokens"].shards == (s, 32)
    assert m["text_token_slack_rows"] == offsets[-1] - lengths.sum()


def test_duplicates_computed_once(world, baseline):
    m = baseline["metrics"]
    # 9 + 4 images, + 1 byte-identical under another id (alias) + 1 repeat of an id with the same bytes.
    assert (m["images_total"], m["unique_images"], m["image_duplicates_removed"], m["image_aliases"]) == (
        15,
        13,
        2,
        1,
    )
    space = C.vqa_answer_space(baseline["url"], C.TeacherCache(baseline["url"]).attrs)
    texts = _all_texts([world["train"], world["val"]], *space)
    assert m["texts_total"] == len(texts) and m["unique_texts"] == len(set(texts)) < len(texts)
    assert m["text_duplicates_removed"] == len(texts) - len(set(texts))
    assert m["instances"] == 9 * 4 + 4 * 4 + 2
    tc = C.TeacherCache(baseline["url"])
    # The aliased id reads the row of the image it duplicates; the image went through the teacher once.
    a, b = tc.image_targets(["img-0-0", "dup-of-train-0"])["tokens"]
    assert torch.equal(a, b) and tc.n_images == 13
    assert sum(r["items"] for r in C.committed_units(baseline["url"]).values()) == 13 + len(set(texts))


def test_reader_shuffled_batch_returns_right_rows(world, baseline):
    tc = C.TeacherCache(baseline["url"])
    ids = list(tc.group["image/ids"][:])
    batch = [ids[i] for i in [7, 0, 12, 7, 3, 4, 11, 0]]  # unsorted, repeated, across shards
    got = tc.image_targets(batch, relevance="last")
    want = _direct_images(world["teacher"], [world["train"], world["val"]], batch)
    assert _cos(got["tokens"], want["tokens"]).min() >= 0.999 and torch.equal(got["relevance"], got["tokens"])
    assert _cos(got["pooled"], want["pooled"]).min() >= 0.999
    texts = ["there is a square", "how many shapes?", "there is a square", "why is shape 1 here? a red cube"]
    tt = tc.text_targets(texts)
    assert torch.equal(tt["tokens"][0], tt["tokens"][2]) and not torch.equal(tt["pooled"][0], tt["pooled"][1])
    direct = world["teacher"].encode_texts(world["teacher"].tokenizer(texts))
    assert _cos(tt["pooled"], direct["pooled"]).min() >= 0.999
    with pytest.raises(KeyError, match="not in the teacher cache"):
        tc.text_targets(["never extracted"])


def test_manifest_checksums_and_metrics(baseline):
    m = baseline["metrics"]
    committed = C.committed_units(baseline["url"])
    assert sorted(committed) == sorted(baseline["runs"]) and m["units_computed"] == m["units_total"] == len(
        committed
    )
    n_text_units = -(-m["unique_texts"] // 16)
    assert set(committed) == {f"image-{u:06d}" for u in range(4)} | {
        f"text-{u:06d}" for u in range(n_text_units)
    }
    rec = committed["image-000001"]
    assert rec["rows"] == [4, 8] and rec["arrays"]["image/tokens"]["region"] == [4, 8] and rec["seconds"] >= 0
    assert C.TeacherCache(baseline["url"]).verify() == []
    assert m["bytes_on_disk"] > 0 and m["compression_ratio"] == pytest.approx(
        m["uncompressed_bytes"] / m["bytes_on_disk"], rel=1e-2
    )
    assert m["reconstruction_cosine"]["min"] > 0.999  # float16


def test_a_store_extracted_twice_is_byte_identical_outside_provenance(world, baseline, tmp_path):
    """DVC hashes the store's files: if a rebuild from the same teacher and data differed, every stage after
    it (the study's finished cells) would rerun on a new machine. Run-to-run facts live in provenance/, which
    the repository's .dvcignore leaves out, and still reach the manifest's readers."""
    import subprocess

    url = str(tmp_path / "again.zarr")
    X.extract([world["train"], world["val"]], url, world["spec"], params(), scheduler="sync", progress=False)

    def files(root: str) -> dict[str, bytes]:
        base = Path(root)
        return {
            str(p.relative_to(base)): p.read_bytes()
            for p in base.rglob("*")
            if p.is_file() and p.parts[len(base.parts)] not in ("provenance", C.LOCK_FILE)
        }

    a, b = files(baseline["url"]), files(url)
    assert sorted(a) == sorted(b) and any(k.startswith("manifest/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    prov = sorted(p.stem for p in (Path(url) / "provenance").glob("*.json"))
    assert prov == sorted([*C.committed_units(url), "extract"])
    run = json.loads((Path(url) / "provenance" / "extract.json").read_text())
    assert run["units_computed"] == len(prov) - 1 and run["seconds"] > 0 and run["store"] == url
    assert all(r["pid"] == os.getpid() and r["seconds"] >= 0 for r in C.committed_units(url).values())
    repo = Path(__file__).resolve().parent.parent
    probe = ["artifacts/cache/t.zarr/provenance/image-000000.json", "artifacts/cache/t.zarr/manifest/x.json"]
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "check-ignore", *probe], cwd=repo, capture_output=True, text=True
    )
    assert probe[0] in res.stdout and probe[1] not in res.stdout, res.stdout + res.stderr


def test_interrupted_run_resumes_to_identical_store(world, baseline, tmp_path, monkeypatch):
    url = str(tmp_path / "resume.zarr")
    datasets = [world["train"], world["val"]]
    monkeypatch.setenv(X.FAIL_ENV, "image-000001")
    X.UNIT_RUNS.clear()
    with pytest.raises(X.InjectedFailure) as failed:
        X.extract(datasets, url, world["spec"], params(), scheduler="sync", progress=False)
    # A fault no check of the unit names (a killed decode worker, CUDA out of memory) says where it stopped.
    assert f"in unit image-000001 (image rows 4-8) of {url}" in failed.value.__notes__
    assert sorted(C.committed_units(url)) == ["image-000000"] and X.UNIT_RUNS == ["image-000000"]
    with pytest.raises(C.CacheFormatError, match="incomplete"):
        C.TeacherCache(url)
    monkeypatch.delenv(X.FAIL_ENV)
    X.UNIT_RUNS.clear()
    m = X.extract(datasets, url, world["spec"], params(), scheduler="sync", progress=False)
    assert "image-000000" not in X.UNIT_RUNS and "image-000001" in X.UNIT_RUNS
    assert m["units_skipped"] == 1 and m["units_computed"] == m["units_total"] - 1
    a, b = C.open_group(url), C.open_group(baseline["url"])
    for group in ("image", "text"):
        for name, arr in b[group].arrays():
            assert np.array_equal(a[f"{group}/{name}"][:], arr[:]), f"{group}/{name}"
    X.UNIT_RUNS.clear()  # a third run finds everything committed and computes nothing
    assert (
        X.extract(datasets, url, world["spec"], params(), scheduler="sync", progress=False)["units_computed"]
        == 0
    )
    assert X.UNIT_RUNS == []


def test_stale_store_refused_naming_fields(world, baseline):
    other = X.TeacherSpec(world["cfg"], world["other"], "fp32", "cpu")
    with pytest.raises(C.StaleCacheError, match="teacher.pretrained_checksum") as e:
        X.extract(
            [world["train"], world["val"]], baseline["url"], other, params(), scheduler="sync", progress=False
        )
    assert "data.hash" not in e.value.fields
    # Other data is not stale: a store grows to cover it (tests/test_cache_growth.py), and data it already
    # covers computes nothing.
    m = X.extract(
        [world["train"]], baseline["url"], world["spec"], params(), scheduler="sync", progress=False
    )
    assert m["units_computed"] == 0
    with pytest.raises(C.StaleCacheError, match=r"data\.vqa_candidates"):
        X.extract([world["train"]], baseline["url"], world["spec"], params(), "sync", False, vqa_candidates=3)
    with pytest.raises(C.StaleCacheError, match="store.dtype"):
        X.extract(
            [world["train"], world["val"]],
            baseline["url"],
            world["spec"],
            params(dtype="int8"),
            "sync",
            False,
        )


def test_int8_store_reconstruction(world, baseline, tmp_path):
    url = f"file://{tmp_path}/int8.zarr"  # an fsspec URL, not a bare path
    m = X.extract([world["train"], world["val"]], url, world["spec"], params(dtype="int8"), "sync", False)
    print("int8 reconstruction cosine:", m["reconstruction_cosine"], "ratio", m["compression_ratio"])
    assert m["reconstruction_cosine"]["mean"] >= 0.99 and m["reconstruction_cosine"]["min"] >= 0.99
    q, f = C.TeacherCache(url), C.TeacherCache(baseline["url"])
    assert q.group["image/tokens"].dtype == np.int8 and q.group["image/tokens_scale"].shape == (13, 16)
    ids = list(f.group["image/ids"][:])
    assert _cos(q.image_targets(ids)["tokens"], f.image_targets(ids)["tokens"]).min() >= 0.99
    texts = ["there is a square", "how many shapes?"]
    for a, b in zip(q.text_targets(texts)["tokens"], f.text_targets(texts)["tokens"], strict=True):
        assert _cos(a, b).min() >= 0.99


def test_corrupted_image_names_dataset_and_id(world, tmp_path):
    bad = make_dataset(
        tmp_path / "bad", "train", 2, seed=5,
        extra=[("broken-7", b"\x89PNG\r\n\x1a\n not really a png", snli_instance("bad-snli", "broken-7", "train", "hmm"))],
    )  # fmt: skip
    with pytest.raises(X.ImageError, match=r"bad.*broken-7.*cannot decode"):
        X.extract([bad], str(tmp_path / "s.zarr"), world["spec"], params(), scheduler="sync", progress=False)
    m = X.extract(
        [bad],
        str(tmp_path / "s2.zarr"),
        world["spec"],
        params(on_error="skip"),
        "sync",
        False,
        overwrite=True,
    )
    assert m["images_invalid"] == 1 and m["invalid_images"] == ["broken-7"]
    t = C.TeacherCache(str(tmp_path / "s2.zarr")).image_targets(["broken-7", "img-5-0"])
    assert t["valid"].tolist() == [False, True] and float(t["tokens"][0].abs().sum()) == 0.0
    # cache.on_error is not in the store's fingerprint: back to fail, the rerun DVC makes for it resumes this
    # store and must not pass over the image it skipped.
    with pytest.raises(DataError, match=r"s2.zarr: image broken-7: 1 image\(s\) were skipped .*on_error"):
        X.extract([bad], str(tmp_path / "s2.zarr"), world["spec"], params(), scheduler="sync", progress=False)


def test_empty_text_names_dataset_and_instance(world, tmp_path):
    ds = make_dataset(
        tmp_path / "e",
        "train",
        1,
        seed=6,
        extra=[(None, None, vqa_instance("blank-q", "img-6-0", "train", "  ", "red"))],
    )
    with pytest.raises(X.TextError, match=r"e.*blank-q.*empty teacher text"):
        X.extract([ds], str(tmp_path / "e.zarr"), world["spec"], params(), scheduler="sync", progress=False)


def test_views(world, tmp_path):
    url = str(tmp_path / "views.zarr")
    both = ["value", "intermediate"]
    X.extract([world["val"]], url, world["spec"], params(views=3, relevance_tokens=both), "sync", False)
    tc = C.TeacherCache(url)
    ids = list(tc.group["image/ids"][:])
    vp = tc.view_params(ids)
    assert vp["boxes"].shape == (len(ids), 3, 4) and vp["flip"].shape == (len(ids), 3)
    # The 40×32 images: view 0 is the eval centre crop (short side kept whole), never flipped.
    assert torch.allclose(vp["boxes"][:, 0], torch.tensor([0.1, 0.0, 0.9, 1.0]).expand(len(ids), 4))
    assert not vp["flip"][:, 0].any()
    # The sources are a set: listed in another order they are the same store, nothing to compute or rebuild.
    again = params(views=3, relevance_tokens=both[::-1])
    assert X.extract([world["val"]], url, world["spec"], again, "sync", False)["units_computed"] == 0
    v0 = tc.image_targets(ids, relevance="value", views=[0] * len(ids))
    base = tc.image_targets(ids, relevance="value")
    assert torch.equal(v0["tokens"], base["tokens"]) and torch.equal(v0["relevance"], base["relevance"])
    # Replaying a cached view (box + flip) through apply_view gives what the teacher saw.
    teacher = world["teacher"]
    v2 = tc.image_targets(ids, views=[2] * len(ids))
    px = []
    for i, image_id in enumerate(ids):
        img = decode_image(world["val"].image_bytes(image_id))
        view = C.apply_view(img, vp["boxes"][i, 2].tolist(), bool(vp["flip"][i, 2]), teacher.image_size)
        px.append(teacher.preprocess(view))
    want = teacher.encode_images(torch.stack(px))
    assert _cos(v2["tokens"], want["tokens"]).min() >= 0.999
    assert not torch.allclose(v2["tokens"], base["tokens"])


def test_local_cluster_one_worker_process(world, baseline, tmp_path):
    # The production path: a distributed LocalCluster with one (non-daemonic) worker process that loads the
    # teacher itself and runs each image unit's DataLoader with a worker process from the fork server.
    url = str(tmp_path / "dist.zarr")
    m = X.extract(
        [world["train"], world["val"]], url, world["spec"], params(num_workers=1, n_workers=1),
        scheduler="local", progress=False, torch_threads=1,
    )  # fmt: skip
    assert m["units_computed"] == m["units_total"]
    assert {r["pid"] for r in C.committed_units(url).values()} != {os.getpid()}  # ran in the worker process
    a, b = C.open_group(url), C.open_group(baseline["url"])
    for key in ("image/tokens", "image/pooled", "text/tokens", "text/pooled", "text/offsets"):
        assert np.array_equal(a[key][:], b[key][:]), key


def test_local_workers_keep_glibcs_adaptive_malloc(monkeypatch):
    # dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which made the teacher's forward 1.8× slower there;
    # the rest of its worker environment (one BLAS thread per library) stays.
    from distributed import Client

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with X.local_cluster(1) as cluster, Client(cluster) as client:
        env = list(client.run(lambda: dict(os.environ)).values())[0]
    assert "MALLOC_TRIM_THRESHOLD_" not in env and env["OMP_NUM_THREADS"] == "1"


def test_text_ids_are_text_hashes_in_first_seen_order(baseline):
    tc = C.TeacherCache(baseline["url"])
    assert tc.group["text/ids"][0] == text_hash("what colour is shape 0?")  # train's first instance's text


def test_stage_cli(world, tmp_path):
    from click.testing import CliRunner

    from stages.extract_teacher import main

    assert "--overwrite" in CliRunner().invoke(main, ["--help"]).output
    out, metrics = tmp_path / "cli.zarr", tmp_path / "m" / "extract.json"
    args = ["--shards", str(world["root"] / "train"), "--out", str(out), "--model", world["cfg"]]
    args += [
        "--pretrained",
        world["ckpt"],
        "--scheduler",
        "sync",
        "--dtype",
        "int8",
        "--metrics",
        str(metrics),
    ]
    (tmp_path / "defaults.yaml").write_text("")  # empty: the dataclass defaults, whatever params.yaml says
    args += ["--params", str(tmp_path / "defaults.yaml"), "--quiet", "--device", "cpu"]
    args += [
        "--set",
        "cache.image_rows_per_unit=4",
        "--set",
        "cache.num_workers=0",
        "--set",
        "teacher.precision=fp32",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    m = json.loads(metrics.read_text())
    assert m["unique_images"] == 9 and m["dtype"] == "int8" and "9 images" in r.output
    r = CliRunner().invoke(main, [*args, "--views", "2"])
    assert r.exit_code == 1 and "store.views" in r.output  # stale layout refused, named


def test_images_at_teacher_size_skip_only_a_transform_that_keeps_them(world, tmp_path):
    """Images stored at the teacher's size skip the eval transform only where it would return them unchanged:
    the pixels equal the full transform's either way, and a transform that alters them still runs."""
    from PIL import ImageFilter

    teacher = world["teacher"]
    s = teacher.image_size
    with DatasetWriter(tmp_path / "ds", source="synthetic", split="train") as w:
        for i in range(3):
            w.add_image(f"at-size-{i}", png_bytes(i, (s, s)), "png")
            w.add_image(f"other-{i}", png_bytes(10 + i, (s + 9, s - 3)), "png")
        w.add_instance(snli_instance("k", "at-size-0", "train", "there is a square"))
    ds = PreparedDataset(tmp_path / "ds")
    items = [(0, i, ds.image_sha1(i)) for i in ds.image_ids()]
    steps = X.pil_steps(teacher.preprocess)
    blur = [*steps, lambda im: im.filter(ImageFilter.GaussianBlur(1))]
    for pil_steps, skips in ((steps, True), (blur, False)):
        data = X.UnitImages([str(ds.path)], items, pil_steps, s, 0)
        assert data.steps_keep_own_size is skips
        for row, (_, image_id, _) in enumerate(items):
            img = decode_image(ds.image_bytes(image_id))
            for t in pil_steps:
                img = t(img)
            want = np.asarray(img).transpose(2, 0, 1)
            np.testing.assert_array_equal(data[row][1][0], want, err_msg=image_id)
        data.close()


def _jpeg(png: bytes, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert(kw.pop("mode", "RGB")).save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_jpegs_at_teacher_size_decode_to_the_same_pixels_as_pil(world, tmp_path, monkeypatch):
    """JPEGs stored at the teacher's size take the libjpeg fast path: every pixel equals PIL's decode (4:2:0,
    4:4:4, progressive, greyscale); a JPEG of another size turns the fast path off and still gets the full
    transform; a truncated JPEG is refused with PIL's reason, as before."""
    teacher = world["teacher"]
    s = teacher.image_size
    images = {
        "q90": _jpeg(png_bytes(0, (s, s)), quality=90),
        "q444": _jpeg(png_bytes(1, (s, s)), quality=75, subsampling=0),
        "prog": _jpeg(png_bytes(2, (s, s)), quality=60, progressive=True),
        "grey": _jpeg(png_bytes(3, (s, s)), mode="L"),
        "cut": _jpeg(png_bytes(4, (s, s)))[:200],
        "wide": _jpeg(png_bytes(5, (s + 9, s - 3))),
        "after": _jpeg(png_bytes(6, (s, s))),
    }
    with DatasetWriter(tmp_path / "ds", source="synthetic", split="train") as w:
        for k, v in images.items():
            w.add_image(k, v, "jpg")
        w.add_instance(snli_instance("k", "q90", "train", "there is a square"))
    ds = PreparedDataset(tmp_path / "ds")
    steps = X.pil_steps(teacher.preprocess)
    data = X.UnitImages([str(ds.path)], [(0, k, "") for k in images], steps, s, 0)
    assert data.jpeg_fast
    by_pil = []
    monkeypatch.setattr(X.decode, "decode_image", lambda raw: by_pil.append(raw) or decode_image(raw))
    for row, image_id in enumerate(images):
        _, u8, _, _, ok, why = data[row]
        if image_id == "cut":
            assert not ok and "truncated" in why.lower()
            continue
        img = decode_image(ds.image_bytes(image_id))
        for t in steps:
            img = t(img)
        np.testing.assert_array_equal(u8[0], np.asarray(img).transpose(2, 0, 1), err_msg=image_id)
        assert data.jpeg_fast is (image_id not in ("wide", "after")), image_id
    assert by_pil == [images["cut"], images["wide"], images["after"]]  # the rest never reached PIL
    data.close()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_in_process_batches_reuse_buffers_and_zero_an_undecodable_image(
    world, tmp_path, monkeypatch, threads
):
    """Decoded in this process on one or more threads, images go straight into reused batch buffers: every
    batch comes in row order and equals the per-image items collated while the caller holds it, and an
    image that does not decode is zero-filled even in a buffer that held another batch's pixels."""
    monkeypatch.setattr(X.decode, "DECODE_THREADS", threads)
    ring = threads + 2  # buffers in rotation: the batch after them takes the first one's buffer
    n = 2 * (ring + 1)
    bad = n - 2  # the first image of that last batch
    s = world["teacher"].image_size
    with DatasetWriter(tmp_path / "ds", source="synthetic", split="train") as w:
        for i in range(n):
            w.add_image(f"im-{i}", b"not an image" if i == bad else png_bytes(i, (s, s)), "png")
        w.add_instance(snli_instance("k", "im-0", "train", "there is a square"))
    ds = PreparedDataset(tmp_path / "ds")
    items = [(0, f"im-{i}", "") for i in range(n)]
    data = X.UnitImages([str(ds.path)], items, X.pil_steps(world["teacher"].preprocess), s, 0)
    want = X.decode.collate_images([data[i] for i in range(n)])
    got = []
    for b in X.decode.unit_batches(data, 2, 0, [], False):
        assert torch.equal(b[1], want[1][b[0]])  # intact while the caller holds it
        got.append(b)
    assert np.array_equal(np.concatenate([b[0] for b in got]), want[0])
    assert torch.equal(torch.cat([b[1].clone() for b in got[1:]]), want[1][2:])  # only the first reused
    assert [ok for b in got for ok in b[4]] == want[4] and want[4][bad] is False
    assert got[-1][1].data_ptr() == got[0][1].data_ptr()
    assert not got[-1][1][0].any() and got[-1][5][0].startswith("cannot decode image")
    data.close()


def test_write_threads_setting_or_a_quarter_of_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert X.write_threads(-1) == 4 and X.write_threads(8) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert X.write_threads(-1) == 1  # a 2-core machine: the teacher and the decode already fill it


def test_automatic_decode_workers_follow_the_teacher_device(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert X.decode_workers(-1, "cpu") == 0  # torch already fills the cores: decode on a thread
    assert X.decode_workers(-1, "cuda:0") == 4
    # The cores this process may use, not the machine's: a container given 2 of 64 gets one worker.
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert X.decode_workers(-1, "cuda") == 1
    assert X.decode_workers(3, "cpu") == 3  # an explicit count is kept


def test_dvc_reruns_extraction_for_every_store_setting_and_only_those(baseline):
    """dvc.yaml's extract_teacher stage lists the cache params that the store's fingerprint holds (+ on_error):
    a setting the fingerprint would call stale must also make DVC rerun the stage, and a speed-only
    setting (workers, batch, scheduler) must not recompute CLIP."""
    import yaml

    stage = yaml.safe_load((Path(__file__).parent.parent / "dvc.yaml").read_text())["stages"][
        "extract_teacher"
    ]
    listed = {p.split(".", 1)[1] for p in stage["params"] if isinstance(p, str) and p.startswith("cache.")}
    store_keys = set(C.open_group(baseline["url"], mode="r").attrs["fingerprint"]["store"])
    assert listed == store_keys | {"on_error"}
    assert "cache" not in stage["params"]


def test_text_arrays_take_their_own_chunk_size(world, baseline, tmp_path):
    """cache.text_chunk_bytes sizes the text arrays' inner chunks (read a few scattered rows at a time), apart
    from target_chunk_bytes (image arrays); what the store gives back does not change."""
    url = str(tmp_path / "small-text-chunks.zarr")
    X.extract(
        [world["train"], world["val"]], url, world["spec"], params(text_chunk_bytes=256),
        scheduler="sync", progress=False,
    )  # fmt: skip
    small, base = C.TeacherCache(url), C.TeacherCache(baseline["url"])
    row = 32 * 2  # embed_dim 32, float16
    assert small.group["text/tokens"].chunks[0] == 256 // row
    assert small.group["text/pooled"].chunks[0] == 256 // row  # divides the 16-row shard
    assert base.group["text/tokens"].chunks[0] > 256 // row
    assert small.group["image/tokens"].chunks == base.group["image/tokens"].chunks
    space = C.vqa_answer_space(baseline["url"], base.attrs)
    texts = list(dict.fromkeys(_all_texts([world["train"], world["val"]], *space)))
    a, b = small.text_targets(texts), base.text_targets(texts)
    assert torch.equal(a["pooled"], b["pooled"]) and torch.equal(a["lengths"], b["lengths"])
    assert all(torch.equal(x, y) for x, y in zip(a["tokens"], b["tokens"], strict=True))


@pytest.mark.parametrize("writers", [1, 3])
def test_units_of_many_image_shards_store_the_same_rows_and_checksums(world, baseline, tmp_path, writers):
    """cache.image_shard_bytes splits a unit's image arrays into smaller shards (here 2 rows of 1 KiB, batches
    of 3: a batch ends inside a shard), written by one or several threads. The store gives back the same
    bytes, and each unit's manifest crc32 (combined over its shards, in row order) equals the
    one-shard-per-unit store's."""
    url = str(tmp_path / "shards.zarr")
    X.extract(
        [world["train"], world["val"]], url, world["spec"], params(image_shard_bytes=2048, write_threads=writers),
        scheduler="sync", progress=False,
    )  # fmt: skip
    small, base = C.open_group(url, mode="r"), C.open_group(baseline["url"], mode="r")
    assert small["image/tokens"].shards[0] == 2 and base["image/tokens"].shards[0] == 4
    assert small.attrs["units"]["image_rows_per_shard"] == 2
    for name, arr in base["image"].arrays():
        assert small[f"image/{name}"][:].tobytes() == arr[:].tobytes(), name
    got, want = C.committed_units(url), C.committed_units(baseline["url"])
    assert got.keys() == want.keys()
    for unit, rec in want.items():
        assert {k: (v["region"], v["crc32"]) for k, v in got[unit]["arrays"].items()} == {
            k: (v["region"], v["crc32"]) for k, v in rec["arrays"].items()
        }, unit
    assert C.TeacherCache(url).verify() == []


def test_image_shards_are_written_behind_the_next_forward(world, tmp_path, monkeypatch):
    """A unit hands each shard to its writer as soon as the teacher has filled its rows: with 2-row shards and
    batches of 2, the first shard is on disk before the unit's second forward returns (the forward waits
    for it; writing only after the unit's last forward would time the wait out)."""
    import threading

    import zarr

    teacher, encode = world["teacher"], world["teacher"].encode_images
    first_shard = threading.Event()
    calls, waited = {"n": 0}, []
    real = zarr.Array.__setitem__

    def setitem(self, selection, value):
        real(self, selection, value)
        if self.path == "image/tokens" and selection == slice(0, 2):
            first_shard.set()

    def encode_images(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            waited.append(first_shard.wait(timeout=10))
        return encode(*a, **k)

    from pipeline.cache.direct import DirectArray

    real_direct = DirectArray.write_rows

    def write_rows(self, start, a):  # how image shards are written where the layout allows it
        done = real_direct(self, start, a)
        if done and self.path == "image/tokens" and start == 0:
            first_shard.set()
        return done

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    monkeypatch.setattr(DirectArray, "write_rows", write_rows)
    monkeypatch.setattr(teacher, "encode_images", encode_images)
    url = str(tmp_path / "behind.zarr")
    X.extract(
        [world["train"]], url, world["spec"], params(image_shard_bytes=2048, batch_size=2),
        scheduler="sync", progress=False,
    )  # fmt: skip
    assert waited == [True]
    assert C.TeacherCache(url).verify() == []


def test_stores_from_before_image_shard_bytes_resume(world, baseline, tmp_path):
    """A store whose fingerprint predates cache.image_shard_bytes (one shard per unit) is reused while the
    setting still gives one shard per unit, and called stale by that key once it would split the shards."""
    import shutil

    url = str(tmp_path / "old.zarr")
    shutil.copytree(baseline["url"], url)
    g = C.open_group(url, mode="r+")
    fp = dict(g.attrs["fingerprint"])
    fp["store"] = {k: v for k, v in fp["store"].items() if k != "image_shard_bytes"}
    g.attrs["fingerprint"] = fp
    m = X.extract(
        [world["train"], world["val"]], url, world["spec"], params(), scheduler="sync", progress=False
    )
    assert m["units_computed"] == 0
    with pytest.raises(C.StaleCacheError, match="image_shard_bytes"):
        X.extract(
            [world["train"], world["val"]], url, world["spec"], params(image_shard_bytes=2048),
            scheduler="sync", progress=False,
        )  # fmt: skip


@pytest.mark.parametrize("decode_workers", [0, 1])
def test_units_on_threads_of_one_process_build_the_same_store(world, baseline, tmp_path, decode_workers):
    """``--scheduler sync`` with cache.n_workers = 3 runs three units at a time on threads sharing the
    process's teacher: the store is byte for byte the one-at-a-time store (outside provenance/), every
    unit ran once, in this process, and two units were in flight together; also with each unit's images
    decoded by a DataLoader worker process (as with a GPU teacher)."""
    import threading

    url = str(tmp_path / "threads.zarr")
    inflight, most, lock, run = [0], [0], threading.Lock(), X.units.run_unit

    def counting(job):
        with lock:
            inflight[0] += 1
            most[0] = max(most[0], inflight[0])
        try:
            return run(job)
        finally:
            with lock:
                inflight[0] -= 1

    X.UNIT_RUNS.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(X.schedule, "run_unit", counting)
        m = X.extract(
            [world["train"], world["val"]], url, world["spec"],
            params(n_workers=3, num_workers=decode_workers), scheduler="sync", progress=False,
        )  # fmt: skip
    assert m["units_computed"] == m["units_total"] == len(X.UNIT_RUNS) == len(set(X.UNIT_RUNS)) > 3
    assert most[0] >= 2
    assert {r["pid"] for r in C.committed_units(url).values()} == {os.getpid()}
    for name in ("manifest", "image", "text"):
        for p in sorted((Path(baseline["url"]) / name).rglob("*")):
            if p.is_file():
                rel = p.relative_to(baseline["url"])
                assert (Path(url) / rel).read_bytes() == p.read_bytes(), rel
    assert C.TeacherCache(url).verify() == []


def test_a_failed_unit_on_a_thread_stops_the_run_after_the_running_ones(world, tmp_path, monkeypatch):
    """One unit's failure among threads: units not yet started never start, the error reaches the caller
    only after the units in flight have finished (nothing writes once it is raised), and the store is left
    incomplete with the finished units committed, so a rerun resumes."""
    import threading

    url = str(tmp_path / "threads-fail.zarr")
    monkeypatch.setenv(X.FAIL_ENV, "image-000001")
    X.UNIT_RUNS.clear()
    with pytest.raises(X.InjectedFailure):
        X.extract(
            [world["train"], world["val"]], url, world["spec"], params(n_workers=2), scheduler="sync",
            progress=False,
        )  # fmt: skip
    assert not [t for t in threading.enumerate() if t.name.startswith("clip-td-unit")]  # none still writes
    done = sorted(C.committed_units(url))
    assert "image-000001" not in done and done == sorted(X.UNIT_RUNS)
    with pytest.raises(C.CacheFormatError, match="incomplete"):
        C.TeacherCache(url)
    monkeypatch.delenv(X.FAIL_ENV)
    m = X.extract(
        [world["train"], world["val"]], url, world["spec"], params(), scheduler="sync", progress=False
    )
    assert m["units_skipped"] == len(done) < m["units_total"] and C.TeacherCache(url).verify() == []


def test_a_teacher_is_loaded_once_when_units_on_threads_ask_together(world, monkeypatch):
    """Two threads asking for an unloaded random-init teacher at once get one teacher, with the weights a
    single load gives (its load seeds and draws from torch's global RNG)."""
    import threading

    spec = X.TeacherSpec(world["cfg"], "", "fp32", "cpu")
    monkeypatch.setattr(X.teachers, "_TEACHERS", {})
    got, start = [], threading.Barrier(2)

    def ask():
        start.wait()
        got.append(X.get_teacher(spec))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] is got[1]
    monkeypatch.setattr(X.teachers, "_TEACHERS", {})
    alone = X.get_teacher(spec)
    assert X.weights_sha256(alone) == X.weights_sha256(got[0])


def test_an_interrupted_run_resumes_with_its_datasets_named_in_another_order(world, tmp_path, monkeypatch):
    """B holds an image with A's bytes under another id: the store's row for it, planned under A's id, is an
    alias in the resumed plan, which reported it held by none of the run's datasets."""
    a = make_dataset(tmp_path / "A", "train", 4, seed=21)
    extra = [
        ("other-id", png_bytes(21 * 1000), vqa_instance("b-q", "other-id", "train", "what is it?", "red"))
    ]
    b = make_dataset(tmp_path / "B", "train", 1, seed=22, extra=extra)
    url = str(tmp_path / "s.zarr")
    monkeypatch.setenv(X.FAIL_ENV, "image-000000")
    with pytest.raises(X.InjectedFailure):
        X.extract([a, b], url, world["spec"], params(), scheduler="sync", progress=False)
    monkeypatch.delenv(X.FAIL_ENV)
    X.extract([b, a], url, world["spec"], params(), scheduler="sync", progress=False)
    tc = C.TeacherCache(url)
    got = tc.image_targets(["img-21-0", "other-id"])["tokens"]
    assert torch.equal(got[0], got[1])  # one row, read under either id


def test_a_worker_computing_in_another_precision_than_the_store_records_is_refused(baseline):
    """A coordinator without a GPU records float32; a GPU worker resolving precision 'auto' computes in bf16,
    and the store was labelled float32 (or mixed both on a resume elsewhere)."""
    from types import SimpleNamespace

    from pipeline.extract.units import _check_compute_dtype

    job = SimpleNamespace(name="image-000003", store_url=baseline["url"])
    _check_compute_dtype(job, SimpleNamespace(device=torch.device("cpu"), precision="auto"))  # as recorded
    gpu = SimpleNamespace(device=torch.device("cuda"), precision="bf16")
    with pytest.raises(RuntimeError, match=r"unit image-000003 of .*base.zarr: this worker .* computes in "
                       r"torch.bfloat16, the store records torch.float32"):  # fmt: skip
        _check_compute_dtype(job, gpu)


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_view_zero_records_the_region_the_teachers_resize_mode_shows(world, tmp_path, mode):
    """Weights whose config squashes (DFN, CLIPA) or pads show the teacher another region of a non-square
    image than the centre square: view 0's box must say which, and replaying it (as the student does) must
    give the teacher's pixels."""
    import open_clip

    s = world["teacher"].image_size
    with DatasetWriter(tmp_path / "ds", source="synthetic", split="train") as w:
        w.add_image("wide", png_bytes(3, (40, 32)), "png")
        w.add_instance(snli_instance("k", "wide", "train", "there is a square"))
    ds = PreparedDataset(tmp_path / "ds")
    transform = open_clip.image_transform(s, is_train=False, resize_mode=mode)
    data = X.UnitImages([str(ds.path)], [(0, "wide", "")], X.pil_steps(transform), s, 0, resize_mode=mode)
    _, u8, boxes, _, ok, _ = data[0]
    want = {
        "shortest": (0.1, 0.0, 0.9, 1.0),
        "squash": (0.0, 0.0, 1.0, 1.0),
        "longest": (0.0, -0.125, 1.0, 1.125),
    }
    assert ok and boxes[0] == pytest.approx(want[mode])
    replay = np.asarray(C.apply_view(decode_image(ds.image_bytes("wide")), boxes[0].tolist(), False, s))
    diff = np.abs(replay.transpose(2, 0, 1).astype(int) - u8[0].astype(int))
    assert diff.mean() < 4, diff.mean()  # the same region; resampling order differs by a few levels
    data.close()
    with pytest.raises(ValueError, match="unknown image resize_mode 'stretch'"):
        C.eval_view_box(40, 32, "stretch")
    # In whole pixels the region stays square when the sides differ by an odd number (the student's cut).
    assert C.eval_view_pixels(41, 32, "longest") == (0, -4, 41, 37)
    assert C.eval_view_pixels(40, 31, "shortest") == (4, 0, 35, 31)
    assert C.eval_view_pixels(40, 31, "squash") == (0, 0, 40, 31)


def test_the_vqa_vocabulary_comes_from_the_sources_train_split_whatever_the_shards_order():
    """Real VQA's train split is train2014 and its test role val2014: given val2014 first, the vocabulary (the
    cached candidates' distractors) came from the test split's answers."""
    from types import SimpleNamespace

    from pipeline.extract.plan import _vocab_source

    test = SimpleNamespace(info={"source": "vqa", "split": "val2014", "answer_counts": {"2": 5}})
    train = SimpleNamespace(info={"source": "vqa", "split": "train2014", "answer_counts": {"yes": 9}})
    assert _vocab_source([test, train]) is train
    synthetic = [
        SimpleNamespace(info={"source": "synthetic", "split": s, "answer_counts": {"a": 1}})
        for s in ("val", "train")
    ]
    assert _vocab_source(synthetic) is synthetic[1]
