"""The pipeline files a DVC target needs: ``scoped_repo(root, target)`` opens a DVC ``Repo`` whose index holds
only the target's pipeline file and the files upstream of it.

Why: DVC builds its index from every dvc.yaml and .dvc file of the repository, each with its stages and its
dvc.lock, before it answers a ``status`` (``Repo.index``). The study's pipeline file (600+ cells, a 4 MB
dvc.lock that DVC parses with a pure-Python YAML loader) made ``python -m pipeline.repro`` of the main
pipeline spend ~45 s of a core planning, and as much again at each recheck while no stage ran, although no
stage of the main pipeline needs a cell: 2-3 minutes of every ``make repro`` (docs/time-budget.md).

How: every pipeline file of the repository (git's tracked and not-ignored files, as DVC only collects files
git does not ignore) has its stage definitions resolved by DVC's own templating (foreach, matrix, ``${}``),
without its lock, which is cheap. The target's file is in scope, and so, repeatedly, is every file with an
output that equals, holds or lies inside a dep of a file in scope; only those files' stages and locks are
loaded. A file downstream of the target or beside it is not read. When the files cannot be listed (no git)
or one cannot be resolved, the index is DVC's own whole one: a wrong narrowing would hide an upstream stage,
a slow plan only costs time.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dvc.repo import Repo

from pipeline.repro import OUTPUT_KEYS, entry_paths, overlaps


def target_file(target: str) -> str:
    """The pipeline file a ``pipeline.repro`` target lives in: a path to one, or a stage addressed as DVC does
    (``name`` in the root dvc.yaml, ``path/dvc.yaml:name`` elsewhere)."""
    if ":" in target:
        return target.rsplit(":", 1)[0]
    if os.path.basename(target) == "dvc.yaml" or target.endswith(".dvc"):
        return target
    return "dvc.yaml"


def _pipeline_files(root: Path) -> list[str] | None:
    from dvc.dvcfile import is_valid_filename

    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    names = {n for n in out.stdout.decode(errors="surrogateescape").split("\0") if n}
    return sorted(n for n in names if is_valid_filename(n) and (root / n).is_file())


def _params_files(entries: Iterable[Any] | None) -> list[str]:
    files = []
    for entry in entries or ():
        if isinstance(entry, dict):
            files.extend(str(k) for k in entry)
        else:
            files.append("params.yaml")  # a bare key names the default params file
    return files


def _deps_and_outs(repo: Repo, name: str) -> tuple[set[str], set[str]]:
    """Absolute deps (params files included) and outputs of every stage a pipeline file defines."""
    from dvc.dvcfile import load_file

    root = Path(repo.root_dir)
    dvcfile = load_file(repo, str(root / name))
    deps: set[str] = set()
    outs: set[str] = set()
    if not hasattr(dvcfile, "resolver"):  # a .dvc file: its one stage, small
        for stage in dvcfile.stages.values():
            deps |= {os.path.abspath(d.fs_path) for d in stage.deps}
            outs |= {os.path.abspath(o.fs_path) for o in stage.outs}
        return deps, outs
    here = (root / name).parent
    for definition in (dvcfile.resolver.resolve().get("stages") or {}).values():
        wdir = here / str(definition.get("wdir") or ".")
        deps |= {os.path.normpath(wdir / p) for p in entry_paths(definition.get("deps"))}
        deps |= {os.path.normpath(wdir / p) for p in _params_files(definition.get("params"))}
        for key in OUTPUT_KEYS:
            outs |= {os.path.normpath(wdir / p) for p in entry_paths(definition.get(key))}
    return deps, outs


def _related(deps: set[str], outs: set[str]) -> bool:
    return any(overlaps(d, o) for d in deps for o in outs)


def files_in_scope(repo: Repo, target: str) -> list[str] | None:
    """The pipeline files (relative to the repository root) that planning ``target`` needs: its own and, transitively,
    every file producing something a file in scope depends on. None when that cannot be worked out."""
    root = Path(repo.root_dir)
    names = _pipeline_files(root)
    own = os.path.normpath(os.path.relpath(os.path.abspath(target_file(target)), root))
    if names is None or own not in names:
        return None
    try:
        table = {n: _deps_and_outs(repo, n) for n in names}
    except Exception:  # noqa: BLE001 - any failure to resolve: DVC's own whole index decides
        return None
    scope, deps = {own}, set(table[own][0])
    grew = True
    while grew:
        grew = False
        for name, (file_deps, file_outs) in table.items():
            if name not in scope and _related(deps, file_outs):
                scope.add(name)
                deps |= file_deps
                grew = True
    return sorted(scope)


class _ScopedRepo(Repo):
    """A Repo whose index (rebuilt by DVC after every locked operation) holds only ``_scope``'s files."""

    _scope: list[str] | None = None

    @property
    def index(self):  # type: ignore[override]
        from dvc.repo.index import Index

        cached = self.__dict__.get("_scoped_index")
        if cached is None:
            if self._scope is None:
                cached = Index.from_repo(self)
            else:
                files = [os.path.join(self.root_dir, n) for n in self._scope]
                cached = Index.from_indexes(self, [Index.from_file(self, f) for f in files])
            self.__dict__["_scoped_index"] = cached
        return cached

    def _reset(self) -> None:
        super()._reset()
        self.__dict__.pop("_scoped_index", None)


def scoped_repo(root: str | Path, target: str, **kwargs: Any) -> Repo:
    """``Repo(root, **kwargs)`` whose index holds only what planning ``target`` needs (see the module), its
    dvc.lock files read entry by entry (pipeline/dvc_lockcache.py)."""
    from .dvc_lockcache import install

    install()
    repo = _ScopedRepo(str(root), **kwargs)
    repo._scope = files_in_scope(repo, target)
    return repo
