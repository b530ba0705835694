"""Where a student run's teacher targets come from, and what the cache decides about the run's data order.

The cache is checked against the run before anything is read from it (the data it was extracted from, the
teacher's identity, the VQA answer vocabulary and answer types); ``train.order: chunked`` groups instances by the cache's chunks,
and cached views are replayed so every method of a seed sees the same augmentation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from pipeline.cache import (
    RESIZE_MODES,
    CacheFormatError,
    StaleCacheError,
    TeacherCache,
    check_fingerprint,
    read_store_attrs,
    store_exists,
    uncovered,
    vqa_answer_space,
)
from pipeline.config import Params
from pipeline.data.schema import Instance
from pipeline.data.shards import PreparedDataset
from pipeline.identity import teacher_identity
from pipeline.teacher import TeacherError, configured_resize_mode
from pipeline.texts import answer_types
from student.data import ViewTable
from student.errors import FingerprintMismatch, RunSetupError
from student.targets import CachedTargets, OnlineTargets, TargetSource

log = logging.getLogger(__name__)


def open_targets(
    params: Params,
    run,
    train_ds: PreparedDataset,
    datasets: list[PreparedDataset],
    device: torch.device,
    *,
    online: bool,
    relevance: str | None = None,
    train_instances: Iterable[Instance] | None = None,
) -> TargetSource:
    """The run's teacher targets: the teacher itself (``online``), or the cache after checking it covers this
    run's training data (whatever else it holds), was extracted with this run's teacher (differing fields
    named), holds this VQA answer vocabulary and answer types (those ``train_instances``, default the training
    split's, give) and the tokens of ``relevance`` (the source the run's token selection ranks by; None when
    it selects none)."""
    tp = params.teacher
    if online:
        from pipeline.teacher import create_teacher

        teacher = create_teacher(tp.model, tp.pretrained, device=device, precision=tp.precision)
        return OnlineTargets(teacher, datasets)
    cache = TeacherCache(run.cache)
    if relevance not in (None, "last") and relevance not in cache.relevance_tokens:
        # Checked here, not at the first batch's read on the prefetch thread, where it surfaced as a traceback.
        raise RunSetupError(
            f"{run.cache}: distill.relevance_source={relevance!r} is not cached (it holds: last"
            f"{''.join(', ' + r for r in cache.relevance_tokens)}); extract with cache.relevance_tokens "
            f"including {relevance!r}, or use another relevance source"
        )
    # A store may cover more datasets than this run's (it grows by appends): it must cover this run's.
    why = uncovered(run.cache, cache.attrs, train_ds.path, train_ds.fingerprint, "this run's training data ")
    if why:
        raise FingerprintMismatch(why)
    # The checkpoint the params name must be the one the cache was extracted with, and the model config
    # (it fixes the teacher's preprocessing and architecture) the same.
    teacher = teacher_identity(tp.model, tp.pretrained)
    differ = check_fingerprint(cache.attrs, {"teacher": teacher}) if teacher else []
    if differ:
        raise FingerprintMismatch(
            f"{run.cache}: the teacher cache does not match this run's teacher ({tp.pretrained or tp.model}): "
            f"differing fields {', '.join(differ)}; re-run python -m stages.extract_teacher"
        )
    data = cache.attrs.get("data", {})
    cached_vocab = data.get("vqa_vocab")
    vocab = train_ds.answer_vocab() if run.task == "vqa" and cached_vocab is not None else None
    if vocab is not None and cached_vocab != vocab:
        # A store keeps the vocabulary it was first built from (its candidate answer texts come from it), also
        # when the VQA data is prepared again and added: only a rebuild takes the new one.
        new, gone = sorted(set(vocab) - set(cached_vocab)), sorted(set(cached_vocab) - set(vocab))
        raise FingerprintMismatch(
            f"{run.cache}: VQA answer vocabulary differs from {train_ds.path}'s (answers only here: "
            f"{new[:5]}{' …' if len(new) > 5 else ''}; only in the store's, from {data.get('vqa_vocab_from', '?')}: "
            f"{gone[:5]}{' …' if len(gone) > 5 else ''}); the store keeps the vocabulary it was built from, so "
            + _rebuild(run)
        )
    if vocab is not None:
        try:
            _, cached_types = vqa_answer_space(run.cache, cache.attrs)
        except StaleCacheError as e:  # from before the types: its candidates are the old rule's
            raise FingerprintMismatch(str(e)) from None
        types = answer_types(train_instances if train_instances is not None else train_ds.iter_instances())
        if cached_types != types:
            # Kept, as the vocabulary, from the VQA data the store was first built from.
            differ = sorted(a for a in set(types) | set(cached_types) if types.get(a) != cached_types.get(a))
            shown = ", ".join(f"{a!r}: {cached_types.get(a)} → {types.get(a)}" for a in differ[:5])
            raise FingerprintMismatch(
                f"{run.cache}: VQA answer types (data.vqa_answer_types) differ from those {train_ds.path}'s "
                f"instances give ({len(differ)} answer(s), store → data: {shown}{' …' if len(differ) > 5 else ''}"
                "); the store keeps the answer types it was built from, so " + _rebuild(run)
            )
    # On CUDA the float16 tokens travel as stored and prepare_teacher converts them on the device.
    half = torch.float16 if device.type == "cuda" else torch.float32
    return CachedTargets(cache, chunk_cache_bytes=params.train.target_cache_mb << 20, token_dtype=half)


def _rebuild(run) -> str:
    """How to rebuild a store whose VQA answer space (vocabulary, answer types) is not this run's."""
    return (
        f"rebuild it: python -m stages.extract_teacher --shards ... --out {run.cache} --overwrite, with this "
        "run's --params/--set (or extract into another --out)"
    )


def run_answer_types(run, source: TargetSource | None, train_instances: Iterable[Instance]) -> dict[str, str]:
    """The VQA answer types this run's candidate texts are built from (docs/method.md §5): the store's when the
    run reads one (``open_targets`` checked them against the training split's), else those the training
    instances give (an online teacher encodes the same texts; a run without a teacher never reads them)."""
    if run.task != "vqa":
        return {}
    if isinstance(source, CachedTargets):
        return vqa_answer_space(run.cache, source.cache.attrs)[1]
    return answer_types(train_instances)


def chunk_groups(
    params: Params, run, source: TargetSource | None, train_instances: list
) -> dict[str, int] | None:
    """train.order=chunked: each training image's inner chunk in the array its targets are read from (the
    cached views' when the store has views). Read from the store for every method, the baseline too, so
    that all methods of a seed see the same batches."""
    if params.train.order == "random":
        return None
    if isinstance(source, CachedTargets):
        cache = source.cache
    elif run.cache and store_exists(run.cache):
        cache = TeacherCache(run.cache)
    else:
        raise RunSetupError(
            f"train.order=chunked orders instances by the teacher cache's chunks, and this run has no cache "
            f"at {run.cache!r}: extract one, or use train.order=random"
        )
    name = "views/tokens" if cache.views else "image/tokens"
    rows_per_chunk = int(cache.group[name].chunks[0])
    ids = sorted({i.image_id for i in train_instances})
    return dict(zip(ids, (cache.image_rows(ids) // rows_per_chunk).tolist(), strict=True))


def teacher_resize_mode(params: Params, run, source: TargetSource | None) -> str:
    """Which region of a non-square image the teacher's eval transform shows (``pipeline.cache.eval_view_box``),
    so the student is shown the same, and every method of a seed the same pixels: the run's store's record
    when the store exists (what the teacher saw; baseline and blind read it too), else the teacher's configs
    (``configured_resize_mode``, no weights loaded). An online teacher must agree with it."""
    tp = params.teacher
    try:
        attrs = (
            source.cache.attrs
            if isinstance(source, CachedTargets)
            else read_store_attrs(run.cache)
            if run.cache
            else None
        )
    except (CacheFormatError, ImportError, OSError, ValueError) as e:  # a damaged zarr.json, s3fs missing, …
        raise RunSetupError(
            f"{run.cache}: cannot read the teacher cache's record of the teacher ({e})"
        ) from None
    teacher = (attrs or {}).get("teacher")
    preprocess = teacher.get("preprocess") if isinstance(teacher, dict) else None
    mode = preprocess.get("resize_mode") if isinstance(preprocess, dict) else None
    where = f"{run.cache}: teacher.preprocess.resize_mode"
    if mode is None:
        try:
            mode = configured_resize_mode(tp.model, tp.pretrained)
        except TeacherError as e:
            if source is not None:
                raise RunSetupError(str(e)) from None
            # A run that reads no teacher (baseline, blind) does not need its files to train.
            log.warning("%s; the image region is open_clip's default, the centre square", e)
            mode = "shortest"
        where = f"teacher.model={tp.model!r} with teacher.pretrained={tp.pretrained!r}: its resize_mode"
    if isinstance(source, OnlineTargets):
        if mode is not None and source.teacher.resize_mode != mode:
            raise RunSetupError(
                f"{where} is {mode!r} but the online teacher's is {source.teacher.resize_mode!r}: the methods "
                "that read no targets would be shown another region of each image; point --cache at this "
                "teacher's store or at none"
            )
        mode = source.teacher.resize_mode
    elif mode is None:
        log.warning(
            "teacher.model=%r: its image resize_mode is known only from its hub config; showing the centre "
            "square, as open_clip's default does (extract a store first to have every method read it)",
            tp.model,
        )
    mode = mode or "shortest"
    if mode not in RESIZE_MODES:
        raise RunSetupError(f"{where}={mode!r} is none open_clip knows ({', '.join(RESIZE_MODES)})")
    return mode


def view_table(
    params: Params, run, source: TargetSource | None, train_ds: PreparedDataset, resize_mode: str = "shortest"
) -> ViewTable | None:
    """The cached views training images are shown in (docs/method.md §2), None when there are none. A run
    reading the store uses the store's views; a run without one (online teacher, baseline) makes the views
    a store extracted with cache.views would hold, so every method sees the same augmentation."""
    if isinstance(source, CachedTargets):
        cache = source.cache
        if cache.views != params.cache.views:
            # The methods that do not read the store (baseline, blind) make their views from cache.views, so
            # replaying the store's would show this run other pixels than its baseline's: a confounded Δ.
            raise RunSetupError(
                f"{run.cache} holds {cache.views} view(s) per image but cache.views={params.cache.views}: "
                f"set cache.views={cache.views} (--set cache.views={cache.views}) so that every method of a "
                "seed sees the same augmentation, or extract a store with this run's cache.views"
            )
        return ViewTable.from_cache(cache, train_ds.image_ids()) if cache.views else None
    k = params.cache.views
    return ViewTable.from_rule(train_ds, k, resize_mode) if k > 0 else None
