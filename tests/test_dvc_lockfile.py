"""pipeline/dvc_lockfile.py: DVC's dvc.lock update, made cheap, writes the bytes DVC's own update writes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml
from dvc.utils.serialize._yaml import modify_yaml

from pipeline import dvc_lockfile
from pipeline.dvc_lockfile import modify_lockfile


@pytest.fixture
def slow_path(monkeypatch) -> list[int]:
    """Counts the updates that fell back to DVC's own round-trip parse and dump (the slow path)."""
    calls: list[int] = []
    original = dvc_lockfile._round_trip

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(dvc_lockfile, "_round_trip", counted)
    return calls


def _entry(i: int, value: object = 250) -> dict:
    """A stage entry shaped like the study's: a command long enough to be folded, deps, params, outs."""
    return {
        "cmd": f"python -m stages.study_cell --task vqa --condition lowshot-0.01 --method clip_td --seed {i} "
        f"--init pretrained --out study/runs/pretrained-full/vqa-lowshot-0.01-clip_td-s{i}",
        "deps": [
            {"path": "pipeline/cache", "hash": "md5", "md5": f"{i:032x}.dir", "size": 1000 + i, "nfiles": 9},
            {"path": "stages/study_cell.py", "hash": "md5", "md5": f"{i + 7:032x}", "size": 77},
        ],
        "params": {
            "params.yaml": {"train.eval_every": value, "distill.alpha": 0.5, "student.init": "pretrained"}
        },
        "outs": [
            {"path": f"study/runs/x-s{i}", "hash": "md5", "md5": f"{i + 9:032x}.dir", "size": 3, "nfiles": 2}
        ],
    }


def _lock(n: int = 4, **extra) -> dict:
    return {"schema": "2.0", "stages": {f"main@cell-{i}": _entry(i) for i in range(n)}, **extra}


def _write_as_dvc(path: Path, data: dict) -> None:
    path.write_text("")
    with modify_yaml(str(path)) as d:
        d.update(copy.deepcopy(data))


def _both(tmp_path: Path, data: dict, change) -> tuple[str, str]:
    """The lock after ``change`` through DVC's own update and through modify_lockfile."""
    texts = []
    for name, modify in (("dvc", modify_yaml), ("fast", None)):
        path = tmp_path / name / "dvc.lock"
        path.parent.mkdir()
        _write_as_dvc(path, data)
        ctx = modify_yaml(str(path)) if modify else modify_lockfile(str(path), _original=modify_yaml)
        with ctx as d:
            change(d)
        texts.append(path.read_text())
    return texts[0], texts[1]


def test_a_replaced_and_an_added_stage_give_dvcs_bytes_without_the_slow_path(tmp_path: Path, slow_path):
    def change(d):
        d["stages"].update({"main@cell-1": _entry(101), "main@cell-new": _entry(7)})

    dvc, fast = _both(tmp_path, _lock(), change)
    assert fast == dvc and "cell-new" in fast and "s101" in fast
    assert not slow_path


@pytest.mark.parametrize(
    ("change", "slow"),
    [
        pytest.param(lambda d: d["stages"].pop("main@cell-2"), True, id="removed stage"),
        pytest.param(lambda d: d.update(schema="3.0"), True, id="top-level key"),
        # libyaml reads YAML 1.1: "1:20" unquoted (as DVC's 1.2 dumper writes it) would read back as 80
        pytest.param(
            lambda d: d["stages"].update({"main@cell-0": _entry(0, "1:20")}), True, id="yaml 1.1 vs 1.2"
        ),
        pytest.param(lambda d: d["stages"].update({"main@cell-3": _entry(3)}), False, id="unchanged entry"),
    ],
)
def test_changes_it_does_not_splice_still_give_dvcs_bytes(tmp_path: Path, slow_path, change, slow: bool):
    dvc, fast = _both(tmp_path, _lock(), change)
    assert fast == dvc
    assert bool(slow_path) == slow


@pytest.mark.parametrize(
    ("lock", "change"),
    [
        # A param going from the string "yes" (written unquoted) to true: libyaml's reading of the old text
        # already said True, so the update was taken for no change and never written.
        pytest.param(
            _lock(1), lambda d: d["stages"].update({"main@cell-0": _entry(0, True)}), id="yes to true"
        ),
        # Stages named on / off: libyaml reads the names as booleans, and the fallback dropped their entries.
        pytest.param(
            {"schema": "2.0", "stages": {"on": _entry(1), "off": _entry(2)}},
            lambda d: d["stages"].update({"on": _entry(5)}),
            id="stage named on",
        ),
    ],
)
def test_what_yaml_1_1_reads_otherwise_still_gives_dvcs_bytes(tmp_path: Path, lock: dict, change):
    if "on" not in lock["stages"]:
        lock["stages"]["main@cell-0"] = _entry(0, "yes")
    dvc, fast = _both(tmp_path, lock, change)
    assert fast == dvc


def test_untouched_entries_keep_their_bytes_and_values(tmp_path: Path, slow_path):
    """An old entry libyaml would misread is never re-rendered from that misreading."""
    data = _lock()
    data["stages"]["main@cell-0"] = _entry(0, "1:20")
    dvc, fast = _both(tmp_path, data, lambda d: d["stages"].update({"main@cell-2": _entry(202)}))
    assert fast == dvc and "1:20" in fast
    assert not slow_path


def test_a_new_lock_file_is_dvcs_own(tmp_path: Path):
    path = tmp_path / "dvc.lock"
    with modify_lockfile(str(path), _original=modify_yaml) as d:
        d.update(copy.deepcopy(_lock(2)))
    other = tmp_path / "dvc" / "dvc.lock"
    other.parent.mkdir()
    _write_as_dvc(other, _lock(2))
    assert path.read_text() == other.read_text()


def test_a_failed_update_leaves_the_lock_whole(tmp_path: Path):
    path = tmp_path / "dvc.lock"
    _write_as_dvc(path, _lock())
    before = path.read_text()
    with pytest.raises(RuntimeError), modify_lockfile(str(path), _original=modify_yaml) as d:
        d["stages"]["main@cell-1"] = _entry(55)
        raise RuntimeError("the stage's outputs could not be hashed")
    assert path.read_text() == before and list(tmp_path.iterdir()) == [path]


def test_a_failed_write_leaves_the_lock_whole_and_nothing_beside_it(tmp_path: Path, monkeypatch):
    path = tmp_path / "dvc.lock"
    _write_as_dvc(path, _lock())
    before = path.read_text()

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dvc_lockfile.os, "replace", disk_full)
    with pytest.raises(OSError), modify_lockfile(str(path), _original=modify_yaml) as d:
        d["stages"]["main@cell-1"] = _entry(55)
    assert path.read_text() == before and list(tmp_path.iterdir()) == [path]


@pytest.fixture
def pipeline_repo(tmp_path: Path, monkeypatch) -> Path:
    """A DVC repository with two stages run by DVC, both depending on a code folder."""
    import subprocess
    import sys

    from dvc.repo import Repo

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    Repo.init()
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "step.py").write_text(
        "import sys\nopen(sys.argv[1], 'w').write(open('in.txt').read())\n"
    )
    (tmp_path / "in.txt").write_text("x")
    stages = {
        name: {
            "cmd": f"{sys.executable} code/step.py {name}.txt",
            "deps": ["code", "in.txt"],
            "outs": [f"{name}.txt"],
        }
        for name in ("one", "two")
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    with Repo() as repo:
        repo.reproduce()
    return tmp_path


def _status(path: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(path)) as repo:
        return repo.status()


def test_commit_unchanged_records_a_code_change_as_dvc_commit_does(
    pipeline_repo: Path, tmp_path_factory, monkeypatch
):
    import shutil

    from dvc.repo import Repo

    (pipeline_repo / "code" / "step.py").write_text(
        "import sys  # faster, same bytes out\n" + "open(sys.argv[1], 'w').write(open('in.txt').read())\n"
    )
    assert set(_status(pipeline_repo)) == {"one", "two"}
    twin = tmp_path_factory.mktemp("twin") / "repo"
    shutil.copytree(pipeline_repo, twin)
    assert dvc_lockfile.commit_unchanged(["one", "two"], ["code"], str(pipeline_repo)) == ["one", "two"]
    assert _status(pipeline_repo) == {}
    monkeypatch.chdir(twin)
    with Repo(str(twin)) as repo:
        for name in ("one", "two"):
            repo.commit(name, force=True)
    assert (pipeline_repo / "dvc.lock").read_text() == (twin / "dvc.lock").read_text()


def test_commit_unchanged_refuses_any_other_change_and_writes_nothing(pipeline_repo: Path):
    lock = (pipeline_repo / "dvc.lock").read_text()
    (pipeline_repo / "code" / "step.py").write_text("import sys\nopen(sys.argv[1], 'w').write('y')\n")
    (pipeline_repo / "two.txt").write_text("y")  # an output changed too: not a no-op change
    with pytest.raises(dvc_lockfile.UnsafeCommit, match="two: .*two.txt"):
        dvc_lockfile.commit_unchanged(["one", "two"], ["code"], str(pipeline_repo))
    (pipeline_repo / "in.txt").write_text("z")  # and a dep not named by --only
    with pytest.raises(dvc_lockfile.UnsafeCommit, match="one: .*in.txt"):
        dvc_lockfile.commit_unchanged(["one"], ["code"], str(pipeline_repo))
    with pytest.raises(KeyError, match="no such stage.*three"):
        dvc_lockfile.commit_unchanged(["one", "three"], ["code"], str(pipeline_repo))
    assert (pipeline_repo / "dvc.lock").read_text() == lock


def test_without_stages_only_those_changed_in_the_named_deps_alone_are_committed(pipeline_repo: Path):
    (pipeline_repo / "code" / "step.py").write_text(
        "import sys  # a comment\nopen(sys.argv[1], 'w').write(open('in.txt').read())\n"
    )
    (pipeline_repo / "two.txt").unlink()  # "two" not run since: its output is missing, it must stay changed
    assert dvc_lockfile.commit_unchanged([], ["code"], str(pipeline_repo)) == ["one"]
    assert set(_status(pipeline_repo)) == {"two"}


def test_install_twice_routes_the_lock_once(monkeypatch):
    import dvc.dvcfile

    monkeypatch.setattr(dvc.dvcfile, "modify_yaml", dvc.dvcfile.modify_yaml)  # restored after the test
    dvc_lockfile.install()
    first = dvc.dvcfile.modify_yaml
    dvc_lockfile.install()
    assert dvc.dvcfile.modify_yaml is first


def test_rehash_updates_only_entries_that_recorded_the_previous_version(tmp_path: Path):
    """The unchecked fallback of commit-unchanged: a stage recorded with the file as committed gets the new
    hash; one recorded with any other version stays stale; nothing else in the lock changes."""
    import hashlib
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    code = tmp_path / "code.py"
    code.write_text("x = 1\n")
    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    committed = hashlib.md5(b"x = 1\n").hexdigest()
    lock = tmp_path / "dvc.lock"
    entry = "    - path: code.py\n      hash: md5\n      md5: {}\n      size: {}\n"
    text = (
        "schema: '2.0'\nstages:\n  a:\n    cmd: run a\n    deps:\n" + entry.format(committed, 6)
        + "  b:\n    cmd: run b\n    deps:\n" + entry.format(committed, 6)
        + "  old:\n    cmd: run old\n    deps:\n" + entry.format("f" * 32, 5)
    )  # fmt: skip
    lock.write_text(text)
    code.write_text("x = 1  # faster\n")
    new = hashlib.md5(code.read_bytes()).hexdigest()

    assert dvc_lockfile.rehash(str(lock), ["code.py"], root=str(tmp_path)) == {"code.py": 2}
    after = yaml.safe_load(lock.read_text())["stages"]
    assert [after[s]["deps"][0]["md5"] for s in ("a", "b", "old")] == [new, new, "f" * 32]
    assert after["a"]["deps"][0]["size"] == len(code.read_bytes())
    assert lock.read_text() == text.replace(entry.format(committed, 6), entry.format(new, 16))
    assert dvc_lockfile.rehash(str(lock), ["code.py"], root=str(tmp_path)) == {"code.py": 0}  # done once
    with pytest.raises(ValueError, match="nope.py: neither a file nor a folder"):
        dvc_lockfile.rehash(str(lock), ["nope.py"], root=str(tmp_path))


def test_rehash_of_a_folder_dep_matches_dvcs_own_hash(tmp_path: Path):
    """A folder of code (pipeline/cache, student) is a folder dep: rehash finds DVC's recorded hash from the
    committed files and writes the one DVC computes now, so dvc status agrees the stage is up to date."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def run(*args: str) -> str:
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    dvc = (sys.executable, "-m", "dvc")
    run(*git, "init", "-q")
    run(*dvc, "init", "-q")
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    stage = {
        "cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('x')\"",
        "deps": ["pkg"],
        "outs": ["out.txt"],
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    run(*dvc, "repro", "-q")
    run(*git, "add", "-A")
    run(*git, "commit", "-q", "-m", "c")
    (tmp_path / "pkg" / "a.py").write_text("A = 1  # the same value, said more clearly\n")
    (tmp_path / "pkg" / "__pycache__").mkdir()  # left out, as .dvcignore leaves it out in the project
    (tmp_path / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"\x00")
    (tmp_path / ".dvcignore").write_text("__pycache__/\n")
    assert "modified" in run(*dvc, "status")
    assert dvc_lockfile.rehash(str(tmp_path / "dvc.lock"), ["pkg/"], root=str(tmp_path)) == {"pkg": 1}
    assert "up to date" in run(*dvc, "status")


def _dvc_repo(tmp_path: Path):
    """A git + DVC repository in ``tmp_path``; returns a runner of commands there that fails on a non-zero exit
    (returning their stdout), and the dvc command."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def run(*args: str) -> str:
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    return run, dvc


def test_a_new_module_is_added_to_the_entries_of_the_stages_that_list_it(tmp_path: Path):
    """A module split out of code the stages already ran (pipeline/durable.py): each entry of a stage that
    now lists it gets its hash, in the sorted place DVC puts it, and dvc status agrees they are up to date;
    a stage that does not list it is left as it was."""
    run, dvc = _dvc_repo(tmp_path)
    for name in ("a.py", "c.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    write = f"{sys.executable} -c \"open('${{item}}.txt', 'w').write('x')\""
    stages = {
        "s": {"foreach": ["x", "y"], "do": {"cmd": write, "deps": ["c.py", "a.py"], "outs": ["${item}.txt"]}},
        "t": {"cmd": write.replace("${item}", "t"), "deps": ["c.py"], "outs": ["t.txt"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    run(*dvc, "repro", "-q")
    (tmp_path / "b.py").write_text("def moved(): ...\n")
    stages["s"]["do"]["deps"].append("b.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    assert "b.py" in run(*dvc, "status")
    lock = tmp_path / "dvc.lock"
    before = yaml.safe_load(lock.read_text())["stages"]

    assert dvc_lockfile.add_new_dep(str(lock), "b.py", root=str(tmp_path)) == 2
    after = yaml.safe_load(lock.read_text())["stages"]
    assert [d["path"] for d in after["s@x"]["deps"]] == ["a.py", "b.py", "c.py"]
    assert after["t"] == before["t"]
    assert "up to date" in run(*dvc, "status")
    assert dvc_lockfile.add_new_dep(str(lock), "b.py", root=str(tmp_path)) == 0  # done once


def test_a_stage_name_dvc_writes_as_an_explicit_key_is_updated_as_dvc_does(tmp_path: Path):
    """DVC writes a stage name over 128 characters as an explicit key (``? name`` / ``: cmd: ...``): the
    splice cannot read that layout, so the update goes DVC's own way instead of failing on its parse-back."""
    long = "main@" + "x" * 130
    data = {"schema": "2.0", "stages": {long: _entry(0), "main@cell-1": _entry(1)}}

    def change(d):
        d["stages"][long] = _entry(0, value=500)

    dvc_text, fast_text = _both(tmp_path, data, change)
    assert "  ? main@x" in dvc_text and fast_text == dvc_text


def test_the_lock_keeps_its_permissions_and_a_symlinked_lock_its_link(tmp_path: Path):
    import os
    import stat

    target = tmp_path / "real" / "dvc.lock"
    target.parent.mkdir()
    _write_as_dvc(target, _lock(2))
    os.chmod(target, 0o664)
    link = tmp_path / "dvc.lock"
    link.symlink_to(target)
    with modify_lockfile(str(link), _original=modify_yaml) as d:
        d["stages"]["main@cell-0"] = _entry(0, value=500)
    assert link.is_symlink() and yaml.safe_load(target.read_text())["stages"]["main@cell-0"] == _entry(0, 500)
    assert stat.S_IMODE(target.stat().st_mode) == 0o664


def test_rehash_waits_for_dvcs_repository_lock(tmp_path: Path):
    """A stage finishing while rehash runs writes its entry under DVC's repository lock; rehash reading and
    writing the whole file outside it would undo that entry, so it waits for the lock."""
    import hashlib
    import subprocess
    import sys
    import threading

    def run(*args: str) -> None:
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "code.py")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    lock = tmp_path / "dvc.lock"
    committed = hashlib.md5(b"x = 1\n").hexdigest()
    lock.write_text(
        "schema: '2.0'\nstages:\n  a:\n    cmd: run a\n    deps:\n    - path: code.py\n      hash: md5\n"
        f"      md5: {committed}\n      size: 6\n"
    )
    (tmp_path / "code.py").write_text("x = 2\n")
    before = lock.read_text()
    # The holder keeps DVC's lock until told to let go, and at that moment copies what dvc.lock then holds.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, shutil\nfrom dvc.repo import Repo\nwith Repo('.') as r, r.lock:\n"
         "    print('held', flush=True)\n    sys.stdin.readline()\n    shutil.copy('dvc.lock', 'at-release')"],
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    counts: dict = {}
    worker = threading.Thread(
        target=lambda: counts.update(dvc_lockfile.rehash(str(lock), ["code.py"], root=str(tmp_path)))
    )
    worker.start()
    worker.join(1.0)  # room to reach the lock (not a measurement: a rehash that ignored it is caught below)
    holder.communicate("go\n")
    worker.join()
    assert counts == {"code.py": 1} and lock.read_text() != before
    assert (tmp_path / "at-release").read_text() == before  # nothing written while the holder had the lock


def test_a_new_param_at_the_old_behaviour_is_recorded_where_dvc_records_its_section(tmp_path: Path):
    """train.precision: fp32 appended to params.yaml: the entries of the stages that record the whole train
    section get it, and dvc status agrees they are up to date; a stage that records only another key of the
    section, and a section of another name holding a key of that name, are left as they were."""
    run, dvc = _dvc_repo(tmp_path)
    params = "train:\n  steps: 3\n  clip: [0.1, 3.0]\n  sizes:\n    vcr: 4\ntest:\n  train:\n    steps: 1\n"
    (tmp_path / "params.yaml").write_text(params)
    write = f"{sys.executable} -c \"open('${{item}}.txt', 'w').write('x')\""
    stages = {
        "s": {
            "foreach": ["x", "y"],
            "do": {"cmd": write, "params": ["train", "test"], "outs": ["${item}.txt"]},
        },
        "t": {"cmd": write.replace("${item}", "t"), "params": ["train.steps"], "outs": ["t.txt"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    run(*dvc, "repro", "-q")
    (tmp_path / "params.yaml").write_text(params.replace("    vcr: 4\n", "    vcr: 4\n  precision: fp32\n"))
    assert "modified:           train" in run(*dvc, "status")
    lock = tmp_path / "dvc.lock"
    before = yaml.safe_load(lock.read_text())["stages"]

    assert dvc_lockfile.add_param(str(lock), "train.precision", "fp32", root=str(tmp_path)) == 2
    after = yaml.safe_load(lock.read_text())["stages"]
    assert after["s@x"]["params"]["params.yaml"]["train"] == {
        "steps": 3, "clip": [0.1, 3.0], "sizes": {"vcr": 4}, "precision": "fp32"
    }  # fmt: skip
    assert after["s@x"]["params"]["params.yaml"]["test"] == {"train": {"steps": 1}}
    assert after["t"] == before["t"]
    assert "up to date" in run(*dvc, "status")
    assert dvc_lockfile.add_param(str(lock), "train.precision", "fp32", root=str(tmp_path)) == 0  # done once
    with pytest.raises(ValueError, match="section.name"):
        dvc_lockfile.add_param(str(lock), "precision", "fp32", root=str(tmp_path))
