"""results.md: the tables, the teacher's quality and the run costs, as markdown."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .common import BLIND, MARK_GAIN, MARK_LOSS, MIN_SEEDS, NOT_MEASURED, NOT_RUN, ReportError
from .stats import t_quantile
from .summary import condition_order, method_order, task_order


def fmt(value: float | None, digits: int = 3, sign: bool = False) -> str:
    """A number for the report; None (undefined, e.g. the std of one seed) prints as an em dash. Float noise
    around an exact tie (two methods with as many right answers: a Δ of -1e-17) prints as 0 without a sign's
    suggestion; a value that is not 0 but rounds to it gets the digits that show its sign (an interval ending
    at -0.0001 excludes 0, which "-0.000" hides)."""
    if value is None:
        return "—"
    if abs(value) < 1e-9:
        value = 0.0  # also turns -0.0 into 0.0
    elif round(value, digits) == 0:
        digits = max(digits, -math.floor(math.log10(abs(value))))
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def fmt_ci(ci: list[float] | None) -> str:
    """A 95% interval as ``[lo, hi]`` with signs; ``n/a`` below 2 pairs."""
    return "n/a" if ci is None else f"[{fmt(ci[0], sign=True)}, {fmt(ci[1], sign=True)}]"


def format_cell(stats: dict) -> str:
    """``mean ± std (n)``, then for a cell compared with the baseline: ``Δ paired mean, 95% CI [lo, hi], p
    (n pairs) · gain%`` and a gain / loss mark when the interval excludes 0."""
    text = f"{fmt(stats['mean'])} ± {fmt(stats['std'])} ({stats['n']})"
    paired = stats["paired"]
    if paired is None:
        return text
    gain = "gain n/a" if stats["gain_pct"] is None else f"{fmt(stats['gain_pct'], 2, sign=True)}%"
    n = paired["n"]
    if n == 0:
        diff = "Δ n/a (no seed run by both)"
    elif paired["ci95"] is None:
        diff = f"Δ {fmt(paired['mean'], sign=True)}, 95% CI n/a ({n} pair)"
    else:
        diff = (
            f"Δ {fmt(paired['mean'], sign=True)}, 95% CI {fmt_ci(paired['ci95'])}, "
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
    text_floors: dict[str, float] | None = None,
) -> list[str]:
    """Methods × conditions, then the floor (blind runs) and, when ``ceiling`` is given (primary metric
    only), the teacher zero-shot row, with its candidates' text floor where there is one (``zeroshot_cell``);
    unmeasured floor or ceiling cells say so rather than vanish."""
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
        floors = text_floors or {}
        rows.append(
            (
                "teacher zero-shot",
                [
                    zeroshot_cell(ceiling[c], floors.get(c)) if c in ceiling else NOT_MEASURED
                    for c in conditions
                ],
            )
        )
    return _table("method", conditions, rows)


def zeroshot_cell(score: float, text_floor: float | None = None) -> str:
    """The teacher's zero-shot score and, where the task has one (VQA), the score of a pick from the question
    alone among the candidates of its answer type: a ceiling below it says little of the teacher."""
    return fmt(score) if text_floor is None else f"{fmt(score)} (text floor {fmt(text_floor)})"


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
    floors: dict[str, dict[str, float]] | None = None,
) -> str:
    """results.md: one table per task (+ one per secondary metric), teacher and cache sections, and notes.

    teacher / extract / zeroshot: the inputs' contents, or None when their file is missing ("not available",
    "not measured"); zeroshot as ``load_zeroshot`` returns it, floors as ``load_zeroshots`` does.
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
        f"(n = seeds run by both), then the relative gain of the mean over `{baseline}` in %, over the same "
        "seeds. "
        f"{MARK_GAIN} / {MARK_LOSS}: marked only when the 95% interval of Δ excludes 0; an unmarked cell is "
        f"not distinguishable from `{baseline}` with these seeds. With one paired seed there is no interval "
        "(n/a) and no mark. *blind (text only)* = the same student with the image blanked (the floor: what "
        "the text alone gives); *teacher zero-shot* = the teacher's own score through the task's candidate "
        "texts (the knowledge there is to distil; primary metric only), with VQA's *text floor*: a uniform pick "
        "among the candidates of the question's answer type, without the image (the chance level where the "
        "distractors share the question's type; a score below it says little of what the teacher knows); "
        "either says "
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
            {(r["method"], r["condition"]): r for r in rows}, methods, conditions, blind, ceiling,
            (floors or {}).get(task),
        )  # fmt: skip
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
        "(task, condition, method, seed); every number above is computed from them by `pipeline/report/`."
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
