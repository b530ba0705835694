"""benchmarks.study_current and pipeline/study/freshness.py: while a rerun is under way, only the cells run
on the inputs this checkout records (backbone, teacher cache, code, params), with the eval.json their lock
entry recorded, go into the interim report."""

from __future__ import annotations

import hashlib
import json

import yaml

from benchmarks.study_current import current_cells
from pipeline.study.freshness import BACKBONE, stale_cells


def test_only_cells_run_on_this_checkouts_inputs_with_their_recorded_outputs_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = "artifacts/cache/teacher.zarr"
    root = {
        "stages": {
            "pretrain_student": {"outs": [{"path": BACKBONE, "md5": "new.dir"}]},
            "extract_teacher": {"outs": [{"path": cache, "md5": "cache.dir"}]},
        }
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(root))
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "train.py").write_text("code\n")
    code = hashlib.md5(b"code\n").hexdigest()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.001, "steps": 600}}))
    stages = {}
    for name, backbone, cache_md5, code_md5, lr, recorded_right in (
        ("fresh", "new.dir", "cache.dir", code, 0.001, True),  # rerun on this checkout's inputs
        ("old", "old.dir", "cache.dir", code, 0.001, True),  # another backbone: not rerun yet
        ("old_cache", "new.dir", "old.dir", code, 0.001, True),  # another teacher cache
        ("old_code", "new.dir", "cache.dir", "0" * 32, 0.001, True),  # the code it imports changed since
        ("old_lr", "new.dir", "cache.dir", code, 0.002, True),  # a param it reads changed since
        ("edited", "new.dir", "cache.dir", code, 0.001, False),  # its eval.json is not the one recorded
        ("scratch", None, "cache.dir", code, 0.001, True),  # reads no backbone
    ):
        ev = tmp_path / "study" / "runs" / "pretrained-full" / name / "eval.json"
        ev.parent.mkdir(parents=True)
        ev.write_text(json.dumps({"primary": 0.5}))
        md5 = hashlib.md5(ev.read_bytes()).hexdigest() if recorded_right else "0" * 32
        deps = [{"path": "student/train.py", "md5": code_md5}, {"path": cache, "md5": cache_md5}]
        if backbone:
            deps.append({"path": BACKBONE, "md5": backbone})
        stages[f"main@{name}"] = {
            "deps": deps,
            "params": {"params.yaml": {"train.lr": lr}},
            "outs": [{"path": str(ev.relative_to(tmp_path)), "md5": md5}],
        }
    (tmp_path / "study" / "dvc.lock").write_text(yaml.safe_dump({"stages": stages}))
    cells = current_cells(tmp_path / "dvc.lock", tmp_path / "study" / "dvc.lock")
    assert [c.name for c in cells] == ["fresh", "scratch"]
    stale = stale_cells(tmp_path / "dvc.lock", tmp_path / "study" / "dvc.lock")
    assert stale == {
        "main@old": f"{BACKBONE} changed",
        "main@old_cache": f"{cache} changed",
        "main@old_code": "student/train.py changed",
        "main@old_lr": "params.yaml: train.lr changed",
    }
    # A code file the cells read that is gone is a change too.
    (tmp_path / "student" / "train.py").unlink()
    assert stale_cells(tmp_path / "dvc.lock", tmp_path / "study" / "dvc.lock")["main@fresh"] == (
        "student/train.py is missing"
    )


def test_a_lock_without_a_recorded_backbone_judges_no_cell(tmp_path):
    from pipeline.study.freshness import stale_evals

    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"prepare": {"cmd": "x"}}}))
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "dvc.lock").write_text(yaml.safe_dump({"stages": {}}))
    assert (
        stale_evals(["study/runs/a/eval.json"], tmp_path / "dvc.lock", tmp_path / "study" / "dvc.lock") == []
    )
