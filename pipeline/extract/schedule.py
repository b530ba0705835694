"""Running units: in this process, on a local dask cluster or on a running dask scheduler."""

from __future__ import annotations

import os
import time
from typing import Any

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
            for job in jobs:
                done(run_unit(job))
            return records
        from distributed import Client, as_completed

        cluster = None
        if scheduler == "local":
            cores = os.cpu_count() or 1
            n = max(1, n_workers)
            threads = torch_threads or max(1, cores // n)
            cluster = local_cluster(n, cluster_kwargs)
            for j in jobs:
                j.threads = threads
            client = Client(cluster)
        else:
            client = Client(scheduler)
        try:
            futures = [
                client.submit(run_unit, j, key=f"clip-td-{j.name}-{os.getpid()}-{time.time_ns()}")
                for j in jobs
            ]
            for fut in as_completed(futures):
                if fut.status == "error":
                    client.cancel([f for f in futures if not f.done()])
                    fut.result()  # re-raises the unit's exception here
                done(fut.result())
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return records
    finally:
        bar.close()
