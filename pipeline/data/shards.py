"""The on-disk format every source is converted to, and the readers every later stage uses.

A prepared dataset is a directory::

    dataset.json          what it holds: source, split, counts, shard lists, fingerprint, answer counts
    instances-000000.tar  WebDataset shards of instance samples (``<key>.json``)
    images-000000.tar     WebDataset shards of image samples, one per unique image (``<key>.json`` + ``<key>.<ext>``)
    images.index.json     image id -> [shard, byte offset, size, ext, sha1]: random access into the image tars
    skipped.json          the skip report (empty under the fail policy)

A split is built in a hidden folder beside its destination (``.<split>.tmp-<host>-<pid>-<random>``) and
renamed into place only when complete, so a failed or killed run leaves the previous split as it was, and only
a folder recognisably a prepared split is ever replaced (see ``check_destination``). The splits of one run are
moved into place together, all or none (``commit_all``).

Images are stored once however many instances use them; readers join an instance to its image by a
seek into the image tar (no scan), which is what lets the training stream and the teacher read images in
any order.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds

from ..durable import sync_dir, sync_tree
from ..process import here_tag, pid_namespace, proc_start, why_ended
from .errors import DataError, SkipReport
from .schema import IMAGE_EXTS, Instance, SchemaError, image_key

FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
INDEX_FILE = "images.index.json"
REPORT_FILE = "skipped.json"
SHARD_MTIME = 946684800.0  # 2000-01-01 UTC: every tar member's mtime (see DatasetWriter)


# Everything a prepared split folder may hold: a folder holding anything else is not (only) ours to replace.
_OWN_FILES = re.compile(r"^(dataset\.json|images\.index\.json|skipped\.json|(instances|images)-\d{6}\.tar)$")
# In a temp split folder: host, pid, pid namespace and start time of the run building it.
_TMP_MARK = ".clip-td-partial"


def check_split_name(split: str) -> str:
    """A split name is one plain folder name under --out; anything that could resolve elsewhere is refused."""
    if not split or split.startswith(".") or any(c in split for c in "/\\\0"):
        raise DataError(
            "--split", repr(split), "must be a plain folder name (no path separator, no leading '.')"
        )
    return split


def check_destination(dest: str | Path) -> None:
    """Refuse, before any input is read, a destination that a prepare run could not replace safely.

    Absent or an empty folder: fine, unless a commit killed between its renames left the previous split in a
    hidden ``.<split>.old-*`` folder beside it (``commit_all``): that folder is then the only copy, and the
    error names it. A prepared split (a regular dataset.json of ours and nothing but our files): replaced when
    the new one is complete. Anything else (a symlink, a file, a foreign or half-written folder) is left alone
    with an error naming it.
    """
    dest = Path(dest)
    if dest.is_symlink():
        raise DataError(dest, "split folder", "is a symbolic link; refusing to write through it")
    if dest.exists() and not dest.is_dir():
        raise DataError(dest, "split folder", "exists and is not a folder")
    entries = sorted(p.name for p in dest.iterdir()) if dest.exists() else []
    if not entries:
        _check_no_replaced_copy(dest)
        return
    info = dest / INFO_FILE
    why = _not_a_prepared_split(info)
    if why:
        raise DataError(
            dest,
            "split folder",
            f"not empty and not a prepared split ({why}); remove it or pick another --out",
        )
    foreign = [
        n for n in entries if not _OWN_FILES.match(n) or (dest / n).is_symlink() or not (dest / n).is_file()
    ]
    if foreign:
        raise DataError(
            dest / foreign[0],
            "split folder",
            "not written by prepare_data; move it away to replace this split",
        )


def _check_no_replaced_copy(dest: Path) -> None:
    for old, state in _replaced_copies(dest):
        if state != "running" and any(old.iterdir()):
            raise DataError(
                old,
                "split folder",
                f"previous version of {dest.name}, left by a run killed while replacing it; "
                f"move it back to {dest} (or remove it) and run again",
            )


def _not_a_prepared_split(info: Path) -> str:
    if info.is_symlink() or not info.is_file():
        return f"no regular {INFO_FILE}"
    try:
        doc = json.loads(info.read_bytes())
    except (OSError, ValueError):
        return f"{INFO_FILE} is not valid JSON"
    if not isinstance(doc, dict) or "fingerprint" not in doc or "format_version" not in doc:
        return f"{INFO_FILE} was not written by prepare_data"
    if doc["format_version"] != FORMAT_VERSION:
        # A split of another format version may be what some other checkout of the project reads.
        return (
            f"{INFO_FILE} has format_version {doc['format_version']!r}, this version writes {FORMAT_VERSION}"
        )
    return ""


class DatasetWriter:
    """Writes a prepared dataset into a fresh folder beside ``out`` and renames it into place when complete.

    Use as a context manager (an exception inside discards the partial split), or call ``finish`` then
    ``commit`` (``close`` does both), and ``abort`` on failure. Until ``commit`` whatever was at ``out``
    is untouched, so a run that fails, or is killed, leaves the previous split as it was; and since every file
    is new in a new folder, a symlink planted in ``out`` is never written through.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        source: str,
        split: str,
        shard_size: int = 1000,
        image_shard_size: int = 1000,
        report: SkipReport | None = None,
        extra_info: dict | None = None,
    ):
        self.out = Path(out)
        check_destination(self.out)
        self._made_parents = _mkdirs(self.out.parent)
        try:
            _remove_stale_tmp(self.out)
            _remove_replaced(self.out)
            self.tmp = _new_dir(self.out.parent, f".{self.out.name}.tmp-{here_tag()}-{os.getpid()}-")
            start = proc_start(os.getpid())
            (self.tmp / _TMP_MARK).write_text(
                f"{socket.gethostname()} {os.getpid()} {pid_namespace()} {'-' if start is None else start}\n"
            )
        except BaseException:
            _remove_empty(self._made_parents)
            raise
        self.source, self.split = source, split
        self.report = report or SkipReport()
        self.extra_info = extra_info or {}
        # A fixed member mtime (webdataset stamps the wall clock) makes a split byte-identical run to run, so
        # its DVC hash is too and a study cell finished on another machine stays up to date.
        self._inst = wds.ShardWriter(
            str(self.tmp / "instances-%06d.tar"), maxcount=shard_size, verbose=0, mtime=SHARD_MTIME
        )
        self._img = wds.ShardWriter(
            str(self.tmp / "images-%06d.tar"), maxcount=image_shard_size, verbose=0, mtime=SHARD_MTIME
        )
        self._images: dict[str, tuple[str, str]] = {}  # image id -> (sha1, ext)
        self._keys: set[str] = set()
        self._hash = hashlib.sha1()
        self.counts: Counter = Counter()
        self.domains: Counter = Counter()
        self.answer_counts: Counter = Counter()
        self.info: dict | None = None
        self._state = "open"

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def has_image(self, image_id: str) -> bool:
        return image_id in self._images

    def add_image(self, image_id: str, data: bytes, ext: str, domain: str = "") -> None:
        """Store an image once; a second add of the same id is a no-op if the bytes are identical."""
        ext = ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"image '{image_id}': unsupported extension {ext!r} (allowed {IMAGE_EXTS})")
        sha = hashlib.sha1(data).hexdigest()
        if image_id in self._images:
            if self._images[image_id][0] != sha:
                raise ValueError(f"image '{image_id}' added twice with different bytes")
            return
        self._images[image_id] = (sha, ext)
        meta = {"image_id": image_id, "sha1": sha, "domain": domain}
        self._img.write({"__key__": image_key(image_id), "json": json.dumps(meta).encode(), ext: data})
        self._hash.update(f"img\0{image_id}\0{sha}\n".encode())

    def add_instance(self, inst: Instance) -> None:
        inst.validate()
        if inst.image_id not in self._images:
            raise SchemaError(
                f"instance '{inst.key}': image '{inst.image_id}' was not added before the instance"
            )
        if inst.key in self._keys:
            raise SchemaError(f"instance '{inst.key}': duplicate key")
        self._keys.add(inst.key)
        payload = json.dumps(inst.to_json(), sort_keys=True)
        self._inst.write({"__key__": inst.key, "json": payload.encode()})
        self._hash.update(payload.encode() + b"\n")
        self.counts[inst.task] += 1
        self.domains[inst.domain] += 1
        if inst.task == "vqa":
            # A blank human answer (the annotator typed none) is no answer a model could give.
            self.answer_counts.update(a for a in inst.human_answers or [inst.answer] if a)

    def skip(self, err: DataError) -> None:
        self.report.handle(err)

    def finish(self) -> dict:
        """Write the index, skip report and dataset.json into the temp folder; returns dataset.json's content.
        Nothing at ``out`` changes yet. On an error the temp folder is removed."""
        if self._state != "open":
            raise RuntimeError(f"DatasetWriter for {self.out}: finish() after {self._state}")
        try:
            self._inst.close()
            self._img.close()
            if not self.counts:
                raise DataError(
                    self.out, "dataset", "no instances were written (empty input, or every item skipped)"
                )
            index = _index_image_tars(self.tmp)
            (self.tmp / INDEX_FILE).write_text(json.dumps(index))
            self.report.write(self.tmp / REPORT_FILE)
            info = {
                "format_version": FORMAT_VERSION,
                "source": self.source,
                "split": self.split,
                "instances": sum(self.counts.values()),
                "tasks": dict(self.counts),
                "domains": dict(self.domains),
                "images": len(self._images),
                "instance_shards": sorted(p.name for p in self.tmp.glob("instances-*.tar")),
                "image_shards": sorted(p.name for p in self.tmp.glob("images-*.tar")),
                "answer_counts": dict(self.answer_counts.most_common()),
                "skipped": self.report.count,
                "fingerprint": self._hash.hexdigest(),
                **self.extra_info,
            }
            # dataset.json last: a folder holding it is complete.
            (self.tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        except BaseException:
            self.abort()
            raise
        self.info, self._state = info, "finished"
        return info

    def commit(self) -> dict:
        """Move the finished split into place, replacing the previous one only if it is a prepared split
        (``commit_all`` of this one writer)."""
        commit_all([self])
        return self.info

    def close(self) -> dict:
        """``finish`` then ``commit``."""
        self.finish()
        return self.commit()

    def abort(self) -> None:
        """Discard the partial split (and folders this writer created for it); ``out`` is untouched."""
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborted"
        for w in (self._inst, self._img):
            with contextlib.suppress(Exception):
                w.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        _remove_empty(self._made_parents)


def commit_all(writers: Sequence[DatasetWriter]) -> None:
    """Move several finished splits into place together: all of them, or none.

    Every destination is checked again before anything moves (a folder may have changed while the input was
    read). Then every previous split is renamed aside to ``.<split>.old-<host>-<pid>-<random>`` and every new
    one renamed in; if any step fails, the moves are undone newest first (the new splits back to their temp
    folders, the previous ones back into place) and every writer is aborted, so a failed commit changes
    nothing. The previous splits are removed only once every new one is in place and the folder entries are on
    disk. A process killed between the renames leaves a ``.old`` folder behind: ``check_destination`` refuses
    a split that is missing while one exists (it is the only copy of that split; the error says where) and a
    later writer removes it once its split is back in place (``_remove_replaced``).
    """
    for w in writers:
        if w._state != "finished":
            raise RuntimeError(f"DatasetWriter for {w.out}: commit() before finish() ({w._state})")
    aside: list[tuple[DatasetWriter, Path]] = []  # (writer, the folder its previous split was moved to)
    placed: list[DatasetWriter] = []
    try:
        for w in writers:  # every one before any moves: a late refusal must not find earlier splits replaced
            check_destination(w.out)
        for w in writers:
            (w.tmp / _TMP_MARK).unlink()
            sync_tree(w.tmp)  # the split's files on disk before its name says it is complete
        for w in writers:
            if w.out.exists():
                old = _new_dir(w.out.parent, _old_prefix(w.out))
                try:
                    os.replace(w.out, old)  # onto the empty folder just made: rename(2) allows that
                except BaseException:
                    _remove_empty([old])
                    raise
                aside.append((w, old))
        for w in writers:
            os.replace(w.tmp, w.out)
            placed.append(w)
        for parent in dict.fromkeys(w.out.parent for w in writers):
            sync_dir(parent)
    except BaseException as e:
        stuck = _roll_back(placed, aside)
        for w in writers:
            w.abort()
        if stuck:
            raise DataError(
                stuck[0],
                "split folder",
                f"previous version of {stuck[0].name.split('.old-')[0][1:]}, which could not be moved back "
                f"after a failed commit ({e}); move it back by hand before the next run, which would take it "
                "for a leftover",
            ) from e
        raise
    for w in writers:
        w._state = "committed"
    # Every new split is in place; a previous one that cannot be removed is only a hidden leftover.
    for _, old in aside:
        shutil.rmtree(old, ignore_errors=True)


def _roll_back(placed: list[DatasetWriter], aside: list[tuple[DatasetWriter, Path]]) -> list[Path]:
    """Undo ``commit_all``'s renames, newest first; returns the previous splits that could not be put back."""
    for w in reversed(placed):
        with contextlib.suppress(OSError):  # then the previous split cannot go back either: reported below
            os.replace(w.out, w.tmp)  # abort removes it from there
    stuck = []
    for w, old in reversed(aside):
        try:
            os.replace(old, w.out)
        except OSError:
            stuck.append(old)
    for parent in dict.fromkeys(w.out.parent for w, _ in aside):
        sync_dir(parent)
    return stuck


def _old_prefix(dest: Path) -> str:
    return f".{dest.name}.old-{here_tag()}-{os.getpid()}-"


def _replaced_copies(dest: Path) -> list[tuple[Path, str]]:
    """Previous versions of ``dest`` moved aside by ``commit_all`` and still there, each with who moved it:
    "running" (a live process of this host and pid namespace: a commit in progress), "over" (a process of
    this host and namespace that has ended, ``process.why_ended``) or "unknown" (another host or container,
    or a name this version does not write)."""
    name = re.compile(rf"\.{re.escape(dest.name)}\.old-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}")
    found = []
    for d in sorted(dest.parent.glob(f".{glob.escape(dest.name)}.old-*")):
        if d.is_symlink() or not d.is_dir():
            continue
        m = name.fullmatch(d.name)
        if m is None or m[1] != here_tag():
            state = "unknown"
        else:
            state = "over" if _named_by_ended_run(m[1], int(m[2])) else "running"
        found.append((d, state))
    return found


def _remove_replaced(dest: Path) -> None:
    """Remove the ``.old`` folders of this split that commits killed before their cleanup left, when that is
    safe: a non-empty one only while ``dest`` holds a prepared split (the newer version; otherwise the .old
    folder may be the only copy, and ``check_destination`` refuses the split instead), an empty one always;
    and only those a process of this host and pid namespace left that no longer exists (a concurrent
    commit's, in this container or another, is never touched)."""
    in_place = dest.is_dir() and not dest.is_symlink() and not _not_a_prepared_split(dest / INFO_FILE)
    for d, state in _replaced_copies(dest):
        if state != "over":
            continue
        if in_place:
            shutil.rmtree(d, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a writer created, innermost first, as long as they are still empty."""
    for d in reversed(folders):
        with contextlib.suppress(OSError):
            d.rmdir()


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new, empty folder ``parent/<prefix><random>``. Not mkdtemp: its 0700 mode would stay with the split
    after the rename, and a shared dataset must get the permissions the user's umask gives any folder."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{parent}: no free name for a folder {prefix}*")


def _mkdirs(path: Path) -> list[Path]:
    """``path.mkdir(parents=True)``, returning the folders it created (outermost first)."""
    made = []
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        made.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return made[::-1]


def _named_by_ended_run(tag: str, pid: int) -> bool:
    """Whether a folder named with ``tag`` (``process.here_tag``) and ``pid`` was left by a run of this host and
    pid namespace that has ended; a name records no start time, so a reused pid counts as that run."""
    return tag == here_tag() and bool(why_ended(socket.gethostname(), pid_namespace(), pid, None))


def _remove_stale_tmp(dest: Path) -> None:
    """Remove temp folders of this split left by killed runs: only those marked as ours, by this host and pid
    namespace (pipeline/process.py), by a process that has ended (gone, a zombie, or its pid now another
    process's: ``process.why_ended``, as the cache lock judges its holder; so a concurrent run's folder, in
    this container or another that shares the volume, is never touched). A commit unlinks the mark just
    before its renames, so a run killed there leaves an unmarked one: its name (host-and-namespace tag and
    pid) says the same, and it holds only a new split, never the only copy of one."""
    name = re.compile(rf"\.{re.escape(dest.name)}\.tmp-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}")
    for d in dest.parent.glob(f".{glob.escape(dest.name)}.tmp-*"):
        mark = d / _TMP_MARK
        try:
            if d.is_symlink() or mark.is_symlink():
                continue
            if mark.is_file():
                # host, pid, pid namespace and start time ("-": not known); a mark without the start time is an
                # earlier version's, judged without it; one without the namespace too is left
                fields = mark.read_text().split()
                if len(fields) not in (3, 4):
                    continue
                mark_host, pid, pidns, start = (*fields, "-")[:4]
                if not why_ended(mark_host, pidns, int(pid), None if start == "-" else int(start)):
                    continue
            else:
                m = name.fullmatch(d.name)
                if m is None or not _named_by_ended_run(m[1], int(m[2])):
                    continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(d, ignore_errors=True)


def _index_image_tars(out: Path) -> dict[str, list]:
    index: dict[str, list] = {}
    for shard_no, path in enumerate(sorted(out.glob("images-*.tar"))):
        with tarfile.open(path) as tf:
            members = {m.name: m for m in tf.getmembers()}
            for name, m in members.items():
                if not name.endswith(".json"):
                    continue
                meta = json.loads(tf.extractfile(m).read())
                stem = name[: -len(".json")]
                for ext in IMAGE_EXTS:
                    blob = members.get(f"{stem}.{ext}")
                    if blob is not None:
                        index[meta["image_id"]] = [shard_no, blob.offset_data, blob.size, ext, meta["sha1"]]
                        break
    return index


class PreparedDataset:
    """Read access to a prepared dataset directory: instances in order, images by id."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        info_path = self.path / INFO_FILE
        if not info_path.exists():
            raise DataError(
                info_path, "dataset", "not a prepared dataset (run `python -m stages.prepare_data` first)"
            )
        self.info: dict = _load_own_json(info_path)
        if self.info.get("format_version") != FORMAT_VERSION:
            raise DataError(
                info_path, "format_version", f"{self.info.get('format_version')} != {FORMAT_VERSION}"
            )
        for key in ("instances", "instance_shards", "image_shards", "fingerprint"):
            if key not in self.info:
                raise DataError(info_path, key, "missing (re-run prepare_data)")
        self.index: dict[str, list] = _load_own_json(self.path / INDEX_FILE)
        self.instance_urls = [str(self.path / n) for n in self.info["instance_shards"]]
        self.image_urls = [str(self.path / n) for n in self.info["image_shards"]]
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def __len__(self) -> int:
        return int(self.info["instances"])

    def image_ids(self) -> list[str]:
        """Unique image ids in image-shard order (the row order of the teacher cache)."""
        return list(self.index)

    def image_sha1(self, image_id: str) -> str:
        return self.index[image_id][4]

    def image_bytes(self, image_id: str) -> bytes:
        try:
            shard, offset, size, _ext, _sha = self.index[image_id]
        except KeyError:
            raise DataError(self.path / INDEX_FILE, image_id, "image id not in this dataset") from None
        if os.getpid() != self._pid:  # file handles must not be shared across forked DataLoader workers
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.image_urls[shard], "rb")  # noqa: SIM115 - kept open for reuse
        # pread: no shared file position, so a prefetch thread and the main thread can read side by side.
        data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise DataError(
                self.image_urls[shard], image_id, f"truncated image: read {len(data)} of {size} bytes"
            )
        return data

    def iter_instances(self) -> Iterator[Instance]:
        """Every instance exactly once, in shard order (no workers, no shuffling)."""
        for url in self.instance_urls:
            yield from (_instance(url, s) for s in _read_tar_samples(url))

    def iter_images(self) -> Iterator[tuple[str, bytes]]:
        for image_id in self.index:
            yield image_id, self.image_bytes(image_id)

    def answer_vocab(self, size: int | None = None) -> list[str]:
        """VQA answers by frequency (most frequent first); the train split's list is the answer vocabulary."""
        answers = list(self.info.get("answer_counts", {}))
        return answers[:size] if size else answers


def _load_own_json(path: Path) -> dict:
    """A JSON object prepare_data wrote; damage is a DataError naming the file, not a parser traceback."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError(path, "file", "not found (re-run prepare_data)") from None
    except OSError as e:
        raise DataError(path, "file", f"unreadable: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
        raise DataError(path, "file", f"not valid JSON ({e}); re-run prepare_data") from None
    if not isinstance(doc, dict):
        raise DataError(path, "top level", f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _read_tar_samples(url: str) -> Iterator[dict]:
    try:
        for sample in wds.tarfile_samples([{"url": url}]):
            try:
                obj = json.loads(sample["json"])
            except (KeyError, ValueError) as e:
                raise DataError(
                    url, sample.get("__key__", "?"), f"instance sample without valid JSON: {e}"
                ) from e
            yield {"__key__": sample["__key__"], "json": obj}
        _check_tar_complete(url)
    except (tarfile.TarError, OSError) as e:
        raise DataError(url, "tar", f"unreadable shard: {e}") from e


def _check_tar_complete(url: str) -> None:
    """Python's tarfile (and so webdataset) treats a file cut at a member boundary as a shorter archive and
    silently drops the rest; a complete archive ends with two zero blocks (then zero padding to a record).
    Only the file's tail is read: walking every header again doubled the cost of parsing a shard, and a
    member's own data cannot end a file in two whole zero blocks (its padding is under one block, and the JSON
    of an instance holds no NUL bytes)."""
    size = os.path.getsize(url)
    with open(url, "rb") as f:
        f.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
        tail = f.read(2 * tarfile.BLOCKSIZE)
    if size % tarfile.BLOCKSIZE or len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise DataError(
            url,
            "tar",
            f"truncated shard: no end-of-archive marker at the end of its {size} bytes (re-run prepare-data)",
        )


def _instance(url: str, sample: dict) -> Instance:
    """A schema-checked instance; the prepared data is written through ``DatasetWriter`` (which validates), so
    a violation here means a shard was altered or written by something else: name the shard and the key."""
    key = sample.get("__key__", "?")
    try:
        return Instance.from_json(sample["json"]).validate(check_text=False)
    except (SchemaError, TypeError) as e:
        raise DataError(url, key, f"invalid instance: {e}") from e


def _parse(sample: dict) -> Instance:
    return Instance.from_json(json.loads(sample["json"]))


def node_info() -> tuple[int, int]:
    """(rank, world size) of this process, read as webdataset reads them: RANK and WORLD_SIZE from the
    environment (torchrun sets both, and DataLoader workers inherit them), else an initialised
    torch.distributed group, else (0, 1)."""
    rank, world, _worker, _workers = wds.utils.pytorch_worker_info()
    return rank, world


def node_shards(ds: PreparedDataset) -> list[str]:
    """This rank's instance shards: every ``world``-th shard starting at ``rank``, disjoint across ranks."""
    rank, world = node_info()
    if world <= 1:
        return list(ds.instance_urls)
    if len(ds.instance_urls) < world:
        raise DataError(
            ds.path / INFO_FILE,
            "instance_shards",
            f"{len(ds.instance_urls)} instance shards cannot give each of {world} ranks its own; "
            "prepare the data with a smaller data.shard_size or train on fewer ranks",
        )
    return ds.instance_urls[rank::world]


def instance_pipeline(
    ds: PreparedDataset,
    *,
    training: bool,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    select: Callable[[Instance], bool] | None = None,
    join_images: bool = True,
    resampled: bool = True,
) -> wds.DataPipeline:
    """A WebDataset pipeline yielding ``{"instance": Instance, "image": bytes}``.

    ``training=True``: each DDP rank takes its own shards (``node_shards``), resampled endlessly with a seed
    and split by DataLoader worker, samples shuffled in a buffer. ``training=False`` (exact mode): every shard
    in order, split by worker only, so that every instance is produced exactly once per pass on every rank.
    """
    stages: list = []
    # The shard list is split by rank *before* resampling: wds.split_by_node after ResampledShards would only
    # deal out the draws of one shared resampled stream, so every rank would still read every shard.
    urls = node_shards(ds) if training else ds.instance_urls
    if training and resampled:
        stages += [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages += [wds.SimpleShardList(urls)]
    stages += [wds.split_by_worker, wds.tarfile_to_samples()]
    if training:
        stages += [wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=_Rng(seed))]
    stages += [wds.map(_parse)]
    if select is not None:
        stages += [wds.select(select)]

    def join(inst: Instance) -> dict:
        return {"instance": inst, "image": ds.image_bytes(inst.image_id) if join_images else None}

    stages += [wds.map(join)]
    return wds.DataPipeline(*stages)


class _Rng:
    """A picklable seeded RNG factory for wds.shuffle (it calls rng.random / rng.randint)."""

    def __init__(self, seed: int):
        import random

        self._r = random.Random(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._r, name)


def find_datasets(root: str | Path) -> list[Path]:
    """Every prepared dataset directory under root (those holding a dataset.json)."""
    return sorted(Path(p).parent for p in glob.glob(str(Path(root) / "**" / INFO_FILE), recursive=True))


def write_instances(
    writer: DatasetWriter, items: Iterable[tuple[Instance, Callable[[], tuple[bytes, str]]]]
) -> None:
    """Helper for converters: add each instance's image (loaded lazily, once) then the instance."""
    for inst, load_image in items:
        if not writer.has_image(inst.image_id):
            data, ext = load_image()
            writer.add_image(inst.image_id, data, ext, inst.domain)
        writer.add_instance(inst)


def decode_image(data: bytes):
    """Original bytes -> RGB PIL image."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image
