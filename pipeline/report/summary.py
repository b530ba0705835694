"""One row per (task, condition, method): every metric over seeds, compared with the baseline."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from ..conditions import Condition
from ..names import TASKS
from .collect import is_number
from .common import BLIND, METHOD_ORDER, ZEROSHOT, ReportError
from .stats import mean_std, paired_test


def task_order(task: str) -> tuple:
    return (TASKS.index(task), "") if task in TASKS else (len(TASKS), task)


def condition_order(condition: str) -> tuple:
    """Low-shot fractions ascending, then shift, then full (the protocol's default order)."""
    c = Condition.parse(condition)
    return {"lowshot": (0, c.fraction), "shift": (1, 0.0), "full": (2, 0.0)}[c.kind]


def method_order(method: str, baseline: str = "baseline", blind: str = BLIND) -> tuple:
    """Baseline first, then the methods as params.yaml lists them, unknown ones, and the blind floor last."""
    if method == baseline:
        return (0, 0, "")
    if method == blind:
        return (3, 0, "")
    if method in METHOD_ORDER:
        return (1, METHOD_ORDER.index(method), "")
    return (2, 0, method)


def compare(values: dict[int, float], base: dict[int, float] | None, is_baseline: bool = False) -> dict:
    """Stats of one metric in one cell, given per-seed values and the baseline's per-seed values (None when the
    cell has no baseline runs): ``{n, seeds, values, mean, std, gain_pct, paired, verdict}`` with paired =
    ``{n, seeds, diffs, mean, std, ci95, p}`` (see ``paired_test``) or None.

    verdict: "baseline" (the baseline's own cell), "no_baseline", "few_pairs" (< 2 seeds run by both: no
    interval), "gain" / "loss" (the 95% interval of the paired Δ lies above / below 0) or "no_difference"
    (the interval contains 0).
    """
    seeds = sorted(values)
    mean, std = mean_std([values[s] for s in seeds])
    out: dict[str, Any] = {
        "n": len(seeds),
        "seeds": seeds,
        "values": [values[s] for s in seeds],
        "mean": mean,
        "std": std,
        "gain_pct": None,
        "paired": None,
        "verdict": "baseline" if is_baseline else "no_baseline",
    }
    if is_baseline or not base:
        return out
    common = sorted(set(values) & set(base))
    diffs = [values[s] - base[s] for s in common]
    out["paired"] = {"seeds": common, "diffs": diffs, **paired_test(diffs)}
    # Over the paired seeds only, like Δ beside it: means over different seed sets (a seed missing on one
    # side) can give the gain the opposite sign of the Δ it is printed with.
    # (fmean is exactly rounded: with the same seeds on both sides this is the means' gain to the last bit.)
    if common:
        a, b = statistics.fmean(values[s] for s in common), statistics.fmean(base[s] for s in common)
        if b:
            out["gain_pct"] = (a - b) / abs(b) * 100.0
    ci = out["paired"]["ci95"]
    if ci is None:
        out["verdict"] = "few_pairs"
    elif ci[0] > 0.0:
        out["verdict"] = "gain"
    elif ci[1] < 0.0:
        out["verdict"] = "loss"
    else:
        out["verdict"] = "no_difference"
    return out


def _train_summary(runs: Iterable[dict]) -> dict:
    """Cost of a cell: mean of each numeric training field the runs report (missing ones are skipped)."""
    out: dict[str, float] = {}
    runs = list(runs)
    for key in ("steps", "train_seconds", "student_parameters"):
        vals = [r["train"][key] for r in runs if is_number(r["train"].get(key))]
        if vals:
            out[key] = statistics.fmean(vals)
    return out


def summarise(rows: Sequence[dict], baseline: str = "baseline", blind: str = BLIND) -> list[dict]:
    """One row per (task, condition, method), ordered task → condition → method.

    Each row holds the primary metric's stats (see ``compare``) at top level plus ``primary_metric``,
    ``role`` ("baseline", "floor" for the ``blind`` method, "method" otherwise), ``secondary`` ({metric:
    stats} for every other overall metric the runs report, e.g. VCR q2a and qa2r), ``per_domain`` ({domain:
    {n, mean, std}} of the primary metric, for the shift plot's in-domain reference) and ``train`` (mean
    steps, train_seconds, student_parameters).
    """
    if baseline == blind:
        raise ReportError(f"the baseline and the blind floor cannot be the same method ({baseline!r})")
    cells: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] == ZEROSHOT:
            raise ReportError(
                f"{r['path']}: method name {ZEROSHOT!r} is reserved for the teacher zero-shot score"
            )
        cells[(r["task"], r["condition"], r["method"])].append(r)

    def per_seed(runs: list[dict], metric: str | None) -> dict[int, float]:
        if metric is None:
            return {r["seed"]: r["primary"] for r in runs}
        return {r["seed"]: r["overall"][metric] for r in runs if metric in r["overall"]}

    out = []
    for task, condition, method in sorted(
        cells, key=lambda k: (task_order(k[0]), condition_order(k[1]), method_order(k[2], baseline, blind))
    ):
        runs = cells[(task, condition, method)]
        base_runs = cells.get((task, condition, baseline))
        primary_metric = runs[0]["primary_metric"]
        values = per_seed(runs, None)
        base = per_seed(base_runs, None) if base_runs else None
        row = {
            "task": task,
            "condition": condition,
            "method": method,
            "primary_metric": primary_metric,
            "role": "baseline" if method == baseline else "floor" if method == blind else "method",
            **compare(values, base, is_baseline=method == baseline),
        }
        secondary_names = sorted({k for r in runs for k in r["overall"]} - {primary_metric})
        row["secondary"] = {}
        for name in secondary_names:
            vals = per_seed(runs, name)
            b = per_seed(base_runs, name) if base_runs else None
            row["secondary"][name] = compare(vals, b, is_baseline=method == baseline)
        domains = sorted({d for r in runs for d in r["per_domain"]})
        row["per_domain"] = {}
        for d in domains:
            vals = [
                r["per_domain"][d][primary_metric]
                for r in runs
                if primary_metric in r["per_domain"].get(d, {})
            ]
            if vals:
                mean, std = mean_std(vals)
                row["per_domain"][d] = {"n": len(vals), "mean": mean, "std": std}
        row["train"] = _train_summary(runs)
        out.append(row)
    return out
