"""A store that grows: adding datasets extracts only what the store lacks, as new units after the
existing rows, which keep their bytes and checksums; an interrupted append resumes; verify_cache passes on a
grown store; a student checks that the store covers its own data, not that it holds nothing else."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline import cache as C
from pipeline import extract as X
from pipeline.config import CacheParams
from pipeline.data.errors import DataError
from pipeline.teacher import create_teacher
from pipeline.texts import answer_types, instance_texts, text_hash
from pipeline.verify import verify_store
from tests.conftest import TINY_CFG, png_bytes, snli_instance
from tests.test_extract import make_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def params(**kw) -> CacheParams:
    base = dict(
        image_rows_per_unit=4, text_rows_per_unit=16, batch_size=3, num_workers=0, target_chunk_bytes=2048
    )
    return dataclasses.replace(CacheParams(), **{**base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("grow")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    ckpt = root / "teacher.pt"
    torch.save(create_teacher(str(cfg), "").model.state_dict(), ckpt)
    a = make_dataset(root / "a" / "train", "train", 7, seed=0)
    # B shares one image's bytes with A under its own id (an alias of A's row), one image under A's id (held
    # already) and a text A has; the rest is new.
    b = make_dataset(
        root / "b" / "train",
        "val",
        6,
        seed=1,
        extra=[
            ("copy-of-a-0", png_bytes(0), snli_instance("b-dup", "copy-of-a-0", "val", "there is a square")),
            ("img-0-2", png_bytes(2), snli_instance("b-same-id", "img-0-2", "val", "a sentence only b has")),
        ],
    )
    spec = X.TeacherSpec(str(cfg), str(ckpt), "fp32", "cpu")
    return {"root": root, "a": a, "b": b, "spec": spec}


def _extract(world, datasets, url, **kw):
    X.UNIT_RUNS.clear()
    return X.extract(datasets, url, world["spec"], params(**kw), scheduler="sync", progress=False)


@pytest.fixture(scope="module")
def grown(world) -> dict:
    """A extracted, then A + B into the same store; and one extraction of A + B for reference."""
    url = str(world["root"] / "grown.zarr")
    first = _extract(world, [world["a"]], url)
    before = _snapshot(url)
    second = _extract(world, [world["a"], world["b"]], url)
    ref_url = str(world["root"] / "ref.zarr")
    ref = _extract(world, [world["a"], world["b"]], ref_url)
    return {"url": url, "first": first, "second": second, "before": before, "ref_url": ref_url, "ref": ref}


def _snapshot(url: str) -> dict:
    """Every chunk or shard file under the store, and the manifest entries."""
    from pathlib import Path

    root = Path(url)
    files = {
        str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and "c" in p.parts
    }
    return {"files": files, "manifest": C.committed_units(url)}


def test_append_computes_only_what_the_store_lacks(grown):
    first, second, ref = grown["first"], grown["second"], grown["ref"]
    assert first["items_computed"] + second["items_computed"] == ref["items_computed"]
    assert second["images_appended"] == ref["unique_images"] - first["unique_images"]
    assert second["aliases_appended"] == 1  # B's copy of an A image under its own id: A's row, not a new one
    # A had no aliases, so every alias chunk is the append's, written even if it holds row 0: a lost one shows.
    g = C.open_group(grown["url"], mode="r")
    assert g.attrs[C.ALIAS_ROWS_KEPT] is True and C.alias_rows_state(grown["url"], g) == ""
    assert second["texts_appended"] == ref["unique_texts"] - first["unique_texts"]
    assert second["units_skipped"] == first["units_total"]  # A's units are not run again


def test_appended_rows_equal_one_extraction_of_everything(world, grown):
    got, ref = C.TeacherCache(grown["url"]), C.TeacherCache(grown["ref_url"])
    ids = [i for ds in (world["a"], world["b"]) for i in ds.image_ids()]
    a, b = got.image_targets(ids), ref.image_targets(ids)
    for key in ("tokens", "pooled"):
        cos = torch.nn.functional.cosine_similarity(a[key].float(), b[key].float(), dim=-1)
        assert cos.min() >= 0.9999, key
    texts = [t for t in ref._text_row]  # every text hash the reference holds, looked up by hash in both
    rows_got = np.array([got._text_row[h] for h in texts])
    rows_ref = np.array([ref._text_row[h] for h in texts])
    for key in ("text/pooled",):
        x = torch.from_numpy(got.group[key][:][rows_got].astype(np.float32))
        y = torch.from_numpy(ref.group[key][:][rows_ref].astype(np.float32))
        assert torch.nn.functional.cosine_similarity(x, y, dim=-1).min() >= 0.9999
    tok_got = got.group["text/tokens"][:].astype(np.float32)
    tok_ref = ref.group["text/tokens"][:].astype(np.float32)
    off_g, len_g = got.group["text/offsets"][:], got.group["text/lengths"][:]
    off_r, len_r = ref.group["text/offsets"][:], ref.group["text/lengths"][:]
    for rg, rr in zip(rows_got, rows_ref, strict=True):
        assert len_g[rg] == len_r[rr]
        x = torch.from_numpy(tok_got[off_g[rg] : off_g[rg] + len_g[rg]])
        y = torch.from_numpy(tok_ref[off_r[rr] : off_r[rr] + len_r[rr]])
        assert torch.nn.functional.cosine_similarity(x, y, dim=-1).min() >= 0.9999


def test_existing_rows_and_checksums_stay_byte_identical(grown):
    before, after = grown["before"], _snapshot(grown["url"])
    for name, rec in before["manifest"].items():
        assert after["manifest"][name] == rec, name
    changed = [f for f, data in before["files"].items() if after["files"].get(f) != data]
    # Only index chunks (ids, lengths, offsets: rewritten whole, same values) and nothing the units wrote.
    assert all(
        f.split("/")[1] in ("ids", "sha1", "alias_ids", "alias_rows", "lengths", "offsets") for f in changed
    ), changed


def test_grown_store_verifies_and_covers_both(world, grown):
    report = verify_store(grown["url"])
    assert report.ok, report.lines()
    covered = C.covered_datasets(C.read_store_attrs(grown["url"]))
    assert set(covered.values()) == {world["a"].fingerprint, world["b"].fingerprint}
    assert len(covered) == 2  # both folders are called train: the second is named by its parent too


def test_rerun_after_append_writes_nothing(world, grown):
    before = {p: p.read_bytes() for p in __import__("pathlib").Path(grown["url"]).rglob("*") if p.is_file()}
    m = _extract(world, [world["b"]], grown["url"])  # B alone: everything it needs is held
    assert m["units_computed"] == 0 and X.UNIT_RUNS == []
    after = {p: p.read_bytes() for p in __import__("pathlib").Path(grown["url"]).rglob("*") if p.is_file()}
    assert before == after


def test_teacher_and_store_settings_still_refused(world, grown):
    with pytest.raises(C.StaleCacheError, match="store.dtype"):
        _extract(world, [world["a"], world["b"]], grown["url"], dtype="int8")


def test_interrupted_append_resumes(world, grown, tmp_path, monkeypatch):
    url = str(tmp_path / "resume.zarr")
    _extract(world, [world["a"]], url)
    n_units = len(C.committed_units(url))
    first_new = C.unit_name("image", sum(1 for u in C.committed_units(url) if u.startswith("image")) + 1)
    monkeypatch.setenv(X.FAIL_ENV, first_new)
    with pytest.raises(X.InjectedFailure):
        _extract(world, [world["a"], world["b"]], url)
    # Mid-append: A's readers go on, B is not covered yet, verify names the unfinished append.
    attrs = C.read_store_attrs(url)
    assert C.APPENDING in attrs and world["b"].fingerprint not in C.covered_datasets(attrs).values()
    tc = C.TeacherCache(url)
    assert tc.image_rows(world["a"].image_ids()).max() < attrs[C.SEGMENTS][0]["images"][1]
    assert not verify_store(url, scan=False).ok
    monkeypatch.delenv(X.FAIL_ENV)
    m = _extract(world, [world["a"], world["b"]], url)
    assert first_new in X.UNIT_RUNS and len(X.UNIT_RUNS) == m["units_computed"]
    assert m["units_total"] - m["units_computed"] > n_units  # A's units and the append's committed one
    assert verify_store(url).ok
    assert _min_cosine(url, grown["ref_url"], world["b"].image_ids(), "pooled") >= 0.9999


def test_interrupted_append_needs_its_datasets(world, tmp_path, monkeypatch):
    url = str(tmp_path / "needs.zarr")
    _extract(world, [world["a"]], url)
    first_new = C.unit_name("text", sum(1 for u in C.committed_units(url) if u.startswith("text")))
    monkeypatch.setenv(X.FAIL_ENV, first_new)
    with pytest.raises(X.InjectedFailure):
        _extract(world, [world["a"], world["b"]], url)
    monkeypatch.delenv(X.FAIL_ENV)
    with pytest.raises(DataError, match="rerun with the datasets it was started with"):
        _extract(world, [world["a"]], url)


# ------------------------------------------------------------------------------------------ students


def _train(world, out, data=None):
    from tests.test_train_safety import train

    r = train(world, out, data=data)
    assert r.exit_code == 0, r.output
    return r


def test_student_reads_identical_targets_after_an_append(tmp_path):
    from pipeline.data.shards import PreparedDataset
    from tests.conftest import build_dataset, build_world

    world = build_world(tmp_path / "w")
    root, cfg, store = world
    train_ds = PreparedDataset(root / "shards" / "train")
    ids = train_ds.image_ids()
    before_targets = C.TeacherCache(store).image_targets(ids)
    _train(world, tmp_path / "before")

    # B has its own ids: another synthetic world reuses ours for other bytes, which the store refuses.
    build_dataset(tmp_path / "b" / "train", 12)
    cp = CacheParams(image_rows_per_unit=64, text_rows_per_unit=512, batch_size=32, num_workers=0)
    spec = (str(cfg), str(root / "teacher.pt"), "fp32")
    m = X.extract(
        [PreparedDataset(tmp_path / "b" / "train")], store, spec, cp, scheduler="sync", progress=False
    )
    assert m["images_appended"] > 0 and m["units_computed"] > 0

    after_targets = C.TeacherCache(store).image_targets(ids)
    for key in ("tokens", "pooled", "valid"):
        assert torch.equal(before_targets[key], after_targets[key]), key
    # The same run, after the append: the same targets, so the same student, and the finished run is still its
    # own (the store's growth is not a change to what it read).
    _train(world, tmp_path / "after")
    a = torch.load(tmp_path / "before" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "after" / "student.pt", weights_only=True)
    flat_a, flat_b = _tensors(a), _tensors(b)
    assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)
    done = tmp_path / "before"
    snapshot = {n: (done / n).read_bytes() for n in ("checkpoint.pt", "student.pt")}
    _train(world, done)  # resumed from its own checkpoint: nothing to train, nothing rewritten
    assert {n: (done / n).read_bytes() for n in snapshot} == snapshot
    assert json.loads((done / "train.json").read_text())["resumed_from"]
    b_fp = PreparedDataset(tmp_path / "b" / "train").fingerprint
    assert b_fp in C.covered_datasets(C.read_store_attrs(store)).values()


def _tensors(obj, prefix="") -> dict:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _tensors(val, f"{prefix}.{key}").items()}
    return {}


# ------------------------------------------------------------------------------------ kill and resume


def test_sigkilled_append_resumes_to_the_uninterrupted_one(world, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.config import load_params
    from pipeline.lock import read_lock

    sets = ["cache.image_rows_per_unit=4", "cache.text_rows_per_unit=16", "cache.batch_size=3",
            "cache.num_workers=0", "cache.target_chunk_bytes=2048", "teacher.precision=fp32"]  # fmt: skip
    p = load_params(None, sets)
    spec = X.TeacherSpec(world["spec"].model, world["spec"].pretrained, p.teacher.precision, "cpu")
    both = [world["a"], world["b"]]
    ref, url = str(tmp_path / "ref.zarr"), str(tmp_path / "killed.zarr")
    for u in (ref, url):
        X.extract([world["a"]], u, spec, p.cache, scheduler="sync", progress=False)
    X.extract(both, ref, spec, p.cache, scheduler="sync", progress=False)
    a_ids = world["a"].image_ids()
    a_before = C.TeacherCache(url).image_targets(a_ids)
    first_new = C.unit_name("image", sum(1 for u in C.committed_units(url) if u.startswith("image")))
    (tmp_path / "empty.yaml").write_text("")
    args = [sys.executable, "-m", "stages.extract_teacher", "--out", url, "--model", spec.model, "--pretrained",
            spec.pretrained, "--scheduler", "sync", "--device", "cpu", "--params", str(tmp_path / "empty.yaml"),
            "--quiet", *(x for ds in both for x in ("--shards", str(ds.path))), *(x for s in sets for x in ("--set", s))]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for where in ("append-index", "append-recorded", f"{first_new}"):
        r = subprocess.run(
            args, cwd=root, env={**env, X.FAIL_ENV: f"{where}:kill"}, capture_output=True, text=True
        )
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        assert read_lock(url) is not None  # killed holding it
        # A's readers are untouched by the append in flight.
        a_now = C.TeacherCache(url).image_targets(a_ids)
        assert all(torch.equal(a_before[k], a_now[k]) for k in ("tokens", "pooled", "valid")), where
    r = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_lock(url) is None and verify_store(url).ok
    g, h = C.open_group(url, mode="r"), C.open_group(ref, mode="r")
    for group in ("image", "text"):
        for name, arr in h[group].arrays():
            x, y = g[f"{group}/{name}"][:], arr[:]
            same = x.tolist() == y.tolist() if x.dtype.kind in "OUT" else x.tobytes() == y.tobytes()
            assert x.dtype == y.dtype and same, f"{group}/{name}"
    got, want = C.committed_units(url), C.committed_units(ref)
    assert {u: {k: v["crc32"] for k, v in r["arrays"].items()} for u, r in got.items()} == {
        u: {k: v["crc32"] for k, v in r["arrays"].items()} for u, r in want.items()
    }
    assert C.covered_datasets(C.read_store_attrs(url)) == C.covered_datasets(C.read_store_attrs(ref))


def test_store_from_before_segments_and_sha1_grows(world, grown, tmp_path):
    import shutil
    from pathlib import Path

    url = str(tmp_path / "old.zarr")
    _extract(world, [world["a"]], url)
    shutil.rmtree(Path(url) / "image" / "sha1")  # as a store written before this version
    g = C.open_group(url, mode="r+")
    g.attrs.put({k: v for k, v in g.attrs.asdict().items() if k != C.SEGMENTS})
    m = _extract(world, [world["a"], world["b"]], url)
    # A's images are known by content through this run's A, so B's copy of one is an alias, not a row.
    assert m["aliases_appended"] == 1 and m["images_appended"] == grown["second"]["images_appended"]
    assert verify_store(url).ok
    assert _min_cosine(url, grown["ref_url"], world["b"].image_ids(), "tokens") >= 0.9999


def test_append_cut_short_then_not_repeated_leaves_a_store_that_verifies(world, tmp_path, monkeypatch):
    url = str(tmp_path / "short.zarr")
    _extract(world, [world["a"]], url)
    monkeypatch.setenv(X.FAIL_ENV, "append-index")
    with pytest.raises(X.InjectedFailure):
        _extract(world, [world["a"], world["b"]], url)
    monkeypatch.delenv(X.FAIL_ENV)
    assert not verify_store(url, scan=False).ok  # arrays longer than the attrs record
    assert _extract(world, [world["a"]], url)["units_computed"] == 0  # A alone: nothing appended
    assert verify_store(url).ok


def test_data_prepared_again_under_the_same_ids_is_rebuilt_only_when_asked(world, tmp_path):
    """An id the store holds with other bytes (a synthetic world prepared with another seed) is not new data:
    refused, naming the id and the flags that replace the store; --rebuild-stale (dvc.yaml) rebuilds it."""
    url = str(tmp_path / "again.zarr")
    _extract(world, [world["a"]], url)
    clash = make_dataset(
        tmp_path / "clash" / "train",
        "train",
        1,
        seed=8,
        extra=[("img-0-0", png_bytes(999), snli_instance("c-x", "img-0-0", "train", "other bytes"))],
    )
    with pytest.raises(DataError, match="different bytes.*--rebuild-stale"):
        _extract(world, [clash], url)
    X.UNIT_RUNS.clear()
    m = X.extract([clash], url, world["spec"], params(), scheduler="sync", progress=False, rebuild_stale=True)
    assert m["units_skipped"] == 0  # rebuilt from this run's data alone
    assert set(C.covered_datasets(C.read_store_attrs(url)).values()) == {clash.fingerprint}
    assert verify_store(url).ok


def test_append_with_views_int8_and_more_tokens_than_a_shard(world, tmp_path):
    """The first store's texts are few (its token shards small); the appended texts need several shards per
    unit. Every array, views and int8 scales included, reads as one extraction's, through checksum-on-read."""
    from tests.conftest import build_dataset
    from tests.test_extract import _all_texts

    a = make_dataset(tmp_path / "a" / "train", "train", 2, seed=0)
    b = build_dataset(tmp_path / "b" / "train", 30)  # its own ids and many distinct texts
    kw = dict(views=2, dtype="int8", text_rows_per_unit=64)
    url, ref = str(tmp_path / "grown.zarr"), str(tmp_path / "ref.zarr")
    _extract(world, [a], url, **kw)
    _extract(world, [a, b], url, **kw)
    _extract(world, [a, b], ref, **kw)
    seg0, seg1 = C.read_store_attrs(url)[C.SEGMENTS]
    assert seg1["token_rows_per_unit"] > seg0["token_rows_per_unit"]  # units of several token shards
    assert verify_store(url).ok
    got, want = C.TeacherCache(url), C.TeacherCache(ref)
    got.configure_reads(verify=True, chunk_cache_bytes=1 << 20)
    ids = [*a.image_ids(), *b.image_ids()]
    for views in (None, [1] * len(ids)):
        x, y = got.image_targets(ids, views=views), want.image_targets(ids, views=views)
        for key in ("tokens", "pooled"):
            assert torch.nn.functional.cosine_similarity(x[key], y[key], dim=-1).min() >= 0.9999, (key, views)
    texts = _all_texts([a, b], *C.vqa_answer_space(ref, want.attrs))
    x, y = got.text_targets(texts), want.text_targets(texts)
    assert torch.equal(x["lengths"], y["lengths"])
    assert torch.nn.functional.cosine_similarity(x["pooled"], y["pooled"], dim=-1).min() >= 0.9999
    for tx, ty in zip(x["tokens"], y["tokens"], strict=True):
        assert torch.nn.functional.cosine_similarity(tx, ty, dim=-1).min() >= 0.9999


def test_stage_appends_a_dataset_given_alone(world, tmp_path):
    from click.testing import CliRunner

    from stages.extract_teacher import main

    out = tmp_path / "cli.zarr"
    (tmp_path / "defaults.yaml").write_text("")
    args = ["--out", str(out), "--model", world["spec"].model, "--pretrained", world["spec"].pretrained,
            "--scheduler", "sync", "--device", "cpu", "--quiet", "--params", str(tmp_path / "defaults.yaml"),
            "--set", "cache.image_rows_per_unit=4", "--set", "cache.num_workers=0",
            "--set", "teacher.precision=fp32"]  # fmt: skip
    r = CliRunner().invoke(main, [*args, "--shards", str(world["a"].path)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*args, "--shards", str(world["b"].path)])
    assert r.exit_code == 0, r.output
    assert "appended 6 images, 1 aliases and" in r.output  # B's 6 new, its copy of an A image an alias
    covered = C.covered_datasets(C.read_store_attrs(str(out)))
    assert set(covered.values()) == {world["a"].fingerprint, world["b"].fingerprint}
    r = CliRunner().invoke(main, [*args, "--shards", str(world["b"].path), "--dtype", "int8"])
    assert r.exit_code == 1 and "store.dtype" in r.output and "Traceback" not in r.output


def test_vqa_data_appended_to_a_store_without_it_sets_the_answer_vocabulary(world, tmp_path):
    from pipeline.data.shards import DatasetWriter, PreparedDataset

    with DatasetWriter(tmp_path / "snli" / "train", source="synthetic", split="train", shard_size=7) as w:
        for i in range(3):
            w.add_image(f"s-{i}", png_bytes(500 + i), "png")
            w.add_instance(snli_instance(f"s-{i}", f"s-{i}", "train", f"hypothesis {i}"))
    snli = PreparedDataset(tmp_path / "snli" / "train")
    url = str(tmp_path / "v.zarr")
    _extract(world, [snli], url)
    assert not C.read_store_attrs(url)["data"]["vqa_vocab"]
    _extract(world, [snli, world["a"]], url)
    assert (
        world["a"].answer_vocab()
        and C.read_store_attrs(url)["data"]["vqa_vocab"] == world["a"].answer_vocab()
    )
    # The VQA candidate texts the store holds are those built from that vocabulary.
    from tests.test_extract import _all_texts

    attrs = C.read_store_attrs(url)
    assert attrs["data"]["vqa_answer_types"] == answer_types(world["a"].iter_instances())
    types = attrs["data"]["vqa_answer_types"]
    C.TeacherCache(url).text_targets(_all_texts([world["a"]], world["a"].answer_vocab(), types), tokens=False)


def _min_cosine(url: str, ref_url: str, ids: list[str], key: str) -> float:
    """The smallest per-row cosine between two stores' image targets ``key`` for ``ids``."""
    got, ref = C.TeacherCache(url), C.TeacherCache(ref_url)
    a, b = got.image_targets(ids)[key], ref.image_targets(ids)[key]
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def _typed_vqa(path, split: str, seed: int):
    """VQA questions labelled with their answer type (colour, number, yes/no), as VQA v2 and the synthetic world
    label theirs."""
    from pipeline.data.schema import Instance
    from pipeline.data.shards import DatasetWriter, PreparedDataset

    answers = {
        "color": ["red", "blue", "green", "pink"],
        "number": ["one", "two", "three"],
        "yes/no": ["yes", "no"],
    }
    with DatasetWriter(path, source="synthetic", split=split, shard_size=7, image_shard_size=5) as w:
        for i in range(6):
            iid = f"typed-{seed}-{i}"
            w.add_image(iid, png_bytes(7000 + seed * 100 + i), "png")
            for kind, pool in answers.items():
                a = pool[(i + seed) % len(pool)]
                key = f"{iid}-{kind.replace('/', '')}"
                w.add_instance(Instance(
                    key=key, task="vqa", image_id=iid, split=split, question=f"{kind} {i}?", answer=a,
                    human_answers=[a] * 10, meta={"answer_type": kind},
                ))  # fmt: skip
    return PreparedDataset(path)


def test_the_store_records_the_answer_types_its_vqa_candidates_share(world, tmp_path):
    """Extraction records each answer's type beside the vocabulary (data.vqa_answer_types), and the store holds
    exactly the same-type candidates built from the two; a store grown with more data keeps its own."""
    train = _typed_vqa(tmp_path / "t" / "train", "train", 0)
    url = str(tmp_path / "typed.zarr")
    _extract(world, [train], url)
    attrs = C.read_store_attrs(url)
    vocab, types = C.vqa_answer_space(url, attrs)
    assert types == answer_types(train.iter_instances()) and set(types.values()) == {
        "color",
        "number",
        "yes/no",
    }
    held = set(C.read_index(url, attrs).text_ids)
    for inst in train.iter_instances():
        t = instance_texts(inst, vocab, 4, types)
        assert {text_hash(x) for x in t.all()} <= held
        assert len(t.candidates) == {"color": 4, "number": 3, "yes/no": 2}[inst.meta["answer_type"]]
    more = _typed_vqa(tmp_path / "m" / "train", "val", 5)
    _extract(world, [train, more], url)
    grown = C.read_store_attrs(url)
    assert C.vqa_answer_space(url, grown) == (vocab, types) and C.covered_datasets(
        grown
    ) != C.covered_datasets(attrs)


def test_a_store_from_before_the_answer_types_is_stale_and_rebuilt(world, tmp_path):
    """A store holding a VQA vocabulary but no answer types was extracted with distractors from the whole
    vocabulary: resuming or growing it would mix two candidate rules. It is stale (named), rebuilt with
    --rebuild-stale."""
    import zarr

    train = _typed_vqa(tmp_path / "t" / "train", "train", 0)
    url = str(tmp_path / "old.zarr")
    _extract(world, [train], url)
    group = zarr.open_group(url, mode="r+")
    data = dict(group.attrs["data"])
    types = data.pop(C.VQA_ANSWER_TYPES)
    group.attrs["data"] = data
    more = _typed_vqa(tmp_path / "m" / "train", "val", 5)
    for datasets in ([train], [train, more]):  # resumed as it is, or grown
        with pytest.raises(C.StaleCacheError, match=r"old\.zarr.*data\.vqa_answer_types"):
            _extract(world, datasets, url)
    X.UNIT_RUNS.clear()
    m = X.extract([train], url, world["spec"], params(), scheduler="sync", progress=False, rebuild_stale=True)
    assert m["units_skipped"] == 0 and C.read_store_attrs(url)["data"][C.VQA_ANSWER_TYPES] == types
    assert verify_store(url).ok
