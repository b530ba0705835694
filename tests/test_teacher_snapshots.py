"""Intermediate teacher checkpoints for the study's dose-response (pretrain_teacher --save-at / --stop-at)."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from pipeline.config import dump_defaults
from stages.pretrain_teacher import main
from tests.test_teacher import TINY, make_caption_dataset


def _run(tmp_path, out, *extra: str):
    captions = tmp_path / "captions"
    if not captions.exists():
        make_caption_dataset(captions, "captions", seed=0, copies=2)
        make_caption_dataset(tmp_path / "captions_val", "captions_val", seed=1)
        (tmp_path / "params.yaml").write_text(dump_defaults())
    args = ["--params", str(tmp_path / "params.yaml"), "--captions", str(captions)]
    args += ["--val", str(tmp_path / "captions_val"), "--out", str(out), "--device", "cpu", "--quiet"]
    args += ["--metrics", str(out / "metrics.json")]
    for s in (f"teacher.model={TINY}", "teacher.pretrain.steps=8", "teacher.pretrain.batch_size=12",
              "teacher.pretrain.warmup=2", "teacher.pretrain.threads=1"):  # fmt: skip
        args += ["--set", s]
    return CliRunner().invoke(main, [*args, *extra], catch_exceptions=False)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_snapshots_are_the_full_runs_teacher_at_that_step(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = _run(tmp_path, full, "--save-at", "0", "--save-at", "2", "--save-at", "8")
    assert res.exit_code == 0, res.output
    assert {p.name for p in full.glob("*.pt")} == {"teacher.pt", "teacher-step0.pt", "teacher-step2.pt",
                                                  "teacher-step8.pt"}  # fmt: skip
    # The last snapshot is the finished teacher; the random init differs from it.
    final, step0 = _state(full / "teacher.pt"), _state(full / "teacher-step0.pt")
    assert all(torch.equal(final[k], v) for k, v in _state(full / "teacher-step8.pt").items())
    assert not all(torch.equal(final[k], v) for k, v in step0.items())
    m = json.loads((full / "metrics.json").read_text())
    assert set(m["snapshots"]) == {"0", "2", "8"}
    assert all(0.0 <= s["all"]["random_top1"] <= 1.0 for s in m["snapshots"].values())

    # Stopping at step 2 follows the 8-step schedule: its snapshot equals the full run's step-2 teacher,
    # and no teacher.pt claims to be the finished teacher.
    res = _run(tmp_path, cut, "--save-at", "0", "--save-at", "2", "--stop-at", "2")
    assert res.exit_code == 0, res.output
    assert not (cut / "teacher.pt").exists()
    a, b = _state(full / "teacher-step2.pt"), _state(cut / "teacher-step2.pt")
    assert all(torch.allclose(a[k], v, atol=1e-6) for k, v in b.items())
    assert json.loads((cut / "metrics.json").read_text())["checkpoint"] is None

    # A stopped run into the full run's folder is refused before it trains: the finished teacher.pt would stay
    # beside its snapshots and metrics as if it were theirs. The folder is left as it was.
    before = {p.name: p.read_bytes() for p in full.iterdir()}
    res = _run(tmp_path, full, "--save-at", "2", "--stop-at", "2")
    assert res.exit_code != 0 and "teacher.pt" in res.output and "Traceback" not in res.output
    assert {p.name: p.read_bytes() for p in full.iterdir()} == before


def test_snapshot_beyond_the_run_is_refused(tmp_path):
    res = _run(tmp_path, tmp_path / "t", "--save-at", "5", "--stop-at", "3")
    assert res.exit_code != 0
    assert "save_at 5" in res.output and "Traceback" not in res.output
