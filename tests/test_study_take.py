"""benchmarks.study_take: the cells a sitting ran in another clone come back with their outputs, and nothing
else does: not cells the clone merely holds at an older state, not half a take."""

from __future__ import annotations

import subprocess
from pathlib import Path

from click.testing import CliRunner

from benchmarks.study_take import main
from pipeline.dvc_lockfile import path_hash

ENTRY = """\
  {name}:
    cmd: run {name}
    deps:
    - path: student
      hash: md5
      md5: {code}.dir
      size: 1
      nfiles: 1
    - path: artifacts/student_pretrained
      hash: md5
      md5: {backbone}.dir
      size: 1
      nfiles: 1
    outs:
    - path: study/runs/{name}/eval.json
      hash: md5
      md5: {out}
      size: 2
"""
Cells = dict[str, tuple[str, str]]  # cell -> (backbone, output)


def write(root: Path, cells: Cells, code: str = "c1", backbone: str = "new") -> None:
    """A checkout's root lock (its pretrained student), study/dvc.yaml, study lock and cell outputs, all
    recorded with the code hashed ``code``."""
    (root / "study").mkdir(parents=True, exist_ok=True)
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  pretrain_student:\n    cmd: p\n    outs:\n"
        f"    - path: artifacts/student_pretrained\n      hash: md5\n      md5: {backbone}.dir\n"
    )
    (root / "study" / "dvc.yaml").write_text("stages:\n  main:\n    foreach: [a]\n    do:\n      cmd: run\n")
    body = "".join(ENTRY.format(name=n, backbone=b, out=o, code=code) for n, (b, o) in cells.items())
    (root / "study" / "dvc.lock").write_text("schema: '2.0'\nstages:\n" + body)
    for n, (_, o) in cells.items():
        (root / "study" / "runs" / n).mkdir(parents=True, exist_ok=True)
        (root / "study" / "runs" / n / "eval.json").write_text(o)


def clone(root: Path, committed: Cells, now: Cells) -> Path:
    """A clone whose git revision committed ``committed`` and whose sitting left ``now``."""
    write(root, committed)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    write(root, now)
    return root


def lock_of(cells: Cells, code: dict[str, str]) -> str:
    return "schema: '2.0'\nstages:\n" + "".join(
        ENTRY.format(name=n, backbone=b, out=o, code=code[n]) for n, (b, o) in cells.items()
    )


BASE = {"main@a": ("old", "a0"), "main@b": ("old", "b0"), "main@c": ("old", "c0"), "main@d": ("new", "d0")}


def test_the_cells_the_sitting_ran_are_taken_with_their_outputs(tmp_path, monkeypatch):
    dst = tmp_path / "main"
    write(dst, BASE, code="c2")  # code rehashed here since the clone's revision
    # The sitting reran a and b on the new backbone, c on yet another one, and ran e, new to the grid; d it
    # did not touch (its entry differs from this checkout's in the code's hash only).
    now = {**BASE, "main@a": ("new", "a1"), "main@b": ("new", "b1"), "main@c": ("other", "c1")}
    src = clone(tmp_path / "clone", BASE, {**now, "main@e": ("new", "e1")})
    before = (dst / "study" / "dvc.lock").read_text()
    monkeypatch.chdir(dst)

    r = CliRunner().invoke(main, [str(src), "--dry-run"])
    assert r.exit_code == 0 and r.output.split() == ["main@a", "main@b", "main@e"], r.output
    assert (dst / "study" / "dvc.lock").read_text() == before

    r = CliRunner().invoke(main, [str(src)])
    assert r.exit_code == 0, r.output
    assert "3 cells taken, 3 output files copied" in r.output
    want = {**BASE, "main@a": ("new", "a1"), "main@b": ("new", "b1"), "main@e": ("new", "e1")}
    code = {"main@a": "c1", "main@b": "c1", "main@c": "c2", "main@d": "c2", "main@e": "c1"}
    assert (dst / "study" / "dvc.lock").read_text() == lock_of(want, code)  # e last, where DVC puts it
    outs = [(dst / "study" / "runs" / f"main@{n}" / "eval.json").read_text() for n in "abcde"]
    assert outs == ["a1", "b1", "c0", "d0", "e1"]
    assert not list(dst.rglob(".*take-*"))


def test_a_second_clone_does_not_undo_the_first_and_a_cell_both_ran_is_a_conflict(tmp_path, monkeypatch):
    dst = tmp_path / "main"
    write(dst, {**BASE, "main@a": ("new", "a1")})  # clone A's sitting, taken already
    monkeypatch.chdir(dst)
    b_only = clone(tmp_path / "b", BASE, {**BASE, "main@b": ("new", "b1")})
    r = CliRunner().invoke(main, [str(b_only)])
    assert r.exit_code == 0 and "1 cells taken" in r.output, r.output
    assert (dst / "study" / "runs" / "main@a" / "eval.json").read_text() == "a1"

    before = (dst / "study" / "dvc.lock").read_text()
    both = clone(tmp_path / "c", BASE, {**BASE, "main@a": ("new", "a2")})
    r = CliRunner().invoke(main, [str(both)])
    assert r.exit_code != 0 and "1 cells changed here too" in r.output and "main@a" in r.output
    assert (dst / "study" / "dvc.lock").read_text() == before
    assert (dst / "study" / "runs" / "main@a" / "eval.json").read_text() == "a1"


def test_a_rerun_with_the_same_outputs_against_this_checkouts_code_refreshes_the_entry(tmp_path, monkeypatch):
    # The sitting reran d and c because their code had changed, and got the outputs they had. d's entry
    # records the code this checkout holds and is taken, so the next sitting does not rerun it; c's records
    # code that is not this checkout's and stays as it is.
    dst = tmp_path / "main"
    write(dst, BASE, code="c1")
    (dst / "student").mkdir()
    (dst / "student" / "model.py").write_text("width = 64\n")
    subprocess.run(["git", "-C", str(dst), "init", "-q"], check=True)
    subprocess.run(["git", "-C", str(dst), "add", "student"], check=True)
    here = path_hash(dst / "student").removesuffix(".dir")
    src = clone(tmp_path / "clone", BASE, BASE)
    code = {"main@a": "c1", "main@b": "c1", "main@c": "c9", "main@d": here}
    (src / "study" / "dvc.lock").write_text(lock_of(BASE, code))
    monkeypatch.chdir(dst)

    r = CliRunner().invoke(main, [str(src)])
    assert r.exit_code == 0 and "1 cells taken, 1 output files copied" in r.output, r.output
    want = {"main@a": "c1", "main@b": "c1", "main@c": "c1", "main@d": here}
    assert (dst / "study" / "dvc.lock").read_text() == lock_of(BASE, want)
    assert CliRunner().invoke(main, [str(src), "--dry-run"]).output.split() == []


def test_a_rerun_with_the_same_outputs_under_this_checkouts_params_refreshes_the_entry(tmp_path, monkeypatch):
    # A params key the stage reads changed (a tuning seed declared to the study): the sitting reran a and b
    # with the same outputs. a's entry records the value this checkout's params file holds and is taken; b's
    # records a value this checkout does not hold and stays.
    def with_params(lock: str, seeds: dict[str, str]) -> str:
        for n, v in seeds.items():
            head = f"  {n}:\n    cmd: run {n}\n"
            lock = lock.replace(
                head, f"{head}    params:\n      study/params.yaml:\n        study.tuning_seeds: {v}\n"
            )
        return lock

    dst = tmp_path / "main"
    (dst / "student").mkdir(parents=True)  # every other input of a and b is this checkout's
    (dst / "student" / "model.py").write_text("width = 64\n")
    here = path_hash(dst / "student").removesuffix(".dir")
    cells = {**BASE, "main@a": ("new", "a0"), "main@b": ("new", "b0")}
    write(dst, cells, code=here)
    (dst / "study" / "params.yaml").write_text("study:\n  seeds: [100]\n  tuning_seeds: [0, 1, 2000]\n")
    old = {"main@a": "[0, 1]", "main@b": "[0, 1]"}
    (dst / "study" / "dvc.lock").write_text(with_params((dst / "study" / "dvc.lock").read_text(), old))
    src = clone(tmp_path / "clone", cells, cells)
    code = dict.fromkeys(cells, here)
    (src / "study" / "dvc.lock").write_text(
        with_params(lock_of(cells, code), {"main@a": "[0, 1, 2000]", "main@b": "[0, 1, 3000]"})
    )
    monkeypatch.chdir(dst)

    r = CliRunner().invoke(main, [str(src), "--dry-run"])
    assert r.exit_code == 0 and r.output.split() == ["main@a"], r.output
    r = CliRunner().invoke(main, [str(src)])
    assert r.exit_code == 0 and "1 cells taken" in r.output, r.output
    want = with_params(lock_of(cells, code), {"main@a": "[0, 1, 2000]", "main@b": "[0, 1]"})
    assert (dst / "study" / "dvc.lock").read_text() == want


def test_a_missing_output_or_an_unknown_stage_takes_nothing(tmp_path, monkeypatch):
    dst = tmp_path / "main"
    write(dst, BASE)
    monkeypatch.chdir(dst)
    before = (dst / "study" / "dvc.lock").read_text()
    now = {**BASE, "main@a": ("new", "a1"), "main@b": ("new", "b1")}
    src = clone(tmp_path / "clone", BASE, now)
    (src / "study" / "runs" / "main@b" / "eval.json").unlink()
    r = CliRunner().invoke(main, [str(src)])
    assert r.exit_code != 0 and "outputs its lock records are missing" in r.output
    assert (dst / "study" / "dvc.lock").read_text() == before
    assert (dst / "study" / "runs" / "main@a" / "eval.json").read_text() == "a0"

    (src / "study" / "runs" / "main@b" / "eval.json").mkdir()  # a folder there, a file here
    r = CliRunner().invoke(main, [str(src)])
    assert r.exit_code != 0 and "or a file here and a folder there" in r.output
    (src / "study" / "runs" / "main@b" / "eval.json").rmdir()
    (src / "study" / "runs" / "main@b" / "eval.json").write_text("b1")
    import shutil

    copy, calls = shutil.copyfile, []

    def fails_half_way(a, b):  # the second copy leaves part of a file and fails (a full disk)
        calls.append(a)
        if len(calls) == 2:
            Path(b).write_text("b")
            raise OSError(28, "No space left on device")
        return copy(a, b)

    monkeypatch.setattr(shutil, "copyfile", fails_half_way)
    r = CliRunner().invoke(main, [str(src)])
    assert r.exit_code != 0 and len(calls) == 2
    assert (dst / "study" / "dvc.lock").read_text() == before and not list(dst.rglob(".*take-*"))
    assert (dst / "study" / "runs" / "main@a" / "eval.json").read_text() == "a0"
    monkeypatch.setattr(shutil, "copyfile", copy)

    other = clone(tmp_path / "other", BASE, {**BASE, "extra@z": ("new", "z1")})
    r = CliRunner().invoke(main, [str(other)])
    assert r.exit_code != 0 and "does not define: ['extra@z']" in r.output
