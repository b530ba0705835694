"""dvc.yaml's code deps cannot drift: every module a stage imports (inside the repository) is one of its deps,
so a change there reruns the stages that use it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.conftest import REPO, repo_imports, repo_module_file


def import_closure(module: str) -> set[Path]:
    """Every repository file that running ``python -m module`` can import, with package __init__ files."""
    todo, seen, files = [module], set(), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        f = repo_module_file(m)
        if f is None:
            continue
        files.add(f)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents' __init__ run first
        todo += sorted(repo_imports(f, m))
    return {f.relative_to(REPO) for f in files}


PIPELINES = ("dvc.yaml", "study/dvc.yaml", "real/dvc.yaml")


def _stages() -> dict[str, tuple[dict, Path]]:
    """Every stage of every pipeline, with the folder its cmd and deps are relative to (repo-relative)."""
    out = {}
    for pipe in PIPELINES:
        folder = (REPO / pipe).parent
        for name, stage in yaml.safe_load((REPO / pipe).read_text())["stages"].items():
            body = stage.get("do", stage)
            wdir = (folder / body.get("wdir", ".")).resolve().relative_to(REPO)
            out[f"{pipe}:{name}"] = (body, wdir)
    return out


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def test_every_stage_lists_its_whole_import_closure():
    missing = {}
    for name, (body, wdir) in _stages().items():
        cmd = " ".join(body["cmd"].split())
        mods = re.findall(r"python -m ([\w.]+)", cmd)
        assert mods, f"stage {name}: cmd runs no python -m module"
        deps = [str(wdir / d) for d in body.get("deps", [])]
        # __init__.py files hold no logic here; a stage need not list them.
        need = {p for m in mods for p in import_closure(m) if p.name != "__init__.py"}
        lacking = sorted(str(p) for p in need if not _covered(p, deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml deps lack imported modules: {missing}"


def test_the_closure_follows_imports_inside_functions(tmp_path):
    # stages.pretrain_teacher imports pipeline.pretrain inside main(): the closure must still see it.
    assert Path("pipeline/pretrain.py") in import_closure("stages.pretrain_teacher")


def test_bytecode_caches_in_a_code_folder_leave_its_stages_up_to_date(tmp_path):
    """Python writes __pycache__/ into every code folder it imports from (unless PYTHONDONTWRITEBYTECODE is
    set): with the project's .dvcignore, a stage depending on the folder, recorded without them, stays up to
    date once they appear (study/dvc.lock was recorded without them)."""
    import os
    import shutil
    import subprocess
    import sys

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "dvc", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    dvc("init", "--no-scm", "-q")
    shutil.copy2(REPO / ".dvcignore", tmp_path / ".dvcignore")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("X = 1\n")
    cmd = f"{sys.executable} -c \"open('out.txt', 'w').write('x')\""
    stage = {"cmd": cmd, "deps": ["pkg"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    dvc("repro", "-q")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\x00bytecode")
    assert "up to date" in dvc("status")
    (tmp_path / "pkg" / "mod.py").write_text("X = 2\n")  # a real change still is one
    assert "modified" in dvc("status")


def test_every_output_but_evaluates_survives_a_failed_rerun():
    """DVC deletes a stage's outputs before running it unless they are marked persist; every stage here
    replaces its outputs itself, atomically, so a rerun that fails leaves the last run's. Evaluate's folder is
    the exception: it holds one entry per run folder, and the report reads them all, so DVC clearing it is
    what drops a run that left the grid (scoring again takes minutes)."""
    lacking = []
    for name, (body, _) in _stages().items():
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                path, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
                persist = bool((opts or {}).get("persist"))
                if persist != (not name.endswith(":evaluate")):
                    lacking.append(f"{name}: {path} (persist: {persist})")
    assert not lacking, lacking
