"""Reliability of extraction and training, proved by injecting the faults: SIGKILL at random points, a second
writer, bad input, stale caches and non-finite numbers. Each fault either fails naming the place or is
skipped and counted under the policy, and never leaves a partly written unit committed."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from fsspec.implementations.memory import MemoryFileSystem

from pipeline import cache as C
from pipeline import extract as X
from pipeline import lock as L
from pipeline import process
from pipeline.config import CacheParams, SyntheticParams
from pipeline.data import synthetic
from pipeline.data.errors import DataError
from pipeline.data.shards import DatasetWriter, PreparedDataset, decode_image
from pipeline.teacher import create_teacher
from tests.conftest import TINY_CFG, build_dataset, png_bytes, tiny_student_params, vqa_instance

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 16
# Small units so a run holds many (8 image units of 2 rows, ~10 text units of 4 texts): kills land among them.
# Image shards of one row and batches of one image: each image unit writes its first shard behind its second
# forward, so kills also land between a unit's shard writes.
UNIT_SETS = [
    "cache.image_rows_per_unit=2",
    "cache.image_shard_bytes=1",
    "cache.text_rows_per_unit=4",
    "cache.batch_size=1",
    "cache.num_workers=0",
    "cache.target_chunk_bytes=2048",
    "teacher.precision=fp32",
]
# The stage in a subprocess, with the extract logger at DEBUG so stderr names every unit a run starts.
STAGE = (
    "import logging, runpy; logging.getLogger('clip_td.extract').setLevel(logging.DEBUG); "
    "runpy.run_module('stages.extract_teacher', run_name='__main__')"
)
UNIT_START = re.compile(r"unit ((?:image|text)-\d{6}): start")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def cache_params(**kw) -> CacheParams:
    """The in-process twin of UNIT_SETS (byte-equal results with the stage's subprocess)."""
    base = dict(
        image_rows_per_unit=2, image_shard_bytes=1, text_rows_per_unit=4, batch_size=1, num_workers=0,
        target_chunk_bytes=2048,
    )  # fmt: skip
    return dataclasses.replace(CacheParams(), **{**base, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rel")
    cfg = root / "tiny-rel.json"
    cfg.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    ckpt = root / "teacher.pt"
    torch.save(create_teacher(str(cfg), "").model.state_dict(), ckpt)
    ds = build_dataset(root / "data" / "train", N_IMAGES)
    spec = X.TeacherSpec(str(cfg), str(ckpt), "fp32", "cpu")
    return {
        "root": root,
        "cfg": str(cfg),
        "ckpt": str(ckpt),
        "ds": ds,
        "spec": spec,
        "teacher": X.get_teacher(spec),
    }


@pytest.fixture(scope="module")
def reference(world) -> dict:
    """An uninterrupted extraction: what every interrupted, refused or retried one must end up equal to."""
    url = str(world["root"] / "reference.zarr")
    m = X.extract([world["ds"]], url, world["spec"], cache_params(), scheduler="sync", progress=False)
    return {"url": url, "metrics": m, "units": C.committed_units(url)}


def assert_same_store(url: str, ref: str) -> None:
    """Byte-equal arrays and equal manifest checksums: no row lost, doubled or different."""
    a, b = C.open_group(url, mode="r"), C.open_group(ref, mode="r")
    for group in ("image", "text"):
        for name, arr in b[group].arrays():
            got = a[f"{group}/{name}"][:]
            assert got.dtype == arr.dtype and got.tobytes() == arr[:].tobytes(), f"{group}/{name} differs"
    got, want = C.committed_units(url), C.committed_units(ref)
    assert sorted(got) == sorted(want)
    for unit, rec in want.items():
        assert {k: v["crc32"] for k, v in got[unit]["arrays"].items()} == {
            k: v["crc32"] for k, v in rec["arrays"].items()
        }, unit
    assert C.TeacherCache(url).verify() == []


def _stage_args(world, url: str, metrics: Path) -> list[str]:
    args = ["--shards", str(world["ds"].path), "--out", url, "--model", world["cfg"], "--pretrained"]
    args += [world["ckpt"], "--scheduler", "sync", "--device", "cpu", "--metrics", str(metrics)]
    (world["root"] / "defaults.yaml").write_text("")  # empty: the dataclass defaults
    args += ["--params", str(world["root"] / "defaults.yaml")]
    for s in UNIT_SETS:
        args += ["--set", s]
    return args


def start_stage(world, url: str, metrics: Path, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-c", STAGE, *_stage_args(world, url, metrics)],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _committed_names(url: str) -> set[str]:
    folder = Path(url) / C.MANIFEST
    return (
        {p[: -len(".json")] for p in os.listdir(folder) if p.endswith(".json")} if folder.exists() else set()
    )


# --------------------------------------------------------------------------------------- 1. SIGKILL resume


def test_sigkill_at_random_points_resumes_to_the_uninterrupted_store(world, reference, tmp_path):
    rounds = int(os.environ.get("CLIP_TD_KILL_ROUNDS", "5"))
    rng = random.Random(int(os.environ.get("CLIP_TD_KILL_SEED", "0")))
    url = str(tmp_path / "killed.zarr")
    planned = set(reference["units"])
    before: dict[str, dict] = {}
    started_ever: list[str] = []
    in_flight_prev: set[str] = set()
    kills = 0
    for r in range(rounds):
        if r == 0:
            # The worst place, deterministically: image-000002 has written its first array, not committed.
            proc = start_stage(world, url, tmp_path / "m.json", **{X.FAIL_ENV: "image-000002:kill"})
        else:
            proc = start_stage(world, url, tmp_path / "m.json")
            target = len(before) + rng.randint(1, 3)
            deadline = time.time() + 60
            while proc.poll() is None and len(_committed_names(url)) < target and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))  # lands anywhere: computing, writing shards, committing
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # reaps the child: a zombie would look like a live lock holder
        if proc.returncode == 0:
            break  # it finished before the kill: nothing left to interrupt
        assert proc.returncode == -signal.SIGKILL, err[-3000:]
        kills += 1
        after = C.committed_units(url)
        started = UNIT_START.findall(err)
        if r > 0:
            assert "taking over a stale lock" in err  # the killed holder's lock, recognised by its dead pid
        # Units committed before this run were never recomputed: not started again, records untouched.
        assert not set(started) & set(before), (started, sorted(before))
        assert all(after[u] == rec for u, rec in before.items())
        # The kill lost at most the one unit in flight, and only that one is ever computed twice.
        in_flight = set(started) - set(after)
        assert len(in_flight) <= 1, in_flight
        assert set(started) & set(started_ever) <= in_flight_prev
        assert set(after) <= planned
        if r == 0:
            assert started[-1] == "image-000002" and "image-000002" not in after
            # Its first array written (sorted: image/pooled, row 4 = shard 4) is on disk, part of a unit.
            assert (Path(url) / "image" / "pooled" / "c" / "4" / "0").exists()
            assert (Path(url) / C.LOCK_FILE).exists()  # no finally ran
        started_ever += started
        print(f"kill {kills}: units started {started}, committed {len(after)}, lost in flight {in_flight}")
        in_flight_prev = in_flight
        before = after
    assert kills >= min(rounds, 2), f"only {kills} kills landed"

    proc = start_stage(world, url, tmp_path / "final.json")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    m = json.loads((tmp_path / "final.json").read_text())
    started = UNIT_START.findall(err)
    assert not set(started) & set(before) and set(started) & set(started_ever) <= in_flight_prev
    assert (m["units_skipped"], m["units_computed"]) == (len(before), len(planned) - len(before))
    assert set(m["computed_units"]) == planned - set(before)
    assert "image-000002" in set(started_ever) | set(started)  # the half-written unit was recomputed
    assert not (Path(url) / C.LOCK_FILE).exists()
    assert_same_store(url, reference["url"])
    print(f"{kills} kills; units started per run: {len(started_ever)} before the final run + {len(started)}")


# ------------------------------------------------------------------------------------ 2. concurrent writers


def test_second_writer_is_refused_naming_the_holder(world, reference, tmp_path):
    from click.testing import CliRunner

    from stages.extract_teacher import main

    url = str(tmp_path / "shared.zarr")
    proc = start_stage(world, url, tmp_path / "first.json")
    try:
        deadline = time.time() + 60
        while L.read_lock(url) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        holder = L.read_lock(url)
        assert holder is not None and holder["pid"] == proc.pid
        with pytest.raises(L.StoreLocked) as e:
            X.extract([world["ds"]], url, world["spec"], cache_params(), scheduler="sync", progress=False)
        msg = str(e.value)
        assert url in msg and f"pid {proc.pid}" in msg and socket.gethostname() in msg
        assert holder["started"] in msg and C.LOCK_FILE in msg
        r = CliRunner().invoke(main, _stage_args(world, url, tmp_path / "second.json"))
        assert r.exit_code == 1 and "is locked by" in r.output and url in r.output
    finally:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert not (tmp_path / "second.json").exists()
    assert_same_store(url, reference["url"])  # the refused writer changed nothing: no row lost or doubled
    ids = C.open_group(url, mode="r")["image/ids"][:].tolist()
    assert sorted(ids) == sorted(f"img-{i}" for i in range(N_IMAGES))


def test_lock_is_atomic_released_and_names_the_holder(tmp_path):
    url = str(tmp_path / "s.zarr")
    results: list[str] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        try:
            L.StoreLock(url).acquire()
            results.append("won")
        except L.StoreLocked:
            results.append("refused")

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 7 + ["won"]  # O_EXCL: exactly one of simultaneous writers
    os.unlink(Path(url) / C.LOCK_FILE)
    with pytest.raises(RuntimeError, match="boom"), L.StoreLock(url):
        assert L.read_lock(url)["pid"] == os.getpid()
        raise RuntimeError("boom")
    assert L.read_lock(url) is None  # released in the finally


def _write_lock(url: str, **holder) -> None:
    Path(url).mkdir(parents=True, exist_ok=True)
    info = {**L.holder_info("test"), **holder}
    (Path(url) / C.LOCK_FILE).write_text(json.dumps(info))


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while process.proc_state(zombie.pid) not in ("Z", ""):  # exited, not yet reaped
        time.sleep(0.01)
    cases = {
        "dead": ({"pid": dead.pid, "proc_start": None}, "is not running"),
        "zombie": ({"pid": zombie.pid, "proc_start": None}, "zombie"),
        "reused": ({"pid": os.getppid(), "proc_start": 1}, "now belongs to another process"),
        "garbage": (None, "no valid pid"),
    }
    for name, (holder, why) in cases.items():
        url = str(tmp_path / f"{name}.zarr")
        if holder is None:
            Path(url).mkdir()
            (Path(url) / C.LOCK_FILE).write_text("{half a json")  # a writer killed while writing its lock
        else:
            _write_lock(url, **holder)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clip_td.lock"), L.StoreLock(url):
            assert L.read_lock(url)["pid"] == os.getpid()
        assert "taking over a stale lock" in caplog.text and why in caplog.text, name
        assert L.read_lock(url) is None
    zombie.wait()


def test_lock_of_another_host_or_live_process_is_never_broken(tmp_path):
    url = str(tmp_path / "s.zarr")
    _write_lock(url, host="elsewhere.example", pid=12345)
    with pytest.raises(L.StoreLocked, match=r"pid 12345 on host elsewhere\.example.*delete .*\.lock"):
        L.StoreLock(url).acquire()
    _write_lock(url, pid=os.getppid(), proc_start=process.proc_start(os.getppid()))  # alive, same host
    with pytest.raises(L.StoreLocked, match=f"pid {os.getppid()}"):
        L.StoreLock(url).acquire()
    assert L.read_lock(url)["pid"] == os.getppid()  # untouched


def test_lock_on_an_fsspec_url_is_best_effort(tmp_path):
    url = "memory://rel-lock/s.zarr"
    with L.StoreLock(url):
        assert fsspec.filesystem("memory").exists("/rel-lock/s.zarr/.lock")
        with pytest.raises(L.StoreLocked, match="memory://rel-lock/s.zarr"):
            L.StoreLock(url).acquire()
    assert L.read_lock(url) is None


# ------------------------------------------------------------------------------------------ 3. bad inputs


def _copy_dataset(world, dst: Path) -> Path:
    shutil.copytree(world["ds"].path, dst)
    return dst


def _rewrite_instance(tar_path: Path, key: str, edit) -> None:
    """Replace one instance sample's JSON in a prepared shard, bypassing DatasetWriter's validation (what a
    hand-edited or foreign-written shard looks like)."""
    with tarfile.open(tar_path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar_path, "w") as out:
        for m, data in members:
            if m.name == f"{key}.json":
                obj = json.loads(data)
                edit(obj)
                data = json.dumps(obj).encode()
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))


def _shard_of(ds_path: Path, key: str) -> Path:
    for p in sorted(ds_path.glob("instances-*.tar")):
        with tarfile.open(p) as tf:
            if f"{key}.json" in tf.getnames():
                return p
    raise AssertionError(key)


def test_truncated_image_shard_names_the_images_and_commits_nothing_partial(world, reference, tmp_path):
    path = _copy_dataset(world, tmp_path / "trunc")
    shard = path / "images-000001.tar"  # images 5..9 (5 per image shard)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 3)
    ds = PreparedDataset(path)
    broken = []
    for image_id in ds.image_ids():
        try:
            ds.image_bytes(image_id)
        except DataError:
            broken.append(image_id)
    assert broken and broken[0] != ds.image_ids()[0]
    first_bad_unit = f"image-{ds.image_ids().index(broken[0]) // 2:06d}"
    url = str(tmp_path / "t.zarr")
    with pytest.raises(X.ImageError, match=rf"trunc.*{broken[0]}.*truncated image"):
        X.extract([ds], url, world["spec"], cache_params(), scheduler="sync", progress=False)
    assert first_bad_unit not in C.committed_units(url) and L.read_lock(url) is None
    m = X.extract([ds], url, world["spec"], cache_params(on_error="skip"), "sync", False, rebuild_stale=True)
    assert m["images_invalid"] == len(broken) and m["invalid_images"] == sorted(broken)
    assert not C.TeacherCache(url).image_targets(broken)["valid"].any()


def test_truncated_instance_shard_fails_naming_the_shard(world, tmp_path):
    path = _copy_dataset(world, tmp_path / "trunc")
    shard = path / "instances-000000.tar"
    with open(shard, "r+b") as f:  # cut on a member boundary: tarfile alone would just see fewer members
        f.truncate(10240)
    url = str(tmp_path / "t.zarr")
    with pytest.raises(DataError, match=r"instances-000000\.tar: tar: truncated shard"):
        X.extract([PreparedDataset(path)], url, world["spec"], cache_params(), "sync", False)
    assert not C.store_exists(url) and L.read_lock(url) is None


@pytest.mark.parametrize(
    ("key", "edit", "match"),
    [
        ("vqa-3", lambda o: o.pop("question"), r"vqa-3: invalid instance: .*'question': empty"),
        ("snli-4", lambda o: o.update(label=7), r"snli-4: invalid instance: .*'label': 7 outside 0\.\.2"),
        ("vcr-5", lambda o: o.update(label=-1), r"vcr-5: invalid instance: .*'label': -1 outside 0\.\.3"),
        (
            "vcr-6",
            lambda o: o.update(colour="red"),
            r"vcr-6: invalid instance: .*unknown fields \['colour'\]",
        ),
    ],
)
def test_invalid_instance_fails_naming_shard_and_key(world, tmp_path, key, edit, match):
    path = _copy_dataset(world, tmp_path / "bad")
    shard = _shard_of(path, key)
    _rewrite_instance(shard, key, edit)
    url = str(tmp_path / "b.zarr")
    for on_error in ("fail", "skip"):  # a schema violation means a corrupt shard: never silently skipped
        with pytest.raises(DataError, match=rf"{shard.name}: {match}"):
            X.extract(
                [PreparedDataset(path)], url, world["spec"], cache_params(on_error=on_error), "sync", False
            )
    assert not C.store_exists(url)


def test_empty_inputs_fail_clearly(world, tmp_path):
    with pytest.raises(DataError, match=r"no datasets.*nothing to extract: 0 images, 0 texts"):
        X.extract([], str(tmp_path / "e.zarr"), world["spec"], cache_params(), "sync", False)
    with DatasetWriter(tmp_path / "blank", source="synthetic", split="test") as w:  # every text is blank
        w.add_image("img-0", png_bytes(0), "png")
        w.add_instance(vqa_instance("q0", "img-0", "test", "   ", ""))
    ds = PreparedDataset(tmp_path / "blank")
    with pytest.raises(X.TextError, match="q0: empty teacher text"):
        X.extract([ds], str(tmp_path / "b.zarr"), world["spec"], cache_params(), "sync", False)
    with pytest.raises(
        DataError, match=r"blank.*nothing to extract: 1 images, 0 texts .*1 empty texts skipped"
    ):
        X.extract([ds], str(tmp_path / "b.zarr"), world["spec"], cache_params(on_error="skip"), "sync", False)
    assert not C.store_exists(str(tmp_path / "b.zarr"))


class _ReadOnlyMemory(MemoryFileSystem):
    """An fsspec filesystem whose every write is refused, as a read-only bucket or mount would."""

    protocol = "romem"

    def pipe_file(self, path, value, **kwargs):
        raise PermissionError(errno.EACCES, "read-only filesystem", path)

    def mkdir(self, path, create_parents=True, **kwargs):
        raise PermissionError(errno.EACCES, "read-only filesystem", path)

    makedirs = mkdir


@pytest.mark.parametrize("how", ["chmod", "erofs", "fsspec"])
def test_read_only_store_location_fails_naming_the_path(world, tmp_path, monkeypatch, how):
    ro = tmp_path / "ro"
    ro.mkdir()
    url = str(ro / "cache.zarr")
    if how == "chmod":
        ro.chmod(0o500)
        if os.access(ro, os.W_OK):  # root ignores mode bits; the erofs case covers this machine
            ro.chmod(0o700)
            pytest.skip("running as root: permission bits do not stop writes here")
    elif how == "erofs":
        real_makedirs = os.makedirs

        def makedirs(p, *a, **k):  # what a read-only mount answers (EROFS), injected where the lock writes
            if str(p).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
            return real_makedirs(p, *a, **k)

        monkeypatch.setattr(L.os, "makedirs", makedirs)
    else:
        fsspec.register_implementation("romem", _ReadOnlyMemory, clobber=True)
        url = "romem://ro/cache.zarr"
    X.UNIT_RUNS.clear()
    try:
        with pytest.raises(L.StoreNotWritable, match=r"cannot write .*(ro|cache\.zarr).*read-only") as e:
            X.extract([world["ds"]], url, world["spec"], cache_params(), "sync", False)
    finally:
        ro.chmod(0o700)
    assert url in str(e.value) and X.UNIT_RUNS == []  # refused before any work


def test_write_error_mid_unit_names_the_unit_and_a_rerun_completes(world, reference, tmp_path, monkeypatch):
    """A shard write that fails (unit image-000001's second shard; its first was written behind its second
    forward) stops the unit before it commits, naming unit, array and rows; a rerun recomputes that unit."""
    from pipeline.cache.direct import DirectArray

    url = str(tmp_path / "w.zarr")
    real, real_direct = zarr.Array.__setitem__, DirectArray.write_rows

    def flaky(self, selection, value):
        if self.path == "image/tokens" and selection == slice(3, 4):  # after that shard's image/pooled
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, selection, value)

    def flaky_direct(self, start, a):  # image shards are written past zarr where the layout allows it
        if self.path == "image/tokens" and start == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_direct(self, start, a)

    monkeypatch.setattr(zarr.Array, "__setitem__", flaky)
    monkeypatch.setattr(DirectArray, "write_rows", flaky_direct)
    with pytest.raises(
        X.UnitWriteError, match=r"unit image-000001: writing image/tokens rows \[3, 4\) .*No space"
    ):
        X.extract([world["ds"]], url, world["spec"], cache_params(), scheduler="sync", progress=False)
    committed = C.committed_units(url)
    assert "image-000000" in committed and "image-000001" not in committed
    assert np.abs(C.open_group(url)["image/pooled"][2:4]).sum(axis=1).all()  # both its shards began
    monkeypatch.setattr(zarr.Array, "__setitem__", real)
    monkeypatch.setattr(DirectArray, "write_rows", real_direct)
    X.UNIT_RUNS.clear()
    m = X.extract([world["ds"]], url, world["spec"], cache_params(), scheduler="sync", progress=False)
    assert "image-000001" in X.UNIT_RUNS and m["units_skipped"] == 1
    assert_same_store(url, reference["url"])


# ---------------------------------------------------------------------------------------- 4. stale caches


def test_stale_preprocessing_and_codec_are_refused_naming_fields(world, reference, tmp_path):
    big = tmp_path / "tiny-rel-40.json"  # same model at another input size: other preprocessing
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["vision_cfg"]["image_size"] = 40
    big.write_text(json.dumps(cfg))
    url, ds = reference["url"], [world["ds"]]
    with pytest.raises(C.StaleCacheError, match=r"teacher\.preprocess_sha256") as e:
        X.extract(ds, url, X.TeacherSpec(str(big), "", "fp32", "cpu"), cache_params(), "sync", False)
    assert {"teacher.preprocess_sha256", "teacher.config_sha256", "teacher.grid"} <= set(e.value.fields)
    with pytest.raises(C.StaleCacheError, match=r"differing fields: store\.compressor;"):
        X.extract(ds, url, world["spec"], cache_params(compressor="lz4"), "sync", False)
    # Other data is not stale: the store grows to cover it (tests/test_cache_growth.py).
    assert C.TeacherCache(url).verify() == [] and L.read_lock(url) is None  # refusals touch nothing


# ------------------------------------------------------------------------------------------------- 5. NaN


def _poison(monkeypatch, world, targets: dict[str, tuple[str, float]]) -> None:
    """Make the teacher return ``value`` in output ``key`` for the images named in ``targets``."""
    teacher = world["teacher"]
    want = {
        i: (teacher.preprocess(decode_image(world["ds"].image_bytes(i))), key, v)
        for i, (key, v) in targets.items()
    }
    real = teacher.encode_images

    def encode_images(pixels, relevance=()):
        out = real(pixels, relevance=relevance)
        for px, key, v in want.values():
            hit = (pixels - px).flatten(1).abs().amax(1) < 1e-4
            out[key][hit] = v
        return out

    monkeypatch.setattr(teacher, "encode_images", encode_images)


def test_nonfinite_rows_agrees_with_isfinite_on_every_float16_bit_pattern():
    """The unit screen tests float16 on its bits; every one of the 65,536 patterns (NaN payloads, ±Inf,
    65504, subnormals, -0) must be judged as np.isfinite judges it, in any row and column."""
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    want = ~np.isfinite(values)
    assert want.sum() == 2 * 1024  # 2 signs × 1,024 mantissas with the exponent all ones
    assert X.nonfinite_rows(values[:, None]).tolist() == want.tolist()
    rng = np.random.default_rng(0)
    rows = np.zeros((64, 3, 5), np.float16)
    hits = rng.choice(len(values), 16)
    for r, h in enumerate(hits):
        rows[r, rng.integers(3), rng.integers(5)] = values[h]
    assert X.nonfinite_rows(rows).tolist() == [bool(want[h]) for h in hits] + [False] * 48
    # Blocks of one row, of 7 (not dividing 64) and of all rows at once.
    for block in (1, 7 * rows[0].nbytes, rows.nbytes):
        assert X.nonfinite_rows(rows, block).tolist() == X.nonfinite_rows(rows).tolist()
    # A strided view (view 0 of [N, K, P, E]) and float32 (isfinite) give the same answer.
    assert X.nonfinite_rows(np.stack([rows, rows], 1)[:, 0]).tolist() == X.nonfinite_rows(rows).tolist()
    assert X.nonfinite_rows(rows.astype(np.float32)).tolist() == X.nonfinite_rows(rows).tolist()
    assert X.nonfinite_rows(np.zeros((0, 4), np.float16)).tolist() == []


def test_nonfinite_teacher_output_fails_or_is_marked_invalid(world, tmp_path, monkeypatch):
    _poison(monkeypatch, world, {"img-5": ("tokens", float("nan")), "img-12": ("pooled", float("inf"))})
    url = str(tmp_path / "nan.zarr")
    with pytest.raises(X.NonFiniteOutput, match=r"unit image-000002: .*NaN/Inf in image/tokens.*'img-5'"):
        X.extract([world["ds"]], url, world["spec"], cache_params(), scheduler="sync", progress=False)
    assert "image-000002" not in C.committed_units(url)
    m = X.extract(
        [world["ds"]], url, world["spec"], cache_params(on_error="skip"), "sync", False, rebuild_stale=True
    )
    assert m["images_nonfinite"] == 2 and m["invalid_images"] == ["img-12", "img-5"]
    assert np.isfinite(m["reconstruction_cosine"]["mean"])
    t = C.TeacherCache(url).image_targets(["img-5", "img-12", "img-4"])
    assert t["valid"].tolist() == [False, False, True]
    assert float(t["tokens"][:2].abs().sum() + t["pooled"][:2].abs().sum()) == 0.0  # zero-filled, not NaN
    g = C.open_group(url, mode="r")
    assert all(np.isfinite(g[k][:].astype(np.float32)).all() for k in ("image/tokens", "image/pooled"))

    # A text has no validity flag: a non-finite text fails under either policy, naming the text and unit.
    teacher, real = world["teacher"], world["teacher"].encode_texts

    def encode_texts(ids):
        out = real(ids)
        out["tokens"][0, 1] = float("nan")
        return out

    monkeypatch.setattr(teacher, "encode_texts", encode_texts)
    with pytest.raises(
        X.NonFiniteOutput, match=r"unit text-000000: .*text/tokens.*'what colour is shape 0\?'"
    ):
        X.extract(
            [world["ds"]],
            str(tmp_path / "t.zarr"),
            world["spec"],
            cache_params(on_error="skip"),
            "sync",
            False,
        )
    assert "text-000000" not in C.committed_units(str(tmp_path / "t.zarr"))


# ------------------------------------------------------------------------------- 5b. non-finite training loss


@pytest.fixture(scope="module")
def student_world(tmp_path_factory, world) -> dict:
    root = tmp_path_factory.mktemp("student")
    sp = SyntheticParams(seed=0, image_size=32, scenes={"train": 24, "val": 8, "test": 8})
    for split in ("train", "val", "test"):
        with DatasetWriter(
            root / split, source="synthetic", split=split, shard_size=16, image_shard_size=16
        ) as w:
            synthetic.generate(split, sp, w)
    store = str(root / "cache.zarr")
    datasets = [PreparedDataset(root / s) for s in ("train", "val", "test")]
    X.extract(datasets, store, world["spec"], CacheParams(image_rows_per_unit=64, text_rows_per_unit=512,
              batch_size=32, num_workers=0), scheduler="sync", progress=False)  # fmt: skip
    return {"root": root, "store": store}


def _student_params(world, **over):
    return tiny_student_params(world["cfg"], world["ckpt"], text_len=16, batch=4, steps=10, every=10, **over)


def _nan_on_calls(monkeypatch, calls: set[int]) -> None:
    import student.train as T

    real, n = T.forward_task, {"i": 0}

    def forward_task(*a, **k):
        loss, out = real(*a, **k)
        n["i"] += 1
        return (loss * float("nan") if n["i"] in calls else loss), out

    monkeypatch.setattr(T, "forward_task", forward_task)


def test_nonfinite_loss_fails_skips_or_stops(world, student_world, tmp_path, monkeypatch):
    from student.train import RunSpec, Trainer, run_student

    def run(name: str) -> RunSpec:
        root = student_world["root"]
        return RunSpec(
            "snli_ve", "full", "baseline", 0, str(root), student_world["store"], str(tmp_path / name)
        )

    _nan_on_calls(monkeypatch, {3})
    with pytest.raises(FloatingPointError, match="loss term 'task loss' is not finite"):
        Trainer(_student_params(world), run("fail"), progress=False).fit(resume=False)

    _nan_on_calls(monkeypatch, {3})
    with pytest.warns(UserWarning, match="step 3 skipped"):
        metrics = run_student(
            _student_params(world, **{"train.on_nonfinite": "skip"}), run("skip"), progress=False
        )
    assert metrics["steps"] == 10 and metrics["nonfinite_steps_skipped"] == 1
    assert json.loads((tmp_path / "skip" / "train.json").read_text())["nonfinite_steps_skipped"] == 1
    ckpt = torch.load(tmp_path / "skip" / "checkpoint.pt", weights_only=True)
    assert ckpt["nonfinite_steps"] == 1
    assert {int(s["step"]) for s in ckpt["opt"]["state"].values()} == {9}  # 10 batches, 9 optimizer steps
    # The skipped step spent its place in the learning-rate schedule too: it ends where a run of 10 steps does.
    assert ckpt["sched"]["last_epoch"] == 10

    _nan_on_calls(monkeypatch, {2, 5})  # 2 of 10 steps > 10%
    tr = Trainer(_student_params(world, **{"train.on_nonfinite": "skip"}), run("many"), progress=False)
    with (
        pytest.warns(UserWarning),
        pytest.raises(FloatingPointError, match=r"2 non-finite steps skipped, more than 10%"),
    ):
        tr.fit(resume=False)


def test_student_refuses_a_cache_of_other_preprocessing(world, student_world, tmp_path):
    from student.errors import FingerprintMismatch
    from student.train import RunSpec, Trainer

    big = tmp_path / "tiny-rel-40.json"
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["vision_cfg"]["image_size"] = 40
    big.write_text(json.dumps(cfg))
    run = RunSpec(
        "snli_ve",
        "full",
        "clip_td",
        0,
        str(student_world["root"]),
        student_world["store"],
        str(tmp_path / "r"),
    )
    with pytest.raises(FingerprintMismatch, match=r"differing fields teacher\.config_sha256;"):
        Trainer(_student_params(world, **{"teacher.model": big}), run, progress=False)
    Trainer(_student_params(world), run, progress=False)  # the matching config is accepted
