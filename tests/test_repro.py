"""pipeline/repro.py: dvc repro with one-core stages side by side, recorded by DVC as a plain repro would."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from dvc.utils.serialize._yaml import _dump, parse_yaml_for_update

from tests.conftest import REPO

BIN = Path(sys.executable).parent
CELLS = ("a", "b", "c")

# A stage's command: append "start NAME" to events.txt, sleep (so that stages allowed to overlap do),
# append "end NAME", write its output; or fail when fail.txt names it. The order of the lines in
# events.txt (one O_APPEND write each) is the order things happened: no clock is read.
STEP = """
import os, sys, time
from pathlib import Path
name, out = sys.argv[1], Path(sys.argv[2])

def event(what):
    fd = os.open("events.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{what} {name}\\n".encode())
    os.close(fd)

event("start")
if name in Path("fail.txt").read_text().split():
    sys.exit(3)
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)
event("end")
# salt.txt is no dep: it stands for what DVC cannot see, e.g. the CPU's float kernels under a trained artifact.
out.write_text(name + (Path("salt.txt").read_text() if Path("salt.txt").exists() else ""))
"""

PIPELINE = """
stages:
  first:
    cmd: python step.py first first.json
    deps: [step.py]
    outs: [first.json]
  cell:
    foreach: [a, b, c]
    do:
      meta: {cores: 1}
      cmd: python step.py ${item} cell-${item}.json 1.5
      deps: [step.py, first.json]
      outs:  # as the study's cells: committed to git, not in DVC's cache
        - cell-${item}.json:
            cache: false
  last:
    cmd: python step.py last last.json
    deps: [cell-a.json, cell-b.json, cell-c.json]
    outs:
      - last.json:
          cache: false
"""


def _env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "DVC_NO_ANALYTICS": "1"}  # fmt: skip


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.repro", *args], cwd=repo, env=_env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def _dvc(repo: Path, *args: str) -> str:
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=_env(), capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    return out.stdout


def _events(repo: Path) -> list[tuple[str, str]]:
    path = repo / "events.txt"
    return [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []


def _peak(events: list[tuple[str, str]]) -> int:
    """The most stages that had started and not yet ended at once."""
    now = peak = 0
    for what, _ in events:
        now += 1 if what == "start" else -1
        peak = max(peak, now)
    return peak


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _dvc(tmp_path, "init", "-q")
    (tmp_path / "step.py").write_text(STEP)
    (tmp_path / "fail.txt").write_text("")
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent(PIPELINE))
    return tmp_path


def test_one_core_stages_run_side_by_side_and_dvc_records_every_stage(repo: Path):
    r = _run(repo, "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    events = _events(repo)
    order = [" ".join(e) for e in events]
    cells = [i for i, (_, name) in enumerate(events) if name in CELLS]
    assert order.index("end first") < min(cells), f"a cell started before the stage it needs ended: {order}"
    assert max(cells) < order.index("start last"), f"the last stage started before every cell ended: {order}"
    assert _peak(events) == 2, f"not exactly two one-core stages at once with --jobs 2: {order}"
    assert "up to date" in _dvc(repo, "status")  # DVC recorded every stage in dvc.lock
    # ... in DVC's own layout, though pipeline/dvc_lockfile.py spliced each stage's entry into the file
    lock = (repo / "dvc.lock").read_text()
    stream = io.StringIO()
    _dump(parse_yaml_for_update(lock, "dvc.lock"), stream)
    assert stream.getvalue() == lock
    again = _run(repo)
    assert again.returncode == 0 and "everything is up to date" in again.stdout


def test_a_failed_stage_stops_what_needs_it_names_itself_and_keeps_what_finished(repo: Path):
    (repo / "fail.txt").write_text("b")
    r = _run(repo, "--jobs", "2")
    assert r.returncode == 1
    assert "cell@b" in r.stderr and "1 stage(s) failed" in r.stderr
    assert not (repo / "last.json").exists()
    changed = json.loads(_dvc(repo, "status", "--json"))
    assert {"first", "cell@a"}.isdisjoint(changed), changed  # what finished is recorded
    assert {"cell@b", "last"} <= set(changed)
    r = _run(repo, "--jobs", "2", "--keep-going")  # runs c, which does not need b
    assert r.returncode == 1 and "cell@b" in r.stderr
    assert set(json.loads(_dvc(repo, "status", "--json"))) == {"cell@b", "last"}
    (repo / "fail.txt").write_text("")
    plan = _run(repo, "--dry")
    assert plan.stdout.split() == ["1", "core", "cell@b", "all", "last"]
    assert _run(repo).returncode == 0 and "up to date" in _dvc(repo, "status")


def test_first_orders_ready_stages(repo: Path):
    plan = _run(repo, "--dry", "--first", "cell@c", "--first", "cell@b")
    names = [line.split()[-1] for line in plan.stdout.splitlines()]
    assert names == ["first", "cell@c", "cell@b", "cell@a", "last"]


def test_what_wanted_stages_need_starts_before_a_ready_unwanted_stage():
    """A fresh clone's study: the scratch cells are ready at once, the wanted ones wait on the pretrained
    student; the pretrained student must start before the scratch cells, not after all of them."""
    from pipeline.repro import Plan

    needs = {"solo-1": set(), "solo-2": set(), "shared": {"data"}, "data": set(), "cell": {"shared"}}
    p = Plan(list(needs), needs, {"solo-1", "solo-2", "cell"})
    p.prioritise(("cell", "solo-*"))
    assert p.order == ["data", "shared", "cell", "solo-1", "solo-2"]


def test_recorded_stages_up_to_date_once_what_they_need_is_rebuilt_are_not_launched(repo: Path, monkeypatch):
    """A fresh clone rebuilds the shared artifacts (deterministic, so their hashes match dvc.lock): the
    finished cells, reported changed while those were missing, must not each be launched through DVC."""
    assert _run(repo, "--jobs", "2").returncode == 0
    (repo / "first.json").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")  # nor can DVC restore it: a clone has no cache
    (repo / "events.txt").unlink()
    logs = repo / ".dvc" / "tmp" / "repro-logs"
    for log in logs.glob("*.log"):
        log.unlink()
    assert _run(repo, "--dry").stdout.split()[-2:] == ["all", "last"]  # all five reported changed
    from pipeline.repro import plan

    # Asked again once "first" has run: not "first" itself, whose output is missing, so it runs regardless.
    monkeypatch.chdir(repo)  # DVC resolves the target against the working directory
    assert plan(".", "dvc.yaml").recorded == {"cell@a", "cell@b", "cell@c", "last"}
    r = _run(repo, "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _events(repo) == [("start", "first"), ("end", "first")]
    assert sorted(_stage_of(p) for p in logs.glob("*.log")) == ["first"], r.stdout + r.stderr  # none to DVC
    assert "up to date now: 3" in r.stderr + r.stdout and "up to date now: 1" in r.stderr + r.stdout
    # The plan's count says how many of the stages "to run" may turn out current.
    assert "5 stage(s) to run, 3 of them up to 2 at a time; 4 recorded before" in r.stdout, r.stdout
    assert "up to date" in _dvc(repo, "status")


def test_recorded_stages_stale_because_a_rebuilt_input_differs_say_which(repo: Path):
    """A fresh machine whose rebuilt teacher differs in its last bits makes every recorded cell stale: the
    run says which rebuilt input differs before the cells rerun, and says nothing when none does."""
    assert _run(repo, "--jobs", "2").returncode == 0
    (repo / "first.json").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    same = _run(repo, "--jobs", "2")
    assert same.returncode == 0 and "rerunning" not in same.stderr + same.stdout  # rebuilt to the same bytes
    (repo / "first.json").unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "salt.txt").write_text("-other-bits")
    r = _run(repo, "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stderr + r.stdout
    assert "rerunning 3 recorded stage(s): first.json, rebuilt in this run" in out, out
    assert (repo / "cell-a.json").read_text() == "a-other-bits"  # and they did rerun


def test_a_recorded_stage_is_asked_about_while_another_stage_runs(tmp_path: Path):
    """The recheck comes when a recorded stage's needs are rebuilt, typically while other one-core stages
    still run. Asking DVC about the whole file read-locked the running stage's outputs and failed with
    LockError, which stopped the scheduler with stages left running."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    _dvc(tmp_path, "init", "-q")
    (tmp_path / "step.py").write_text(STEP)
    (tmp_path / "fail.txt").write_text("")
    (tmp_path / "dvc.yaml").write_text(
        textwrap.dedent("""
        stages:
          slow:
            meta: {cores: 1}
            cmd: python step.py slow slow.json 8
            outs: [slow.json]
          first:
            meta: {cores: 1}
            cmd: python step.py first first.json 3
            outs: [first.json]
          rec:
            meta: {cores: 1}
            cmd: python step.py rec rec.json
            deps: [first.json]
            outs:
              - rec.json:
                  cache: false
    """)
    )
    assert _run(tmp_path, "--jobs", "2").returncode == 0
    for name in ("first.json", "slow.json", "events.txt"):
        (tmp_path / name).unlink()
    shutil.rmtree(tmp_path / ".dvc" / "cache")  # a fresh clone: first and slow rebuilt, rec recorded
    r = _run(tmp_path, "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "up to date now: 1 recorded stage(s)" in r.stdout + r.stderr
    assert sorted(_events(tmp_path)) == sorted([("start", "slow"), ("end", "slow"), ("start", "first"),
                                                ("end", "first")])  # fmt: skip
    assert _events(tmp_path).index(("end", "first")) < _events(tmp_path).index(("end", "slow"))


def _stage_of(log: Path) -> str:
    """The stage a runner log belongs to (``log_path``: the name, then a hash of it)."""
    return log.stem.rsplit("-", 1)[0]


def test_stage_names_that_differ_only_in_what_a_file_name_cannot_hold_get_their_own_logs():
    from pipeline.repro import log_path

    assert log_path("s@x y") != log_path("s@x_y") and _stage_of(log_path("s@x y")) == "s@x_y"


def test_an_interrupt_while_a_stage_starts_leaves_it_tracked_not_running_on_its_own(
    tmp_path: Path, monkeypatch
):
    """Ctrl-C right after the stage's process started, before the runner recorded it: the stage went on after
    "stopped". It is held until the stage is tracked, then drains as any interrupt does."""
    from pipeline import repro

    monkeypatch.chdir(tmp_path)
    real = subprocess.Popen

    def popen(*a, **k):
        monkeypatch.setattr(repro.subprocess, "Popen", real)
        p = real(*a, **k)
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, arriving right after the fork
        return p

    monkeypatch.setattr(repro.subprocess, "Popen", popen)
    plan = repro.Plan(["s"], {"s": set()}, {"s"})
    cmd = lambda name: [sys.executable, "-c", "import time; time.sleep(1); open('done', 'w').write('x')"]  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        repro.run(plan, 1, command=cmd)
    assert (tmp_path / "done").exists()  # awaited before the runner returned: it did not outlive "stopped"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_lets_running_stages_finish_and_starts_no_more(repo: Path, sig: int):
    """What a study stopped between sittings relies on: Ctrl-C or kill loses no cell that was running."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.repro", "--jobs", "2"], cwd=repo, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    logs = repo / ".dvc" / "tmp" / "repro-logs"
    for _ in range(2400):  # poll (at most ~2 min) until two cells are running
        if sum(what == "start" and name in CELLS for what, name in _events(repo)) == 2:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command to go on" in err
    started = sorted(_stage_of(p) for p in logs.glob("cell@*.log"))
    assert len(started) == 2
    changed = set(json.loads(_dvc(repo, "status", "--json")))
    assert changed == {"cell@a", "cell@b", "cell@c", "last"} - set(started), changed


def test_planning_reads_only_the_pipeline_files_upstream_of_the_target(repo: Path, monkeypatch):
    """make repro's plan must not parse the study's 600-cell pipeline and lock (45 s a plan), yet must see a
    stage in another pipeline file whose output the target needs, even a file inside an output folder."""
    up, down, beside = repo / "up", repo / "down", repo / "beside"
    for d in (up, down, beside):
        d.mkdir()
    (up / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: mkdir -p data && echo x > data/file.txt\n    outs: [data]\n"
    )
    (repo / "raw.txt").write_text("tracked by a .dvc file")
    _dvc(repo, "add", "-q", "raw.txt")
    (repo / "dvc.yaml").write_text(
        textwrap.dedent(PIPELINE).replace("deps: [step.py]", "deps: [step.py, up/data/file.txt, raw.txt]")
    )
    (down / "dvc.yaml").write_text(
        "stages:\n  use:\n    cmd: cat ../last.json > used.txt\n    deps: [../last.json]\n    outs: [used.txt]\n"
    )
    (beside / "dvc.yaml").write_text("stages:\n  other:\n    cmd: echo y > y.txt\n    outs: [y.txt]\n")
    (beside / "dvc.lock").write_text("schema: '2.0'\nstages: [this is: not a lock\n")  # DVC fails on it
    monkeypatch.chdir(repo)
    from dvc.repo import Repo

    from pipeline.dvc_scope import files_in_scope
    from pipeline.repro import plan

    with Repo(str(repo)) as r:
        assert files_in_scope(r, "dvc.yaml") == ["dvc.yaml", "raw.txt.dvc", "up/dvc.yaml"]
        assert files_in_scope(r, "cell@a") == ["dvc.yaml", "raw.txt.dvc", "up/dvc.yaml"]
        assert files_in_scope(r, "down/dvc.yaml") == [
            "down/dvc.yaml",
            "dvc.yaml",
            "raw.txt.dvc",
            "up/dvc.yaml",
        ]
    assert plan(".", "dvc.yaml").order == ["up/dvc.yaml:make", "first", "cell@a", "cell@b", "cell@c", "last"]
    assert plan(".", "down/dvc.yaml").order[-1] == "down/dvc.yaml:use"
    r = _run(repo, "--jobs", "2")  # and the run itself, which DVC records stage by stage, passes
    assert r.returncode == 0, r.stdout + r.stderr
    assert (repo / "last.json").exists() and not (repo / "beside" / "y.txt").exists()


def test_stages_marked_gpu_cores_share_the_machine_only_with_a_gpu():
    """make repro on a GPU machine: the student's pretraining needs only the captions and runs beside the
    teacher's stages, each counted at the host cores it keeps busy; without a GPU each of them uses every
    core and runs alone, as before. One-core stages fill what is left; the first stage that does not fit
    stops the list, so a smaller one behind it never overtakes it."""
    from pipeline.repro import Plan, _to_start, cores_needed

    needs = {"teacher": set(), "student": set(), "extract": {"teacher"}, "cell-1": set(), "cell-2": set()}
    p = Plan(
        list(needs),
        needs,
        {"cell-1", "cell-2"},
        gpu_cores={"teacher": 2, "student": 2, "extract": 6},
        gpu=True,
    )
    assert _to_start(p, ["teacher", "student", "cell-1"], {}, 16) == ["teacher", "student", "cell-1"]
    assert _to_start(p, ["teacher", "student"], {}, 4) == ["teacher", "student"]
    assert _to_start(p, ["teacher", "student", "cell-1"], {}, 4) == ["teacher", "student"]
    assert _to_start(p, ["extract", "cell-1", "cell-2"], {"student": None}, 9) == ["extract", "cell-1"]
    assert _to_start(p, ["extract", "cell-1"], {"student": None, "cell-2": None}, 8) == []  # 3 + 6 > 8
    assert cores_needed(p, "extract", 4) == 4  # more than the machine: it runs alone
    p.gpu = False
    assert [cores_needed(p, n, 16) for n in needs] == [16, 16, 16, 1, 1]
    assert _to_start(p, ["teacher", "student"], {}, 16) == ["teacher"]
    assert _to_start(p, ["cell-1"], {"teacher": None}, 16) == []


def test_gpu_cores_must_be_a_whole_number_of_cores():
    import click

    from pipeline.repro import gpu_cores

    assert gpu_cores({"gpu_cores": 3}) == 3 and gpu_cores({"cores": 1}) is None and gpu_cores(None) is None
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(click.ClickException, match="gpu_cores"):
            gpu_cores({"gpu_cores": bad})


def test_the_default_pipeline_marks_what_can_run_beside_others_on_a_gpu():
    """The teacher's and the student's pretraining, extraction and the zero-shot scores carry gpu_cores; the
    student runs and prepare stay one-core; evaluate (one process per core) and report carry neither."""
    from pipeline.repro import gpu_cores

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    marked = {n: gpu_cores(s.get("meta") or (s.get("do") or {}).get("meta")) for n, s in stages.items()}
    assert {n for n, c in marked.items() if c} == {
        "pretrain_teacher",
        "extract_teacher",
        "pretrain_student",
        "zeroshot",
    }
    assert all(c <= 8 for c in marked.values() if c)  # room beside them on a 16-core GPU machine
    assert stages["train_student"]["meta"] == {"cores": 1} and stages["prepare"]["do"]["meta"] == {"cores": 1}
    assert "meta" not in stages["evaluate"] and "meta" not in stages["report"]


def test_a_dvc_add_tracked_input_is_not_taken_for_a_recorded_stage(tmp_path: Path):
    """A ``.dvc`` file's stage has no name: planning with one changed crashed (AttributeError) where plain
    ``dvc repro`` goes on."""
    from types import SimpleNamespace

    from pipeline.repro import _recorded

    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  a:\n    cmd: run a\n")
    out = SimpleNamespace(fs_path=str(tmp_path / "dvc.lock"))
    pipeline_stage = SimpleNamespace(name="a", addressing="a", path=str(tmp_path / "dvc.yaml"), outs=[out])
    added = SimpleNamespace(addressing="data.dvc", path=str(tmp_path / "data.dvc"), outs=[out])
    assert _recorded([pipeline_stage, added]) == {"a"}
