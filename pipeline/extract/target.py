"""Where a run builds its store: in place, or beside a store it replaces; and what a location may be."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import cache as C
from .errors import StoreLocationError

log = logging.getLogger("clip_td.extract")

REBUILD_SUFFIX = ".tmp-rebuild"


def rebuild_url(url: str) -> str:
    """Where a replacement for the store at ``url`` is built: beside it, so it can be renamed into place."""
    return url.rstrip("/") + REBUILD_SUFFIX


@dataclass
class _Target:
    url: str  # where the units write: the store itself, or its rebuild beside it
    fresh: bool  # the store must be created there first
    replace: bool = False  # swap it into the place of the store once complete
    complete: bool = False  # already marked complete (then a run that computes nothing writes nothing)


def _differing(attrs: dict, fingerprint: dict, legacy: dict | None) -> list[str]:
    fp = attrs.get("fingerprint", {})
    fp = fp if isinstance(fp, dict) else {}
    if isinstance(fp.get("store"), dict) and legacy:
        fp = {**fp, "store": {**legacy, **fp["store"]}}
    diff = set(C.check_fingerprint(fp, fingerprint)) | set(C.check_fingerprint(fingerprint, fp))
    if C.lacks_answer_types(attrs):
        # Extracted before VQA distractors shared the gold's type: its candidate texts are the old rule's, and
        # readers refuse it (``C.vqa_answer_space``), even where no fingerprint field differs.
        diff.add(f"data.{C.VQA_ANSWER_TYPES}")
    return sorted(diff)


def open_or_check(
    url: str, fingerprint: dict, overwrite: bool, rebuild_stale: bool = False, legacy: dict | None = None
) -> _Target:
    """Where to build and whether to create the store there; raises StaleCacheError for a store built from
    something else, CacheFormatError for a location holding anything but a teacher cache. ``legacy``: values
    of store settings newer than the store, equivalent to what it was built with."""
    kind, attrs, why = C.inspect_location(url)
    if kind == "foreign":
        raise C.CacheFormatError(C.foreign_message(url, why))
    if kind in ("absent", "empty"):
        return _unswapped_rebuild(url, fingerprint, legacy) or _Target(url, fresh=True)
    if not attrs.get("layout"):  # our store, but its creation was interrupted: nothing was committed yet
        C.remove_store(url)
        return _Target(url, fresh=True)
    diff = _differing(attrs, fingerprint, legacy)
    if not diff and not overwrite:
        C.check_metadata(url)
        return _Target(url, fresh=False, complete=bool(attrs.get("complete")))
    if diff and not (overwrite or rebuild_stale):
        raise C.StaleCacheError(url, diff)
    if diff:
        log.warning("%s is stale (differs in %s): rebuilding it", url, ", ".join(diff))
    return _rebuild_target(url, fingerprint, legacy, resume=not overwrite)


def _unswapped_rebuild(url: str, fingerprint: dict, legacy: dict | None) -> _Target | None:
    """A matching rebuild beside a missing store: a swap cut short between its two renames (where the kernel
    has no atomic exchange), or a store deleted by hand. Resumed and moved into place, not recomputed."""
    if not C.is_local(url):
        return None
    tmp = rebuild_url(url)
    kind, attrs, _ = C.inspect_location(tmp)
    if kind != "cache" or not attrs.get("layout") or _differing(attrs, fingerprint, legacy):
        return None  # anything else there is left alone
    C.check_metadata(tmp)
    log.warning("%s is missing; resuming the rebuild at %s and moving it into place", url, tmp)
    return _Target(tmp, fresh=False, replace=True, complete=bool(attrs.get("complete")))


def _rebuild_target(url: str, fingerprint: dict, legacy: dict | None, resume: bool) -> _Target:
    """A replacement for the (recognised) store at ``url``: built beside it and swapped in when complete.
    ``resume``: continue a matching rebuild that an earlier run left (``overwrite`` starts it over)."""
    if not C.is_local(url):
        # An object store has no directory rename (a "rename" copies every object), so the store is
        # replaced in place there: deleted now, rebuilt, resumable if the run is interrupted.
        C.remove_store(url)
        return _Target(url, fresh=True)
    tmp = rebuild_url(url)
    kind, attrs, why = C.inspect_location(tmp)
    if kind == "foreign":
        raise C.CacheFormatError(C.foreign_message(tmp, why))
    if kind == "cache":
        if resume and attrs.get("layout") and not _differing(attrs, fingerprint, legacy):
            C.check_metadata(tmp)
            log.info("%s: resuming the rebuild an earlier run left at %s", url, tmp)
            return _Target(tmp, fresh=False, replace=True, complete=bool(attrs.get("complete")))
        C.remove_store(tmp, keep_lock=False)
    log.info("%s: building its replacement at %s (swapped in when complete)", url, tmp)
    return _Target(tmp, fresh=True, replace=True)


def check_store_outside(store_url: str, folders: Sequence[str | Path]) -> None:
    """Refuse a local store location equal to, inside or containing any of ``folders`` (the datasets it is
    extracted from): the store would write into a dataset, or a rebuild would replace it."""
    path = C.local_path(store_url)
    if path is None:
        return
    store = Path(path).resolve()
    for f in folders:
        folder = Path(f).resolve()
        if store == folder:
            rel = "is"
        elif folder in store.parents:
            rel = "is inside"
        elif store in folder.parents:
            rel = "contains"
        else:
            continue
        raise StoreLocationError(
            f"teacher cache {store_url} {rel} the dataset folder {f}: put the store outside the datasets it is "
            "extracted from (nothing was written)"
        )
