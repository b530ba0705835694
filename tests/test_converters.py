"""Official-format converters (VQA v2, SNLI-VE, VCR): happy paths and every kind of bad input, both policies."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.data import snli_ve, vcr, vqa
from pipeline.data.errors import DataError, SkipReport
from pipeline.data.schema import Instance
from pipeline.data.shards import DatasetWriter, PreparedDataset
from tests import fixtures_official as fx
from tests.conftest import truncate_jpeg

BUILDERS = {"vqa": (vqa, fx.build_vqa), "snli_ve": (snli_ve, fx.build_snli_ve), "vcr": (vcr, fx.build_vcr)}


def run(
    module: ModuleType, built: fx.Built, out: Path, policy: str = "fail", workers: int = 1
) -> tuple[PreparedDataset, dict]:
    source = module.__name__.rsplit(".", 1)[-1]
    with DatasetWriter(out, source=source, split=built.split, report=SkipReport(policy)) as writer:
        module.convert(built.root, built.split, writer, workers)
    return PreparedDataset(out), json.loads((out / "skipped.json").read_text())


def by_key(ds: PreparedDataset) -> dict[str, Instance]:
    return {inst.key: inst for inst in ds.iter_instances()}


# ------------------------------------------------------------------------------------------------ happy paths


def test_vqa_happy_path(tmp_path: Path) -> None:
    built = fx.build_vqa(tmp_path / "vqa")
    ds, skipped = run(vqa, built, tmp_path / "out")
    assert len(ds) == fx.GOOD_INSTANCES and ds.info["images"] == fx.GOOD_IMAGES and skipped["count"] == 0
    insts = by_key(ds)
    for n, (raw, majority) in enumerate(fx.VQA_ANSWERS):
        qid = (100 + n // 2) * 10 + n % 2
        inst = insts[f"vqa-{qid}"]
        assert inst.image_id == f"coco-val2014-{100 + n // 2}"
        assert inst.human_answers == [vqa.normalize_answer(a) for a in raw] and len(inst.human_answers) == 10
        assert inst.answer == majority, raw
        assert inst.domain == inst.meta["answer_type"] == ("number" if n % 2 == 0 else "other")
        assert inst.meta == {"question_id": qid, "question_type": "what is", "answer_type": inst.domain}
    # Images are stored once, byte for byte.
    src = fx.vqa_image_path(built.root, "val2014", 101).read_bytes()
    assert ds.image_bytes("coco-val2014-101") == src
    assert ds.index["coco-val2014-101"][3] == "jpg"


def test_a_vqa_answer_that_is_a_letter_article_prepares_under_on_error_fail(tmp_path: Path) -> None:
    # "What letter is this?" -> "A" (6 annotators) / "b" (4): normalised as vqaEval.py it was empty, which
    # stopped the whole split; a minority "a" put an empty answer into the vocabulary.
    built = fx.build_vqa(tmp_path / "vqa")
    file = built.root / "v2_mscoco_val2014_annotations.json"
    doc = json.loads(file.read_text())
    for k, a in enumerate(doc["annotations"][0]["answers"]):
        a["answer"] = "A" if k < 6 else "b"
    doc["annotations"][1]["answers"][0]["answer"] = "a"
    file.write_text(json.dumps(doc))
    ds, skipped = run(vqa, built, tmp_path / "out")
    first, second = (by_key(ds)[f"vqa-{a['question_id']}"] for a in doc["annotations"][:2])
    assert skipped["count"] == 0 and first.answer == "a" and second.human_answers[0] == "a"
    assert "" not in ds.answer_vocab()


def test_a_vqa_answer_of_punctuation_alone_prepares_and_no_blank_answer_enters_the_vocabulary(
    tmp_path: Path,
) -> None:
    # "What does the sign say?" on an unreadable sign -> "?" (6 annotators) / "stop" (4): normalised as
    # vqaEval.py it was empty, which stopped the split; a minority "..." or a blank answer put "" into the
    # vocabulary.
    built = fx.build_vqa(tmp_path / "vqa")
    file = built.root / "v2_mscoco_val2014_annotations.json"
    doc = json.loads(file.read_text())
    for k, a in enumerate(doc["annotations"][0]["answers"]):
        a["answer"] = "?" if k < 6 else "stop"
    doc["annotations"][0]["multiple_choice_answer"] = "?"
    doc["annotations"][1]["answers"][0]["answer"] = "..."
    doc["annotations"][1]["answers"][1]["answer"] = " "
    file.write_text(json.dumps(doc))
    ds, skipped = run(vqa, built, tmp_path / "out")
    first, second = (by_key(ds)[f"vqa-{a['question_id']}"] for a in doc["annotations"][:2])
    assert skipped["count"] == 0 and first.answer == "?" and second.human_answers[:2] == ["...", ""]
    assert "" not in ds.answer_vocab() and {"?", "..."} <= set(ds.answer_vocab())


def test_a_blank_vqa_majority_answer_is_reported_against_the_annotations_file(tmp_path: Path) -> None:
    built = fx.build_vqa(tmp_path / "vqa")
    file = built.root / "v2_mscoco_val2014_annotations.json"
    doc = json.loads(file.read_text())
    for k, a in enumerate(doc["annotations"][0]["answers"]):
        a["answer"] = "" if k < 6 else "stop"
    doc["annotations"][0]["multiple_choice_answer"] = ""
    file.write_text(json.dumps(doc))
    qid = doc["annotations"][0]["question_id"]
    with pytest.raises(DataError) as e:
        run(vqa, built, tmp_path / "out")
    assert Path(e.value.file).name == file.name and e.value.where == f"key question_id={qid}"
    assert "blank" in e.value.reason
    ds, skipped = run(vqa, built, tmp_path / "skip", "skip")
    assert skipped["count"] == 1 and skipped["skipped"][0]["file"] == str(file)
    assert len(ds) == fx.GOOD_INSTANCES - 1


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A man's hat", "man's hat"),
        ("black/white", "black white"),
        ("black / white", "black white"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("dont know", "don't know"),
        ("yes!", "yes"),
        ("  Red\tand   blue\n", "red and blue"),
        ("none", "0"),
        ("A", "a"),  # "What letter is this?": vqaEval.py empties it; an empty answer would stop the split
        ("the a", "the a"),
        ("?", "?"),  # punctuation alone: vqaEval.py empties it too
        ("...", "..."),
        (" - ", "-"),
        ("!!", "!!"),
    ],
)
def test_vqa_normalisation(raw: str, norm: str) -> None:
    assert vqa.normalize_answer(raw) == norm


def test_vqa_majority_tie_break() -> None:
    assert vqa.majority_answer(["a", "b", "b", "a"]) == "a"
    assert vqa.majority_answer(["a", "b", "b", "a"], preferred="b") == "b"
    assert vqa.majority_answer(["a", "b", "b", "c"], preferred="a") == "b"


def test_vqa_test_split_without_annotations(tmp_path: Path) -> None:
    built = fx.build_vqa(tmp_path / "vqa", split="test2015", annotations=False)
    ds, _ = run(vqa, built, tmp_path / "out")
    assert len(ds) == fx.GOOD_INSTANCES
    assert all(i.answer == "" and i.human_answers == [] for i in ds.iter_instances())


def test_vqa_missing_annotations_outside_test_split(tmp_path: Path) -> None:
    built = fx.build_vqa(tmp_path / "vqa", annotations=False)
    with pytest.raises(DataError, match=r"v2_mscoco_val2014_annotations\.json: file: not found"):
        run(vqa, built, tmp_path / "out", "skip")


@pytest.mark.parametrize("which", ["questions", "annotations"])
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_vqa_malformed_file_always_raises(tmp_path: Path, which: str, policy: str) -> None:
    built = fx.build_vqa(tmp_path / "vqa", malformed=which)
    with pytest.raises(DataError, match=rf"_val2014_{which}\.json: line 1 col \d+: malformed JSON"):
        run(vqa, built, tmp_path / "out", policy)


def test_snli_ve_happy_path(tmp_path: Path) -> None:
    ds, skipped = run(snli_ve, fx.build_snli_ve(tmp_path / "snli"), tmp_path / "out")
    assert len(ds) == fx.GOOD_INSTANCES and ds.info["images"] == fx.GOOD_IMAGES and skipped["count"] == 0
    inst = by_key(ds)["snli-3416050481_jpg_1r1c"]
    assert inst.task == "snli_ve" and inst.image_id == "flickr-3416050481" and inst.split == "dev"
    assert inst.hypothesis == "Hypothesis 1 about the image ." and inst.label == 2
    assert inst.meta == {
        "pair_id": "3416050481.jpg#1r1c",
        "flickr30k_id": "3416050481",
        "premise_caption": "A photo numbered 3416050481.",
    }
    assert sorted({i.label for i in ds.iter_instances()}) == [0, 1, 2]


def test_snli_ve_reads_the_image_id_as_the_generators_first_release_spells_it(tmp_path: Path) -> None:
    # necla-ml/SNLI-VE's snli_ve_generator.py first wrote "Flikr30kID": "<id>.jpg", the files several loaders read.
    built = fx.build_snli_ve(tmp_path / "snli")
    path = built.root / "snli_ve_dev.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for rec in lines:
        rec["Flikr30kID"] = rec.pop("Flickr30K_ID") + ".jpg"
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    ds, skipped = run(snli_ve, built, tmp_path / "out")
    assert skipped["count"] == 0 and len(ds) == fx.GOOD_INSTANCES
    inst = by_key(ds)["snli-3416050481_jpg_1r1c"]
    assert inst.image_id == "flickr-3416050481" and inst.meta["flickr30k_id"] == "3416050481"
    # With neither spelling the error names the field (and the alias), the file and the line.
    del lines[1]["Flikr30kID"]
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
    with pytest.raises(
        DataError, match=r"snli_ve_dev\.jsonl: line 2: missing field 'Flickr30K_ID' \(or 'Flikr30kID'\)"
    ):
        run(snli_ve, built, tmp_path / "out2")


def test_vcr_happy_path(tmp_path: Path) -> None:
    ds, skipped = run(vcr, fx.build_vcr(tmp_path / "vcr"), tmp_path / "out")
    assert len(ds) == fx.GOOD_INSTANCES and ds.info["images"] == fx.GOOD_IMAGES and skipped["count"] == 0
    inst = by_key(ds)["vcr-val-1"]
    assert inst.question == "What is person1 doing with car1?"
    assert inst.answers == [
        "He is driving it.",
        "person1 and person2 are washing car1.",
        "person1 is sitting at the dining_table1.",
        "person1, person2 and car1 aren't moving.",
    ]
    assert inst.rationales == [
        "person2's hands are on the wheel.",
        "There is a sponge (yellow).",
        "It is parked.",
        'person2 says "let\'s go".',
    ]
    assert (inst.label, inst.rationale_label) == (1, 2)
    assert inst.domain == "3001_21_JUMP_STREET"
    assert (
        inst.image_id == "vcr-lsmdc_3001_21_JUMP_STREET_3001_21_JUMP_STREET_00_00_00_000-00_00_01_000_0_jpg"
    )
    assert (inst.meta["width"], inst.meta["height"]) == (24, 24)
    assert inst.meta["refs"] == {
        "0": {"tag": "person1", "box": [1.0, 2.0, 10.0, 12.0, 0.9]},
        "1": {"tag": "person2", "box": [2.0, 3.0, 11.0, 13.0, 0.9]},
        "2": {"tag": "car1", "box": [3.0, 4.0, 12.0, 14.0, 0.9]},
        "3": {"tag": "dining_table1", "box": [4.0, 5.0, 13.0, 15.0, 0.9]},
    }
    assert ds.info["domains"] == {
        "3001_21_JUMP_STREET": 4,
        "1054_Harry_Potter_and_the_prisoners_of_azkaban": 2,
    }


def test_vcr_test_split_has_no_labels(tmp_path: Path) -> None:
    ds, _ = run(vcr, fx.build_vcr(tmp_path / "vcr", split="test"), tmp_path / "out")
    assert len(ds) == fx.GOOD_INSTANCES
    assert all(i.label is None and i.rationale_label is None for i in ds.iter_instances())


def test_vcr_missing_label_outside_test_split(tmp_path: Path) -> None:
    built = fx.build_vcr(tmp_path / "vcr")
    path = built.root / "val.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[2])
    del row["rationale_label"]
    lines[2] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"val\.jsonl: line 3: missing field 'rationale_label'"):
        run(vcr, built, tmp_path / "out")


def test_vcr_tags_and_detokenise() -> None:
    tags = vcr.object_tags(["person", "car", "person", "cell phone"])
    assert tags == ["person1", "car1", "person2", "cell_phone1"]
    assert vcr.render(["Is", [2], "holding", "the", [3], "?"], tags) == "Is person2 holding the cell_phone1?"
    assert vcr.render([[0, 2], "ca", "n't", "see", [1], ",", "right", "?"], tags) == (
        "person1 and person2 can't see car1, right?"
    )
    with pytest.raises(ValueError, match="object index 4 out of range"):
        vcr.render([[4]], tags)


# ------------------------------------------------------------------------------------------------ bad input

BAD_CASES = [
    *(("vqa", k) for k in fx.VQA_KNOBS),
    *(("snli_ve", k) for k in fx.SNLI_KNOBS),
    *(("vcr", k) for k in fx.VCR_KNOBS),
]


@pytest.mark.parametrize(("source", "knob"), BAD_CASES)
def test_bad_input_fails_naming_file_and_place(tmp_path: Path, source: str, knob: str) -> None:
    module, build = BUILDERS[source]
    built = build(tmp_path / source, knobs=(knob,))
    with pytest.raises(DataError) as info:
        run(module, built, tmp_path / "out", "fail")
    file_name, where = built.bad[knob]
    assert Path(info.value.file).name == file_name, str(info.value)
    assert where in info.value.where and file_name in str(info.value) and where in str(info.value)


@pytest.mark.parametrize(("source", "knob"), BAD_CASES)
def test_bad_input_is_skipped_and_counted(tmp_path: Path, source: str, knob: str) -> None:
    module, build = BUILDERS[source]
    built = build(tmp_path / source, knobs=(knob,))
    ds, skipped = run(module, built, tmp_path / "out", "skip")
    assert len(ds) == fx.GOOD_INSTANCES and ds.info["images"] == fx.GOOD_IMAGES
    assert ds.info["skipped"] == skipped["count"] == 1 and skipped["policy"] == "skip"
    file_name, where = built.bad[knob]
    (entry,) = skipped["skipped"]
    assert Path(entry["file"]).name == file_name and where in entry["where"] and entry["reason"]


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_all_knobs_at_once_under_skip(tmp_path: Path, source: str) -> None:
    module, build = BUILDERS[source]
    knobs = {"vqa": fx.VQA_KNOBS, "snli_ve": fx.SNLI_KNOBS, "vcr": fx.VCR_KNOBS}[source]
    ds, skipped = run(module, build(tmp_path / source, knobs=knobs), tmp_path / "out", "skip")
    assert len(ds) == fx.GOOD_INSTANCES and ds.info["images"] == fx.GOOD_IMAGES
    assert skipped["count"] == len(knobs)


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_images_read_ahead_on_threads_change_no_byte_and_no_first_error(tmp_path: Path, source: str) -> None:
    """``workers`` threads read images ahead of the writer: with every bad-input knob on (and a shared broken
    image), every file written under skip, skipped.json's order included, is the one-thread run's, and under
    fail the error raised is the one-thread run's (the first bad item in input order). Two threads queue
    fewer calls than the input holds, five more (all of it is written at the end)."""
    module, build = BUILDERS[source]
    knobs = {"vqa": fx.VQA_KNOBS, "snli_ve": fx.SNLI_KNOBS, "vcr": fx.VCR_KNOBS}[source]
    built = build(tmp_path / source, knobs=knobs)
    truncate_jpeg(next(p for p in sorted(built.root.rglob("*.jpg")) if b"\xff\xda" in p.read_bytes()))
    errors, trees = [], []
    for workers in (1, 2, 5):
        out = tmp_path / f"skip-{workers}"
        run(module, built, out, "skip", workers)
        trees.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
        with pytest.raises(DataError) as info:
            run(module, built, tmp_path / f"fail-{workers}", "fail", workers)
        errors.append(str(info.value))
    assert json.loads(trees[0][Path("skipped.json")])["count"] == len(knobs) + fx.PER_IMAGE
    assert trees[0] == trees[1] == trees[2]
    assert errors[0] == errors[1] == errors[2]


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_empty_input_fails_at_close(tmp_path: Path, source: str) -> None:
    module, build = BUILDERS[source]
    with pytest.raises(DataError, match="no instances were written"):
        run(module, build(tmp_path / source, empty=True), tmp_path / "out", "skip")


def test_broken_image_shared_by_several_instances_reports_each(tmp_path: Path) -> None:
    built = fx.build_snli_ve(tmp_path / "snli")
    (built.root / "flickr30k_images" / "3416050481.jpg").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds, skipped = run(snli_ve, built, tmp_path / "out", "skip")
    assert len(ds) == fx.GOOD_INSTANCES - fx.PER_IMAGE and ds.info["images"] == fx.GOOD_IMAGES - 1
    assert [e["where"].split("(")[1] for e in skipped["skipped"]] == [
        "snli_ve_dev.jsonl line 3)",
        "snli_ve_dev.jsonl line 4)",
    ]
    assert all("cannot be decoded" in e["reason"] for e in skipped["skipped"])


@pytest.mark.parametrize("source", sorted(BUILDERS))
def test_truncated_jpeg_fails_or_is_skipped_for_each_instance_using_it(tmp_path: Path, source: str) -> None:
    module, build = BUILDERS[source]
    built = build(tmp_path / source)
    image = sorted(built.root.rglob("*.jpg"))[0]
    truncate_jpeg(image)
    with pytest.raises(DataError, match="truncated") as info:
        run(module, built, tmp_path / "fail", "fail")
    assert info.value.file == str(image)
    ds, skipped = run(module, built, tmp_path / "skip", "skip")
    assert ds.info["images"] == fx.GOOD_IMAGES - 1 and skipped["count"] == fx.PER_IMAGE
    assert all(e["file"] == str(image) for e in skipped["skipped"])


def test_a_malformed_json_line_is_explained_without_a_dangling_word(tmp_path: Path) -> None:
    from pipeline.data.readers import iter_jsonl

    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": "tab\there"}\n')
    errors: list[DataError] = []
    list(iter_jsonl(path, errors.append))
    assert str(errors[0]).endswith("malformed JSON at col 11: Invalid control character"), str(errors[0])
