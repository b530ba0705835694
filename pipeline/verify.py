"""Offline integrity check of a teacher cache: everything a student will trust, checked against the store.

``verify_store`` runs seven checks and never stops at the first fault, so one report lists everything:

* ``format``    the attrs name a teacher cache of this format version, marked complete;
* ``shapes``    every array's shape and dtype follow from the attrs (N images, P patches, E width, K views,
                M texts, ΣS token rows) and the unit counts from the layout;
* ``offsets``   text offsets start at 0, never decrease, leave room for each text's length, end at the
                token array's length, and every text unit starts on its own shard;
* ``ids``       image, alias and text ids are unique; aliases point at existing rows;
* ``manifest``  every planned unit (from the attrs) is committed, no unknown unit is, and each entry covers
                the rows and arrays its unit owns;
* ``checksums`` the crc32 of every committed region equals its manifest entry (bit rot, a foreign writer,
                a unit overwritten after its commit), and so does each inner chunk's where the entry keeps
                one per chunk (``block_crc32``): a fault names the chunk's rows;
* ``nonfinite`` no NaN/Inf anywhere in the float arrays: ``dask.array.from_zarr`` per array, chunked by unit
                shard, reduced with ``isfinite().all()`` per row, so a fault names the array, the row and the
                image or text id.

A check that cannot run (an array missing, a manifest entry unreadable) is itself a fault naming why.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import cache as C
from .cache.verified import manifest_blocks
from .lock import read_lock

MAX_SHOWN = 10  # faults listed per check in the text report (the JSON report keeps up to MAX_FAULTS)
MAX_FAULTS = 1000


@dataclass
class Check:
    name: str
    ok: bool
    summary: str  # one line: what was examined and what was found
    faults: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = f"{'OK' if self.ok else 'FAIL':<5} {self.name:<10} {self.summary}"
        if self.ok or not self.faults:
            return head
        shown = "; ".join(self.faults[:MAX_SHOWN])
        more = f" (+{len(self.faults) - MAX_SHOWN} more)" if len(self.faults) > MAX_SHOWN else ""
        return f"{head}: {shown}{more}"


@dataclass
class Report:
    store: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def lines(self) -> list[str]:
        bad = self.failed()
        tail = f"RESULT {'OK' if self.ok else 'FAIL'}: {len(self.checks) - len(bad)}/{len(self.checks)} checks passed"
        return [f"verify-cache {self.store}", *(c.line() for c in self.checks), tail]

    def to_json(self) -> dict:
        return {
            "store": self.store,
            "ok": self.ok,
            "failed": self.failed(),
            "checks": [{**asdict(c), "faults": c.faults[:MAX_FAULTS]} for c in self.checks],
        }


class _Store:
    """The opened group plus what every check derives from the attrs."""

    def __init__(self, url: str):
        self.url = url
        if C.read_store_attrs(url) is None:  # a damaged zarr.json raises here, naming the file
            raise C.CacheFormatError(f"{url}: no teacher cache here (no zarr.json)")
        try:
            with warnings.catch_warnings():  # the lock file of a running extraction is not a zarr node
                warnings.simplefilter("ignore")
                self.g = C.open_group(url, mode="r")
        except Exception as e:  # noqa: BLE001 - zarr's own validation of the root metadata
            raise C.CacheFormatError(
                f"{url}/zarr.json: cannot open the store ({type(e).__name__}: {e})"
            ) from e
        self.attrs: dict = dict(self.g.attrs)
        if self.attrs.get("format") != C.FORMAT:
            raise C.CacheFormatError(f"{url}: not a teacher cache (format={self.attrs.get('format')!r})")
        damaged = C.attrs_problems(self.attrs)  # every check below derives its expectations from these
        if damaged:
            raise C.CacheFormatError(C.damaged_attrs_message(url, damaged))
        self.layout: dict = dict(self.attrs.get("layout") or {})
        self.units: dict = dict(self.attrs.get("units") or {})
        self._arrays: dict[str, Any] = {}
        self.unreadable: dict[str, str] = {}  # array -> why its metadata cannot be read (a shapes fault)
        self.n, self.m = self._rows("image/ids"), self._rows("text/ids")
        self.p, self.e = int(self.attrs.get("num_patches", 0)), int(self.attrs.get("embed_dim", 0))
        self.k = int(self.attrs.get("views", 0))
        self.dtype = self.attrs.get("dtype", "float16")
        self.sources = C.token_sources(self.attrs.get("relevance_tokens", []))
        self._cache: dict[str, np.ndarray] = {}

    def array(self, key: str) -> Any:
        """The array at ``key``, None when there is none; an array whose metadata cannot be read raises
        CacheFormatError naming its zarr.json (zarr itself would raise a bare JSON error)."""
        if key not in self._arrays:
            try:
                self._arrays[key] = self.g[key]
            except KeyError:
                self._arrays[key] = None
            except Exception as e:  # noqa: BLE001 - damaged metadata: name the file
                raise C.CacheFormatError(
                    f"{self.url}/{key}/zarr.json: cannot open array {key} ({type(e).__name__}: {e})"
                ) from None
        return self._arrays[key]

    def has(self, key: str) -> bool:
        return self.array(key) is not None

    def _rows(self, key: str) -> int:
        try:
            a = self.array(key)
        except C.CacheFormatError as e:
            self.unreadable[key] = str(e)
            return 0
        return int(a.shape[0]) if a is not None else 0

    def read(self, key: str) -> np.ndarray:
        if key not in self._cache:
            a = self.array(key)
            if a is None:
                raise C.CacheFormatError(f"{self.url}: array {key} is missing")
            self._cache[key] = a[:]
        return self._cache[key]

    def text_row_of_token(self, rows: np.ndarray) -> np.ndarray:
        """The text owning each token row (-1 for unit slack)."""
        off, lengths = self.read("text/offsets").astype(np.int64), self.read("text/lengths").astype(np.int64)
        j = np.searchsorted(off[:-1], rows, side="right") - 1
        inside = (j >= 0) & (rows < off[np.clip(j, 0, None)] + lengths[np.clip(j, 0, None)])
        return np.where(inside, j, -1)


def _layout(s: _Store) -> C.StoreLayout:
    """The shape-determining part of the layout, from the attrs (what ``C.array_specs`` needs for shapes)."""
    relevance = [src[: -len("_tokens")] for src in s.sources[1:]]
    return C.StoreLayout(s.n, s.m, s.e, s.p, views=s.k, relevance_tokens=relevance, dtype=s.dtype)


def expected_arrays(s: _Store) -> dict[str, tuple[tuple, str]]:
    """{array path: (shape, dtype)} implied by the attrs (the id arrays, whose lengths only the data gives,
    are checked for presence only)."""
    n_tok = int(s.read("text/offsets")[-1]) if s.m else 0
    specs = C.array_specs(_layout(s), n_tok)
    return {k: (a.shape, a.dtype) for k, a in specs.items() if k not in C.ID_ARRAYS}


def _unit_arrays(s: _Store, kind: str) -> list[str]:
    """Arrays every unit of a kind writes (what its manifest entry must cover)."""
    return C.unit_arrays(kind, s.dtype, s.k, [src[: -len("_tokens")] for src in s.sources[1:]])


def _segment_units(s: _Store) -> list[tuple[str, str, int, int, int, int]]:
    """Every unit of every segment (the first extraction and each append), as extraction planned them."""
    r = int(s.layout.get("image_rows_per_unit") or s.units.get("image_rows_per_unit") or 1)
    rt = int(s.layout.get("text_rows_per_unit") or s.units.get("text_rows_per_unit") or 1)
    if C.SEGMENTS in s.attrs:
        return C.segment_units(C.store_segments(s.attrs), r, rt)
    shard = int(s.units.get("text_token_rows_per_unit", 0) or 0)
    units = C.planned_units(s.n, s.m, r, rt, s.units.get("image"), s.units.get("text"))
    return [
        (name, kind, lo, hi, *((0, 0) if kind == "image" else (lo // rt * shard, (lo // rt + 1) * shard)))
        for name, kind, lo, hi in units
    ]


def _planned_units(s: _Store) -> dict[str, dict]:
    """Unit name -> {"kind", "rows"} from the attrs, as extraction planned them."""
    return {
        name: {"kind": kind, "rows": [lo, hi], **({"token_rows": [t0, t1]} if kind == "text" else {})}
        for name, kind, lo, hi, t0, t1 in _segment_units(s)
    }


# -------------------------------------------------------------------------------------------------- checks


def check_format(s: _Store) -> Check:
    faults = []
    if s.attrs.get("format_version") != C.FORMAT_VERSION:
        faults.append(f"format_version {s.attrs.get('format_version')} != {C.FORMAT_VERSION}")
    if not s.layout:
        faults.append("no layout in the attrs (store creation was interrupted)")
    if not s.attrs.get("complete"):
        faults.append("not marked complete (extraction unfinished or still running: rerun it to resume)")
    if C.APPENDING in s.attrs:
        paths = ", ".join((s.attrs[C.APPENDING] or {}).get("paths", []))
        faults.append(f"an append is unfinished (rerun the extraction with its datasets to resume: {paths})")
    holder = read_lock(s.url)
    if holder is not None:
        faults.append(
            f"locked by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}: "
            "a writer is (or was, if it died) extracting into it"
        )
    summary = f"{C.FORMAT} v{s.attrs.get('format_version')}, {'complete' if s.attrs.get('complete') else 'INCOMPLETE'}"
    return Check("format", not faults, summary, faults)


def check_shapes(s: _Store) -> Check:
    faults = list(s.unreadable.values())
    exp = expected_arrays(s)
    for key in ("image/ids", "image/alias_ids", "image/alias_rows", "text/ids"):
        if key in s.unreadable:
            continue
        try:
            if not s.has(key):
                faults.append(f"{key}: missing")
        except C.CacheFormatError as e:
            faults.append(str(e))
    for key, (shape, dtype) in exp.items():
        try:
            a = s.array(key)
        except C.CacheFormatError as e:
            faults.append(str(e))
            continue
        if a is None:
            faults.append(f"{key}: missing")
            continue
        if tuple(a.shape) != shape:
            faults.append(f"{key}: shape {tuple(a.shape)} != {shape} expected from the attrs")
        if str(a.dtype) != dtype:
            faults.append(f"{key}: dtype {a.dtype} != {dtype}")
    for key, want in (("image/alias_rows", "image/alias_ids"),):
        a, b = (s.array(k) if k not in s.unreadable else None for k in (key, want))
        if a is not None and b is not None and a.shape != b.shape:
            faults.append(f"{key}: {a.shape[0]} rows for {b.shape[0]} alias ids")
    r = int(s.layout.get("image_rows_per_unit", 0) or 0)
    rt = int(s.layout.get("text_rows_per_unit", 0) or 0)
    if C.SEGMENTS in s.attrs:  # a store grown by appends: its segments say where its rows and units are
        units = _segment_units(s)
        want = {k: sum(1 for u in units if u[1] == k) for k in ("image", "text")}
        for kind, rows in (("image", s.n), ("text", s.m)):
            if s.units.get(kind) != want[kind]:
                faults.append(f"attrs units.{kind}={s.units.get(kind)} but its segments plan {want[kind]}")
            end = max([0, *(seg[kind + "s"][1] for seg in C.store_segments(s.attrs))])
            if end != rows:
                faults.append(f"{kind}/ids: {rows} rows but the segments end at {end}")
    else:
        if r and s.units.get("image") != math.ceil(s.n / r):
            faults.append(f"attrs units.image={s.units.get('image')} but {s.n} images / {r} rows per unit")
        if rt and s.units.get("text") != math.ceil(s.m / rt):
            faults.append(f"attrs units.text={s.units.get('text')} but {s.m} texts / {rt} rows per unit")
    summary = f"{len(exp)} arrays vs attrs (N_img={s.n}, P={s.p}, E={s.e}, K={s.k}, M={s.m}, dtype={s.dtype})"
    return Check("shapes", not faults, summary, faults)


def check_offsets(s: _Store) -> Check:
    faults = []
    off, lengths = s.read("text/offsets").astype(np.int64), s.read("text/lengths").astype(np.int64)
    m = len(lengths)
    if len(off) != m + 1:
        return Check(
            "offsets", False, f"{m} texts", [f"text/offsets has {len(off)} entries, expected {m + 1}"]
        )
    if m and off[0] != 0:
        faults.append(f"offsets[0] = {off[0]} != 0")
    for i in np.flatnonzero(np.diff(off) < 0)[:MAX_FAULTS]:
        faults.append(f"offsets decrease at text {i}: {off[i]} > {off[i + 1]}")
    ids = s.read("text/ids")
    # Padding rows (an append starts on a unit boundary) hold no text: length 0.
    for i in [i for i in np.flatnonzero(lengths < 1) if not C.is_pad_id(ids[i])][:MAX_FAULTS]:
        faults.append(f"text {i}: length {lengths[i]} < 1")
    for i in np.flatnonzero(off[:-1] + lengths > off[1:])[:MAX_FAULTS]:
        faults.append(
            f"text {i}: offsets[{i}] + lengths[{i}] = {off[i] + lengths[i]} > offsets[{i + 1}] = {off[i + 1]}"
        )
    tokens = s.array("text/tokens")
    if tokens is not None and off[-1] != tokens.shape[0]:
        faults.append(f"offsets[M] = {off[-1]} != text/tokens rows {tokens.shape[0]}")
    shard = int(s.units.get("text_token_rows_per_unit", 0) or 0)
    if shard or C.SEGMENTS in s.attrs:
        for name, kind, lo, _, t0, _ in _segment_units(s):
            if kind == "text" and lo < m and off[lo] != t0:
                faults.append(f"text unit {name} starts at token row {off[lo]}, not on its shard ({t0})")
    summary = f"{m} texts, {int(lengths.sum()) if m else 0} token rows of {int(off[-1])}"
    return Check("offsets", not faults, summary, faults)


def _dupes(values: list) -> list:
    return [v for v, c in Counter(values).items() if c > 1]


def check_ids(s: _Store) -> Check:
    faults = []
    image_ids = s.read("image/ids").tolist()
    text_ids = s.read("text/ids").tolist()
    alias_ids = s.read("image/alias_ids").tolist() if s.has("image/alias_ids") else []
    alias_rows = s.read("image/alias_rows").tolist() if s.has("image/alias_rows") else []
    for what, ids in (("image", image_ids), ("alias", alias_ids), ("text", text_ids)):
        faults += [f"{what} id {d!r} repeats" for d in _dupes(ids)[:MAX_FAULTS]]
    faults += [f"alias id {a!r} is also an image row id" for a in sorted(set(alias_ids) & set(image_ids))]
    faults += [
        f"alias id {a!r} points at row {r} outside [0, {len(image_ids)})"
        for a, r in zip(alias_ids, alias_rows, strict=False)
        if not 0 <= int(r) < len(image_ids)
    ]
    alias_state = C.alias_rows_state(s.url, s.g) if alias_ids else ""
    if alias_state == "lost":
        faults.append("image/alias_rows: a chunk is missing (it would read as aliases of row 0)")
    summary = f"{len(image_ids)} image ids, {len(alias_ids)} aliases, {len(text_ids)} text ids"
    if alias_state == "unknown":  # an older store: not a fault, but nothing here can tell
        summary += "; image/alias_rows lacks a chunk (an older store: aliases of row 0, or a lost chunk)"
    return Check("ids", not faults, summary, faults)


def check_manifest(s: _Store) -> Check:
    faults = []
    planned = _planned_units(s)
    committed, unreadable = C.read_manifest(s.url)
    missing = [u for u in planned if u not in committed and u not in unreadable]
    unknown = sorted(u for u in committed if u not in planned)
    faults += [f"{u}: entry unreadable: {unreadable[u]}" for u in sorted(unreadable)]
    faults += [f"{u}: planned but not committed" for u in missing]
    faults += [f"{u}: committed but not part of this store's plan" for u in unknown]
    want = {kind: _unit_arrays(s, kind) for kind in ("image", "text")}
    for name, rec in sorted(committed.items()):
        plan = planned.get(name)
        if plan is None:
            continue
        if list(rec.get("rows", [])) != plan["rows"]:
            faults.append(f"{name}: rows {rec.get('rows')} != planned {plan['rows']}")
        if plan.get("token_rows") and list(rec.get("token_rows", [])) != plan["token_rows"]:
            faults.append(f"{name}: token rows {rec.get('token_rows')} != planned {plan['token_rows']}")
        absent = [a for a in want.get(plan["kind"], []) if a not in rec.get("arrays", {})]
        if absent:
            faults.append(f"{name}: entry does not cover {', '.join(absent)}")
    readable = len([u for u in planned if u in committed])
    summary = f"{readable}/{len(planned)} planned units committed, {len(unknown)} unknown"
    if unreadable:
        summary += f", {len(unreadable)} entr{'y' if len(unreadable) == 1 else 'ies'} unreadable"
    return Check("manifest", not faults, summary, faults)


def check_checksums(s: _Store, workers: int = 4) -> Check:
    committed, _ = C.read_manifest(s.url)  # unreadable entries are manifest faults; the rest are checked
    regions = [
        (name, key, info)
        for name, rec in sorted(committed.items())
        for key, info in rec.get("arrays", {}).items()
    ]

    def one(item: tuple) -> list[str]:
        name, key, info = item
        region = info.get("region")
        if not (isinstance(region, list) and len(region) == 2 and all(isinstance(r, int) for r in region)):
            return [f"{name}: {key}: manifest entry has no region [start, stop] (got {region!r:.40})"]
        lo, hi = region
        try:
            a = s.array(key)
        except C.CacheFormatError as e:
            return [f"{name}: {e}"]
        if a is None:
            return [f"{name}: {key} missing from the store"]
        try:
            data = a[lo:hi]
        except Exception as e:  # noqa: BLE001 - undecodable bytes are a checksum fault of this unit
            return [f"{name}: {key} rows [{lo}, {hi}) unreadable: {type(e).__name__}: {e}"]
        block_rows, blocks = manifest_blocks(info, lo, hi)
        if not blocks:  # a store written before per-chunk crcs: the unit's crc32 alone
            got = C.checksum(data)
            want = info.get("crc32")
            return [] if got == want else [f"{name}: {key} rows [{lo}, {hi}) crc32 {got} != manifest {want}"]
        # Each inner chunk's rows against its own crc (what training reads check), chained into the unit's
        # crc32 so the rows are hashed once: a fault names the chunk's rows, not just the unit's.
        faults, crc = [], 0
        for b, want in enumerate(blocks):
            part = data[b * block_rows : (b + 1) * block_rows]
            c = C.crc32(part)
            crc = c if b == 0 else C.crc32_combine(crc, c, int(part.nbytes))
            if f"{c:08x}" != want:
                blo = lo + b * block_rows
                faults.append(
                    f"{name}: {key} rows [{blo}, {blo + len(part)}) (inner chunk of unit rows [{lo}, {hi})) "
                    f"crc32 {c:08x} != manifest {want}"
                )
        if f"{crc:08x}" != info.get("crc32") and not faults:
            faults.append(
                f"{name}: {key} rows [{lo}, {hi}) crc32 {crc:08x} != manifest {info.get('crc32')} "
                "(every inner chunk matches its own crc: the entry's crc32 was changed)"
            )
        return faults

    with ThreadPoolExecutor(max(1, workers)) as pool:
        faults = [f for fs in pool.map(one, regions) for f in fs]
    bad_units = sorted({f.split(":", 1)[0] for f in faults})
    summary = f"{len(regions)} regions of {len(committed)} units, {len(bad_units)} unit(s) differ"
    return Check("checksums", not faults, summary, faults)


def _row_name(s: _Store, key: str, row: int) -> str:
    if key.startswith(("image/", "views/")):
        ids = s.read("image/ids")
        return f"image {ids[row]!r}" if row < len(ids) else "?"
    if key.startswith("text/tokens"):
        j = int(s.text_row_of_token(np.array([row]))[0])
        return f"text {s.read('text/ids')[j]!r}" if j >= 0 else "unit slack"
    ids = s.read("text/ids")
    return f"text {ids[row]!r}" if row < len(ids) else "?"


def _openable(s: _Store, key: str) -> bool:
    """Present and its metadata readable (an unreadable array is a shapes fault; the scan covers the rest)."""
    try:
        return s.has(key)
    except C.CacheFormatError:
        return False


def check_nonfinite(s: _Store, workers: int = 0) -> Check:
    """Per array, a dask array chunked by the store's shards (= one unit's region), reduced to a per-row
    all-finite flag; all arrays are computed in one dask graph."""
    import dask
    import dask.array as da

    keys = [
        key
        for key, (shape, dtype) in expected_arrays(s).items()
        if dtype.startswith("float") and _openable(s, key) and shape and shape[0] > 0
    ]
    flags = []
    for key in keys:
        a = s.array(key)
        shard_rows = (a.shards or a.chunks)[0]
        x = da.from_zarr(a, chunks=(shard_rows, *a.shape[1:]))
        flags.append(da.isfinite(x).all(axis=tuple(range(1, x.ndim))) if x.ndim > 1 else da.isfinite(x))
    kw: dict[str, Any] = {"scheduler": "threads"}
    if workers > 0:
        kw["num_workers"] = workers
    faults, rows_seen = [], 0
    try:
        results = list(dask.compute(*flags, **kw)) if flags else []
    except Exception:  # noqa: BLE001 - an undecodable shard: scan array by array to name the one at fault
        results = []
        for key, f in zip(keys, flags, strict=True):
            try:
                results.append(f.compute(**kw))
            except Exception as e:  # noqa: BLE001
                faults.append(f"{key}: unreadable ({type(e).__name__}: {e})")
                results.append(np.ones(0, bool))
    for key, ok in zip(keys, results, strict=True):
        rows_seen += len(ok)
        for row in np.flatnonzero(~ok)[:MAX_FAULTS]:
            faults.append(f"{key} row {int(row)} ({_row_name(s, key, int(row))}): NaN/Inf")
    summary = f"{len(keys)} float arrays, {rows_seen} rows scanned, {len(faults)} non-finite row(s)"
    return Check("nonfinite", not faults, summary, faults)


CHECKS: dict[str, Callable[..., Check]] = {
    "format": check_format,
    "shapes": check_shapes,
    "offsets": check_offsets,
    "ids": check_ids,
    "manifest": check_manifest,
    "checksums": check_checksums,
    "nonfinite": check_nonfinite,
}


def verify_store(url: str, *, scan: bool = True, workers: int = 0) -> Report:
    """Run every check on the store at ``url`` (``scan=False`` leaves out the NaN/Inf scan, the one check that
    decodes every value twice). Raises CacheFormatError when ``url`` holds no teacher cache at all."""
    s = _Store(url)
    report = Report(url)
    for name, fn in CHECKS.items():
        if name == "nonfinite" and not scan:
            continue
        try:
            if name == "checksums":
                check = fn(s, workers or 4)
            elif name == "nonfinite":
                check = fn(s, workers)
            else:
                check = fn(s)
        except Exception as e:  # noqa: BLE001 - a check that cannot run is a fault, reported with its cause
            check = Check(name, False, "could not run", [f"{type(e).__name__}: {e}"])
        report.checks.append(check)
    return report
