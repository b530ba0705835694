import re

import pytest

from pipeline.data.schema import Instance
from pipeline.metrics import aggregate, instance_scores, vqa_score
from pipeline.protocol import Condition, SplitError, lowshot_subset, make_split


def test_vqa_score_hand_computed():
    # 3 of 10 humans said "red": each leave-one-out subset drops a "red" (7 subsets keep 3 → 1.0) or keeps
    # only 2 (3 subsets → 2/3): (7·1 + 3·2/3)/10 = 0.9.
    humans = ["red"] * 3 + ["blue"] * 7
    assert vqa_score("red", humans) == pytest.approx(0.9)
    assert vqa_score("blue", humans) == pytest.approx(1.0)
    # One human: every subset that keeps it scores 1/3 (9 of 10), the one that drops it 0 → 0.3.
    assert vqa_score("green", ["green"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_score("pink", humans) == 0.0


def test_an_instance_without_its_truth_is_refused_and_one_reference_is_exact_match():
    from pipeline.metrics import UnlabelledInstance

    # An unlabelled split named as test scored 0 for every method: no difference anywhere, nothing said.
    vqa = Instance(key="q", task="vqa", image_id="i", split="test2015", question="what?")
    with pytest.raises(UnlabelledInstance, match=r"vqa instance 'q' \(test2015\) has no label"):
        instance_scores("vqa", {"answer": "red"}, vqa)
    snli = Instance(key="s", task="snli_ve", image_id="i", split="test", hypothesis="h")
    with pytest.raises(UnlabelledInstance, match="protocol.splits.test"):
        instance_scores("snli_ve", {"label": 0}, snli)
    # One answer per question (a user's own VQA-style data): leave-one-out over one reference scored 0.
    one = Instance(key="o", task="vqa", image_id="i", split="val", question="what?", answer="red")
    assert instance_scores("vqa", {"answer": "red"}, one) == {"vqa_score": 1.0}
    assert instance_scores("vqa", {"answer": "blue"}, one) == {"vqa_score": 0.0}


def test_vcr_q2ar_counts_instance_only_when_both_right():
    inst = Instance(
        key="k",
        task="vcr",
        image_id="i",
        split="test",
        question="q",
        answers=list("abcd"),
        rationales=list("efgh"),
        label=1,
        rationale_label=2,
    )
    assert instance_scores("vcr", {"answer": 1, "rationale": 2}, inst) == {
        "q2a": 1.0,
        "qa2r": 1.0,
        "q2ar": 1.0,
    }
    assert instance_scores("vcr", {"answer": 1, "rationale": 0}, inst) == {
        "q2a": 1.0,
        "qa2r": 0.0,
        "q2ar": 0.0,
    }
    assert instance_scores("vcr", {"answer": 0, "rationale": 2}, inst)["q2ar"] == 0.0


def test_aggregate_per_domain():
    rows = [
        {"domain": "a", "accuracy": 1.0},
        {"domain": "a", "accuracy": 0.0},
        {"domain": "b", "accuracy": 1.0},
    ]
    agg = aggregate(rows)
    assert agg["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert agg["per_domain"]["a"] == {"n": 2, "accuracy": 0.5}


def _snli(n, split="train", domains=("plain", "textured", "outline")):
    return [
        Instance(
            key=f"{split}{i}",
            task="snli_ve",
            image_id=f"{split}img{i // 2}",
            split=split,
            hypothesis="h",
            label=i % 3,
            domain=domains[i % len(domains)],
        )
        for i in range(n)
    ]


def test_lowshot_stratified_nested_seeded():
    pool = _snli(600)
    small, large = lowshot_subset(pool, 0.05, 0), lowshot_subset(pool, 0.25, 0)
    assert set(small) <= set(large)
    labels = {i.key: i.label for i in pool}
    assert sorted(labels[k] for k in small).count(0) == 10 and len(small) == 30  # 5% of each 200-strong label
    assert lowshot_subset(pool, 0.05, 0) == small and lowshot_subset(pool, 0.05, 1) != small


def test_a_long_label_tail_keeps_one_per_label_and_says_the_subset_outgrew_its_fraction():
    import warnings

    def vqa(k: int, answer: str) -> Instance:
        return Instance(key=f"q{k}", task="vqa", image_id=f"img{k}", split="train", question="what?",
                        answer=answer, human_answers=[answer] * 10)  # fmt: skip

    # 40 answers given 50 times each and 60 given once (VQA's long tail): 1% keeps one of each, 100 of 2,060.
    pool = [vqa(k, f"common{k // 50}") for k in range(2000)] + [vqa(2000 + k, f"rare{k}") for k in range(60)]
    with pytest.warns(UserWarning, match=r"keeps 100 of 2060 labelled instances \(4\.9%, not 1\.0%\)"):
        assert len(lowshot_subset(pool, 0.01, 0)) == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tail: no warning
        lowshot_subset(_snli(600), 0.05, 0)


def test_shift_excludes_target_from_train_and_val_tests_only_target():
    train, val, test = _snli(300), _snli(30, "val"), _snli(60, "test")
    s = make_split("snli_ve", "shift", 0, train, test, val, target="outline")
    by_key = {i.key: i for i in train + test}
    assert all(by_key[k].domain != "outline" for k in s.train)
    assert all(by_key[k].domain == "outline" for k in s.test) and s.test
    assert set(s.target_images) == {by_key[k].image_id for k in s.test}


def test_a_shift_target_no_test_instance_has_is_refused_naming_the_keys():
    """A mistyped target trained on every domain and scored an empty test set as 0 (evaluate) or NaN (zeroshot)."""
    train, val, test = _snli(300), _snli(30, "val"), _snli(60, "test")
    with pytest.raises(
        SplitError,
        match=r"no test instance has domain = 'outlines' \(protocol.shift_key, "
        r"protocol.shift_target_domain\); the test split's: \['",
    ):
        make_split("snli_ve", "shift", 0, train, test, val, target="outlines")
    # No test split prepared yet: nothing to check the target against, so training may go on.
    assert make_split("snli_ve", "shift", 0, train, [], val, target="outlines").test == []


def test_val_carved_from_train_when_no_val_split_and_disjoint():
    s = make_split("snli_ve", Condition.parse("lowshot@0.25"), 3, _snli(300), _snli(30, "test"), None)
    assert s.val and not set(s.val) & set(s.train)
    assert s.unlabeled_images  # the images the low-shot subset dropped, for the KD-only variants


def test_a_fraction_keeps_the_ceiling_of_its_decimal_share():
    """0.07 · 100 is 7.000000000000001 in floats: the ceiling must be 7, the condition's own share."""
    assert len(lowshot_subset(_snli(300), 0.07, 0)) == 21  # 7 of each of the three 100-strong labels


def test_the_val_slice_holds_out_whole_images():
    """VQA and VCR ask several questions of one image: a held-out question beside another of its image in
    training would select the checkpoint on an image the student trained on."""
    pool = [
        Instance(key=f"q{k}", task="vqa", image_id=f"img{k // 5}", split="train", question="what?",
                 answer=f"a{k % 3}", human_answers=[f"a{k % 3}"] * 10)
        for k in range(500)
    ]  # fmt: skip
    test = [Instance(key="t0", task="vqa", image_id="timg", split="test", question="what?", answer="a0",
                     human_answers=["a0"] * 10)]  # fmt: skip
    s = make_split("vqa", "full", 0, pool, test, None)
    image_of = {i.key: i.image_id for i in pool}
    held = {image_of[k] for k in s.val}
    assert len(s.val) >= 50 and not held & {image_of[k] for k in s.train}


@pytest.mark.parametrize(
    ("name", "says"),
    [("lowshot-2.0", "fraction 2.0 is not in (0, 1)"), ("lowshot-0", "fraction 0 is not in (0, 1)"),
     ("lowshot-1", "fraction 1 is not in (0, 1)"), ("lowshot-nan", "fraction nan is not in (0, 1)"),
     ("lowshot-x", "fraction 'x' is not a number"), ("lowshot", "unknown condition 'lowshot'")],
)  # fmt: skip
def test_bad_conditions_are_refused_naming_the_value(name, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        Condition.parse(name)
    assert Condition.parse("lowshot-0.05").fraction == 0.05
