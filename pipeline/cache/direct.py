"""Whole inner chunks and whole shards of a local sharded array, read and written without zarr's per-call
machinery.

The training reader asks only for whole inner chunks (``ChunkCachedArray``). Through zarr each such read
goes through its event loop thread and codec pipeline: on the ViT-B/16 benchmark store zarr decoded 197
inner chunks of 1.5 MiB per second on one thread where reading the same bytes and calling Blosc directly
decoded 366 (``docs/scale.md``). ``DirectArray`` does the latter for arrays whose layout it knows exactly
(a local store, one sharding codec with its index at the end, inner chunks of [bytes, blosc] or [bytes] that
span every axis but the first) and hands every other read, and every other array, to zarr. Blosc releases
the GIL, so reader threads decode in parallel. Uncompressed chunks are also read row by row straight into a
caller's batch (``rows_into``, ``rows_into_crc``): a row is a contiguous run of bytes in the shard file.

Image units write whole shards the same way (``write_rows``): the bytes zarr would write, every inner chunk
stored (as zarr does with ``write_empty_chunks``), without zarr's per-chunk machinery, which cost more than
the writing itself at ViT-B/16 size.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import uuid
from typing import Any

import google_crc32c
import numcodecs.blosc
import numpy as np

from .checksum import crc32_update

_EMPTY = 2**64 - 1  # an index entry of a chunk the shard does not store: it is all fill value


def _read(f: Any, n: int, offset: int) -> bytes:
    """Every byte this module reads goes through here or ``_read_into`` (benchmarks count them)."""
    return os.pread(f.fileno(), n, offset)


def _read_into(f: Any, buf: np.ndarray, offset: int) -> int:
    """Bytes from ``offset`` into ``buf`` (contiguous), straight from the page cache: no intermediate copy."""
    return os.preadv(f.fileno(), [buf], offset)


def direct_array(array: Any) -> Any:
    """``DirectArray(array)`` when its layout is one this module reads exactly; ``array`` otherwise."""
    try:
        from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec

        m = array.metadata
        folder = array_folder(array)
        if folder is None or len(m.codecs) != 1 or not isinstance(m.codecs[0], ShardingCodec):
            return array
        sc = m.codecs[0]
        inner = list(sc.codecs)
        if (
            str(getattr(sc.index_location, "value", sc.index_location)) != "end"
            or len(inner) not in (1, 2)
            or not isinstance(inner[0], BytesCodec)
            or (len(inner) == 2 and not isinstance(inner[1], BloscCodec))
            or array.ndim < 1
            or tuple(sc.chunk_shape[1:]) != tuple(array.shape[1:])
            or tuple(array.shards[1:]) != tuple(array.shape[1:])
            or (array.dtype.itemsize > 1 and str(getattr(inner[0].endian, "value", "")) != "little")
            or array.dtype.kind not in "biuf"
        ):
            return array
        d = DirectArray(array, folder, len(inner) == 2)
        d.blosc_args = _blosc_args(inner[1]) if len(inner) == 2 else None
        d.writable = _index_writable(sc) and (len(inner) == 1 or d.blosc_args is not None)
        return d
    except Exception:  # noqa: BLE001 - anything unexpected in zarr's metadata: zarr reads it
        return array


def array_folder(array: Any) -> str | None:
    """The folder of a zarr array in a local store; None for any other store."""
    from zarr.storage import LocalStore

    store = array.store_path.store
    return os.path.join(str(store.root), array.store_path.path) if isinstance(store, LocalStore) else None


def shard_files(array: Any, start: int, stop: int) -> list[str]:
    """The files that hold rows [start, stop) of a zarr array in a local store (its shards, or its chunks when
    unsharded); [] for any other store."""
    folder = array_folder(array)
    if folder is None or stop <= start:
        return []
    outer = tuple(int(c) for c in array.metadata.chunk_grid.chunk_shape)
    rest = [range(-(-int(n) // c)) for n, c in zip(array.shape[1:], outer[1:], strict=True)]
    return [
        os.path.join(folder, array.metadata.encode_chunk_key((s, *at)))
        for s in range(start // outer[0], -(-stop // outer[0]))
        for at in itertools.product(*rest)
    ]


def _blosc_args(codec: Any) -> tuple | None:
    """numcodecs.blosc.compress's arguments for zarr's BloscCodec (what it passes itself), or None."""
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}.get(str(getattr(codec.shuffle, "value", "")))
    cname = str(getattr(codec.cname, "value", ""))
    if shuffle is None or not cname or codec.typesize is None:
        return None
    return cname.encode(), int(codec.clevel), shuffle, int(codec.blocksize), int(codec.typesize)


def _index_writable(sc: Any) -> bool:
    """Whether the shard index is encoded as this module writes it: little-endian uint64, then crc32c."""
    from zarr.codecs import BytesCodec, Crc32cCodec

    ic = list(sc.index_codecs)
    return (
        len(ic) == 2
        and isinstance(ic[0], BytesCodec)
        and str(getattr(ic[0].endian, "value", "")) == "little"
        and isinstance(ic[1], Crc32cCodec)
    )


class DirectArray:
    """A sharded zarr array whose whole-inner-chunk row slices are read from the shard files directly, and
    whose whole shards an image unit writes directly (``write_rows``)."""

    blosc_args: tuple | None = None
    writable = False

    def __init__(self, array: Any, folder: str, blosc: bool = True):
        self.array, self.folder, self.blosc = array, folder, blosc
        self.shape, self.dtype, self.path = array.shape, array.dtype, array.path
        self.chunk_rows = int(array.chunks[0])
        self.shard_rows = int(array.shards[0])
        self.per_shard = self.shard_rows // self.chunk_rows
        self.chunk_shape = (self.chunk_rows, *array.shape[1:])
        self.fill = np.asarray(array.fill_value, dtype=array.dtype)
        self.dt = self.dtype.newbyteorder("<")
        self.row_bytes = int(np.prod(self.chunk_shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._index: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.array, name)

    def __getitem__(self, sel: Any) -> np.ndarray:
        if isinstance(sel, slice) and sel.step in (None, 1):
            lo, hi = sel.indices(self.shape[0])[:2]
            cr = self.chunk_rows
            if hi > lo and lo % cr == 0 and (hi % cr == 0 or hi == self.shape[0]):
                try:
                    return self._rows(lo, hi)
                except _Unreadable:
                    pass  # zarr reads it, and says what is wrong with it
        return self.array[sel]

    def get_orthogonal_selection(self, sel: Any) -> np.ndarray:
        return self.array.get_orthogonal_selection(sel)

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        cr = self.chunk_rows
        parts = [self._chunk(c) for c in range(lo // cr, -(-hi // cr))]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out[: hi - lo]

    def _shard_index(self, s: int, f: Any) -> np.ndarray:
        with self._lock:
            idx = self._index.get(s)
        if idx is None:
            n = 16 * self.per_shard + 4  # (offset, nbytes) per inner chunk, then the index's crc32c
            size = os.fstat(f.fileno()).st_size
            if size < n:
                raise _Unreadable
            raw = _read(f, n, size - n)
            if np.uint32(google_crc32c.value(raw[:-4])).tobytes() != raw[-4:]:  # as zarr checks the index
                raise _Unreadable
            idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.per_shard, 2)
            with self._lock:
                self._index[s] = idx
        return idx

    def _shard_key(self, c: int) -> tuple[int, int, str]:
        s, j = divmod(c, self.per_shard)
        return (
            s,
            j,
            os.path.join(
                self.folder, self.array.metadata.encode_chunk_key((s, *([0] * (len(self.shape) - 1))))
            ),
        )

    def _chunk(self, c: int) -> np.ndarray:
        s, j, path = self._shard_key(c)
        try:
            with open(path, "rb") as f:
                off, n = (int(v) for v in self._shard_index(s, f)[j])
                if off == _EMPTY and n == _EMPTY:
                    return np.full(self.chunk_shape, self.fill, dtype=self.dtype)
                raw = _read(f, n, off)
        except FileNotFoundError:
            raise _Unreadable from None  # a shard never written (all fill value): zarr's to say
        if len(raw) != n:
            raise _Unreadable
        try:
            data = numcodecs.blosc.decompress(raw) if self.blosc else raw
        except Exception:  # noqa: BLE001 - undecodable bytes: zarr raises its own error for them
            raise _Unreadable from None
        a = np.frombuffer(data, dtype=self.dt)
        if a.size != int(np.prod(self.chunk_shape)):
            raise _Unreadable
        return a.reshape(self.chunk_shape).astype(self.dtype, copy=False)

    def rows_into(self, c: int, rows: list[int], out: np.ndarray, positions: list[int]) -> bool:
        """``out[positions] = chunk c[rows]`` read from the shard file straight into ``out`` (uncompressed
        chunks only: a row is a contiguous run of bytes). False, with nothing promised about ``out``, when
        this chunk is not one it can read so (compressed, not stored, a short or damaged shard): the caller
        reads it whole instead, which goes to zarr where this module cannot."""
        if self.blosc or self.dt != self.dtype:
            return False
        s, j, path = self._shard_key(c)
        rb = self.row_bytes
        try:
            with open(path, "rb") as f:
                off, n = (int(v) for v in self._shard_index(s, f)[j])
                if off == _EMPTY or n != rb * self.chunk_rows:
                    return False
                for i, r in zip(positions, rows, strict=True):
                    dst = out[i : i + 1].reshape(-1).view(np.uint8)  # a view even of a 1-d array
                    if _read_into(f, dst, off + r * rb) != rb:
                        return False
        except (FileNotFoundError, _Unreadable):
            return False
        return True

    def rows_into_crc(
        self, c: int, rows: list[int], out: np.ndarray, positions: list[int], n_rows: int
    ) -> int | None:
        """``rows_into``, and the crc32 of the chunk's first ``n_rows`` rows in row order, hashed as each row
        lands (in cache, one pass over the bytes): rows the batch does not ask for are read into a scratch
        row. None, with nothing promised about ``out``, where ``rows_into`` would say False."""
        if self.blosc or self.dt != self.dtype:
            return None
        s, j, path = self._shard_key(c)
        rb = self.row_bytes
        where: dict[int, list[int]] = {}
        for i, r in zip(positions, rows, strict=True):
            where.setdefault(r, []).append(i)
        scratch = None
        crc = 0
        try:
            with open(path, "rb") as f:
                off, n = (int(v) for v in self._shard_index(s, f)[j])
                if off == _EMPTY or n != rb * self.chunk_rows or n_rows > self.chunk_rows:
                    return None
                for r in range(n_rows):
                    at = where.get(r)
                    if at:
                        dst = out[at[0] : at[0] + 1].reshape(-1).view(np.uint8)
                    else:
                        if scratch is None:
                            scratch = np.empty(rb, np.uint8)
                        dst = scratch
                    if _read_into(f, dst, off + r * rb) != rb:
                        return None
                    crc = crc32_update(dst, crc)
                    for i in at[1:] if at else ():
                        out[i] = out[at[0]]
        except (FileNotFoundError, _Unreadable):
            return None
        return crc

    def write_rows(self, start: int, a: np.ndarray) -> list[int] | None:
        """Rows [start, start + len(a)) written as whole shard files, past zarr: each inner chunk encoded as
        zarr encodes it (raw bytes, or Blosc with the array's own settings), the chunks and the index (with
        its crc32c) written beside the shard and renamed into place, as zarr's local store does. The bytes
        equal zarr's (tests compare them). Returns the crc32 of each inner chunk's rows (the padding of the
        array's last chunk excluded), hashed just before the chunk is encoded and written, while its bytes
        are in cache; None, with nothing written, when the rows are not whole shards or the array is not one
        this module writes: the caller writes through zarr."""
        n, sr = len(a), self.shard_rows
        if (
            not self.writable
            or n == 0
            or start % sr
            or (n % sr and start + n != self.shape[0])
            or start + n > self.shape[0]
            or tuple(a.shape[1:]) != tuple(self.shape[1:])
            or a.dtype != self.dtype
        ):
            return None
        a = np.ascontiguousarray(a)
        crcs: list[int] = []
        for lo in range(0, n, sr):
            crcs += self._write_shard((start + lo) // sr, a[lo : lo + sr])
        return crcs

    def _encode(self, part: np.ndarray) -> Any:
        if len(part) < self.chunk_rows:  # the array's last chunk: padded with the fill value, as zarr does
            full = np.full(self.chunk_shape, self.fill, dtype=self.dtype)
            full[: len(part)] = part
            part = full
        raw = part.reshape(-1).view(np.uint8)
        if self.blosc_args is None:
            return memoryview(raw)  # no copy: the unit's buffer itself goes to the file
        cname, clevel, shuffle, blocksize, typesize = self.blosc_args
        return numcodecs.blosc.compress(raw, cname, clevel, shuffle, blocksize, typesize)

    def _write_shard(self, s: int, rows: np.ndarray) -> list[int]:
        cr = self.chunk_rows
        index = np.full((self.per_shard, 2), _EMPTY, dtype="<u8")  # chunks past the array's end: not stored
        crcs, off = [], 0
        _, _, path = self._shard_key(s * self.per_shard)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"

        def put(fd: int, buf: Any) -> None:
            view = memoryview(buf).cast("B")
            while len(view):
                view = view[os.write(fd, view) :]

        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                for j in range(min(self.per_shard, -(-len(rows) // cr))):
                    part = rows[j * cr : (j + 1) * cr]
                    crcs.append(crc32_update(part.reshape(-1).view(np.uint8)))
                    buf = self._encode(part)
                    index[j] = (off, len(buf))
                    put(fd, buf)
                    off += len(buf)
                idx = index.tobytes()
                put(fd, idx)
                put(fd, np.uint32(google_crc32c.value(idx)).tobytes())
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with self._lock:
            self._index.pop(s, None)  # a reader in this process must not keep the old shard's index
        return crcs


class _Unreadable(Exception):
    """This read is left to zarr."""


class DirectGroup:
    """The store's group whose arrays are ``direct_array``s (opened once each)."""

    def __init__(self, group: Any):
        self.group = group
        self._arrays: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        a = self._arrays.get(name)
        if a is None:
            a = self.group[name]
            if hasattr(a, "metadata") and hasattr(a, "shards"):
                a = direct_array(a)
            self._arrays[name] = a
        return a

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)
