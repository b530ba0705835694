"""The study's finished cells gathered into per-cell statistics and summary.json entries."""

from __future__ import annotations

import json
from pathlib import Path

from ..report import (
    BLIND,
    ZEROSHOT,
    ReportError,
    collect,
    compare,
    holm,
    load_optional_json,
    summarise,
)
from .grid import BASELINE, FULL_TEACHER, Cell, StudyParams, cells

# --------------------------------------------------------------------------------------------- aggregation


def collect_study(sp: StudyParams, runs: str | Path) -> tuple[dict[str, list[dict]], list[Cell]]:
    """Evaluated rows per variant (``<init>-<teacher>``), only of cells in the grid (a folder left by an
    older grid is ignored), and the cells not finished yet."""
    grid = cells(sp)
    wanted = {(c.variant, c.task, c.condition, c.method, c.seed) for c in grid}
    rows: dict[str, list[dict]] = {}
    for variant in sorted({c.variant for c in grid}):
        folder = Path(runs) / variant
        if not any(folder.glob("*/eval.json")):
            continue
        for r in collect(folder):
            if (variant, r["task"], r["condition"], r["method"], r["seed"]) in wanted:
                # report.collect keeps the metrics only; the cell's own timing is read beside them.
                r["cell"] = json.loads(Path(r["path"]).read_text()).get("cell") or {}
                rows.setdefault(variant, []).append(r)
    done = {(v, r["task"], r["condition"], r["method"], r["seed"]) for v, rs in rows.items() for r in rs}
    missing = [c for c in grid if (c.variant, c.task, c.condition, c.method, c.seed) not in done]
    return rows, missing


def summarise_study(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """report.summarise per variant. A weaker-teacher variant runs clip_td only: its Δ is paired against the
    same init's baseline (and blind floor) with the full teacher, which no teacher changes."""
    out = {}
    for variant, rs in rows.items():
        init, teacher = variant.split("-", 1)
        if teacher != FULL_TEACHER:
            own = {(r["task"], r["condition"]) for r in rs}
            shared = [
                r
                for r in rows.get(f"{init}-{FULL_TEACHER}", [])
                if r["method"] in (BASELINE, BLIND) and (r["task"], r["condition"]) in own
            ]
            summary = [s for s in summarise(rs + shared) if s["method"] not in (BASELINE, BLIND)]
        else:
            summary = summarise(rs)
        out[variant] = summary
    return out


def _entry(s: dict, init: str, teacher: str) -> dict:
    paired = s["paired"] or {}
    return {
        "task": s["task"],
        "condition": s["condition"],
        "method": s["method"],
        "metric": s["primary_metric"],
        "n_seeds": s["n"],
        "mean": s["mean"],
        "std": s["std"],
        "delta_mean": paired.get("mean"),
        "ci95": paired.get("ci95"),
        "p": paired.get("p"),
        "rel_gain_pct": s["gain_pct"],
        "init": init,
        "teacher": teacher,
    }


def summary_entries(summaries: dict[str, list[dict]], zeroshot: dict[str, dict]) -> list[dict]:
    """summary.json: one entry per task × condition × method × (init, teacher), with grid.ENTRY_KEYS (delta
    fields null for the baseline), plus a ``teacher_zeroshot`` entry per teacher, task and condition."""
    out = [_entry(s, *v.split("-", 1)) for v, ss in sorted(summaries.items()) for s in ss]
    metric = {s["task"]: s["primary_metric"] for ss in summaries.values() for s in ss}
    for teacher, by_task in sorted(zeroshot.items()):
        for task, conds in by_task.items():
            for cond, z in conds.items():
                out.append(
                    {
                        "task": task,
                        "condition": cond,
                        "method": ZEROSHOT,
                        "metric": z.get("metric", metric.get(task)),
                        "n_seeds": None,
                        "mean": z["score"],
                        "std": None,
                        "delta_mean": None,
                        "ci95": None,
                        "p": None,
                        "rel_gain_pct": None,
                        "init": None,
                        "teacher": teacher,
                    }
                )
    return out


def load_zeroshot_files(paths: dict[str, Path]) -> dict[str, dict]:
    """{teacher: {task: {condition: {score, metric, chance, ...}}}} from the study's zero-shot files."""
    out = {}
    for teacher, path in paths.items():
        data = load_optional_json(path)
        if data is None:
            continue
        for task, conds in data.items():
            for cond, z in conds.items():
                z = z if isinstance(z, dict) else {"score": z}
                if not isinstance(z.get("score"), (int, float)):
                    raise ReportError(f"{path}: key '{task}.{cond}': no numeric score")
                out.setdefault(teacher, {}).setdefault(task, {})[cond] = z
    return out


def init_contrast(summaries: dict[str, list[dict]]) -> list[dict]:
    """Where distillation matters most: per task × condition × method run from both inits with the full
    teacher, the paired per-seed difference of the method's Δ against its own init's baseline, scratch
    minus pretrained (> 0: the method gains more from scratch). Paired on the seeds both inits ran; ``p_holm``
    adjusts the rows' p-values as one family (Holm), since the question is asked of every row at once."""
    by_init: dict[str, dict[tuple, dict]] = {}
    for variant, ss in summaries.items():
        init, teacher = variant.split("-", 1)
        if teacher == FULL_TEACHER:
            by_init[init] = {(s["task"], s["condition"], s["method"]): s for s in ss if s.get("paired")}
    scratch, pretrained = by_init.get("scratch", {}), by_init.get("pretrained", {})
    out = []
    for key in sorted(set(scratch) & set(pretrained)):
        if key[2] in (BASELINE, BLIND):
            continue
        ds, dp = (
            dict(zip(x["paired"]["seeds"], x["paired"]["diffs"], strict=True))
            for x in (scratch[key], pretrained[key])
        )
        c = compare(ds, dp)
        paired = c["paired"] or {}
        out.append(
            {
                "task": key[0],
                "condition": key[1],
                "method": key[2],
                "delta_scratch": scratch[key]["paired"]["mean"],
                "delta_pretrained": pretrained[key]["paired"]["mean"],
                "n_seeds": paired.get("n"),
                "diff_mean": paired.get("mean"),
                "ci95": paired.get("ci95"),
                "p": paired.get("p"),
                "verdict": {"gain": "scratch", "loss": "pretrained"}.get(c["verdict"], c["verdict"]),
            }
        )
    for row, p in zip(out, holm([row["p"] for row in out]), strict=True):
        row["p_holm"] = p
    return out
