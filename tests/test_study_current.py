"""benchmarks.study_current: while a rerun is under way, only the cells trained from the current backbone,
with the eval.json their lock entry recorded, go into the interim report."""

from __future__ import annotations

import hashlib
import json

import yaml

from benchmarks.study_current import current_cells
from pipeline.study.backbone import BACKBONE, stale_cells


def test_only_cells_of_the_current_backbone_with_their_recorded_outputs_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = {"stages": {"pretrain_student": {"outs": [{"path": BACKBONE, "md5": "new.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(root))
    stages = {}
    for name, backbone, recorded_right in (
        ("fresh", "new.dir", True),  # rerun from the current backbone
        ("old", "old.dir", True),  # not rerun yet
        ("edited", "new.dir", False),  # its eval.json is not the one the entry recorded
        ("scratch", None, True),  # reads no backbone: current whatever the backbone is
    ):
        ev = tmp_path / "study" / "runs" / "pretrained-full" / name / "eval.json"
        ev.parent.mkdir(parents=True)
        ev.write_text(json.dumps({"primary": 0.5}))
        md5 = hashlib.md5(ev.read_bytes()).hexdigest() if recorded_right else "0" * 32
        deps = [{"path": "student/train.py", "md5": "x"}]
        if backbone:
            deps.append({"path": BACKBONE, "md5": backbone})
        stages[f"main@{name}"] = {"deps": deps, "outs": [{"path": str(ev.relative_to(tmp_path)), "md5": md5}]}
    (tmp_path / "study" / "dvc.lock").write_text(yaml.safe_dump({"stages": stages}))
    cells = current_cells(tmp_path / "dvc.lock", tmp_path / "study" / "dvc.lock")
    assert [c.name for c in cells] == ["fresh", "scratch"]
    assert stale_cells(tmp_path / "dvc.lock", tmp_path / "study" / "dvc.lock") == 1  # "old": a rerun pending


def test_a_lock_without_a_recorded_backbone_judges_no_cell(tmp_path):
    from pipeline.study.backbone import stale_evals

    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"prepare": {"cmd": "x"}}}))
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "dvc.lock").write_text(yaml.safe_dump({"stages": {}}))
    assert (
        stale_evals(["study/runs/a/eval.json"], tmp_path / "dvc.lock", tmp_path / "study" / "dvc.lock") == []
    )
