"""Collecting the evaluated runs: every eval.json under the runs folder, checked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..conditions import Condition
from .common import ReportError


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_eval(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a readable JSON file: {e}") from e

    def bad(what: str) -> ReportError:
        return ReportError(f"{path}: malformed eval.json: {what}")

    if not isinstance(data, dict):
        raise bad("top level is not an object")
    run = data.get("run")
    if not isinstance(run, dict):
        raise bad("missing 'run' object")
    for key in ("task", "condition", "method"):
        if not isinstance(run.get(key), str) or not run[key]:
            raise bad(f"run.{key} is missing or not a string")
    if not isinstance(run.get("seed"), int) or isinstance(run["seed"], bool):
        raise bad("run.seed is missing or not an integer")
    try:
        Condition.parse(run["condition"])
    except ValueError as e:
        raise bad(f"run.condition: {e}") from None
    if not isinstance(data.get("primary_metric"), str):
        raise bad("primary_metric is missing or not a string")
    if not is_number(data.get("primary")):
        raise bad(f"primary is not a finite number (got {data.get('primary')!r})")
    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("overall", {}), dict):
        raise bad("metrics.overall is missing or not an object")
    if not isinstance(metrics.get("per_domain", {}), dict):
        raise bad("metrics.per_domain is not an object")
    if "train" in data and not isinstance(data["train"], (dict, type(None))):
        raise bad("train is not an object")
    return data


def collect(runs_dir: str | Path) -> list[dict]:
    """Every ``runs_dir/*/eval.json``, validated, as one row per run:
    ``{task, condition, method, seed, primary_metric, primary, overall, per_domain, train, path}``.

    Raises ReportError naming the file when one is malformed, naming both files when two claim the same
    (task, condition, method, seed), and when there is no run at all.
    """
    root = Path(runs_dir)
    paths = sorted(root.glob("*/eval.json")) if root.is_dir() else []
    if not paths:
        raise ReportError(
            f"{root}: no evaluated runs found (expected {root}/<task>-<condition>-<method>-s<seed>/eval.json; "
            "run the evaluate stage first)"
        )
    rows: list[dict] = []
    seen: dict[tuple, Path] = {}
    primary_of_task: dict[str, tuple[str, Path]] = {}
    for path in paths:
        data = _load_eval(path)
        run = data["run"]
        key = (run["task"], run["condition"], run["method"], run["seed"])
        if key in seen:
            raise ReportError(f"{path}: same task/condition/method/seed {key} as {seen[key]}")
        seen[key] = path
        # One table per task ranks methods by one metric; a mix would compare different quantities.
        metric = data["primary_metric"]
        first = primary_of_task.setdefault(run["task"], (metric, path))
        if first[0] != metric:
            raise ReportError(
                f"{path}: primary_metric {metric!r} differs from {first[0]!r} in {first[1]} (same task)"
            )
        metrics = data["metrics"]
        rows.append(
            {
                "task": run["task"],
                "condition": run["condition"],
                "method": run["method"],
                "seed": run["seed"],
                "primary_metric": metric,
                "primary": float(data["primary"]),
                "overall": {k: float(v) for k, v in metrics.get("overall", {}).items() if is_number(v)},
                "per_domain": {
                    d: {k: float(v) for k, v in m.items() if is_number(v)}
                    for d, m in metrics.get("per_domain", {}).items()
                    if isinstance(m, dict)
                },
                "n_test": metrics.get("n"),
                "train": data.get("train") or {},
                "path": str(path),
            }
        )
    return rows
