"""No task of the synthetic world can be solved from its text alone.

A text-only classifier (multinomial naive Bayes over word unigrams and bigrams of exactly the texts the student
reads, trained on a generated train split, never an image) must score within 0.05 of chance on the test split:
VQA per answer type against a uniform guess within the type, SNLI-VE against 1/3, VCR Q→A and QA→R (choosing
the candidate the classifier finds most likely gold) against 1/4. A world whose labels follow its templates
would let a student score well without looking, and no distillation result on it would measure anything.

``python tests/test_text_shortcuts.py [train_scenes test_scenes]`` prints the same measurements (default: the
params.yaml world, 3000 train / 600 test scenes).
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from statistics import mean

import pytest

from pipeline.config import SyntheticParams
from pipeline.data import synthetic as S
from pipeline.data.schema import SNLI_LABELS, Instance
from pipeline.metrics import vqa_score
from pipeline.texts import instance_texts

MAX_EXCESS = 0.05


def features(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+|[?.]", text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]


class NaiveBayes:
    """Multinomial naive Bayes with add-one smoothing."""

    def __init__(self, texts: Sequence[str], labels: Sequence[Hashable]) -> None:
        self.prior = Counter(labels)
        self.counts: dict[Hashable, Counter] = defaultdict(Counter)
        for text, label in zip(texts, labels, strict=True):
            self.counts[label].update(features(text))
        self.vocab = set().union(*self.counts.values())
        self.totals = {c: sum(cnt.values()) for c, cnt in self.counts.items()}
        self.n = len(labels)

    def log_posterior(self, text: str) -> dict[Hashable, float]:
        feats = features(text)
        v = len(self.vocab)
        return {
            c: math.log(self.prior[c] / self.n)
            + sum(math.log((self.counts[c][f] + 1) / (self.totals[c] + v)) for f in feats)
            for c in self.prior
        }

    def predict(self, text: str) -> Hashable:
        post = self.log_posterior(text)
        return max(sorted(post, key=str), key=post.__getitem__)

    def gold_score(self, text: str) -> float:
        post = self.log_posterior(text)
        return post[True] - post[False]


def split_instances(split: str, params: SyntheticParams) -> dict[str, list[Instance]]:
    out: dict[str, list[Instance]] = defaultdict(list)
    for _i, _scene, insts in S.task_instances(split, params):
        for inst in insts:
            out[inst.task].append(inst)
    return out


def text_only_excess(params: SyntheticParams) -> dict[str, tuple[float, float, int]]:
    """(text-only score, chance, n) on the test split, per measured task (VQA per answer type)."""
    train, test = split_instances("train", params), split_instances("test", params)
    out: dict[str, tuple[float, float, int]] = {}

    nb = NaiveBayes([i.question for i in train["vqa"]], [i.answer for i in train["vqa"]])
    by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for inst in test["vqa"]:
        pool = S._answer_pool(inst.meta["answer_type"], params)
        chance = mean(vqa_score(a, inst.human_answers) for a in pool)
        by_type[inst.meta["answer_type"]].append(
            (vqa_score(str(nb.predict(inst.question)), inst.human_answers), chance)
        )
    for atype, rows in sorted(by_type.items()):
        out[f"vqa/{atype}"] = (mean(r[0] for r in rows), mean(r[1] for r in rows), len(rows))

    nb = NaiveBayes([i.hypothesis for i in train["snli_ve"]], [i.label for i in train["snli_ve"]])
    hits = [nb.predict(i.hypothesis) == i.label for i in test["snli_ve"]]
    out["snli_ve"] = (mean(hits), 1 / len(SNLI_LABELS), len(hits))

    for name, field, gold_field in (
        ("vcr/q2a", "candidates", "gold"),
        ("vcr/qa2r", "rationale_candidates", "rationale_gold"),
    ):
        texts, labels = [], []
        for inst in train["vcr"]:
            t = instance_texts(inst)
            cands = getattr(t, field)
            texts += cands
            labels += [k == getattr(t, gold_field) for k in range(len(cands))]
        nb = NaiveBayes(texts, labels)
        hits = []
        for inst in test["vcr"]:
            t = instance_texts(inst)
            scores = [nb.gold_score(c) for c in getattr(t, field)]
            hits.append(scores.index(max(scores)) == getattr(t, gold_field))
        out[name] = (mean(hits), 0.25, len(hits))
    return out


@pytest.fixture(scope="module")
def measured() -> dict[str, tuple[float, float, int]]:
    return text_only_excess(SyntheticParams(scenes={"train": 1500, "val": 1, "test": 900}))


def test_every_answer_type_and_task_is_measured(measured):
    assert set(measured) == {
        "vqa/color", "vqa/shape", "vqa/number", "vqa/yes/no", "vqa/size", "snli_ve", "vcr/q2a", "vcr/qa2r",
    }  # fmt: skip
    assert min(n for _s, _c, n in measured.values()) >= 100


@pytest.mark.parametrize(
    "task",
    ["vqa/color", "vqa/shape", "vqa/number", "vqa/yes/no", "vqa/size", "snli_ve", "vcr/q2a", "vcr/qa2r"],
)
def test_text_alone_scores_chance(measured, task):
    score, chance, n = measured[task]
    assert score - chance <= MAX_EXCESS, f"{task}: text-only {score:.3f} vs chance {chance:.3f} (n={n})"


def test_the_classifier_sees_a_template_leak():
    """Not vacuous: labels that follow the hypothesis form (the old world's neutral templates) are found."""
    params = SyntheticParams(scenes={"train": 300, "test": 150})
    train, test = split_instances("train", params)["snli_ve"], split_instances("test", params)["snli_ve"]

    def leaky(inst: Instance) -> int:
        return S.SNLI_TEMPLATES.index(inst.meta["template"]) % len(SNLI_LABELS)

    nb = NaiveBayes([i.hypothesis for i in train], [leaky(i) for i in train])
    assert mean(nb.predict(i.hypothesis) == leaky(i) for i in test) > 0.9


if __name__ == "__main__":
    train_n, test_n = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (3000, 600)
    res = text_only_excess(SyntheticParams(scenes={"train": train_n, "val": 1, "test": test_n}))
    for task, (score, chance, n) in res.items():
        print(
            f"{task:12s} n={n:5d}  text-only {score:.3f}  chance {chance:.3f}  excess {score - chance:+.3f}"
        )
