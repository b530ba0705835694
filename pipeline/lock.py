"""One writer per teacher cache: a lock file inside the store.

Zarr loses data when two processes write the same shard, and two extractions of one store would both take
every uncommitted unit, so ``extract`` holds ``<store>/.lock`` for its whole run. The file holds the holder's
pid, host, pid namespace, process start time and wall-clock start, so a refused second writer can say who
holds the store, and a lock left by a killed writer (SIGKILL, OOM, power loss: no ``finally`` ran) can be
recognised as stale and taken over.

Local paths (and ``file://``): the lock is created with ``O_CREAT | O_EXCL``, which the kernel makes atomic,
so of two writers starting at once exactly one wins. A stale lock (same host and pid namespace, holder pid
gone, a zombie, or reused by another process) is moved aside with an atomic rename before a fresh
``O_EXCL`` create, so two processes that both found it stale cannot both take it over.

Other fsspec URLs (s3://, gs://, memory://, …) have no portable atomic create-if-absent; the lock is then
*best effort*: check, write, read back. Two writers starting within the store's write latency can both
pass. Run one extraction per store there (or use a scheduler that does). A holder on another host is never
judged stale (its pid cannot be checked from here): the message names the file to delete once it is known
to be dead.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import re
import socket
import uuid
from typing import Any

import fsspec

from .cache import LOCK_FILE
from .process import pid_namespace, proc_start, why_ended

log = logging.getLogger("clip_td.lock")


class StoreLocked(RuntimeError):
    """Another live process holds the store's lock; names the store and the holder."""

    def __init__(self, url: str, holder: dict, detail: str = ""):
        self.url, self.holder = url, dict(holder)
        who = (
            f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')} ({holder.get('purpose', '?')})"
        )
        hint = detail or (
            "wait for it to finish; if that process is dead, delete "
            f"{holder.get('lock_path', url + '/' + LOCK_FILE)} and rerun"
        )
        super().__init__(f"teacher cache {url} is locked by {who}: {hint}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.url, self.holder))


class StoreNotWritable(PermissionError):
    """The store's location cannot be written (read-only path, missing permission); names the path."""

    def __init__(self, url: str, path: str, reason: str):
        self.url, self.path, self.reason = url, path, reason
        super().__init__(f"teacher cache {url}: cannot write {path}: {reason}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.url, self.path, self.reason))


# ----------------------------------------------------------------------------------------- process identity


def holder_info(purpose: str) -> dict:
    """What the lock file records about this process."""
    now = _dt.datetime.now().astimezone()
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "pidns": pid_namespace(),
        "proc_start": proc_start(os.getpid()),
        "started": now.isoformat(timespec="seconds"),
        "purpose": purpose,
        "token": uuid.uuid4().hex,
    }


def is_leftover(name: str) -> bool:
    """A file a killed locker can leave beside the lock (its private record ``LOCK.PID.HEX.tmp``, or a stale
    lock moved aside ``LOCK.stale-HEX``): a folder holding one is still only the lock's owner's."""
    return re.fullmatch(rf"{re.escape(LOCK_FILE)}\.(\d+\.[0-9a-f]+\.tmp|stale-[0-9a-f]+)", name) is not None


def is_stale(holder: dict) -> str:
    """Why the holder is known to be dead ("" when it may be alive, including every holder on another host)."""
    return why_ended(holder.get("host"), holder.get("pidns", ""), holder.get("pid"), holder.get("proc_start"))


# ---------------------------------------------------------------------------------------------------- lock


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, fsspec.implementations.local.LocalFileSystem)


class StoreLock:
    """Context manager holding ``<store>/.lock`` (see the module docstring); released in ``__exit__`` even when
    the body raises. Not re-entrant: a second acquisition of a held store, from any process, is refused."""

    def __init__(self, url: str, purpose: str = "extract"):
        self.url = url
        self.purpose = purpose
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{LOCK_FILE}"
        self.info: dict | None = None
        self._made_root = False  # the store directory was created for the lock: removed again if left empty

    # -------------------------------------------------------------- helpers
    def _read(self) -> dict | None:
        """The current holder, None when there is no lock file; an unreadable file counts as a holder that
        named nothing (so a half-written lock from a killed writer is judged stale, not trusted)."""
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(raw)
            if not isinstance(holder, dict):
                raise ValueError("not an object")
        except ValueError:
            holder = {"host": socket.gethostname(), "pidns": pid_namespace(), "pid": None}
        holder["lock_path"] = self.path
        return holder

    def _writable_error(self, e: OSError, what: str) -> StoreNotWritable:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) or isinstance(e, PermissionError):
            reason += " (read-only location or missing permission)"
        return StoreNotWritable(self.url, what, reason)

    def _create_local(self, data: bytes) -> bool:
        """Atomic create-if-absent; False when the file exists."""
        self._made_root = self._made_root or not os.path.isdir(self.root)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise self._writable_error(e, self.root) from e
        # Write the holder record to a private file first, then hard-link it into place: link() fails if the
        # lock exists (create-if-absent, like O_EXCL), and a competitor never reads a lock file that is still
        # empty and mistakes it for a half-written, stale one.
        tmp = f"{self.path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise self._writable_error(e, self.root) from e
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as e:
            raise self._writable_error(e, self.path) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    def _create_remote(self, data: bytes) -> bool:
        """Best-effort create-if-absent: check, write, read back (see the module docstring)."""
        if self.fs.exists(self.path):
            return False
        try:
            self.fs.pipe_file(self.path, data)
        except (PermissionError, OSError) as e:
            raise self._writable_error(e, self.path) from e
        back = self._read()
        return back is not None and back.get("token") == self.info["token"]

    def _take_over_local(self, holder: dict) -> bool:
        """Move a stale lock aside atomically; True when the lock we moved is the stale one we judged (another
        process may have taken over and written a fresh lock in between: then put that one back)."""
        aside = f"{self.path}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it already; try the create again
        try:
            with open(aside, "rb") as f:
                moved = json.loads(f.read() or b"{}")
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") == holder.get("token"):
            os.unlink(aside)
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, self.path)  # a live fresh lock: restore it unless yet another one took its place
        os.unlink(aside)
        return False

    # -------------------------------------------------------------- protocol
    def acquire(self) -> StoreLock:
        self.info = holder_info(self.purpose)
        data = json.dumps(self.info, indent=1).encode()
        local = _is_local(self.fs)
        for _ in range(3):  # a lost takeover race or a lock vanishing between checks: look again
            created = self._create_local(data) if local else self._create_remote(data)
            if created:
                return self
            holder = self._read()
            if holder is None:
                continue
            why = is_stale(holder)
            if not why:
                raise StoreLocked(self.url, holder)
            log.warning(
                "%s: taking over a stale lock (%s; held by pid %s on %s since %s)",
                self.url, why, holder.get("pid"), holder.get("host"), holder.get("started"),
            )  # fmt: skip
            if local:
                self._take_over_local(holder)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path)
        holder = self._read() or {}
        raise StoreLocked(self.url, holder, "the lock changed hands while being acquired; rerun")

    def release(self) -> None:
        """Remove the lock if it is still ours (a lock that another process broke and retook stays)."""
        if self.info is None:
            return
        holder = self._read()
        if holder is not None and holder.get("token") == self.info["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
            if self._made_root and _is_local(self.fs):
                with contextlib.suppress(OSError):  # a failed first run leaves no empty store directory
                    os.rmdir(self.root)
        elif holder is not None:
            log.warning(
                "%s: lock was taken over by pid %s while held; leaving it", self.url, holder.get("pid")
            )
        self.info = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_lock(url: str) -> dict | None:
    """The holder recorded in a store's lock file, or None when it is not locked."""
    return StoreLock(url)._read()
