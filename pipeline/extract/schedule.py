"""Running units: in this process, on a local dask cluster or on a running dask scheduler."""

from __future__ import annotations

import os
import time
from typing import Any

from ..config import usable_cores
from .plan import UnitJob
from .units import run_unit


def local_cluster(n_workers: int, cluster_kwargs: dict | None = None) -> Any:
    """The ``local`` scheduler's LocalCluster: n worker processes, one dask thread each (one unit at a time;
    torch inside it gets the worker's cores), non-daemonic so a unit's DataLoader may start processes.
    dask's worker environment loses ``MALLOC_TRIM_THRESHOLD_``: any explicit trim threshold turns off
    glibc's adaptive mmap threshold, so every large torch buffer became a fresh mmap whose pages fault in
    again (the default repro's extract units: 27.7 s with it, 15.7 s without; ``metrics/extract.json``)."""
    import dask
    from distributed import LocalCluster

    spawn = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    spawn.pop("MALLOC_TRIM_THRESHOLD_", None)
    kwargs = {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"}
    kwargs.update(cluster_kwargs or {})
    with dask.config.set({"distributed.worker.daemon": False, "distributed.nanny.pre-spawn-environ": spawn}):
        return LocalCluster(**kwargs)


# How long the coordinator waits, after the last record, for unit tasks the cluster still runs (cancelled or
# recomputed ones); a unit at ViT-B/16 size takes seconds, a large one minutes.
QUIET_TIMEOUT_S = 600.0


def _running_keys(prefix: str, dask_worker: Any = None) -> list[str]:
    """On a worker: keys starting with ``prefix`` that a thread still executes (cancelled ones included)."""
    state = getattr(dask_worker, "state", None)
    running = getattr(state, "all_running_tasks", ()) if state is not None else ()
    return [str(ts.key) for ts in running if str(ts.key).startswith(prefix)]


def wait_until_idle(client: Any, prefix: str, timeout: float) -> list[str]:
    """Wait until no worker executes a task whose key starts with ``prefix``; the keys still running at
    ``timeout`` (empty when idle). Workers that cannot answer (lost) are not waited for."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            per_worker = client.run(_running_keys, prefix, on_error="ignore")
        except Exception:  # noqa: BLE001 - a closing cluster: nothing left to ask
            return []
        left = [k for keys in per_worker.values() if isinstance(keys, list) for k in keys]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _run_on_threads(jobs: list[UnitJob], n: int, done: Any) -> None:
    """``n`` units at a time on threads of this process, sharing its one teacher. Why: with a GPU teacher a
    unit's host work (decode, shard writes) leaves a core idle while its writer finishes the last shards;
    a second unit fills it (docs/scale.md). Units own whole shards, so threads write disjoint files as
    cluster workers do. The first failure cancels the units not started and is raised once the running
    ones have finished, so nothing still writes when the caller sees it."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(n, thread_name_prefix="clip-td-unit") as pool:
        futures = [pool.submit(run_unit, j) for j in jobs]
        try:
            for fut in as_completed(futures):
                done(fut.result())
        finally:
            for fut in futures:
                fut.cancel()


def run_units(
    jobs: list[UnitJob],
    scheduler: str,
    n_workers: int,
    progress: bool,
    cluster_kwargs: dict,
    torch_threads: int,
) -> list:
    from tqdm import tqdm

    records: list[dict] = []
    bar = tqdm(total=len(jobs), unit="unit", disable=not progress, desc="extract")
    t0, items = time.time(), 0

    def done(rec: dict) -> None:
        nonlocal items
        records.append(rec)
        items += rec["items"]
        bar.update(1)
        bar.set_postfix(items_per_s=f"{items / max(time.time() - t0, 1e-9):.1f}")

    try:
        if scheduler == "sync":
            if n_workers <= 1 or len(jobs) <= 1:
                for job in jobs:
                    done(run_unit(job))
            else:
                _run_on_threads(jobs, n_workers, done)
            return records
        from distributed import Client, as_completed

        cluster = None
        if scheduler == "local":
            cores = usable_cores()
            n = max(1, n_workers)
            threads = torch_threads or max(1, cores // n)
            cluster = local_cluster(n, cluster_kwargs)
            for j in jobs:
                j.threads = threads
            client = Client(cluster)
        else:
            client = Client(scheduler)
        run = f"clip-td-{os.getpid()}-{time.time_ns()}-"  # this run's task keys: ours, on a shared cluster
        try:
            pending = {client.submit(run_unit, j, key=f"{run}{j.name}") for j in jobs}
            try:
                for fut in as_completed(list(pending)):
                    pending.discard(fut)
                    if fut.status == "error":
                        client.cancel(list(pending))
                        fut.result()  # re-raises the unit's exception here
                    done(fut.result())
                    # Released as soon as its record is read: a future the client still holds makes the
                    # scheduler recompute its result when the worker that held it is lost, although the
                    # unit is committed (wasted work, and such a rerun could still be writing after the
                    # store is marked complete and its lock released).
                    fut.release()
                    del fut
            finally:
                # A unit cancelled or recomputed while it runs keeps running on its worker (dask cannot stop
                # a thread): the store is neither marked complete nor unlocked while one still writes.
                if pending:
                    client.cancel(list(pending))
                left = wait_until_idle(client, run, QUIET_TIMEOUT_S)
            if left:
                raise RuntimeError(
                    f"extraction: {len(left)} unit task(s) of this run still running on the cluster after "
                    f"{QUIET_TIMEOUT_S:.0f} s ({', '.join(sorted(left)[:5])}); the store is not marked complete"
                )
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return records
    finally:
        bar.close()
