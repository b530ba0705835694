"""The study's stages on the tiny world: one cell (train + evaluate), and the selection diagnostic read from a
real cache of synthetic scenes."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from pipeline.config import dump_defaults
from tests.test_train_student import build_world

SETS = [
    "teacher.precision=fp32",
    "student.width=32",
    "student.layers=1",
    "student.heads=2",
    "student.image_size=32",
    "student.patch_size=8",
    "student.max_text_len=24",
    "student.dropout=0.0",
    "train.batch_size=8",
    "train.warmup=2",
    "train.eval_every=3",
]


def test_a_cell_trains_scores_and_times_itself_and_selection_reads_the_scenes(tmp_path):
    from stages.selection import main as selection
    from stages.study_cell import main as cell

    root, cfg, store = build_world(tmp_path / "world")
    params = tmp_path / "params.yaml"
    params.write_text(dump_defaults())
    study = tmp_path / "study.yaml"
    overrides = {"train.steps": 4, "train.checkpoint_every": 2}
    study.write_text(
        yaml.safe_dump(
            {"study": {"seeds": [100], "tasks": ["vqa"], "overrides": overrides, "selection_instances": 40}}
        )
    )
    sets = [*SETS, f"teacher.model={cfg}", f"teacher.pretrained={root / 'teacher.pt'}"]
    common = ["--params", str(params), "--study", str(study)]
    for s in sets:
        common += ["--set", s]
    out = tmp_path / "runs" / "scratch-full" / "vqa-full-clip_td-s100"
    args = [
        "--task",
        "vqa",
        "--condition",
        "full",
        "--method",
        "clip_td",
        "--seed",
        "100",
        "--init",
        "scratch",
        "--cache",
        store,
        "--data",
        str(root / "shards"),
        "--out",
        str(out),
        *common,
    ]
    res = CliRunner().invoke(cell, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["run"] == {"task": "vqa", "condition": "full", "method": "clip_td", "seed": 100}
    assert ev["train"]["steps"] == 4  # study.overrides applied over params.yaml
    assert ev["cell"]["init"] == "scratch" and ev["cell"]["wall_seconds"] > 0
    assert ev["cell"]["finished"] >= ev["cell"]["started"]
    assert (out / "student.pt").exists() and not (out / "checkpoint.pt").exists()

    # A study seed that also tuned hyperparameters is refused before anything trains.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"study": {"seeds": [0], "tuning_seeds": [0]}}))
    res = CliRunner().invoke(cell, [*args[: -len(common)], "--params", str(params), "--study", str(bad)])
    assert res.exit_code != 0 and "disjoint" in res.output

    sel_out = tmp_path / "selection.json"
    res = CliRunner().invoke(
        selection,
        ["--cache", f"full={store}", "--data", str(root / "shards"), "--out", str(sel_out), *common],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    r = json.loads(sel_out.read_text())["teachers"]["full"]["tasks"]["vqa"]
    # The generated scenes' metadata locates named objects for most questions; shares are proper fractions.
    assert 0 < r["n"] <= 40 and r["grid"] == 4
    assert 0.0 <= r["selected_share"] <= 1.0 and 0.0 < r["random_share"] < 1.0


def test_study_zeroshot_scores_every_condition_and_times_itself(tmp_path):
    from stages.study_zeroshot import main as study_zeroshot

    root, cfg, store = build_world(tmp_path / "world")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(root / "shards")  # where data.out / data.source points
    params = tmp_path / "params.yaml"
    params.write_text(dump_defaults())
    study = tmp_path / "study.yaml"
    grid = {"conditions": ["lowshot-0.25", "full"], "methods": ["clip_td"], "inits": ["pretrained"]}
    study.write_text(yaml.safe_dump({"study": {"seeds": [100], "tasks": ["vqa", "vcr"], "main": grid}}))
    out = tmp_path / "zeroshot" / "full.json"
    args = ["--study", str(study), "--cache", store, "--out", str(out), "--params", str(params)]
    args += ["--set", f"data.out={tmp_path / 'data'}"]
    res = CliRunner().invoke(study_zeroshot, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    z = json.loads(out.read_text())
    assert {t: sorted(c) for t, c in z.items()} == {t: ["full", "lowshot-0.25"] for t in ("vqa", "vcr")}
    assert 0.0 <= z["vcr"]["full"]["score"] <= 1.0 and z["vcr"]["full"]["n"] > 0
    assert json.loads((out.parent / "full.time.json").read_text())["seconds"] >= 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["full.json", "full.time.json"]


def test_study_zeroshot_and_selection_read_checked_a_lost_shard_is_one_line(tmp_path):
    """Both read the store unchecked: a lost image shard scored zero vectors with no error. Now one line
    naming the store, the array and the unit, and nothing written."""
    import shutil

    from stages.selection import main as selection
    from stages.study_zeroshot import main as study_zeroshot

    root, cfg, store = build_world(tmp_path / "world")
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    for array in ("image/pooled", "image/tokens"):  # every shard: selection reads train, zero-shot test rows
        for shard in [p for p in (damaged / array / "c").rglob("*") if p.is_file()]:
            shard.unlink()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(root / "shards")
    params = tmp_path / "params.yaml"
    params.write_text(dump_defaults())
    study = tmp_path / "study.yaml"
    grid = {"conditions": ["full"], "methods": ["clip_td"], "inits": ["pretrained"]}
    study.write_text(
        yaml.safe_dump({"study": {"seeds": [100], "tasks": ["vqa"], "main": grid, "selection_instances": 8}})
    )
    common = ["--study", str(study), "--params", str(params), "--set", f"data.out={tmp_path / 'data'}"]
    out = tmp_path / "zeroshot.json"
    runs = {
        "study_zeroshot": (study_zeroshot, ["--cache", str(damaged), "--out", str(out), *common]),
        "selection": (selection, ["--cache", f"full={damaged}", "--out", str(out), *common]),
    }
    for name, (command, args) in runs.items():
        res = CliRunner().invoke(command, args)
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (name, res.output)
        line = res.output.strip()
        assert "\n" not in line and f"teacher cache {damaged}" in line and "of unit image-00000" in line, name
        assert not out.exists(), name
