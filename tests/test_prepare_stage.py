"""The prepare stage as a user runs it: --help, the synthetic world, official files with both error policies."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.data.shards import PreparedDataset
from stages.prepare_data import main
from tests import fixtures_official as fx


def test_help_explains_every_option():
    out = CliRunner().invoke(main, ["--help"]).output
    for option in ("--source", "--root", "--split", "--out", "--on-error", "--params", "--set"):
        assert option in out
    assert "skipped.json" in out and "snli_ve_<split>.jsonl" in out


def test_synthetic_splits_via_cli(tmp_path):
    args = ["--source", "synthetic", "--split", "train", "--split", "val", "--out", str(tmp_path),
            "--set", "data.synthetic.scenes={train: 12, val: 6, test: 6}"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    train = PreparedDataset(tmp_path / "train")
    assert train.info["tasks"] == {"vqa": 12, "snli_ve": 12, "vcr": 12} and train.info["images"] == 12
    assert PreparedDataset(tmp_path / "val").info["images"] == 6


def test_official_bad_input_fails_naming_place_or_is_listed_under_skip(tmp_path):
    built = fx.build_snli_ve(tmp_path / "snli", knobs=("unknown_label",))
    file, where = built.bad["unknown_label"]
    base = [
        "--source",
        "snli_ve",
        "--root",
        str(built.root),
        "--split",
        built.split,
    ]
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "fail")])
    assert res.exit_code != 0 and file in res.output and where in res.output
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "skip"), "--on-error", "skip"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "skip" / built.split / "skipped.json").read_text())
    assert report["count"] == 1 and where in report["skipped"][0]["where"]
    assert "1 skipped" in res.output


def test_params_path_given_but_missing_is_an_error_not_silent_defaults(tmp_path):
    res = CliRunner().invoke(main, ["--source", "synthetic", "--params", str(tmp_path / "typo.yaml")])
    assert res.exit_code == 2 and "typo.yaml: no such file" in res.output


def test_the_same_split_prepared_twice_is_byte_identical(tmp_path):
    """DVC hashes a split's bytes: if two runs of prepare differ (a tar member's mtime from the clock), every
    stage downstream, the study's finished cells included, reruns on each new machine."""
    args = [
        "--source",
        "synthetic",
        "--split",
        "val",
        "--set",
        "data.synthetic.scenes={train: 6, val: 6, test: 6}",
    ]
    for name in ("a", "b"):
        res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    a, b = tmp_path / "a" / "val", tmp_path / "b" / "val"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and any(n.endswith(".tar") for n in names)
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
