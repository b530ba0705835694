"""Helpers shared by the official-format converters (vqa, snli_ve, vcr).

Everything here turns bad input into a ``DataError`` that names the file and the line or key, so a converter
never has to catch a bare ``KeyError``/``JSONDecodeError`` and guess where it came from. ``InstanceSink`` is
the one path by which a converter writes: it validates the instance, stores its image once and routes every
problem through ``writer.skip`` (raise under the fail policy, record under the skip policy).
"""

from __future__ import annotations

import errno
import io
import json
import re
import stat
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import DataError
from .schema import Instance, SchemaError
from .shards import DatasetWriter

_NOT_KEY = re.compile(r"[^A-Za-z0-9_\-]")
# PIL format name -> extension stored in the image shard; the bytes are kept as they are, so the extension must
# describe what the bytes really are, not what the file happens to be called.
# MPO: a JPEG with a multi-picture segment (phone cameras write them); PIL decodes its first picture.
_PIL_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


def sanitize_key(text: str) -> str:
    """Replace every character a WebDataset key may not hold with '_' (e.g. '3416050480.jpg#4r1n')."""
    return _NOT_KEY.sub("_", text)


def load_json(path: Path) -> Any:
    """A whole JSON file; a missing or malformed file is a DataError naming the file and the position."""
    try:
        _require_regular(path)
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file", "not found") from None
    except OSError as e:
        raise DataError(path, "file", f"unreadable: {e.strerror or e}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno} col {e.colno}", f"malformed JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"byte {e.start}", "not UTF-8 text") from None
    except RecursionError:
        raise DataError(path, "file", "JSON nested too deeply to parse") from None


def _require_regular(path: Path) -> None:
    """Raise OSError unless ``path`` (after symlinks) is a regular file: reading a FIFO or a device such as
    /dev/zero named by the input would block or never end."""
    mode = path.stat().st_mode  # FileNotFoundError when missing
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file")


def iter_jsonl(path: Path, on_error: Callable[[DataError], None]) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line of a JSON-lines file.

    A bad line (not UTF-8, not JSON, not an object) goes to ``on_error`` and is not yielded, so one broken line
    costs one item under the skip policy. A missing file raises: there is no item to skip.
    """
    try:
        _require_regular(path)
    except FileNotFoundError:
        raise DataError(path, "file", "not found") from None
    except OSError as e:
        raise DataError(path, "file", f"unreadable: {e.strerror or e}") from None
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                on_error(DataError(path, f"line {lineno}", "not UTF-8 text"))
                continue
            except json.JSONDecodeError as e:
                # json's message ends "... at" before the position it would append: the column says where.
                why = e.msg.removesuffix(" at")
                on_error(DataError(path, f"line {lineno}", f"malformed JSON at col {e.colno}: {why}"))
                continue
            except RecursionError:
                on_error(DataError(path, f"line {lineno}", "JSON nested too deeply to parse"))
                continue
            if not isinstance(obj, dict):
                on_error(
                    DataError(path, f"line {lineno}", f"expected a JSON object, got {type(obj).__name__}")
                )
                continue
            yield lineno, obj


def require(obj: dict, name: str, types: type | tuple[type, ...], file: Path, where: str) -> Any:
    """``obj[name]`` checked for presence and type; bool is not accepted where int is asked for."""
    if name not in obj or obj[name] is None:
        raise DataError(file, where, f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise DataError(
            file, where, f"field {name!r}: expected {names}, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def read_image(path: Path) -> tuple[bytes, str]:
    """The file's original bytes and the extension matching their real format.

    Raises ``ValueError`` with a short reason; the caller knows which instance needed the image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        _require_regular(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError("image not found") from None
    except OSError as e:
        raise ValueError(f"image unreadable: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            # A full decode: verify() only walks the chunk structure, and for JPEG it reads no image data at
            # all, so a truncated file would pass here and fail later, at extraction. draft() lets the JPEG
            # decoder skip most of the inverse DCT; it still has to read every byte of the scan.
            if fmt == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except UnidentifiedImageError:
        # PIL's own message names the BytesIO object's address, which would make skipped.json differ per run.
        raise ValueError("image cannot be decoded: not a recognised image format") from None
    except Exception as e:  # PIL raises unrelated types (SyntaxError, OSError, struct.error...) for bad files
        raise ValueError(f"image cannot be decoded: {type(e).__name__}: {e}") from None
    ext = _PIL_EXT.get(fmt or "")
    if ext is None:
        raise ValueError(f"unsupported image format {fmt!r} (allowed {sorted(_PIL_EXT)})")
    return data, ext


class InstanceSink:
    """Writes converted instances: validate, add the image once, add the instance; bad input -> writer.skip.

    Remembers images that failed to load, so a broken image shared by many instances is read once and each of
    those instances is reported (and, under the skip policy, skipped) by name.

    With ``threads`` > 1 the images of the next instances are read and decoded on that many threads (file
    reads and PIL's decoders release the GIL) while earlier instances are written. Every write and every
    report still happens in the order the converter called ``add`` and ``skip``, so the shards and
    skipped.json are a one-thread run's, and under the fail policy the first bad item in input order is the
    one that stops the run (a few calls later than in one thread). Use it as a context manager: leaving the
    block writes what is still queued, or, on an error, drops it and stops the threads.
    """

    def __init__(self, writer: DatasetWriter, threads: int = 1):
        self.writer = writer
        self._bad_images: dict[Path, str] = {}
        self._image_paths: dict[str, Path] = {}
        self._keys: dict[str, str] = {}  # key -> where it was first seen
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="read-image") if threads > 1 else None
        # Queued calls, at most this many: enough to keep every thread a few images ahead, few enough that the
        # images read ahead (a few hundred KB each) stay small beside the writer's buffers.
        self._window = 4 * threads
        self._queue: deque[tuple[Callable[..., None], tuple]] = deque()
        self._reads: dict[Path, list] = {}  # path -> [future of read_image, queued adds that may use it]

    def __enter__(self) -> InstanceSink:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()

    def close(self) -> None:
        """Write everything still queued (under the fail policy this raises the first bad item's error)."""
        try:
            self._drain(0)
        finally:
            self._stop()

    def _stop(self) -> None:
        self._queue.clear()
        self._reads.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _drain(self, keep: int) -> None:
        while len(self._queue) > keep:
            fn, args = self._queue.popleft()
            fn(*args)

    def skip(self, err: DataError) -> None:
        if self._pool is None:
            self.writer.skip(err)
            return
        self._queue.append((self.writer.skip, (err,)))
        self._drain(self._window)

    def add(self, inst: Instance, image_path: Path, file: Path, where: str) -> None:
        """Write ``inst`` (read at ``file``/``where``) with the image at ``image_path``, or report why not."""
        if self._pool is None:
            self._add_now(inst, image_path, file, where)
            return
        entry = self._reads.get(image_path)
        if entry is None and not self.writer.has_image(inst.image_id) and image_path not in self._bad_images:
            entry = self._reads[image_path] = [self._pool.submit(read_image, image_path), 0]
        if entry is not None:
            entry[1] += 1
        self._queue.append((self._add_queued, (inst, image_path, file, where, entry is not None)))
        self._drain(self._window)

    def _add_queued(self, inst: Instance, image_path: Path, file: Path, where: str, holds_read: bool) -> None:
        try:
            self._add_now(inst, image_path, file, where)
        finally:
            entry = self._reads.get(image_path) if holds_read else None
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:  # no queued add needs these bytes any more
                    del self._reads[image_path]

    def _read(self, image_path: Path) -> tuple[bytes, str]:
        entry = self._reads.get(image_path)
        return entry[0].result() if entry is not None else read_image(image_path)

    def _add_now(self, inst: Instance, image_path: Path, file: Path, where: str) -> None:
        try:
            inst.validate()
        except SchemaError as e:
            self.writer.skip(DataError(file, where, str(e)))
            return
        if inst.key in self._keys:
            self.writer.skip(
                DataError(
                    file, where, f"duplicate instance key {inst.key!r} (first at {self._keys[inst.key]})"
                )
            )
            return
        known = self._image_paths.setdefault(inst.image_id, image_path)
        if known != image_path:
            # Sanitised ids of two different files coincide: storing either under the id would be wrong.
            self.writer.skip(
                DataError(
                    file, where, f"image id {inst.image_id!r} is used for both {known} and {image_path}"
                )
            )
            return
        if not self.writer.has_image(inst.image_id):
            reason = self._bad_images.get(image_path)
            if reason is None:
                try:
                    data, ext = self._read(image_path)
                except ValueError as e:
                    reason = self._bad_images[image_path] = str(e)
            if reason is not None:
                self.writer.skip(DataError(image_path, f"instance {inst.key} ({file.name} {where})", reason))
                return
            self.writer.add_image(inst.image_id, data, ext, inst.domain)
        self._keys[inst.key] = where
        self.writer.add_instance(inst)
