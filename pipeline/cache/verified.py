"""Checksum-on-read: a view of the store's group whose arrays check, the first time a read touches a block
of a unit's rows, that those rows still hash to the crc32 the unit's manifest entry recorded.

A manifest entry keeps one crc32 per array over the unit's rows (what ``verify_cache`` checks) and, from
stores written since, one per inner chunk's rows (``block_rows``, ``block_crc32``). Reads check the blocks
they touch, on the bytes they decoded anyway when a read is block-aligned (the chunk LRU's reads are), so a
run that reads part of an epoch decodes what it reads, not whole units. Blocks are trusted only when they
chain to the array's crc32; otherwise (old stores, an entry rewritten without them) the whole unit is checked."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from typing import Any, NamedTuple

import fsspec
import numpy as np
import zarr

from .checksum import checksum, crc32_combine
from .direct import DirectArray
from .errors import CacheCorrupt, CacheFormatError
from .grow import segment_units, store_segments
from .manifest import committed_units
from .schema import MANIFEST, unit_arrays


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


class Region(NamedTuple):
    """The rows [lo, hi) one committed unit owns in one array, their crc32 and, if recorded, the crc32 of
    each ``block_rows``-row block from ``lo`` (the last one may be shorter)."""

    lo: int
    hi: int
    unit: str
    crc: str
    block_rows: int = 0
    blocks: tuple[str, ...] = ()


def manifest_blocks(info: dict, lo: int, hi: int) -> tuple[int, tuple[str, ...]]:
    """(block_rows, block crcs) of a manifest region, or (0, ()) when absent or not one crc per block (such an
    entry is checked unit by unit, as an old store's)."""
    rows, crcs = info.get("block_rows"), info.get("block_crc32")
    if not isinstance(rows, int) or rows <= 0 or not isinstance(crcs, list):
        return 0, ()
    if len(crcs) != -(-(hi - lo) // rows) or not all(isinstance(c, str) for c in crcs):
        return 0, ()
    return rows, tuple(crcs)


def _manifest_hint(url: str) -> str:
    return f"run python -m stages.verify_cache {url}, then re-extract"


def read_committed(url: str) -> dict[str, dict]:
    """The store's committed manifest entries by unit name; an unreadable one is ``CacheCorrupt`` naming it."""
    try:
        return committed_units(url)
    except (ValueError, OSError) as e:
        where = _unreadable_manifest_entry(url) or f"{url}/{MANIFEST}"
        raise CacheCorrupt(
            f"{where}: unreadable manifest entry ({type(e).__name__}: {e}); {_manifest_hint(url)}"
        ) from None


def manifest_regions(url: str, units: dict[str, dict] | None = None) -> dict[str, list[Region]]:
    """{array path: [Region] sorted by lo}: the rows each committed unit owns in each array (``units``: the
    entries already read, else read here)."""
    units = read_committed(url) if units is None else units
    regions: dict[str, list[Region]] = defaultdict(list)
    for name, rec in units.items():
        try:
            for key, info in rec.get("arrays", {}).items():
                lo, hi = (int(v) for v in info["region"])
                regions[key].append(Region(lo, hi, name, str(info["crc32"]), *manifest_blocks(info, lo, hi)))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CacheCorrupt(
                f"{url}/{MANIFEST}/{name}.json: malformed manifest entry ({type(e).__name__}: {e}); "
                f"{_manifest_hint(url)}"
            ) from None
    return {k: sorted(v) for k, v in regions.items()}


def uncommitted_units(attrs: dict, units: dict[str, dict]) -> list[str]:
    """The units a complete store's segments plan that have no manifest entry, in plan order. Only for a store
    extraction wrote (its attrs keep a ``layout`` and count its image and text units): a store made by hand
    for a test, which commits what it likes, plans nothing."""
    lay, units_attr = attrs.get("layout"), attrs.get("units")
    if not (isinstance(lay, dict) and isinstance(units_attr, dict) and attrs.get("complete")):
        return []
    if "image" not in units_attr or "text" not in units_attr:
        return []
    r, rt = int(lay.get("image_rows_per_unit") or 1), int(lay.get("text_rows_per_unit") or 1)
    return [u[0] for u in segment_units(store_segments(attrs), r, rt) if u[0] not in units]


def _covered_arrays(attrs: dict) -> set[str]:
    """The arrays a complete store's manifest entries must cover: those its image and text units write."""
    units = attrs.get("units") if isinstance(attrs.get("units"), dict) else {}
    out: set[str] = set()
    for kind in ("image", "text"):
        if units.get(kind):
            out |= set(
                unit_arrays(
                    kind,
                    attrs.get("dtype", "float16"),
                    int(attrs.get("views", 0)),
                    attrs.get("relevance_tokens", ()),
                )
            )
    return out


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"


class VerifiedGroup:
    """The store's group whose arrays check, the first time a read touches a block of a unit's rows (the
    whole unit for stores without block crcs), that those rows still hash to the manifest's crc32: each
    block is verified once per run. Checks run outside the lock, so reader threads decode in parallel (two
    threads may check the same block once each; harmless)."""

    def __init__(self, group: Any, url: str):
        self.group, self.url = group, url
        attrs = dict(group.attrs)
        units = read_committed(url)
        # Without its entries a unit's rows have no checksum to read against, and a store that lost its whole
        # manifest/ would otherwise cover no array and be read unchecked, though its attrs say it is complete.
        try:
            missing = uncommitted_units(attrs, units)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CacheFormatError(
                f"{url}/zarr.json: damaged root attributes: segments or layout unreadable ({_first_line(e)})"
            ) from None
        if missing:
            raise CacheCorrupt(
                f"{url}: {len(missing)} unit(s) its segments plan have no manifest entry (first: {missing[0]}; "
                f"their rows cannot be checked); {self._hint()}"
            )
        self.regions = manifest_regions(url, units)
        self.covered = _covered_arrays(attrs) if self.regions else set()
        self.verified: set[tuple] = set()
        self.usable: dict[tuple[str, str], bool] = {}
        self.lock = threading.Lock()
        self._arrays: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self.group[name]
            # An array no entry records a crc32 for (a hand-made store) is read as before; once any entry
            # covers an array, every row read must belong to a verified unit. An array the store's units
            # write that no entry covers, while others are covered, lost its entries: reading it unchecked
            # would trust exactly the rows whose checksums are gone.
            if isinstance(a, (zarr.Array, DirectArray)) and name in self.regions:
                a = VerifiedArray(a, self, self.regions[name])
            elif name in self.covered:
                raise CacheCorrupt(
                    f"{self.url}: no manifest entry covers {name}, which the store's units write (its checksums "
                    f"are gone, so its rows cannot be checked); {self._hint()}"
                )
            self._arrays[name] = a
        return a

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)

    def _hint(self) -> str:
        return f"run python -m stages.verify_cache {self.url}, then re-extract the store"

    def _done(self, key: tuple) -> bool:
        with self.lock:
            return key in self.verified

    def _mark(self, key: tuple) -> None:
        with self.lock:
            self.verified.add(key)

    def check(self, array: Any, key: str, lo: int, hi: int, unit: str, crc: str) -> None:
        """The whole unit's rows against its crc32 (stores without block crcs)."""
        if self._done((key, unit)):
            return
        try:
            got = checksum(array[lo:hi])
        except Exception as e:  # noqa: BLE001 - undecodable bytes are this unit's corruption
            raise CacheCorrupt(
                f"teacher cache {self.url}: {key} rows [{lo}, {hi}) of unit {unit} are unreadable "
                f"({_first_line(e)}); {self._hint()}"
            ) from None
        if got != crc:
            raise CacheCorrupt(
                f"teacher cache {self.url}: {key} rows [{lo}, {hi}) of unit {unit} have crc32 {got}, "
                f"but the manifest recorded {crc} (the bytes changed after extraction); {self._hint()}"
            )
        self._mark((key, unit))

    def check_block(
        self, array: Any, key: str, r: Region, b: int, data: np.ndarray | None = None, got: str = ""
    ) -> None:
        """Block ``b`` of region ``r`` against its crc32: ``got`` if given (hashed by the caller as it read
        the rows), else computed on ``data`` (its rows, already decoded) or on a read of the block."""
        if self._done((key, r.unit, b)):
            return
        blo, bhi = r.lo + b * r.block_rows, min(r.hi, r.lo + (b + 1) * r.block_rows)
        where = f"teacher cache {self.url}: {key} rows [{r.lo}, {r.hi}) of unit {r.unit}"
        if data is None and not got:
            try:
                data = array[blo:bhi]
            except Exception as e:  # noqa: BLE001 - undecodable bytes are this unit's corruption
                raise CacheCorrupt(
                    f"{where} are unreadable (rows [{blo}, {bhi}): {_first_line(e)}); {self._hint()}"
                ) from None
        got = got or checksum(data)
        if got != r.blocks[b]:
            raise CacheCorrupt(
                f"{where}: rows [{blo}, {bhi}) have crc32 {got}, but the manifest recorded {r.blocks[b]} "
                f"(the bytes changed after extraction); {self._hint()}"
            )
        self._mark((key, r.unit, b))

    def blocks_usable(self, key: str, r: Region, row_bytes: int) -> bool:
        """Whether region ``r``'s block crcs chain to its array crc32 (computed once per unit and array): an
        entry whose crc32 was rewritten without its blocks is checked as a whole unit, by the crc32."""
        if not r.blocks:
            return False
        k = (key, r.unit)
        ok = self.usable.get(k)
        if ok is None:
            try:
                crc = int(r.blocks[0], 16)
                for b in range(1, len(r.blocks)):
                    n = min(r.hi, r.lo + (b + 1) * r.block_rows) - (r.lo + b * r.block_rows)
                    crc = crc32_combine(crc, int(r.blocks[b], 16), n * row_bytes)
                ok = f"{crc:08x}" == r.crc
            except ValueError:  # not hex: an entry damaged by hand; the unit crc decides
                ok = False
            self.usable[k] = ok
        return ok


class VerifiedArray:
    """A zarr array whose row reads (slices, orthogonal row selections) verify the blocks (or, without block
    crcs, the units) they touch. A slice that covers whole blocks is checked on the rows it decoded."""

    def __init__(self, array: Any, group: VerifiedGroup, regions: list[Region]):
        self.array, self.group, self.regions = array, group, regions
        self.shape, self.dtype, self.path = array.shape, array.dtype, array.path
        self._starts = np.array([r.lo for r in regions], dtype=np.int64)
        self._his = np.array([r.hi for r in regions], dtype=np.int64)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def _uncovered(self, row: int) -> CacheCorrupt:
        return CacheCorrupt(
            f"teacher cache {self.group.url}: row {row} of {self.path} belongs to no committed unit in the "
            "manifest (an entry is missing or was rewritten); "
            f"run python -m stages.verify_cache {self.group.url}"
        )

    def _check(self, i: int, blocks: Any = None, data: np.ndarray | None = None, data_lo: int = 0) -> None:
        """Region i: the given blocks (all when None), whole-unit when it has no usable block crcs. Blocks
        that lie inside ``data`` (rows from ``data_lo``) are checked on it."""
        r, g = self.regions[i], self.group
        if not g.blocks_usable(self.path, r, self.row_bytes):
            g.check(self.array, self.path, r.lo, r.hi, r.unit, r.crc)
            return
        for b in range(len(r.blocks)) if blocks is None else blocks:
            blo, bhi = r.lo + b * r.block_rows, min(r.hi, r.lo + (b + 1) * r.block_rows)
            inside = data is not None and blo >= data_lo and bhi <= data_lo + len(data)
            g.check_block(
                self.array, self.path, r, b, data[blo - data_lo : bhi - data_lo] if inside else None
            )

    def _verify_rows(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        rows = np.unique(rows)
        idx = np.searchsorted(self._starts, rows, side="right") - 1
        outside = (idx < 0) | (rows >= self._his[np.clip(idx, 0, None)] if len(self._his) else True)
        if np.any(outside):
            raise self._uncovered(int(rows[np.flatnonzero(outside)[0]]))
        for i in np.unique(idx).tolist():
            r = self.regions[i]
            mine = rows[idx == i]
            self._check(i, np.unique((mine - r.lo) // r.block_rows).tolist() if r.blocks else None)

    def _touched(self, lo: int, hi: int) -> list[int]:
        a = int(np.searchsorted(self._his, lo, side="right"))
        touched = list(range(a, int(np.searchsorted(self._starts, hi, side="left"))))
        covered = lo
        for i in touched:  # regions are sorted: walk them, any gap is a row no unit owns
            if self.regions[i].lo > covered:
                break
            covered = max(covered, self.regions[i].hi)
        if covered < hi:
            raise self._uncovered(covered)
        return touched

    def verified(self, lo: int, hi: int) -> bool:
        """Whether every block (or unit) rows [lo, hi) lie in has already been checked in this run, so a read
        of them needs no check (False where rows belong to no unit: the read then says so)."""
        try:
            touched = self._touched(lo, hi)
        except CacheCorrupt:
            return False
        g = self.group
        for i in touched:
            r = self.regions[i]
            if not g.blocks_usable(self.path, r, self.row_bytes):
                if not g._done((self.path, r.unit)):
                    return False
                continue
            first = (max(lo, r.lo) - r.lo) // r.block_rows
            for b in range(first, -(-(min(hi, r.hi) - r.lo) // r.block_rows)):
                if not g._done((self.path, r.unit, b)):
                    return False
        return True

    def check_block_crc(self, lo: int, hi: int, crc: int) -> bool:
        """Rows [lo, hi), hashed by the caller as it read them (``crc``), against the manifest, when they are
        exactly one block with a usable crc: True once checked (``CacheCorrupt`` when they differ), False
        when this span is not one block (the caller then reads and checks it the usual way)."""
        try:
            touched = self._touched(lo, hi)
        except CacheCorrupt:
            return False
        if len(touched) != 1:
            return False
        r = self.regions[touched[0]]
        if not r.blocks or (lo - r.lo) % r.block_rows:
            return False
        b = (lo - r.lo) // r.block_rows
        if hi != min(r.hi, lo + r.block_rows) or not self.group.blocks_usable(self.path, r, self.row_bytes):
            return False
        self.group.check_block(self.array, self.path, r, b, got=f"{crc & 0xFFFFFFFF:08x}")
        return True

    def _verify_span(self, lo: int, hi: int, data: np.ndarray | None = None) -> None:
        for i in self._touched(lo, hi):
            r = self.regions[i]
            blocks = None
            if r.blocks:
                first = (max(lo, r.lo) - r.lo) // r.block_rows
                blocks = range(first, -(-(min(hi, r.hi) - r.lo) // r.block_rows))
            self._check(i, blocks, data, lo)

    def __getitem__(self, sel: Any) -> np.ndarray:
        if isinstance(sel, slice) and sel.step in (None, 1):
            lo, hi = sel.indices(self.shape[0])[:2]
            if hi <= lo:
                return self.array[sel]
            try:
                data = self.array[lo:hi]
            except Exception:
                self._verify_span(lo, hi)  # names the unit and rows that do not decode
                raise
            self._verify_span(lo, hi, data)  # blocks inside [lo, hi) are checked on the rows just read
            return data
        if isinstance(sel, (int, np.integer)):
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
