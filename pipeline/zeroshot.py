"""The teacher's own zero-shot score on each task: the knowledge there is to distil (docs/method.md §5).

Computed from the teacher cache alone (the teacher does not run again), through the same candidate texts the
confidence weights use:

- VCR: Q→A picks the answer whose ``question + answer`` text is closest (cosine of pooled embeddings) to the
  image; QA→R picks among ``question + gold answer + rationale``; Q→AR needs both.
- VQA: the cached declarative candidates (the gold answer and up to K − 1 distractors of the question's answer
  type, ``pipeline.texts.vqa_answers``, from the answer vocabulary and answer types the store records); the
  picked answer is scored with the VQA score over the human answers. This is a choice among 2 to K, so it is
  reported with its chance level (the mean VQA score of a uniform pick among the candidates) and with its
  text floor: the mean VQA score of a uniform pick among the candidates of the question's answer type (each
  answer's type as the training split's labels give it; an answer of unknown type is kept), what a reader of
  the question who never sees the image gets. The distractors share the question's type, so for a typed
  question the floor is its chance level (unless its gold answer's majority type is another); it stays
  reported because an untyped question's distractors come from every type, where the wording alone ("how
  many...") rules some out, and because it shows the candidates give the question away no more than chance.
  A zero-shot score below it says little of what the teacher knows of the image.
- SNLI-VE: the cosine of image and hypothesis, cut into three labels by two thresholds fitted on the
  validation split (the only thing learned; the test split is only scored). Chance: the majority label's share.

Every score is computed on the test instances of each protocol condition (``shift``: the target domain only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .cache import TeacherCache
from .data.schema import Instance
from .metrics import PRIMARY, instance_scores, vqa_score
from .protocol import make_split
from .texts import instance_texts, vqa_answer_type, vqa_answers


@dataclass
class ZeroShot:
    """One task's zero-shot score on one condition's test instances."""

    task: str
    condition: str
    metric: str
    score: float
    chance: float
    n: int
    how: str
    text_floor: float | None = None  # VQA only (module docstring)

    def as_dict(self) -> dict:
        keys = ("metric", "score", "chance", "n", "how") + (
            ("text_floor",) if self.text_floor is not None else ()
        )
        return {k: getattr(self, k) for k in keys}


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of a [B, E] with each of b's candidates [B, K, E] -> [B, K]."""
    return torch.einsum("be,bke->bk", F.normalize(a, dim=-1), F.normalize(b, dim=-1))


def _pick(cache: TeacherCache, insts: Sequence[Instance], cands: list[list[str]]) -> np.ndarray:
    """Index of the candidate text closest to each instance's image (candidates may differ in number)."""
    e_img = cache.image_targets([i.image_id for i in insts])["pooled"]
    k = max(len(c) for c in cands)
    flat = [t for c in cands for t in c]
    pooled = cache.text_targets(flat, tokens=False)["pooled"]
    e_txt = torch.zeros(len(insts), k, pooled.shape[1])
    mask = torch.zeros(len(insts), k, dtype=torch.bool)
    pos = 0
    for n, c in enumerate(cands):
        e_txt[n, : len(c)] = pooled[pos : pos + len(c)]
        mask[n, : len(c)] = True
        pos += len(c)
    sim = _cos(e_img, e_txt).masked_fill(~mask, float("-inf"))
    return sim.argmax(dim=1).numpy()


def _batches(items: Sequence, size: int = 512) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def vcr_predictions(cache: TeacherCache, insts: Sequence[Instance]) -> list[dict]:
    preds: list[dict] = []
    for chunk in _batches(insts):
        texts = [instance_texts(i) for i in chunk]
        answers = _pick(cache, chunk, [t.candidates for t in texts])
        rationales = _pick(cache, chunk, [t.rationale_candidates for t in texts])
        preds += [{"answer": int(a), "rationale": int(r)} for a, r in zip(answers, rationales, strict=True)]
    return preds


def vqa_predictions(
    cache: TeacherCache,
    insts: Sequence[Instance],
    vocab: list[str],
    k: int,
    types: dict[str, str],
) -> tuple[list[dict], float, float | None]:
    """The picked answers, the chance level (the mean VQA score of a uniform pick among the candidates) and
    the text floor: the same among the candidates of the question's type. ``vocab`` and ``types``: the store's
    (``pipeline.cache.vqa_answer_space``), which its candidate texts were built from."""
    preds: list[dict] = []
    chance = floor = 0.0
    typed = 0
    for chunk in _batches(insts):
        texts = [instance_texts(i, vocab, k, types) for i in chunk]
        picks = _pick(cache, chunk, [t.candidates for t in texts])
        for inst, p in zip(chunk, picks, strict=True):
            answers, _ = vqa_answers(inst, vocab, k, types)  # in the order of the texts' candidates
            humans = inst.human_answers or [inst.answer]
            preds.append({"answer": answers[int(p)]})
            chance += float(np.mean([vqa_score(a, humans) for a in answers]))
            own = vqa_answer_type(inst, types)
            if types and own:
                # None of the question's type (its gold answer's majority type is another, and the vocabulary
                # has no other answer of its own): the reader is left with a pick among them all.
                kept = [a for a in answers if types.get(a, own) == own] or answers
                floor += float(np.mean([vqa_score(a, humans) for a in kept]))
                typed += 1
    n = max(len(insts), 1)
    # Every instance's type must be known for the floor to be one: a partial mean would mix two quantities.
    return preds, chance / n, (floor / typed if typed and typed == len(insts) else None)


def snli_similarities(cache: TeacherCache, insts: Sequence[Instance]) -> np.ndarray:
    out = []
    for chunk in _batches(insts):
        e_img = cache.image_targets([i.image_id for i in chunk])["pooled"]
        e_hyp = cache.text_targets([i.hypothesis for i in chunk], tokens=False)["pooled"]
        out.append(F.cosine_similarity(e_img, e_hyp, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def fit_snli_thresholds(sim: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Thresholds lo ≤ hi maximising accuracy of: sim ≥ hi → entailment (0), sim < lo → contradiction (2),
    else neutral (1). Searched over the validation similarities' quantiles."""
    if len(sim) == 0:
        raise ValueError("SNLI-VE zero-shot: no validation instances to fit the thresholds on")
    qs = np.unique(np.quantile(sim, np.linspace(0, 1, 41)))
    best, best_acc = (float(qs[0]), float(qs[0])), -1.0
    for i, lo in enumerate(qs):
        for hi in qs[i:]:
            acc = float((snli_labels(sim, lo, hi) == labels).mean())
            if acc > best_acc:
                best, best_acc = (float(lo), float(hi)), acc
    return best


def snli_labels(sim: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.where(sim >= hi, 0, np.where(sim < lo, 2, 1))


def _mean(rows: list[dict], metric: str) -> float:
    return float(np.mean([r[metric] for r in rows])) if rows else float("nan")


def task_zeroshot(
    cache: TeacherCache,
    task: str,
    conditions: Sequence[str],
    train: Sequence[Instance],
    val: Sequence[Instance] | None,
    test: Sequence[Instance],
    *,
    vocab: list[str],
    types: dict[str, str],
    vqa_candidates: int,
    shift_key: str,
    shift_target: str,
) -> list[ZeroShot]:
    """The teacher's zero-shot score for one task on each condition's test instances. ``val`` None: the
    source has no val split, and validation is a seeded slice of train (seed 0; make_split draws it).
    ``vocab`` and ``types``: the VQA answer vocabulary and answer types the cache's candidate texts were
    built from (``pipeline.cache.vqa_answer_space``)."""
    by_key = {i.key: i for i in [*(train if val is None else val), *test]}
    metric = PRIMARY[task]
    out = []
    for cond in conditions:
        # The seed only draws the training subset, which the teacher never sees: seed 0 for every condition.
        split = make_split(task, cond, 0, train, test, val, shift_key=shift_key, target=shift_target)
        insts = [by_key[k] for k in split.test]
        if task == "vcr":
            preds = vcr_predictions(cache, insts)
            chance, how = 1 / 16, "cosine of image and each candidate text (Q→A, then QA→R)"
        elif task == "vqa":
            preds, chance, floor = vqa_predictions(cache, insts, vocab, vqa_candidates, types)
            how = (
                f"cosine of image and the cached declarative candidates (gold + up to {vqa_candidates - 1} "
                "distractors of the question's answer type)"
            )
        else:
            # Fitted on the condition's own validation split (training domains only), never on test.
            val_t = [by_key[k] for k in split.val if by_key[k].label is not None]
            lo, hi = fit_snli_thresholds(snli_similarities(cache, val_t), np.array([i.label for i in val_t]))
            preds = [{"label": int(y)} for y in snli_labels(snli_similarities(cache, insts), lo, hi)]
            counts = np.bincount([i.label for i in insts], minlength=3)
            chance = float(counts.max() / max(counts.sum(), 1))
            how = f"cosine of image and hypothesis, thresholds {lo:.3f} / {hi:.3f} fitted on validation"
        rows = [instance_scores(task, p, i) for p, i in zip(preds, insts, strict=True)]
        floor_of = {"text_floor": floor} if task == "vqa" else {}
        out.append(ZeroShot(task, cond, metric, _mean(rows, metric), chance, len(insts), how, **floor_of))
    return out
