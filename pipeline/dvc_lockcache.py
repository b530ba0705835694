"""DVC's reading of a dvc.lock, entry by entry, each entry parsed once: the read side of pipeline/dvc_lockfile.py.

Why: DVC parses a dvc.lock with ruamel's pure-Python constructor every time it loads one. The study's lock
(4 MB, 616 entries) took 3.6-3.8 s of a core per load on a fast 2-core machine (docs/study.md), paid by
every study cell's own ``dvc repro --single-item`` before it could even say "didn't change, skipping", and
by every ``dvc status``; yet each cell changes one entry of it.

How: ``parse_lock`` cuts the text into its top-level stage entries as DVC lays them out (the same cut the
write path splices by), and parses each entry alone, with DVC's own parser (ruamel, YAML 1.2), as the
document ``stages:`` + that entry. An entry's parse is kept under the SHA-256 of its text, in memory and in
``.dvc/tmp/lock-entries/`` beside the repository's other temporary files (JSON, one file per lock, holding only
the entries of its latest text); a later load parses only the entries whose text it has not seen. The
result is the dict ruamel gives for the whole text, in the same order: a YAML mapping entry in block
style means the same alone as in its document as long as nothing refers across entries, so any text
that could (anchors, aliases, tags, directives, document markers, comments, blank lines, a layout DVC does
not write, a repeated stage name, a value JSON cannot keep exactly) is parsed whole, as DVC would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .dvc_lockfile import STAGES_KEY, stage_blocks

# An indicator where a YAML node may start (anchor &, alias *, tag !, directive %), or a document marker or a
# comment line: anything that can tie one entry to another or that DVC does not write.
_UNSAFE = re.compile(r"(?m)(?:^\s*|: |- |[\[{,]\s*)[&*!%]|^(?:---|\.\.\.)|^\s*#")
_CACHE_DIR = ("tmp", "lock-entries")
_MEMORY: dict[str, tuple[str, str]] = {}  # entry text's SHA-256 -> (stage name, its parse as JSON)

Parse = Callable[[str, str, str], Any]


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    # DVC's safe parse runs on ruamel's C loader when ruamel.yaml.clib is installed, pure Python otherwise:
    # a parse cached under one is not served under the other (or another version of it).
    try:
        clib = version("ruamel.yaml.clib")
    except PackageNotFoundError:
        clib = "absent"
    return f"dvc {version('dvc')}, ruamel.yaml {version('ruamel.yaml')}, ruamel.yaml.clib {clib}, format 1"


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (1 == 1.0 == True for ==, not here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _cache_file(path: str) -> Path | None:
    """``<repo>/.dvc/tmp/lock-entries/<sha256 of the lock's real path>.json``; None outside a DVC repository."""
    real = os.path.realpath(path)
    for folder in Path(real).parents:
        if (folder / ".dvc").is_dir():
            key = hashlib.sha256(real.encode()).hexdigest()
            return folder.joinpath(".dvc", *_CACHE_DIR, f"{key}.json")
    return None


def _load_disk(file: Path | None) -> dict[str, Any]:
    if file is None:
        return {}
    try:
        stored = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every entry is parsed again
    if not isinstance(stored, dict) or stored.get("versions") != _versions():
        return {}
    entries = stored.get("entries")
    return entries if isinstance(entries, dict) else {}


def _save_disk(file: Path | None, entries: dict[str, tuple[str, str]]) -> None:
    if file is None:
        return
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):  # a cache: failing to keep it costs a parse next time, nothing else
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"versions": _versions(), "entries": entries}))
        os.replace(tmp, file)
    with contextlib.suppress(OSError):
        tmp.unlink()


def _on_disk(key: str, disk: dict[str, Any]) -> tuple[str, str] | None:
    entry = disk.get(key)
    if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry):
        return entry[0], entry[1]
    return None


def parse_lock(text: str, path: str, parse: Parse) -> Any:
    """What ``parse(text, path, "safe")`` (DVC's ``parse_yaml``) returns for a dvc.lock, parsing only the
    stage entries not parsed before (see the module's docstring); the whole text through ``parse`` whenever
    that cannot be shown to give the same."""
    lines = text.splitlines(keepends=True)
    layout = stage_blocks(lines) if lines and lines[-1].endswith("\n") and not _UNSAFE.search(text) else None
    if layout is None or not layout[0]:
        return parse(text, path, "safe")
    blocks, end = layout
    first = lines.index(STAGES_KEY)
    if sum(line[2] != " " for line in lines[first + 1 : end]) != len(blocks):
        return parse(text, path, "safe")  # a stage named twice: DVC's parser says so
    if any(not re.match(r"[^\s#]", line) for line in lines[:first] + lines[end:]):
        return parse(text, path, "safe")  # a blank or indented line outside the stages: not DVC's layout
    head = parse("".join(lines[:first]), path, "safe") if first else {}
    tail = parse("".join(lines[end:]), path, "safe") if end < len(lines) else {}
    if not isinstance(head, dict) or not isinstance(tail, dict) or "stages" in head or set(head) & set(tail):
        return parse(text, path, "safe")
    file = _cache_file(path)
    disk: dict[str, Any] | None = None  # read at the first entry this process has not seen
    parsed = False
    keep: dict[str, tuple[str, str]] = {}
    stages: dict[str, Any] = {}
    for lo, hi in blocks.values():
        entry = "".join(lines[lo:hi])
        key = hashlib.sha256(entry.encode()).hexdigest()
        hit = _MEMORY.get(key)
        if hit is None:
            disk = _load_disk(file) if disk is None else disk
            hit = _on_disk(key, disk)
        if hit is None:
            try:
                alone = parse(STAGES_KEY + entry, path, "safe")
            except Exception:  # an entry that does not parse alone (a layout not ours): the whole file says
                return parse(text, path, "safe")
            if not (
                isinstance(alone, dict) and list(alone) == ["stages"] and isinstance(alone["stages"], dict)
            ):
                return parse(text, path, "safe")
            if len(alone["stages"]) != 1:
                return parse(text, path, "safe")
            name, value = next(iter(alone["stages"].items()))
            try:
                as_json = json.dumps(value)
            except (TypeError, ValueError):
                return parse(text, path, "safe")  # a date, say: not a value JSON keeps
            if not isinstance(name, str) or not _same(json.loads(as_json), value):
                return parse(text, path, "safe")  # a value JSON does not give back as it was (NaN, say)
            hit, parsed = (name, as_json), True
        _MEMORY[key] = keep[key] = hit
        stages[hit[0]] = json.loads(hit[1])  # a fresh copy on every load: DVC may change what it is given
    if len(stages) != len(blocks):
        # Two headers naming one stage (one quoted, one not): DVC's parser says so.
        return parse(text, path, "safe")
    if parsed or (disk is not None and keep.keys() != disk.keys()):
        _save_disk(file, keep)  # what a later process will look for: this text's entries, no others
    return {**head, "stages": stages, **tail}


def install() -> None:
    """Route DVC's parse of every dvc.lock through ``parse_lock``; every other file keeps DVC's own parse."""
    import dvc.utils.strictyaml as strictyaml

    original = strictyaml.parse_yaml
    if getattr(original, "_clip_td_lockcache", False):
        return

    def parse_yaml(text, path, typ="safe"):
        if typ == "safe" and os.path.basename(os.fspath(path)) == "dvc.lock":
            return parse_lock(text, os.fspath(path), original)
        return original(text, path, typ=typ)

    parse_yaml._clip_td_lockcache = True
    strictyaml.parse_yaml = parse_yaml
