"""The plots: accuracy vs labelled fraction, and under domain shift."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..conditions import Condition
from .common import BLIND, CI_LEVEL, lowshot_fraction
from .stats import t_quantile
from .summary import method_order, task_order


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


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ci_half(std: float | None, n: int) -> float | None:
    """Half-width of the 95% t interval of a mean of n seeds; None for a single seed, which has no interval."""
    if std is None or n < 2:
        return None
    return t_quantile(0.5 + CI_LEVEL / 2.0, n - 1) * std / math.sqrt(n)


def _bars(errs: Iterable[float | None]) -> list[float]:
    # NaN draws no bar: a zero-width bar on a one-seed point would read as a mean known exactly.
    return [math.nan if e is None else e for e in errs]


def _title(name: str, errs: Iterable[float | None]) -> str:
    return f"{name} (bars: 95% CI{'; none for one seed' if any(e is None for e in errs) else ''})"


def lowshot_series(
    summary: Sequence[dict],
    baseline: str = "baseline",
    zeroshot: dict[str, dict[str, float]] | None = None,
    blind: str = BLIND,
) -> list[dict]:
    """What the low-shot plot draws, per task: ``{task, metric, fractions, log_x, lines, zeroshot}`` with
    fractions = every low-shot fraction present plus full (= 1.0), log_x when there are more than two, lines =
    ``[{method, label, x, y, err}]`` (err = half-width of the 95% t interval of the mean over seeds, None for
    one seed) and zeroshot = ``[(fraction, score)]`` of the measured teacher zero-shot scores."""
    rows = [r for r in summary if lowshot_fraction(r["condition"]) is not None]
    out = []
    for task in _tasks(rows):
        task_rows = [r for r in rows if r["task"] == task]
        lines = []
        for m in sorted({r["method"] for r in task_rows}, key=lambda m: method_order(m, baseline, blind)):
            # Keyed: two spellings of one fraction (lowshot-0.5, lowshot-0.50) tie, and rows do not compare.
            pts = sorted(
                ((lowshot_fraction(r["condition"]), r) for r in task_rows if r["method"] == m),
                key=lambda p: (p[0], p[1]["condition"]),
            )
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
            if (f := lowshot_fraction(c)) is not None
        )
        fractions = sorted({lowshot_fraction(r["condition"]) for r in task_rows} | {f for f, _ in zs})
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
                yerr=_bars(line["err"]),
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
        ax.set_title(_title(task["task"], (e for line in task["lines"] for e in line["err"])))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


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
            yerr=_bars(_ci_half(r["std"], r["n"]) for r in rows),
            capsize=3,
            label="shift (target unseen)",
        )
        if refs:
            ax.bar(
                [x + width / 2 for x in refs],
                [d["mean"] for d in refs.values()],
                width,
                yerr=_bars(_ci_half(d["std"], d["n"]) for d in refs.values()),
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
        one = any(r["n"] < 2 for r in rows) or any(d["n"] < 2 for d in refs.values())
        ax.set_title(f"{task} — target: {', '.join(targets) or '?'}" + (" (no bar: one seed)" if one else ""))
        ax.set_ylabel(rows[0]["primary_metric"])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)
