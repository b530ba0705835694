"""Making a write survive a crash before it is published. A rename into place, or a manifest entry, says
"complete"; after a power loss or kernel crash the name can survive while the data it points at, still in the
page cache when the machine went down, does not (ext4 and XFS write data lazily). So what a commit point
publishes is flushed to disk first: the files, then the folders holding their names. Local files only: an
object store's PUT is durable when it returns."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def sync_dir(path: str | Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it)."""
    # Windows cannot open a folder (PermissionError): nothing to do there.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a folder; the files are flushed anyway
        pass
    finally:
        os.close(fd)


def sync_files(paths: Iterable[str | Path], up_to: str | Path | None = None) -> None:
    """Flush each file's data, then each folder that holds one and, with ``up_to``, every folder between it and
    ``up_to`` (included): zarr makes the folders of a chunk key (``c/7/0/0``) as it writes the file. A path
    that does not exist is skipped: a zarr shard whose every chunk holds only the fill value is never written."""
    top = os.path.abspath(up_to) if up_to is not None else None
    folders: list[str] = []
    # Windows flushes a file only through a handle that may write (its fsync is _commit); POSIX takes any.
    flags = os.O_RDWR if os.name == "nt" else os.O_RDONLY
    for p in paths:
        try:
            fd = os.open(p, flags)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        d = os.path.dirname(os.path.abspath(p))
        while d not in folders:
            folders.append(d)
            if top is None or d == top or not d.startswith(top + os.sep):
                break
            d = os.path.dirname(d)
    for d in folders:
        sync_dir(d)


def sync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` and every folder, ``root`` included (before renaming it into place)."""
    files, folders = [], []
    for here, _, names in os.walk(root):
        folders.append(here)
        files += [os.path.join(here, n) for n in names]
    sync_files(files)
    for d in reversed(folders):
        sync_dir(d)
