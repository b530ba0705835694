"""``dvc repro`` with several one-core stages at a time: ``python -m pipeline.repro [--jobs N] [dvc.yaml]``.

Why: the student stages train on one torch thread (``train.threads: 1``, fastest for the embedded student
beside its prefetch thread), so plain ``dvc repro``, which runs one stage at a time, leaves every other core
idle through the longest part of ``make repro`` and of the study. Two student stages side by side on 2 cores
train 1.76x as many steps per second as one (docs/time-budget.md).

How: the stages a pipeline file needs (its own and everything upstream of them, in any dvc.yaml of the
repository; DVC reads only those files, pipeline/dvc_scope.py) are asked ``dvc status`` once; the changed ones
and everything downstream of them are run in dependency order, each by ``dvc --wait-for-lock repro
--single-item <stage>`` (through pipeline/dvc_lockfile.py, which only makes DVC's reads and updates of
dvc.lock cheaper), so DVC itself checks, runs and records every stage in dvc.lock exactly as a plain ``dvc
repro`` would (DVC releases its repository lock while a stage's command runs). A stage runs beside others only
when its dvc.yaml entry says it uses one core (``meta: {cores: 1}``); every other stage (the teacher's
pretraining, extraction, which use all cores) runs alone, except on a machine with a CUDA device: there a
stage whose entry says how many host cores it keeps busy while the GPU does its work (``meta: {gpu_cores:
N}``) runs beside others as long as the cores of all running stages add up to at most ``--jobs``, so the
student's pretraining, which needs only the captions, trains beside the teacher's stages. A stage that a
wanted one needs starts as early as the most wanted stage that needs it. A stage that DVC recorded before but
reported changed because something upstream was missing (a fresh clone rebuilding shared artifacts) is asked
again once what it needs has run: DVC finds most such stages up to date then, and they are not launched; those
still changed because an input rebuilt in this run differs from the one they were recorded with (a metrics
file's timings; a trained artifact rebuilt on another CPU) are named before they rerun. Each stage's output
goes to a log under ``.dvc/tmp/repro-logs/``; a failed stage stops new launches (``--keep-going`` runs
everything that does not depend on it), lets the running ones finish, and the command exits 1 naming the stage
and the tail of its log. An interrupt (Ctrl-C, SIGINT) starts no more stages and lets the running ones finish
and be recorded; a second one stops them. The next run redoes only what is not recorded as finished."""

from __future__ import annotations

import fnmatch
import graphlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
import yaml

from pipeline.config import usable_cores

LOG_DIR = Path(".dvc/tmp/repro-logs")


@dataclass
class Plan:
    """The stages to run (addressing names, in a dependency order), what each waits for, and which may share
    the machine."""

    order: list[str]
    needs: dict[str, set[str]] = field(default_factory=dict)
    one_core: set[str] = field(default_factory=set)
    # Stages with an entry in their dvc.lock and their outputs on disk: changed only because something
    # upstream is, they may be up to date once it has run (run() asks again before launching them).
    recorded: set[str] = field(default_factory=set)
    # What each stage writes (absolute paths): a recorded stage still changed after one of these was rebuilt
    # names it (run()).
    outs: dict[str, set[str]] = field(default_factory=dict)
    # Host cores a stage keeps busy when a GPU does its work (``meta: {gpu_cores: N}``), counted only when
    # ``gpu`` is set (the machine running the plan has a CUDA device); otherwise such a stage uses every core.
    gpu_cores: dict[str, int] = field(default_factory=dict)
    gpu: bool = False

    def prioritise(self, first: tuple[str, ...] = ()) -> None:
        """Put ``order`` in the order the stages will start: every stage after what it needs; among those
        ready, the ones matching an earlier ``first`` glob first (a study run over several sittings
        finishes its most wanted cells first), a stage that others need as early as the earliest of them
        (else a ready unwanted cell would start before the shared artifact the wanted ones wait on); ties
        keep dvc.yaml's order."""
        rank = {n: i for i, n in enumerate(self.order)}

        def hit(name: str) -> int:
            hits = [i for i, pat in enumerate(first) if fnmatch.fnmatchcase(name.split(":")[-1], pat)]
            return hits[0] if hits else len(first)

        prio = {n: hit(n) for n in self.order}
        # Dependents before what they need (static_order yields needs first), so priorities flow down chains.
        for name in reversed(list(graphlib.TopologicalSorter(self.needs).static_order())):
            for need in self.needs[name]:
                prio[need] = min(prio[need], prio[name])
        left, emitted, self.order = sorted(self.order, key=lambda n: (prio[n], rank[n])), set(), []
        while left:  # the first wanted stage whose needs come before it, so --dry prints the run order
            name = next(n for n in left if self.needs[n] <= emitted)
            left.remove(name)
            emitted.add(name)
            self.order.append(name)


OUTPUT_KEYS = ("outs", "metrics", "plots")  # what a stage definition lists that the stage writes


def entry_paths(entries: Iterable | None) -> list[str]:
    """The paths a stage definition's deps/outs/metrics/plots list names: each entry a path, or a one-key
    mapping of a path to its options."""
    paths = []
    for entry in entries or ():
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, dict):
            paths.extend(str(k) for k in entry)
    return paths


def overlaps(a: str, b: str) -> bool:
    """One normalised path is, holds or lies inside the other: a stage depending on one needs the stage
    writing the other."""
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def one_core(meta: object) -> bool:
    """Whether a dvc.yaml entry's ``meta`` marks a one-core stage (``meta: {cores: 1}``)."""
    return isinstance(meta, dict) and meta.get("cores") == 1


def gpu_cores(meta: object) -> int | None:
    """``meta: {gpu_cores: N}`` of a dvc.yaml entry (N >= 1), else None; anything else there is refused by
    name, so a typo does not silently run a stage alone."""
    if not isinstance(meta, dict) or "gpu_cores" not in meta:
        return None
    n = meta["gpu_cores"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise click.ClickException(f"meta.gpu_cores = {n!r}: expected a whole number of cores >= 1")
    return n


def cuda_available() -> bool:
    """Whether this machine has a CUDA device the stages will use (torch's answer, as theirs is)."""
    import torch

    return torch.cuda.is_available()


def plan(root: str | Path, target: str, first: tuple[str, ...] = ()) -> Plan:
    """What ``dvc repro target`` would run: the target file's stages and their upstream stages that
    ``dvc status`` reports changed, plus everything downstream of those within that set, in the order they
    will start (``Plan.prioritise``)."""
    import networkx as nx

    from pipeline.dvc_scope import scoped_repo

    # Only the pipeline files the target needs (pipeline/dvc_scope.py); another dvc (a stage finishing) may
    # hold the repository lock.
    with scoped_repo(root, target, _wait_for_lock=True) as repo:
        graph = repo.index.graph  # an edge goes from a stage to a stage it depends on
        in_target = [s for s in graph if s.path_in_repo == target or s.addressing == target]
        if not in_target:
            raise click.ClickException(
                f"{target}: no DVC stage is defined there (a dvc.yaml or a stage name)"
            )
        wanted = set(in_target)
        for s in in_target:
            wanted |= nx.descendants(graph, s)
        by_name = {s.addressing: s for s in wanted}
        changed = _changed(repo, target) & set(by_name)
    todo = {by_name[n] for n in changed}
    for s in list(todo):
        todo |= {a for a in nx.ancestors(graph, s) if a in wanted}
    recorded = _recorded(list(todo))
    sub = graph.subgraph(todo)
    defined = {s: i for i, s in enumerate(graph)}  # the order of dvc.yaml files and their entries
    order = [s.addressing for s in sorted(todo, key=defined.__getitem__)]
    needs = {s.addressing: {d.addressing for d in sub.successors(s)} for s in todo}
    outs = {s.addressing: {os.path.abspath(o.fs_path) for o in s.outs} for s in todo}
    on_gpu = {s.addressing: n for s in todo if (n := gpu_cores(getattr(s, "meta", None))) is not None}
    p = Plan(
        order,
        needs,
        {s.addressing for s in todo if one_core(getattr(s, "meta", None))},
        recorded,
        outs,
        on_gpu,
    )
    p.prioritise(first)
    return p


def _status(repo, target: str) -> dict:
    # One status call for the whole file (one per stage is quadratic in DVC: minutes for the study).
    return repo.status(targets=[target], with_deps=True)


def _changed(repo, target: str) -> set[str]:
    return set(_status(repo, target))


def _recorded(stages) -> set[str]:
    """The stages with an entry in their dvc.lock and every output on disk (each lock file read once): one
    with an output missing will run whatever status says once its needs are rebuilt."""
    entries: dict[Path, set[str]] = {}
    for stage in stages:
        lock = Path(stage.path).with_name("dvc.lock")
        if lock not in entries:
            try:
                loaded = yaml.load(lock.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
                entries[lock] = set((loaded or {}).get("stages") or {})
            except OSError:
                entries[lock] = set()
    return {
        s.addressing
        for s in stages
        if getattr(s, "name", None) in entries[Path(s.path).with_name("dvc.lock")]  # a .dvc file's has none
        and all(os.path.exists(o.fs_path) for o in s.outs)
    }


def still_changed(root: str | Path, target: str, names: list[str]) -> dict[str, set[str]]:
    """Which of ``names`` DVC now reports changed (the rest are up to date and need not run), each with the
    absolute paths of the deps DVC reports changed."""
    from pipeline.dvc_scope import scoped_repo

    with scoped_repo(root, target, _wait_for_lock=True) as repo:
        # The asked stages' own status, not the whole file's: DVC read-locks the deps and outputs of every
        # stage it asks about without waiting, and each running `dvc repro` holds its outputs' write lock,
        # so a whole-file status while another stage ran failed with LockError and stopped the scheduler.
        # Their needs have finished, so nothing running holds what they read. One parse, then per stage:
        # 12 s for the study's 615 stages against 23 s for the whole file, while repo.status given them as
        # targets re-collects each (54 s for 100): benchmarks/results/recheck/.
        asked = set(names)
        stages = {s.addressing: s for s in repo.index.stages if s.addressing in asked}
        status: dict = {}
        with repo.lock:
            for stage in stages.values():
                status.update(stage.status())
        changed = {}
        for name in set(names) & set(status):
            keys = {k for e in status[name] if isinstance(e, dict) for k in e.get("changed deps") or {}}
            deps = stages[name].deps if name in stages else []
            changed[name] = {os.path.abspath(d.fs_path) for d in deps if d.def_path in keys}
        return changed


def _rebuilt_inputs(stale: Mapping[str, set[str]], outs: Iterable[str]) -> set[str]:
    """The changed deps of ``stale`` that are (or lie inside) ``outs``: inputs this run rebuilt."""
    outs = list(outs)
    return {
        d
        for deps in stale.values()
        for d in deps
        if any(d == o or d.startswith(o.rstrip(os.sep) + os.sep) for o in outs)
    }


def log_path(stage: str) -> Path:
    """The stage's log; a short hash of the whole name keeps apart names that differ only in characters a
    file name cannot hold ("s@x y" and "s@x_y" ran side by side into one log)."""
    tag = hashlib.sha1(stage.encode()).hexdigest()[:8]
    return LOG_DIR / f"{re.sub(r'[^A-Za-z0-9_.@-]+', '_', stage)}-{tag}.log"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Running:
    proc: subprocess.Popen
    log: Path
    start: float


def cores_needed(plan: Plan, name: str, jobs: int) -> int:
    """The cores a stage takes of the ``jobs`` a run shares out: 1 for a one-core stage, its ``gpu_cores``
    on a machine with a GPU, else all of them."""
    if name in plan.one_core:
        return 1
    if plan.gpu and name in plan.gpu_cores:
        return min(jobs, plan.gpu_cores[name])
    return jobs


def _to_start(plan: Plan, ready: list[str], running: dict, jobs: int) -> list[str]:
    """Which ready stages start now, in order, while the cores of the running and starting stages add up to
    at most ``jobs`` (``cores_needed``): one-core stages side by side, a stage that uses every core only on
    an idle machine and then nothing beside it. The first stage that does not fit stops the list, so a
    wanted stage is never overtaken by a smaller one behind it."""
    used = sum(cores_needed(plan, n, jobs) for n in running)
    starting = []
    for name in ready:
        need = cores_needed(plan, name, jobs)
        if used and used + need > jobs:
            break
        starting.append(name)
        used += need
    return starting


def dvc_repro(dvc: Sequence[str]) -> Callable[[str], list[str]]:
    """The argv that has DVC (``dvc``: its command line) run and record one stage."""
    return lambda name: [*dvc, "--wait-for-lock", "repro", "--single-item", name]


def run(
    plan: Plan,
    jobs: int,
    command: Callable[[str], Sequence[str]] | None = None,
    keep_going: bool = False,
    echo=click.echo,
    recheck: Callable[[list[str]], Mapping[str, set[str]]] | None = None,
    seconds: dict[str, float] | None = None,
) -> list[str]:
    """Run the plan with at most ``jobs`` cores' worth of stages at a time (``_to_start``). Before a
    recorded stage (``plan.recorded``) first becomes ready, ``recheck`` (given the newly ready ones, it
    returns those still changed, each with its changed deps' absolute paths) drops the ones now up to date,
    and says so when the rest are stale because an input this run rebuilt hashes differently. Returns the
    stages that failed (empty when all passed); raises KeyboardInterrupt when it was stopped. ``command``
    gives the argv that runs a stage (default: plain ``dvc repro --single-item``; benchmarks.bench_repro runs
    the bare commands where DVC is not installed). ``seconds``, when given, receives each finished stage's
    wall seconds."""
    command = command or dvc_repro(("dvc",))
    from tqdm import tqdm

    LOG_DIR.mkdir(parents=True, exist_ok=True)
    pending, done, failed, ran = list(plan.order), set(), [], set()
    asked = {n for n in pending if not plan.needs[n]}  # the plan's status call is fresh for these
    running: dict[str, Running] = {}
    bar = tqdm(total=len(pending), unit="stage", desc="stages", disable=not pending)

    # An interrupt that lands while a stage is being started is held until it is in ``running``: raised in
    # between, it left the stage running, untracked, after "stopped". (Not a signal mask: the stage would
    # inherit it, and a second interrupt could not stop it.)
    starting = {"now": False, "interrupted": False}

    def launch(name: str) -> None:
        log = log_path(name)
        starting["now"] = True
        try:
            with open(log, "w") as fh:
                # A process group of its own: an interrupt here stops the stage's whole command, not only dvc.
                proc = subprocess.Popen(
                    command(name),
                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
            running[name] = Running(proc, log, time.monotonic())
            pending.remove(name)
        finally:
            starting["now"] = False
        if starting["interrupted"]:
            starting["interrupted"] = False
            raise KeyboardInterrupt

    def reap() -> None:
        for name, r in list(running.items()):
            rc = r.proc.poll()
            if rc is None:
                continue
            del running[name]
            secs = time.monotonic() - r.start
            if seconds is not None:
                seconds[name] = secs
            bar.update(1)
            if rc == 0:
                done.add(name)
                ran.add(name)
                bar.write(f"done    {name} ({secs:.0f} s)")
            else:
                failed.append(name)
                bar.write(f"FAILED  {name} (exit {rc} after {secs:.0f} s); log {r.log}:\n{_tail(r.log)}")

    def stop_now() -> None:
        for r in running.values():
            try:
                os.killpg(r.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        for r in running.values():
            r.proc.wait()

    def interrupt(signum, frame):
        if starting["now"]:
            starting["interrupted"] = True
            return
        raise KeyboardInterrupt

    # SIGTERM (kill, a scheduler ending a sitting) drains like Ctrl-C; SIGINT is set explicitly because a
    # shell starts background jobs with it ignored, and `make study &` must still stop cleanly.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    draining = False
    try:
        while pending or running:
            try:
                if not (draining or (failed and not keep_going)):
                    ready = [n for n in pending if plan.needs[n] <= done]
                    # Running stages go on meanwhile; this costs one `dvc status` (minutes for the study),
                    # against seconds of DVC's own work per launched stage it would find up to date.
                    while recheck is not None:
                        ask = [n for n in ready if n in plan.recorded and n not in asked]
                        if not ask:
                            break
                        asked.update(ask)
                        stale = recheck(ask)
                        for name in ask:
                            if name not in stale:
                                pending.remove(name)
                                done.add(name)
                                bar.update(1)
                        if len(stale) < len(ask):
                            bar.write(f"up to date now: {len(ask) - len(stale)} recorded stage(s), not run")
                        rebuilt = _rebuilt_inputs(stale, (o for n in ran for o in plan.outs.get(n, ())))
                        if rebuilt:
                            # Expected after a change upstream; with none, a machine resuming the study
                            # rebuilt a trained artifact with other bits and every cell reruns: say which.
                            paths = ", ".join(sorted(os.path.relpath(p) for p in rebuilt))
                            n_because = sum(bool(deps & rebuilt) for deps in stale.values())
                            bar.write(
                                f"rerunning {n_because} recorded stage(s): {paths}, rebuilt in this run, "
                                "differs from what they were recorded with. With nothing changed "
                                "upstream, a metrics file differs in the timings it records, and a trained "
                                "artifact when this CPU has other float kernels (docs/study.md, 'Resuming "
                                "on another machine')."
                            )
                        ready = [n for n in pending if plan.needs[n] <= done]
                    for name in _to_start(plan, ready, running, jobs):
                        launch(name)
                if not running:  # stopped, or only stages that need a failed one are left
                    break
                time.sleep(0.2)
                reap()
            except KeyboardInterrupt:
                if draining or not running:
                    stop_now()
                    raise
                # A study stopped between sittings loses no finished work: let the running stages finish.
                draining = True
                bar.write(
                    f"interrupted: finishing the {len(running)} running stage(s), starting no more "
                    "(interrupt again to stop them now; a stopped stage reruns next time)"
                )
    except Exception:  # a fault here (planning, DVC's status) must not leave stages running on their own
        stop_now()
        raise
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if draining:
        raise KeyboardInterrupt
    if failed:
        echo(
            f"{len(failed)} stage(s) failed: {', '.join(failed)}; {len(pending)} not run (they need a failed "
            f"stage{'' if keep_going else ', or were stopped by the failure'}). Logs: {LOG_DIR}/",
            err=True,
        )
    return failed


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("target", default="dvc.yaml")
@click.option(
    "--jobs", "-j", type=click.IntRange(min=0), default=0,
    help="Cores to share out: one-core stages (meta: {cores: 1} in dvc.yaml) run at most this many at a time, "
    "and with a CUDA device stages marked meta: {gpu_cores: N} count N; 0 = one per core.",
)  # fmt: skip
@click.option(
    "--keep-going", "-k", is_flag=True, help="After a failure, still run every stage that does not need it."
)
@click.option(
    "--first", multiple=True, metavar="GLOB",
    help="Start ready stages whose name (without the dvc.yaml path) matches this glob before others; "
    "repeat for an order, e.g. --first 'main@*-lowshot-0.01-*' --first 'main@*-shift-*'.",
)  # fmt: skip
@click.option("--dry", is_flag=True, help="Print the stages that would run, in order, and exit.")
def main(target: str, jobs: int, keep_going: bool, first: tuple[str, ...], dry: bool) -> None:
    """Bring TARGET (a dvc.yaml, default the main pipeline, or one stage) up to date like `dvc repro`, running
    the stages marked as one-core several at a time. Each stage is run and recorded by DVC itself, so a later
    plain `dvc repro` finds everything up to date; an interrupted run resumes at what is not recorded."""
    p = plan(".", target, first)
    jobs = jobs or usable_cores()
    if not p.order:
        click.echo(f"{target}: everything is up to date.")
        return
    p.gpu = bool(set(p.gpu_cores) & set(p.order)) and cuda_available()
    if dry:
        for name in p.order:
            need = cores_needed(p, name, jobs)
            label = "1 core " if name in p.one_core else f"{need} cores" if need < jobs else "all    "
            click.echo(f"{label} {name}")
        return
    line = f"{len(p.order)} stage(s) to run, {len(p.one_core)} of them up to {jobs} at a time"
    if p.gpu:
        beside = [n for n in p.order if n in p.gpu_cores and cores_needed(p, n, jobs) < jobs]
        line += f", {len(beside)} beside others while the GPU does their work"
    if p.recorded:
        # A fresh clone lists every recorded stage whose inputs are still to be rebuilt; most turn out current.
        line += f"; {len(p.recorded)} recorded before, asked again once what they need is rebuilt"
    click.echo(line)
    # DVC itself, with its dvc.lock update made cheap (pipeline/dvc_lockfile.py: the same bytes, seconds
    # instead of the minute the study's lock took).
    dvc = [sys.executable, "-m", "pipeline.dvc_lockfile"]
    try:
        failed = run(
            p, jobs, command=dvc_repro(dvc), keep_going=keep_going,
            recheck=lambda names: still_changed(".", target, names),
        )  # fmt: skip
    except KeyboardInterrupt:
        click.echo("stopped: what finished is recorded in dvc.lock; run the same command to go on.", err=True)
        raise SystemExit(130) from None
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
