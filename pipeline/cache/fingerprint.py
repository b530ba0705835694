"""Fingerprints: what a store was built from (teacher, data, store settings), and comparing two of them."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_fingerprint(describe: dict, weights_sha256: str = "") -> dict:
    """The teacher fields that change the cached numbers, from ``Teacher.describe()``. Paths, devices and
    library versions are left out (moving a checkpoint does not change its outputs; its checksum does); the
    model config and preprocessing enter as hashes to keep the fingerprint small. ``weights_sha256`` is the
    hash of a randomly initialised teacher's weights, which no checkpoint checksum covers."""
    keep = (
        "model",
        "pretrained_kind",
        "pretrained_checksum",
        "precision",
        "embed_dim",
        "num_patches",
        "grid",
    )
    fp = {k: describe.get(k) for k in keep}
    fp["config_sha256"] = _sha(describe.get("model_config"))
    fp["preprocess_sha256"] = _sha(describe.get("preprocess"))
    if weights_sha256:
        fp["weights_sha256"] = weights_sha256
    return fp


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_fingerprint(store_attrs: dict, expected: dict) -> list[str]:
    """Dotted names of the fields of ``expected`` whose value differs in the store (missing counts as differing).
    ``store_attrs`` may be the store's attrs (holding ``fingerprint``) or a fingerprint dict; ``expected`` may be
    partial (a student that only cares about the data passes just ``{"data": ...}``)."""
    have = store_attrs.get("fingerprint", store_attrs) if isinstance(store_attrs, dict) else {}
    flat_have, flat_want = flatten(have), flatten(expected)
    # JSON round trips turn tuples into lists; compare the JSON forms.
    return sorted(
        k
        for k, v in flat_want.items()
        if k not in flat_have or json.dumps(flat_have[k], default=str) != json.dumps(v, default=str)
    )
