"""`extract_teacher` never destroys what it did not make, leaves a complete store byte-identical when it has
nothing to compute, and reports every bad input as one line naming the file: each refusal below asserts the
message and that everything that was there before is unchanged, byte for byte."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline import cache as C
from pipeline import extract as X
from pipeline import lock as L
from pipeline.config import CacheParams
from pipeline.data.errors import DataError
from pipeline.teacher import create_teacher
from stages.extract_teacher import main
from tests.conftest import TINY_CFG, build_dataset

SETS = [
    "cache.image_rows_per_unit=2",
    "cache.text_rows_per_unit=8",
    "cache.batch_size=4",
    "cache.num_workers=0",
    "cache.target_chunk_bytes=2048",
    "teacher.precision=fp32",
]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def cache_params(**kw) -> CacheParams:
    """The in-process twin of SETS."""
    base = dict(
        image_rows_per_unit=2, text_rows_per_unit=8, batch_size=4, num_workers=0, target_chunk_bytes=2048
    )
    return dataclasses.replace(CacheParams(), **{**base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("safety")
    cfg = root / "tiny-safety.json"
    cfg.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    ckpt = root / "teacher.pt"
    torch.save(create_teacher(str(cfg), "").model.state_dict(), ckpt)
    ds = build_dataset(root / "data" / "train", 4)
    (root / "defaults.yaml").write_text("")  # empty: the dataclass defaults, whatever params.yaml says
    spec = X.TeacherSpec(str(cfg), str(ckpt), "fp32", "cpu")
    ref = str(root / "reference.zarr")
    X.extract([ds], ref, spec, cache_params(), scheduler="sync", progress=False)
    return {"root": root, "cfg": str(cfg), "ckpt": str(ckpt), "ds": ds, "spec": spec, "ref": ref}


def stage(world, out, *extra: str, shards: str | Path | None = None, metrics: Path | None = None):
    args = ["--shards", str(shards or world["ds"].path), "--out", str(out), "--model", world["cfg"]]
    args += ["--pretrained", world["ckpt"], "--scheduler", "sync", "--device", "cpu", "--quiet"]
    args += ["--params", str(world["root"] / "defaults.yaml")]
    if metrics is not None:
        args += ["--metrics", str(metrics)]
    for s in SETS:
        args += ["--set", s]
    return CliRunner().invoke(main, [*args, *extra])


def tree(path: Path) -> dict[str, str]:
    """Every file (hidden ones too) and folder under path -> sha256 of its bytes ("dir" for folders)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error_line(r, *needles: str) -> str:
    """The stage failed with exit 1 and a single "Error: …" line holding every needle, and no traceback."""
    assert r.exit_code == 1, r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def copy_store(world, dst: Path) -> Path:
    shutil.copytree(world["ref"], dst)
    return dst


# ------------------------------------------------------------------------------- 1. folders we did not make


@pytest.mark.parametrize("flag", [None, "--overwrite", "--rebuild-stale"])
def test_a_folder_that_is_not_a_store_is_never_written_or_deleted(world, tmp_path, flag):
    out = tmp_path / "X"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("x")
    (out / "sub" / "data.bin").write_bytes(b"\0\1\2")
    before = tree(out)
    r = stage(world, out, *([flag] if flag else []), metrics=tmp_path / "m.json")
    one_error_line(r, str(out), "no zarr.json", "not a clip-td teacher cache", "nothing there was changed")
    assert tree(out) == before  # not even a lock file was written into it
    assert not (tmp_path / "m.json").exists() and not Path(f"{out}{X.REBUILD_SUFFIX}").exists()


def test_a_file_or_a_foreign_zarr_group_is_refused_even_with_overwrite(world, tmp_path):
    f = tmp_path / "cache.zarr"
    f.write_text("my notes")
    r = stage(world, f, "--overwrite")
    one_error_line(r, str(f), "is a file")
    assert f.read_text() == "my notes"

    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs["format"] = "someone-elses"
    before = tree(other)
    for flag in ("--overwrite", "--rebuild-stale"):
        one_error_line(
            stage(world, other, flag), str(other), "'someone-elses'", "not a clip-td teacher cache"
        )
        assert tree(other) == before


@pytest.mark.parametrize("where", ["same", "inside", "contains", "inside-parent"])
def test_out_overlapping_a_shards_folder_is_refused(world, tmp_path, where):
    data = tmp_path / "data"
    shutil.copytree(world["ds"].path, data / "train")
    before = tree(data)
    shards, out = (
        data / "train",
        {
            "same": data / "train",
            "inside": data / "train" / "cache.zarr",
            "contains": data,
            "inside-parent": data / "cache.zarr",  # --shards names the folder of datasets
        }[where],
    )
    if where == "inside-parent":
        shards = data
    rel = {"same": " is ", "inside": "is inside", "contains": "contains", "inside-parent": "is inside"}[where]
    one_error_line(stage(world, out, "--overwrite", shards=shards), str(out), rel, "outside the datasets")
    assert tree(data) == before


def test_an_empty_folder_becomes_the_store(world, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    r = stage(world, out, metrics=tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    assert C.TeacherCache(str(out)).verify() == [] and L.read_lock(str(out)) is None


def test_api_create_and_remove_touch_only_a_store(tmp_path):
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(C.CacheFormatError, match="no zarr.json.*not a clip-td teacher cache"):
        C.remove_store(str(foreign))
    lay = C.StoreLayout(n_images=1, n_texts=1, embed_dim=4, num_patches=1)
    with pytest.raises(C.CacheFormatError, match="not a clip-td teacher cache"):
        C.create_store(str(foreign), lay, {}, ["a"], ["t"], [2], __import__("numpy").array([0, 2]))
    assert tree(foreign) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}


# --------------------------------------------------------------------- 2. a replacement is built beside


def test_failed_overwrite_leaves_the_previous_store_byte_identical(world, tmp_path, monkeypatch):
    url = str(copy_store(world, tmp_path / "s.zarr"))
    before = tree(Path(url))
    monkeypatch.setenv(X.FAIL_ENV, "image-000001")
    with pytest.raises(X.InjectedFailure):
        X.extract([world["ds"]], url, world["spec"], cache_params(), "sync", False, overwrite=True)
    assert tree(Path(url)) == before  # the rebuild ran beside it
    tmp = Path(url + X.REBUILD_SUFFIX)
    assert sorted(C.committed_units(str(tmp))) == ["image-000000"]
    monkeypatch.delenv(X.FAIL_ENV)
    # --overwrite starts its rebuild over (never resumes one), then swaps it in.
    X.UNIT_RUNS.clear()
    m = X.extract([world["ds"]], url, world["spec"], cache_params(), "sync", False, overwrite=True)
    assert m["units_skipped"] == 0 and "image-000000" in X.UNIT_RUNS and m["store"] == url
    assert not tmp.exists() and not list(tmp_path.glob("s.zarr.tmp-*")) and L.read_lock(url) is None
    assert C.TeacherCache(url).verify() == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_stale_rebuild_resumes_beside_and_swaps_in_when_complete(world, tmp_path, monkeypatch, exchange):
    if not exchange:  # a kernel or filesystem without RENAME_EXCHANGE
        monkeypatch.setattr(C.store, "_exchange", lambda a, b: False)
    url = str(copy_store(world, tmp_path / "s.zarr"))
    before = tree(Path(url))
    # The old store of an earlier swap whose deletion was cut short (its zarr.json, deleted last, remains).
    trash = copy_store(world, tmp_path / f"s.zarr{C.TRASH_INFIX}0123")
    shutil.rmtree(trash / "image")
    stale = cache_params(compressor="lz4")
    monkeypatch.setenv(X.FAIL_ENV, "image-000001")
    with pytest.raises(X.InjectedFailure):
        X.extract([world["ds"]], url, world["spec"], stale, "sync", False, rebuild_stale=True)
    assert tree(Path(url)) == before and L.read_lock(url) is None
    with pytest.raises(C.StaleCacheError, match="store.compressor"):  # without the flag: refused as before
        X.extract([world["ds"]], url, world["spec"], stale, "sync", False)
    assert tree(Path(url)) == before
    monkeypatch.delenv(X.FAIL_ENV)
    X.UNIT_RUNS.clear()
    m = X.extract([world["ds"]], url, world["spec"], stale, "sync", False, rebuild_stale=True)
    assert m["units_skipped"] == 1 and "image-000000" not in X.UNIT_RUNS  # the rebuild was resumed
    g = C.open_group(url)
    assert g.attrs["fingerprint"]["store"]["compressor"] == "lz4" and g.attrs["complete"]
    assert C.TeacherCache(url).verify() == [] and L.read_lock(url) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no rebuild or old store left


def test_a_rebuild_whose_swap_was_cut_short_is_moved_into_place_not_recomputed(world, tmp_path):
    """Between the two renames of a swap without RENAME_EXCHANGE: the store is gone, its complete rebuild
    beside it, the old store renamed aside (whose zarr.json was written first, so it is recognisable)."""
    out = tmp_path / "s.zarr"
    copy_store(world, Path(f"{out}{X.REBUILD_SUFFIX}"))
    copy_store(world, Path(f"{out}{C.TRASH_INFIX}0123"))
    X.UNIT_RUNS.clear()
    m = X.extract([world["ds"]], str(out), world["spec"], cache_params(), "sync", False, rebuild_stale=True)
    assert m["units_computed"] == 0 and X.UNIT_RUNS == []
    assert tree(out) == tree(Path(world["ref"]))  # moved as it was: nothing rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"] and L.read_lock(str(out)) is None


# ------------------------------------------------------------------------ 3. a no-op rerun writes nothing


def test_rerun_on_a_complete_store_leaves_it_byte_identical(world, tmp_path, monkeypatch):
    out = copy_store(world, tmp_path / "s.zarr")
    before = tree(out)
    monkeypatch.chdir(tmp_path)  # the pipeline's metrics/extract.json would be here
    r = stage(world, out)
    assert r.exit_code == 0, r.output
    assert tree(out) == before
    m = json.loads(Path(f"{out}.extract.json").read_text())  # the default metrics follow the store
    assert m["units_computed"] == 0 and m["store"] == str(out)
    assert not (tmp_path / "metrics").exists()
    (tmp_path / "target.txt").write_text("keep")
    (tmp_path / "m.json").symlink_to(tmp_path / "target.txt")  # a link where the metrics go is not followed
    r = stage(world, out, "--rebuild-stale", metrics=tmp_path / "m.json")  # dvc.yaml's flags: still a no-op
    assert r.exit_code == 0 and tree(out) == before
    assert (tmp_path / "target.txt").read_text() == "keep" and not (tmp_path / "m.json").is_symlink()
    assert json.loads((tmp_path / "m.json").read_text())["units_computed"] == 0


# --------------------------------------------------------------------------- 4. damaged inputs: one line


@pytest.mark.parametrize(
    ("name", "damage", "says"),
    [
        ("dataset.json", lambda t: t[: len(t) // 2], "not valid JSON"),
        ("dataset.json", lambda t: "[1, 2]", "expected a JSON object"),
        ("dataset.json", lambda t: json.dumps({**json.loads(t), "image_shards": 5}), "image_shards"),
        ("images.index.json", lambda t: t[: len(t) // 2], "not valid JSON"),
        ("images.index.json", lambda t: json.dumps({**json.loads(t), "img-1": "garbage"}), "img-1"),
    ],
)
def test_damaged_dataset_metadata_is_one_line_naming_the_file(world, tmp_path, name, damage, says):
    data = tmp_path / "train"
    shutil.copytree(world["ds"].path, data)
    f = data / name
    f.write_text(damage(f.read_text()))
    before = tree(data)
    out = tmp_path / "s.zarr"
    one_error_line(stage(world, out, shards=data), str(f), says)
    assert tree(data) == before and not out.exists()
    with pytest.raises(DataError, match=name):
        X.open_datasets([data])


def test_missing_index_is_one_line_naming_it(world, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(world["ds"].path, data)
    (data / "images.index.json").unlink()
    one_error_line(stage(world, tmp_path / "s.zarr", shards=data), "images.index.json")


@pytest.mark.parametrize("flag", [None, "--overwrite", "--rebuild-stale"])
def test_truncated_root_metadata_is_one_line_and_the_store_is_kept(world, tmp_path, flag):
    out = copy_store(world, tmp_path / "s.zarr")
    meta = out / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    before = tree(out)
    one_error_line(stage(world, out, *([flag] if flag else [])), str(meta), "not valid JSON")
    assert tree(out) == before


def test_truncated_array_metadata_is_one_line_naming_it(world, tmp_path):
    out = copy_store(world, tmp_path / "s.zarr")
    meta = out / "image" / "tokens" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    before = tree(out)
    one_error_line(stage(world, out), str(meta), "not valid JSON")
    assert tree(out) == before


def test_garbage_manifest_entry_is_one_line_naming_it(world, tmp_path):
    out = copy_store(world, tmp_path / "s.zarr")
    entry = out / C.MANIFEST / "image-000001.json"
    entry.write_text("garbage{")
    before = tree(out)
    one_error_line(stage(world, out), str(entry), "not valid JSON", "delete that file")
    assert tree(out) == before
    entry.write_text("[1, 2, 3]")  # valid JSON, not an entry
    one_error_line(stage(world, out), str(entry), "not a manifest entry")


def test_rebuild_killed_mid_unit_resumes_and_the_old_store_survives_until_the_swap(world, tmp_path):
    """SIGKILL (no finally: the lock stays behind in the store) while a --rebuild-stale run writes a unit."""
    import signal
    import subprocess
    import sys

    out = copy_store(world, tmp_path / "s.zarr")
    before = tree(out)
    args = ["--shards", str(world["ds"].path), "--out", str(out), "--model", world["cfg"], "--pretrained"]
    args += [world["ckpt"], "--scheduler", "sync", "--device", "cpu", "--quiet", "--rebuild-stale"]
    args += ["--params", str(world["root"] / "defaults.yaml"), "--set", "cache.compressor=lz4"]
    for s in SETS:
        args += ["--set", s]
    code = "import runpy; runpy.run_module('stages.extract_teacher', run_name='__main__')"
    env = {**os.environ, X.FAIL_ENV: "image-000001:kill", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert L.read_lock(str(out)) is not None  # the killed holder's lock
    assert {k: v for k, v in tree(out).items() if k != C.LOCK_FILE} == before
    assert sorted(C.committed_units(str(out) + X.REBUILD_SUFFIX)) == ["image-000000"]
    X.UNIT_RUNS.clear()
    r = CliRunner().invoke(main, args)  # the same command again, in this process
    assert r.exit_code == 0, r.output
    assert "image-000000" not in X.UNIT_RUNS and "image-000001" in X.UNIT_RUNS
    assert C.open_group(str(out)).attrs["fingerprint"]["store"]["compressor"] == "lz4"
    assert C.TeacherCache(str(out)).verify() == [] and L.read_lock(str(out)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "s.zarr.extract.json"]


def test_an_interrupted_rebuild_of_data_whose_answers_changed_resumes_beside_the_store(tmp_path, monkeypatch):
    """--rebuild-stale planned with the old store's VQA vocabulary, so its check of the rebuild beside the
    store, made from this data's own, never matched: every rerun threw the rebuild away and began again."""
    from pipeline.data.shards import DatasetWriter, PreparedDataset
    from tests.conftest import png_bytes, vqa_instance

    answers = ["red", "blue", "green", "cube", "ball", "two", "three", "yes", "no"]

    def prepared(seed: int, shift: int) -> PreparedDataset:
        out = tmp_path / "data" / "train"
        shutil.rmtree(out, ignore_errors=True)
        with DatasetWriter(out, source="synthetic", split="train", shard_size=7, image_shard_size=5) as w:
            for i in range(8):
                w.add_image(f"img-{i}", png_bytes(seed + i), "png")
                w.add_instance(vqa_instance(f"q-{i}", f"img-{i}", "train", f"what is in picture {i}?",
                                            answers[(i * i + shift) % len(answers)]))  # fmt: skip
        return PreparedDataset(out)

    (tmp_path / "t.json").write_text(json.dumps(TINY_CFG))
    spec, url = (str(tmp_path / "t.json"), "", "fp32"), str(tmp_path / "store.zarr")
    cp = CacheParams(image_rows_per_unit=2, text_rows_per_unit=8, batch_size=4, num_workers=0)
    X.extract([prepared(0, 0)], url, spec, cp, scheduler="sync", progress=False)
    again = prepared(100, 3)  # prepared again: other bytes, another answer vocabulary
    monkeypatch.setenv(X.FAIL_ENV, "text-000001")
    with pytest.raises(X.InjectedFailure):
        X.extract([again], url, spec, cp, scheduler="sync", progress=False, rebuild_stale=True)
    monkeypatch.delenv(X.FAIL_ENV)
    m = X.extract([again], url, spec, cp, scheduler="sync", progress=False, rebuild_stale=True)
    assert "image-000000" not in m["computed_units"] and "text-000001" in m["computed_units"], m[
        "computed_units"
    ]
    assert C.TeacherCache(url).attrs["data"]["vqa_vocab"] == again.answer_vocab()
