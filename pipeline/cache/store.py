"""Store locations: opening the zarr group, recognising what is at a location, and removing or replacing a
teacher cache (and only a teacher cache) safely."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import uuid

import fsspec
import zarr

from .errors import CacheFormatError
from .schema import FORMAT, LOCK_FILE, TRASH_INFIX


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("clip-td")
    except Exception:  # running from a source tree without an installed distribution
        return "0+unknown"


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
