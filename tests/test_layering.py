"""The house's layering and its names: stages/ over student/ over pipeline/, no module reaching up a layer
and no import circle; each shared name defined once, with the params Literals that must list the same names
checked against it."""

from __future__ import annotations

import typing
from pathlib import Path

from pipeline import config, names
from tests.conftest import REPO, repo_imports

LAYERS = {"pipeline": 0, "student": 1, "stages": 2}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_no_module_imports_from_a_higher_layer():
    upward = []
    for module, path in _modules().items():
        mine = LAYERS[module.split(".")[0]]
        for target in repo_imports(path, module):  # imports inside functions run too
            if LAYERS[target.split(".")[0]] > mine:
                upward.append(f"{module} -> {target}")
    assert not upward, f"imports from a lower layer into a higher one: {upward}"


def test_no_import_circle():
    graph = {m: repo_imports(p, m, top_level_only=True) for m, p in _modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t == m or m.startswith(t + "."):  # a package's own __init__ runs before its submodules anyway
                continue
            if state.get(t) == 1:
                return [*path[path.index(t) :], t] if t in path else [*path, t]
            if t not in state and (cycle := visit(t, [*path, t])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            raise AssertionError(f"import circle: {' -> '.join(cycle)}")


def _literal(cls: type, field: str) -> tuple:
    return typing.get_args(typing.get_type_hints(cls)[field])


def test_params_literals_list_the_registered_names():
    from student.losses import METHODS

    assert set(METHODS) == set(names.METHODS)  # the methods' switches are registered under these names
    assert set(_literal(config.DistillParams, "method")) == set(names.METHODS)
    assert set(_literal(config.DistillParams, "relevance_source")) == {"last", *names.RELEVANCE_SOURCES}
    assert set(_literal(config.DataParams, "source")) == set(names.DATA_SOURCES)
    assert config.ProtocolParams().tasks == list(names.TASKS)
