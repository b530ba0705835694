"""Planning: the unique images and texts the teacher must see (in store row order), and the work units."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import cache as C
from ..config import usable_cores
from ..data.errors import DataError
from ..data.shards import PreparedDataset
from ..splits import STANDARD_ROLES
from ..texts import answer_types, instance_texts, text_hash
from .errors import TextError
from .teachers import TeacherSpec


@dataclass
class Plan:
    """What the teacher must see, in store row order."""

    dataset_paths: list[str]
    images: list[tuple[int, str, str]]  # (dataset index, image id, sha1) per unique image
    alias_ids: list[str]  # ids whose bytes equal an earlier row's (different id, same content)
    alias_rows: list[int]
    texts: list[str]
    text_ids: list[str]
    vqa_vocab: list[str]
    vqa_vocab_from: str
    vqa_answer_types: dict[str, str]  # each vocabulary answer's type, where its training split gives one
    counts: dict
    data_fingerprint: dict
    skipped_texts: list[dict] = field(default_factory=list)


def _vocab_source(datasets: Sequence[PreparedDataset]) -> PreparedDataset | None:
    """The split whose answers are the VQA vocabulary: its source's standard train split (real VQA's is
    train2014; by name alone the first --shards with answers won, which could be val2014, the test role)."""
    with_answers = [d for d in datasets if d.info.get("answer_counts")]
    train = [
        d for d in with_answers
        if d.info.get("split") == STANDARD_ROLES.get(d.info.get("source", ""), STANDARD_ROLES["synthetic"])["train"]
    ]  # fmt: skip
    return (train or with_answers or list(datasets) or [None])[0]


def _dataset_fingerprints(datasets: Sequence[PreparedDataset]) -> dict[str, str]:
    """{dataset directory name: fingerprint}, so a stale check names the dataset that changed (``data.datasets.
    train``); names that repeat (vqa/train, snli_ve/train) get their parent folder in front."""
    names = [Path(ds.path).name for ds in datasets]
    out = {}
    for ds, name in zip(datasets, names, strict=True):
        key = name if names.count(name) == 1 else f"{Path(ds.path).parent.name}/{name}"
        out[key] = ds.fingerprint
    return out


def plan_extraction(
    datasets: Sequence[PreparedDataset],
    vqa_candidates: int = 4,
    on_error: str = "fail",
    vocab: Sequence[str] | None = None,
    types: dict[str, str] | None = None,
) -> Plan:
    """Unique images and texts over all datasets, with counts and the data fingerprint. ``vocab`` and
    ``types``: the VQA answer vocabulary and each answer's type to build candidate texts from (a store being
    grown keeps its own, both together); default: the train split's with answers, and the types its labelled
    instances give (``pipeline.texts.answer_types``)."""
    images: list[tuple[int, str, str]] = []
    by_id: dict[str, tuple[str, int]] = {}  # image id -> (sha1, row)
    by_sha: dict[str, int] = {}
    alias_ids, alias_rows = [], []
    images_total = id_repeats = 0
    for di, ds in enumerate(datasets):
        for image_id in ds.image_ids():
            images_total += 1
            sha = ds.image_sha1(image_id)
            if image_id in by_id:
                if by_id[image_id][0] != sha:
                    first = datasets[images[by_id[image_id][1]][0]].path
                    raise DataError(ds.path, image_id, f"image id also in {first} with different bytes")
                id_repeats += 1
                continue
            if sha in by_sha:  # same bytes under another id: one row, the id becomes an alias
                by_id[image_id] = (sha, by_sha[sha])
                alias_ids.append(image_id)
                alias_rows.append(by_sha[sha])
                continue
            by_sha[sha] = by_id.setdefault(image_id, (sha, len(images)))[1]
            images.append((di, image_id, sha))

    src = _vocab_source(datasets)
    vocab_from = str(src.path) if src is not None else ""
    if vocab:
        if types is None:  # the store's vocabulary with this run's types would be texts no reader builds
            raise ValueError("plan_extraction: a store's VQA vocabulary needs the store's answer types")
        vocab, vocab_from, types = list(vocab), "the store", dict(types)
    else:
        vocab = src.answer_vocab() if src is not None else []
        # One more pass over the vocabulary's split, only when it has VQA answers.
        types = answer_types(src.iter_instances()) if vocab else {}
    texts, text_ids, seen = [], [], set()
    instances = texts_total = 0
    skipped: list[dict] = []
    for ds in datasets:
        for inst in ds.iter_instances():
            instances += 1
            for t in instance_texts(inst, vocab, vqa_candidates, types).all():
                texts_total += 1
                if not t.strip():
                    err = TextError(ds.path, inst.key, f"empty teacher text for task {inst.task!r}")
                    if on_error == "fail":
                        raise err
                    skipped.append({"file": err.file, "where": err.where, "reason": err.reason})
                    continue
                h = text_hash(t)
                if h not in seen:
                    seen.add(h)
                    texts.append(t)
                    text_ids.append(h)

    digest = hashlib.sha256()
    for ds in datasets:
        digest.update(f"ds\0{ds.fingerprint}\n".encode())
    for _, image_id, sha in images:
        digest.update(f"img\0{image_id}\0{sha}\n".encode())
    for a, r in zip(alias_ids, alias_rows, strict=True):
        digest.update(f"alias\0{a}\0{r}\n".encode())
    for h in text_ids:
        digest.update(f"txt\0{h}\n".encode())
    counts = {
        "datasets": len(datasets),
        "instances": instances,
        "images_total": images_total,
        "unique_images": len(images),
        "image_duplicates_removed": images_total - len(images),
        "image_aliases": len(alias_ids),
        "texts_total": texts_total,
        "unique_texts": len(texts),
        "text_duplicates_removed": texts_total - len(texts) - len(skipped),
        "texts_skipped": len(skipped),
    }
    fingerprint = {
        "hash": digest.hexdigest(),
        "datasets": _dataset_fingerprints(datasets),
        "vqa_candidates": vqa_candidates,
    }
    return Plan(
        dataset_paths=[str(ds.path) for ds in datasets],
        images=images,
        alias_ids=alias_ids,
        alias_rows=alias_rows,
        texts=texts,
        text_ids=text_ids,
        vqa_vocab=vocab,
        vqa_vocab_from=vocab_from,
        vqa_answer_types=types,
        counts=counts,
        data_fingerprint=fingerprint,
        skipped_texts=skipped,
    )


@dataclass
class UnitJob:
    """Everything one unit needs, shipped to a dask worker (small: ids and texts, never pixels)."""

    name: str
    kind: str  # "image" | "text"
    row0: int
    row1: int
    store_url: str
    teacher: TeacherSpec
    dtype: str
    views: int
    relevance: tuple[str, ...]
    batch_size: int
    num_workers: int
    on_error: str
    threads: int = 0
    dataset_paths: tuple[str, ...] = ()
    items: tuple[tuple[int, str, str], ...] = ()  # image units: (dataset index, image id, sha1)
    texts: tuple[str, ...] = ()  # text units
    lengths: tuple[int, ...] = ()
    tok0: int = 0
    tok_rows: int = 0
    shard_rows: int = 0  # image units: rows per image shard (0: the whole unit)
    write_threads: int = -1  # cache.write_threads, resolved where the unit runs


def text_lengths(teacher: Any, texts: Sequence[str], batch: int = 4096) -> np.ndarray:
    out = [
        teacher.text_lengths(teacher.tokenizer(list(texts[i : i + batch])))
        for i in range(0, len(texts), batch)
    ]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def decode_workers(num_workers: int, device: str) -> int:
    """``cache.num_workers`` resolved: -1 picks in-process decoding for a CPU teacher (its torch threads already
    use every core) and up to 4 worker processes, leaving a core to the coordinator, for a GPU teacher."""
    if num_workers >= 0:
        return num_workers
    if not device.startswith("cuda"):
        return 0
    return max(1, min(4, usable_cores() - 1))


def make_jobs(plan, layout, lengths, offsets, url, spec, cp, relevance) -> list[UnitJob]:
    """Every unit of a new store (its one segment), rows straight from the plan."""
    segment = C.initial_segment(
        layout.n_images, layout.n_texts, int(offsets[-1]), layout.text_shard_rows, len(plan.alias_ids)
    )
    units = C.segment_units([segment], layout.image_rows_per_unit, layout.text_rows_per_unit)
    for _, kind, lo, _, t0, _ in units:
        assert kind == "image" or offsets[lo] == t0  # every text unit starts on its own shard boundary
    return unit_jobs(
        units, plan.images.__getitem__, lambda r: (plan.texts[r], int(lengths[r])), plan.dataset_paths,
        url, spec, cp, relevance, layout,
    )  # fmt: skip


def unit_jobs(
    units: Sequence[tuple[str, str, int, int, int, int]],
    image_at: Any,
    text_at: Any,
    dataset_paths: Sequence[str],
    url: str,
    spec: TeacherSpec,
    cp: Any,
    relevance: tuple[str, ...],
    layout: Any,
) -> list[UnitJob]:
    """The jobs of ``units`` (``C.segment_units`` rows): ``image_at(row)`` gives an image row's (dataset index,
    id, sha1), ``text_at(row)`` a text row's (text, token length)."""
    common = dict(
        store_url=url,
        teacher=spec,
        dtype=layout.dtype,
        views=layout.views,
        relevance=relevance,
        batch_size=int(cp.batch_size),
        num_workers=decode_workers(int(cp.num_workers), spec.resolved_device()),
        on_error=cp.on_error,
    )
    jobs = []
    for name, kind, lo, hi, t0, t1 in units:
        if kind == "image":
            own = dict(
                dataset_paths=tuple(dataset_paths),
                items=tuple(image_at(r) for r in range(lo, hi)),
                shard_rows=layout.image_shard_rows,
                write_threads=int(cp.write_threads),
            )
        else:
            rows = [text_at(r) for r in range(lo, hi)]
            own = dict(
                texts=tuple(t for t, _ in rows),
                lengths=tuple(int(n) for _, n in rows),
                tok0=t0,
                tok_rows=t1 - t0,
            )
        jobs.append(UnitJob(name=name, kind=kind, row0=lo, row1=hi, **own, **common))
    return jobs


@dataclass
class Growth:
    """What an extraction adds to an existing store: images (by content) and texts (by hash) it lacks."""

    images: list[tuple[int, str, str]]  # new rows, in plan order: (dataset index, image id, sha1)
    alias_ids: list[str]  # new ids of images the store (or this growth) holds under another id
    alias_targets: list[tuple[str, int]]  # ("store", row) or ("new", index into images)
    texts: list[str]
    text_ids: list[str]

    @property
    def empty(self) -> bool:
        return not (self.images or self.alias_ids or self.texts)

    def alias_rows(self, image_row0: int) -> list[int]:
        """The aliases' rows once the new images start at ``image_row0``."""
        return [r if where == "store" else image_row0 + r for where, r in self.alias_targets]

    def digest(self) -> str:
        h = hashlib.sha256()
        for _, image_id, sha in self.images:
            h.update(f"img\0{image_id}\0{sha}\n".encode())
        for a, (where, r) in zip(self.alias_ids, self.alias_targets, strict=True):
            h.update(f"alias\0{a}\0{where}\0{r}\n".encode())
        for t in self.text_ids:
            h.update(f"txt\0{t}\n".encode())
        return h.hexdigest()


def plan_growth(plan: Plan, index: Any, datasets: Sequence[PreparedDataset], store_url: str) -> Growth:
    """What ``plan`` needs that the store (``index``, a ``C.StoreIndex``) does not hold. An image is held when
    its id is (then its bytes must be the ones the store was given: a DataError names the dataset and id
    otherwise) or its bytes are under another id (the new id becomes an alias of that row). A text is held
    when its hash is. A store from before image/sha1 knows its images' bytes only through this run's
    datasets."""
    row_of = {i: r for r, i in enumerate(index.image_ids)}
    row_of.update(zip(index.alias_ids, index.alias_rows, strict=True))
    sha_of_id = {i: sha for _, i, sha in plan.images}
    sha_of_id.update((a, plan.images[r][2]) for a, r in zip(plan.alias_ids, plan.alias_rows, strict=True))
    known = index.image_sha1 if index.image_sha1 is not None else [""] * len(index.image_ids)
    row_sha = {r: s for r, s in enumerate(known) if s}
    if index.image_sha1 is None:  # bytes known only for the ids this run also has
        row_sha.update((r, sha_of_id[i]) for i, r in row_of.items() if i in sha_of_id)
    store_row_of_sha: dict[str, int] = {}
    for r, s in sorted(row_sha.items()):
        store_row_of_sha.setdefault(s, r)

    path_of = {i: datasets[di].path for di, i, _ in plan.images}
    images: list[tuple[int, str, str]] = []
    new_of_sha: dict[str, int] = {}
    alias_ids: list[str] = []
    targets: list[tuple[str, int]] = []
    by_row = dict(enumerate(plan.images))
    run_ids = [(i, sha) for _, i, sha in plan.images] + [
        (a, plan.images[r][2]) for a, r in zip(plan.alias_ids, plan.alias_rows, strict=True)
    ]
    item_of = {i: by_row[k] for k, (_, i, _) in by_row.items()}
    for image_id, sha in run_ids:
        if image_id in row_of:
            held = row_sha.get(row_of[image_id])
            if held and held != sha:
                where = path_of.get(image_id) or ", ".join(plan.dataset_paths)
                raise DataError(
                    where,
                    image_id,
                    f"image id already in the store {store_url} with different bytes "
                    "(a store grows by new images; to replace the data it was built from, rerun with "
                    "--rebuild-stale or --overwrite)",
                )
            store_row_of_sha.setdefault(sha, row_of[image_id])  # its bytes, under another id, are held too
            continue
        if sha in store_row_of_sha:
            alias_ids.append(image_id)
            targets.append(("store", store_row_of_sha[sha]))
        elif sha in new_of_sha:
            alias_ids.append(image_id)
            targets.append(("new", new_of_sha[sha]))
        else:
            new_of_sha[sha] = len(images)
            images.append(item_of[image_id])
    held_texts = set(index.text_ids)
    keep = [k for k, h in enumerate(plan.text_ids) if h not in held_texts]
    return Growth(
        images=images,
        alias_ids=alias_ids,
        alias_targets=targets,
        texts=[plan.texts[k] for k in keep],
        text_ids=[plan.text_ids[k] for k in keep],
    )
