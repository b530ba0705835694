"""The embedded synthetic world: determinism, label correctness for every template, balance, dedup, domains.
(That no label can be read off the text alone is tests/test_text_shortcuts.py.)"""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import SyntheticParams
from pipeline.data import synthetic as S
from pipeline.data.schema import SNLI_LABELS, VCR_CHOICES, Instance
from pipeline.data.shards import DatasetWriter, PreparedDataset

N_SCENES = 30
N_LABEL_SCENES = 400  # enough for every template and every (template, label) of every task


def tiny(seed: int = 0, **kw) -> SyntheticParams:
    base = {"seed": seed, "scenes": {"train": N_SCENES, "val": 6, "test": 6}, "caption_scenes": 12}
    return SyntheticParams(**{**base, **kw})


def write(root: Path, split: str, params: SyntheticParams) -> PreparedDataset:
    with DatasetWriter(root, source="synthetic", split=split) as w:
        S.generate(split, params, w)
    return PreparedDataset(root)


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory) -> PreparedDataset:
    return write(tmp_path_factory.mktemp("synth") / "train", "train", tiny())


@pytest.fixture(scope="module")
def task_instances() -> list[tuple[Instance, S.Scene]]:
    """Instances of every task for the first scenes of the default train split, built without rendering
    (labels only need the scene)."""
    params = SyntheticParams()
    return [
        (inst, scene)
        for _i, scene, insts in S.task_instances("train", params, N_LABEL_SCENES)
        for inst in insts
    ]


def by_task(items: list[tuple[Instance, S.Scene]], task: str) -> list[tuple[Instance, S.Scene]]:
    return [(inst, scene) for inst, scene in items if inst.task == task]


# --------------------------------------------------------------------------------------- determinism


def test_same_seed_same_fingerprint_other_seed_differs(tmp_path, train_ds):
    again = write(tmp_path / "again", "train", tiny())
    other = write(tmp_path / "other", "train", tiny(seed=1))
    assert again.fingerprint == train_ds.fingerprint
    assert other.fingerprint != train_ds.fingerprint


def test_any_scene_regenerates_on_its_own(train_ds):
    params = tiny()
    for i in (0, 7, N_SCENES - 1):
        scene = S.make_scene(params.seed, "train", i, params)
        assert S.render(scene, params.image_size) == train_ds.image_bytes(f"synth-train-{i:07d}")
    # Instances depend on the scenes before them (the balancers), so they regenerate by replaying the split.
    insts = {inst.key: inst for inst in train_ds.iter_instances()}
    replayed = {inst.key: inst for _i, _s, xs in S.task_instances("train", params, 8) for inst in xs}
    assert len(replayed) == 24 and all(inst == insts[key] for key, inst in replayed.items())


def test_caption_scenes_use_their_own_stream():
    params = tiny()
    train = [S.make_scene(0, "train", i, params).objects for i in range(20)]
    caps = [S.make_scene(0, "captions", i, params).objects for i in range(20)]
    assert train != caps


def test_images_rendered_on_worker_processes_give_the_same_shards(tmp_path, monkeypatch):
    """`prepare --workers N` renders on N processes: every file it writes equals the in-process run's, and
    the workers really ran (the size floor that keeps small splits in-process is lowered for the test)."""
    used = []
    ahead = S._images_ahead

    @contextlib.contextmanager
    def spy(*args):
        with ahead(*args) as images:
            used.append(images is not None)
            yield images

    monkeypatch.setattr(S, "_POOL_MIN_IMAGES", 0)
    monkeypatch.setattr(S, "_images_ahead", spy)
    params = tiny()
    for split in ("train", "captions"):
        for workers in (1, 2):
            with DatasetWriter(tmp_path / f"w{workers}" / split, source="synthetic", split=split) as w:
                S.generate(split, params, w, workers)
    assert used == [False, True, False, True]
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    assert files and files == sorted(
        p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*") if p.is_file()
    )
    for f in files:
        assert (tmp_path / "w1" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f


# ------------------------------------------------------------------------------------ label correctness


def test_vqa_labels_every_template(task_instances):
    items = by_task(task_instances, "vqa")
    problems = [p for inst, scene in items if (p := S.explain_label(inst, scene))]
    assert problems == []
    assert {inst.meta["template"] for inst, _ in items} == set(S.VQA_TEMPLATES)
    # Complementary pairs: every question text is asked of images with different answers, in equal shares.
    per_question: dict[str, Counter] = {}
    for inst, _ in items:
        per_question.setdefault(inst.question, Counter())[inst.answer] += 1
    params = SyntheticParams()
    for question, answers in per_question.items():
        pool = S._answer_pool(S._VQA_ANSWER_TYPES[S._parse(question, S._VQA_QUESTIONS)[0]], params)
        assert set(answers) <= set(pool), question
        if sum(answers.values()) >= 2 * len(pool):
            assert max(answers.values()) - min(answers[a] for a in pool) <= 1, (question, answers)
    counts = Counter(inst.answer for inst, _ in items if inst.meta["template"] == "count")
    assert set(counts) == {"1", "2", "3"} and max(counts.values()) - min(counts.values()) <= 1


def test_snli_labels_every_template_and_label(task_instances):
    items = by_task(task_instances, "snli_ve")
    problems = [p for inst, scene in items if (p := S.explain_label(inst, scene))]
    assert problems == []
    # Every form takes each label in equal shares, so the form alone cannot give the label.
    seen = Counter((inst.meta["template"], inst.label) for inst, _ in items)
    assert set(seen) == {(t, lab) for t in S.SNLI_TEMPLATES for lab in range(len(SNLI_LABELS))}
    for t in S.SNLI_TEMPLATES:
        shares = [seen[t, lab] for lab in range(len(SNLI_LABELS))]
        assert max(shares) - min(shares) <= 1, (t, shares)


def test_snli_neutral_names_an_object_the_picture_lacks(task_instances):
    """Neutral is what the image cannot settle: the hypothesis speaks of an object that is not there."""
    for inst, scene in by_task(task_instances, "snli_ve"):
        present = {(o.colour, o.shape) for o in scene.objects}
        named = re.findall(rf"({'|'.join(S.COLOURS)}) ({'|'.join(S.SHAPES)})", inst.hypothesis)
        if SNLI_LABELS[inst.label] == "neutral" and named:
            assert not set(named) <= present, inst.hypothesis
        elif named:
            assert set(named) <= present, inst.hypothesis


def test_vcr_answers_and_rationales_every_template(task_instances):
    items = by_task(task_instances, "vcr")
    problems = [p for inst, scene in items if (p := S.explain_label(inst, scene))]
    assert problems == []
    assert {inst.meta["template"] for inst, _ in items} == set(S.VCR_TEMPLATES)


def test_vcr_distractors_are_golds_of_the_same_form(task_instances):
    """Adversarial matching: a distractor answer is a gold answer of another instance of the same form, and
    every rationale has the gold rationale's wording for the gold answer, so only the image separates them."""
    items = [inst for inst, _ in by_task(task_instances, "vcr")]
    golds: dict[str, set[str]] = {}
    for inst in items:
        golds.setdefault(inst.meta["template"], set()).add(inst.answers[inst.label])
    for inst in items:
        assert set(inst.answers) <= golds[inst.meta["template"]], inst.answers
        skeletons = {re.sub(rf"\b({'|'.join(S.COLOURS + S.SHAPES)})\b", "_", r) for r in inst.rationales}
        assert len(skeletons) <= 2, inst.rationales  # "a"/"an" may differ; nothing else


def test_caption_hard_negatives_every_template():
    params = SyntheticParams()
    seen = set()
    problems = []
    for i in range(300):
        scene = S.make_scene(0, "captions", i, params)
        items = S.caption_items(scene, S.task_rng(0, "captions", i, "caption"), 2)
        assert len(items) == 2 and items[0][1] != items[1][1]
        for template, caption, negs in items:
            seen.add(template)
            assert caption not in negs and 3 <= len(negs) <= S.HARD_NEGATIVES
            inst = Instance(
                key=f"c{i}",
                task="caption",
                image_id="img",
                split="captions",
                domain=scene.domain,
                caption=caption,
                meta={"template": template, "hard_negatives": negs},
            )
            problems += [p] if (p := S.explain_label(inst, scene)) else []
    assert problems == []
    assert seen == set(S.CAPTION_TEMPLATES)
    assert S.captions(scene, S.task_rng(0, "captions", 0, "caption"), 1)[0][0]


@pytest.mark.parametrize("objects", [(1, 1), (2, 2), (3, 5)])
def test_other_object_ranges_stay_balanced(objects):
    """Worlds other than the default keep correct labels and no form the text decides: no count question
    when every scene holds the same number of objects, no relation hypothesis when none can hold."""
    lo, hi = objects
    params = SyntheticParams(min_objects=lo, max_objects=hi, scenes={"train": 150})
    snli, vqa_forms, problems = Counter(), set(), []
    for _i, scene, insts in S.task_instances("train", params):
        assert 1 <= len(scene.objects) <= hi  # an object that does not fit is dropped, never overlapped
        problems += [p for inst in insts if (p := S.explain_label(inst, scene))]
        vqa, nli = insts[0], insts[1]
        vqa_forms.add(vqa.meta["template"])
        if vqa.meta["template"] == "count":
            assert 1 <= int(vqa.answer) <= hi
        snli[nli.meta["template"], nli.label] += 1
    assert problems == []
    assert ("count" in vqa_forms) == (lo < hi)
    assert {t for t, _ in snli} == set(S.SNLI_TEMPLATES) - ({"relation"} if hi < 2 else set())
    for t in {t for t, _ in snli}:
        assert {lab for u, lab in snli if u == t} == {0, 1, 2}, (t, snli)


def test_verifier_catches_wrong_labels(task_instances):
    """The checker is not vacuous: corrupting any label makes it fail."""
    for inst, scene in task_instances[:60]:
        bad = replace(inst)
        if inst.task == "vqa":
            bad.answer = "nonsense"
        elif inst.task == "snli_ve":
            bad.label = (inst.label + 1) % len(SNLI_LABELS)
        else:
            bad.rationale_label = (inst.rationale_label + 1) % VCR_CHOICES
        assert not S.verify_label(bad, scene)


def test_prepared_instances_verify_against_their_scene(train_ds):
    params = tiny()
    for inst in train_ds.iter_instances():
        scene = S.Scene.from_dict(inst.meta["scene"])
        i = int(inst.image_id.rsplit("-", 1)[1])
        assert scene == S.make_scene(params.seed, "train", i, params)
        assert S.verify_label(inst, scene), S.explain_label(inst, scene)


# -------------------------------------------------------------------------------------------- balance


def test_snli_labels_balanced(train_ds):
    labels = Counter(inst.label for inst in train_ds.iter_instances() if inst.task == "snli_ve")
    assert set(labels) == {0, 1, 2} and max(labels.values()) - min(labels.values()) <= 1


def test_labels_independent_of_domain(train_ds):
    # A label that follows the rendering domain would let a student read it off the background (a leak
    # found in a first end-to-end run: SNLI accuracy 1.0 from images alone).
    snli = Counter((i.domain, i.label) for i in train_ds.iter_instances() if i.task == "snli_ve")
    assert len(snli) == 9 and max(snli.values()) - min(snli.values()) <= 2, snli


def test_vcr_gold_positions_uniform(task_instances):
    items = [inst for inst, _ in by_task(task_instances, "vcr")]
    for field in ("label", "rationale_label"):
        for template in S.VCR_TEMPLATES:
            pos = Counter(getattr(inst, field) for inst in items if inst.meta["template"] == template)
            assert set(pos) == set(range(VCR_CHOICES))
            assert max(pos.values()) - min(pos.values()) <= 1, (field, template, pos)


# ------------------------------------------------------------------------------------- dedup, splits


def test_images_stored_once_per_scene(train_ds):
    info = train_ds.info
    assert info["images"] == N_SCENES
    assert info["instances"] == 3 * N_SCENES
    assert info["tasks"] == {"vqa": N_SCENES, "snli_ve": N_SCENES, "vcr": N_SCENES}


def test_caption_splits(tmp_path):
    params = tiny(captions_per_scene=2)
    ds = write(tmp_path / "captions", "captions", params)
    assert ds.info["images"] == params.caption_scenes
    assert ds.info["tasks"] == {"caption": 2 * params.caption_scenes}
    assert S.caption_scene_count("captions_val", params) == 200
    assert S.caption_scene_count("captions_val", replace(params, caption_scenes=12000)) == 600
    with pytest.raises(ValueError):
        S.generate("nope", params, None)


# -------------------------------------------------------------------------------------------- domains


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_all_domains_appear_and_look_different(train_ds):
    assert set(train_ds.info["domains"]) == set(S.DOMAINS)
    scene = S.make_scene(0, "train", 1, SyntheticParams())
    imgs = {d: _pixels(S.render(replace(scene, domain=d))) for d in S.DOMAINS}
    means = {d: float(a.mean()) for d, a in imgs.items()}
    assert means["plain"] > means["outline"] + 30 > means["textured"] + 60
    # Texture shows as local pixel-to-pixel variation the other two domains lack.
    rough = {d: float(np.abs(np.diff(a, axis=1)).mean()) for d, a in imgs.items()}
    assert rough["textured"] > 2 * max(rough["plain"], rough["outline"])


@pytest.mark.parametrize("domain", S.DOMAINS)
def test_colour_recognisable_in_every_domain(domain):
    palette = {c: np.asarray(v, np.float32) / sum(v) for c, v in S.PALETTE.items()}
    for colour in S.COLOURS:
        for shape in ("circle", "cross"):
            obj = S.SceneObject(shape, colour, "large", 32, 32, S.RADIUS["large"] * 64)
            scene = S.Scene((obj,), domain, 64, seed=123)
            img, empty = _pixels(S.render(scene)), _pixels(S.render(replace(scene, objects=())))
            on = np.abs(img - empty).sum(axis=2) > 60
            assert on.sum() > 20
            mean = img[on].mean(axis=0)
            chroma = mean / mean.sum()
            nearest = min(palette, key=lambda c: float(np.abs(palette[c] - chroma).sum()))
            assert nearest == colour, (domain, shape, colour, mean)


def test_image_size_scales_positions():
    scene = S.make_scene(0, "train", 3, SyntheticParams())
    assert Image.open(io.BytesIO(S.render(scene, 96))).size == (96, 96)


# ------------------------------------------------------------------------------------- human answers


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.45, 0.9])
def test_vqa_gold_is_strict_majority(noise):
    params = SyntheticParams(vqa_answer_noise=noise)
    wrong_counts = set()
    for i in range(60):
        scene = S.make_scene(0, "val", i, params)
        inst = S.vqa_instance(scene, f"k{i}", "img", "val", S.task_rng(0, "val", i, "vqa"), params)
        gold_n = inst.human_answers.count(inst.answer)
        assert len(inst.human_answers) == 10 and gold_n >= 6
        assert S.verify_label(inst, scene), S.explain_label(inst, scene)
        wrong_counts.add(10 - gold_n)
    assert wrong_counts == {min(round(noise * 10), 4)}
