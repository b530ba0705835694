"""train_student and evaluate on bad inputs: no file runs code, a run folder is locked and resumed only by its
own run, a damaged or non-finite cache is named, and every user error is one line that leaves what was there
before (checkpoint.pt, student.pt, train.json, eval.json) byte-for-byte as it was."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import cache as C
from pipeline.config import TrainParams
from pipeline.lock import StoreLock
from stages.evaluate import main as evaluate_main
from stages.train_student import main as train_main
from tests.conftest import build_world, prepare_synthetic

SETS = [
    "teacher.precision=fp32", "student.init=scratch", "student.width=32", "student.layers=1", "student.heads=2",
    "student.image_size=32", "student.patch_size=8", "student.max_text_len=24", "student.dropout=0.0",
    "train.batch_size=8", "train.steps=4", "train.warmup=1", "train.eval_every=2", "train.checkpoint_every=2",
]  # fmt: skip
RUN_FILES = ("checkpoint.pt", "student.pt", "train.json")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("safety"))


def train(world, out, *extra: str, sets=(), cache: str | None = None, data: str | None = None):
    root, cfg, store = world
    params = root / "empty-params.yaml"  # the built-in defaults, not the checkout's params.yaml
    params.write_text("{}\n")
    args = ["--task", "snli_ve", "--condition", "lowshot-0.5", "--method", "clip_td", "--seed", "0",
            "--data", data or str(root / "shards"), "--cache", cache or store, "--out", str(out), "--quiet",
            "--params", str(params)]  # fmt: skip
    for s in [f"teacher.model={cfg}", f"teacher.pretrained={root / 'teacher.pt'}", *SETS, *sets]:
        args += ["--set", s]
    return CliRunner().invoke(train_main, [*args, *extra])


def error_line(result) -> str:
    """The one line a failed stage printed: non-zero exit, no traceback, the message on a single line."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # click's exit, not a crash
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and result.output.rstrip().endswith(lines[0]), result.output
    return lines[0]


def snapshot(run: Path) -> dict[str, bytes]:
    return {n: (run / n).read_bytes() for n in RUN_FILES if (run / n).exists()}


@pytest.fixture(scope="module")
def done(world, tmp_path_factory) -> Path:
    """A finished seed-0 run: its checkpoint, exported student and train.json."""
    out = tmp_path_factory.mktemp("done") / "run"
    r = train(world, out)
    assert r.exit_code == 0, r.output
    assert set(snapshot(out)) == set(RUN_FILES) and not (out / ".lock").exists()
    return out


@pytest.fixture
def run_copy(done, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(done, dst)
    return dst


def test_a_teacher_or_relevance_source_the_run_cannot_use_is_one_line_before_training(world, tmp_path):
    # Both surfaced as tracebacks: a TeacherError was not among the stage's user errors, and a relevance
    # source the store lacks was met on the prefetch thread at the first batch.
    assert "'ViT-B-3'" in error_line(train(world, tmp_path / "a", sets=["teacher.model=ViT-B-3"]))
    line = error_line(train(world, tmp_path / "b", sets=["distill.relevance_source=value"]))
    assert "distill.relevance_source='value' is not cached (it holds: last)" in line
    assert not snapshot(tmp_path / "b")


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a crafted checkpoint could do if loaded without the weights-only guard."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ------------------------------------------------------------------------------------------ no file runs code


def test_exports_and_checkpoints_load_with_weights_only(done):
    for name in ("checkpoint.pt", "student.pt"):
        state = torch.load(done / name, weights_only=True)
        assert isinstance(state, dict) and state["run"]["seed"] == 0
    ckpt = torch.load(done / "checkpoint.pt", weights_only=True)
    assert (
        ckpt["identity"]["task"] == "snli_ve" and ckpt["identity"]["params"]["train.lr"] == TrainParams().lr
    )


def test_crafted_checkpoint_is_refused_and_runs_no_code(world, run_copy, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"student": _RunsCode(marker)}, run_copy / "checkpoint.pt")
    before = snapshot(run_copy)
    line = error_line(train(world, run_copy))
    assert "checkpoint.pt: refused to load checkpoint" in line and "mkdir" in line
    assert not marker.exists() and snapshot(run_copy) == before


def test_crafted_student_is_refused_by_evaluate_and_runs_no_code(run_copy, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"run": _RunsCode(marker)}, run_copy / "student.pt")
    (run_copy / "eval.json").write_text('{"kept": true}')
    line = error_line(CliRunner().invoke(evaluate_main, [str(run_copy)]))
    assert "student.pt: refused to load exported student" in line
    assert not marker.exists() and (run_copy / "eval.json").read_text() == '{"kept": true}'


@pytest.mark.parametrize("damage", ["empty", "truncated", "foreign"])
def test_damaged_student_pt_is_one_line_in_evaluate(run_copy, damage):
    path = run_copy / "student.pt"
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # a torch file, but not an exported student
    (run_copy / "eval.json").write_text('{"kept": true}')
    line = error_line(CliRunner().invoke(evaluate_main, [str(run_copy)]))
    want = {"empty": "the file is empty", "truncated": "truncated or not a torch file",
            "foreign": "not a student exported by train_student"}[damage]  # fmt: skip
    assert str(path) in line and want in line
    assert (run_copy / "eval.json").read_text() == '{"kept": true}'


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_checkpoint_is_one_line_with_a_reason(world, run_copy, damage):
    path = run_copy / "checkpoint.pt"
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[:1000])
    before = snapshot(run_copy)
    line = error_line(train(world, run_copy))
    assert str(path) in line
    assert ("the file is empty (0 bytes)" if damage == "empty" else "truncated or not a torch file (") in line
    assert snapshot(run_copy) == before


# -------------------------------------------------------------------------------------- run identity and lock


@pytest.mark.parametrize(
    ("extra", "sets", "says"),
    [
        (["--seed", "3"], [], "seed (0 → 3)"),
        ([], ["train.lr=0.0001"], f"train.lr ({TrainParams().lr} → 0.0001)"),
        (["--method", "naive_kd"], [], "method (clip_td → naive_kd)"),
        ([], ["train.num_workers=2"], "train.num_workers (0 → 2)"),  # other instances in each batch
    ],
)
def test_resume_refuses_another_runs_checkpoint_naming_the_fields(world, run_copy, extra, sets, says):
    before = snapshot(run_copy)
    line = error_line(train(world, run_copy, *extra, sets=sets))
    assert "belongs to another run" in line and says in line and "--no-resume" in line
    assert snapshot(run_copy) == before and not (run_copy / ".lock").exists()


def test_resume_of_the_same_run_is_accepted_and_keeps_the_final_logs(world, run_copy):
    final = json.loads((run_copy / "train.json").read_text())["final"]
    r = train(world, run_copy, sets=["train.threads=2"])  # a speed-only key may change on resume
    assert r.exit_code == 0, r.output
    again = json.loads((run_copy / "train.json").read_text())
    assert again["resumed_from"] == 4 and again["final"] == final


def test_a_second_run_into_a_locked_directory_is_refused(world, run_copy):
    before = snapshot(run_copy)
    with StoreLock(str(run_copy), purpose="train_student first"):
        line = error_line(train(world, run_copy))
        assert f"run directory {run_copy} is in use by pid {os.getpid()}" in line
        assert (run_copy / ".lock").exists()  # the holder's lock is left alone
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------------------- the teacher cache


def _outputs_of_an_earlier_run(done, tmp_path) -> Path:
    """A run directory holding what DVC tracks of an earlier run (student.pt, train.json), no checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    for n in ("student.pt", "train.json"):
        shutil.copy(done / n, out / n)
    return out


def test_a_flipped_byte_in_the_cache_stops_training_naming_array_and_unit(world, done, tmp_path):
    store = tmp_path / "flipped.zarr"
    shutil.copytree(world[2], store)
    shard = store / "image" / "pooled" / "c" / "0" / "0"  # image unit 0's shard of image/pooled
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    out = _outputs_of_an_earlier_run(done, tmp_path)
    before = snapshot(out)
    line = error_line(train(world, out, cache=str(store)))
    assert f"teacher cache {store}: image/pooled rows [0, 64) of unit image-000000" in line
    assert "verify_cache" in line and snapshot(out) == before


def test_nan_targets_are_named_as_non_finite(world, done, tmp_path):
    # A teacher that produced NaN at extraction: the manifest's checksums agree with the NaN bytes.
    store = str(tmp_path / "nan.zarr")
    shutil.copytree(world[2], store)
    g = C.open_group(store, mode="r+")
    g["image/pooled"][:] = np.nan
    for name, rec in C.committed_units(store).items():
        if "image/pooled" in rec["arrays"]:
            lo, hi = rec["arrays"]["image/pooled"]["region"]
            rec["arrays"]["image/pooled"]["crc32"] = C.checksum(g["image/pooled"][lo:hi])
            C.commit_unit(store, name, rec)
    out = _outputs_of_an_earlier_run(done, tmp_path)
    before = snapshot(out)
    line = error_line(train(world, out, cache=store))
    assert "image/pooled row" in line and "(image '" in line and "NaN/Inf (non-finite)" in line
    assert "confidence_weights" not in line and snapshot(out) == before


def test_missing_cache_and_data_are_one_line(world, tmp_path):
    line = error_line(train(world, tmp_path / "a", cache=str(tmp_path / "nowhere.zarr")))
    assert "nowhere.zarr: no teacher cache here" in line
    line = error_line(train(world, tmp_path / "b", data=str(tmp_path / "nodata")))
    assert f"{tmp_path / 'nodata'}: data root: no such folder" in line and "stages.prepare_data" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no empty run folder left


def test_cache_of_other_data_is_one_line(world, done, tmp_path):

    prepare_synthetic(tmp_path / "other", seed=1)
    line = error_line(train(world, tmp_path / "r", data=str(tmp_path / "other")))
    other = tmp_path / "other" / "train"
    assert f"does not cover this run's training data {other}" in line
    assert f"add it with python -m stages.extract_teacher --shards {other} --out" in line


# ------------------------------------------------------------------------------------- params and conditions


def test_a_run_with_no_validation_instance_is_refused(world, tmp_path, monkeypatch):
    """A val split without the task (or without the source domains under shift) would score every validation
    0.0 on no instance and export the first checkpoint as the best."""
    import dataclasses

    import student.train as T

    real = T.make_split
    monkeypatch.setattr(T, "make_split", lambda *a, **k: dataclasses.replace(real(*a, **k), val=[]))
    line = error_line(train(world, tmp_path / "r"))
    assert "no validation instance of snli_ve (protocol.splits.val)" in line and "val" in line
    assert not (tmp_path / "r" / "student.pt").exists()


@pytest.mark.parametrize(
    ("condition", "says"),
    [("lowshot-2.0", "fraction 2.0 is not in (0, 1)"), ("lowshot-0", "fraction 0 is not in (0, 1)"),
     ("lowshot-x", "fraction 'x' is not a number"), ("most", "unknown condition 'most'")],
)  # fmt: skip
def test_bad_condition_is_refused_naming_the_value(world, tmp_path, condition, says):
    line = error_line(train(world, tmp_path / "r", "--condition", condition))
    assert "--condition" in line and says in line


@pytest.mark.parametrize(
    ("override", "says"),
    [("train.lr=.nan", "must be a finite number > 0, got nan"), ("train.batch_size=0", "at least 1, got 0"),
     ("train.steps=0", "at least 1, got 0"), ("train.steps=-1", "at least 1, got -1")],
)  # fmt: skip
def test_bad_params_are_blamed_on_the_set_option(world, run_copy, override, says):
    before = snapshot(run_copy)
    line = error_line(train(world, run_copy, sets=[override]))
    assert f"--set {override}: key '{override.split('=')[0]}'" in line and says in line
    assert "params.yaml" not in line and snapshot(run_copy) == before


@pytest.mark.parametrize(
    ("override", "says"),
    [("student.arch=foo", "unknown student.arch 'foo' (available: film, "),
     ("student.image_size=60", "student.image_size (60) divisible by 4"),
     ("student.patch_size=7", "power-of-two student.patch_size >= 4 (got 7)")],
)  # fmt: skip
def test_a_student_no_architecture_can_build_is_one_line(world, tmp_path, override, says):
    line = error_line(train(world, tmp_path / "run", sets=[override]))
    assert says in line
    assert not (tmp_path / "run" / "student.pt").exists()


def test_non_finite_loss_is_one_line_and_exports_nothing(world, tmp_path, monkeypatch):
    import student.train as T

    real = T.forward_task

    def nan_task_loss(*args):
        loss, out = real(*args)
        return loss * float("nan"), out

    monkeypatch.setattr(T, "forward_task", nan_task_loss)
    out = tmp_path / "r"
    line = error_line(train(world, out))
    assert "task loss" in line and "not finite" in line and "train.on_nonfinite=skip" in line
    assert not any((out / n).exists() for n in (*RUN_FILES, ".lock"))


@pytest.mark.parametrize(("damage", "says"), [
    ("deleted", "1 unit(s) its segments plan have no manifest entry (first: image-000000"),
    ("garbage", "manifest/image-000000.json: not valid JSON"),
    ("array-dropped", "no manifest entry covers image/tokens, which the store's units write"),
])  # fmt: skip
def test_a_missing_or_garbage_manifest_entry_stops_training(world, done, tmp_path, damage, says):
    store = tmp_path / "manifest.zarr"
    shutil.copytree(world[2], store)
    entry = store / "manifest" / "image-000000.json"
    if damage == "deleted":
        entry.unlink()
    elif damage == "garbage":
        entry.write_text('{"rows": [0, 6')
    else:  # every entry's checksums of one array removed: its rows must not be read unchecked
        for path in (store / "manifest").glob("image-*.json"):
            rec = json.loads(path.read_text())
            del rec["arrays"]["image/tokens"]
            path.write_text(json.dumps(rec))
    out = _outputs_of_an_earlier_run(done, tmp_path)
    before = snapshot(out)
    line = error_line(train(world, out, cache=str(store)))
    assert says in line and snapshot(out) == before


def test_evaluate_scores_an_exported_student_and_writes_eval_json(world, run_copy, tmp_path):
    params = world[0] / "empty-params.yaml"
    r = CliRunner().invoke(
        evaluate_main, [str(run_copy), "--params", str(params), "--out", str(tmp_path / "ev")]
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "ev" / "run" / "eval.json").read_text())
    assert result["run"]["seed"] == 0 and result["metrics"]["n"] > 0 and 0.0 <= result["primary"] <= 1.0
    assert not list((tmp_path / "ev" / "run").glob(".eval.json.tmp*"))
    twin = tmp_path / "other" / "run"
    shutil.copytree(run_copy, twin)
    line = error_line(
        CliRunner().invoke(evaluate_main, [str(run_copy), str(twin), "--out", str(tmp_path / "ev")])
    )
    assert "share a name, so their eval.json would overwrite each other's" in line
    assert json.loads((tmp_path / "ev" / "run" / "eval.json").read_text()) == result  # left as it was


def test_a_lock_left_by_a_killed_run_is_taken_over_and_the_run_resumes(world, run_copy):
    import subprocess
    import sys

    from pipeline.lock import holder_info

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    holder = {**holder_info("train_student killed"), "pid": int(dead.stdout), "proc_start": None}
    (run_copy / ".lock").write_text(json.dumps(holder))
    r = train(world, run_copy)
    assert r.exit_code == 0, r.output
    assert json.loads((run_copy / "train.json").read_text())["resumed_from"] == 4
    assert not (run_copy / ".lock").exists()


@pytest.mark.parametrize("name", ["dataset.json", "images.index.json"])
def test_a_corrupt_prepared_split_is_named(world, done, tmp_path, name):
    data = tmp_path / "shards"
    shutil.copytree(world[0] / "shards", data)
    (data / "train" / name).write_text('{"format_version": ')
    out = _outputs_of_an_earlier_run(done, tmp_path)
    before = snapshot(out)
    line = error_line(train(world, out, data=str(data)))
    assert f"{data / 'train' / name}: file: not valid JSON (" in line and snapshot(out) == before


def test_a_checkpoint_without_a_run_identity_is_not_resumed(world, run_copy):
    state = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    del state["identity"]  # as an older version wrote it: nothing says which run it belongs to
    torch.save(state, run_copy / "checkpoint.pt")
    before = snapshot(run_copy)
    line = error_line(train(world, run_copy))
    assert "records no run identity" in line and "--no-resume" in line and snapshot(run_copy) == before
    r = train(world, run_copy, "--no-resume")  # the way out the message names
    assert r.exit_code == 0, r.output
    assert json.loads((run_copy / "train.json").read_text())["resumed_from"] == 0
