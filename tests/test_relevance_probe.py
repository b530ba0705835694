"""The relevance probe pairs each of its runs with the study's baseline and clip_td of the same seed, and only
seeds all three have count."""

from __future__ import annotations

import json

import pytest

from benchmarks.relevance_probe import summarise


def _eval(path, score):
    path.mkdir(parents=True)
    (path / "eval.json").write_text(json.dumps({"primary": score}))


def test_the_probe_is_paired_per_seed_with_the_study_cells_it_varies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study" / "runs" / "pretrained-full"
    out = tmp_path / "probe"
    for seed, (probe, base, ctd) in {
        100: (0.50, 0.45, 0.40),
        101: (0.52, 0.46, 0.43),
        102: (0.49, 0.47, 0.41),
    }.items():
        _eval(out / f"vqa-lowshot-0.01-clip_td-value-s{seed}", probe)
        _eval(study / f"vqa-lowshot-0.01-baseline-s{seed}", base)
        _eval(study / f"vqa-lowshot-0.01-clip_td-s{seed}", ctd)
    _eval(out / "vqa-lowshot-0.01-clip_td-value-s103", 0.9)  # no study cell of seed 103: not paired
    (row,) = summarise(out, ("vqa", "vcr"), ("lowshot-0.01",), [100, 101, 102, 103], "value")
    assert row["seeds"] == [100, 101, 102]
    assert row["mean"] == pytest.approx(0.503333, abs=1e-5)
    assert row["vs_baseline"]["mean"] == pytest.approx((0.05 + 0.06 + 0.02) / 3)
    assert row["vs_clip_td"]["mean"] == pytest.approx((0.10 + 0.09 + 0.08) / 3)
    assert row["vs_clip_td"]["ci95"][0] > 0
