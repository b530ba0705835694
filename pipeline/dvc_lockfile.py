"""DVC with a cheap dvc.lock update: ``python -m pipeline.dvc_lockfile <dvc arguments>`` runs ``dvc``.

Why: after every stage DVC rewrites the whole dvc.lock, parsing it with ruamel's round-trip loader and dumping
it with ruamel's pure-Python emitter (neither has a C version). The study's lock holds ~235 lines per cell;
at 319 cells (1.8 MB) that update took 34-69 s of the repository lock and a core after each ~4-minute cell,
and it grows with every cell (docs/study.md, Sizing). ``pipeline.repro`` runs every stage through this module.

How: only ``Lockfile`` updates of a local dvc.lock take this path (everything else DVC writes, e.g. dvc.yaml
with its comments, keeps DVC's own). The file is parsed with libyaml (PyYAML's C loader); once DVC has put its
stage entries in, only the entries it changed are rendered, by DVC's own dumper, and spliced into the text in
place of the old ones (a new stage goes last, where DVC's dump puts it), so every other byte stays as it was
and the file is byte for byte what DVC would write. The result is parsed back and must equal what DVC meant
to write; when it does not (libyaml reads YAML 1.1, DVC writes 1.2, so e.g. an unquoted ``1:20`` reads as a
number) or the change is one this does not splice (a removed stage, a changed top-level key, a new file),
the update falls back to DVC's own round-trip parse and dump of the original text. The file is written
beside and renamed into place, so an interrupted update leaves the previous lock whole.

DVC's reads of a dvc.lock, installed with the update, go entry by entry through pipeline/dvc_lockcache.py.

``python -m pipeline.dvc_lockfile commit-unchanged --only DEP [STAGE...]``: ``dvc commit -f`` of many stages
whose only changed entries are the deps named by ``--only`` (a code change that provably changes no output,
e.g. a faster implementation giving the same values): each pipeline file and its lock parsed once and each
lock written once, where ``dvc commit`` re-reads the lock for every target (at 487 study stages it had not
finished in 15 minutes). Any other change in a named stage fails the command before anything is written;
without STAGE, every stage whose only changes are those deps is committed and every other one left as is.

``python -m pipeline.dvc_lockfile rehash [--lock L] [--from REV] [--new FILE] PATH...``: the unchecked
fallback, for when the other inputs cannot be checked on this machine (``rehash``'s and ``add_new_dep``'s
docstrings). ``python -m pipeline.dvc_lockfile add-param [--lock L] SECTION.KEY=VALUE``: the same for a new
params.yaml key whose value does what the code did before it (``add_param``'s docstring).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# The lock layout both halves rely on (this module's update, pipeline/dvc_lockcache.py's read): the
# top-level key line, under which every stage entry is a two-space-indented block.
STAGES_KEY = "stages:\n"


def fast_load(text: str) -> dict:
    return yaml.load(text, Loader=_LOADER) or {}


def stage_blocks(lines: list[str]) -> tuple[dict[str, tuple[int, int]], int] | None:
    """Each stage entry's header line (``"  name:\\n"``) -> its [start, end) line span under the top-level
    ``stages:`` key, and the line where that mapping ends; None when the text is not laid out so."""
    try:
        first = lines.index(STAGES_KEY) + 1
    except ValueError:
        return None
    blocks: dict[str, tuple[int, int]] = {}
    start = None
    end = first
    while end < len(lines) and lines[end].startswith("  "):
        if (
            lines[end][2] in "?:"
        ):  # an explicit key (DVC writes a name over 128 characters so): not our layout
            return None
        if lines[end][2] != " ":  # two spaces and a key: the next stage entry
            if start is not None:
                blocks[lines[start]] = (start, end)
            start = end
        end += 1
    if start is not None:
        blocks[lines[start]] = (start, end)
    return blocks, end


def _top_level(lock: dict) -> dict:
    return {k: v for k, v in lock.items() if k != "stages"}


def splice(text: str, before: dict, after: dict, render: Callable[[dict], str]) -> str | None:
    """``text`` (a lock file that parses to ``before``) with the stage entries that differ in ``after``
    re-rendered by ``render`` (DVC's dumper) and everything else kept byte for byte; None when the change is
    not one of changed or added stage entries, or the text is not laid out as DVC writes it."""
    old, new = before.get("stages") or {}, after.get("stages") or {}
    if _top_level(before) != _top_level(after):
        return None
    if list(new)[: len(old)] != list(old):  # a stage removed, or the order changed: not a splice
        return None
    # Every entry DVC put in (a new object; the others are libyaml's own) is re-rendered, even when it equals
    # the old one: libyaml reads YAML 1.1, so the old text's `yes` reads as True, and a param that went from
    # the string "yes" to true would compare equal and never be written.
    changed = [n for n in new if n not in old or new[n] is not old[n]]
    if not changed:
        return text
    lines = text.splitlines(keepends=True)
    if not lines or not lines[-1].endswith("\n"):
        return None
    layout = stage_blocks(lines)
    if layout is None:
        return None
    blocks, stages_end = layout
    replaced: dict[int, tuple[int, list[str]]] = {}
    appended: list[str] = []
    for name in changed:
        rendered = render({"stages": {name: new[name]}}).splitlines(keepends=True)
        if not rendered or rendered[0] != STAGES_KEY:
            return None
        entry = rendered[1:]
        if name in old:
            span = blocks.get(entry[0])
            if span is None:
                return None
            replaced[span[0]] = (span[1], entry)
        else:
            appended += entry
    out: list[str] = []
    i = 0
    while i < len(lines):
        if i == stages_end:
            out += appended
        if i in replaced:
            end, entry = replaced[i]
            out += entry
            i = end
            continue
        out.append(lines[i])
        i += 1
    if stages_end == len(lines):
        out += appended
    return "".join(out)


def _dvc_render(data: dict) -> str:
    from dvc.utils.serialize._yaml import _dump

    stream = io.StringIO()
    _dump(data, stream)
    return stream.getvalue()


def _write_beside(path: str, text: str) -> None:
    """Replace ``path``'s text whole: written beside it, flushed, renamed over it (an interrupt leaves the old
    file). A symlinked lock is written through to its target, and the file keeps its permissions, as DVC's
    own update does."""
    from .durable import sync_dir

    path = os.path.realpath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())  # the text on disk before the name says it is the lock
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
        sync_dir(os.path.dirname(path))
    except BaseException:  # an interrupt or a full disk: no stray half file beside the lock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _round_trip(text: str, path: str, before: dict, after: dict) -> str:
    """DVC's own update: the original text parsed round-trip, DVC's changes applied, dumped by DVC."""
    from dvc.utils.serialize._yaml import parse_yaml_for_update

    data = parse_yaml_for_update(text, path)
    for key in list(data):
        if key not in after:
            del data[key]
    for key, value in after.items():
        if key == "stages":
            continue
        if key not in before or before[key] != value:
            data[key] = value
    old, new = before.get("stages") or {}, after.get("stages") or {}
    stages = data.setdefault("stages", {})
    for name in list(stages):
        if name not in new:
            del stages[name]
    for name, entry in new.items():
        if name not in old or entry is not old[name]:  # DVC's entry, not one libyaml read back
            stages[name] = entry
    return _dvc_render(data)


@contextlib.contextmanager
def modify_lockfile(path: str, fs: Any = None, _original: Callable | None = None) -> Iterator[dict]:
    """``dvc.utils.serialize.modify_yaml`` for a local dvc.lock (see the module's docstring); a new file goes
    through ``_original`` (default: DVC's own)."""
    text = data = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        data = fast_load(text)
    # DVC's own update for a new file, and for a stage named on, off, yes, no...: libyaml (YAML 1.1) reads
    # such a name as a boolean, and both the splice and the fallback (which deletes what DVC's parse has and
    # libyaml's lacks) would drop its entry.
    if data is None or not all(isinstance(k, str) for k in data.get("stages") or {}):
        if _original is None:
            from dvc.utils.serialize import modify_yaml as _original
        with _original(path, fs=fs) as data:
            yield data
        return
    before = copy.deepcopy(_top_level(data))  # DVC may change them in place (datasets); stages it replaces
    before["stages"] = dict(data.get("stages") or {})
    yield data
    new_text = splice(text, before, data, _dvc_render)
    try:
        if new_text is not None and new_text != text and fast_load(new_text) != data:
            new_text = None  # libyaml reads the rendered entry otherwise than DVC meant it (YAML 1.1 vs 1.2)
    except yaml.YAMLError:  # a layout the splice misread: DVC's own update is always right
        new_text = None
    if new_text is None:
        new_text = _round_trip(text, path, before, data)
    if new_text != text:
        _write_beside(path, new_text)


def install() -> None:
    """Route DVC's dvc.lock updates through ``modify_lockfile`` and its dvc.lock reads through
    ``pipeline.dvc_lockcache`` (each entry parsed once); every other file keeps DVC's own path."""
    import dvc.dvcfile
    from dvc.fs import LocalFileSystem

    from .dvc_lockcache import install as install_reads

    install_reads()

    original = dvc.dvcfile.modify_yaml
    if getattr(original, "_clip_td_lockfile", False):
        return  # already routed (commit_unchanged installs it too): a second wrapper would only nest the first

    def modify_yaml(path, fs=None):
        local = fs is None or isinstance(fs, LocalFileSystem)
        if local and os.path.basename(os.fspath(path)) == "dvc.lock":
            return modify_lockfile(os.fspath(path), fs=fs, _original=original)
        return original(path, fs=fs)

    modify_yaml._clip_td_lockfile = True
    dvc.dvcfile.modify_yaml = modify_yaml


class UnsafeCommit(Exception):
    """A stage named for ``commit_unchanged`` changed in more than the deps it may change."""


def commit_unchanged(targets: Sequence[str], only: Sequence[str], root: str = ".") -> list[str]:
    """Record the current hashes of ``targets`` (DVC stage addresses, e.g. ``study/dvc.yaml:main@x``) in their
    dvc.lock files, as ``dvc commit -f`` does, after checking that each one's changed entries are deps in
    ``only`` and nothing else (outputs, command, params and other deps unchanged); returns the stages whose
    entry changed. Raises UnsafeCommit naming every offending stage, KeyError naming unknown ones. With no
    ``targets``, every stage of the repository is a candidate and those with any other change (a stage not
    run yet, one whose code really changed) are left as they are instead of refused."""
    from dvc.repo import Repo

    install()
    with Repo(root) as repo, repo.lock:
        stages = {s.addressing: s for s in repo.index.stages}
        unknown = [t for t in targets if t not in stages]
        if unknown:
            raise KeyError(f"no such stage(s): {', '.join(unknown)}")
        chosen = [stages[t] for t in dict.fromkeys(targets)] if targets else list(stages.values())
        unsafe, changed = [], []
        for s in chosen:
            deps, outs, cmd = s.changed_entries()
            other = [d for d in deps if d not in only] + outs + ([cmd] if cmd else [])
            if other:
                unsafe.append(f"{s.addressing}: {', '.join(other)}")
            elif deps:
                changed.append(s)
        if unsafe and targets:
            raise UnsafeCommit(
                f"{len(unsafe)} stage(s) changed in more than {', '.join(only)}; nothing was committed:\n"
                + "\n".join(unsafe[:20])
            )
        by_file: dict[str, list] = {}
        for s in changed:
            by_file.setdefault(s.dvcfile.path, []).append(s)
        for group in by_file.values():
            for s in group:
                s.save()
                s.commit()
            group[0].dvcfile.dump_stages(group, update_pipeline=False)  # one lock update per file
    return [s.addressing for s in changed]


def _md5(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()  # noqa: S324 - DVC's file hash, not a security measure


def _dir_hash(files: dict[str, bytes]) -> tuple[str, int, int]:
    """DVC's hash of a folder dep from its files' contents by relative path: (md5 + ".dir", size, nfiles)."""
    entries = sorted(({"md5": _md5(b), "relpath": r} for r, b in files.items()), key=lambda e: e["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode()
    return _md5(listing) + ".dir", sum(len(b) for b in files.values()), len(entries)


def _folder_now(folder: Path) -> dict[str, bytes]:
    # __pycache__ is in .dvcignore (Python writes it beside the code); nothing else in a code folder is.
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.relative_to(folder).parts
    }


def path_hash(path: Path) -> str:
    """DVC's md5 of a code dep as it is now: of the file's bytes, or of a folder's files (``_dir_hash``)."""
    return _dir_hash(_folder_now(path))[0] if path.is_dir() else _md5(path.read_bytes())


def _folder_at(rev: str, path: str, root: str) -> dict[str, bytes]:
    import subprocess

    listed = subprocess.run(
        ["git", "ls-tree", "-r", "-z", "--name-only", rev, "--", path], cwd=root, capture_output=True
    )
    names = [n for n in listed.stdout.decode().split("\0") if n]
    if listed.returncode != 0 or not names:
        raise ValueError(f"{path}: not a folder in git revision {rev}")

    def show(name: str) -> bytes:
        return subprocess.run(
            ["git", "show", f"{rev}:{name}"], cwd=root, capture_output=True, check=True
        ).stdout

    return {n[len(path) + 1 :]: show(n) for n in names if "__pycache__" not in n.split("/")}


def rehash(lock: str, paths: Sequence[str], rev: str = "HEAD", root: str = ".") -> dict[str, int]:
    """In ``lock``, replace the recorded hash of each dep in ``paths`` (a file, or a folder of code) by its
    current one, only in the entries that recorded its content at git revision ``rev``; returns how many
    entries each path had replaced. For a code change that changes no recorded result (a refusal added on a
    path no recorded stage took, a record added beside the outputs) when the stages' other inputs cannot be
    checked on this machine, which ``commit_unchanged`` needs (a trained artifact rebuilt with other bits).
    Nothing else in the file changes, and a stage recorded with any other version stays stale. A folder is
    hashed as DVC hashes it (every file but ``__pycache__``, which .dvcignore leaves out). Raises ValueError
    naming a path that is neither, or not in ``rev``."""
    with _repository_lock(root):
        return _rehash(lock, paths, rev, root)


@contextlib.contextmanager
def _repository_lock(root: str) -> Iterator[None]:
    """DVC's repository lock, waited for: a stage finishing meanwhile writes its entry under it, and a read
    and write back of the whole file outside it would undo that entry. None in a folder without DVC."""
    if not (Path(root) / ".dvc").is_dir():
        yield
        return
    from dvc.repo import Repo

    with Repo(root, _wait_for_lock=True) as repo, repo.lock:
        yield


def _rehash(lock: str, paths: Sequence[str], rev: str, root: str) -> dict[str, int]:
    import re
    import subprocess

    text = Path(lock).read_text(encoding="utf-8")
    counts: dict[str, int] = {}
    for path in dict.fromkeys(p.rstrip("/") for p in paths):
        here = Path(root) / path
        if here.is_dir():
            old, _, _ = _dir_hash(_folder_at(rev, path, root))
            new, size, nfiles = _dir_hash(_folder_now(here))
            entry = re.compile(
                rf"^(?P<head>(?P<i> *)- path: {re.escape(path)}\n(?P=i)  hash: md5\n(?P=i)  md5: ){re.escape(old)}"
                rf"(?P<mid>\n(?P=i)  size: )\d+(?P<tail>\n(?P=i)  nfiles: )\d+$",
                re.MULTILINE,
            )
            text, counts[path] = entry.subn(rf"\g<head>{new}\g<mid>{size}\g<tail>{nfiles}", text)
            continue
        if not here.is_file():
            raise ValueError(f"{path}: neither a file nor a folder here")
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
        if shown.returncode != 0:
            raise ValueError(f"{path}: not in git revision {rev} ({shown.stderr.decode().strip()})")
        old, data = _md5(shown.stdout), here.read_bytes()
        entry = re.compile(
            rf"^(?P<head>(?P<i> *)- path: {re.escape(path)}\n(?P=i)  hash: md5\n(?P=i)  md5: ){old}"
            rf"(?P<mid>\n(?P=i)  size: )\d+$",
            re.MULTILINE,
        )
        text, counts[path] = entry.subn(rf"\g<head>{_md5(data)}\g<mid>{len(data)}", text)
    if any(counts.values()):
        _write_beside(lock, text)
    return counts


def add_new_dep(lock: str, path: str, root: str = ".") -> int:
    """In ``lock``, give every entry whose stage (in the dvc.yaml beside it) lists the file ``path`` among its
    deps, and whose entry lacks it, ``path``'s current hash; returns how many entries got it. For a module
    split out of code the stages already ran, which moves code and changes no recorded result: like
    ``rehash``, it checks nothing else. The entry's deps stay sorted by path, as DVC writes them."""
    with _repository_lock(root):
        return _add_new_dep(lock, path, root)


def _add_new_dep(lock: str, path: str, root: str) -> int:
    stages = yaml.safe_load(Path(lock).with_name("dvc.yaml").read_text(encoding="utf-8"))["stages"]
    listed = {name for name, body in stages.items() if path in (body.get("do", body).get("deps") or [])}
    here = Path(root) / path
    if not here.is_file():
        raise ValueError(f"{path}: not a file here")
    data = here.read_bytes()
    item = [
        f"    - path: {path}\n",
        "      hash: md5\n",
        f"      md5: {_md5(data)}\n",
        f"      size: {len(data)}\n",
    ]
    lines = Path(lock).read_text(encoding="utf-8").splitlines(keepends=True)
    blocks, _ = stage_blocks(lines) or ({}, 0)
    n = 0
    for header, (start, end) in sorted(blocks.items(), key=lambda kv: -kv[1][0]):  # bottom up: spans hold
        if header.strip().rstrip(":").split("@")[0] not in listed or "    deps:\n" not in lines[start:end]:
            continue
        at = lines.index("    deps:\n", start, end) + 1
        stop, paths = at, []  # the deps' items: "    - path: P" and their "      key: value" lines
        while stop < end and lines[stop].startswith(("    - ", "      ")):
            if lines[stop].startswith("    - path: "):
                paths.append((lines[stop][len("    - path: ") :].rstrip("\n"), stop))
            stop += 1
        if path not in (p for p, _ in paths):
            later = [i for p, i in paths if p > path]
            pos = later[0] if later else stop
            lines[pos:pos] = item
            n += 1
    if n:
        _write_beside(lock, "".join(lines))
    return n


def add_param(lock: str, key: str, value: str, root: str = ".") -> int:
    """In ``lock``, record the new params.yaml key ``key`` ("section.name") at ``value`` (a YAML scalar) in every
    entry that records the whole section without it; returns how many entries got it. For a key added at the
    value that does what the code did before it existed (``train.precision: fp32``), so the stages ran exactly
    that: like ``rehash``, it checks nothing else. The key goes last in its section, where params.yaml (and so
    DVC) puts a key appended to it; an entry that records only other keys of the section is left as it is."""
    with _repository_lock(root):
        return _add_param(lock, key, value)


def _add_param(lock: str, key: str, value: str) -> int:
    section, _, name = key.partition(".")
    parsed = yaml.safe_load(value)
    if not section or not name or "." in name:
        raise ValueError(f"{key}: expected section.name (a key of a top-level section of params.yaml)")
    if isinstance(parsed, (dict, list)):
        raise ValueError(f"{key}={value}: only a scalar value can be added")
    rendered = yaml.safe_dump({name: parsed}, default_flow_style=False).strip()
    lines = Path(lock).read_text(encoding="utf-8").splitlines(keepends=True)
    n, i = 0, 0
    while i < len(lines):
        indent = _depth(lines[i])
        if lines[i].strip() != f"{section}:":
            i += 1
            continue
        # the section's mapping under an entry's "params.yaml:": its keys sit two deeper, its lists at that depth
        end, keys = i + 1, set()
        while end < len(lines) and _depth(lines[end]) > indent:
            child = lines[end]
            if _depth(child) == indent + 2 and not child.lstrip().startswith("- "):
                keys.add(child.strip().split(":", 1)[0])
            end += 1
        if keys and name not in keys and _under_params_yaml(lines, i, indent):
            lines.insert(end, " " * (indent + 2) + rendered + "\n")
            n += 1
        i = end
    if n:
        _write_beside(lock, "".join(lines))
    return n


def _depth(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _under_params_yaml(lines: list[str], i: int, indent: int) -> bool:
    """Whether line ``i`` (at ``indent``) is a key of a ``params.yaml:`` mapping."""
    for j in range(i - 1, -1, -1):
        if _depth(lines[j]) < indent:
            return lines[j].strip() == "params.yaml:"
    return False


def _run_cli(cli, argv: list[str]) -> int:
    """A subcommand's exit status (click's own exit caught: main() returns it to sys.exit)."""
    try:
        cli.main(argv, prog_name=f"python -m pipeline.dvc_lockfile {cli.name}")
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _rehash_cli(argv: list[str]) -> int:
    import click

    @click.command("rehash")
    @click.option("--lock", default="study/dvc.lock", show_default=True, help="the dvc.lock to update")
    @click.option(
        "--from", "rev", default="HEAD", show_default=True,
        help="the git revision whose version of each file the entries to update recorded",
    )  # fmt: skip
    @click.option(
        "--new", "new", multiple=True,
        help="a file the stages now list as a dep and their entries lack (a module split out of their code)",
    )  # fmt: skip
    @click.argument("paths", nargs=-1)
    def cli(lock: str, rev: str, new: tuple[str, ...], paths: tuple[str, ...]) -> None:
        """Record the current hash of the deps PATHS (files, or folders of code) in LOCK's entries that
        recorded their REV version, checking nothing else (see ``commit-unchanged`` for the checked way): for
        a code change that provably changes no recorded result, where the stages' other inputs are not on
        this machine to check. Each --new file is added to the entries whose stage lists it."""
        if not paths and not new:
            raise click.UsageError("give PATHS to rehash or --new files to add")
        try:
            counts = rehash(lock, paths, rev) if paths else {}
            counts |= {p: add_new_dep(lock, p) for p in new}
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        for path, n in counts.items():
            click.echo(f"{path}: {n} entr{'y' if n == 1 else 'ies'} updated")

    return _run_cli(cli, argv)


def _add_param_cli(argv: list[str]) -> int:
    import click

    @click.command("add-param")
    @click.option("--lock", default="study/dvc.lock", show_default=True, help="the dvc.lock to update")
    @click.argument("assignments", nargs=-1, required=True, metavar="SECTION.KEY=VALUE...")
    def cli(lock: str, assignments: tuple[str, ...]) -> None:
        """Record each new params.yaml key at VALUE in LOCK's entries that record its whole section without it,
        checking nothing else: for a key added at the value that does what the code did before it existed."""
        for a in assignments:
            key, eq, value = a.partition("=")
            if not eq:
                raise click.UsageError(f"{a}: expected SECTION.KEY=VALUE")
            try:
                n = add_param(lock, key, value)
            except ValueError as e:
                raise click.ClickException(str(e)) from None
            click.echo(f"{key}: {n} entr{'y' if n == 1 else 'ies'} updated")

    return _run_cli(cli, argv)


def _commit_unchanged_cli(argv: list[str]) -> int:
    import click

    @click.command("commit-unchanged")
    @click.option(
        "--only", "only", multiple=True, required=True, help="a dep path the stages may have changed"
    )
    @click.argument("stages", nargs=-1)
    def cli(only: tuple[str, ...], stages: tuple[str, ...]) -> None:
        """dvc commit -f of STAGES whose only changes are the deps given by --only, refusing any other change;
        without STAGES, of every stage whose only changes those are (the others are left as they are)."""
        try:
            done = commit_unchanged(stages, only)
        except (UnsafeCommit, KeyError) as e:
            raise click.ClickException(str(e.args[0])) from None
        click.echo(f"committed {len(done)} stage(s) whose only changes were {', '.join(only)}")

    return _run_cli(cli, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["commit-unchanged"]:
        return _commit_unchanged_cli(argv[1:])
    if argv[:1] == ["rehash"]:
        return _rehash_cli(argv[1:])
    if argv[:1] == ["add-param"]:
        return _add_param_cli(argv[1:])
    install()
    from dvc.cli import main as dvc_main

    return dvc_main(argv)


if __name__ == "__main__":
    sys.exit(main())
