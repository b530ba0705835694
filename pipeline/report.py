"""Aggregate evaluated runs into the results report (method §8): tables, plots and DVC metrics/plots files.

Every number in the report is computed here from the inputs — the runs' eval.json files, the teacher metrics
and the optional extract metrics — so the report can never drift from the runs it claims to describe.

Statistics, per (task, condition, method) cell and per metric:
  * mean ± sample std (ddof=1) over seeds; the std is undefined (None, printed "—") for a single seed;
  * relative gain over the baseline, in % of the baseline mean: (mean - mean_baseline) / |mean_baseline|;
  * the paired difference: per seed present in both runs, method - baseline, then mean ± std over those pairs.
    Pairing removes the seed-to-seed variance both methods share (same low-shot subset, same init seed), so it
    is the comparison the protocol asks for; a cell whose paired |mean| is below its std is flagged as not
    distinguishable from the baseline.
"""

from __future__ import annotations

import json
import math
import statistics
import typing
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import TASKS, DistillParams
from .protocol import Condition

# The protocol asks for at least 3 seeds per cell (method §8); cells with fewer are listed in the report.
MIN_SEEDS = 3
# Markers appended to a cell's comparison line, explained in the report's notes.
MARK_INDISTINGUISHABLE = "*"
MARK_FEW_PAIRS = "†"
NOT_RUN = "·"

# Table order: the methods in the order params.yaml's distill.method lists them, unknown ones after.
_METHOD_ORDER = typing.get_args(typing.get_type_hints(DistillParams)["method"])


class ReportError(ValueError):
    """Inputs cannot be reported on; the message names the offending file or cell."""


# --------------------------------------------------------------------------------------------- collect


def _number(value: Any) -> bool:
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
    if not _number(data.get("primary")):
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
                "overall": {k: float(v) for k, v in metrics.get("overall", {}).items() if _number(v)},
                "per_domain": {
                    d: {k: float(v) for k, v in m.items() if _number(v)}
                    for d, m in metrics.get("per_domain", {}).items()
                    if isinstance(m, dict)
                },
                "n_test": metrics.get("n"),
                "train": data.get("train") or {},
                "path": str(path),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------- summarise


def task_order(task: str) -> tuple:
    return (TASKS.index(task), "") if task in TASKS else (len(TASKS), task)


def condition_order(condition: str) -> tuple:
    """Low-shot fractions ascending, then shift, then full (the protocol's default order)."""
    c = Condition.parse(condition)
    return {"lowshot": (0, c.fraction), "shift": (1, 0.0), "full": (2, 0.0)}[c.kind]


def method_order(method: str, baseline: str = "baseline") -> tuple:
    if method == baseline:
        return (0, 0, "")
    if method in _METHOD_ORDER:
        return (1, _METHOD_ORDER.index(method), "")
    return (2, 0, method)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def compare(values: dict[int, float], base: dict[int, float] | None, is_baseline: bool = False) -> dict:
    """Stats of one metric in one cell, given per-seed values and the baseline's per-seed values (None when the
    cell has no baseline runs): ``{n, seeds, values, mean, std, gain_pct, paired, verdict}`` with paired =
    ``{n, seeds, diffs, mean, std}`` or None.

    verdict: "baseline" (the baseline's own cell), "no_baseline", "few_pairs" (< 2 common seeds: no spread to
    judge by), "not_distinguishable" (paired |mean| < std, or exactly 0) or "distinguishable".
    """
    seeds = sorted(values)
    mean, std = _mean_std([values[s] for s in seeds])
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
    base_mean, _ = _mean_std(list(base.values()))
    if base_mean:
        out["gain_pct"] = (mean - base_mean) / abs(base_mean) * 100.0
    common = sorted(set(values) & set(base))
    diffs = [values[s] - base[s] for s in common]
    d_mean, d_std = _mean_std(diffs)
    out["paired"] = {"n": len(common), "seeds": common, "diffs": diffs, "mean": d_mean, "std": d_std}
    if d_std is None:
        out["verdict"] = "few_pairs"
    elif abs(d_mean) < d_std or d_mean == 0.0:
        out["verdict"] = "not_distinguishable"
    else:
        out["verdict"] = "distinguishable"
    return out


def _train_summary(runs: Iterable[dict]) -> dict:
    """Cost of a cell: mean of each numeric training field the runs report (missing ones are skipped)."""
    out: dict[str, float] = {}
    runs = list(runs)
    for key in ("steps", "train_seconds", "student_parameters"):
        vals = [r["train"][key] for r in runs if _number(r["train"].get(key))]
        if vals:
            out[key] = statistics.fmean(vals)
    return out


def summarise(rows: Sequence[dict], baseline: str = "baseline") -> list[dict]:
    """One row per (task, condition, method), ordered task → condition → method.

    Each row holds the primary metric's stats (see ``compare``) at top level plus ``primary_metric``,
    ``secondary`` ({metric: stats} for every other overall metric the runs report, e.g. VCR q2a and qa2r),
    ``per_domain`` ({domain: {n, mean, std}} of the primary metric, for the shift plot's in-domain reference)
    and ``train`` (mean steps, train_seconds, student_parameters).
    """
    cells: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["task"], r["condition"], r["method"])].append(r)

    def per_seed(runs: list[dict], metric: str | None) -> dict[int, float]:
        if metric is None:
            return {r["seed"]: r["primary"] for r in runs}
        return {r["seed"]: r["overall"][metric] for r in runs if metric in r["overall"]}

    out = []
    for task, condition, method in sorted(
        cells, key=lambda k: (task_order(k[0]), condition_order(k[1]), method_order(k[2], baseline))
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
                mean, std = _mean_std(vals)
                row["per_domain"][d] = {"n": len(vals), "mean": mean, "std": std}
        row["train"] = _train_summary(runs)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- markdown


def fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    """A number for the report; None (undefined, e.g. the std of one seed) prints as an em dash."""
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_cell(stats: dict) -> str:
    """``mean ± std (n)``, then for a non-baseline method ``gain% · Δ paired mean ± std (n pairs)`` + marker."""
    text = f"{fmt(stats['mean'])} ± {fmt(stats['std'])} ({stats['n']})"
    paired = stats["paired"]
    if paired is None:
        return text
    gain = "gain —" if stats["gain_pct"] is None else f"{stats['gain_pct']:+.2f}%"
    marker = {"not_distinguishable": MARK_INDISTINGUISHABLE, "few_pairs": MARK_FEW_PAIRS}.get(
        stats["verdict"], ""
    )
    diff = f"Δ {fmt(paired['mean'], sign=True)} ± {fmt(paired['std'])} ({paired['n']} pairs)"
    return f"{text}<br>{gain} · {diff}{marker}"


def _table(cells: dict[tuple[str, str], dict], methods: list[str], conditions: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    for m in methods:
        row = [format_cell(cells[(m, c)]) if (m, c) in cells else NOT_RUN for c in conditions]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return lines


def flatten(data: Any, prefix: str = "") -> tuple[list[tuple[str, Any]], list[str]]:
    """Scalar leaves of a nested mapping as (dotted key, value), and the keys of skipped list values."""
    leaves: list[tuple[str, Any]] = []
    skipped: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            sub_leaves, sub_skipped = flatten(v, f"{prefix}.{k}" if prefix else str(k))
            leaves += sub_leaves
            skipped += sub_skipped
    elif isinstance(data, (list, tuple)):
        skipped.append(prefix)
    else:
        leaves.append((prefix, data))
    return leaves, skipped


def _fmt_scalar(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return f"`{value}`"


def _scalar_section(title: str, data: dict | None, source: str) -> list[str]:
    lines = [f"## {title}", ""]
    if data is None:
        return lines + [f"Not available: `{source}` was not found.", ""]
    leaves, skipped = flatten(data)
    lines += [f"From `{source}` (every scalar entry, as written by its stage).", ""]
    if leaves:
        lines += ["| key | value |", "|---|---|"] + [f"| {k} | {_fmt_scalar(v)} |" for k, v in leaves]
    else:
        lines.append("No scalar entries.")
    if skipped:
        lines += ["", f"List-valued entries not shown: {', '.join(f'`{k}`' for k in skipped)}."]
    return lines + [""]


def _seed_list(seeds: Iterable[int]) -> str:
    return ", ".join(str(s) for s in sorted(set(seeds))) or "none"


def markdown(
    summary: Sequence[dict],
    teacher: dict | None,
    extract: dict | None = None,
    *,
    baseline: str = "baseline",
    sources: dict[str, str] | None = None,
) -> str:
    """results.md: one table per task (+ one per secondary metric), teacher and cache sections, and notes.

    teacher / extract: the metrics dicts, or None when their file is missing ("not available").
    sources: where the inputs came from, for the text (keys runs, teacher, extract).
    """
    if not summary:
        raise ReportError("nothing to report: the summary is empty")
    src = {
        "runs": "runs",
        "teacher": "metrics/teacher.json",
        "extract": "metrics/extract.json",
        **(sources or {}),
    }
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in summary:
        by_task[row["task"]].append(row)
    n_runs = sum(r["n"] for r in summary)

    lines = [
        "# clip-td results",
        "",
        f"Generated by `python -m stages.report` from {n_runs} evaluated runs under `{src['runs']}/` "
        f"({len(by_task)} task(s), {len(summary)} task × condition × method cells). "
        "See *How these numbers were produced* at the end.",
        "",
        f"Cells: test-set mean ± sample std over seeds (number of seeds); below it, for every method other than "
        f"`{baseline}`: relative gain of the mean over `{baseline}` in %, and Δ = paired per-seed difference "
        f"(method − {baseline}) as mean ± std (number of seeds run by both). "
        f"{MARK_INDISTINGUISHABLE} = not distinguishable from {baseline} (|mean Δ| < std Δ); "
        f"{MARK_FEW_PAIRS} = fewer than 2 paired seeds, so no spread to judge by; "
        f"{NOT_RUN} = not run; — = undefined (e.g. the std of a single seed).",
        "",
    ]
    few_seeds: list[str] = []
    flagged: list[str] = []
    for task in sorted(by_task, key=task_order):
        rows = by_task[task]
        conditions = sorted({r["condition"] for r in rows}, key=condition_order)
        methods = sorted({r["method"] for r in rows}, key=lambda m: method_order(m, baseline))
        metric = rows[0]["primary_metric"]
        lines += [f"## {task} — {metric} (primary)", ""]
        lines += _table({(r["method"], r["condition"]): r for r in rows}, methods, conditions)
        lines.append("")
        if baseline not in methods:
            lines += [f"No `{baseline}` runs for {task}: gains and paired differences are not available.", ""]
        secondary = sorted({k for r in rows for k in r["secondary"]})
        for name in secondary:
            cells = {
                (r["method"], r["condition"]): r["secondary"][name] for r in rows if name in r["secondary"]
            }
            lines += [f"### {task} — {name} (secondary)", ""]
            lines += _table(cells, methods, conditions) + [""]
        for r in rows:
            where = f"{task} / {r['condition']} / {r['method']}"
            if r["n"] < MIN_SEEDS:
                few_seeds.append(f"{where} ({r['n']})")
            if r["verdict"] in ("not_distinguishable", "few_pairs"):
                flagged.append(where)

    lines += _scalar_section("Teacher quality", teacher, src["teacher"])
    lines += _scalar_section("Teacher cache (extract)", extract, src["extract"])

    lines += ["## How these numbers were produced", ""]
    lines.append(
        f"- Inputs: {n_runs} `eval.json` files under `{src['runs']}/`, one per trained and evaluated run "
        "(task, condition, method, seed); every number above is computed from them by `pipeline/report.py`."
    )
    for task in sorted(by_task, key=task_order):
        rows = by_task[task]
        seeds = [s for r in rows for s in r["seeds"]]
        lines.append(
            f"- {task}: {sum(r['n'] for r in rows)} runs; seeds {_seed_list(seeds)}; "
            f"primary metric `{rows[0]['primary_metric']}`; conditions "
            + ", ".join(sorted({r["condition"] for r in rows}, key=condition_order))
            + "; methods "
            + ", ".join(sorted({r["method"] for r in rows}, key=lambda m: method_order(m, baseline)))
            + "."
        )
    lines += [
        "- Mean ± sample standard deviation (ddof = 1) over seeds; a single seed has no std (—).",
        f"- Gain = (mean − mean of {baseline}) / |mean of {baseline}| × 100, from the cell means over all of "
        "each method's seeds.",
        f"- Paired Δ: for each seed run by both the method and {baseline} in the same task and condition "
        "(same low-shot subset and initialisation seed), method − baseline; mean ± sample std over those seeds. "
        f"A cell is marked {MARK_INDISTINGUISHABLE} when |mean Δ| < std Δ: the gain is within seed-to-seed noise.",
        "- Model selection used each run's validation split only; the test split is read once, by the evaluate "
        "stage (method §8).",
    ]
    if few_seeds:
        lines.append(
            f"- Cells with fewer than the protocol's {MIN_SEEDS} seeds: " + "; ".join(few_seeds) + "."
        )
    else:
        lines.append(f"- Every cell has at least the protocol's {MIN_SEEDS} seeds.")
    if flagged:
        lines.append(
            f"- Not distinguishable from {baseline} (or too few pairs to tell): " + "; ".join(flagged) + "."
        )
    cost = _cost_lines(summary, baseline)
    if cost:
        lines += ["", "Training cost per method (means over all of its runs):", ""] + cost
    return "\n".join(lines) + "\n"


def _cost_lines(summary: Sequence[dict], baseline: str) -> list[str]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in summary:
        if r["train"]:
            by_method[r["method"]].append(r)
    if not by_method:
        return []

    def weighted(rows: list[dict], key: str) -> str:
        pairs = [(r["train"][key], r["n"]) for r in rows if key in r["train"]]
        if not pairs:
            return "—"
        value = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
        return f"{value:,.0f}" if key != "train_seconds" else f"{value:.1f}"

    lines = ["| method | student parameters | steps | train seconds |", "|---|---|---|---|"]
    for m in sorted(by_method, key=lambda m: method_order(m, baseline)):
        rows = by_method[m]
        lines.append(
            f"| {m} | {weighted(rows, 'student_parameters')} | {weighted(rows, 'steps')} | "
            f"{weighted(rows, 'train_seconds')} |"
        )
    return lines


# ------------------------------------------------------------------------------------ DVC metrics/plots


def summary_metrics(summary: Sequence[dict]) -> dict:
    """For `dvc metrics show`: {task: {condition: {method: {metric, mean, std, n, gain_pct, diff_mean,
    diff_std, n_pairs, secondary: {metric: {mean, std, n}}}}}}."""
    out: dict = {}
    for r in summary:
        paired = r["paired"] or {}
        cell = {
            "metric": r["primary_metric"],
            "mean": r["mean"],
            "std": r["std"],
            "n": r["n"],
            "gain_pct": r["gain_pct"],
            "diff_mean": paired.get("mean"),
            "diff_std": paired.get("std"),
            "n_pairs": paired.get("n"),
        }
        if r["secondary"]:
            cell["secondary"] = {
                k: {"mean": s["mean"], "std": s["std"], "n": s["n"]} for k, s in r["secondary"].items()
            }
        out.setdefault(r["task"], {}).setdefault(r["condition"], {})[r["method"]] = cell
    return out


def _fraction(condition: str) -> float | None:
    """Labeled fraction of a condition on the low-shot axis; full = 1.0; shift is not on that axis."""
    c = Condition.parse(condition)
    return c.fraction if c.kind in ("lowshot", "full") else None


def plots_data(summary: Sequence[dict]) -> list[dict]:
    """Records for `dvc plots show` (x = fraction, y = mean): low-shot and full cells of the primary metric."""
    return [
        {
            "task": r["task"],
            "method": r["method"],
            "condition": r["condition"],
            "fraction": _fraction(r["condition"]),
            "metric": r["primary_metric"],
            "mean": r["mean"],
            "std": r["std"],
            "n": r["n"],
        }
        for r in summary
        if _fraction(r["condition"]) is not None
    ]


# -------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    # Headless: the report runs under dvc repro and in CI, where no display exists.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tasks(rows: Iterable[dict]) -> list[str]:
    return sorted({r["task"] for r in rows}, key=task_order)


def _save_empty(plt, path: Path, message: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lowshot(summary: Sequence[dict], path: str | Path, baseline: str = "baseline") -> Path:
    """Primary metric vs labeled fraction (full = 1.0), one line per method, one subplot per task; error
    bars = std over seeds (none for a single seed)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in summary if _fraction(r["condition"]) is not None]
    tasks = _tasks(rows)
    if not tasks:
        _save_empty(plt, path, "no low-shot or full runs")
        return path
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        task_rows = [r for r in rows if r["task"] == task]
        methods = sorted({r["method"] for r in task_rows}, key=lambda m: method_order(m, baseline))
        for m in methods:
            pts = sorted((_fraction(r["condition"]), r) for r in task_rows if r["method"] == m)
            xs = [x for x, _ in pts]
            ax.errorbar(
                xs,
                [r["mean"] for _, r in pts],
                yerr=[r["std"] or 0.0 for _, r in pts],
                marker="o",
                capsize=3,
                label=m,
            )
        fractions = sorted({_fraction(r["condition"]) for r in task_rows})
        # Fractions span orders of magnitude (0.01 … 1); a log axis keeps the low-shot points apart.
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:.0%}" if f >= 0.01 else f"{f:.1%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labeled fraction")
        ax.set_ylabel(task_rows[0]["primary_metric"])
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_shift(summary: Sequence[dict], path: str | Path, baseline: str = "baseline") -> Path:
    """Domain-shift bars: per task, the primary metric on the held-out target domain per method (error bars =
    std over seeds). Where the ``full`` runs report the same target domain, a lighter bar beside it shows the
    score when that domain was seen in training, so the bar gap is the cost of the shift."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shift = [r for r in summary if Condition.parse(r["condition"]).kind == "shift"]
    tasks = _tasks(shift)
    if not tasks:
        _save_empty(plt, path, "no domain-shift runs")
        return path
    full = {(r["task"], r["method"]): r for r in summary if r["condition"] == "full"}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    width = 0.38
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = sorted(
            (r for r in shift if r["task"] == task), key=lambda r: method_order(r["method"], baseline)
        )
        xs = list(range(len(rows)))
        refs: dict[int, dict] = {}
        for x, r in zip(xs, rows, strict=True):
            targets = list(r["per_domain"])
            ref = full.get((task, r["method"]))
            # A fair reference scores the same test domain; with several target domains there is no single one.
            if ref is not None and len(targets) == 1 and targets[0] in ref["per_domain"]:
                refs[x] = ref["per_domain"][targets[0]]
        shift_off = width / 2 if refs else 0.0
        ax.bar(
            [x - shift_off for x in xs],
            [r["mean"] for r in rows],
            width,
            yerr=[r["std"] or 0.0 for r in rows],
            capsize=3,
            label="shift (target unseen)",
        )
        if refs:
            ax.bar(
                [x + width / 2 for x in refs],
                [d["mean"] for d in refs.values()],
                width,
                yerr=[d["std"] or 0.0 for d in refs.values()],
                capsize=3,
                alpha=0.45,
                label="full (target seen), same test domain",
            )
        ax.set_xticks(xs)
        ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right")
        targets = sorted({d for r in rows for d in r["per_domain"]})
        ax.set_title(f"{task} — target: {', '.join(targets) or '?'}")
        ax.set_ylabel(rows[0]["primary_metric"])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- report


def load_optional_json(path: str | Path) -> dict | None:
    """A metrics JSON, or None when the file does not exist; unreadable or non-object content fails, naming it."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{p}: not a readable JSON file: {e}") from e
    if not isinstance(data, dict):
        raise ReportError(f"{p}: expected a JSON object at the top level")
    return data


def write_report(
    runs_dir: str | Path,
    out_dir: str | Path,
    teacher_path: str | Path = "metrics/teacher.json",
    extract_path: str | Path = "metrics/extract.json",
    baseline: str = "baseline",
) -> dict[str, Path]:
    """Collect, summarise and write results.md, lowshot.png, shift.png, plots.json and summary.json.
    Returns {name: path} of what was written."""
    summary = summarise(collect(runs_dir), baseline=baseline)
    teacher = load_optional_json(teacher_path)
    extract = load_optional_json(extract_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results": out / "results.md",
        "lowshot": out / "lowshot.png",
        "shift": out / "shift.png",
        "plots": out / "plots.json",
        "summary": out / "summary.json",
    }
    sources = {"runs": str(runs_dir), "teacher": str(teacher_path), "extract": str(extract_path)}
    paths["results"].write_text(markdown(summary, teacher, extract, baseline=baseline, sources=sources))
    plot_lowshot(summary, paths["lowshot"], baseline=baseline)
    plot_shift(summary, paths["shift"], baseline=baseline)
    paths["plots"].write_text(json.dumps(plots_data(summary), indent=1))
    paths["summary"].write_text(json.dumps(summary_metrics(summary), indent=1))
    return paths
