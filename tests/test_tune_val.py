import json
from pathlib import Path

import click
import pytest

from benchmarks.tune_val import compare, recorded_overrides, summary


def test_summary_keeps_two_settings_under_one_tag_apart(tmp_path):
    # A tag groups a sweep; each setting in it is its own row, or the table would average two students.
    line = {"tag": "t", "task": "snli_ve", "condition": "full", "method": "baseline", "seed": 1000}
    rows = [
        {**line, "overrides": ["student.arch=vilt"], "val": 0.333},
        {**line, "overrides": [], "val": 0.613},
        {**line, "overrides": [], "seed": 1001, "val": 0.6},
    ]
    path = tmp_path / "tuning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = summary(str(path)).splitlines()[2:]
    assert len(table) == 2
    assert "student.arch=vilt" in table[0] and "0.333 (0.333–0.333)" in table[0]
    assert "(defaults)" in table[1] and "1000,1001" in table[1] and "0.607 (0.600–0.613)" in table[1]


def test_compare_pairs_seeds_across_tags_and_skips_unpaired(tmp_path):
    # The width / setting comparisons in docs/tuning.md rest on this table: B − A per seed, never across seeds.
    line = {"task": "vqa", "condition": "full", "method": "baseline", "overrides": []}
    rows = [
        {**line, "tag": "a", "seed": 1000, "val": 0.60},
        {**line, "tag": "a", "seed": 1001, "val": 0.70},
        {**line, "tag": "b", "seed": 1000, "val": 0.55},
        {**line, "tag": "b", "seed": 1001, "val": 0.66},
        {**line, "tag": "b", "seed": 1002, "val": 0.10},  # no partner under tag a: left out
        {**line, "tag": "other", "seed": 1000, "val": 0.0},
        {**line, "tag": "a", "method": "clip_td", "seed": 1000, "val": 0.5},  # never run under b: no row
    ]
    path = tmp_path / "tuning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = compare(str(path), "a", "b").splitlines()[2:]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[:6] == ["vqa", "full", "baseline", "1000,1001", "0.650", "0.605"]
    # Differences -0.05 and -0.04: mean -0.045, t(1) half-width 12.706 * 0.00707 / sqrt(2) = 0.0635.
    assert cells[6] == "-0.045 [-0.109, +0.019]"


def test_compare_refuses_two_settings_under_one_tag(tmp_path):
    line = {"task": "vqa", "condition": "full", "method": "baseline", "seed": 1000, "val": 0.6}
    rows = [{**line, "tag": "a", "overrides": []}, {**line, "tag": "a", "overrides": ["student.width=32"]}]
    path = tmp_path / "tuning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(click.ClickException, match="two settings for vqa full baseline 1000"):
        compare(str(path), "a", "b")


def test_a_file_override_is_recorded_relative_to_the_repository_with_its_hash(tmp_path, monkeypatch):
    """A record read in another clone names the same file, and says which file it was."""
    import hashlib

    inside = Path(__file__).resolve()  # a file inside the repository
    outside = tmp_path / "student.pt"
    outside.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    items, files = recorded_overrides(
        [f"student.pretrained={inside}", f"teacher.checkpoint={outside}", "train.lr=0.002", "x=student.pt"]
    )
    assert items == [
        "student.pretrained=tests/test_tune_val.py",
        f"teacher.checkpoint={outside}",  # outside the repository: kept as given
        "train.lr=0.002",
        "x=student.pt",
    ]
    want = hashlib.sha256(b"weights").hexdigest()[:16]
    assert files == {
        "student.pretrained": hashlib.sha256(inside.read_bytes()).hexdigest()[:16],
        "teacher.checkpoint": want,
        "x": want,  # a relative path is read from the working folder
    }


def test_the_study_seeds_are_refused_and_every_tuning_seed_is_declared_to_the_study(tmp_path):
    """No setting may be chosen on a seed the study reports, and the study's own guard (study.tuning_seeds,
    refused as study seeds) must know every seed a committed tuning record used."""
    from click.testing import CliRunner

    from benchmarks.tune_val import main
    from pipeline.study import load_study
    from tests.conftest import REPO

    study = load_study(REPO / "study" / "params.yaml")
    args = [
        "--task",
        "vqa",
        "--condition",
        "full",
        "--data",
        str(tmp_path),
        "--params",
        str(REPO / "params.yaml"),
    ]
    r = CliRunner().invoke(
        main, [*args, "--seeds", f"5000,{study.seeds[0]}", "--study", str(REPO / "study" / "params.yaml")]
    )
    assert (
        r.exit_code == 2
        and f"--seeds {study.seeds[0]}: reported seeds" in r.output
        and "study.seeds" in r.output
    )
    used = {
        json.loads(line)["seed"]
        for f in (REPO / "benchmarks" / "results").glob("tuning*.jsonl")
        for line in f.read_text().splitlines()
        if line.strip()
    }
    assert used and used <= set(study.tuning_seeds), sorted(used - set(study.tuning_seeds))


def test_compare_methods_pairs_two_methods_of_one_setting_seed_by_seed(tmp_path):
    # docs/tuning.md's constant-λ check rests on this: clip_td_const_lambda − clip_td per seed within a sweep.
    line = {"tag": "t", "task": "vqa", "condition": "lowshot-0.01", "overrides": []}
    alpha = {**line, "overrides": ["distill.alpha0=1.0"]}  # another setting in the sweep: its own row
    rows = [
        {**line, "method": "clip_td", "seed": 2000, "val": 0.40},
        {**line, "method": "clip_td", "seed": 2001, "val": 0.50},
        {**line, "method": "clip_td_const_lambda", "seed": 2000, "val": 0.45},
        {**line, "method": "clip_td_const_lambda", "seed": 2001, "val": 0.54},
        {**line, "method": "clip_td_const_lambda", "seed": 2002, "val": 0.99},  # no clip_td partner: left out
        {**line, "method": "baseline", "seed": 2000, "val": 0.0},  # neither method: no row
        {**line, "tag": "u", "method": "clip_td", "seed": 2000, "val": 0.0},  # another sweep: no partner
        {**alpha, "method": "clip_td", "seed": 2000, "val": 0.10},
        {**alpha, "method": "clip_td_const_lambda", "seed": 2000, "val": 0.30},
    ]
    path = tmp_path / "tuning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    header, rule, *table = compare(str(path), "clip_td", "clip_td_const_lambda", by="method").splitlines()
    assert header.startswith(
        "| tag | overrides | task | condition | seeds | clip_td (A) | clip_td_const_lambda (B) |"
    )
    assert rule.count("---") == header.count("|") - 1
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in table]
    assert [c[:7] for c in cells] == [
        ["t", "(defaults)", "vqa", "lowshot-0.01", "2000,2001", "0.450", "0.495"],
        ["t", "distill.alpha0=1.0", "vqa", "lowshot-0.01", "2000", "0.100", "0.300"],
    ]
    # Differences +0.05 and +0.04: the same interval as the tag comparison's, with the sign turned.
    assert cells[0][7] == "+0.045 [-0.019, +0.109]"
