"""Which texts the teacher encodes for an instance (docs/method.md §3 and §5).

The extraction stage encodes the union of these over every instance (deduplicated by content hash), and
the student stage looks the same strings up in the cache, so both sides must build them here and nowhere
else. A VQA instance's candidates depend on the answer vocabulary and each answer's type: extraction records
both in the store (``data.vqa_vocab``, ``data.vqa_answer_types``) and every reader builds its candidates from
the store's (``pipeline.cache.vqa_answer_space``).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
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


def answer_types(train: Iterable[Instance]) -> dict[str, str]:
    """Each VQA answer's type (``meta["answer_type"]``: VQA v2's yes/no, number, other; the synthetic world's
    finer ones) as the labelled training instances give it, the most frequent where they disagree. An answer
    no labelled instance gives as its gold (one only humans gave) has no type."""
    seen: dict[str, Counter] = defaultdict(Counter)
    for i in train:
        if i.task == "vqa" and i.answer and i.meta.get("answer_type"):
            seen[i.answer][i.meta["answer_type"]] += 1
    return {a: c.most_common(1)[0][0] for a, c in seen.items()}


def vqa_answer_type(inst: Instance, types: dict[str, str] | None) -> str | None:
    """The question's answer type: its own label (``meta["answer_type"]``), else its gold answer's type in
    ``types`` (``answer_types``); None when neither is known."""
    return (inst.meta or {}).get("answer_type") or (types or {}).get(inst.answer) or None


def vqa_distractors(
    inst: Instance, vocab: list[str], k: int, types: dict[str, str] | None = None
) -> list[str]:
    """Up to K − 1 distractor answers of the question's answer type (``vqa_answer_type``): the vocabulary's
    answers ``types`` gives that type, drawn with a per-instance seed, so the same texts are produced at
    extraction and at training time. Fewer when the type has fewer other answers (the synthetic world's
    yes/no: one). An untyped question (no ``meta["answer_type"]``, a gold answer ``types`` lacks) or ``types``
    None draws from the whole vocabulary, as every question did before distractors shared the gold's type
    (docs/method.md §5 says why they do)."""
    own = vqa_answer_type(inst, types) if types is not None else None
    seed = int(hashlib.sha1(inst.key.encode()).hexdigest()[:8], 16)
    pool = [a for a in vocab if a != inst.answer and (own is None or types.get(a) == own)]
    return random.Random(seed).sample(pool, min(k - 1, len(pool)))


def vqa_answers(
    inst: Instance, vocab: list[str], k: int, types: dict[str, str] | None = None
) -> tuple[list[str], int]:
    """The candidate answers of a labelled VQA instance, in candidate order, and the gold's index: the gold
    answer and ``vqa_distractors``. Every consumer (extraction, the confidence weights, the zero-shot score)
    takes its candidates from here."""
    answers = [inst.answer, *vqa_distractors(inst, vocab, k, types)]
    # The gold candidate sits at a per-instance position so nothing downstream can learn "index 0".
    order = sorted(range(len(answers)), key=lambda i: text_hash(f"{inst.key}:{answers[i]}"))
    return [answers[i] for i in order], order.index(0)


def instance_texts(
    inst: Instance, vocab: list[str] | None = None, k: int = 4, types: dict[str, str] | None = None
) -> InstanceTexts:
    """The teacher texts of one instance. ``vocab`` and ``types`` are the VQA answer vocabulary and each
    answer's type (``vqa_answers``; needed for VQA only)."""
    if inst.task == "vqa":
        if not inst.answer:
            return InstanceTexts(inst.question, [], None, [], None)
        answers, gold = vqa_answers(inst, vocab or [], k, types)
        return InstanceTexts(inst.question, [join_text(inst.question, a) for a in answers], gold, [], None)
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
