"""pipeline/dvc_lockcache.py: DVC reads a dvc.lock entry by entry, each entry parsed once, and gets exactly the
dict its own parse of the whole file gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dvc.utils.strictyaml import parse_yaml

from pipeline import dvc_lockcache
from pipeline.dvc_lockcache import _same, parse_lock

ROOT = Path(__file__).resolve().parent.parent

# Scalars YAML 1.1 (libyaml) and 1.2 (ruamel, DVC's parser) read differently, and others DVC must get back as
# they were: each must come back with the type and value DVC's own parse of the whole file gives.
TRICKY = [
    "yes",
    "no",
    "on",
    "1:20",
    "0o17",
    "017",
    "1_000",
    "null",
    "~",
    "",
    "2001-12-14",
    "1e3",
    ".5",
    "0x1F",
]


def _entry(i: int) -> dict:
    return {
        "cmd": f"python -m stages.study_cell --task vqa --method clip_td --seed {i} --out study/runs/x-s{i} "
        "--set 'distill.alpha=0.5' --set train.steps=600",
        "deps": [
            {"path": "pipeline/cache", "hash": "md5", "md5": f"{i:032x}.dir", "size": 1000 + i, "nfiles": 9}
        ],
        "params": {
            "params.yaml": {"train.lr": 0.001, "flag": i % 2 == 0, "none": None, "tricky": list(TRICKY)}
        },
        "outs": [{"path": f"study/runs/x-s{i}", "hash": "md5", "md5": f"{i + 9:032x}", "size": 3}],
    }


def _lock_text(entries: dict) -> str:
    from pipeline.dvc_lockfile import _dvc_render

    return _dvc_render({"schema": "2.0", "stages": entries})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / ".dvc").mkdir()
    return tmp_path


@pytest.fixture
def counted() -> list[str]:
    dvc_lockcache._MEMORY.clear()
    return []


def _parse(calls: list[str]):
    def parse(text, path, typ="safe"):
        calls.append(text)
        return parse_yaml(text, path, typ)

    return parse


def test_entries_read_one_by_one_give_dvcs_parse_and_only_new_entries_are_parsed(repo: Path, counted):
    entries = {f"main@cell-{i}": _entry(i) for i in range(6)}
    path = repo / "dvc.lock"
    text = _lock_text(entries)
    path.write_text(text)
    whole = parse_yaml(text, str(path))
    assert _same(parse_lock(text, str(path), _parse(counted)), whole)
    assert len(counted) == 1 + 6  # the lines before the stages, then every entry once
    assert whole["stages"]["main@cell-0"]["params"]["params.yaml"]["tricky"][0] == "yes"  # 1.2: a string

    # Another process (memory empty) reads the entries from the cache beside the repository's files.
    dvc_lockcache._MEMORY.clear()
    counted.clear()
    assert _same(parse_lock(text, str(path), _parse(counted)), whole)
    assert len(counted) == 1
    assert list((repo / ".dvc" / "tmp" / "lock-entries").glob("*.json"))

    # One entry changed and one added, as a finished cell and a new one leave the lock: those two are parsed.
    entries["main@cell-2"]["outs"][0]["size"] = 4
    entries["main@cell-9"] = _entry(9)
    changed = _lock_text(entries)
    counted.clear()
    got = parse_lock(changed, str(path), _parse(counted))
    assert _same(got, parse_yaml(changed, str(path)))
    assert len(counted) == 1 + 2


def test_what_is_handed_out_is_a_copy(repo: Path, counted):
    text = _lock_text({"main@a": _entry(1)})
    first = parse_lock(text, str(repo / "dvc.lock"), parse_yaml)
    first["stages"]["main@a"]["deps"].clear()
    assert _same(parse_lock(text, str(repo / "dvc.lock"), parse_yaml), parse_yaml(text, "x"))


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace("  main@b:\n", "  main@b: &anchor\n", 1).replace(
            "  main@c:\n", "  main@c: *anchor\n#", 1
        ),
        lambda t: t.replace("  main@b:\n", "# a comment\n  main@b:\n", 1),
        lambda t: t.replace("  main@b:\n", "\n  main@b:\n", 1),
        lambda t: t.replace("  main@c:\n", "  main@b:\n", 1),  # a stage named twice
        lambda t: t.replace("schema: '2.0'\n", "%YAML 1.1\n---\nschema: '2.0'\n", 1),
        lambda t: t.replace("- '2001-12-14'", "- 2001-12-14", 1),  # a date value
    ],
    ids=["anchor", "comment", "blank-line", "repeated-stage", "directive", "date"],
)
@pytest.mark.parametrize("long_name", [False, True])
def test_text_whose_entries_may_not_stand_alone_is_parsed_whole(repo: Path, counted, edit, long_name):
    # A stage name over 128 characters, which DVC writes as an explicit key ("? name" / ": cmd: ..."), too.
    names = {"a": "a", "b": "b", "c": "c" + "x" * 130 * long_name}
    text = edit(_lock_text({f"main@{names[c]}": _entry(i) for i, c in enumerate("abc")}))
    path = str(repo / "dvc.lock")
    try:
        whole = parse_yaml(text, path)
    except Exception as e:  # noqa: BLE001 - DVC's own refusal must stay DVC's
        with pytest.raises(type(e)):
            parse_lock(text, path, _parse(counted))
        return
    assert _same(parse_lock(text, path, _parse(counted)), whole)
    assert text in counted  # the whole text went to DVC's parser


@pytest.mark.parametrize(
    "stored",
    ["{not json", json.dumps({"versions": "dvc 0.0", "entries": {}}), "FORGED"],
)
def test_a_damaged_stale_or_forged_cache_changes_nothing(repo: Path, counted, stored):
    entries = {f"main@cell-{i}": _entry(i) for i in range(3)}
    path = repo / "dvc.lock"
    text = _lock_text(entries)
    parse_lock(text, str(path), parse_yaml)
    (cache,) = (repo / ".dvc" / "tmp" / "lock-entries").glob("*.json")
    if stored == "FORGED":
        # Another entry's parse under this entry's key: the key is the entry's text, so it never is served.
        doc = json.loads(cache.read_text())
        keys = list(doc["entries"])
        doc["entries"][keys[0]] = doc["entries"][keys[1]]
        stored = json.dumps(doc)
        entries["main@cell-0"]["cmd"] += " --changed"
        text = _lock_text(entries)
    cache.write_text(stored)
    dvc_lockcache._MEMORY.clear()
    assert _same(parse_lock(text, str(path), parse_yaml), parse_yaml(text, str(path)))


@pytest.mark.parametrize("lock", ["dvc.lock", "study/dvc.lock"])
def test_the_repositorys_own_lock_reads_as_dvc_reads_it(counted, tmp_path: Path, lock: str):
    text = (ROOT / lock).read_text()
    (tmp_path / ".dvc").mkdir()
    assert _same(parse_lock(text, str(tmp_path / "dvc.lock"), _parse(counted)), parse_yaml(text, "dvc.lock"))
    assert len(counted) >= len(parse_yaml(text, lock)["stages"])  # read entry by entry, not whole


def test_installed_dvc_reads_every_lock_through_it(monkeypatch, repo: Path, counted):
    import dvc.utils.strictyaml as strictyaml

    monkeypatch.setattr(strictyaml, "parse_yaml", strictyaml.parse_yaml)  # restored after the test
    dvc_lockcache.install()
    installed = strictyaml.parse_yaml
    dvc_lockcache.install()
    assert strictyaml.parse_yaml is installed  # once
    path = repo / "dvc.lock"
    text = _lock_text({"main@a": _entry(1)})
    path.write_text(text)
    data, _ = strictyaml.load(str(path))
    assert _same(data, parse_yaml(text, str(path)))
    assert list((repo / ".dvc" / "tmp" / "lock-entries").glob("*.json"))  # it went through the entry cache
    assert strictyaml.load(str(ROOT / "params.yaml"))[0] == parse_yaml(
        (ROOT / "params.yaml").read_text(), "p"
    )


def test_a_cache_written_beside_another_yaml_parser_is_not_served(repo: Path, counted, monkeypatch):
    """DVC's parse goes through ruamel.yaml.clib's C loader where it is installed: a parse cached with it (or
    another version of it) is parsed again without it, not served."""
    import importlib.metadata

    text = _lock_text({f"main@cell-{i}": _entry(i) for i in range(3)})
    path = str(repo / "dvc.lock")
    parse_lock(text, path, _parse(counted))
    dvc_lockcache._MEMORY.clear()
    counted.clear()
    parse_lock(text, path, _parse(counted))
    assert not any("cmd:" in t for t in counted)  # the same parser: every entry served from the disk cache

    real = importlib.metadata.version

    def without_clib(name: str) -> str:
        if name == "ruamel.yaml.clib":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", without_clib)
    dvc_lockcache._MEMORY.clear()
    assert _same(parse_lock(text, path, _parse(counted)), parse_yaml(text, path))
    assert sum("cmd:" in t for t in counted) == 3  # each entry parsed again
