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
