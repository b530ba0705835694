"""The coordinator: plan, create or reopen the store, run the units, mark the store complete, and the run's
metrics."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import cache as C
from ..data.errors import DataError
from ..data.shards import PreparedDataset
from ..identity import teacher_identity
from .plan import make_jobs, plan_extraction, text_lengths
from .schedule import run_units
from .target import check_store_outside, open_or_check
from .teachers import TeacherSpec, get_teacher

log = logging.getLogger("clip_td.extract")


def extract(
    datasets: Sequence[PreparedDataset],
    store_url: str,
    teacher_spec: TeacherSpec | tuple | dict,
    cache_params: Any,
    scheduler: str = "local",
    progress: bool = True,
    *,
    overwrite: bool = False,
    rebuild_stale: bool = False,
    vqa_candidates: int = 4,
    cluster_kwargs: dict | None = None,
    torch_threads: int = 0,
) -> dict:
    """Extract the teacher cache for ``datasets`` into ``store_url``; returns the metrics dict.

    ``teacher_spec``: a TeacherSpec, a (model, pretrained, precision) tuple or a dict of those keys.
    ``cache_params``: a pipeline.config.CacheParams. ``scheduler``: "local" (a LocalCluster of
    ``cache_params.n_workers`` processes), "sync" (in this process, one unit after the other) or the address
    of a running dask scheduler (its workers must see the datasets and the store at the same paths/URLs).
    ``cluster_kwargs`` go to LocalCluster; ``torch_threads`` per local worker (0: cores // n_workers).
    An existing store built from another teacher, data or layout raises StaleCacheError naming the fields,
    unless ``overwrite`` (always rebuild it) or ``rebuild_stale`` (rebuild it only when stale, so a pipeline
    runner can both resume an interrupted store and replace one built from an older teacher). A replaced
    local store is rebuilt beside it and swapped in when complete (see the module docstring). A location
    holding anything but a teacher cache raises CacheFormatError and is never written; one that overlaps a
    dataset raises StoreLocationError.

    The store's lock (``pipeline.lock``) is held throughout: a second extraction of the same store is refused
    with ``StoreLocked`` naming the holder, a location that cannot be written fails with ``StoreNotWritable``
    naming the path before any work, and a lock left by a killed run is taken over with a warning.
    """
    from ..lock import StoreLock

    check_store_outside(store_url, [ds.path for ds in datasets])
    # Checked again under the lock (another process may act in between); checked here first so that a
    # foreign folder does not even get a lock file written into it.
    kind, _, why = C.inspect_location(store_url)
    if kind == "foreign":
        raise C.CacheFormatError(C.foreign_message(store_url, why))
    with StoreLock(store_url, purpose=f"extract-teacher (scheduler {scheduler})"):
        return _extract_locked(
            datasets, store_url, teacher_spec, cache_params, scheduler, progress, overwrite=overwrite,
            rebuild_stale=rebuild_stale, vqa_candidates=vqa_candidates, cluster_kwargs=cluster_kwargs,
            torch_threads=torch_threads,
        )  # fmt: skip


def _extract_locked(
    datasets: Sequence[PreparedDataset],
    store_url: str,
    teacher_spec: TeacherSpec | tuple | dict,
    cache_params: Any,
    scheduler: str,
    progress: bool,
    *,
    overwrite: bool,
    rebuild_stale: bool,
    vqa_candidates: int,
    cluster_kwargs: dict | None,
    torch_threads: int,
) -> dict:
    t_start = time.time()
    spec = _as_spec(teacher_spec)
    cp = cache_params
    relevance = tuple(getattr(cp, "relevance_tokens", None) or ())
    bad = [r for r in relevance if r not in C.RELEVANCE_SOURCES]
    if bad:
        raise ValueError(f"cache.relevance_tokens: unknown source(s) {bad}; allowed {C.RELEVANCE_SOURCES}")

    plan = plan_extraction(datasets, vqa_candidates, cp.on_error)
    c = plan.counts
    if not plan.images or not plan.texts:  # a store without rows is never what a caller wants: say why
        raise DataError(
            ", ".join(plan.dataset_paths) or "(no datasets)",
            "dataset",
            f"nothing to extract: {c['unique_images']} images, {c['unique_texts']} texts "
            f"({c['instances']} instances, {c['texts_skipped']} empty texts skipped)",
        )
    log.info(
        "plan: %d instances; images %d -> %d unique (%d duplicates removed, %d aliases); texts %d -> %d unique "
        "(%d duplicates removed, %d empty skipped)",
        c["instances"], c["images_total"], c["unique_images"], c["image_duplicates_removed"], c["image_aliases"],
        c["texts_total"], c["unique_texts"], c["text_duplicates_removed"], c["texts_skipped"],
    )  # fmt: skip

    teacher = get_teacher(spec)
    describe = teacher.describe()
    lengths = text_lengths(teacher, plan.texts)
    layout = C.StoreLayout(
        n_images=len(plan.images),
        n_texts=len(plan.texts),
        embed_dim=teacher.embed_dim,
        num_patches=teacher.num_patches,
        views=int(cp.views),
        relevance_tokens=list(relevance),
        dtype=cp.dtype,
        compressor=cp.compressor,
        clevel=int(cp.clevel),
        image_rows_per_unit=int(cp.image_rows_per_unit),
        text_rows_per_unit=int(cp.text_rows_per_unit),
        target_chunk_bytes=int(cp.target_chunk_bytes),
        text_chunk_bytes=int(cp.text_chunk_bytes),
    )
    # Image shards: the largest image array's rows (tokens, with their views) reaching image_shard_bytes.
    image_row_bytes = max(1, layout.views) * layout.num_patches * layout.embed_dim * layout.token_itemsize
    layout.image_rows_per_shard = C.chunk_rows_for(
        layout.image_rows_per_unit, image_row_bytes, int(cp.image_shard_bytes)
    )
    row_bytes = teacher.embed_dim * layout.token_itemsize
    offsets, layout.text_shard_rows, layout.text_chunk_rows = C.text_token_layout(
        lengths, layout.text_rows_per_unit, row_bytes, layout.text_chunk_bytes
    )

    tfp = teacher_identity(spec.model, spec.pretrained, teacher=teacher)
    fingerprint = {
        "format_version": C.FORMAT_VERSION,
        "teacher": tfp,
        "data": plan.data_fingerprint,
        "store": {
            "dtype": layout.dtype,
            "compressor": layout.compressor,
            "clevel": layout.clevel,
            "views": layout.views,
            "relevance_tokens": list(relevance),
            "image_rows_per_unit": layout.image_rows_per_unit,
            "image_shard_bytes": int(cp.image_shard_bytes),
            "text_rows_per_unit": layout.text_rows_per_unit,
            "target_chunk_bytes": layout.target_chunk_bytes,
            "text_chunk_bytes": layout.text_chunk_bytes,
        },
    }

    # Stores from before image_shard_bytes hold one shard per unit: they resume as they are when this setting
    # also gives one shard per unit.
    legacy = (
        {"image_shard_bytes": int(cp.image_shard_bytes)}
        if layout.image_shard_rows == layout.image_rows_per_unit
        else {}
    )
    target = open_or_check(store_url, fingerprint, overwrite, rebuild_stale, legacy)
    build_url = target.url
    if target.fresh:
        attrs = C.root_attrs(
            layout,
            package_version=C.package_version(),
            teacher=describe,
            grid=teacher.grid,
            context_length=teacher.context_length,
            logit_scale=teacher.logit_scale,
            data={
                **plan.data_fingerprint,
                "paths": plan.dataset_paths,
                "counts": plan.counts,
                "vqa_vocab_from": plan.vqa_vocab_from,
                "vqa_vocab": plan.vqa_vocab,
            },
            fingerprint=fingerprint,
        )
        C.create_store(
            build_url,
            layout,
            attrs,
            [i for _, i, _ in plan.images],
            plan.text_ids,
            lengths,
            offsets,
            plan.alias_ids,
            plan.alias_rows,
        )

    jobs = make_jobs(plan, layout, lengths, offsets, build_url, spec, cp, relevance)
    committed = C.committed_units(build_url)
    todo = [j for j in jobs if j.name not in committed]
    log.info(
        "units: %d total, %d already committed, %d to compute", len(jobs), len(jobs) - len(todo), len(todo)
    )
    records = run_units(todo, scheduler, int(cp.n_workers), progress, cluster_kwargs or {}, torch_threads)
    committed = C.committed_units(build_url)
    missing = [j.name for j in jobs if j.name not in committed]
    if missing:  # cannot happen unless a unit lied; never mark such a store complete
        raise RuntimeError(f"{build_url}: units not committed after extraction: {missing[:5]}")

    seconds = time.time() - t_start
    metrics = _metrics(build_url, plan, layout, lengths, committed, records, len(jobs), seconds)
    metrics["store"] = store_url
    # A run that computed nothing on a complete store writes nothing: its seconds in zarr.json would make
    # DVC see a new store and retrain every student that depends on it.
    if records or not target.complete:
        g = C.open_group(build_url, mode="r+")
        g.attrs.update({"complete": True, "extract": metrics})
    if target.replace:
        log.info("%s: rebuilt store complete, swapping it into place", build_url)
        C.replace_store(build_url, store_url)
    return metrics


def _as_spec(t: TeacherSpec | tuple | dict) -> TeacherSpec:
    if isinstance(t, TeacherSpec):
        return t
    if isinstance(t, dict):
        return TeacherSpec(**t)
    return TeacherSpec(*t)


def _metrics(url, plan, layout, lengths, committed, records, n_units, seconds) -> dict:
    g = C.open_group(url, mode="r")
    uncompressed = 0
    for group in ("image", "views", "text"):
        if group not in g:
            continue
        for name, a in g[group].arrays():
            if a.dtype.kind in "OUT":  # ids are strings: not teacher output
                continue
            n = a.nbytes
            if group == "text" and name.startswith("tokens"):  # count real rows, not unit slack
                n = int(lengths.sum()) * (a.nbytes // max(1, a.shape[0]))
            uncompressed += n
    disk = C.bytes_on_disk(url)
    cos = [c for r in committed.values() if (c := r.get("reconstruction_cosine") or {}).get("n")]
    total_n = sum(c["n"] for c in cos)
    items = sum(r["items"] for r in records)
    invalid = sorted(i for r in committed.values() for i in r.get("invalid", []))
    return {
        **plan.counts,
        "store": url,
        "dtype": layout.dtype,
        "compressor": layout.compressor,
        "views": layout.views,
        "relevance_tokens": layout.relevance_tokens,
        "units_total": n_units,
        "units_computed": len(records),
        "units_skipped": n_units - len(records),
        "computed_units": sorted(r["unit"] for r in records),
        "items_computed": items,
        "seconds": round(seconds, 3),
        "unit_seconds": round(sum(r["seconds"] for r in records), 3),
        "items_per_s": round(items / seconds, 2) if seconds > 0 else 0.0,
        "bytes_on_disk": disk,
        "uncompressed_bytes": uncompressed,
        "compression_ratio": round(uncompressed / disk, 3) if disk else 0.0,
        "reconstruction_cosine": {
            "mean": sum(c["mean"] * c["n"] for c in cos) / total_n if total_n else 1.0,
            "min": min((c["min"] for c in cos), default=1.0),
            "tokens": total_n,
        },
        "images_invalid": len(invalid),
        "images_nonfinite": sum(len(r.get("nonfinite", [])) for r in committed.values()),
        "invalid_images": invalid[:100],
        "skipped_texts": plan.skipped_texts[:100],
        "text_token_rows": int(lengths.sum()),
        "text_token_slack_rows": int(layout.n_text_units * layout.text_shard_rows - lengths.sum()),
        "text_token_rows_per_unit": layout.text_shard_rows,
    }


def default_metrics_path(store_url: str) -> Path | None:
    """``<store>.extract.json`` beside a local store: the metrics follow the store they describe, so
    extracting some other store never overwrites the pipeline's metrics/extract.json. None for a remote URL."""
    path = C.local_path(store_url)
    return Path(path + ".extract.json") if path is not None else None


def write_metrics(path: str | Path, metrics: dict) -> None:
    """Written beside and renamed into place: a reader never sees half a file, and a symlink at ``path`` is
    replaced, not followed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, path)
