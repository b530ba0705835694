"""Official task metrics (docs/method.md §8), computed per instance so they can be broken down by domain and
paired by seed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def vqa_score(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10 leave-one-out subsets of the
    human answers (the official evaluation; answers are compared after the converters' normalisation)."""
    if not human_answers:
        raise ValueError("vqa_score needs the human answers of the instance")
    n = len(human_answers)
    if n == 1:  # one reference (a dataset of one answer per question): every leave-one-out subset is empty
        return float(human_answers[0] == prediction)
    matches = [a == prediction for a in human_answers]
    total = sum(matches)
    return sum(min((total - m) / 3.0, 1.0) for m in matches) / n


class UnlabelledInstance(ValueError):
    """A scored instance without the ground truth its metric needs: an unlabelled split (VQA's test2015, VCR's
    test) named as the test split. Scoring it as wrong would report 0 for every method."""


def instance_scores(task: str, prediction: dict, inst) -> dict[str, float]:
    """Per-instance metric values. prediction: vqa {"answer": str}; snli_ve {"label": int};
    vcr {"answer": int, "rationale": int}."""
    truth = {"vqa": [inst.human_answers or inst.answer], "snli_ve": [inst.label],
             "vcr": [inst.label, inst.rationale_label]}.get(task, [True])  # fmt: skip
    if any(t is None or t == "" or t == [] for t in truth):
        raise UnlabelledInstance(
            f"{task} instance {inst.key!r} ({inst.split}) has no label to score against: an unlabelled split "
            "cannot be the test split (protocol.splits.test)"
        )
    if task == "vqa":
        return {"vqa_score": vqa_score(prediction["answer"], inst.human_answers or [inst.answer])}
    if task == "snli_ve":
        return {"accuracy": float(prediction["label"] == inst.label)}
    if task == "vcr":
        qa = prediction["answer"] == inst.label
        qar = prediction["rationale"] == inst.rationale_label
        return {"q2a": float(qa), "qa2r": float(qar), "q2ar": float(qa and qar)}
    raise ValueError(f"unknown task {task!r}")


PRIMARY = {"vqa": "vqa_score", "snli_ve": "accuracy", "vcr": "q2ar"}


def aggregate(rows: Sequence[dict]) -> dict:
    """rows: {"domain": str, <metric>: float, ...} per instance → overall means, per-domain means and counts."""
    if not rows:
        return {"n": 0, "overall": {}, "per_domain": {}}
    keys = [k for k in rows[0] if k != "domain"]
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_domain[r.get("domain", "")].append(r)

    def mean(rs: Sequence[dict]) -> dict[str, float]:
        return {k: sum(r[k] for r in rs) / len(rs) for k in keys}

    return {
        "n": len(rows),
        "overall": mean(rows),
        "per_domain": {d: {"n": len(rs), **mean(rs)} for d, rs in sorted(by_domain.items())},
    }
