"""benchmarks/bench_repro.py times make repro's stage commands where DVC is not installed: it must run the
stages DVC would run, with the same dependencies, and the commands dvc.yaml gives them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO


def test_expanded_stages_and_their_needs_are_dvcs(tmp_path: Path, monkeypatch):
    from dvc.repo import Repo

    from benchmarks.bench_repro import expand, plan

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)  # DVC names stages relative to the working directory
    with Repo(str(tmp_path)) as repo:
        graph = repo.index.graph  # an edge goes from a stage to a stage it depends on
        dvc_needs = {s.addressing: {d.addressing for d in graph.successors(s)} for s in graph}
        dvc_cmds = {s.addressing: s.cmd for s in graph}
    stages = expand(
        yaml.safe_load((REPO / "dvc.yaml").read_text()), yaml.safe_load((REPO / "params.yaml").read_text())
    )
    assert plan(stages).needs == dvc_needs
    assert {n: s["cmd"] for n, s in stages.items()} == dvc_cmds
    assert len(stages) > 30  # the matrix of student cells was expanded, not taken as one stage


def test_argv_runs_the_stage_with_this_interpreter():
    from benchmarks.bench_repro import argv

    assert argv("python -m stages.report --out 'a b'") == [
        sys.executable,
        "-m",
        "stages.report",
        "--out",
        "a b",
    ]
    assert argv("make x") == ["make", "x"]


def test_the_runner_runs_given_commands_and_records_each_stages_seconds(tmp_path, monkeypatch):
    """bench_repro's use of pipeline.repro.run: its own argv per stage (no DVC), in dependency order, and
    each finished stage's wall seconds."""
    from pipeline.repro import Plan, run

    monkeypatch.chdir(tmp_path)
    needs = {"a": set(), "b": {"a"}}
    write = "import sys; open('order.txt', 'a').write(sys.argv[1])"
    seconds: dict[str, float] = {}
    failed = run(
        Plan(["a", "b"], needs, {"a", "b"}),
        2,
        command=lambda n: [sys.executable, "-c", write, n],
        seconds=seconds,
    )
    assert failed == [] and (tmp_path / "order.txt").read_text() == "ab"
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())


def test_the_stage_records_are_kept_beside_the_result(tmp_path):
    """A lent machine is gone after its run: the stages' metrics, every run's train.json and each stage's log
    come back with repro.json (what explains a stage's seconds), nothing else of the run's tree."""
    from benchmarks.bench_repro import keep_stage_records
    from pipeline.repro import LOG_DIR

    work = tmp_path / "work"
    files = {
        "metrics/extract.json": "{}",
        "runs/vqa-full-baseline-s0/train.json": "{}",
        f"{LOG_DIR}/extract_teacher.log": "done",
        "runs/vqa-full-baseline-s0/student.pt": "weights",
        "artifacts/teacher/teacher.pt": "weights",
    }
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    assert keep_stage_records(work, tmp_path / "out") == 3
    kept = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert kept == sorted(list(files)[:3])


def test_a_run_stopped_at_its_time_limit_still_writes_what_finished(tmp_path, monkeypatch):
    """gpu_check.sh stops bench_repro at its time limit with two SIGTERMs, which pipeline.repro.run turns
    into KeyboardInterrupt once the running stages are stopped: the stages that finished and the stage
    records still come back, no make-repro time is claimed, and the exit status says it did not finish."""
    import json
    import signal

    from benchmarks import bench_repro
    from pipeline import repro

    def stopped(plan, jobs, command=None, seconds=None, **_):
        seconds["prepare@train"] = 3.0
        (Path.cwd() / "metrics").mkdir()
        (Path.cwd() / "metrics" / "teacher.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(repro, "run", stopped)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    rc = bench_repro.main(["--out", str(out), "--work", str(tmp_path / "work"), "--minutes", "5"])
    assert signal.getsignal(signal.SIGTERM) == before  # ignored only while it wrote what it measured
    got = json.loads((out / "repro.json").read_text())
    assert rc == 1 and got["measurements"]["stopped"] is True
    assert got["measurements"]["stage_seconds"] == {"prepare@train": 3.0}
    assert got["targets"] == {}
    assert (out / "repro-stages" / "metrics" / "teacher.json").is_file()
