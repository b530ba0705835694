"""Checksum-on-read: a view of the store's group whose arrays check, the first time a read touches a
unit's rows, that those rows still hash to the crc32 the unit's manifest entry recorded."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import zarr

from .checksum import checksum
from .errors import CacheCorrupt
from .manifest import committed_units
from .schema import MANIFEST


def _unreadable_manifest_entry(url: str) -> str:
    """The manifest file that does not parse ("" when every one does)."""
    fs, path = fsspec.core.url_to_fs(url)
    for p in fs.ls(f"{path.rstrip('/')}/{MANIFEST}", detail=False):
        if p.endswith(".json"):
            try:
                json.loads(fs.cat_file(p))
            except ValueError:
                return p
    return ""


def manifest_regions(url: str) -> dict[str, list[tuple[int, int, str, str]]]:
    """{array path: [(lo, hi, unit, crc32)] sorted by lo}: the rows each committed unit owns in each array."""
    hint = f"run python -m stages.verify_cache {url}, then re-extract"
    try:
        units = committed_units(url)
    except (ValueError, OSError) as e:
        where = _unreadable_manifest_entry(url) or f"{url}/{MANIFEST}"
        raise CacheCorrupt(f"{where}: unreadable manifest entry ({type(e).__name__}: {e}); {hint}") from None
    regions: dict[str, list[tuple[int, int, str, str]]] = defaultdict(list)
    for name, rec in units.items():
        try:
            for key, info in rec.get("arrays", {}).items():
                lo, hi = (int(v) for v in info["region"])
                regions[key].append((lo, hi, name, str(info["crc32"])))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CacheCorrupt(
                f"{url}/{MANIFEST}/{name}.json: malformed manifest entry ({type(e).__name__}: {e}); {hint}"
            ) from None
    return {k: sorted(v) for k, v in regions.items()}


class VerifiedGroup:
    """The store's group whose arrays check, the first time a read touches a unit's rows, that those rows
    still hash to the crc32 of the unit's manifest entry: each unit of each array read is verified once per
    run, which costs one extra decode of what the run reads (``verify_cache`` decodes the whole store)."""

    def __init__(self, group: Any, url: str):
        self.group, self.url = group, url
        self.regions = manifest_regions(url)
        self.verified: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self._arrays: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self.group[name]
            # An array no entry records a crc32 for (a hand-made or pre-checksum store) is read as before;
            # once any entry covers an array, every row read must belong to a verified unit.
            if isinstance(a, zarr.Array) and name in self.regions:
                a = VerifiedArray(a, self, self.regions[name])
            self._arrays[name] = a
        return a

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)

    def check(self, array: Any, key: str, lo: int, hi: int, unit: str, crc: str) -> None:
        with self.lock:
            if (key, unit) in self.verified:
                return
            hint = f"run python -m stages.verify_cache {self.url}, then re-extract the store"
            try:
                got = checksum(array[lo:hi])
            except Exception as e:  # noqa: BLE001 - undecodable bytes are this unit's corruption
                raise CacheCorrupt(
                    f"teacher cache {self.url}: {key} rows [{lo}, {hi}) of unit {unit} are unreadable "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); {hint}"
                ) from None
            if got != crc:
                raise CacheCorrupt(
                    f"teacher cache {self.url}: {key} rows [{lo}, {hi}) of unit {unit} have crc32 {got}, "
                    f"but the manifest recorded {crc} (the bytes changed after extraction); {hint}"
                )
            self.verified.add((key, unit))


class VerifiedArray:
    """A zarr array whose row reads (slices, orthogonal row selections) verify the units they touch first."""

    def __init__(self, array: Any, group: VerifiedGroup, regions: list[tuple[int, int, str, str]]):
        self.array, self.group, self.regions = array, group, regions
        self.shape, self.dtype, self.path = array.shape, array.dtype, array.path
        self._starts = np.array([r[0] for r in regions], dtype=np.int64)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def _verify(self, idx: Sequence[int]) -> None:
        for i in idx:
            lo, hi, unit, crc = self.regions[i]
            self.group.check(self.array, self.path, lo, hi, unit, crc)

    def _uncovered(self, row: int) -> CacheCorrupt:
        return CacheCorrupt(
            f"teacher cache {self.group.url}: row {row} of {self.path} belongs to no committed unit in the "
            "manifest (an entry is missing or was rewritten); "
            f"run python -m stages.verify_cache {self.group.url}"
        )

    def _verify_rows(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        rows = np.unique(rows)
        idx = np.searchsorted(self._starts, rows, side="right") - 1
        his = np.array([r[1] for r in self.regions], dtype=np.int64)
        outside = (idx < 0) | (rows >= his[np.clip(idx, 0, None)] if len(his) else True)
        if np.any(outside):
            raise self._uncovered(int(rows[np.flatnonzero(outside)[0]]))
        self._verify(sorted({int(i) for i in idx}))

    def _verify_span(self, lo: int, hi: int) -> None:
        touched = [i for i, r in enumerate(self.regions) if r[0] < hi and r[1] > lo]
        covered = lo
        for i in touched:  # regions are sorted: walk them, any gap is a row no unit owns
            if self.regions[i][0] > covered:
                break
            covered = max(covered, self.regions[i][1])
        if covered < hi:
            raise self._uncovered(covered)
        self._verify(touched)

    def __getitem__(self, sel: Any) -> np.ndarray:
        if isinstance(sel, slice) and sel.step in (None, 1):
            self._verify_span(*sel.indices(self.shape[0])[:2])
        elif isinstance(sel, (int, np.integer)):
            self._verify_rows(np.array([int(sel) % self.shape[0]]))
        else:
            self._verify_span(0, self.shape[0])
        return self.array[sel]

    def get_orthogonal_selection(self, sel: Any) -> np.ndarray:
        if isinstance(sel, tuple) and len(sel) == 1 and not isinstance(sel[0], slice):
            self._verify_rows(np.asarray(sel[0], dtype=np.int64))
        else:
            self._verify_span(0, self.shape[0])
        return self.array.get_orthogonal_selection(sel)
