"""Comparing fingerprints: what a store was built from (teacher, data, store settings) against what a run
expects. Which teacher a fingerprint names is ``pipeline.identity``'s answer."""

from __future__ import annotations

import json


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
