"""A VQA instance's candidate answers (docs/method.md §5): the gold and distractors of the question's own answer
type, the same on every call; the whole vocabulary for an untyped question; fewer where the type has fewer
answers; and the confidence weight over a batch whose instances hold different numbers of candidates."""

from __future__ import annotations

import pytest
import torch

from pipeline import cache as C
from pipeline.data.schema import Instance
from pipeline.texts import answer_types, instance_texts, join_text, vqa_answers, vqa_distractors
from student.losses import confidence_weights
from student.targets import pad_candidates

VOCAB = ["red", "blue", "green", "yellow", "pink", "one", "two", "three", "four", "yes", "no", "maybe"]
TYPES = {
    **dict.fromkeys(["red", "blue", "green", "yellow", "pink"], "color"),
    **dict.fromkeys(["one", "two", "three", "four"], "number"),
    **dict.fromkeys(["yes", "no"], "yes/no"),
}  # "maybe": no labelled instance gave it as its gold, so it has no type


def _q(key: str, answer: str, kind: str | None = None) -> Instance:
    return Instance(
        key=key, task="vqa", image_id=f"img-{key}", split="train", question=f"question {key}?", answer=answer,
        human_answers=[answer] * 10, meta={"answer_type": kind} if kind else {},
    )  # fmt: skip


def test_distractors_share_the_gold_answers_type():
    for n in range(40):
        for gold, kind in (("red", "color"), ("two", "number")):
            # The question's own label, or (without one) the type its gold answer has in the map.
            for inst in (_q(f"{kind}{n}", gold, kind), _q(f"map-{kind}{n}", gold)):
                d = vqa_distractors(inst, VOCAB, 4, TYPES)
                assert len(d) == 3 and gold not in d and {TYPES[a] for a in d} == {kind}
    # The question's own label wins over its gold answer's majority type.
    d = vqa_distractors(_q("own", "two", "color"), VOCAB, 4, TYPES)
    assert {TYPES[a] for a in d} == {"color"}


def test_a_type_with_fewer_answers_gives_what_there_is():
    answers, gold = vqa_answers(_q("yn", "yes", "yes/no"), VOCAB, 4, TYPES)
    assert sorted(answers) == ["no", "yes"] and answers[gold] == "yes"
    texts = instance_texts(_q("yn", "yes", "yes/no"), VOCAB, 4, TYPES)
    assert texts.candidates == [join_text("question yn?", a) for a in answers] and texts.gold == gold


def test_candidates_are_the_same_on_every_call_and_the_golds_place_is_per_instance():
    insts = [_q(f"k{n}", ["red", "two", "yes"][n % 3]) for n in range(30)]
    first = [instance_texts(i, VOCAB, 4, TYPES) for i in insts]
    again = [instance_texts(i, list(VOCAB), 4, dict(TYPES)) for i in reversed(insts)][::-1]
    assert first == again
    assert len({t.gold for t in first}) > 1  # the gold does not always sit at one index
    for inst, t in zip(insts, first, strict=True):
        answers, gold = vqa_answers(inst, VOCAB, 4, TYPES)
        assert t.candidates[t.gold].endswith(inst.answer) and answers[gold] == inst.answer


def test_an_untyped_question_draws_from_the_whole_vocabulary():
    """No meta type and a gold answer the map lacks ("maybe"), or no map at all: the previous rule, over every
    answer (with the same per-instance seed)."""
    picked = set()
    for n in range(60):
        inst = _q(f"u{n}", "maybe")
        d = vqa_distractors(inst, VOCAB, 4, TYPES)
        assert len(d) == 3 and "maybe" not in d and d == vqa_distractors(inst, VOCAB, 4, None)
        picked |= {TYPES[a] for a in d}
    assert picked == {"color", "number", "yes/no"}
    # No map (types None): every question is untyped, its own label notwithstanding.
    typed = _q("t", "red", "color")
    assert vqa_distractors(typed, VOCAB, 4, None) == vqa_distractors(_q("t", "red"), VOCAB, 4, {})


def test_answer_types_are_each_answers_majority_type_from_labelled_vqa():
    train = [_q("a", "two", "number"), _q("b", "two", "number"), _q("c", "two", "other"), _q("d", "red"),
             Instance(key="s", task="snli_ve", image_id="s", split="train", hypothesis="h", label=0)]  # fmt: skip
    assert answer_types(train) == {"two": "number"}


def test_the_store_records_the_types_and_one_without_them_is_refused_naming_the_key():
    attrs = {"data": {"vqa_vocab": VOCAB, C.VQA_ANSWER_TYPES: TYPES}}
    assert C.vqa_answer_space("s.zarr", attrs) == (VOCAB, TYPES)
    assert C.vqa_answer_space("s.zarr", {"data": {"vqa_vocab": []}}) == ([], {})  # no VQA: nothing to build
    old = {"data": {"vqa_vocab": VOCAB}}
    assert C.lacks_answer_types(old) and not C.lacks_answer_types(attrs)
    with pytest.raises(C.StaleCacheError, match=r"s\.zarr.*data\.vqa_answer_types.*stages\.extract_teacher"):
        C.vqa_answer_space("s.zarr", old)


def test_confidence_weights_over_instances_holding_different_numbers_of_candidates():
    """Same-type candidates: a yes/no question has 2, a colour question 4. Padded and masked, each instance's
    p_gold is the softmax over its own candidates only, and its weight the lift C_n · p_gold."""
    torch.manual_seed(0)
    counts = [4, 2, 3, 2]
    flat = torch.randn(sum(counts), 8)
    e_img = torch.randn(len(counts), 8)
    gold = torch.tensor([1, 0, 2, 1])
    cands, mask = pad_candidates(flat, counts)
    assert cands.shape == (4, 4, 8) and mask.sum(1).tolist() == counts
    got = confidence_weights(e_img, 5.0, cand=cands, gold=gold, cand_mask=mask, clip=(0.0, 1e9))
    raw, pos = [], 0
    for n, c in enumerate(counts):
        cos = torch.nn.functional.cosine_similarity(e_img[n][None], flat[pos : pos + c], dim=-1)
        raw.append(c * torch.softmax(5.0 * cos, dim=0)[gold[n]])
        pos += c
    raw = torch.stack(raw)
    assert torch.allclose(got, raw / raw.mean(), atol=1e-5)
    # Every instance holding K candidates: the padding changes nothing.
    flat = torch.randn(12, 8)
    same, full = pad_candidates(flat, [4, 4, 4])
    assert bool(full.all()) and torch.equal(same, flat.view(3, 4, 8))
