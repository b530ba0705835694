"""Shared pieces of the benchmarks: the machine description, a tiny synthetic world, targets and JSON output.

Every benchmark reports *ratios* measured in one process against a baseline run in the same process and
interleaved with it (round-robin, unit by unit or step by step), so that load from other processes on a
shared machine slows both sides alike. Absolute rates are reported too, but only the ratios are targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_TEACHER = str(ROOT / "pipeline" / "model_configs" / "clip-td-tiny.json")
TRAINED_TEACHER = ROOT / "artifacts" / "teacher" / "teacher.pt"
DEFAULT_OUT = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on (ratios travel between machines better than rates, but not fully)."""
    import numpy as np
    import open_clip
    import zarr

    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        # "AMD EPYC" names CPUs with and without AVX-512; torch's kernels (and so rates and float bits) follow
        # the instruction set it dispatches to.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "loadavg_at_start": [round(x, 2) for x in load],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(25th, 50th, 75th percentile); with fewer than two values, that value three times."""
    if len(xs) < 2:
        v = float(xs[0]) if xs else float("nan")
        return v, v, v
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return float(q1), float(q2), float(q3)


@dataclass
class Target:
    """One benchmark target (docs/benchmarks.md): ``value op threshold``."""

    name: str
    value: float
    op: str  # ">=" or "<="
    threshold: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def verdict(self) -> str:
        mark = "PASS" if self.passed else "MISS"
        extra = f" ({self.detail})" if self.detail else ""
        return f"[{mark}] {self.name}: {self.value:.4g} {self.op} {self.threshold:g}{extra}"

    def to_json(self) -> dict:
        return {
            "value": round(self.value, 6),
            "op": self.op,
            "threshold": self.threshold,
            "passed": self.passed,
            "detail": self.detail,
        }


@dataclass
class Result:
    name: str
    settings: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def target(self, *args: Any, **kwargs: Any) -> Target:
        t = Target(*args, **kwargs)
        self.targets.append(t)
        return t

    def write(self, out: str | Path, complete: bool = True) -> Path:
        """``complete=False`` saves what is measured so far, quietly (a run stopped at a time limit keeps it)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        payload = {
            "benchmark": self.name,
            "machine": machine(),
            "seconds": round(time.perf_counter() - self.started, 2),
            "settings": self.settings,
            "measurements": self.measurements,
            "targets": {t.name: t.to_json() for t in self.targets},
        }
        if not complete:
            payload["complete"] = False
        path.write_text(json.dumps(payload, indent=1, sort_keys=False, default=str) + "\n")
        if not complete:
            return path
        for t in self.targets:
            print(f"{self.name}: {t.verdict()}", flush=True)
        print(f"{self.name}: wrote {path} ({payload['seconds']} s)", flush=True)
        return path


def parser(doc: str | None, overrides: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark takes; ``overrides`` adds ``--set KEY=VALUE`` over params.yaml."""
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    if overrides:
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="params override (repeatable)"
        )
    p.add_argument(
        "--out", default=str(DEFAULT_OUT), help="folder for <benchmark>.json (default: %(default)s)"
    )
    p.add_argument("--work", default="", help="scratch folder (default: a temporary folder, removed after)")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run; numbers are noisier)")
    return p


def log(msg: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ the world


def make_world(
    root: str | Path,
    scenes: dict[str, int],
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
) -> list[Path]:
    """Prepared synthetic splits under root (one folder per split), as ``stages.prepare_data`` writes them."""
    from pipeline.config import SyntheticParams
    from pipeline.data import synthetic
    from pipeline.data.shards import DatasetWriter

    root = Path(root)
    sp = SyntheticParams(seed=seed, image_size=image_size, scenes=dict(scenes))
    out = []
    for split in scenes:
        path = root / split
        if not (path / "dataset.json").exists():
            with DatasetWriter(
                path, source="synthetic", split=split, shard_size=shard_size, image_shard_size=shard_size
            ) as w:
                synthetic.generate(split, sp, w)
        out.append(path)
    return out


def cache_params(overrides: tuple[str, ...] = ()):
    """params.yaml's ``cache`` section (what ``make repro`` extracts with), with ``--set`` overrides."""
    from pipeline.config import load_params

    return load_params(ROOT / "params.yaml", overrides).cache


def teacher_weights() -> str:
    """The trained embedded teacher when ``make repro`` has made one, else "" (random init)."""
    return str(TRAINED_TEACHER) if TRAINED_TEACHER.is_file() else ""


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class Scratch:
    """``--work`` or a temporary folder removed on exit."""

    def __init__(self, work: str = "", prefix: str = "clip-td-bench-"):
        import tempfile

        self._tmp = None if work else tempfile.TemporaryDirectory(prefix=prefix)
        self.path = Path(work) if work else Path(self._tmp.name)
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
