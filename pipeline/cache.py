"""The teacher cache: one Zarr v3 store holding the frozen teacher's outputs for every unique image and text.

Layout (method §1; N = unique images, M = unique texts, P patch tokens, E joint width, K views)::

    <store>/zarr.json            attrs: format, format_version, package_version, teacher (describe()), embed_dim,
                                 num_patches, grid, context_length, logit_scale, dtype, codec, views,
                                 relevance_tokens, units, data, fingerprint, complete, extract (metrics of the
                                 last run that computed a unit; a run that computes nothing leaves the store
                                 byte-identical)
    image/ids        [N]          str      image id used by the data shards (row order = data-shard order)
    image/alias_ids  [A]          str      ids whose bytes equal an earlier image (deduplicated by SHA-1) ...
    image/alias_rows [A]          int64    ... and the row they share
    image/tokens     [N, P, E]    float16 | int8   last-layer patch tokens in the joint space (no CLS)
    image/tokens_scale [N, P]     float16  int8 stores only: per-token scale (x ≈ q * scale)
    image/pooled     [N, E]       float16  encode_image output, unnormalised
    image/valid      [N]          uint8    0 = the image could not be decoded (rows zero-filled, on_error=skip)
    image/<src>_tokens [N, P, E]  relevance-scoring token sources (e.g. value_tokens, MaskCLIP-style), optional
    views/tokens     [N, K, P, E] optional: K views per image; view 0 is the deterministic eval transform
    views/pooled     [N, K, E]
    views/boxes      [N, K, 4]    float32  crop box (x0, y0, x1, y1), normalised to the original image
    views/flip       [N, K]       uint8    1 = horizontally flipped after cropping
    text/ids         [M]          str      text_hash(text)
    text/lengths     [M]          int32    L_i = EOT index + 1 (SOT … EOT inclusive)
    text/offsets     [M + 1]      int64    text i = text/tokens[offsets[i] : offsets[i] + lengths[i]]
    text/tokens      [ΣS, E]      float16 | int8   ragged token states, no per-text padding
    text/pooled      [M, E]       float16
    manifest/<unit>.json                   one JSON per committed work unit (see ``commit_unit``)

Work units and shards. Every large array is written through zarr's sharding codec and one work unit writes
whole shards that no other unit touches (zarr loses data when two writers share a shard). Image unit u owns
rows [u·R, (u+1)·R) with R = ``image_rows_per_unit``, a whole number of image shards of R_s =
``image_rows_per_shard`` rows: a unit writes each of its shards as soon as its rows are computed, behind the
teacher's next batches, and commits once all are written (see ``pipeline.extract``). Text unit t owns texts
[t·R_t, (t+1)·R_t); because texts are ragged, its token rows start on a shard boundary of ``text/tokens``:
every text unit owns exactly one shard of S rows, S = the largest unit's ΣL rounded up to whole inner chunks.
The S − ΣL slack rows at the end of a unit's shard are written as zeros (= the fill value), and zarr's
``write_empty_chunks=False`` (the default, honoured for the inner chunks of a shard) leaves inner chunks that
are entirely slack out of the shard, so slack costs at most one partly-filled inner chunk on disk. This is
why ``offsets[i + 1] - offsets[i]`` equals ``lengths[i]`` except for the last text of each unit: always read
``offsets[i] : offsets[i] + lengths[i]``; ``offsets[M]`` is the length of ``text/tokens``.

ids, lengths and offsets are written by the coordinator before any unit runs (tokenising is cheap), so a
unit only writes its own token/pooled shards and then its manifest entry.

Encoding. Token arrays are float16 (default) or int8 with a float16 scale per token (``<name>_scale``);
pooled vectors, boxes and masks are never quantised (they are 1/P of the bytes and feed the confidence
weights). Blosc zstd (or lz4, or none) with byte shuffle. Inner chunks hold ≈ ``target_chunk_bytes`` (text
arrays: ``text_chunk_bytes``, smaller, as texts are read a few scattered rows at a time): a random
single-row read decodes one whole inner chunk, so readers should ask for whole batches (the reader
sorts and deduplicates a batch's rows so each touched chunk is decoded once).

Views. ``views/`` repeats view 0 (identical to ``image/``) so that a student can draw a view index in
[0, K) and read one array; the duplication costs 1/K of the views group.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import json
import math
import os
import uuid
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

FORMAT = "clip-td-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest"
# The single-writer lock (pipeline.lock) lives inside the store; removing or recreating a store keeps it.
LOCK_FILE = ".lock"
# A replaced store is renamed to <store>.tmp-old-<random> and then deleted (``replace_store``).
TRASH_INFIX = ".tmp-old-"
SCALE_SUFFIX = "_scale"
# Every relevance source the teacher can return besides the last-layer tokens (method §3).
RELEVANCE_SOURCES = ("value", "intermediate")


class StaleCacheError(RuntimeError):
    """A store was built from a different teacher, data or layout than the one asked for."""

    def __init__(self, url: str, fields: list[str], detail: str = ""):
        self.url, self.fields = url, list(fields)
        hint = detail or "rerun extraction with --overwrite to rebuild it"
        super().__init__(f"teacher cache {url} is stale: differing fields: {', '.join(fields)}; {hint}")

    def __reduce__(self) -> tuple:  # picklable across dask workers despite the custom __init__
        return (type(self), (self.url, self.fields))


class CacheFormatError(RuntimeError):
    """The path is not a (complete) teacher cache this code can read."""


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("clip-td")
    except Exception:  # running from a source tree without an installed distribution
        return "0+unknown"


# ----------------------------------------------------------------------------------------------- store access


def _split_url(url: str) -> tuple[str, dict]:
    """A zarr store argument for a path or fsspec URL. Local paths and file:// go to zarr's LocalStore (plain
    files, atomic renames); other protocols go through fsspec."""
    if url.startswith("file://"):
        return url[len("file://") :], {}
    return url, {}


def open_group(url: str, mode: str = "r", attributes: dict | None = None) -> zarr.Group:
    """The store's root group. ``attributes`` are written with a group that ``mode`` creates, in the same write
    as its zarr.json: a store is recognisable as ours from its first file on."""
    store, opts = _split_url(url)
    if "://" in store:
        return zarr.open_group(store, mode=mode, storage_options=opts or None, attributes=attributes)
    return zarr.open_group(store, mode=mode, attributes=attributes)


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def is_local(url: str) -> bool:
    """A local path or file:// URL (directory renames are atomic there; on object stores they are copies)."""
    return isinstance(_fs(url)[0], fsspec.implementations.local.LocalFileSystem)


def local_path(url: str) -> str | None:
    """The filesystem path of a local store, None for any other fsspec URL."""
    return _fs(url)[1] if is_local(url) else None


def store_exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(f"{path}/zarr.json")


def _name(p: str) -> str:
    return p.rstrip("/").rsplit("/", 1)[-1]


def _lock_artifact(name: str) -> bool:
    """Files ``pipeline.lock`` leaves in a store folder: the lock, its private temporary files and locks moved
    aside as stale. They are the writer's, never a user's: a folder holding only these counts as empty."""
    return name == LOCK_FILE or name.startswith(LOCK_FILE + ".")


def read_store_attrs(url: str) -> dict | None:
    """The root group's attributes, None when the location has no root zarr.json. A zarr.json that cannot be
    parsed raises CacheFormatError naming the file (a truncated write, a foreign file)."""
    fs, path = _fs(url)
    where = f"{url.rstrip('/')}/zarr.json"
    try:
        raw = fs.cat_file(f"{path}/zarr.json")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CacheFormatError(
            f"{where}: not valid JSON ({e}): the store's root metadata is damaged"
        ) from None
    if not isinstance(doc, dict) or doc.get("node_type") != "group" or doc.get("zarr_format") != 3:
        raise CacheFormatError(f"{where}: not the metadata of a zarr v3 group, so not a teacher cache")
    attrs = doc.get("attributes", {})
    if not isinstance(attrs, dict):
        raise CacheFormatError(
            f"{where}: 'attributes' is not an object: the store's root metadata is damaged"
        )
    return attrs


def check_metadata(url: str) -> None:
    """Raise CacheFormatError naming the first group or array zarr.json below the root that is not valid JSON
    (zarr would fail on it mid-run with a bare JSON error): a store is checked before a run resumes it."""
    fs, path = _fs(url)
    for p in sorted(fs.glob(f"{path}/*/zarr.json") + fs.glob(f"{path}/*/*/zarr.json")):
        try:
            json.loads(fs.cat_file(p))
        except (UnicodeDecodeError, ValueError) as e:
            where = f"{url.rstrip('/')}/{p[len(path) + 1 :]}" if p.startswith(path + "/") else p
            raise CacheFormatError(
                f"{where}: not valid JSON ({e}): the store's metadata is damaged"
            ) from None


def inspect_location(url: str) -> tuple[str, dict, str]:
    """(kind, attrs, why) of what is at a store location before anything is written there. kind: "absent";
    "empty" (a folder holding nothing, or only a writer's lock files); "cache" (a teacher cache of any
    version, complete or not: its root attrs name our format); "foreign" (anything else, ``why`` says what).
    Only a "cache" may ever be deleted or replaced (``remove_store``)."""
    fs, path = _fs(url)
    if not fs.exists(path):
        return "absent", {}, ""
    if not fs.isdir(path):
        return "foreign", {}, "is a file, not a folder"
    names = [_name(p) for p in fs.ls(path, detail=False)]
    if all(_lock_artifact(n) for n in names):
        return "empty", {}, ""
    attrs = read_store_attrs(url)
    if attrs is None:
        shown = ", ".join(sorted(names)[:3]) + (", …" if len(names) > 3 else "")
        return "foreign", {}, f"is a folder holding {len(names)} entries ({shown}) and no zarr.json"
    if attrs.get("format") != FORMAT:
        return (
            "foreign",
            attrs,
            f"holds a zarr group whose attrs name format {attrs.get('format')!r}, not {FORMAT!r}",
        )
    return "cache", attrs, ""


def foreign_message(url: str, why: str) -> str:
    return (
        f"{url} {why}: not a clip-td teacher cache, so it is neither written into nor replaced (not even with "
        "--overwrite or --rebuild-stale); nothing there was changed: choose a new or empty folder"
    )


def remove_store(url: str, keep_lock: bool = True) -> None:
    """Delete a teacher cache, and only that: anything not recognisable as one (``inspect_location``) raises
    CacheFormatError and is left as it is; an empty folder is left too. ``keep_lock`` keeps the writer's lock
    files (``pipeline.lock``), so that rebuilding a store under its lock never opens a window for a second
    writer. The root zarr.json goes last: a removal cut short leaves a folder still recognisable as a store,
    which a later run may remove again, instead of anonymous leftovers it must refuse."""
    kind, _, why = inspect_location(url)
    if kind in ("absent", "empty"):
        return
    if kind != "cache":
        raise CacheFormatError(foreign_message(url, why))
    fs, path = _fs(url)
    kept = False
    for p in fs.ls(path, detail=False):
        n = _name(p)
        if keep_lock and _lock_artifact(n):
            kept = True
        elif n != "zarr.json":
            fs.rm(p, recursive=True)
    fs.rm_file(f"{path}/zarr.json")
    if not kept:
        fs.rm(path, recursive=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the C library, the
    kernel or the filesystem does not offer it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def replace_store(new_url: str, url: str) -> None:
    """Put the complete store built at ``new_url`` (a sibling folder) in the place of the teacher cache at
    ``url`` (or of nothing: an empty folder, no folder), then delete the old one. Local stores only: both folders swap in one atomic rename where the
    kernel offers it (else two renames, microseconds apart), so a reader or a killed run sees the old store
    or the new one, never a mix. The lock file at ``url`` is linked into the new store first, so the store at
    ``url`` is never without its writer's lock."""
    new, path = local_path(new_url), local_path(url)
    if new is None or path is None:
        raise ValueError(f"replace_store: {new_url} and {url} must be local stores")
    kind, _, why = inspect_location(url)
    if kind == "foreign":
        raise CacheFormatError(foreign_message(url, why))
    if kind == "absent":
        os.rename(new, path)
        return
    lock = os.path.join(path, LOCK_FILE)
    if os.path.exists(lock):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(new, LOCK_FILE))
        os.link(lock, os.path.join(new, LOCK_FILE))
    # An old store whose deletion an earlier run did not finish: ours by its name and its zarr.json (which
    # remove_store deletes last), so it goes now.
    for old in sorted(glob.glob(glob.escape(path) + TRASH_INFIX + "*")):
        if inspect_location(old)[0] == "cache":
            remove_store(old, keep_lock=False)
    trash = f"{path}{TRASH_INFIX}{uuid.uuid4().hex[:12]}"
    if _exchange(new, path):
        os.rename(new, trash)
    else:
        os.rename(path, trash)
        try:
            os.rename(new, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(trash, path)  # the old store back in its place
            raise
    if kind == "cache":
        remove_store(trash, keep_lock=False)
    else:  # the folder held only the writer's lock files (a store whose swap was cut short)
        for n in os.listdir(trash):
            os.unlink(os.path.join(trash, n))
        os.rmdir(trash)


def bytes_on_disk(url: str) -> int:
    fs, path = _fs(url)
    return int(fs.du(path, total=True)) if fs.exists(path) else 0


# -------------------------------------------------------------------------------------------------- manifest


def commit_unit(url: str, name: str, record: dict) -> None:
    """Publish one unit's manifest entry. Readers must never see half a file: a local store writes a temporary
    file and renames it (atomic on POSIX); object stores make a single PUT visible all at once."""
    fs, path = _fs(url)
    data = json.dumps(record, indent=1, sort_keys=True).encode()
    target = f"{path}/{MANIFEST}/{name}.json"
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    else:
        fs.pipe_file(target, data)


def _manifest_problem(rec: Any) -> str:
    """Why a parsed manifest entry cannot be one ("" when it can): a JSON object whose ``arrays``, if any, maps
    array names to objects (each region's fields are checked where they are used, by ``verify``)."""
    if not isinstance(rec, dict):
        return f"not a manifest entry (expected a JSON object, got {type(rec).__name__})"
    arrays = rec.get("arrays", {})
    if not isinstance(arrays, dict) or not all(isinstance(v, dict) for v in arrays.values()):
        return "not a manifest entry ('arrays' must map array names to objects)"
    return ""


def read_manifest(url: str) -> tuple[dict[str, dict], dict[str, str]]:
    """(manifest entries by unit name, {unit name: why} for entries that cannot be read, each naming its file).
    Temporary files of an interrupted commit are ignored."""
    fs, path = _fs(url)
    folder = f"{path}/{MANIFEST}"
    if not fs.exists(folder):
        return {}, {}
    out, bad = {}, {}
    for p in fs.ls(folder, detail=False):
        base = _name(p)
        if not base.endswith(".json") or base == "zarr.json":
            continue
        name, where = base[: -len(".json")], f"{url.rstrip('/')}/{MANIFEST}/{base}"
        try:
            rec = json.loads(fs.cat_file(p))
        except (UnicodeDecodeError, ValueError) as e:
            bad[name] = f"{where}: not valid JSON ({e})"
            continue
        problem = _manifest_problem(rec)
        if problem:
            bad[name] = f"{where}: {problem}"
        else:
            out[name] = rec
    return out, bad


def committed_units(url: str) -> dict[str, dict]:
    """Manifest entries by unit name. An entry that cannot be read raises CacheFormatError naming its file: a
    commit is atomic, so such a file was damaged after it was written, and the unit is not silently redone."""
    out, bad = read_manifest(url)
    if bad:
        name = min(bad)
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CacheFormatError(
            f"{bad[name]}{more}: a damaged manifest entry; check the store (python -m stages.verify_cache), "
            f"then delete that file and rerun extraction to recompute unit {name}"
        )
    return out


def checksum(a: np.ndarray) -> str:
    """crc32 of the array's bytes as stored (C order, store dtype)."""
    return f"{crc32(a):08x}"


def crc32(a: np.ndarray) -> int:
    """``checksum`` as an int, to chain over row blocks with ``crc32_combine``."""
    # A flat uint8 view, not tobytes(): the copy took two thirds of the time on a unit's 100 MB of tokens.
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)) & 0xFFFFFFFF


def _gf2_times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The operator ``a ∘ b`` (apply b, then a)."""
    return tuple(_gf2_times(a, col) for col in b)


@functools.lru_cache(maxsize=64)
def _crc32_shift(n_bytes: int) -> tuple[int, ...]:
    """The GF(2) operator that appends n_bytes zero bytes to a crc32 register (zlib's crc32_combine method,
    composed once per length and cached: a unit's full shards all have the same length)."""
    op = (0xEDB88320, *(1 << k for k in range(31)))  # one zero bit
    for _ in range(3):
        op = _gf2_compose(op, op)  # one zero byte
    acc = tuple(1 << k for k in range(32))  # identity
    while n_bytes:
        if n_bytes & 1:
            acc = _gf2_compose(op, acc)
        n_bytes >>= 1
        if n_bytes:
            op = _gf2_compose(op, op)
    return acc


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A + B from crc32(A), crc32(B) and len(B) in bytes (zlib has it in C, Python's zlib does not
    expose it): a unit's shards are checksummed by whichever writer thread writes them, and the unit's record
    keeps one crc per array over its rows in order, as ``verify`` recomputes it."""
    return (_gf2_times(_crc32_shift(len2), crc1) ^ crc2) if len2 > 0 else crc1


# ----------------------------------------------------------------------------------------------- fingerprint


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def teacher_fingerprint(describe: dict, weights_sha256: str = "") -> dict:
    """The teacher fields that change the cached numbers, from ``Teacher.describe()``. Paths, devices and
    library versions are left out (moving a checkpoint does not change its outputs; its checksum does); the
    model config and preprocessing enter as hashes to keep the fingerprint small. ``weights_sha256`` is the
    hash of a randomly initialised teacher's weights, which no checkpoint checksum covers."""
    keep = (
        "model",
        "pretrained_kind",
        "pretrained_checksum",
        "precision",
        "embed_dim",
        "num_patches",
        "grid",
    )
    fp = {k: describe.get(k) for k in keep}
    fp["config_sha256"] = _sha(describe.get("model_config"))
    fp["preprocess_sha256"] = _sha(describe.get("preprocess"))
    if weights_sha256:
        fp["weights_sha256"] = weights_sha256
    return fp


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_fingerprint(store_attrs: dict, expected: dict) -> list[str]:
    """Dotted names of the fields of ``expected`` whose value differs in the store (missing counts as differing).
    ``store_attrs`` may be the store's attrs (holding ``fingerprint``) or a fingerprint dict; ``expected`` may be
    partial (a student that only cares about the data passes just ``{"data": ...}``)."""
    have = store_attrs.get("fingerprint", store_attrs) if isinstance(store_attrs, dict) else {}
    flat_have, flat_want = flatten(have), flatten(expected)
    # JSON round trips turn tuples into lists; compare the JSON forms.
    return sorted(
        k
        for k, v in flat_want.items()
        if k not in flat_have or json.dumps(flat_have[k], default=str) != json.dumps(v, default=str)
    )


# ---------------------------------------------------------------------------------------------- quantisation


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token symmetric int8: q = round(x / s), s = max|x| / 127 over the last axis, s stored as float16.
    The rounding uses the float16 scale actually stored, so dequantisation sees no second rounding error."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint(np.divide(x, s, out=np.zeros_like(x), where=s > 0)), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


def encode_tokens(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Token states (float32, last axis E) in the store's encoding: {"": values} plus {"_scale": scale} for int8."""
    if dtype == "int8":
        q, s = quantize_int8(x)
        return {"": q, SCALE_SUFFIX: s}
    return {"": np.asarray(x).astype(np.float16)}


def decode_tokens(values: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    if values.dtype == np.int8:
        return dequantize_int8(values, scale)
    return values.astype(np.float32)


def reconstruction_cosine(x: np.ndarray, encoded: dict[str, np.ndarray]) -> np.ndarray:
    """Per-token cosine between the float32 teacher output and what the store gives back (all-zero tokens,
    e.g. zero-filled invalid images, are left out)."""
    y = decode_tokens(encoded[""], encoded.get(SCALE_SUFFIX))
    x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    ok = (nx > 0) & (ny > 0)
    return (x[ok] * y[ok]).sum(1) / (nx[ok] * ny[ok])


# -------------------------------------------------------------------------------------------------- creation


@dataclass
class StoreLayout:
    """Everything that fixes array shapes, chunking and unit boundaries."""

    n_images: int
    n_texts: int
    embed_dim: int
    num_patches: int
    views: int = 0
    relevance_tokens: list[str] = field(default_factory=list)
    dtype: str = "float16"
    compressor: str = "zstd"
    clevel: int = 3
    image_rows_per_unit: int = 512
    text_rows_per_unit: int = 4096
    target_chunk_bytes: int = 1 << 20
    image_rows_per_shard: int = 0  # divides image_rows_per_unit; 0 = one shard per unit (stores before it)
    text_chunk_bytes: int = 1 << 15
    text_shard_rows: int = 1  # S: token rows owned by one text unit (set by ``text_token_layout``)
    text_chunk_rows: int = 1

    @property
    def n_image_units(self) -> int:
        return math.ceil(self.n_images / self.image_rows_per_unit)

    @property
    def n_text_units(self) -> int:
        return math.ceil(self.n_texts / self.text_rows_per_unit)

    @property
    def token_itemsize(self) -> int:
        return 1 if self.dtype == "int8" else 2

    def token_dtype(self) -> str:
        return "int8" if self.dtype == "int8" else "float16"

    @property
    def image_shard_rows(self) -> int:
        return self.image_rows_per_shard or self.image_rows_per_unit

    def image_chunk_rows(self, row_bytes: int) -> int:
        return chunk_rows_for(self.image_shard_rows, row_bytes, self.target_chunk_bytes)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def chunk_rows_for(shard_rows: int, row_bytes: int, target_bytes: int) -> int:
    """Inner chunk rows: the smallest divisor of the shard's rows whose chunk reaches target_bytes (zarr needs
    chunks to tile a shard exactly), or the whole shard when even the shard is smaller than the target."""
    want = max(1, math.ceil(target_bytes / max(1, row_bytes)))
    if want >= shard_rows:
        return shard_rows
    return next(d for d in range(want, shard_rows + 1) if shard_rows % d == 0)


def text_token_layout(lengths: Sequence[int], rows_per_unit: int, row_bytes: int, target_bytes: int) -> tuple:
    """(offsets [M+1], shard rows S, chunk rows c). Each text unit's tokens start at unit·S, S = the largest
    unit's token count rounded up to whole inner chunks of ≈ target_bytes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    m = len(lengths)
    n_units = max(1, math.ceil(m / rows_per_unit))
    per_unit = [int(lengths[u * rows_per_unit : (u + 1) * rows_per_unit].sum()) for u in range(n_units)]
    most = max(1, max(per_unit))
    c = min(most, max(1, math.ceil(target_bytes / max(1, row_bytes))))
    s = math.ceil(most / c) * c
    offsets = np.zeros(m + 1, dtype=np.int64)
    for u in range(n_units):
        lo, hi = u * rows_per_unit, min(m, (u + 1) * rows_per_unit)
        if hi > lo:
            offsets[lo:hi] = u * s + np.cumsum(lengths[lo:hi]) - lengths[lo:hi]
    offsets[m] = n_units * s if m else 0
    return offsets, s, c


def compressors_for(compressor: str, clevel: int, itemsize: int) -> list:
    if compressor == "none":
        return []
    # Byte shuffle groups the high and low bytes of float16 values, which is what makes zstd/lz4 pay off.
    return [BloscCodec(cname=compressor, clevel=clevel, shuffle="shuffle", typesize=itemsize)]


def token_sources(layout: StoreLayout) -> list[str]:
    """Array names of the token sources: "tokens" plus "<src>_tokens" per relevance source."""
    return ["tokens", *(f"{s}_tokens" for s in layout.relevance_tokens)]


def create_store(
    url: str,
    layout: StoreLayout,
    attrs: dict,
    image_ids: Sequence[str],
    text_ids: Sequence[str],
    text_lengths: Sequence[int],
    text_offsets: np.ndarray,
    alias_ids: Sequence[str] = (),
    alias_rows: Sequence[int] = (),
) -> zarr.Group:
    """Create every group and array, and write what the coordinator knows up front (ids, lengths, offsets,
    attrs). Units fill the rest. Metadata is only ever written here, by one process."""
    # Only ever in a new or empty folder: whatever else is there was not made by this call and is not deleted
    # (the caller removes a store it has recognised as ours first).
    kind, _, why = inspect_location(url)
    if kind == "foreign":
        raise CacheFormatError(foreign_message(url, why))
    if kind == "cache":
        raise CacheFormatError(f"{url}: a teacher cache is already there; remove it first (remove_store)")
    g = open_group(
        url, mode="a", attributes={"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False}
    )
    n, m, p, e, k = layout.n_images, layout.n_texts, layout.num_patches, layout.embed_dim, layout.views
    r, rt = max(1, layout.image_shard_rows), max(1, layout.text_rows_per_unit)
    tdt, isz = layout.token_dtype(), layout.token_itemsize
    comp = compressors_for(layout.compressor, layout.clevel, isz)
    comp16 = compressors_for(layout.compressor, layout.clevel, 2)

    def arr(
        name: str, shape: tuple, dtype: str, shards: tuple | None, chunks: tuple, compressors: list
    ) -> None:
        # zarr rejects zero-length chunk sides; an empty array still gets a valid (unused) grid.
        chunks = tuple(max(1, c) for c in chunks)
        shards = tuple(max(1, s) for s in shards) if shards else None
        g.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            compressors=compressors,
            fill_value=0,
        )

    def ids(name: str, values: Sequence[str]) -> None:
        g.create_array(name, shape=(len(values),), dtype=str, chunks=(max(1, min(len(values), 1 << 16)),))
        if len(values):
            g[name][:] = np.asarray(list(values), dtype=object)

    ids("image/ids", image_ids)
    ids("image/alias_ids", alias_ids)
    g.create_array(
        "image/alias_rows", shape=(len(alias_rows),), dtype="int64", chunks=(max(1, len(alias_rows)),)
    )
    if len(alias_rows):
        g["image/alias_rows"][:] = np.asarray(alias_rows, dtype=np.int64)
    ci = layout.image_chunk_rows(p * e * isz)
    for src in token_sources(layout):
        arr(f"image/{src}", (n, p, e), tdt, (r, p, e), (ci, p, e), comp)
        if layout.dtype == "int8":
            arr(f"image/{src}{SCALE_SUFFIX}", (n, p), "float16", (r, p), (r, p), comp16)
    arr("image/pooled", (n, e), "float16", (r, e), (r, e), comp16)
    arr("image/valid", (n,), "uint8", (r,), (r,), comp16)
    if k > 0:
        cv = layout.image_chunk_rows(k * p * e * isz)
        for src in token_sources(layout):
            arr(f"views/{src}", (n, k, p, e), tdt, (r, k, p, e), (cv, k, p, e), comp)
            if layout.dtype == "int8":
                arr(f"views/{src}{SCALE_SUFFIX}", (n, k, p), "float16", (r, k, p), (r, k, p), comp16)
        arr("views/pooled", (n, k, e), "float16", (r, k, e), (r, k, e), comp16)
        arr("views/boxes", (n, k, 4), "float32", (r, k, 4), (r, k, 4), comp16)
        arr("views/flip", (n, k), "uint8", (r, k), (r, k), comp16)
    s, c = layout.text_shard_rows, layout.text_chunk_rows
    n_tok = int(text_offsets[-1]) if len(text_offsets) else 0
    ids("text/ids", text_ids)
    g.create_array("text/lengths", shape=(m,), dtype="int32", chunks=(max(1, min(m, 1 << 20)),))
    g.create_array("text/offsets", shape=(m + 1,), dtype="int64", chunks=(max(1, min(m + 1, 1 << 20)),))
    if m:
        g["text/lengths"][:] = np.asarray(text_lengths, dtype=np.int32)
        g["text/offsets"][:] = np.asarray(text_offsets, dtype=np.int64)
    arr("text/tokens", (n_tok, e), tdt, (s, e), (c, e), comp)
    if layout.dtype == "int8":
        arr(f"text/tokens{SCALE_SUFFIX}", (n_tok,), "float16", (s,), (c,), comp16)
    arr(
        "text/pooled",
        (m, e),
        "float16",
        (rt, e),
        (chunk_rows_for(rt, e * 2, layout.text_chunk_bytes), e),
        comp16,
    )
    g.create_group(MANIFEST, attributes={"what": "one JSON per committed work unit: <unit>.json"})
    g.attrs.update({**attrs, "layout": layout.to_json(), "complete": False})
    return g


# ---------------------------------------------------------------------------------------------------- views


def eval_view_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The region open_clip's eval transform keeps (resize the short side, centre crop), normalised."""
    side = min(width, height)
    x0, y0 = (width - side) / 2 / width, (height - side) / 2 / height
    return (x0, y0, 1.0 - x0, 1.0 - y0)


def sample_view_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
    """A random-resized-crop box (torchvision's sampling rule), normalised to the image."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return (x / width, y / height, (x + w) / width, (y + h) / height)
    return eval_view_box(width, height)


def view_seed(image_sha1: str, view: int) -> int:
    """A view's RNG seed from the image content, so reruns and other datasets holding the image agree."""
    return int(hashlib.sha1(f"{image_sha1}:{view}".encode()).hexdigest()[:12], 16)


def view_params_for(image_sha1: str, width: int, height: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [K, 4] (float32, normalised) and flips [K] (bool) of an image's K views by extraction's rule: view
    0 = the eval crop, view v ≥ 1 drawn from ``view_seed(image_sha1, v)``. What a store with ``--views K``
    holds in ``views/boxes`` and ``views/flip``; lets a run without a store (online teacher, no teacher) show
    its images in the same views."""
    boxes = np.zeros((k, 4), np.float32)
    flips = np.zeros(k, bool)
    if k > 0:
        boxes[0] = eval_view_box(width, height)
    for v in range(1, k):
        rng = np.random.default_rng(view_seed(image_sha1, v))
        boxes[v] = sample_view_box(rng, width, height)
        flips[v] = rng.random() < 0.5
    return boxes, flips


def apply_view(img: Any, box: Sequence[float], flip: bool, size: int) -> Any:
    """Crop a PIL image to a normalised box, resize to size×size (bicubic) and flip: the student replays a
    cached view with exactly this call followed by the teacher's ToTensor + Normalize."""
    from PIL import Image

    w, h = img.size
    px = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    out = img.crop(px).resize((size, size), Image.Resampling.BICUBIC)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


# ---------------------------------------------------------------------------------------------------- reader


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
    uniq, inverse = np.unique(rows, return_inverse=True)
    runs = _runs(uniq)
    if not runs:
        return np.zeros((0, *a.shape[1:]), dtype=a.dtype)
    if len(runs) == 1:
        block = a[runs[0][0] : runs[0][1]]
    else:
        block = a.get_orthogonal_selection((uniq,))
    return block[inverse]


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
        self._image_row = {s: i for i, s in enumerate(g["image/ids"][:].tolist())}
        for alias, row in zip(
            g["image/alias_ids"][:].tolist(), g["image/alias_rows"][:].tolist(), strict=True
        ):
            self._image_row[alias] = int(row)
        self._text_row = {s: i for i, s in enumerate(g["text/ids"][:].tolist())}
        self._lengths = g["text/lengths"][:].astype(np.int64)
        self._offsets = g["text/offsets"][:].astype(np.int64)
        self._text_row_memo: dict[str, int] = {}

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
        from .texts import text_hash

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

    def _tokens(self, group: str, src: str, rows: np.ndarray, view: np.ndarray | None = None) -> np.ndarray:
        a = self.group[f"{group}/{src}"]
        scale = self.group[f"{group}/{src}{SCALE_SUFFIX}"] if self.dtype == "int8" else None
        vals = read_rows(a, rows)
        sc = read_rows(scale, rows) if scale is not None else None
        if view is not None:  # pick each row's view after the row read (views sit inside a row's chunk)
            idx = np.arange(len(rows))
            vals = vals[idx, view]
            sc = sc[idx, view] if sc is not None else None
        return decode_tokens(vals, sc)

    def image_targets(
        self, image_ids: Sequence[str], relevance: str | None = None, views: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """``tokens`` [B,P,E], ``pooled`` [B,E], ``valid`` [B] (bool) as float32 tensors; ``relevance`` [B,P,E]
        when a relevance source is named ("last" = the tokens themselves). ``views`` (one index per id) reads the
        cached augmented views instead of view 0."""
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
        out["tokens"] = torch.from_numpy(self._tokens(group, "tokens", rows, v))
        if relevance is not None:
            if relevance == "last":
                out["relevance"] = out["tokens"]
            elif relevance in self.relevance_tokens:
                out["relevance"] = torch.from_numpy(self._tokens(group, f"{relevance}_tokens", rows, v))
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

    def text_targets(self, texts: Sequence[str], tokens: bool = True) -> dict[str, Any]:
        """``tokens``: list of [L_i, E] float32 tensors (SOT … EOT), ``pooled`` [B,E], ``lengths`` [B] (long).
        ``tokens=False`` leaves the token rows unread (no ``tokens`` key): the §5 weights need only the
        candidates' pooled embeddings."""
        rows = self.text_rows(texts)
        lengths = self._lengths[rows]
        out: dict[str, Any] = {}
        if tokens:
            uniq, inverse = np.unique(rows, return_inverse=True)
            starts, lens = self._offsets[uniq], self._lengths[uniq]
            # One token-row index for every needed position, read in one sorted pass, then cut per text.
            cuts = np.concatenate([[0], np.cumsum(lens)])
            tok_rows = np.arange(int(cuts[-1]), dtype=np.int64) + np.repeat(starts - cuts[:-1], lens)
            tok = torch.from_numpy(self._tokens("text", "tokens", tok_rows))
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
