"""VQA v2 (official files) -> prepared dataset.

Reads, under ``root``::

    v2_OpenEnded_mscoco_<split>_questions.json   {"questions": [{"image_id", "question", "question_id"}, ...]}
    v2_mscoco_<split>_annotations.json           {"annotations": [{"question_id", "image_id", "answers" (10),
                                                  "multiple_choice_answer", "answer_type", "question_type"}, ...]}
    <split>/COCO_<split>_<12-digit image id>.jpg

A split whose name contains "test" may come without an annotations file; its instances carry no answers.
``test-dev2015`` is a subset of ``test2015`` and has no image folder of its own, so its images (and image ids)
are those of ``test2015``.

Answers are normalised as the official VQA evaluation (vqaEval.py) normalises them before matching:
punctuation stripped or turned into spaces, periods not followed by a digit dropped, lowercase, number words
zero..ten (and "none") -> digits, articles dropped, apostrophe-less contractions restored ("dont" -> "don't"):
the common ones of vqaEval.py's map (``_CONTRACTIONS``), plus "im" and "ive", which its capitalised keys
("Im", "Ive") never match after lowercasing; rarer forms ("hes", "oclock", "youll") stay as typed, on both
sides of a match alike. Two more departures, both where vqaEval.py would empty an answer: one that is only an article ("a" to "What letter
is this?") keeps it, and one that normalises to nothing else ("?", "...", "-") is kept as typed, lowercased;
an empty answer would stop a labelled split under data.on_error=fail, win a tie over a real one, or enter the
answer vocabulary. A blank human answer stays blank and is not counted in the vocabulary.
``human_answers`` holds the 10 normalised annotator answers; ``answer`` is the most frequent of them (ties go
to the normalised ``multiple_choice_answer`` when it is among the tied, else to the earliest annotator).

Whole-file problems (missing or malformed questions/annotations file) always raise: there is no item to skip.
Item problems (question without annotation, annotation without question, != 10 answers, mismatched image id,
an answer that is not valid Unicode, a blank majority answer, missing or undecodable image) go through
``writer.skip``, naming the file the problem is in.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import DataError
from .readers import InstanceSink, load_json, require
from .schema import VQA_HUMAN_ANSWERS, Instance
from .shards import DatasetWriter

# Splits whose images live in another split's folder.
_IMAGE_SPLIT = {"test-dev2015": "test2015"}

# The official lists, verbatim in content.
_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
# Kept as in vqaEval.py: the lookbehind is mistyped there ("(?!<=" is a lookahead), so in effect every period
# not followed by a digit is dropped; reproducing it keeps our answers identical to what the metric compares.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# A short, unambiguous subset of the official contractions map (the full one also maps rare forms such as
# "wouldn'tve"); words like "its", "hes", "well" are left out on purpose because they are also real words.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "im": "i'm",
    "isnt": "isn't",
    "itll": "it'll",
    "ive": "i've",
    "shouldnt": "shouldn't",
    "thats": "that's",
    "theres": "there's",
    "theyre": "they're",
    "wasnt": "wasn't",
    "werent": "weren't",
    "whats": "what's",
    "wheres": "where's",
    "whos": "who's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "youre": "you're",
}


def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        # Official rule: punctuation touching a space (or any text with a "1,000"-style number) is removed,
        # otherwise it separates words ("black/white" -> "black white").
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    # A lone article is the answer itself (module docstring).
    kept = [w for w in words if w not in _ARTICLES] or words
    # So is punctuation alone ("?" to an unreadable sign): normalised it would be no answer at all.
    return " ".join(_CONTRACTIONS.get(w, w) for w in kept) or text.lower()


def majority_answer(answers: list[str], preferred: str = "") -> str:
    """The most frequent answer; ties go to ``preferred`` if tied, else to the earliest of the tied."""
    counts = Counter(answers)
    top = max(counts.values())
    if counts.get(preferred) == top:
        return preferred
    return next(a for a in answers if counts[a] == top)


def convert(root: Path, split: str, writer: DatasetWriter, workers: int = 1) -> None:
    """Convert one VQA v2 split (e.g. train2014, val2014, test2015) found under ``root``; ``workers`` threads
    read and check the images ahead of the writer (``InstanceSink``)."""
    root = Path(root)
    q_path = root / f"v2_OpenEnded_mscoco_{split}_questions.json"
    a_path = root / f"v2_mscoco_{split}_annotations.json"
    image_split = _IMAGE_SPLIT.get(split, split)
    with InstanceSink(writer, workers) as sink:
        questions = _entries(load_json(q_path), "questions", q_path)
        labelled = a_path.exists() or "test" not in split
        annotations = _index_annotations(a_path, sink) if labelled else {}

        # Every readable question_id, written or skipped: its annotation is not an orphan.
        asked: set[int] = set()
        for i, q in enumerate(questions):
            qid = q.get("question_id") if isinstance(q, dict) else None
            if isinstance(qid, int) and qid in asked:
                sink.skip(DataError(q_path, f"key question_id={qid}", "duplicate question_id"))
                continue
            if isinstance(qid, int):
                asked.add(qid)
            try:
                inst, image_path, where = _build(
                    q, i, q_path, a_path, annotations, labelled, split, image_split, root
                )
            except DataError as e:
                sink.skip(e)
                continue
            sink.add(inst, image_path, q_path, where)

        for qid in sorted(annotations.keys() - asked):
            sink.skip(
                DataError(a_path, f"key question_id={qid}", f"annotation has no question in {q_path.name}")
            )


def _entries(doc: Any, name: str, path: Path) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get(name), list):
        raise DataError(path, "top level", f"expected an object with a {name!r} list")
    return doc[name]


def _index_annotations(path: Path, sink: InstanceSink) -> dict[int, dict]:
    by_qid: dict[int, dict] = {}
    for j, ann in enumerate(_entries(load_json(path), "annotations", path)):
        try:
            if not isinstance(ann, dict):
                raise DataError(path, f"annotations[{j}]", "expected an object")
            qid = require(ann, "question_id", int, path, f"annotations[{j}]")
            if qid in by_qid:
                raise DataError(path, f"key question_id={qid}", "duplicate annotation")
        except DataError as e:
            sink.skip(e)
            continue
        by_qid[qid] = ann
    return by_qid


def _build(
    q: Any,
    i: int,
    q_path: Path,
    a_path: Path,
    annotations: dict[int, dict],
    labelled: bool,
    split: str,
    image_split: str,
    root: Path,
) -> tuple[Instance, Path, str]:
    if not isinstance(q, dict):
        raise DataError(q_path, f"questions[{i}]", "expected an object")
    qid = require(q, "question_id", int, q_path, f"questions[{i}]")
    where = f"key question_id={qid}"
    image_id = require(q, "image_id", int, q_path, where)
    question = require(q, "question", str, q_path, where).strip()
    if not question:
        raise DataError(q_path, where, "empty question")

    answer, human, meta = "", [], {"question_id": qid, "question_type": "", "answer_type": ""}
    if labelled:
        ann = annotations.get(qid)
        if ann is None:
            raise DataError(a_path, where, f"question (in {q_path.name}) has no annotation")
        if require(ann, "image_id", int, a_path, where) != image_id:
            raise DataError(a_path, where, f"image_id {ann['image_id']} != {image_id} in {q_path.name}")
        raw = require(ann, "answers", list, a_path, where)
        if len(raw) != VQA_HUMAN_ANSWERS:
            raise DataError(a_path, where, f"expected {VQA_HUMAN_ANSWERS} answers, got {len(raw)}")
        # Everything taken from the annotations file is checked here, naming that file: the schema check in
        # InstanceSink.add would name the questions file, where the instance was read.
        for k, a in enumerate(raw):
            if not isinstance(a, dict):
                raise DataError(a_path, where, f"answers[{k}]: expected an object")
            at = f"{where} answers[{k}]"
            human.append(normalize_answer(_text(require(a, "answer", str, a_path, at), "answer", a_path, at)))
        preferred = ann.get("multiple_choice_answer")
        answer = majority_answer(human, normalize_answer(preferred) if isinstance(preferred, str) else "")
        if not answer:
            raise DataError(
                a_path,
                where,
                f"the most frequent answer is blank ({human.count('')} of {len(human)} answers)",
            )
        for name in ("question_type", "answer_type"):
            if name in ann:
                meta[name] = _text(require(ann, name, str, a_path, where), name, a_path, where)

    inst = Instance(
        key=f"vqa-{qid}",
        task="vqa",
        image_id=f"coco-{image_split}-{image_id}",
        split=split,
        domain=meta["answer_type"],
        question=question,
        answer=answer,
        human_answers=human,
        meta=meta,
    )
    image_path = root / image_split / f"COCO_{image_split}_{image_id:012d}.jpg"
    return inst, image_path, where


def _text(value: str, name: str, file: Path, where: str) -> str:
    """``value``, or a DataError naming ``file``: a lone surrogate (a JSON escape such as "\\ud800") is a str
    but no text, which the schema check refuses too (schema.py)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        at = f"U+{ord(value[e.start]):04X} at {e.start} in {value!r:.80}"
        raise DataError(file, where, f"field '{name}': not valid Unicode: lone surrogate {at}") from None
    return value
