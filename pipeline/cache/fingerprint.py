"""Comparing fingerprints: what a store was built from (teacher, data, store settings) against what a run
expects. Which teacher a fingerprint names is ``pipeline.identity``'s answer."""

from __future__ import annotations

import json

from .errors import StaleCacheError


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


# Fields of a store's fingerprint that say which data it covers: a store grows to cover more (an append),
# so these differing is never stale. Everything else (teacher, store settings, format, the number of VQA
# candidates every text set was built with) must match for a store to be resumed or grown.
GROWING_FIELDS = ("data.datasets", "data.hash")


def _growing(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in GROWING_FIELDS)


def stale_fields(have: dict, want: dict) -> list[str]:
    """Dotted names of the fields, either side, that differ between two fingerprints, leaving out what a store
    grows by (``GROWING_FIELDS``): what makes a store stale for a run, whatever data either covers."""
    diff = set(check_fingerprint(have, want)) | set(check_fingerprint(want, have))
    return sorted(k for k in diff if not _growing(k))


def covered_datasets(store_attrs: dict) -> dict[str, str]:
    """{label: fingerprint} of every prepared dataset the store covers (all its images and texts committed)."""
    have = store_attrs.get("fingerprint", store_attrs) if isinstance(store_attrs, dict) else {}
    data = have.get("data") if isinstance(have, dict) else None
    ds = data.get("datasets") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in ds.items()} if isinstance(ds, dict) else {}


def uncovered(url: str, store_attrs: dict, path: object, fingerprint: str, what: str = "") -> str:
    """ "" when the store covers the prepared dataset at ``path`` (by its ``fingerprint``); else the one-line
    refusal naming what the store covers and the extraction that adds the dataset (``what`` says which data
    it is, e.g. "this run's training data ")."""
    covered = covered_datasets(store_attrs)
    if fingerprint in covered.values():
        return ""
    return (
        f"{url}: the teacher cache does not cover {what}{path} (fingerprint {fingerprint[:12]}; it covers: "
        f"{', '.join(sorted(covered)) or 'none'}); add it with python -m stages.extract_teacher --shards {path} "
        f"--out {url}, with the same --params/--set"
    )


def merge_datasets(
    covered: dict[str, str], added: dict[str, str], paths: dict[str, str] | None = None
) -> dict:
    """``covered`` plus the datasets of ``added`` it lacks (by fingerprint). A label already naming another
    dataset gets the dataset's parent folder in front (``paths``: label -> folder), then a fingerprint prefix."""
    out = dict(covered)
    held = set(out.values())
    for label, fp in added.items():
        if fp in held:
            continue
        name = label
        if name in out and paths and label in paths:
            parts = str(paths[label]).rstrip("/").split("/")
            name = "/".join(parts[-2:]) if len(parts) > 1 else label
        if name in out:
            name = f"{label}@{fp[:8]}"
        out[name] = fp
        held.add(fp)
    return out


def reading_fingerprint(store_attrs: dict, dataset_fingerprints: list[str]) -> dict:
    """What a student reading ``dataset_fingerprints`` from the store depends on: the store's fingerprint
    without what the store grows by, plus those datasets. An append of other data leaves it unchanged."""
    have = store_attrs.get("fingerprint", store_attrs) if isinstance(store_attrs, dict) else {}
    out = json.loads(json.dumps(have, default=str))
    data = out.get("data") if isinstance(out.get("data"), dict) else {}
    for f in GROWING_FIELDS:
        data.pop(f.split(".", 1)[1], None)
    out["data"] = {**data, "reads": sorted(dataset_fingerprints)}
    return out


# Where a store records each VQA answer's type (``pipeline.texts.answer_types`` of its vocabulary's training
# split), beside the vocabulary (``data.vqa_vocab``): with the two, every reader builds the candidate texts the
# store holds (``pipeline.texts.vqa_answers``).
VQA_ANSWER_TYPES = "vqa_answer_types"


def lacks_answer_types(store_attrs: dict | None) -> bool:
    """Whether a store holds a VQA answer vocabulary but no answer types: one extracted before VQA
    distractors shared the gold answer's type, whose candidate texts span every type. It is stale for
    every run (``pipeline.extract`` rebuilds it, a reader refuses it)."""
    data = store_attrs.get("data") if isinstance(store_attrs, dict) else None
    data = data if isinstance(data, dict) else {}
    return bool(data.get("vqa_vocab")) and not isinstance(data.get(VQA_ANSWER_TYPES), dict)


def vqa_answer_space(url: str, store_attrs: dict) -> tuple[list[str], dict[str, str]]:
    """The VQA answer vocabulary and each answer's type that the store's candidate texts were built from
    (``data.vqa_vocab``, ``data.vqa_answer_types``); ``([], {})`` for a store that holds no VQA answers. A
    store from before the types (``lacks_answer_types``) raises StaleCacheError naming the store and the key:
    read with the whole vocabulary, its candidates would be the old rule's, never silently."""
    if lacks_answer_types(store_attrs):
        raise StaleCacheError(
            url,
            [f"data.{VQA_ANSWER_TYPES}"],
            "the store holds a VQA answer vocabulary but no answer types: it was extracted before VQA "
            "distractors were drawn from the gold answer's type, so its candidate texts are not the ones "
            "this version builds; re-run python -m stages.extract_teacher on it with --rebuild-stale (as "
            "dvc.yaml does) or --overwrite",
        )
    data = store_attrs.get("data") if isinstance(store_attrs, dict) else None
    data = data if isinstance(data, dict) else {}
    return list(data.get("vqa_vocab") or []), dict(data.get(VQA_ANSWER_TYPES) or {})
