"""The manifest: one JSON entry per committed work unit, published atomically."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any

import fsspec

from ..durable import sync_dir
from .errors import CacheFormatError
from .schema import MANIFEST, PROVENANCE, PROVENANCE_KEYS, RUN_RECORD
from .store import _fs, _name


def commit_unit(url: str, name: str, record: dict) -> None:
    """Publish one unit's manifest entry. Readers must never see half a file: a local store writes a temporary
    file and renames it (atomic on POSIX); object stores make a single PUT visible all at once.

    The record's provenance (PROVENANCE_KEYS: which host and process computed the unit, in how many seconds)
    is published first to provenance/<unit>.json, and the manifest entry, the commit point, holds the rest.
    So a store built twice from the same teacher and data is byte-identical outside provenance/, which the
    repository's .dvcignore leaves out of DVC's hash: stages downstream of a rebuilt store stay up to date."""
    fs, path = _fs(url)
    provenance = {k: record[k] for k in PROVENANCE_KEYS if k in record}
    if provenance:
        _publish(fs, f"{path}/{PROVENANCE}/{name}.json", provenance)
    _publish(fs, f"{path}/{MANIFEST}/{name}.json", {k: v for k, v in record.items() if k not in provenance})


def record_run(url: str, metrics: dict) -> None:
    """Keep the last extraction run's metrics (seconds, rates, which units it computed) with the store, in
    provenance/extract.json: beside the content, like each unit's provenance, so the store's hash does not
    change with them."""
    fs, path = _fs(url)
    _publish(fs, f"{path}/{PROVENANCE}/{RUN_RECORD}.json", metrics)


def _publish(fs, target: str, record: dict) -> None:
    data = json.dumps(record, indent=1, sort_keys=True).encode()
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            sync_dir(os.path.dirname(target))
        except BaseException:  # a full disk or an interrupt: no stray file in the store (it is in its hash)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(target, data)


def _provenance(fs, path: str) -> dict[str, dict]:
    """provenance/<unit>.json by unit name. It is a record of who did the work, not the work: a file that
    cannot be read is left out rather than failing a read of the store."""
    folder = f"{path}/{PROVENANCE}"
    if not fs.exists(folder):
        return {}
    out = {}
    for p in fs.ls(folder, detail=False):
        base = _name(p)
        if not base.endswith(".json"):
            continue
        try:
            rec = json.loads(fs.cat_file(p))
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(rec, dict) and base != f"{RUN_RECORD}.json":
            out[base[: -len(".json")]] = {k: rec[k] for k in PROVENANCE_KEYS if k in rec}
    return out


def _manifest_problem(rec: Any) -> str:
    """Why a parsed manifest entry cannot be one ("" when it can): a JSON object whose ``arrays``, if any, maps
    array names to objects (each region's fields are checked where they are used, by ``verify``)."""
    if not isinstance(rec, dict):
        return f"not a manifest entry (expected a JSON object, got {type(rec).__name__})"
    arrays = rec.get("arrays", {})
    if not isinstance(arrays, dict) or not all(isinstance(v, dict) for v in arrays.values()):
        return "not a manifest entry ('arrays' must map array names to objects)"
    return ""


def read_manifest(url: str) -> tuple[dict[str, dict], dict[str, str]]:
    """(manifest entries by unit name, {unit name: why} for entries that cannot be read, each naming its file).
    Each entry carries its unit's provenance (host, pid, seconds) where provenance/ has it. Temporary files of
    an interrupted commit are ignored."""
    fs, path = _fs(url)
    folder = f"{path}/{MANIFEST}"
    if not fs.exists(folder):
        return {}, {}
    out, bad = {}, {}
    for p in fs.ls(folder, detail=False):
        base = _name(p)
        if not base.endswith(".json") or base == "zarr.json":
            continue
        name, where = base[: -len(".json")], f"{url.rstrip('/')}/{MANIFEST}/{base}"
        try:
            rec = json.loads(fs.cat_file(p))
        except (UnicodeDecodeError, ValueError) as e:
            bad[name] = f"{where}: not valid JSON ({e})"
            continue
        problem = _manifest_problem(rec)
        if problem:
            bad[name] = f"{where}: {problem}"
        else:
            out[name] = rec
    if out:
        for name, prov in _provenance(fs, path).items():
            if name in out:
                out[name] = {**out[name], **prov}
    return out, bad


def committed_units(url: str) -> dict[str, dict]:
    """Manifest entries by unit name. An entry that cannot be read raises CacheFormatError naming its file: a
    commit is atomic, so such a file was damaged after it was written, and the unit is not silently redone."""
    out, bad = read_manifest(url)
    if bad:
        name = min(bad)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CacheFormatError(
            f"{bad[name]}{more}: a damaged manifest entry; check the store (python -m stages.verify_cache), "
            f"then delete that file and rerun extraction to recompute unit {name}"
        )
    return out
