"""Aggregate evaluated runs into the results report (docs/method.md §8): tables, plots and DVC metrics/plots
files.

Every number in the report is computed here from the inputs — the runs' eval.json files, the teacher metrics,
the optional extract metrics and the optional teacher zero-shot scores — so the report can never drift from
the runs it claims to describe.

Statistics, per (task, condition, method) cell and per metric:
  * mean ± sample std (ddof=1) over seeds; the std is undefined (None, printed "—") for a single seed;
  * relative gain over the baseline, in % of the baseline mean: (mean - mean_baseline) / |mean_baseline|;
  * the paired difference Δ: per seed present in both runs (same task, condition and seed: same low-shot
    subset, same init seed), method - baseline. Pairing removes the seed-to-seed variance both methods share.
    Over the n pairs: mean Δ, its 95% confidence interval mean ± t_{0.975, n-1} · std / √n (Student t, n - 1
    degrees of freedom) and the two-sided p-value of the paired t-test. A cell is marked a gain or a loss
    only when its interval excludes 0; with a single pair there is no interval ("n/a") and never a mark.
    With 3 seeds t_{0.975, 2} = 4.30, so a difference has to be about 2.5 of its per-seed std to count.

Floor and ceiling (issue 24 item 2), shown beside every task × condition:
  * floor — runs whose method is ``blind`` (the same student, budget and seeds with the image blanked: what
    the text alone gives). They are ordinary runs/<cell>/eval.json files (``"method": "blind"``) and get the
    same statistics as any method, paired against the baseline; the table shows them in a
    "blind (text only)" row. A condition without blind runs says "not measured".
  * ceiling — the teacher's zero-shot score on the task's test split, scored through the same candidate
    texts the confidence weights use. Read from an optional JSON file (``--zeroshot``, default
    metrics/zeroshot.json)::

        {"<task>": {"<condition>": <score> | {"score": <score>, ...}, ...}, ...}
        e.g. {"vqa": {"lowshot-0.1": 0.61, "shift": 0.55}, "vcr": {"lowshot-0.1": 0.31, "shift": 0.29}}

    (``python -m stages.zeroshot`` writes the object form, with the metric, chance level, n and method.)

    <task> as in eval.json's run.task, <condition> as in run.condition (full, shift, lowshot-<fraction>:
    the test split each condition is scored on differs, e.g. shift scores the held-out domain only),
    <score> the task's primary metric (vqa_score, accuracy, q2ar) as a number in [0, 1]. A missing file, task
    or condition shows "not measured" in the "teacher zero-shot" row.

reports/summary.json (for ``dvc metrics show``): task → condition → method → entry, with entry =
``{task, condition, method, metric, n_seeds, mean, std, delta_mean, ci95: [lo, hi], p, rel_gain_pct,
delta_std, n_pairs, verdict, role, secondary}`` (delta fields, ci95 and p null for the baseline, without a
baseline and — ci95 and p — below 2 pairs; role: baseline | method | floor). A measured teacher zero-shot
score adds an entry with method ``teacher_zeroshot`` and role ``ceiling`` (mean = the score, n_seeds null).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .conditions import Condition
from .names import METHODS, TASKS

# The protocol asks for at least 3 seeds per cell (docs/method.md §8); cells with fewer are listed in the
# report.
MIN_SEEDS = 3
# Marks appended to a cell's comparison line: only where the paired Δ's 95% interval excludes 0.
MARK_GAIN = "▲ gain"
MARK_LOSS = "▼ loss"
NOT_RUN = "·"
NOT_MEASURED = "not measured"
# The floor: the same student with the image blanked (see the module docstring).
BLIND = "blind"
# summary.json's method name for the teacher's zero-shot score (the ceiling).
ZEROSHOT = "teacher_zeroshot"
CI_LEVEL = 0.95

# Table order: the methods in the order params.yaml's distill.method lists them, unknown ones after.
_METHOD_ORDER = METHODS


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


# ------------------------------------------------------------------------------------------- statistics
# Student's t without scipy (not a dependency): the CDF through the regularized incomplete beta function,
# evaluated by its continued fraction (Lentz's method, as in Numerical Recipes §6.4), and the quantile by
# bisection on that CDF. Accuracy ~1e-12, far below the 3 printed digits.


def _beta_cf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast only below (a + 1) / (a + b + 2); use the symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q, e.g. t_quantile(0.975, 2) = 4.303 (the 95% two-sided critical value)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


# ------------------------------------------------------------------------------------------- summarise


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
    if method in _METHOD_ORDER:
        return (1, _METHOD_ORDER.index(method), "")
    return (2, 0, method)


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def mean_ci(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean of ``values`` (n - 1 df); None below 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean, std = _mean_std(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def paired_test(diffs: Sequence[float], level: float = CI_LEVEL) -> dict:
    """Paired t-test on per-seed differences: ``{n, mean, std, ci95, p}``; ci95 and p are None below 2 pairs.

    Identical differences (std 0) give a zero-width interval at the mean and p = 0, or p = 1 when they are
    all 0: no seed-to-seed spread, so the sign of the mean is certain."""
    n = len(diffs)
    mean, std = _mean_std(diffs)
    out: dict[str, Any] = {"n": n, "mean": mean, "std": std, "ci95": None, "p": None}
    if n < 2:
        return out
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    out["ci95"] = [mean - half, mean + half]
    if std == 0.0:
        out["p"] = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / (std / math.sqrt(n))
        out["p"] = min(1.0, 2.0 * t_cdf(-abs(t), n - 1))
    return out


def compare(values: dict[int, float], base: dict[int, float] | None, is_baseline: bool = False) -> dict:
    """Stats of one metric in one cell, given per-seed values and the baseline's per-seed values (None when the
    cell has no baseline runs): ``{n, seeds, values, mean, std, gain_pct, paired, verdict}`` with paired =
    ``{n, seeds, diffs, mean, std, ci95, p}`` (see ``paired_test``) or None.

    verdict: "baseline" (the baseline's own cell), "no_baseline", "few_pairs" (< 2 seeds run by both: no
    interval), "gain" / "loss" (the 95% interval of the paired Δ lies above / below 0) or "no_difference"
    (the interval contains 0).
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
    out["paired"] = {"seeds": common, "diffs": diffs, **paired_test(diffs)}
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
        vals = [r["train"][key] for r in runs if _number(r["train"].get(key))]
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


def fmt_p(p: float | None) -> str:
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def format_cell(stats: dict) -> str:
    """``mean ± std (n)``, then for a cell compared with the baseline: ``Δ paired mean, 95% CI [lo, hi], p
    (n pairs) · gain%`` and a gain / loss mark when the interval excludes 0."""
    text = f"{fmt(stats['mean'])} ± {fmt(stats['std'])} ({stats['n']})"
    paired = stats["paired"]
    if paired is None:
        return text
    gain = "gain n/a" if stats["gain_pct"] is None else f"{stats['gain_pct']:+.2f}%"
    n = paired["n"]
    if n == 0:
        diff = "Δ n/a (no seed run by both)"
    elif paired["ci95"] is None:
        diff = f"Δ {fmt(paired['mean'], sign=True)}, 95% CI n/a ({n} pair)"
    else:
        lo, hi = paired["ci95"]
        diff = (
            f"Δ {fmt(paired['mean'], sign=True)}, 95% CI [{fmt(lo, sign=True)}, {fmt(hi, sign=True)}], "
            f"{fmt_p(paired['p'])} ({n} pairs)"
        )
    mark = {"gain": f" {MARK_GAIN}", "loss": f" {MARK_LOSS}"}.get(stats["verdict"], "")
    return f"{text}<br>{diff} · {gain}{mark}"


def _table(header: str, conditions: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    lines = [f"| {header} | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    return lines + [f"| {label} | " + " | ".join(texts) + " |" for label, texts in rows]


def _task_table(
    cells: dict[tuple[str, str], dict],
    methods: list[str],
    conditions: list[str],
    floor: str,
    ceiling: dict[str, float] | None,
) -> list[str]:
    """Methods × conditions, then the floor (blind runs) and, when ``ceiling`` is given (primary metric
    only), the teacher zero-shot row; unmeasured floor or ceiling cells say so rather than vanish."""
    rows = [
        (m, [format_cell(cells[(m, c)]) if (m, c) in cells else NOT_RUN for c in conditions]) for m in methods
    ]
    rows.append(
        (
            "blind (text only)",
            [format_cell(cells[(floor, c)]) if (floor, c) in cells else NOT_MEASURED for c in conditions],
        )
    )
    if ceiling is not None:
        rows.append(
            ("teacher zero-shot", [fmt(ceiling[c]) if c in ceiling else NOT_MEASURED for c in conditions])
        )
    return _table("method", conditions, rows)


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
    zeroshot: dict[str, dict[str, float]] | None = None,
    *,
    baseline: str = "baseline",
    blind: str = BLIND,
    sources: dict[str, str] | None = None,
) -> str:
    """results.md: one table per task (+ one per secondary metric), teacher and cache sections, and notes.

    teacher / extract / zeroshot: the inputs' contents, or None when their file is missing ("not available",
    "not measured"); zeroshot as ``load_zeroshot`` returns it.
    sources: where the inputs came from, for the text (keys runs, teacher, extract, zeroshot).
    """
    if not summary:
        raise ReportError("nothing to report: the summary is empty")
    src = {
        "runs": "runs",
        "teacher": "metrics/teacher.json",
        "extract": "metrics/extract.json",
        "zeroshot": "metrics/zeroshot.json",
        **(sources or {}),
    }
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in summary:
        by_task[row["task"]].append(row)
    n_runs = sum(r["n"] for r in summary)

    def order(methods: Iterable[str]) -> list[str]:
        return sorted(set(methods), key=lambda m: method_order(m, baseline, blind))

    lines = [
        "# clip-td results",
        "",
        f"Generated by `python -m stages.report` from {n_runs} evaluated runs under `{src['runs']}/` "
        f"({len(by_task)} task(s), {len(summary)} task × condition × method cells). "
        "See *How these numbers were produced* at the end.",
        "",
        "Cells: test-set mean ± sample std over seeds (number of seeds). Below it, for every method other "
        f"than `{baseline}`: Δ = paired per-seed difference (method − {baseline}, same task, condition and "
        "seed) with its 95% confidence interval (Student t, n − 1 df) and the two-sided paired t-test p-value "
        f"(n = seeds run by both), then the relative gain of the mean over `{baseline}` in %. "
        f"{MARK_GAIN} / {MARK_LOSS}: marked only when the 95% interval of Δ excludes 0; an unmarked cell is "
        f"not distinguishable from `{baseline}` with these seeds. With one paired seed there is no interval "
        "(n/a) and no mark. *blind (text only)* = the same student with the image blanked (the floor: what "
        "the text alone gives); *teacher zero-shot* = the teacher's own score through the task's candidate "
        "texts (the knowledge there is to distil; primary metric only); either says "
        f"'{NOT_MEASURED}' where no input gives it. {NOT_RUN} = not run; — = undefined (e.g. the std of a "
        "single seed).",
        "",
    ]
    few_seeds: list[str] = []
    marked: dict[str, list[str]] = {"gain": [], "loss": [], "few_pairs": []}
    for task in sorted(by_task, key=task_order):
        rows = by_task[task]
        conditions = sorted({r["condition"] for r in rows}, key=condition_order)
        methods = order(r["method"] for r in rows if r["method"] != blind)
        metric = rows[0]["primary_metric"]
        ceiling = (zeroshot or {}).get(task, {})
        lines += [f"## {task} — {metric} (primary)", ""]
        lines += _task_table(
            {(r["method"], r["condition"]): r for r in rows}, methods, conditions, blind, ceiling
        )
        lines.append("")
        if baseline not in methods:
            lines += [f"No `{baseline}` runs for {task}: gains and paired differences are not available.", ""]
        secondary = sorted({k for r in rows for k in r["secondary"]})
        for name in secondary:
            cells = {
                (r["method"], r["condition"]): r["secondary"][name] for r in rows if name in r["secondary"]
            }
            lines += [f"### {task} — {name} (secondary)", ""]
            lines += _task_table(cells, methods, conditions, blind, None) + [""]
        for r in rows:
            where = f"{task} / {r['condition']} / {r['method']}"
            if r["n"] < MIN_SEEDS:
                few_seeds.append(f"{where} ({r['n']})")
            # The floor's comparison tells whether the baseline uses the image, not a method's gain or loss.
            if r["verdict"] in marked and r["role"] != "floor":
                marked[r["verdict"]].append(where)

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
            + ", ".join(order(r["method"] for r in rows))
            + "."
        )

    def unmeasured(measured: Callable[[str, str], bool]) -> list[str]:
        return [
            f"{t} / {c}"
            for t in sorted(by_task, key=task_order)
            for c in sorted({r["condition"] for r in by_task[t]}, key=condition_order)
            if not measured(t, c)
        ]

    floor_cells = {(r["task"], r["condition"]) for r in summary if r["method"] == blind}
    no_floor = unmeasured(lambda t, c: (t, c) in floor_cells)
    if zeroshot is None:
        ceiling_note = f"{NOT_MEASURED}: `{src['zeroshot']}` was not found."
    else:
        absent = unmeasured(lambda t, c: c in zeroshot.get(t, {}))
        ceiling_note = f"from `{src['zeroshot']}`" + (
            f"; {NOT_MEASURED} for " + "; ".join(absent) + "." if absent else "."
        )
    lines += [
        "- Mean ± sample standard deviation (ddof = 1) over seeds; a single seed has no std (—).",
        f"- Gain = (mean − mean of {baseline}) / |mean of {baseline}| × 100, from the cell means over all of "
        "each method's seeds.",
        f"- Paired Δ: for each seed run by both the method and {baseline} in the same task and condition "
        "(same low-shot subset and initialisation seed), method − baseline. Over the n pairs: the mean, its 95% "
        "confidence interval mean ± t(0.975, n − 1) · std / √n and the two-sided paired t-test p-value, "
        f"with Student's t on n − 1 degrees of freedom (t(0.975, 2) = {t_quantile(0.975, 2):.3f} for 3 seeds). "
        f"A cell is marked {MARK_GAIN} or {MARK_LOSS} only when that interval excludes 0.",
        f"- Floor: runs of method `{blind}` (the same student, budget and seeds with the image blanked), "
        f"paired against {baseline} like any method; a {MARK_LOSS} there means {baseline} beats text alone, "
        "i.e. uses the image. "
        + (
            f"{NOT_MEASURED[0].upper() + NOT_MEASURED[1:]} (no `{blind}` runs) for "
            + "; ".join(no_floor)
            + "."
            if no_floor
            else "Measured for every task and condition."
        ),
        f"- Teacher zero-shot (ceiling), in each task's primary metric: {ceiling_note}",
        "- Model selection used each run's validation split only; the test split is read once, by the evaluate "
        "stage (docs/method.md §8).",
    ]
    if few_seeds:
        lines.append(
            f"- Cells with fewer than the protocol's {MIN_SEEDS} seeds: " + "; ".join(few_seeds) + "."
        )
    else:
        lines.append(f"- Every cell has at least the protocol's {MIN_SEEDS} seeds.")
    for verdict, text in (
        ("gain", f"Gains over {baseline} (95% interval of Δ above 0)"),
        ("loss", f"Losses against {baseline} (95% interval of Δ below 0)"),
        ("few_pairs", f"No interval (fewer than 2 seeds run by both the method and {baseline})"),
    ):
        lines.append(f"- {text}: " + ("; ".join(marked[verdict]) if marked[verdict] else "none") + ".")
    cost = _cost_lines(summary, baseline, blind)
    if cost:
        lines += ["", "Training cost per method (means over all of its runs):", ""] + cost
    return "\n".join(lines) + "\n"


def _cost_lines(summary: Sequence[dict], baseline: str, blind: str = BLIND) -> list[str]:
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
    for m in sorted(by_method, key=lambda m: method_order(m, baseline, blind)):
        rows = by_method[m]
        lines.append(
            f"| {m} | {weighted(rows, 'student_parameters')} | {weighted(rows, 'steps')} | "
            f"{weighted(rows, 'train_seconds')} |"
        )
    return lines


# ------------------------------------------------------------------------------------ DVC metrics/plots


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


def _fraction(condition: str) -> float | None:
    """Labeled fraction of a condition on the low-shot axis; full = 1.0; shift is not on that axis."""
    c = Condition.parse(condition)
    return c.fraction if c.kind in ("lowshot", "full") else None


def plots_data(summary: Sequence[dict]) -> list[dict]:
    """Records for `dvc plots show` (x = fraction, y = mean): low-shot and full cells of the primary metric,
    with the 95% t interval of the mean over seeds (None for one seed)."""
    records = []
    for r in summary:
        if _fraction(r["condition"]) is None:
            continue
        ci = mean_ci(r["values"])
        records.append(
            {
                "task": r["task"],
                "method": r["method"],
                "condition": r["condition"],
                "fraction": _fraction(r["condition"]),
                "metric": r["primary_metric"],
                "mean": r["mean"],
                "std": r["std"],
                "n": r["n"],
                "ci95_lo": ci[0] if ci else None,
                "ci95_hi": ci[1] if ci else None,
            }
        )
    return records


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


def _ci_half(std: float | None, n: int) -> float:
    """Half-width of the 95% t interval of a mean of n seeds; 0 (no bar) for a single seed."""
    if std is None or n < 2:
        return 0.0
    return t_quantile(0.5 + CI_LEVEL / 2.0, n - 1) * std / math.sqrt(n)


def lowshot_series(
    summary: Sequence[dict],
    baseline: str = "baseline",
    zeroshot: dict[str, dict[str, float]] | None = None,
    blind: str = BLIND,
) -> list[dict]:
    """What the low-shot plot draws, per task: ``{task, metric, fractions, log_x, lines, zeroshot}`` with
    fractions = every low-shot fraction present plus full (= 1.0), log_x when there are more than two, lines =
    ``[{method, label, x, y, err}]`` (err = half-width of the 95% t interval of the mean over seeds, 0 for one
    seed) and zeroshot = ``[(fraction, score)]`` of the measured teacher zero-shot scores."""
    rows = [r for r in summary if _fraction(r["condition"]) is not None]
    out = []
    for task in _tasks(rows):
        task_rows = [r for r in rows if r["task"] == task]
        lines = []
        for m in sorted({r["method"] for r in task_rows}, key=lambda m: method_order(m, baseline, blind)):
            pts = sorted((_fraction(r["condition"]), r) for r in task_rows if r["method"] == m)
            lines.append(
                {
                    "method": m,
                    "label": "blind (text only)" if m == blind else m,
                    "x": [x for x, _ in pts],
                    "y": [r["mean"] for _, r in pts],
                    "err": [_ci_half(r["std"], r["n"]) for _, r in pts],
                }
            )
        zs = sorted(
            (f, score)
            for c, score in (zeroshot or {}).get(task, {}).items()
            if (f := _fraction(c)) is not None
        )
        fractions = sorted({_fraction(r["condition"]) for r in task_rows} | {f for f, _ in zs})
        out.append(
            {
                "task": task,
                "metric": task_rows[0]["primary_metric"],
                "fractions": fractions,
                # Low-shot fractions span orders of magnitude (0.01 … 1); a log axis keeps their points apart.
                "log_x": len(fractions) > 2,
                "lines": lines,
                "zeroshot": zs,
            }
        )
    return out


def plot_lowshot(
    summary: Sequence[dict],
    path: str | Path,
    baseline: str = "baseline",
    zeroshot: dict[str, dict[str, float]] | None = None,
    blind: str = BLIND,
) -> Path:
    """Primary metric vs labeled fraction, one subplot per task, as ``lowshot_series`` lays it out: one line
    per method (the blind floor dashed) with 95% CI error bars, teacher zero-shot as a dotted line of crosses."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series = lowshot_series(summary, baseline, zeroshot, blind)
    if not series:
        _save_empty(plt, path, "no low-shot or full runs")
        return path
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), squeeze=False)
    for ax, task in zip(axes[0], series, strict=True):
        for line in task["lines"]:
            ax.errorbar(
                line["x"],
                line["y"],
                yerr=line["err"],
                marker="o",
                capsize=3,
                linestyle="--" if line["method"] == blind else "-",
                label=line["label"],
            )
        if task["zeroshot"]:
            zs = task["zeroshot"]
            ax.plot([f for f, _ in zs], [v for _, v in zs], "x:", color="black", label="teacher zero-shot")
        if task["log_x"]:
            ax.set_xscale("log")
        fractions = task["fractions"]
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:.0%}" if f >= 0.01 else f"{f:.1%}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("labeled fraction")
        ax.set_ylabel(task["metric"])
        ax.set_title(f"{task['task']} (bars: 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_shift(
    summary: Sequence[dict],
    path: str | Path,
    baseline: str = "baseline",
    zeroshot: dict[str, dict[str, float]] | None = None,
    blind: str = BLIND,
) -> Path:
    """Domain-shift bars: per task, the primary metric on the held-out target domain per method (error bars =
    95% t interval of the mean over seeds). Where the ``full`` runs report the same target domain, a lighter
    bar beside it shows the score when that domain was seen in training, so the bar gap is the cost of the
    shift. A measured teacher zero-shot score on the shift condition is a dotted horizontal line."""
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
            (r for r in shift if r["task"] == task), key=lambda r: method_order(r["method"], baseline, blind)
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
            yerr=[_ci_half(r["std"], r["n"]) for r in rows],
            capsize=3,
            label="shift (target unseen)",
        )
        if refs:
            ax.bar(
                [x + width / 2 for x in refs],
                [d["mean"] for d in refs.values()],
                width,
                yerr=[_ci_half(d["std"], d["n"]) for d in refs.values()],
                capsize=3,
                alpha=0.45,
                label="full (target seen), same test domain",
            )
        ceiling = (zeroshot or {}).get(task, {}).get(rows[0]["condition"])
        if ceiling is not None:
            ax.axhline(ceiling, linestyle=":", color="black", label="teacher zero-shot, target domain")
        ax.set_xticks(xs)
        ax.set_xticklabels(
            ["blind (text only)" if r["method"] == blind else r["method"] for r in rows],
            rotation=30,
            ha="right",
        )
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


def load_zeroshot(path: str | Path) -> dict[str, dict[str, float]] | None:
    """The teacher zero-shot scores ``{task: {condition: score}}`` (format in the module docstring), or None
    when the file does not exist. Any malformed entry fails, naming the file and the key."""
    data = load_optional_json(path)
    if data is None:
        return None
    out: dict[str, dict[str, float]] = {}
    for task, scores in data.items():
        if not isinstance(scores, dict):
            raise ReportError(
                f"{path}: key '{task}': expected an object {{condition: score}}, got {scores!r}"
            )
        for condition, score in scores.items():
            if isinstance(score, dict) and "score" in score:  # stages.zeroshot's entries carry their details
                score = score["score"]
            try:
                Condition.parse(condition)
            except ValueError as e:
                raise ReportError(f"{path}: key '{task}.{condition}': {e}") from None
            if not _number(score) or not 0.0 <= score <= 1.0:
                raise ReportError(
                    f"{path}: key '{task}.{condition}': expected a score in [0, 1] (the task's primary metric), "
                    f"got {score!r}"
                )
            out.setdefault(task, {})[condition] = float(score)
    return out


def write_report(
    runs_dir: str | Path,
    out_dir: str | Path,
    teacher_path: str | Path = "metrics/teacher.json",
    extract_path: str | Path = "metrics/extract.json",
    baseline: str = "baseline",
    zeroshot_path: str | Path = "metrics/zeroshot.json",
    blind: str = BLIND,
) -> dict[str, Path]:
    """Collect, summarise and write results.md, lowshot.png, shift.png, plots.json and summary.json.
    Returns {name: path} of what was written.

    Everything is written into a temporary folder inside ``out_dir`` first and renamed into place only once
    all of it succeeded, so a failing report leaves the previous one whole."""
    summary = summarise(collect(runs_dir), baseline=baseline, blind=blind)
    teacher = load_optional_json(teacher_path)
    extract = load_optional_json(extract_path)
    zeroshot = load_zeroshot(zeroshot_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {
        "results": "results.md",
        "lowshot": "lowshot.png",
        "shift": "shift.png",
        "plots": "plots.json",
        "summary": "summary.json",
    }
    sources = {
        "runs": str(runs_dir),
        "teacher": str(teacher_path),
        "extract": str(extract_path),
        "zeroshot": str(zeroshot_path),
    }
    with tempfile.TemporaryDirectory(dir=out, prefix=".report-") as tmp_dir:
        tmp = {k: Path(tmp_dir) / name for k, name in names.items()}
        tmp["results"].write_text(
            markdown(summary, teacher, extract, zeroshot, baseline=baseline, blind=blind, sources=sources)
        )
        plot_lowshot(summary, tmp["lowshot"], baseline=baseline, zeroshot=zeroshot, blind=blind)
        plot_shift(summary, tmp["shift"], baseline=baseline, zeroshot=zeroshot, blind=blind)
        tmp["plots"].write_text(json.dumps(plots_data(summary), indent=1))
        tmp["summary"].write_text(json.dumps(summary_metrics(summary, zeroshot), indent=1))
        for k, name in names.items():
            os.replace(tmp[k], out / name)
    return {k: out / name for k, name in names.items()}
