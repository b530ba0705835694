"""The teacher's zero-shot score: picks the candidate closest to the image, thresholds fitted on validation only,
and the stage writes one entry per task × condition."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import torch
from click.testing import CliRunner

from pipeline.data.schema import Instance
from pipeline.texts import instance_texts, text_hash
from pipeline.zeroshot import fit_snli_thresholds, snli_labels, task_zeroshot
from stages.zeroshot import main as zeroshot_main
from tests.conftest import build_world


class OracleCache:
    """A cache whose image embedding is the sum of the pooled embeddings of the texts the teacher 'knows' for
    that image; every text gets a random direction (nearly orthogonal at this width)."""

    def __init__(self, known: dict[str, list[str]], dim: int = 512):
        self.dim = dim
        self.known = known

    def _vec(self, key: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(text_hash(key)[:8], 16))
        return torch.randn(self.dim, generator=g)

    def image_targets(self, image_ids):
        return {"pooled": torch.stack([sum(self._vec(t) for t in self.known[i]) for i in image_ids])}

    def text_targets(self, texts, tokens=False):
        return {"pooled": torch.stack([self._vec(t) for t in texts])}


def _vcr(n: int) -> list[Instance]:
    out = []
    for k in range(n):
        out.append(Instance(
            key=f"v{k}", task="vcr", image_id=f"img{k}", split="test", domain="plain",
            question=f"what is object {k}?", answers=[f"answer {k} {j}" for j in range(4)],
            rationales=[f"because {k} {j}" for j in range(4)], label=k % 4, rationale_label=(k + 1) % 4,
        ))  # fmt: skip
    return out


def test_vcr_zeroshot_picks_the_candidate_the_teacher_knows():
    insts = _vcr(8)
    texts = {i.image_id: instance_texts(i) for i in insts}
    gold_answer = {i.image_id: [texts[i.image_id].candidates[i.label]] for i in insts}
    both = {
        i.image_id: [*gold_answer[i.image_id], texts[i.image_id].rationale_candidates[i.rationale_label]]
        for i in insts
    }
    wrong = {i.image_id: [texts[i.image_id].candidates[(i.label + 1) % 4]] for i in insts}
    scores = {}
    for name, known in (("both", both), ("wrong", wrong)):
        [z] = task_zeroshot(
            OracleCache(known), "vcr", ["full"], insts, [], insts,
            vocab=[], types={}, vqa_candidates=4, shift_key="domain", shift_target="",
        )  # fmt: skip
        assert z.n == 8 and z.chance == 1 / 16 and z.metric == "q2ar"
        scores[name] = z.score
    assert scores == {"both": 1.0, "wrong": 0.0}


def test_vqa_zeroshot_scores_the_picked_answer_and_reports_the_candidates_chance():
    vocab = ["red", "blue", "green", "yellow", "one", "two"]
    insts = [
        Instance(key=f"q{k}", task="vqa", image_id=f"img{k}", split="test", domain="plain",
                 question="what colour is the shape?", answer=vocab[k % 4], human_answers=[vocab[k % 4]] * 10)
        for k in range(12)
    ]  # fmt: skip
    gold_text = {}
    for i in insts:
        t = instance_texts(i, vocab, 4)
        gold_text[i.image_id] = [t.candidates[t.gold]]
    [z] = task_zeroshot(
        OracleCache(gold_text), "vqa", ["full"], insts, [], insts,
        vocab=vocab, types={}, vqa_candidates=4, shift_key="domain", shift_target="",
    )  # fmt: skip
    assert z.score == 1.0
    assert abs(z.chance - 0.25) < 1e-9  # one right answer among 4 candidates, all 10 humans agree
    assert z.text_floor is None  # untyped questions (no types): no floor


def test_snli_thresholds_separate_the_three_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    sim = np.where(labels == 0, 0.8, np.where(labels == 1, 0.5, 0.2)) + rng.normal(0, 0.02, 300)
    lo, hi = fit_snli_thresholds(sim, labels)
    assert (snli_labels(sim, lo, hi) == labels).mean() > 0.98


def test_stage_writes_every_task_and_condition(tmp_path):
    root, cfg, store = build_world(tmp_path / "w")
    out = tmp_path / "zeroshot.json"
    res = CliRunner().invoke(
        zeroshot_main,
        ["--data", str(root / "shards"), "--cache", store, "--out", str(out),
         "--set", "protocol.conditions=[full,shift]"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    z = json.loads(out.read_text())
    assert set(z) == {"vqa", "snli_ve", "vcr"}
    for task in z:
        assert set(z[task]) == {"full", "shift"}
        for cell in z[task].values():
            assert 0.0 <= cell["score"] <= 1.0 and 0.0 < cell["chance"] < 1.0 and cell["n"] > 0
    # The shift cell scores the target domain only: fewer instances than full.
    assert z["vqa"]["shift"]["n"] < z["vqa"]["full"]["n"]
    # Same-type candidates: the question's wording rules none out, so the text floor is the chance level.
    for cell in z["vqa"].values():
        assert abs(cell["text_floor"] - cell["chance"]) < 1e-9


def test_stage_refuses_a_store_from_before_the_answer_types(tmp_path):
    """A store extracted before VQA distractors shared the gold's type holds the old candidates: scored with
    the whole vocabulary it would report the old rule's numbers. Refused in one line naming the key and the
    rebuild; nothing written."""
    import shutil

    import zarr

    root, cfg, store = build_world(tmp_path / "w")
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    group = zarr.open_group(str(old), mode="r+")
    data = dict(group.attrs["data"])
    assert data.pop("vqa_answer_types")
    group.attrs["data"] = data
    out = tmp_path / "zeroshot.json"
    res = CliRunner().invoke(
        zeroshot_main, ["--data", str(root / "shards"), "--cache", str(old), "--out", str(out)]
    )
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    line = res.output.strip()
    assert "\n" not in line and str(old) in line and "data.vqa_answer_types" in line
    assert "stages.extract_teacher" in line and "--rebuild-stale" in line
    assert not out.exists()


def test_stage_names_a_missing_cache(tmp_path):
    from tests.conftest import prepare_synthetic

    prepare_synthetic(tmp_path / "d")
    res = CliRunner().invoke(
        zeroshot_main, ["--data", str(tmp_path / "d"), "--cache", str(tmp_path / "nope.zarr")]
    )
    assert res.exit_code != 0 and "nope.zarr" in res.output


def test_stage_refuses_data_the_cache_was_not_extracted_from(tmp_path):
    """Other data under the same layout: a KeyError traceback before, or another dataset's embeddings under
    the same ids; now one line naming the split and how to add it."""
    from tests.conftest import prepare_synthetic

    root, cfg, store = build_world(tmp_path / "w")
    other = tmp_path / "other"
    prepare_synthetic(other, seed=1)
    out = tmp_path / "zeroshot.json"
    res = CliRunner().invoke(zeroshot_main, ["--data", str(other), "--cache", store, "--out", str(out)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert (
        f"does not cover {other / 'train'}" in res.output and "stages.extract_teacher --shards" in res.output
    )
    assert not out.exists()


def test_stage_reads_checked_a_lost_shard_is_one_line_and_an_intact_store_scores_the_same(tmp_path):
    """The stage read unchecked: a lost image shard scored zero vectors with no error. Now its reads are
    checked as training's are, and checking changes no value (the scores are in committed lock files)."""
    import shutil

    from pipeline.cache import TeacherCache
    from pipeline.config import load_params
    from stages.zeroshot import role_instances

    root, cfg, store = build_world(tmp_path / "w")
    params = load_params(None, [])
    pp = params.protocol
    train, val, test, _ = role_instances(root / "shards", pp.splits)
    plain, checked = TeacherCache(store), TeacherCache(store)
    checked.configure_reads(verify=True)
    args = dict(
        vocab=checked.attrs["data"]["vqa_vocab"], types=checked.attrs["data"]["vqa_answer_types"],
        vqa_candidates=params.distill.vqa_candidates,
        shift_key=pp.shift_key, shift_target=pp.shift_target_domain,
    )  # fmt: skip
    for task in ("vqa", "snli_ve", "vcr"):
        conds = ["full", "shift"]
        want = [z.as_dict() for z in task_zeroshot(plain, task, conds, train, val, test, **args)]
        assert [z.as_dict() for z in task_zeroshot(checked, task, conds, train, val, test, **args)] == want

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    (damaged / "image" / "pooled" / "c" / "1" / "0").unlink()  # rows 64.. of image/pooled
    out = tmp_path / "zeroshot.json"
    res = CliRunner().invoke(
        zeroshot_main, ["--data", str(root / "shards"), "--cache", str(damaged), "--out", str(out)]
    )
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    line = res.output.strip()
    assert "\n" not in line and str(damaged) in line and "image/pooled" in line and "image-000001" in line
    assert not out.exists()


def test_vqa_zeroshot_candidates_share_the_questions_type_so_the_floor_is_chance():
    """The distractors are of the question's answer type (the types the store records): the question's wording
    rules none out, and the text floor (a uniform pick among the candidates of the question's type) is the
    chance level. It is still computed as a floor: a gold answer whose majority type is another than its
    question's leaves the pick among the question's type."""
    from pipeline.texts import vqa_answers

    vocab = ["red", "blue", "green", "one", "two", "three"]
    types = {
        "red": "color",
        "blue": "color",
        "green": "color",
        "one": "number",
        "two": "number",
        "three": "number",
    }
    insts = [
        Instance(key=f"q{k}", task="vqa", image_id=f"img{k}", split="test", domain="plain",
                 question="what colour is the shape?", answer=["red", "blue"][k % 2],
                 human_answers=[["red", "blue"][k % 2]] * 10, meta={"answer_type": "color"})
        for k in range(12)
    ]  # fmt: skip
    for i in insts:
        answers, _ = vqa_answers(i, vocab, 4, types)
        assert sorted(answers) == ["blue", "green", "red"]  # the colour type's 3 answers: all there is
    known = {i.image_id: [instance_texts(i, vocab, 4, types).candidates[0]] for i in insts}
    [z] = task_zeroshot(
        OracleCache(known), "vqa", ["full"], insts, [], insts,
        vocab=vocab, types=types, vqa_candidates=4, shift_key="domain", shift_target="",
    )  # fmt: skip
    assert abs(z.chance - 1 / 3) < 1e-9 and abs(z.text_floor - z.chance) < 1e-9
    assert z.as_dict()["text_floor"] == z.text_floor and "answer type" in z.how

    # A number question whose gold ("red") is a colour by its majority type: the floor picks among the
    # question's type, which excludes the gold.
    odd = [dataclasses.replace(i, meta={"answer_type": "number"}) for i in insts]
    [z] = task_zeroshot(
        OracleCache(known), "vqa", ["full"], insts, [], odd,
        vocab=vocab, types=types, vqa_candidates=4, shift_key="domain", shift_target="",
    )  # fmt: skip
    assert z.text_floor == 0.0 and abs(z.chance - 1 / 4) < 1e-9  # the gold and the 3 numbers

    # ... and when the vocabulary has no other answer of the question's type, no candidate is of it: the
    # reader picks among them all (the floor was the NaN mean of an empty list, with a warning).
    lone = [dataclasses.replace(i, meta={"answer_type": "size"}) for i in insts]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [z] = task_zeroshot(
            OracleCache(known), "vqa", ["full"], insts, [], lone,
            vocab=vocab, types=types, vqa_candidates=4, shift_key="domain", shift_target="",
        )  # fmt: skip
    assert z.text_floor == z.chance == 1.0  # the gold alone: no answer of type "size" to draw


def test_a_task_the_data_does_not_hold_is_named_with_the_fix(tmp_path):
    """Real data holds one source per root: protocol.tasks left at the default said 'no training instances'."""
    from stages.prepare_data import main as prepare_main
    from tests.fixtures_official import build_snli_ve

    for split in ("train", "dev", "test"):
        build_snli_ve(tmp_path / "snli", split)
    args = ["--source", "snli_ve", "--root", str(tmp_path / "snli"), "--out", str(tmp_path / "shards")]
    for split in ("train", "dev", "test"):
        args += ["--split", split]
    assert CliRunner().invoke(prepare_main, args).exit_code == 0
    res = CliRunner().invoke(
        zeroshot_main, ["--data", str(tmp_path / "shards"), "--cache", str(tmp_path / "none.zarr"),
                        "--out", str(tmp_path / "z.json")],
    )  # fmt: skip
    assert res.exit_code != 0 and not (tmp_path / "z.json").exists()
    assert "protocol.tasks names vqa, vcr" in res.output and "--set 'protocol.tasks=[snli_ve]'" in res.output
