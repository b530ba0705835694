"""evaluate on a run folder a user damaged or moved: one ``Error:`` line naming the file and what is wrong,
exit 1, nothing written; never a traceback."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from student.train import run_student
from tests.conftest import build_world, run_spec, student_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One exported student (2 steps) and the params it was trained with."""
    tmp = tmp_path_factory.mktemp("eval")
    world = build_world(tmp / "world")
    params = student_params(world, **{"train.steps": 2, "train.eval_every": 2})
    run_student(params, run_spec(world, tmp, task="snli_ve"), progress=False)
    return tmp / "run", params


def _evaluate(run_dir, params, tmp_path, *more):
    import yaml

    from pipeline.config import to_dict
    from stages.evaluate import main

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(to_dict(params)))
    dirs = run_dir if isinstance(run_dir, list) else [run_dir]
    return CliRunner().invoke(main, [*map(str, dirs), "--params", str(path), *more])


def _copy(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    return run_dir


def _export_with(run_dir, **changes) -> None:
    exported = torch.load(run_dir / "student.pt", weights_only=True)
    for key, value in changes.items():
        head, _, leaf = key.partition(".")
        if leaf:
            exported[head][leaf] = value
        else:
            exported[head] = value
    torch.save(exported, run_dir / "student.pt")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "train.json").write_text("{not json"), "train.json: not a JSON object"),
        (lambda d: (d / "train.json").write_text("[1, 2]"), "train.json: not a JSON object"),
        (lambda d: _export_with(d, **{"run.condition": "sideways"}), "run.condition"),
        (lambda d: _export_with(d, **{"run.task": "captioning"}), "run.task"),
        (lambda d: _export_with(d, **{"run.seed": "zero"}), "run.seed"),
        (lambda d: _export_with(d, teacher_model="/nowhere/teacher.json"), "/nowhere/teacher.json"),
        (lambda d: _export_with(d, teacher_model=["x"]), "teacher_model is not a model name"),
    ],
    ids=[
        "malformed-train-json",
        "train-json-not-object",
        "condition",
        "task",
        "seed",
        "moved-teacher-config",
        "teacher-model-not-a-string",
    ],
)
def test_a_damaged_run_folder_is_one_error_line(trained, tmp_path, damage, message):
    run_dir = _copy(trained, tmp_path)
    damage(run_dir)
    r = _evaluate(run_dir, trained[1], tmp_path)
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Error:" in r.output and message in r.output, r.output
    assert not (run_dir / "eval.json").exists()


def test_runs_scored_side_by_side_score_as_one_process_does_and_a_bad_one_is_one_error_line(
    trained, tmp_path
):
    """--jobs: several processes score the grid (evaluate was a one-process stage on the critical path of make
    repro); each run's eval.json must be the one a single process writes, and a user error in any run must
    stay the stage's one Error line."""
    dirs = []
    for name in ("a", "b", "c"):
        shutil.copytree(trained[0], tmp_path / name / "run")
        dirs.append(tmp_path / name / "run")
    one = _evaluate(dirs, trained[1], tmp_path, "--jobs", "1")
    assert one.exit_code == 0, one.output
    alone = [(d / "eval.json").read_text() for d in dirs]
    for d in dirs:
        (d / "eval.json").unlink()
    two = _evaluate(dirs, trained[1], tmp_path, "--jobs", "2")
    assert two.exit_code == 0, two.output
    assert [(d / "eval.json").read_text() for d in dirs] == alone
    assert two.output == one.output  # the same lines, in the runs' order
    (dirs[1] / "train.json").write_text("{not json")
    for d in dirs:
        (d / "eval.json").unlink()
    bad = _evaluate(dirs, trained[1], tmp_path, "--jobs", "2")
    assert bad.exit_code == 1 and "Error:" in bad.output and "train.json: not a JSON object" in bad.output
    assert (dirs[0] / "eval.json").exists() and not (dirs[1] / "eval.json").exists()


def test_a_failed_result_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    """How every stage writes eval.json and its other results (stages.common.write_json): a write that fails
    midway (a full disk) keeps the previous file whole and leaves nothing beside it; a symlink at the
    destination is replaced, never written through."""
    from pathlib import Path

    from stages.common import write_json

    out = tmp_path / "run" / "eval.json"
    write_json(out, {"primary": 0.5}, newline=False)
    assert out.read_text() == '{\n "primary": 0.5\n}'
    real_write = Path.write_text

    def disk_full(self, text, *a, **k):
        real_write(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_json(out, {"primary": 0.9, "more": list(range(100))})
    monkeypatch.undo()
    assert out.read_text() == '{\n "primary": 0.5\n}'
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]
    target = tmp_path / "elsewhere.json"
    target.write_text("theirs")
    out.unlink()
    out.symlink_to(target)
    write_json(out, {"primary": 0.7})
    assert target.read_text() == "theirs" and not out.is_symlink() and out.read_text().endswith("}\n")


def test_no_instance_to_score_is_an_error_not_a_zero():
    """A test (or validation) set with no instance of the task would report 0.0 on n = 0 as a score."""
    from types import SimpleNamespace

    from student.evaluation import evaluate

    with pytest.raises(ValueError, match=r"data/test: no vcr instance to evaluate"):
        evaluate(None, None, SimpleNamespace(path="data/test"), [], SimpleNamespace(task="vcr"))
