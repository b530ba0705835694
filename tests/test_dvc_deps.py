"""dvc.yaml's code deps cannot drift: every module a stage imports (inside the repository) is one of its deps,
so a change there reruns the stages that use it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "student")


def _module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Modules of this repo imported anywhere in ``path`` (top level or inside functions: both run)."""
    tree = ast.parse(path.read_text())
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                stem = f"{base}.{node.module}" if node.module else base
            else:
                stem = node.module or ""
            # `from pkg import mod` may import a submodule: keep both candidates.
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] in PACKAGES and _module_file(n) is not None:
                found.add(n)
    return found


def import_closure(module: str) -> set[Path]:
    """Every repository file that running ``python -m module`` can import, with package __init__ files."""
    todo, seen, files = [module], set(), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        f = _module_file(m)
        if f is None:
            continue
        files.add(f)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents' __init__ run first
        todo += sorted(_imports(f, m))
    return {f.relative_to(REPO) for f in files}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def test_every_stage_lists_its_whole_import_closure():
    missing = {}
    for name, stage in _stages().items():
        body = stage.get("do", stage)
        cmd = " ".join(body["cmd"].split())
        mods = re.findall(r"python -m ([\w.]+)", cmd)
        assert mods, f"stage {name}: cmd runs no python -m module"
        deps = [str(d) for d in body.get("deps", [])]
        # __init__.py files hold no logic here; a stage need not list them.
        need = {p for m in mods for p in import_closure(m) if p.name != "__init__.py"}
        lacking = sorted(str(p) for p in need if not _covered(p, deps))
        if lacking:
            missing[name] = lacking
    assert not missing, f"dvc.yaml deps lack imported modules: {missing}"


def test_the_closure_follows_imports_inside_functions(tmp_path):
    # stages.pretrain_teacher imports pipeline.pretrain inside main(): the closure must still see it.
    assert Path("pipeline/pretrain.py") in import_closure("stages.pretrain_teacher")
