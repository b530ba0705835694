"""The DVC metrics and plots files: reports/summary.json and reports/plots.json."""

from __future__ import annotations

from collections.abc import Sequence

from .common import ZEROSHOT, lowshot_fraction
from .stats import mean_ci


def _entry(stats: dict) -> dict:
    """The summary.json statistics of one metric in one cell (see the module docstring)."""
    paired = stats["paired"] or {}
    return {
        "n_seeds": stats["n"],
        "mean": stats["mean"],
        "std": stats["std"],
        "delta_mean": paired.get("mean"),
        "ci95": paired.get("ci95"),
        "p": paired.get("p"),
        "rel_gain_pct": stats["gain_pct"],
        "delta_std": paired.get("std"),
        "n_pairs": paired.get("n"),
        "verdict": stats["verdict"],
    }


def summary_metrics(summary: Sequence[dict], zeroshot: dict[str, dict[str, float]] | None = None) -> dict:
    """For `dvc metrics show` and other tools: {task: {condition: {method: entry}}}, one entry per task ×
    condition × method (fields in the module docstring), plus a ``teacher_zeroshot`` entry per measured
    zero-shot score."""
    out: dict = {}
    metric_of: dict[str, str] = {}
    for r in summary:
        metric_of.setdefault(r["task"], r["primary_metric"])
        cell = {
            "task": r["task"],
            "condition": r["condition"],
            "method": r["method"],
            "metric": r["primary_metric"],
            **_entry(r),
            "role": r["role"],
        }
        if r["secondary"]:
            cell["secondary"] = {k: _entry(s) for k, s in r["secondary"].items()}
        out.setdefault(r["task"], {}).setdefault(r["condition"], {})[r["method"]] = cell
    for task, scores in (zeroshot or {}).items():
        for condition, score in scores.items():
            out.setdefault(task, {}).setdefault(condition, {})[ZEROSHOT] = {
                "task": task,
                "condition": condition,
                "method": ZEROSHOT,
                "metric": metric_of.get(task),
                "n_seeds": None,
                "mean": score,
                "std": None,
                "delta_mean": None,
                "ci95": None,
                "p": None,
                "rel_gain_pct": None,
                "role": "ceiling",
            }
    return out


def plots_data(summary: Sequence[dict]) -> list[dict]:
    """Records for `dvc plots show` (x = fraction, y = mean): low-shot and full cells of the primary metric,
    with the 95% t interval of the mean over seeds (None for one seed). The template .dvc/plots/lowshot.json
    draws them by field name (a panel per task and metric, a line per method), so a renamed field breaks it."""
    records = []
    for r in summary:
        if lowshot_fraction(r["condition"]) is None:
            continue
        ci = mean_ci(r["values"])
        records.append(
            {
                "task": r["task"],
                "method": r["method"],
                "condition": r["condition"],
                "fraction": lowshot_fraction(r["condition"]),
                "metric": r["primary_metric"],
                "mean": r["mean"],
                "std": r["std"],
                "n": r["n"],
                "ci95_lo": ci[0] if ci else None,
                "ci95_hi": ci[1] if ci else None,
            }
        )
    return records
