"""Reading a complete teacher cache: by image id and by text, in batches."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import zarr

from ..config import usable_cores
from .checksum import checksum
from .codec import decode_tokens
from .direct import DirectArray, DirectGroup
from .errors import CacheCorrupt, CacheFormatError
from .grow import alias_rows_state, recorded_aliases
from .manifest import committed_units
from .schema import FORMAT, FORMAT_VERSION, SCALE_SUFFIX, attrs_problems, damaged_attrs_message, is_pad_id
from .store import open_group, read_store_attrs
from .verified import VerifiedArray, VerifiedGroup

# Token dtypes a reader hands out: float32 (decoded on the host), or float16 (as a float16 store holds them).
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique rows -> [(start, stop)] contiguous runs."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([[rows[0]], rows[breaks + 1]])
    stops = np.concatenate([rows[breaks] + 1, [rows[-1] + 1]])
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


def read_rows(a: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows of an array in the order given. Row indices are deduplicated and sorted, each contiguous run is
    one slice, and several runs go through one orthogonal selection so zarr decodes every inner chunk once and
    fetches them concurrently; the result is scattered back to the requested order."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(a, ChunkCachedArray) and len(rows):
        return a.rows(rows)  # it gathers rows in the order given itself: no second copy of the batch
    uniq, inverse = np.unique(rows, return_inverse=True)
    runs = _runs(uniq)
    if not runs:
        return np.zeros((0, *a.shape[1:]), dtype=a.dtype)
    if len(runs) == 1:
        block = a[runs[0][0] : runs[0][1]]
    else:
        block = a.get_orthogonal_selection((uniq,))
    return block[inverse]


def read_threads_for(setting: int = -1) -> int:
    """Reader threads for a ``read_threads`` setting (-1: automatic, min(4, cores))."""
    if setting > 0:
        return setting
    cores = usable_cores()
    return max(1, min(4, cores))


class ChunkLRU:
    """Decoded inner chunks (store dtype) by (array path, chunk index), least recently used evicted first, and
    the reader threads that decode missing chunks (one caller at a time: the LRU itself is not locked)."""

    def __init__(self, max_bytes: int, threads: int = 1):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self.chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.hits = self.misses = 0
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None

    def run_cap(self, n_missing: int) -> int:
        """The most adjacent chunks one read takes: all of them on one thread, a share per thread otherwise."""
        return n_missing if self.threads == 1 else max(1, -(-n_missing // self.threads))

    def map(self, fn: Any, items: list) -> list:
        if self.threads == 1 or len(items) < 2:
            return [fn(i) for i in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="clip-td-read")
        return list(self._pool.map(fn, items))

    def get(self, key: tuple[str, int]) -> np.ndarray | None:
        a = self.chunks.get(key)
        if a is not None:
            self.chunks.move_to_end(key)
        return a

    def put(self, key: tuple[str, int], a: np.ndarray) -> None:
        self.chunks[key] = a
        self.bytes += a.nbytes
        while self.bytes > self.max_bytes and len(self.chunks) > 1:
            _, old = self.chunks.popitem(last=False)
            self.bytes -= old.nbytes


class ChunkCachedArray:
    """A zarr array whose row reads (``a[i:j]``, ``a.get_orthogonal_selection((rows,))``: all that
    ``read_rows`` uses) decode each inner chunk once and keep it in a shared LRU. A training
    batch needs a few rows of many chunks; the stream (shards in order, a shuffle buffer) comes back to the same
    chunks batch after batch, so without the LRU every batch would decompress whole chunks for a few rows.
    Uncompressed arrays read past zarr keep nothing in the LRU: the page cache holds their bytes, and a batch's
    rows are read from the shard files straight into the batch (``DirectArray.rows_into``)."""

    def __init__(self, array: Any, lru: ChunkLRU):
        self.array, self.lru = array, lru
        self.shape, self.dtype, self.path = array.shape, array.dtype, array.path
        self.rows_per_chunk = max(1, int(array.chunks[0]))
        # Whole-chunk reads past zarr (``DirectArray``, perhaps under the crc check): cheap per call.
        inner = array.array if isinstance(array, VerifiedArray) else array
        self.direct = isinstance(inner, DirectArray)
        self.raw = inner if self.direct and not inner.blosc else None

    def _checked(self, lo: int, hi: int) -> bool:
        return not isinstance(self.array, VerifiedArray) or self.array.verified(lo, hi)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def __getitem__(self, sel: Any) -> np.ndarray:
        if isinstance(sel, slice) and sel.step in (None, 1) and len(self.shape) > 0:
            return self.rows(np.arange(*sel.indices(self.shape[0])[:2]))
        return self.array[sel]

    def get_orthogonal_selection(self, sel: Any) -> np.ndarray:
        if isinstance(sel, tuple) and len(sel) == 1 and not isinstance(sel[0], slice):
            return self.rows(np.asarray(sel[0], dtype=np.int64))
        return self.array.get_orthogonal_selection(sel)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        cr = self.rows_per_chunk
        chunk = srt // cr
        uniq, starts = np.unique(chunk, return_index=True)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        stops = [*starts[1:], len(srt)]
        # Where each chunk's rows go: (positions in the batch, rows inside the chunk).
        dest = {
            c: (order[lo:hi].tolist(), (srt[lo:hi] - c * cr).tolist())
            for c, lo, hi in zip(uniq.tolist(), starts.tolist(), stops, strict=True)
        }
        if self.raw is not None:
            # Uncompressed chunks: the page cache is the cache. A chunk not yet checked in this run is read
            # whole (and checked); after that, a batch's rows are read from the shard file straight into the
            # batch, one copy, and nothing is kept here: holding decoded copies only costs memory bandwidth.
            def fill_raw(c: int) -> bool:
                lo, hi = c * cr, min(self.shape[0], (c + 1) * cr)
                pos, local = dest[c]
                if self._checked(lo, hi):
                    if self.raw.rows_into(c, local, out, pos):
                        return True
                elif isinstance(self.array, VerifiedArray):
                    # First read of the chunk in this run: its rows go straight into the batch and are hashed
                    # as they land, so checking it costs no second copy of the chunk.
                    crc = self.raw.rows_into_crc(c, local, out, pos, hi - lo)
                    if crc is not None and self.array.check_block_crc(lo, hi, crc):
                        return False
                _scatter(out, self.array[lo:hi], pos, local)
                return False

            hits = sum(self.lru.map(fill_raw, uniq.tolist()))
            self.lru.hits, self.lru.misses = self.lru.hits + hits, self.lru.misses + len(uniq) - hits
            return out
        have = {int(c): self.lru.get((self.path, int(c))) for c in uniq}
        missing = [c for c, a in have.items() if a is None]
        self.lru.hits += len(uniq) - len(missing)
        self.lru.misses += len(missing)
        if self.direct:
            # Whole chunks straight from the shard files: one read per chunk (no run to concatenate and cut
            # up again), and each task copies its chunk's rows into the batch itself, so with reader threads
            # the reads, crc checks (both release the GIL) and copies all run on the pool.
            def fill(c: int) -> np.ndarray:
                a = self.array[c * cr : min(self.shape[0], (c + 1) * cr)]
                _scatter(out, a, *dest[c])
                return a

            for c, a in zip(missing, self.lru.map(fill, missing), strict=True):
                self.lru.put((self.path, c), a)
        else:
            # Through zarr, missing chunks are read as whole-chunk slices, one per run of adjacent chunks:
            # zarr decodes each once, and slicing is far cheaper than an orthogonal selection listing every
            # row of the chunks. With reader threads, runs are cut so that every thread has one.
            runs: list[list[int]] = []
            for c in missing:
                if runs and c == runs[-1][-1] + 1 and len(runs[-1]) < self.lru.run_cap(len(missing)):
                    runs[-1].append(c)
                else:
                    runs.append([c])
            for run, parts in self.lru.map(self._read_run, runs):
                for rc, part in zip(run, parts, strict=True):
                    _scatter(out, part, *dest[rc])
                    self.lru.put((self.path, rc), part)
        for c, a in have.items():
            if a is not None:
                _scatter(out, a, *dest[c])
        return out

    def _read_run(self, run: list[int]) -> tuple[list[int], list[np.ndarray]]:
        cr = self.rows_per_chunk
        block = self.array[run[0] * cr : min(self.shape[0], (run[-1] + 1) * cr)]
        # Own memory per chunk, so evicting one frees it (a view would pin the whole run).
        if len(run) == 1:
            return run, [block]
        return run, [block[j * cr : (j + 1) * cr].copy() for j in range(len(run))]


def _scatter(out: np.ndarray, chunk: np.ndarray, positions: list[int], rows: list[int]) -> None:
    """out[positions] = chunk[rows], one row at a time: a fancy-indexed assignment copies every row twice
    (gather into a temporary, then scatter), and rows are large (ViT-B/16: 200 KB)."""
    for i, r in zip(positions, rows, strict=True):
        out[i] = chunk[r]


class ChunkCachedGroup:
    """The store's group with its arrays opened once (no metadata read per batch) and row reads cached."""

    def __init__(self, group: Any, max_bytes: int, threads: int = 1):
        self.group, self.lru = group, ChunkLRU(max_bytes, threads)
        self._arrays: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self.group[name]
            cached = isinstance(a, (zarr.Array, VerifiedArray, DirectArray))
            a = self._arrays[name] = ChunkCachedArray(a, self.lru) if cached else a
        return a

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)


def index_problem(
    image_ids: Sequence[str],
    alias_ids: Sequence[str],
    alias_rows: np.ndarray,
    text_ids: Sequence[str],
    lengths: np.ndarray,
    offsets: np.ndarray,
    n_tokens: int,
) -> str:
    """The first way the index arrays contradict the store's layout, naming the array ("" when none): aliases
    point at image rows that hold an image, and each text's token rows lie inside text/tokens without
    overlapping the next text's. Vectorised (padding ids looked at only where a length is 0), so it costs
    nothing beside reading the arrays."""
    n = len(image_ids)
    if len(alias_rows) != len(alias_ids):
        return f"image/alias_rows has {len(alias_rows)} rows for {len(alias_ids)} alias ids"
    out = np.flatnonzero((alias_rows < 0) | (alias_rows >= n))
    if len(out):
        i = int(out[0])
        return (
            f"image/alias_rows: alias {alias_ids[i]!r} points at row {int(alias_rows[i])}, outside [0, {n})"
        )
    for i, r in enumerate(alias_rows.tolist()):  # an alias shares a computed row, never a padding one
        if is_pad_id(image_ids[r]):
            return f"image/alias_rows: alias {alias_ids[i]!r} points at padding row {r}"
    m = len(text_ids)
    if len(lengths) != m:
        return f"text/lengths has {len(lengths)} rows for {m} text ids"
    if len(offsets) != m + 1:
        return f"text/offsets has {len(offsets)} rows, expected {m + 1} ({m} texts)"
    # Padding rows (an append starts on a unit boundary) hold no text: length 0; every text has SOT and EOT.
    short = [int(i) for i in np.flatnonzero(lengths < 1) if not is_pad_id(text_ids[i])]
    if short:
        return f"text/lengths: text row {short[0]} has length {int(lengths[short[0]])}"
    if len(offsets) and offsets[0] < 0:
        return f"text/offsets: offsets[0] = {int(offsets[0])} < 0"
    down = np.flatnonzero(np.diff(offsets) < 0)
    if len(down):
        i = int(down[0])
        return f"text/offsets decrease at text {i}: {int(offsets[i])} > {int(offsets[i + 1])}"
    over = np.flatnonzero(offsets[:-1] + lengths > offsets[1:])
    if len(over):
        i = int(over[0])
        return (
            f"text/offsets: offsets[{i}] + text/lengths[{i}] = {int(offsets[i] + lengths[i])} > "
            f"offsets[{i + 1}] = {int(offsets[i + 1])}"
        )
    if len(offsets) and offsets[-1] > n_tokens:
        return f"text/offsets: offsets[{m}] = {int(offsets[-1])} > {n_tokens} rows of text/tokens"
    return ""


class TeacherCache:
    """Read-only access to a complete teacher cache, by image id and by text."""

    def __init__(self, url: str):
        self.url = url
        if read_store_attrs(url) is None:  # a damaged zarr.json raises here, naming the file
            raise CacheFormatError(f"{url}: no teacher cache here (run `python -m stages.extract_teacher`)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.group = open_group(url, mode="r")
        self.attrs: dict = dict(self.group.attrs)
        if self.attrs.get("format") != FORMAT:
            raise CacheFormatError(f"{url}: not a teacher cache (format={self.attrs.get('format')!r})")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise CacheFormatError(
                f"{url}: cache format version {self.attrs.get('format_version')} != {FORMAT_VERSION}; re-extract"
            )
        damaged = attrs_problems(self.attrs)
        if damaged:
            raise CacheFormatError(damaged_attrs_message(url, damaged))
        if not self.attrs.get("complete"):
            done, total = len(committed_units(url)), self.attrs.get("units", {}).get("total", "?")
            raise CacheFormatError(
                f"{url}: extraction incomplete ({done}/{total} units committed); rerun it to resume"
            )
        self.embed_dim: int = int(self.attrs["embed_dim"])
        self.grid: int = int(self.attrs["grid"])
        self.num_patches: int = int(self.attrs["num_patches"])
        self.views: int = int(self.attrs.get("views", 0))
        self.dtype: str = self.attrs["dtype"]
        self.relevance_tokens: list[str] = list(self.attrs.get("relevance_tokens", []))
        g = self.group
        image_ids, text_ids = g["image/ids"][:].tolist(), g["text/ids"][:].tolist()
        # The aliases the store records: an append in flight resizes and writes its own after them.
        na = recorded_aliases(self.attrs, g["image/alias_ids"].shape[0])
        alias_ids, alias_rows = (
            g["image/alias_ids"][:na].tolist(),
            g["image/alias_rows"][:na].astype(np.int64),
        )
        self._lengths = g["text/lengths"][:].astype(np.int64)
        self._offsets = g["text/offsets"][:].astype(np.int64)
        # No checksum covers the index (the coordinator writes it before any unit runs), and a lost chunk of
        # it reads as zeros: every text would then read other texts' token rows, unnoticed by checked reads.
        bad = index_problem(
            image_ids,
            alias_ids,
            alias_rows,
            text_ids,
            self._lengths,
            self._offsets,
            g["text/tokens"].shape[0],
        )
        alias_state = alias_rows_state(url, g) if not bad else ""
        if alias_state == "lost":
            bad = "image/alias_rows: a chunk is missing, which would read as every alias in it pointing at row 0"
        elif alias_state == "unknown":
            warnings.warn(
                f"{url}: image/alias_rows lacks a chunk: in a store written before every index chunk was kept, "
                "aliases that share row 0 read so, and so does a lost chunk; re-extract the store to be sure",
                stacklevel=2,
            )
        if bad:
            raise CacheCorrupt(
                f"{url}: {bad} (the index was damaged after extraction); run python -m stages.verify_cache "
                f"{url}, then re-extract the store"
            )
        self._image_row = {s: i for i, s in enumerate(image_ids)}
        for alias, row in zip(alias_ids, alias_rows.tolist(), strict=True):
            self._image_row[alias] = int(row)
        self._text_row = {s: i for i, s in enumerate(text_ids)}
        self._text_row_memo: dict[str, int] = {}

    def configure_reads(self, verify: bool = False, chunk_cache_bytes: int = 0, threads: int = 1) -> None:
        """How later reads go. ``verify``: every unit a read touches is checked once against its manifest
        crc32 (``CacheCorrupt`` names the array and unit). ``chunk_cache_bytes`` > 0: decoded inner chunks
        are kept in an LRU of that many bytes (``self.group.lru``), so that a training stream that keeps
        coming back to a chunk decompresses it once, not once per batch; ``threads`` (with the LRU) decode
        a batch's missing chunks concurrently. Calling it again adds nothing that is already in place."""
        if chunk_cache_bytes > 0 and isinstance(self.group, zarr.Group):
            # The LRU asks for whole inner chunks only: read them from the shard files, past zarr's machinery.
            self.group = DirectGroup(self.group)
        if verify and not isinstance(self.group, (VerifiedGroup, ChunkCachedGroup)):
            self.group = VerifiedGroup(self.group, self.url)
        if chunk_cache_bytes > 0 and not isinstance(self.group, ChunkCachedGroup):
            self.group = ChunkCachedGroup(self.group, chunk_cache_bytes, threads)

    def __repr__(self) -> str:
        return f"TeacherCache({self.url!r}, images={self.n_images}, texts={len(self._lengths)})"

    @property
    def n_images(self) -> int:
        return int(self.group["image/ids"].shape[0])

    @property
    def n_texts(self) -> int:
        return len(self._lengths)

    def fingerprint(self) -> dict:
        return dict(self.attrs.get("fingerprint", {}))

    def image_rows(self, image_ids: Sequence[str]) -> np.ndarray:
        try:
            return np.array([self._image_row[i] for i in image_ids], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"{self.url}: image id {e.args[0]!r} is not in the teacher cache") from None

    def text_rows(self, texts: Sequence[str]) -> np.ndarray:
        from ..texts import text_hash

        # Memoised by string: a training run asks for the same candidate and question texts batch after
        # batch, and hashing them each time was a third of a batch's read time. At most one entry per text
        # the store holds.
        memo = self._text_row_memo
        rows = np.empty(len(texts), dtype=np.int64)
        for i, t in enumerate(texts):
            r = memo.get(t)
            if r is None:
                r = self._text_row.get(text_hash(t))
                if r is None:
                    raise KeyError(
                        f"{self.url}: text {t!r} is not in the teacher cache (extracted from other data?)"
                    )
                memo[t] = r
            rows[i] = r
        return rows

    def _tokens(
        self, group: str, src: str, rows: np.ndarray, view: np.ndarray | None = None, out: Any = np.float32
    ) -> np.ndarray:
        a = self.group[f"{group}/{src}"]
        scale = self.group[f"{group}/{src}{SCALE_SUFFIX}"] if self.dtype == "int8" else None
        vals = read_rows(a, rows)
        sc = read_rows(scale, rows) if scale is not None else None
        if view is not None:  # pick each row's view after the row read (views sit inside a row's chunk)
            idx = np.arange(len(rows))
            vals = vals[idx, view]
            sc = sc[idx, view] if sc is not None else None
        if np.dtype(out) == np.float16 and vals.dtype == np.float16:
            return vals  # as stored: the device converts (half the host-to-device bytes, no host pass)
        return decode_tokens(vals, sc).astype(out, copy=False)

    def image_targets(
        self,
        image_ids: Sequence[str],
        relevance: str | None = None,
        views: Sequence[int] | None = None,
        token_dtype: torch.dtype = torch.float32,
    ) -> dict[str, torch.Tensor]:
        """``tokens`` [B,P,E], ``pooled`` [B,E], ``valid`` [B] (bool) as float32 tensors; ``relevance`` [B,P,E]
        when a relevance source is named ("last" = the tokens themselves). ``views`` (one index per id) reads the
        cached augmented views instead of view 0. ``token_dtype`` torch.float16: token arrays (tokens,
        relevance) as a float16 store holds them, for a trainer that converts on its device."""
        tok = _NUMPY[token_dtype]
        rows = self.image_rows(image_ids)
        out: dict[str, torch.Tensor] = {}
        if views is None:
            group, v = "image", None
            out["pooled"] = torch.from_numpy(read_rows(self.group["image/pooled"], rows).astype(np.float32))
        else:
            if self.views == 0:
                raise ValueError(f"{self.url}: no views cached (extract with --views K)")
            v = np.asarray(views, dtype=np.int64)
            if len(v) != len(rows) or (v < 0).any() or (v >= self.views).any():
                raise ValueError(f"views must give one index in [0, {self.views}) per image id")
            group = "views"
            pooled = read_rows(self.group["views/pooled"], rows)[np.arange(len(rows)), v]
            out["pooled"] = torch.from_numpy(pooled.astype(np.float32))
        out["tokens"] = torch.from_numpy(self._tokens(group, "tokens", rows, v, tok))
        if relevance is not None:
            if relevance == "last":
                out["relevance"] = out["tokens"]
            elif relevance in self.relevance_tokens:
                out["relevance"] = torch.from_numpy(self._tokens(group, f"{relevance}_tokens", rows, v, tok))
            else:
                raise ValueError(
                    f"{self.url}: relevance source {relevance!r} not cached (have: last, "
                    f"{', '.join(self.relevance_tokens) or 'nothing else'}); extract with cache.relevance_tokens"
                )
        out["valid"] = torch.from_numpy(read_rows(self.group["image/valid"], rows).astype(bool))
        return out

    def view_params(self, image_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """``boxes`` [B,K,4] (normalised x0,y0,x1,y1) and ``flip`` [B,K] (bool) of every cached view."""
        if self.views == 0:
            raise ValueError(f"{self.url}: no views cached (extract with --views K)")
        rows = self.image_rows(image_ids)
        return {
            "boxes": torch.from_numpy(read_rows(self.group["views/boxes"], rows).astype(np.float32)),
            "flip": torch.from_numpy(read_rows(self.group["views/flip"], rows).astype(bool)),
        }

    def text_targets(
        self, texts: Sequence[str], tokens: bool = True, token_dtype: torch.dtype = torch.float32
    ) -> dict[str, Any]:
        """``tokens``: list of [L_i, E] float32 tensors (SOT … EOT; ``token_dtype`` as in ``image_targets``),
        ``pooled`` [B,E], ``lengths`` [B] (long). ``tokens=False`` leaves the token rows unread (no ``tokens``
        key): the §5 weights need only the candidates' pooled embeddings."""
        rows = self.text_rows(texts)
        lengths = self._lengths[rows]
        out: dict[str, Any] = {}
        if tokens:
            uniq, inverse = np.unique(rows, return_inverse=True)
            starts, lens = self._offsets[uniq], self._lengths[uniq]
            # One token-row index for every needed position, read in one sorted pass, then cut per text.
            cuts = np.concatenate([[0], np.cumsum(lens)])
            tok_rows = np.arange(int(cuts[-1]), dtype=np.int64) + np.repeat(starts - cuts[:-1], lens)
            tok = torch.from_numpy(self._tokens("text", "tokens", tok_rows, out=_NUMPY[token_dtype]))
            per_text = tok.split(lens.tolist())
            out["tokens"] = [per_text[j] for j in inverse.tolist()]
        pooled = read_rows(self.group["text/pooled"], rows).astype(np.float32)
        out["pooled"] = torch.from_numpy(pooled)
        out["lengths"] = torch.from_numpy(lengths.astype(np.int64))
        return out

    def verify(self) -> list[str]:
        """Units whose stored bytes no longer match the checksums in their manifest entry."""
        bad = []
        for name, rec in sorted(committed_units(self.url).items()):
            for key, info in rec.get("arrays", {}).items():
                region = info.get("region")  # rows along axis 0; a unit owns every column of its rows
                if not (isinstance(region, list) and len(region) == 2) or key not in self.group:
                    bad.append(f"{name}:{key}")
                elif checksum(self.group[key][region[0] : region[1]]) != info.get("crc32"):
                    bad.append(f"{name}:{key}")
        return bad
