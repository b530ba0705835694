"""Which texts the teacher encodes for an instance (docs/method.md §3 and §5).

The extraction stage encodes the union of these over every instance (deduplicated by content hash), and
the student stage looks the same strings up in the cache, so both sides must build them here and nowhere
else.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from .data.schema import Instance


def join_text(*parts: str) -> str:
    return " ".join(p.strip() for p in parts if p and p.strip())


def text_hash(text: str) -> str:
    """Content id of a text in the cache (``text/ids``)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


@dataclass
class InstanceTexts:
    """distill: the text whose tokens are distilled and whose pooled embedding scores image relevance (§3).
    candidates: texts whose agreement with the image gives the confidence weight (§5); gold: index of the
    gold candidate, or None when the weight comes from the batch (SNLI-VE) or the label is unknown.
    rationale_candidates / rationale_gold: VCR QA→R candidates (question + gold answer + rationale)."""

    distill: str
    candidates: list[str]
    gold: int | None
    rationale_candidates: list[str]
    rationale_gold: int | None

    def all(self) -> list[str]:
        return [self.distill, *self.candidates, *self.rationale_candidates]


def vqa_distractors(
    inst: Instance, vocab: list[str], k: int, keep: Callable[[str], bool] | None = None
) -> list[str]:
    """K-1 distractor answers drawn from the vocabulary (those ``keep`` accepts, when given) with a
    per-instance seed, so the same texts are produced at extraction and at training time."""
    seed = int(hashlib.sha1(inst.key.encode()).hexdigest()[:8], 16)
    pool = [a for a in vocab if a != inst.answer and (keep is None or keep(a))]
    return random.Random(seed).sample(pool, min(k - 1, len(pool)))


def instance_texts(inst: Instance, vocab: list[str] | None = None, k: int = 4) -> InstanceTexts:
    """The teacher texts of one instance. ``vocab`` is the VQA answer vocabulary (needed for VQA only)."""
    if inst.task == "vqa":
        if not inst.answer:
            return InstanceTexts(inst.question, [], None, [], None)
        answers = [inst.answer, *vqa_distractors(inst, vocab or [], k)]
        # The gold candidate sits at a per-instance position so nothing downstream can learn "index 0".
        order = sorted(range(len(answers)), key=lambda i: text_hash(f"{inst.key}:{answers[i]}"))
        cands = [join_text(inst.question, answers[i]) for i in order]
        return InstanceTexts(inst.question, cands, order.index(0), [], None)
    if inst.task == "snli_ve":
        return InstanceTexts(inst.hypothesis, [], None, [], None)
    if inst.task == "vcr":
        cands = [join_text(inst.question, a) for a in inst.answers]
        if inst.label is None:
            return InstanceTexts(inst.question, cands, None, [], None)
        gold_answer = inst.answers[inst.label]
        rats = [join_text(inst.question, gold_answer, r) for r in inst.rationales]
        return InstanceTexts(cands[inst.label], cands, inst.label, rats, inst.rationale_label)
    if inst.task == "caption":
        return InstanceTexts(inst.caption, [], None, [], None)
    raise ValueError(f"instance '{inst.key}': unknown task {inst.task!r}")
