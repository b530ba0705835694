"""Extraction on a dask cluster a user starts (``dask scheduler`` + ``dask worker`` processes on the loopback)
with one worker SIGKILLed while it holds a unit: the run completes, the lost unit is recomputed by the other
worker, both workers committed units, no unit the lost worker had committed is computed again, and the
store passes verification and equals a one-process extraction.

The workers share nothing with the coordinator but the store path and the dataset paths. Which worker holds
which unit is the scheduler's choice, so the victim is made to hold one deterministically: a ``--preload``
module (a stock ``dask worker`` option) wraps ``run_unit`` in the victim only, so that its second unit
writes a marker naming the unit and its pid and then waits; the test SIGKILLs the victim once the marker is
there. The victim runs without a nanny, so it stays dead, as a lost machine does, and the survivor must
finish the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from pipeline import cache as C
from pipeline import extract as X
from pipeline.teacher import create_teacher
from stages.verify_cache import main as verify_main
from tests.test_extract import TINY_CFG
from tests.test_reliability import UNIT_SETS, assert_same_store, build_dataset, cache_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# 8 image units of 2 rows and ~10 text units (UNIT_SETS): enough for both workers to get several.
N_IMAGES = 16

# Wraps run_unit where dask will look it up (the function is pickled by reference to its defining module).
# The victim's second unit announces itself and waits to be killed; only once per store (MARK), so it can
# never hold a unit a rerun needs.
PRELOAD = """
import os, sys, time
from pathlib import Path
import pipeline.extract as X

if not getattr(X.run_unit, "_clip_td_test_wrapped", False):  # dask may import a preload file twice
    from distributed import get_worker

    MARK, LOG, HOLD = Path({mark!r}), Path({log!r}), {hold!r}
    _real = X.run_unit
    _count = 0
    _first = []

    def run_unit(job):
        global _count
        _count += 1
        worker = get_worker()
        if _count == 1:
            _first.append(worker.get_current_task())
        if HOLD and _count == 2 and not MARK.exists():
            # Held until the coordinator has read the first unit's record and let its result go (the
            # scheduler then frees it here), or 600 polls: the kill must not race the read of a finished unit.
            for _ in range(600):
                if _first[0] not in worker.state.tasks:
                    break
                time.sleep(0.05)
            tmp = MARK.with_name(MARK.name + ".tmp")
            tmp.write_text(job.name + " " + str(os.getpid()))
            os.replace(tmp, MARK)
            time.sleep(600)
        rec = _real(job)
        with LOG.open("a") as f:
            f.write(job.name + "\\n")
        return rec

    run_unit.__module__, run_unit.__qualname__ = _real.__module__, _real.__qualname__
    run_unit._clip_td_test_wrapped = True
    X.run_unit = run_unit
    setattr(sys.modules[_real.__module__], _real.__name__, run_unit)
"""


def env() -> dict[str, str]:
    # One torch thread everywhere: the teacher's float32 output is then bitwise the one-process run's.
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)


def wait_for(cond, timeout: float, what: str, procs: dict[str, subprocess.Popen], logs: Path) -> None:
    # A hang guard, not a speed check: a bounded number of polls, so a stuck process fails the test.
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        for name, p in procs.items():
            if p.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({p.returncode}) while waiting for {what}:\n{tail(logs)}"
                )
        time.sleep(0.05)
    raise AssertionError(f"gave up after {int(timeout / 0.05)} polls waiting for {what}:\n{tail(logs)}")


def scheduler_address(path: Path) -> str:
    """The address in a dask scheduler file, "" until the scheduler has written all of it."""
    try:
        return json.loads(path.read_text()).get("address", "")
    except (OSError, ValueError):
        return ""


def tail(logs: Path, n: int = 3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in sorted(logs.glob("*.log")))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cluster")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    ckpt = root / "teacher.pt"
    torch.save(create_teacher(str(cfg), "").model.state_dict(), ckpt)
    ds = build_dataset(root / "data" / "train", N_IMAGES)
    spec = X.TeacherSpec(str(cfg), str(ckpt), "fp32", "cpu")
    ref = str(root / "one-process.zarr")
    X.extract([ds], ref, spec, cache_params(), scheduler="sync", progress=False)
    return {"root": root, "cfg": str(cfg), "ckpt": str(ckpt), "ds": ds, "reference": ref}


def test_worker_killed_mid_unit_on_a_user_started_cluster(world, tmp_path):
    from distributed import Client

    logs = tmp_path / "logs"
    logs.mkdir()
    mark = tmp_path / "victim-holds-unit"
    done = {w: tmp_path / f"{w}-units.txt" for w in ("victim", "survivor")}  # units each worker finished
    for w in done:
        (tmp_path / f"{w}_preload.py").write_text(
            PRELOAD.format(mark=str(mark), log=str(done[w]), hold=w == "victim")
        )
    py = sys.executable
    procs: dict[str, subprocess.Popen] = {}
    try:
        # Port 0: the scheduler picks a free port and writes its address to the scheduler file (no race
        # with other processes for a port chosen here).
        sched_file = tmp_path / "scheduler.json"
        procs["scheduler"] = spawn(
            [py, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(sched_file)],
            logs / "scheduler.log",
        )  # fmt: skip
        wait_for(lambda: scheduler_address(sched_file), 60, "the scheduler's address", procs, logs)
        addr = scheduler_address(sched_file)
        worker = [py, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1", "--no-nanny",
                  "--no-dashboard", "--host", "127.0.0.1", "--death-timeout", "60",
                  "--local-directory", str(tmp_path / "dask")]  # fmt: skip
        for w in done:
            procs[w] = spawn(
                [*worker, "--name", w, "--preload", str(tmp_path / f"{w}_preload.py")], logs / f"{w}.log"
            )
        with Client(addr, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)

        store = str(tmp_path / "cluster.zarr")
        metrics = tmp_path / "extract.json"
        (tmp_path / "defaults.yaml").write_text("")  # the dataclass defaults, plus UNIT_SETS
        args = [py, "-m", "stages.extract_teacher", "--shards", str(world["ds"].path), "--out", store,
                "--model", world["cfg"], "--pretrained", world["ckpt"], "--scheduler", addr,
                "--device", "cpu", "--metrics", str(metrics), "--params", str(tmp_path / "defaults.yaml"),
                "--quiet"]  # fmt: skip
        for s in UNIT_SETS:
            args += ["--set", s]
        stage = spawn(args, logs / "stage.log")
        procs["stage"] = stage

        wait_for(mark.exists, 120, "the victim to hold its second unit", procs, logs)
        held, pid = mark.read_text().split()
        assert int(pid) == procs["victim"].pid
        before = C.committed_units(store)
        assert held not in before  # it holds the unit: computing, not committed
        procs["victim"].send_signal(signal.SIGKILL)
        procs["victim"].wait(timeout=30)

        assert stage.wait(timeout=180) == 0, tail(logs)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    units = C.committed_units(store)
    ran = {w: f.read_text().split() if f.exists() else [] for w, f in done.items()}
    victim, survivor = procs["victim"].pid, procs["survivor"].pid
    # Both workers computed units: the victim committed at least one before it held the unit it was killed
    # with, and that lost unit was recomputed and committed by the survivor (the manifest records the pid).
    assert ran["victim"] and all(before[u]["pid"] == victim for u in ran["victim"] if u in before), ran
    assert held not in ran["victim"] and held in ran["survivor"]
    assert units[held]["pid"] == survivor
    assert set(units) == set(ran["victim"]) | set(ran["survivor"])
    # No unit the victim had committed was computed again: the coordinator lets each unit's result go once
    # it has read the record, so the scheduler does not rerun finished units of a lost worker.
    recomputed = sorted(set(ran["victim"]) & set(ran["survivor"]))
    print(f"victim ran {ran['victim']}, held {held}; survivor ran {len(ran['survivor'])} units; recomputed "
          f"after the kill: {recomputed}")  # fmt: skip
    assert not recomputed, f"committed units recomputed after the kill: {recomputed}"
    m = json.loads(metrics.read_text())
    assert m["units_computed"] == m["units_total"] == len(units)
    assert not (Path(store) / C.LOCK_FILE).exists()
    # The verify-cache stage, as a user would run it after a lost worker.
    check = CliRunner().invoke(verify_main, [store])
    assert check.exit_code == 0, check.output
    assert_same_store(store, world["reference"])
