"""One sample schema for every task and source.

A prepared dataset holds two kinds of samples:

* *instance* samples — one task example each (an ``Instance`` below, stored as the ``json`` entry of a
  WebDataset sample whose ``__key__`` is ``Instance.key``);
* *image* samples — one per unique image id, holding the original encoded bytes (``jpg``/``png`` entry) and a
  small ``json`` entry with the image id and the SHA-1 of the bytes.

Instances refer to images by ``image_id`` only, so an image used by many instances is stored once.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..names import SAMPLE_TASKS

SNLI_LABELS = ("entailment", "neutral", "contradiction")
VCR_CHOICES = 4
VQA_HUMAN_ANSWERS = 10
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


class SchemaError(ValueError):
    """An instance violates the schema; the message names the instance key and field."""


@dataclass
class Instance:
    """One task example. Fields a task does not use stay at their empty default.

    vqa:      question, answer (most frequent human answer), human_answers (the 10 annotator answers)
    snli_ve:  hypothesis, label (index into SNLI_LABELS)
    vcr:      question, answers (4 candidates), rationales (4 candidates), label (answer index),
              rationale_label (rationale index); object references already rendered as readable tags
    caption:  caption (the image–caption corpus the embedded teacher is pretrained on)
    """

    key: str
    task: str
    image_id: str
    split: str
    domain: str = ""
    question: str = ""
    hypothesis: str = ""
    caption: str = ""
    answer: str = ""
    human_answers: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    rationales: list[str] = field(default_factory=list)
    label: int | None = None
    rationale_label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, *, check_text: bool = True) -> Instance:
        """The instance itself, or a SchemaError naming its key and the field. ``check_text=False`` skips the
        Unicode check of every string (the costly part) for instances read back from shards written by
        ``DatasetWriter``, which ran it."""

        def bad(f: str, why: str) -> SchemaError:
            return SchemaError(f"instance {self.key!r}: field '{f}': {why}")

        # A lone surrogate (from a JSON escape such as "\\ud800") is a str but no text: every later stage encodes
        # texts as UTF-8 (the cache's text ids, the tokenizer) and would fail there instead. One C-speed
        # encode of the whole instance finds out; the field is looked for only when there is one.
        try:
            if check_text:
                json.dumps(vars(self), ensure_ascii=False, default=str).encode("utf-8")
        except UnicodeEncodeError:
            for name, text in _strings(vars(self)):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    where = f"U+{ord(text[e.start]):04X} at {e.start} in {text!r:.80}"
                    raise bad(name, f"not valid Unicode: lone surrogate {where}") from None
        if not _KEY_OK.match(self.key):
            raise bad(
                "key",
                "must be non-empty and use only letters, digits, '_' and '-' (WebDataset splits keys on '.')",
            )
        if self.task not in SAMPLE_TASKS:
            raise bad("task", f"unknown task {self.task!r}; allowed {SAMPLE_TASKS}")
        if not self.image_id:
            raise bad("image_id", "empty")
        if self.task == "vqa":
            if not self.question:
                raise bad("question", "empty")
            if self.human_answers and len(self.human_answers) != VQA_HUMAN_ANSWERS:
                raise bad(
                    "human_answers", f"expected {VQA_HUMAN_ANSWERS} answers, got {len(self.human_answers)}"
                )
            if "test" not in self.split and not self.answer:
                raise bad("answer", "empty for a labelled split")
        elif self.task == "snli_ve":
            if not self.hypothesis:
                raise bad("hypothesis", "empty")
            if self.label is not None and not 0 <= self.label < len(SNLI_LABELS):
                raise bad("label", f"{self.label} outside 0..{len(SNLI_LABELS) - 1}")
        elif self.task == "vcr":
            if not self.question:
                raise bad("question", "empty")
            if len(self.answers) != VCR_CHOICES:
                raise bad("answers", f"expected {VCR_CHOICES} candidates, got {len(self.answers)}")
            if len(self.rationales) != VCR_CHOICES:
                raise bad("rationales", f"expected {VCR_CHOICES} candidates, got {len(self.rationales)}")
            for name, value in (("label", self.label), ("rationale_label", self.rationale_label)):
                if value is not None and not 0 <= value < VCR_CHOICES:
                    raise bad(name, f"{value} outside 0..{VCR_CHOICES - 1}")
        elif self.task == "caption" and not self.caption:
            raise bad("caption", "empty")
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Instance:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SchemaError(f"instance '{d.get('key', '?')}': unknown fields {sorted(unknown)}")
        return cls(**d)

    def student_text(self) -> str:
        """The text the student reads with the image (what §3 of the method calls the instance text)."""
        if self.task == "snli_ve":
            return self.hypothesis
        if self.task == "caption":
            return self.caption
        return self.question


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted field path, string) for every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            name = str(k).encode("utf-8", "backslashreplace").decode()  # the path is printed in errors
            sub = f"{path}.{name}" if path else name
            yield from _strings(k, sub)
            yield from _strings(v, sub)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def image_key(image_id: str) -> str:
    """A WebDataset-safe sample key for an image id (ids may hold dots and slashes; keys may not)."""
    import hashlib

    return "img_" + hashlib.sha1(image_id.encode()).hexdigest()[:24]
