"""The coordinator: plan, create or reopen the store, run the units, mark the store complete, and the run's
metrics."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import cache as C
from ..data.errors import DataError
from ..data.shards import PreparedDataset
from ..identity import teacher_identity
from .errors import maybe_fail
from .plan import make_jobs, plan_extraction, plan_growth, text_lengths, unit_jobs
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

    # A store this run may grow (same teacher, settings and format: other data is added, not stale) keeps
    # building VQA candidate texts from its own answer vocabulary and answer types, which its students were
    # checked against. One with a vocabulary but no types (``C.lacks_answer_types``: its candidates predate
    # same-type distractors) is stale and never grown.
    kind, attrs, _ = C.inspect_location(store_url)
    # The relevance sources are a set: a store holding the same ones listed in another order is not stale.
    held = ((attrs or {}).get("fingerprint") or {}).get("store", {}) if isinstance(attrs, dict) else {}
    held = held.get("relevance_tokens") if isinstance(held, dict) else None
    if isinstance(held, list) and sorted(map(str, held)) == sorted(relevance):
        relevance = tuple(held)
    growable = kind == "cache" and bool(attrs.get("layout")) and not overwrite
    store_vocab = list((attrs.get("data") or {}).get("vqa_vocab") or []) if growable else []
    if store_vocab and C.lacks_answer_types(attrs):
        growable = False
    store_types = (attrs.get("data") or {}).get(C.VQA_ANSWER_TYPES) if growable else None
    plan = plan_extraction(
        datasets, vqa_candidates, cp.on_error, vocab=store_vocab if growable else None, types=store_types
    )
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
    lengths, layout, offsets, fingerprint = _new_store(plan, teacher, spec, cp, relevance)
    # Stores from before image_shard_bytes hold one shard per unit: they resume as they are when this setting
    # also gives one shard per unit.
    legacy = (
        {"image_shard_bytes": int(cp.image_shard_bytes)}
        if layout.image_shard_rows == layout.image_rows_per_unit
        else {}
    )
    stored = attrs.get("fingerprint") if isinstance(attrs.get("fingerprint"), dict) else {}
    grow = growable and not C.stale_fields(_with_legacy(stored, legacy), fingerprint)
    if grow and rebuild_stale:
        # Data prepared again under ids the store holds with other bytes replaces what it was built from: that
        # is stale, not new data (dvc.yaml's run after a changed synthetic seed rebuilds, as it always did).
        try:
            plan_growth(plan, C.read_index(store_url, attrs), datasets, store_url)
        except DataError as e:
            log.warning("%s; rebuilding it (--rebuild-stale)", e)
            grow = False
    if not grow and growable and store_vocab:
        # A stale store is rebuilt from this run's data alone. Planned so before open_or_check, which compares
        # an interrupted rebuild beside the store with this plan: planned with the old store's vocabulary, a
        # rebuild of data whose answers changed never matched its own plan and restarted from nothing.
        plan = plan_extraction(datasets, vqa_candidates, cp.on_error)
        lengths, layout, offsets, fingerprint = _new_store(plan, teacher, spec, cp, relevance)
    checked = {**fingerprint, "data": stored.get("data", {})} if grow else fingerprint
    target = open_or_check(store_url, checked, overwrite, rebuild_stale, legacy)
    build_url = target.url
    if not target.fresh and grow:
        return _grow(
            target, store_url, datasets, plan, teacher, spec, cp, relevance, scheduler, progress,
            cluster_kwargs, torch_threads, t_start,
        )  # fmt: skip
    if target.fresh:
        attrs = C.root_attrs(
            layout,
            package_version=C.package_version(),
            teacher=teacher.describe(),
            grid=teacher.grid,
            context_length=teacher.context_length,
            logit_scale=teacher.logit_scale,
            data={
                **plan.data_fingerprint,
                "paths": plan.dataset_paths,
                "counts": plan.counts,
                "vqa_vocab_from": plan.vqa_vocab_from,
                "vqa_vocab": plan.vqa_vocab,
                C.VQA_ANSWER_TYPES: plan.vqa_answer_types,
            },
            fingerprint=fingerprint,
        )
        attrs[C.SEGMENTS] = [
            C.initial_segment(
                layout.n_images, layout.n_texts, int(offsets[-1]), layout.text_shard_rows, len(plan.alias_ids)
            )
        ]
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
            image_sha1=[sha for _, _, sha in plan.images],
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

    _refuse_skipped(build_url, committed, cp.on_error)
    seconds = time.time() - t_start
    n_tok = int(offsets[-1])
    metrics = _metrics(build_url, plan, layout, lengths, n_tok, committed, records, len(jobs), seconds)
    metrics["store"] = store_url
    # The run's metrics go to provenance/, out of the store's DVC hash: with seconds in zarr.json every
    # rebuild would look like a new store and retrain every student after it.
    if records:
        C.record_run(build_url, metrics)
    if not target.complete:
        C.open_group(build_url, mode="r+").attrs.update({"complete": True})
    if target.replace:
        log.info("%s: rebuilt store complete, swapping it into place", build_url)
        C.replace_store(build_url, store_url)
    return metrics


def _with_legacy(fp: dict, legacy: dict) -> dict:
    """A stored fingerprint with the store settings newer than the store filled in (``target.open_or_check``
    does the same)."""
    if isinstance(fp.get("store"), dict) and legacy:
        return {**fp, "store": {**legacy, **fp["store"]}}
    return fp


def _new_store(plan, teacher, spec, cp, relevance) -> tuple:
    """(text lengths, layout, text offsets, fingerprint) of a store built from ``plan`` alone."""
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
    fingerprint = {
        "format_version": C.FORMAT_VERSION,
        "teacher": teacher_identity(spec.model, spec.pretrained, teacher=teacher),
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
    return lengths, layout, offsets, fingerprint


def _grow(
    target, store_url, datasets, plan, teacher, spec, cp, relevance, scheduler, progress, cluster_kwargs,
    torch_threads, t_start,
) -> dict:  # fmt: skip
    """Resume or grow an existing store: compute its units not committed yet (an interrupted extraction or
    append), then append, as a new segment (``pipeline.cache.grow``), the images and texts of this run's
    datasets it does not hold. Committed rows, their checksums and the old index are never rewritten. The
    index is extended first and the segment recorded in the attrs after it (one atomic write, with the
    datasets it will cover under ``appending``); the fingerprint names the new datasets only once every unit
    is committed, so a student of them is refused until then and one of the old data reads on meanwhile."""
    url = target.url
    attrs = C.read_store_attrs(url) or {}
    index = C.read_index(url, attrs)
    growth = plan_growth(plan, index, datasets, store_url)
    segments = C.store_segments(attrs)
    if segments[0]["aliases"][1] < 0:  # a store from before segments: its aliases, as its arrays hold them
        segments[0]["aliases"] = [0, index.ext.aliases]
    covered = C.covered_datasets(attrs)
    label_paths = _label_paths(plan)
    run_cover = C.merge_datasets(
        (attrs.get(C.APPENDING) or {}).get("datasets", {}), plan.data_fingerprint["datasets"], label_paths
    )
    paths = list(dict.fromkeys([*(attrs.get("data") or {}).get("paths", []), *plan.dataset_paths]))
    if growth.empty and _overgrown(url, index.ext):
        # An append cut short before its segment was recorded, and this run appends nothing: the arrays go back
        # to the rows the attrs record (nothing was committed past them).
        seg, offsets = C.new_segment(index.ext, attrs["layout"], 0, 0, [])
        C.extend_store(url, index.ext, seg, [], [], [], [], [], [], offsets)
    if not growth.empty:
        lay = attrs["layout"]
        glengths = text_lengths(teacher, growth.texts)
        seg, goffsets = C.new_segment(index.ext, lay, len(growth.images), len(growth.alias_ids), glengths)
        log.info(
            "%s: appending %d images, %d aliases and %d texts it does not hold (rows from %d, texts from %d)",
            store_url, len(growth.images), len(growth.alias_ids), len(growth.texts), seg["images"][0],
            seg["texts"][0],
        )  # fmt: skip
        C.extend_store(
            url, index.ext, seg, [i for _, i, _ in growth.images], [sha for _, _, sha in growth.images],
            growth.alias_ids, growth.alias_rows(seg["images"][0]), growth.text_ids, glengths, goffsets,
        )  # fmt: skip
        maybe_fail("append-index")  # test hook: the index extended, the segment not yet recorded
        segments.append(seg)
        ext = C.extents(segments, int(lay["image_rows_per_unit"]), int(lay["text_rows_per_unit"]), -1)
        lay = {**lay, "n_images": ext.images, "n_texts": ext.texts}
        units_attr = {
            **(attrs.get("units") or {}),
            "total": ext.image_units + ext.text_units,
            "image": ext.image_units,
            "text": ext.text_units,
        }
        pending = {"datasets": run_cover, "paths": paths, "digest": growth.digest()}
        # Its alias rows' chunks are all written (extend_store) and so, when it had none or kept them, are all.
        kept = growth.alias_ids and (attrs.get(C.ALIAS_ROWS_KEPT) or index.ext.aliases == 0)
        attrs = {**attrs, "layout": lay, "units": units_attr, C.SEGMENTS: segments, C.APPENDING: pending}
        attrs |= {C.ALIAS_ROWS_KEPT: True} if kept else {}
        C.open_group(url, mode="r+").attrs.put(attrs)  # one atomic write: the segment is now the store's
        index = C.read_index(url, attrs)
        maybe_fail("append-recorded")  # test hook: the segment recorded, none of its units committed

    layout = C.StoreLayout(**attrs["layout"])
    every = C.segment_units(segments, layout.image_rows_per_unit, layout.text_rows_per_unit)
    units = [u for u in every if u[1] != "pad"]
    committed = C.committed_units(url)
    for name, _, lo, hi, _, _ in (u for u in every if u[1] == "pad" and u[0] not in committed):
        keys = C.unit_arrays("image", layout.dtype, layout.views, layout.relevance_tokens)
        keys = keys if name.startswith("pad-image") else ["text/pooled"]
        C.commit_unit(url, name, C.pad_record(url, name, lo, hi, keys))
    todo = [u for u in units if u[0] not in committed]
    item_of = {item[1]: item for item in plan.images}
    # A store row this run's plan holds under another id (the same bytes: an alias here, e.g. the same
    # datasets named in another order) is read from the image that has its bytes.
    item_of.update(
        {a: plan.images[r] for a, r in zip(plan.alias_ids, plan.alias_rows, strict=True) if a not in item_of}
    )
    text_of = dict(zip(plan.text_ids, plan.texts, strict=True))
    where = ", ".join((attrs.get(C.APPENDING) or {}).get("paths", []) or paths)

    def image_at(row: int) -> tuple:
        image_id = index.image_ids[row]
        if image_id not in item_of:
            raise DataError(
                store_url, f"image {image_id}", "an interrupted extraction still has to compute it and none of "
                f"this run's datasets holds it; rerun with the datasets it was started with ({where})",
            )  # fmt: skip
        return item_of[image_id]

    def text_at(row: int) -> tuple:
        h = index.text_ids[row]
        if h not in text_of:
            raise DataError(
                store_url, f"text {h}", "an interrupted extraction still has to compute it and none of this "
                f"run's datasets gives it; rerun with the datasets it was started with ({where})",
            )  # fmt: skip
        return text_of[h], int(index.text_lengths[row])

    jobs = unit_jobs(todo, image_at, text_at, plan.dataset_paths, url, spec, cp, relevance, layout)
    log.info(
        "units: %d total, %d already committed, %d to compute", len(units), len(units) - len(jobs), len(jobs)
    )
    records = run_units(jobs, scheduler, int(cp.n_workers), progress, cluster_kwargs or {}, torch_threads)
    committed = C.committed_units(url)
    missing = [u[0] for u in units if u[0] not in committed]
    if missing:  # cannot happen unless a unit lied; never mark such a store complete
        raise RuntimeError(f"{url}: units not committed after extraction: {missing[:5]}")

    seconds = time.time() - t_start
    lengths = np.asarray(index.text_lengths, dtype=np.int64)
    _refuse_skipped(url, committed, cp.on_error)
    metrics = _metrics(url, plan, layout, lengths, index.ext.tokens, committed, records, len(units), seconds)
    metrics.update(
        store=store_url,
        images_appended=len(growth.images),
        aliases_appended=len(growth.alias_ids),
        texts_appended=len(growth.texts),
    )
    now_covered = C.merge_datasets(covered, run_cover, label_paths)
    # A run that computed nothing on a complete store covering its data writes nothing: its seconds in
    # zarr.json would make DVC see a new store and retrain every student that depends on it.
    if records or not target.complete or now_covered != covered or C.APPENDING in attrs:
        fp = dict(attrs.get("fingerprint") or {})
        data_fp = dict(fp.get("data") or {})
        if now_covered != covered:
            chain = hashlib.sha256(f"{data_fp.get('hash', '')}\0{growth.digest()}\0".encode())
            for label, dfp in sorted(now_covered.items()):
                chain.update(f"ds\0{label}\0{dfp}\n".encode())
            data_fp["hash"] = chain.hexdigest()
        data_fp["datasets"] = now_covered
        fp["data"] = data_fp
        data = {**(attrs.get("data") or {}), **data_fp, "paths": paths}
        if (
            not data.get("vqa_vocab") and plan.vqa_vocab
        ):  # the first VQA data this store holds fixes its vocab and answer types
            data.update(vqa_vocab=plan.vqa_vocab, vqa_vocab_from=plan.vqa_vocab_from)
            data[C.VQA_ANSWER_TYPES] = plan.vqa_answer_types
        # "extract": where stores before provenance/ kept the run metrics in zarr.json.
        done = {k: v for k, v in attrs.items() if k not in (C.APPENDING, "extract")}
        done.update(complete=True, fingerprint=fp, data=data)
        if records:
            C.record_run(url, metrics)
        C.open_group(url, mode="r+").attrs.put(done)
    if target.replace:
        log.info("%s: rebuilt store complete, swapping it into place", url)
        C.replace_store(url, store_url)
    return metrics


def _overgrown(url: str, ext: Any) -> bool:
    """Whether an index array is longer than the recorded segments say (an append cut short)."""
    g = C.open_group(url, mode="r")
    want = {
        "image/ids": ext.images,
        "image/alias_ids": ext.aliases,
        "text/ids": ext.texts,
        "text/tokens": ext.tokens,
    }
    return any(g[k].shape[0] != n for k, n in want.items())


def _label_paths(plan) -> dict[str, str]:
    """{dataset label in the fingerprint: its folder}, for naming a dataset whose label a store already uses."""
    labels = list(plan.data_fingerprint["datasets"])
    return dict(zip(labels, plan.dataset_paths, strict=True))


def _as_spec(t: TeacherSpec | tuple | dict) -> TeacherSpec:
    if isinstance(t, TeacherSpec):
        return t
    if isinstance(t, dict):
        return TeacherSpec(**t)
    return TeacherSpec(*t)


def _refuse_skipped(url: str, committed: dict[str, dict], on_error: str) -> None:
    """With cache.on_error=fail, a store whose units skipped unreadable images (committed by an earlier run
    with on_error=skip, which a resume keeps) is refused: on_error is not in the store's fingerprint, so the
    rerun DVC makes for it would otherwise pass with those images' targets zero-filled."""
    skipped = sorted(i for r in committed.values() for i in r.get("invalid", []))
    if on_error == "fail" and skipped:
        raise DataError(
            url,
            f"image {skipped[0]}",
            f"{len(skipped)} image(s) were skipped as unreadable by an extraction with cache.on_error=skip, "
            "and cache.on_error is now fail: fix or drop them, then rebuild the store (--overwrite), or keep "
            "on_error=skip",
        )


def _metrics(url, plan, layout, lengths, n_tok, committed, records, n_units, seconds) -> dict:
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
        "text_token_slack_rows": int(n_tok - lengths.sum()),
        "text_token_rows_per_unit": layout.text_shard_rows,
    }


def default_metrics_path(store_url: str) -> Path | None:
    """``<store>.extract.json`` beside a local store: the metrics follow the store they describe, so
    extracting some other store never overwrites the pipeline's metrics/extract.json. None for a remote URL."""
    path = C.local_path(store_url)
    return Path(path + ".extract.json") if path is not None else None
