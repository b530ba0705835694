"""VCR (official files) -> prepared dataset.

Reads, under ``root``::

    <split>.jsonl                 one object per line: img_fn, metadata_fn, objects, question, answer_choices (4),
                                  rationale_choices (4), answer_label, rationale_label (both absent in test),
                                  annot_id, movie
    vcr1images/<img_fn>           the movie frame
    vcr1images/<metadata_fn>      {"boxes": [[x1, y1, x2, y2, score], ...], "width", "height", ...}

Question, answers and rationales are token lists in which an object reference is a list of indices into
``objects``: ``["What", "is", [0], "doing", "?"]``. They are rendered as text with readable tags:

* a tag is the object's class followed by its 1-based number among the objects of that class, in ``objects``
  order: with ``objects = ["person", "person", "car"]``, ``[0]`` -> "person1", ``[1]`` -> "person2",
  ``[2]`` -> "car1". Spaces in class names become '_' ("dining table" -> "dining_table1") so a tag stays one
  word. Per-class numbering (rather than the overall index) keeps "car1" for the first car whatever precedes it.
* several indices in one reference are joined as a list: ``[0, 1]`` -> "person1 and person2",
  ``[0, 1, 2]`` -> "person1, person2 and car1".
* tokens are joined with spaces, except none before closing punctuation and clitics (". , ? ! ; : ) 's n't")
  and none after opening brackets; straight double quotes alternate between opening and closing.

meta keeps the frame's width and height and, for every referenced object, its tag and metadata box.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import DataError
from .readers import InstanceSink, iter_jsonl, load_json, require, sanitize_key
from .schema import VCR_CHOICES, Instance
from .shards import DatasetWriter

_NO_SPACE_BEFORE = {".", ",", "?", "!", ";", ":", ")", "]", "}", "%", "...", "n't"}
_NO_SPACE_AFTER = {"(", "[", "{", "$"}


def object_tags(objects: list[str]) -> list[str]:
    """One readable tag per object: class + 1-based number within that class."""
    seen: Counter = Counter()
    tags = []
    for name in objects:
        cls = "_".join(name.split()) or "object"
        seen[cls] += 1
        tags.append(f"{cls}{seen[cls]}")
    return tags


def render(tokens: list, tags: list[str], refs: set[int] | None = None) -> str:
    """Token list with object references -> text; ``refs`` collects the referenced object indices.

    Raises ``ValueError`` for a malformed token or an index outside ``tags``.
    """
    words: list[str] = []
    for tok in tokens:
        if isinstance(tok, str):
            words.append(tok)
            continue
        if not isinstance(tok, list) or not tok:
            raise ValueError(f"token {tok!r} is neither a word nor a non-empty list of object indices")
        names = []
        for idx in tok:
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise ValueError(f"object reference {tok!r} holds a non-integer index")
            if not 0 <= idx < len(tags):
                raise ValueError(f"object index {idx} out of range: the line has {len(tags)} objects")
            if refs is not None:
                refs.add(idx)
            names.append(tags[idx])
        words.append(names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])
    return detokenize(words)


def detokenize(words: list[str]) -> str:
    out = ""
    glue = True  # no space before the first word
    open_quote = False
    for w in words:
        if w == '"':
            space = not glue and not open_quote
            out += (" " if space else "") + w
            glue = not open_quote  # an opening quote sticks to the next word
            open_quote = not open_quote
            continue
        if not (glue or w in _NO_SPACE_BEFORE or w.startswith("'")):
            out += " "
        out += w
        glue = w in _NO_SPACE_AFTER
    return out.strip()


def convert(root: Path, split: str, writer: DatasetWriter, workers: int = 1) -> None:
    """Convert one VCR split (train, val, test) found under ``root``; ``workers`` threads read and check the
    images ahead of the writer (``InstanceSink``)."""
    root = Path(root)
    path = root / f"{split}.jsonl"
    images = root / "vcr1images"
    with InstanceSink(writer, workers) as sink:
        metadata: dict[Path, dict | DataError] = {}  # only width/height/boxes are kept, so this stays small
        for lineno, rec in iter_jsonl(path, sink.skip):
            where = f"line {lineno}"
            try:
                inst, image_path = _build(rec, path, where, split, images, metadata)
            except DataError as e:
                sink.skip(e)
                continue
            sink.add(inst, image_path, path, where)


def _relative(rec: dict, name: str, path: Path, where: str) -> PurePosixPath:
    rel = PurePosixPath(require(rec, name, str, path, where))
    # The names come from the file; one pointing outside vcr1images/ is bad input, not a path to follow.
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DataError(path, where, f"{name} {str(rel)!r} must be a relative path inside vcr1images/")
    return rel


def _label(rec: dict, name: str, split: str, path: Path, where: str) -> int | None:
    if rec.get(name) is None and "test" in split:
        return None
    value = require(rec, name, int, path, where)
    if not 0 <= value < VCR_CHOICES:
        raise DataError(path, where, f"{name} {value} outside 0..{VCR_CHOICES - 1}")
    return value


def _choices(rec: dict, name: str, tags: list[str], refs: set[int], path: Path, where: str) -> list[str]:
    choices = require(rec, name, list, path, where)
    if len(choices) != VCR_CHOICES:
        raise DataError(path, where, f"{name}: expected {VCR_CHOICES} choices, got {len(choices)}")
    out = []
    for k, tokens in enumerate(choices):
        if not isinstance(tokens, list) or not tokens:
            raise DataError(path, where, f"{name}[{k}]: expected a non-empty token list")
        try:
            out.append(render(tokens, tags, refs))
        except ValueError as e:
            raise DataError(path, where, f"{name}[{k}]: {e}") from None
    return out


def _metadata(meta_path: Path, cache: dict, path: Path, where: str) -> dict:
    if meta_path not in cache:
        try:
            doc = load_json(meta_path)
            if not isinstance(doc, dict):
                raise DataError(meta_path, "top level", "expected an object")
            kept: dict[str, Any] = {}
            for name in ("width", "height"):
                kept[name] = require(doc, name, (int, float), meta_path, "top level")
            boxes = require(doc, "boxes", list, meta_path, "top level")
            for k, box in enumerate(boxes):
                if (
                    not isinstance(box, list)
                    or len(box) < 4
                    or not all(isinstance(v, int | float) for v in box)
                ):
                    raise DataError(meta_path, f"boxes[{k}]", "expected [x1, y1, x2, y2(, score)]")
            kept["boxes"] = boxes
            cache[meta_path] = kept
        except DataError as e:
            cache[meta_path] = e
    got = cache[meta_path]
    if isinstance(got, DataError):
        raise DataError(got.file, f"{got.where} (metadata of {path.name} {where})", got.reason)
    return got


def _build(
    rec: dict, path: Path, where: str, split: str, images: Path, metadata: dict
) -> tuple[Instance, Path]:
    annot_id = str(require(rec, "annot_id", (str, int), path, where))
    img_fn = _relative(rec, "img_fn", path, where)
    meta_fn = _relative(rec, "metadata_fn", path, where)
    movie = require(rec, "movie", str, path, where)
    objects = require(rec, "objects", list, path, where)
    if not all(isinstance(o, str) for o in objects):
        raise DataError(path, where, "objects: expected a list of class names")
    tags = object_tags(objects)

    refs: set[int] = set()
    q_tokens = require(rec, "question", list, path, where)
    try:
        question = render(q_tokens, tags, refs)
    except ValueError as e:
        raise DataError(path, where, f"question: {e}") from None
    if not question:
        raise DataError(path, where, "empty question")
    answers = _choices(rec, "answer_choices", tags, refs, path, where)
    rationales = _choices(rec, "rationale_choices", tags, refs, path, where)
    label = _label(rec, "answer_label", split, path, where)
    rationale_label = _label(rec, "rationale_label", split, path, where)

    frame = _metadata(images / meta_fn, metadata, path, where)
    if len(frame["boxes"]) != len(objects):
        raise DataError(
            images / meta_fn,
            f"boxes (metadata of {path.name} {where})",
            f"{len(frame['boxes'])} boxes for the line's {len(objects)} objects",
        )
    inst = Instance(
        key=f"vcr-{sanitize_key(annot_id)}",
        task="vcr",
        image_id=f"vcr-{sanitize_key(str(img_fn))}",
        split=split,
        domain=movie,
        question=question,
        answers=answers,
        rationales=rationales,
        label=label,
        rationale_label=rationale_label,
        meta={
            "annot_id": annot_id,
            "img_fn": str(img_fn),
            "movie": movie,
            "objects": objects,
            "width": frame["width"],
            "height": frame["height"],
            "refs": {str(i): {"tag": tags[i], "box": frame["boxes"][i]} for i in sorted(refs)},
        },
    )
    return inst, images / img_fn
