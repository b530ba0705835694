"""Tiny fixtures in the official VQA v2, SNLI-VE and VCR formats, with knobs that inject bad input.

Every builder writes the same good core (3 real JPEG images, 2 items per image, so image dedup is exercised)
and, for each bad-input knob turned on, appends exactly one extra bad item. So whatever the knobs, the skip
policy must write ``GOOD_INSTANCES`` instances over ``GOOD_IMAGES`` images and skip one item per knob, and the
fail policy must raise naming ``Built.bad[knob]`` (the file name and the line/key of the bad item).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

GOOD_IMAGES = 3
PER_IMAGE = 2
GOOD_INSTANCES = GOOD_IMAGES * PER_IMAGE

VQA_KNOBS = (
    "missing_image",
    "corrupt_image",
    "no_annotation",
    "short_answers",
    "orphan_annotation",
    "bad_image_id",
    "duplicate_question",
)
SNLI_KNOBS = (
    "malformed_line",
    "missing_field",
    "unknown_label",
    "missing_image",
    "corrupt_image",
    "duplicate_pair",
)
VCR_KNOBS = (
    "malformed_line",
    "missing_field",
    "bad_label",
    "wrong_choices",
    "index_out_of_range",
    "missing_image",
    "missing_metadata",
    "malformed_metadata",
)

# Raw annotator answers (10 per question) and what the official normalisation and majority vote make of them;
# the 4th is a 4-4 tie that multiple_choice_answer (the first raw answer here) decides.
VQA_ANSWERS = [
    (["Two", "2", "two", "2.", "3", "three", "2", "2", "two ", "2"], "2"),
    (["Yes", "yes", "yes!", "no", "yes", "YES", "yes", "no", "yes", "yes"], "yes"),
    (["A dog", "the dog", "dog", "dogs", "dog.", "Dog", "cat", "a dog", "dog", "puppy"], "dog"),
    (
        ["black/white", "black and white", "black/white", "black white", "gray", "black/white"]
        + ["white"] * 4,
        "black white",
    ),
    (
        ["dont know", "don't know", "dont know", "no idea", "unknown", "dont know"]
        + ["none"] * 3
        + ["nothing"],
        "don't know",
    ),
    (["1,000", "1000", "1,000", "many", "1000", "lots", "1 000", "1000", "1,000", "100"], "1000"),
]


@dataclass
class Built:
    root: Path
    split: str
    # knob -> (file name, line/key) that the DataError message for that knob's bad item must contain
    bad: dict[str, tuple[str, str]] = field(default_factory=dict)


def jpeg(path: Path, colour: tuple[int, int, int], size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())


def _colour(i: int) -> tuple[int, int, int]:
    return (40 * i % 256, 255 - 30 * i % 256, 70 * i % 256)


def _check(knobs: set[str], allowed: tuple[str, ...]) -> None:
    unknown = knobs - set(allowed)
    if unknown:
        raise ValueError(f"unknown knobs {sorted(unknown)}; allowed {allowed}")


# ---------------------------------------------------------------------------------------------------- VQA v2


def vqa_image_path(root: Path, split: str, image_id: int) -> Path:
    return root / split / f"COCO_{split}_{image_id:012d}.jpg"


def build_vqa(
    root: Path,
    split: str = "val2014",
    knobs: tuple[str, ...] = (),
    *,
    annotations: bool = True,
    malformed: str = "",
    empty: bool = False,
) -> Built:
    """VQA v2 files for ``split``. ``malformed`` in {"questions", "annotations"} breaks that whole file."""
    _check(set(knobs), VQA_KNOBS)
    q_name = f"v2_OpenEnded_mscoco_{split}_questions.json"
    a_name = f"v2_mscoco_{split}_annotations.json"
    built = Built(root, split)
    questions: list[dict] = []
    anns: list[dict] = []

    def add(qid: int, image_id: int, answers: list[str], mc: str, answer_type: str = "other") -> None:
        questions.append(
            {"image_id": image_id, "question": f"What is shown in picture {qid}?", "question_id": qid}
        )
        anns.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                    for k, a in enumerate(answers)
                ],
                "multiple_choice_answer": mc,
                "answer_type": answer_type,
                "question_type": "what is",
            }
        )

    if not empty:
        for i in range(GOOD_IMAGES):
            image_id = 100 + i
            jpeg(vqa_image_path(root, split, image_id), _colour(i))
            for j in range(PER_IMAGE):
                raw, _ = VQA_ANSWERS[i * PER_IMAGE + j]
                add(image_id * 10 + j, image_id, raw, raw[0], "number" if j == 0 else "other")
    fine = VQA_ANSWERS[0][0]
    if "missing_image" in knobs:
        add(9901, 999, fine, "2")
        built.bad["missing_image"] = (f"COCO_{split}_000000000999.jpg", "question_id=9901")
    if "corrupt_image" in knobs:
        vqa_image_path(root, split, 998).write_bytes(b"\xff\xd8 not really a jpeg")
        add(9902, 998, fine, "2")
        built.bad["corrupt_image"] = (f"COCO_{split}_000000000998.jpg", "question_id=9902")
    if "no_annotation" in knobs:
        add(9903, 100, fine, "2")
        anns.pop()
        built.bad["no_annotation"] = (a_name, "question_id=9903")
    if "short_answers" in knobs:
        add(9904, 100, fine[:9], "2")
        built.bad["short_answers"] = (a_name, "question_id=9904")
    if "orphan_annotation" in knobs:
        add(9905, 100, fine, "2")
        questions.pop()
        built.bad["orphan_annotation"] = (a_name, "question_id=9905")
    if "bad_image_id" in knobs:
        add(9906, 100, fine, "2")
        anns[-1]["image_id"] = 101
        built.bad["bad_image_id"] = (a_name, "question_id=9906")
    if "duplicate_question" in knobs:
        questions.append(dict(questions[0]))
        built.bad["duplicate_question"] = (q_name, f"question_id={questions[0]['question_id']}")

    root.mkdir(parents=True, exist_ok=True)
    q_doc = json.dumps({"info": {}, "task_type": "Open-Ended", "data_subtype": split, "questions": questions})
    a_doc = json.dumps({"info": {}, "data_subtype": split, "annotations": anns})
    if malformed == "questions":
        q_doc = q_doc[: len(q_doc) // 2]
    if malformed == "annotations":
        a_doc = a_doc.replace('"annotations": [', '"annotations": [,', 1)
    (root / q_name).write_text(q_doc)
    if annotations:
        (root / a_name).write_text(a_doc)
    return built


# ---------------------------------------------------------------------------------------------------- SNLI-VE


def build_snli_ve(
    root: Path, split: str = "dev", knobs: tuple[str, ...] = (), *, empty: bool = False
) -> Built:
    _check(set(knobs), SNLI_KNOBS)
    name = f"snli_ve_{split}.jsonl"
    built = Built(root, split)
    lines: list[str] = []

    def row(flickr_id: str, n: int, label: str = "entailment", **extra: object) -> dict:
        return {
            "Flickr30K_ID": flickr_id,
            "sentence1": f"A photo numbered {flickr_id}.",
            "sentence2": f"Hypothesis {n} about the image .",
            "gold_label": label,
            "pairID": f"{flickr_id}.jpg#{n}r1{label[0]}",
            "captionID": f"{flickr_id}.jpg#{n}",
            **extra,
        }

    if not empty:
        for i in range(GOOD_IMAGES):
            fid = str(3416050480 + i)
            jpeg(root / "flickr30k_images" / f"{fid}.jpg", _colour(i))
            for j in range(PER_IMAGE):
                lines.append(json.dumps(row(fid, j, ("entailment", "neutral", "contradiction")[(i + j) % 3])))

    def bad(knob: str, text: str) -> None:
        lines.append(text)
        built.bad[knob] = (name, f"line {len(lines)}")

    good_id = "3416050480"
    if "malformed_line" in knobs:
        bad("malformed_line", json.dumps(row(good_id, 7))[:-5])
    if "missing_field" in knobs:
        r = row(good_id, 8)
        del r["sentence2"]
        bad("missing_field", json.dumps(r))
    if "unknown_label" in knobs:
        bad("unknown_label", json.dumps(row(good_id, 9, "-")))
    if "missing_image" in knobs:
        bad("missing_image", json.dumps(row("1000000001", 0)))
        built.bad["missing_image"] = ("1000000001.jpg", built.bad["missing_image"][1])
    if "corrupt_image" in knobs:
        (root / "flickr30k_images").mkdir(parents=True, exist_ok=True)
        (root / "flickr30k_images" / "1000000002.jpg").write_bytes(b"GIF89a truncated")
        bad("corrupt_image", json.dumps(row("1000000002", 0)))
        built.bad["corrupt_image"] = ("1000000002.jpg", built.bad["corrupt_image"][1])
    if "duplicate_pair" in knobs:
        bad("duplicate_pair", lines[0])

    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("".join(line + "\n" for line in lines))
    return built


# ---------------------------------------------------------------------------------------------------- VCR

VCR_OBJECTS = ["person", "person", "car", "dining table"]


def build_vcr(root: Path, split: str = "val", knobs: tuple[str, ...] = (), *, empty: bool = False) -> Built:
    _check(set(knobs), VCR_KNOBS)
    name = f"{split}.jsonl"
    images = root / "vcr1images"
    built = Built(root, split)
    lines: list[str] = []
    labelled = "test" not in split

    def frame(i: int, movie: str) -> tuple[str, str]:
        stem = f"lsmdc_{movie}/{movie}_00.00.{i:02d}.{i:03d}-00.00.{i + 1:02d}.{i:03d}@0"
        return f"{stem}.jpg", f"{stem}.json"

    def write_frame(i: int, movie: str, n_objects: int = len(VCR_OBJECTS)) -> tuple[str, str]:
        img_fn, meta_fn = frame(i, movie)
        jpeg(images / img_fn, _colour(i), size=24)
        boxes = [[1.0 + k, 2.0 + k, 10.0 + k, 12.0 + k, 0.9] for k in range(n_objects)]
        meta = {"boxes": boxes, "segms": [[[[0, 0], [1, 0], [1, 1]]]] * n_objects, "names": VCR_OBJECTS}
        (images / meta_fn).write_text(json.dumps({**meta, "width": 24, "height": 24}))
        return img_fn, meta_fn

    def row(n: int, img_fn: str, meta_fn: str, movie: str) -> dict:
        r = {
            "movie": movie,
            "objects": VCR_OBJECTS,
            "img_fn": img_fn,
            "metadata_fn": meta_fn,
            "question": ["What", "is", [0], "doing", "with", [2], "?"],
            "answer_choices": [
                ["He", "is", "driving", "it", "."],
                [[0, 1], "are", "washing", [2], "."],
                [[0], "is", "sitting", "at", "the", [3], "."],
                [[0, 1, 2], "are", "n't", "moving", "."],
            ],
            "rationale_choices": [
                [[1], "'s", "hands", "are", "on", "the", "wheel", "."],
                ["There", "is", "a", "sponge", "(", "yellow", ")", "."],
                ["It", "is", "parked", "."],
                [[1], "says", '"', "let", "'s", "go", '"', "."],
            ],
            "answer_label": n % 4,
            "rationale_label": (n + 1) % 4,
            "annot_id": f"{split}-{n}",
            "img_id": f"{split}-{n // PER_IMAGE}",
            "question_number": n % PER_IMAGE,
            "answer_likelihood": "likely",
        }
        if not labelled:
            del r["answer_label"], r["rationale_label"]
        return r

    movies = ["3001_21_JUMP_STREET", "1054_Harry_Potter_and_the_prisoners_of_azkaban", "3001_21_JUMP_STREET"]
    if not empty:
        for i in range(GOOD_IMAGES):
            img_fn, meta_fn = write_frame(i, movies[i])
            for j in range(PER_IMAGE):
                lines.append(json.dumps(row(i * PER_IMAGE + j, img_fn, meta_fn, movies[i])))

    first_img, first_meta = frame(0, movies[0])

    def bad(knob: str, r: dict | str) -> None:
        lines.append(r if isinstance(r, str) else json.dumps(r))
        built.bad[knob] = (name, f"line {len(lines)}")

    extra = 100
    for knob in knobs:
        extra += 1
        r = row(extra, first_img, first_meta, movies[0])
        if knob == "malformed_line":
            bad(knob, json.dumps(r)[:-1])
        elif knob == "missing_field":
            del r["question"]
            bad(knob, r)
        elif knob == "bad_label":
            r["answer_label"] = 4
            bad(knob, r)
        elif knob == "wrong_choices":
            r["rationale_choices"] = r["rationale_choices"][:3]
            bad(knob, r)
        elif knob == "index_out_of_range":
            r["question"] = ["Why", "is", [7], "here", "?"]
            bad(knob, r)
        elif knob == "missing_image":
            img_fn, meta_fn = write_frame(50, "9999_MISSING")
            (images / img_fn).unlink()
            bad(knob, {**r, "img_fn": img_fn, "metadata_fn": meta_fn})
            built.bad[knob] = (Path(img_fn).name, built.bad[knob][1])
        elif knob == "missing_metadata":
            img_fn, meta_fn = write_frame(51, "9998_NOMETA")
            (images / meta_fn).unlink()
            bad(knob, {**r, "img_fn": img_fn, "metadata_fn": meta_fn})
            built.bad[knob] = (Path(meta_fn).name, built.bad[knob][1])
        elif knob == "malformed_metadata":
            img_fn, meta_fn = write_frame(52, "9997_BADMETA")
            (images / meta_fn).write_text('{"boxes": [[1, 2, 3')
            bad(knob, {**r, "img_fn": img_fn, "metadata_fn": meta_fn})
            built.bad[knob] = (Path(meta_fn).name, built.bad[knob][1])

    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("".join(line + "\n" for line in lines))
    return built
