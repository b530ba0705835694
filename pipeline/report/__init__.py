"""Aggregate evaluated runs into the results report (docs/method.md §8): tables, plots and DVC metrics/plots
files.

Every number in the report is computed here from the inputs — the runs' eval.json files, the teacher metrics,
the optional extract metrics and the optional teacher zero-shot scores — so the report can never drift from
the runs it claims to describe.

Statistics, per (task, condition, method) cell and per metric:
  * mean ± sample std (ddof=1) over seeds; the std is undefined (None, printed "—") for a single seed;
  * relative gain over the baseline, in % of the baseline mean: (mean - mean_baseline) / |mean_baseline|,
    both means over the seeds run by both (as Δ below);
  * the paired difference Δ: per seed present in both runs (same task, condition and seed: same low-shot
    subset, same init seed), method - baseline. Pairing removes the seed-to-seed variance both methods share.
    Over the n pairs: mean Δ, its 95% confidence interval mean ± t_{0.975, n-1} · std / √n (Student t, n - 1
    degrees of freedom) and the two-sided p-value of the paired t-test. A cell is marked a gain or a loss
    only when its interval excludes 0; with a single pair there is no interval ("n/a") and never a mark.
    With 3 seeds t_{0.975, 2} = 4.30, so a difference has to be about 2.5 of its per-seed std to count.

Floor and ceiling, shown beside every task × condition:
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

Modules: ``collect`` (the runs' eval.json files), ``stats`` (Student t without scipy, the paired test),
``summary`` (one row per cell), ``markdown`` (results.md), ``dvc`` (summary.json, plots.json), ``plots``
and, here, ``write_report``, which writes them all or nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..conditions import Condition
from .collect import collect, is_number
from .common import BLIND, CI_LEVEL, MIN_SEEDS, ZEROSHOT, ReportError
from .dvc import plots_data, summary_metrics
from .markdown import format_cell, markdown
from .plots import lowshot_series, plot_lowshot, plot_shift
from .stats import betainc, holm, mean_ci, paired_test, t_cdf, t_quantile
from .summary import compare, condition_order, method_order, summarise, task_order

__all__ = [
    "BLIND",
    "CI_LEVEL",
    "MIN_SEEDS",
    "ZEROSHOT",
    "ReportError",
    "betainc",
    "collect",
    "compare",
    "condition_order",
    "format_cell",
    "holm",
    "load_optional_json",
    "load_zeroshot",
    "load_zeroshots",
    "lowshot_series",
    "markdown",
    "mean_ci",
    "method_order",
    "paired_test",
    "plot_lowshot",
    "plot_shift",
    "plots_data",
    "summarise",
    "summary_metrics",
    "t_cdf",
    "t_quantile",
    "task_order",
    "write_report",
]


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


def _zeroshot_file(
    path: str | Path,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]] | None:
    """(scores, text floors) of one zero-shot file, read once; None when it does not exist."""
    data = load_optional_json(path)
    if data is None:
        return None
    out: dict[str, dict[str, float]] = {}
    floors: dict[str, dict[str, float]] = {}
    for task, scores in data.items():
        if not isinstance(scores, dict):
            raise ReportError(
                f"{path}: key '{task}': expected an object {{condition: score}}, got {scores!r}"
            )
        for condition, score in scores.items():
            if isinstance(score, dict) and "score" in score:  # stages.zeroshot's entries carry their details
                if is_number(score.get("text_floor")):  # VQA's (pipeline/zeroshot.py)
                    floors.setdefault(task, {})[condition] = float(score["text_floor"])
                score = score["score"]
            try:
                Condition.parse(condition)
            except ValueError as e:
                raise ReportError(f"{path}: key '{task}.{condition}': {e}") from None
            if not is_number(score) or not 0.0 <= score <= 1.0:
                raise ReportError(
                    f"{path}: key '{task}.{condition}': expected a score in [0, 1] (the task's primary metric), "
                    f"got {score!r}"
                )
            out.setdefault(task, {})[condition] = float(score)
    return out, floors


def load_zeroshot(path: str | Path) -> dict[str, dict[str, float]] | None:
    """The teacher zero-shot scores ``{task: {condition: score}}`` (format in the module docstring), or None
    when the file does not exist. Any malformed entry fails, naming the file and the key."""
    read = _zeroshot_file(path)
    return None if read is None else read[0]


def load_zeroshots(
    paths: Sequence[str | Path],
) -> tuple[dict[str, dict[str, float]] | None, dict[str, dict[str, float]]]:
    """``load_zeroshot`` of each file, merged (None when none exists), and the text floors of the entries that
    carry one, ``{task: {condition: text_floor}}``: one file per data root where the sources live apart (real
    data). Each file is read once. A task and condition scored in two files is refused, naming both."""
    merged: dict[str, dict[str, float]] = {}
    floors: dict[str, dict[str, float]] = {}
    where: dict[tuple[str, str], str | Path] = {}
    found = False
    for path in paths:
        read = _zeroshot_file(path)
        found |= read is not None
        scores, file_floors = read or ({}, {})
        for task, conds in scores.items():
            for condition, score in conds.items():
                if (task, condition) in where:
                    raise ReportError(
                        f"{path}: key '{task}.{condition}' is also scored in {where[task, condition]}; "
                        "give each task's zero-shot scores once"
                    )
                where[task, condition] = path
                merged.setdefault(task, {})[condition] = score
        for task, conds in file_floors.items():
            floors.setdefault(task, {}).update(conds)
    return (merged if found else None), floors


def write_report(
    runs_dir: str | Path,
    out_dir: str | Path,
    teacher_path: str | Path = "metrics/teacher.json",
    extract_path: str | Path = "metrics/extract.json",
    baseline: str = "baseline",
    zeroshot_path: str | Path | Sequence[str | Path] = "metrics/zeroshot.json",
    blind: str = BLIND,
) -> dict[str, Path]:
    """Collect, summarise and write results.md, lowshot.png, shift.png, plots.json and summary.json.
    Returns {name: path} of what was written.

    Everything is written into a temporary folder inside ``out_dir`` first and renamed into place only once
    all of it succeeded, so a failing report leaves the previous one whole."""
    summary = summarise(collect(runs_dir), baseline=baseline, blind=blind)
    teacher = load_optional_json(teacher_path)
    extract = load_optional_json(extract_path)
    zeroshot_paths = [zeroshot_path] if isinstance(zeroshot_path, (str, Path)) else list(zeroshot_path)
    zeroshot, floors = load_zeroshots(zeroshot_paths)
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
        "zeroshot": ", ".join(str(p) for p in zeroshot_paths),
    }
    with tempfile.TemporaryDirectory(dir=out, prefix=".report-") as tmp_dir:
        tmp = {k: Path(tmp_dir) / name for k, name in names.items()}
        tmp["results"].write_text(
            markdown(
                summary,
                teacher,
                extract,
                zeroshot,
                baseline=baseline,
                blind=blind,
                sources=sources,
                floors=floors,
            )  # fmt: skip
        )
        plot_lowshot(summary, tmp["lowshot"], baseline=baseline, zeroshot=zeroshot, blind=blind)
        plot_shift(summary, tmp["shift"], baseline=baseline, zeroshot=zeroshot, blind=blind)
        tmp["plots"].write_text(json.dumps(plots_data(summary), indent=1))
        tmp["summary"].write_text(json.dumps(summary_metrics(summary, zeroshot), indent=1))
        for k, name in names.items():
            os.replace(tmp[k], out / name)
    return {k: out / name for k, name in names.items()}
