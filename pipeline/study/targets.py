"""The study's targets (docs/study.md), each given a status computed from the study's numbers, with what
explains a miss."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..protocol import Condition
from ..report import (
    BLIND,
    compare,
    holm,
)
from .grid import BASELINE, FULL_TEACHER, StudyParams, teacher_name

# ------------------------------------------------------------------------------------------------ targets


def _cell(summary: Sequence[dict], task: str, cond: str, method: str) -> dict | None:
    return next(
        (s for s in summary if (s["task"], s["condition"], s["method"]) == (task, cond, method)), None
    )


def smallest_lowshot(conditions: Iterable[str]) -> str | None:
    low = [c for c in conditions if Condition.parse(c).kind == "lowshot"]
    return min(low, key=lambda c: Condition.parse(c).fraction) if low else None


def _head_to_head(rows: Sequence[dict], task: str, cond: str, a: str, b: str) -> dict | None:
    """Paired comparison of method a against method b (per seed), as report.compare does against the baseline."""
    va = {
        r["seed"]: r["primary"] for r in rows if (r["task"], r["condition"], r["method"]) == (task, cond, a)
    }
    vb = {
        r["seed"]: r["primary"] for r in rows if (r["task"], r["condition"], r["method"]) == (task, cond, b)
    }
    if not va or not vb:
        return None
    return compare(va, vb)


def needs_explaining(target_id: str, cell: dict) -> bool:
    """Whether a missed target's diagnostics explain this cell of it: not one that passed (a gain, or a dose
    row that is ok), except under the relative-gain target, whose gains can still fall short of its bar."""
    passed = cell.get("verdict") == "gain" or cell.get("ok") is True
    return not passed or "rel_gain" in target_id


def explain(
    task: str,
    cond: str,
    summary: Sequence[dict],
    zeroshot: dict,
    selection: dict | None,
    dose: Sequence[dict],
) -> list[str]:
    """Which diagnostic accounts for a missed target in one cell, each from the numbers."""
    why = []
    base, blind = _cell(summary, task, cond, BASELINE), _cell(summary, task, cond, BLIND)
    if base and blind and base["mean"] is not None and blind["mean"] is not None:
        gap = base["mean"] - blind["mean"]
        if gap < 0.10:
            why.append(f"the baseline uses the image little (baseline − blind = {gap:+.3f} < 0.10)")
    clip = _cell(summary, task, cond, "clip_td")
    if (
        clip
        and blind
        and clip["mean"] is not None
        and blind["mean"] is not None
        and clip["mean"] < blind["mean"]
    ):
        below = _below_floor(clip, blind)
        if below is None or below["ci95"] is None or below["ci95"][1] < 0:
            test = "" if below is None or below["ci95"] is None else f", paired 95% CI {_ci(below['ci95'])}"
            why.append(
                f"clip_td ({clip['mean']:.3f}) falls below the blind floor ({blind['mean']:.3f}{test}): the "
                "distillation term outweighs the labels and the student learns less from the image than from "
                "no image"
            )
        else:
            why.append(
                f"clip_td ({clip['mean']:.3f}) is at the blind floor ({blind['mean']:.3f}, paired 95% CI "
                f"{_ci(below['ci95'])}): the student gains nothing from the image over the text alone"
            )
    kd = _cell(summary, task, cond, "naive_kd")
    kd_delta = (kd or {}).get("paired") or {}  # summarise()'s row: the paired Δ against the baseline
    if kd_delta.get("ci95") and kd_delta["ci95"][1] < 0:
        lo, hi = kd_delta["ci95"]
        why.append(
            f"plain distillation loses too (naive_kd Δ {kd_delta['mean']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]): "
            "distilling this teacher at all hurts here, not CLIP-TD's token selection or weights alone"
        )
    z = zeroshot.get(FULL_TEACHER, {}).get(task, {}).get(cond)
    if z is not None and base and base["mean"] is not None and z["score"] <= base["mean"]:
        why.append(
            f"the teacher's zero-shot score {z['score']:.3f} is not above the baseline's "
            f"{base['mean']:.3f} (little task knowledge to distil)"
        )
    sel = (selection or {}).get("teachers", {}).get(FULL_TEACHER, {}).get("tasks", {}).get(task)
    if sel:
        why += _selection_reasons(task, sel)
    rnd = [d for d in dose if d["task"] == task and d["condition"] == cond and d["steps"] == 0]
    if rnd and rnd[0]["verdict"] == "gain":
        why.append("the random (step-0) teacher gives a gain too: the gain is not the teacher's knowledge")
    return why or ["no diagnostic flags this cell (the effect is within seed noise)"]


def _below_floor(clip: dict, blind: dict) -> dict | None:
    """clip_td − blind paired per seed, from each one's per-seed Δ against the same baseline (the baseline
    cancels); None when the rows do not carry them."""
    a, b = clip.get("paired") or {}, blind.get("paired") or {}
    if not (a.get("diffs") and b.get("diffs")):
        return None
    c = compare(
        dict(zip(a["seeds"], a["diffs"], strict=True)), dict(zip(b["seeds"], b["diffs"], strict=True))
    )
    return c["paired"]


def _ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _low(test: dict | None) -> float:
    """The lower end of a paired test's interval; +1 (no doubt) where the test is missing (an older file)."""
    return ((test or {}).get("ci95") or [1.0, 1.0])[0]


def _selection_reasons(task: str, sel: dict) -> list[str]:
    """What the selection diagnostic (student/diagnostics.py) says against the selection being targeted."""
    why = []
    if _low(sel) <= 0:
        why.append(
            f"token selection is not better than random on {task} "
            f"(selected {sel['selected_share']:.3f} vs random {sel['random_share']:.3f})"
        )
    elif _low(sel.get("vs_fixed")) <= 0:
        why.append(
            f"token selection on {task} beats random but not the teacher's own most frequent cells "
            f"(selected {sel['selected_share']:.3f} vs fixed {sel['fixed_share']:.3f}): it selects by "
            "position, not by what the text names"
        )
    other = sel.get("vs_other_text")
    if other and other.get("ci95"):
        shares = (
            f"selected {sel['selected_share']:.3f} vs {sel['other_text_share']:.3f} with another "
            "instance's text"
        )
        if other["ci95"][1] < 0:
            why.append(
                f"on {task} the instance's own text steers the selection away from the objects it names "
                f"({shares}): the selection is not targeted"
            )
        elif other["ci95"][0] <= 0 and not why:
            why.append(
                f"token selection on {task} follows the image but not the text ({shares}): not targeted"
            )
    return why


def _per_seed(rows: Sequence[dict], task: str, cond: str, method: str) -> dict[int, float]:
    return {
        r["seed"]: r["primary"]
        for r in rows
        if (r["task"], r["condition"], r["method"]) == (task, cond, method)
    }


def dose_table(
    sp: StudyParams,
    summaries: dict[str, list[dict]],
    teacher_steps: int | None,
    zeroshot: dict,
    snapshots: dict | None,
    rows: dict[str, list[dict]] | None = None,
) -> list[dict]:
    """clip_td's Δ against the baseline per teacher (snapshots and the finished teacher), per dose cell; with
    the cells' ``rows``, also each trained teacher's ``vs_random``: the method's score with it minus with the
    random (step-0) teacher, paired per seed (whether what the teacher learned is what the student gains)."""
    g = sp.dose
    out = []
    steps = sorted(set(g.steps)) + [None]
    for init in g.inits:
        for task in sp.tasks:
            for cond in g.conditions:
                for method in g.methods:
                    for s in steps:
                        teacher = teacher_name(s)
                        cell = _cell(summaries.get(f"{init}-{teacher}", []), task, cond, method)
                        z = zeroshot.get(teacher, {}).get(task, {}).get(cond)
                        retr = None
                        if s is not None and snapshots:
                            retr = snapshots.get(str(s), {}).get("all", {}).get("random_top1")
                        elif s is None and snapshots:
                            retr = snapshots.get("full")
                        paired = (cell or {}).get("paired") or {}
                        vs_random = None
                        if rows is not None and s != 0 and 0 in g.steps:
                            this = _per_seed(rows.get(f"{init}-{teacher}", []), task, cond, method)
                            rnd = _per_seed(rows.get(f"{init}-{teacher_name(0)}", []), task, cond, method)
                            if this and rnd:
                                c = compare(this, rnd)
                                vs_random = {k: c["paired"][k] for k in ("n", "mean", "ci95", "p")}
                        out.append(
                            {
                                "init": init,
                                "task": task,
                                "condition": cond,
                                "method": method,
                                "teacher": teacher,
                                "steps": teacher_steps if s is None else s,
                                "retrieval_top1": retr,
                                "zeroshot": z["score"] if z else None,
                                "n_seeds": (cell or {}).get("n"),
                                "delta_mean": paired.get("mean"),
                                "ci95": paired.get("ci95"),
                                "p": paired.get("p"),
                                "verdict": (cell or {}).get("verdict"),
                                "vs_random": vs_random,
                            }
                        )
    return out


def _dose_order(d: dict) -> tuple:
    # The finished teacher last, whether or not its step count is known (metrics/teacher.json).
    return (d["teacher"] == FULL_TEACHER, d["steps"] or 0)


def with_holm(cells: list[dict]) -> list[dict]:
    """The cells of one target with ``p_holm``: their p-values adjusted as one family (Holm), since the
    target asks its question of every cell at once."""
    for c, p in zip(cells, holm([c["p"] for c in cells]), strict=True):
        c["p_holm"] = p
    return cells


def holm_note(cells: Sequence[dict]) -> str:
    """How many of a target's cells differ from 0 in each direction once the family is adjusted: the count
    the target states (each cell's own interval) can hold chance findings among several cells."""
    if not any(c["p_holm"] is not None for c in cells):
        return ""
    held = [c for c in cells if c["p_holm"] is not None and c["p_holm"] < 0.05]
    up = sum(c["verdict"] == "gain" for c in held)
    down = sum(c["verdict"] == "loss" for c in held)
    return f" ({up} above 0, {down} below with Holm's adjustment over the {len(cells)})"


def _status(ok: bool | None) -> str:
    return {True: "met", False: "missed", None: "incomplete"}[ok]


def targets(
    sp: StudyParams,
    summaries: dict[str, list[dict]],
    rows: dict[str, list[dict]],
    zeroshot: dict,
    selection: dict | None,
    dose: Sequence[dict],
) -> list[dict]:
    """Every target of the study, decided from the numbers: status met | missed | incomplete (a cell it needs
    has fewer than 2 paired seeds or was not run), the numbers it rests on, and for a miss the diagnostics."""
    variant = (
        f"pretrained-{FULL_TEACHER}"
        if "pretrained" in sp.main.inits
        else f"{sp.main.inits[0]}-{FULL_TEACHER}"
    )
    summary, vrows = summaries.get(variant, []), rows.get(variant, [])
    low = smallest_lowshot(sp.main.conditions)
    conds = [c for c in (low, "shift") if c and c in sp.main.conditions]
    out = []

    def cell_info(task: str, cond: str, method: str = "clip_td") -> dict:
        c = _cell(summary, task, cond, method)
        paired = (c or {}).get("paired") or {}
        return {
            "task": task,
            "condition": cond,
            "method": method,
            "delta_mean": paired.get("mean"),
            "ci95": paired.get("ci95"),
            "p": paired.get("p"),
            "rel_gain_pct": (c or {}).get("gain_pct"),
            "verdict": (c or {}).get("verdict"),
        }

    def decided(infos: list[dict]) -> bool:
        return all(i["ci95"] is not None for i in infos)

    # 1. clip_td's interval above 0 in >= 4 of the 6 task x {smallest low-shot, shift} cells.
    infos = with_holm([cell_info(t, c) for t in sp.tasks for c in conds])
    wins = sum(i["verdict"] == "gain" for i in infos)
    need = math.ceil(4 / 6 * len(infos)) if infos else 1
    ok = True if wins >= need else (False if decided(infos) else None)
    out.append(
        {
            "id": "gain_cells",
            "target": f"clip_td beats baseline (95% CI above 0) in >= {need} of "
            f"{len(infos)} task x {{{', '.join(conds)}}} cells",
            "value": f"{wins} of {len(infos)}{holm_note(infos)}",
            "status": _status(ok),
            "cells": infos,
        }
    )

    # 2. Relative gains: VCR >= 10% low-shot and shift; VQA and SNLI-VE >= 5% low-shot.
    wanted = [("vcr", low, 10.0), ("vcr", "shift", 10.0), ("vqa", low, 5.0), ("snli_ve", low, 5.0)]
    for task, cond, pct in wanted:
        if task not in sp.tasks or cond not in sp.main.conditions:
            continue
        i = cell_info(task, cond)
        g = i["rel_gain_pct"]
        # A gain of the size asked for is one only where it is a gain at all (the interval of Δ above 0):
        # without an interval (one paired seed) the target is not decided.
        ok = None if g is None or i["ci95"] is None else g >= pct and i["verdict"] == "gain"
        out.append(
            {
                "id": f"rel_gain_{task}_{cond}",
                "target": f"clip_td relative gain >= +{pct:.0f}% on {task} {cond} (95% CI of Δ above 0)",
                "value": "n/a" if g is None else f"{g:+.1f}%",
                "status": _status(ok),
                "cells": [i],
            }
        )
    # Full data: clip_td not worse (interval includes or exceeds 0).
    if "full" in sp.main.conditions:
        infos = [cell_info(t, "full") for t in sp.tasks]
        bad = [i for i in infos if i["ci95"] is not None and i["ci95"][1] < 0]
        ok = False if bad else (True if decided(infos) else None)
        out.append(
            {
                "id": "full_not_worse",
                "target": "full data: clip_td not worse than baseline (CI includes or "
                "exceeds 0) on every task",
                "value": f"{len(bad)} task(s) worse",
                "status": _status(ok),
                "cells": infos,
            }
        )

    # 3. clip_td > naive_kd (paired, CI above 0) on >= 2 of 3 tasks in low-shot.
    if low:
        h2h = []
        for t in sp.tasks:
            c = _head_to_head(vrows, t, low, "clip_td", "naive_kd")
            paired = (c or {}).get("paired") or {}
            h2h.append(
                {
                    "task": t,
                    "condition": low,
                    "method": "clip_td vs naive_kd",
                    "delta_mean": paired.get("mean"),
                    "ci95": paired.get("ci95"),
                    "p": paired.get("p"),
                    "rel_gain_pct": (c or {}).get("gain_pct"),
                    "verdict": (c or {}).get("verdict"),
                }
            )
        h2h = with_holm(h2h)
        wins = sum(i["verdict"] == "gain" for i in h2h)
        need = math.ceil(2 / 3 * len(h2h))
        ok = True if wins >= need else (False if decided(h2h) else None)
        out.append(
            {
                "id": "beats_naive_kd",
                "target": f"clip_td > naive_kd (95% CI above 0) on >= {need} of {len(h2h)} tasks in {low}",
                "value": f"{wins} of {len(h2h)}{holm_note(h2h)}",
                "status": _status(ok),
                "cells": h2h,
            }
        )

    # 4. Dose-response: the gain grows with teacher quality and vanishes for the random teacher.
    if dose:
        keys = sorted({(d["init"], d["task"], d["condition"]) for d in dose if d["method"] == "clip_td"})
        rows_ = []
        for init, task, cond in keys:
            ds = sorted(
                [
                    d
                    for d in dose
                    if (d["init"], d["task"], d["condition"]) == (init, task, cond)
                    and d["method"] == "clip_td"
                ],
                key=_dose_order,
            )
            deltas = [d["delta_mean"] for d in ds]
            if any(x is None for x in deltas) or any(d["ci95"] is None for d in ds):
                rows_.append({"task": task, "condition": cond, "init": init, "ok": None, "deltas": deltas})
                continue
            # No random teacher in the grid: nothing says the gain is the teacher's knowledge.
            if ds[0]["steps"] != 0:
                rows_.append({"task": task, "condition": cond, "init": init, "ok": None, "deltas": deltas})
                continue
            # A gain that is not there with the finished teacher cannot grow with it: that is a miss too.
            gain = ds[-1]["verdict"] == "gain"
            # Δs are means of primaries that can tie exactly (the same instance counts): float rounding must
            # not decide a tie. Means in order are not enough: the finished teacher must beat the random one
            # seed for seed (95% CI of the paired difference above 0), or the order may be the seeds' noise.
            ordered = all(a <= b + 1e-9 for a, b in zip(deltas, deltas[1:], strict=False))
            beats_random = ((ds[-1].get("vs_random") or {}).get("ci95") or [0.0])[0] > 0
            vanishes = ds[0]["verdict"] != "gain"
            rows_.append(
                {
                    "task": task,
                    "condition": cond,
                    "init": init,
                    "ok": gain and ordered and beats_random and vanishes,
                    "gain_with_full_teacher": gain,
                    "grows": ordered and beats_random,
                    "means_ordered": ordered,
                    "beats_random_teacher": beats_random,
                    "vanishes_at_random": vanishes,
                    "deltas": deltas,
                }
            )
        oks = [r["ok"] for r in rows_]
        ok = None if None in oks or not oks else all(oks)
        out.append(
            {
                "id": "dose_response",
                "target": "clip_td gains with the finished teacher, the gain grows "
                "with teacher pretraining (means in order, and the finished teacher's cells above the random "
                "teacher's: paired 95% CI above 0) and is no gain for the random teacher, in every dose cell",
                "value": f"{sum(o is True for o in oks)} of {len(oks)} cells",
                "status": _status(ok),
                "cells": rows_,
            }
        )

    # 5. Selection: the selected tokens fall on named objects more often than random tokens.
    sel = (selection or {}).get("teachers", {}).get(FULL_TEACHER, {}).get("tasks", {})
    if sel:
        better = {t: s["ci95"] is not None and s["ci95"][0] > 0 for t, s in sel.items()}
        out.append(
            {
                "id": "selection",
                "target": "selected image tokens fall on the objects the text names more "
                "often than random tokens (95% CI of the difference above 0) on every task",
                "value": ", ".join(
                    f"{t}: {s['selected_share']:.3f} vs {s['random_share']:.3f}" for t, s in sel.items()
                ),
                "status": _status(all(better.values())),
            }
        )

    for t in out:
        if t["status"] == "missed":
            t["diagnostics"] = {}
            for i in t.get("cells", []):
                if needs_explaining(t["id"], i):
                    key = f"{i['task']} {i['condition']}"
                    t["diagnostics"][key] = explain(
                        i["task"], i["condition"], summary, zeroshot, selection, dose
                    )
    return out
