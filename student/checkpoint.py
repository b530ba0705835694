"""Whose checkpoint is this: a run's identity, checked on resume, and the torch files a run writes and reads.

A checkpoint records the run's identity (task, condition, method, seed, world size, the params that change the
numbers, the data's and the targets' fingerprints, the backbone it started from) and is resumed only by that
run. Files hold only tensors and plain data, load with ``weights_only=True``, and are written beside their
destination and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from pipeline.cache import flatten
from pipeline.config import Params, to_dict
from pipeline.durable import sync_dir, sync_files

from .errors import CheckpointError

# The checkpoint's run identity: what must match for a resumed run to be the run that was interrupted.
IDENTITY_FIELDS = (
    "task",
    "condition",
    "method",
    "seed",
    "world_size",
    "params_sha256",
    "data",
    "cache",
    "init",
    "resize_mode",  # the image region shown (absent: "shortest", as before it was recorded)
)
# train.* keys that change only speed or bookkeeping: a resume may change them. threads and device change
# only float rounding, so a resume across them is accepted, not bit-for-bit; num_workers is not here: each
# loader worker builds whole batches from its own slice, so the worker count changes which instances a
# batch holds.
_SPEED_ONLY = {"threads", "device", "target_cache_mb", "checkpoint_every"}


def load_state(path: Path, what: str) -> dict:
    """A torch file saved by this code, loaded with ``weights_only=True`` (tensors and plain containers only:
    a file that would run code when unpickled is refused). Every failure is one line naming the file."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"{path}: cannot load {what}: the file is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is several paragraphs and suggests turning the weights-only guard off; keep only what it refused.
        detail = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        why = f"it asks for {detail.group(1)}" if detail else "it asks for objects outside the allowlist"
        raise CheckpointError(
            f"{path}: refused to load {what}: not plain tensors and data ({why}, which unpickling would "
            "import and call); this version writes only tensors and plain data, so the file comes from an "
            "older version or from elsewhere and was not opened"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        # The first sentence: torch's zip reader appends a paragraph of advice (and EOFError says nothing).
        reason = (
            str(e).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(e).strip() else type(e).__name__
        )
        raise CheckpointError(
            f"{path}: cannot load {what}, truncated or not a torch file ({reason})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a {what} (holds a {type(state).__name__}, not a dict)")
    return state


def params_identity(params: Params, reads_store: bool) -> dict:
    """The parameters that change a run's numbers, flattened to dotted keys (what a resume must share)."""
    train = {k: v for k, v in to_dict(params.train).items() if k not in _SPEED_ONLY}
    pp = params.protocol
    out = {
        "student": to_dict(params.student),
        "train": train,
        "distill": to_dict(params.distill),
        "protocol": {"shift_key": pp.shift_key, "shift_target_domain": pp.shift_target_domain,
                     "val_fraction": pp.val_fraction},
        "teacher": {"model": params.teacher.model},
    }  # fmt: skip
    if not reads_store:  # views made by rule from cache.views (a store's own views are in its fingerprint)
        out["cache"] = {"views": params.cache.views}
    return flatten(out)


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def identity_differences(have: dict, want: dict) -> list[str]:
    """``field (checkpoint → this run)`` for every identity field that differs; params by their dotted key."""
    out = []
    for key in IDENTITY_FIELDS:
        a, b = have.get(key), want.get(key)
        if key == "resize_mode":
            a, b = a or "shortest", b or "shortest"
        if key == "params_sha256":
            if a == b:
                continue
            pa, pb = have.get("params") or {}, want.get("params") or {}
            keys = sorted(k for k in pa.keys() | pb.keys() if pa.get(k, "<unset>") != pb.get(k, "<unset>"))
            out += [f"{k} ({pa.get(k, '<unset>')} → {pb.get(k, '<unset>')})" for k in keys] or ["params"]
        elif key in ("data", "cache", "init") and a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                out += [f"{key}.{k} fingerprint" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
            else:
                out.append(f"{key} fingerprint")
        elif a != b:
            out.append(f"{key} ({a} → {b})")
    return out


def is_write_leftover(name: str) -> bool:
    """The temporary ``write_atomic`` writes (``.NAME.tmp-PID``), left behind only by a killed writer."""
    return re.fullmatch(r"\..+\.tmp-\d+", name) is not None


def write_atomic(path: Path, write) -> None:
    """Write beside the destination and rename into place: a kill mid-write leaves the previous file, and a
    crash after it leaves the new one whole (flushed before the rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        sync_files([tmp])
        os.replace(tmp, path)
        sync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
