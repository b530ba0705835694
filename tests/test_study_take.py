"""benchmarks.study_take: a sitting's cells come back from the clone that ran them, and nothing else does."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from benchmarks.study_take import main

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


def checkout(root: Path, backbone: str, cells: dict[str, tuple[str, str]], code: str = "c1") -> None:
    """A checkout's root lock (its pretrained student) and study lock (cell -> (backbone, output hash)), all
    recorded with the code hashed ``code``."""
    (root / "study").mkdir(parents=True)
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  pretrain_student:\n    cmd: p\n    outs:\n"
        f"    - path: artifacts/student_pretrained\n      hash: md5\n      md5: {backbone}.dir\n"
    )
    body = "".join(ENTRY.format(name=n, backbone=b, out=o, code=code) for n, (b, o) in cells.items())
    (root / "study" / "dvc.lock").write_text("schema: '2.0'\nstages:\n" + body)
    for n, (_, o) in cells.items():
        (root / "study" / "runs" / n).mkdir(parents=True)
        (root / "study" / "runs" / n / "eval.json").write_text(o)


def test_only_changed_cells_of_this_backbone_are_taken_with_their_outputs(tmp_path, monkeypatch):
    src, dst = tmp_path / "clone", tmp_path / "main"
    old = {"a": ("old", "a0"), "b": ("old", "b0"), "c": ("old", "c0"), "d": ("new", "d0")}
    checkout(dst, "new", old, code="c2")  # code rehashed here since the clone's revision
    # In the clone: a and b reran on the new backbone, c reran on yet another one, d did not change (its
    # entry differs in the code's hash only: taking it would undo this checkout's rehash).
    checkout(src, "new", {"a": ("new", "a1"), "b": ("new", "b1"), "c": ("other", "c1"), "d": ("new", "d0")})
    before = (dst / "study" / "dvc.lock").read_text()
    monkeypatch.chdir(dst)

    r = CliRunner().invoke(main, [str(src), "--dry-run"])
    assert r.exit_code == 0 and r.output.split() == ["a", "b"]
    assert (dst / "study" / "dvc.lock").read_text() == before

    r = CliRunner().invoke(main, [str(src)])
    assert r.exit_code == 0, r.output
    assert "2 cells taken, 2 output files copied" in r.output
    want = {"a": ("new", "a1"), "b": ("new", "b1"), "c": ("old", "c0"), "d": ("new", "d0")}
    code = {"a": "c1", "b": "c1", "c": "c2", "d": "c2"}
    assert (dst / "study" / "dvc.lock").read_text() == "schema: '2.0'\nstages:\n" + "".join(
        ENTRY.format(name=n, backbone=b, out=o, code=code[n]) for n, (b, o) in want.items()
    )
    assert [(dst / "study" / "runs" / n / "eval.json").read_text() for n in "abcd"] == [
        "a1",
        "b1",
        "c0",
        "d0",
    ]
    assert not list(dst.rglob(".*take-*"))


def test_a_clone_with_other_stages_is_refused(tmp_path, monkeypatch):
    src, dst = tmp_path / "clone", tmp_path / "main"
    checkout(dst, "new", {"a": ("old", "a0")})
    checkout(src, "new", {"a": ("new", "a1"), "z": ("new", "z1")})
    monkeypatch.chdir(dst)
    r = CliRunner().invoke(main, [str(src)])
    assert r.exit_code != 0 and "has stages study/dvc.lock here lacks: ['z']" in r.output
