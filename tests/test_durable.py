"""What a commit point publishes is on disk first: a crash after a rename or a manifest entry must not leave
a name that says "complete" over data that was still in the page cache. Each test records, at the commit
point, which files had been flushed (``os.fsync``, by path) and requires everything published among them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from pipeline import cache as C
from pipeline import extract as X
from pipeline.cache.direct import shard_files
from pipeline.config import CacheParams
from student.checkpoint import write_atomic
from tests.conftest import build_dataset, tiny_teacher_files


@pytest.fixture
def flushed(monkeypatch) -> set[str]:
    """The real paths of every file and folder ``os.fsync`` has been called on."""
    seen: set[str] = set()
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.add(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_unit_commits_only_after_its_shards_are_flushed(tmp_path, flushed, monkeypatch):
    cfg, ckpt = tiny_teacher_files(tmp_path)
    ds = build_dataset(tmp_path / "train", 6)
    url = str(tmp_path / "s.zarr")
    unflushed: dict[str, list[str]] = {}
    commit = C.commit_unit

    def checked_commit(store: str, name: str, record: dict) -> None:
        g = C.open_group(store, mode="r")
        files = [
            f
            for key, rec in record.get("arrays", {}).items()
            for f in shard_files(g[key], *rec["region"])
            if os.path.exists(f)
        ]
        assert files or not record.get("items"), f"unit {name}: no shard file found to check"
        missing = [f for f in files if os.path.realpath(f) not in flushed]
        for key in record.get("arrays", {}):  # every folder zarr made for a chunk key, up to the array's
            top = os.path.join(store, key)
            for f in (f for f in files if f.startswith(top + os.sep)):
                d = os.path.dirname(f)
                while d.startswith(top):
                    missing += [d] if os.path.realpath(d) not in flushed else []
                    d = os.path.dirname(d)
        unflushed[name] = missing
        commit(store, name, record)

    monkeypatch.setattr(C, "commit_unit", checked_commit)
    cp = dataclasses.replace(
        CacheParams(), image_rows_per_unit=2, text_rows_per_unit=4, batch_size=4, num_workers=0
    )
    X.extract(
        [ds], url, X.TeacherSpec(str(cfg), str(ckpt), "fp32", "cpu"), cp, scheduler="sync", progress=False
    )
    assert {n.split("-")[0] for n in unflushed} == {"image", "text"}
    assert not {n: m for n, m in unflushed.items() if m}


def test_a_prepared_split_is_flushed_before_it_is_renamed_into_place(tmp_path, flushed, monkeypatch):
    replace, checked = os.replace, []

    def checked_replace(src, dst) -> None:
        if Path(dst) == tmp_path / "train":
            files = [os.path.realpath(p) for p in Path(src).rglob("*")]
            assert files and not [f for f in files if f not in flushed]
            assert os.path.realpath(src) in flushed
            checked.append(dst)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", checked_replace)
    build_dataset(tmp_path / "train", 3)
    assert checked and str(tmp_path) in flushed  # the folder that holds the new name, after the rename


def test_write_atomic_flushes_the_file_before_the_rename(tmp_path, flushed, monkeypatch):
    replace, seen_at_rename = os.replace, []

    def checked_replace(src, dst) -> None:
        seen_at_rename.append(os.path.realpath(src) in flushed)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", checked_replace)
    write_atomic(tmp_path / "ckpt.pt", lambda tmp: torch.save({"w": torch.ones(2)}, tmp))
    assert seen_at_rename == [True] and str(tmp_path) in flushed
    assert torch.equal(torch.load(tmp_path / "ckpt.pt", weights_only=True)["w"], torch.ones(2))


def test_files_are_opened_for_writing_to_be_flushed_on_windows(tmp_path, monkeypatch):
    """Windows' fsync (``_commit``) fails on a read-only handle: there a file is flushed through one that may
    write, which every file a stage has just written allows."""
    from pipeline import durable

    f = tmp_path / "shard.tar"
    f.write_bytes(b"x")
    opened: list[int] = []
    real_open = os.open

    def spy(path, flags, *a):
        if os.path.isfile(path):
            opened.append(flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", spy)
    durable.sync_files([f])
    monkeypatch.setattr(os, "name", "nt")
    try:
        durable.sync_files([f])
    finally:
        monkeypatch.setattr(os, "name", "posix")  # pytest's own paths need the real one
    assert opened == [os.O_RDONLY, os.O_RDWR]
