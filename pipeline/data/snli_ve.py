"""SNLI-VE (official files) -> prepared dataset.

Reads, under ``root``::

    snli_ve_<split>.jsonl            one object per line: Flickr30K_ID, sentence2 (the hypothesis), gold_label,
                                     pairID, optionally sentence1 (the caption the hypothesis was written for)
    flickr30k_images/<Flickr30K_ID>.jpg

The image id is read from ``Flickr30K_ID`` ("3416050480") or, as the official generator's first release
(necla-ml/SNLI-VE, snli_ve_generator.py) writes it, ``Flikr30kID`` ("3416050480.jpg"); a trailing ".jpg" is
dropped from either.

The image is the premise. ``label`` indexes ``SNLI_LABELS``; a gold label outside it (SNLI's "-" for pairs
without annotator consensus) is bad input, not a fourth class. The key is ``snli-<pairID>`` with characters a
WebDataset key may not hold replaced by '_' ("3416050480.jpg#4r1n" -> "snli-3416050480_jpg_4r1n").
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .readers import InstanceSink, iter_jsonl, require, sanitize_key
from .schema import SNLI_LABELS, Instance
from .shards import DatasetWriter


def convert(root: Path, split: str, writer: DatasetWriter, workers: int = 1) -> None:
    """Convert one SNLI-VE split (train, dev, test) found under ``root``; ``workers`` threads read and check
    the images ahead of the writer (``InstanceSink``)."""
    root = Path(root)
    path = root / f"snli_ve_{split}.jsonl"
    with InstanceSink(writer, workers) as sink:
        for lineno, rec in iter_jsonl(path, sink.skip):
            where = f"line {lineno}"
            try:
                inst, image_path = _build(rec, path, where, split, root)
            except DataError as e:
                sink.skip(e)
                continue
            sink.add(inst, image_path, path, where)


# The field holding the image id, by spelling (module docstring): the released files' first.
_ID_FIELDS = ("Flickr30K_ID", "Flikr30kID")


def _build(rec: dict, path: Path, where: str, split: str, root: Path) -> tuple[Instance, Path]:
    field = next((name for name in _ID_FIELDS if rec.get(name) is not None), None)
    if field is None:
        raise DataError(
            path, where, f"missing field {_ID_FIELDS[0]!r} (or {', '.join(map(repr, _ID_FIELDS[1:]))})"
        )
    # Flickr30K ids are written as strings in the official files but as numbers by some re-exports, and as the
    # image's file name ("<id>.jpg") by the generator's first release.
    flickr_id = str(require(rec, field, (str, int), path, where)).strip().removesuffix(".jpg")
    if not flickr_id.isdigit():
        raise DataError(path, where, f"{field} {flickr_id!r} is not a numeric Flickr30K image id")
    hypothesis = require(rec, "sentence2", str, path, where).strip()
    if not hypothesis:
        raise DataError(path, where, "empty sentence2 (hypothesis)")
    gold = require(rec, "gold_label", str, path, where)
    if gold not in SNLI_LABELS:
        raise DataError(path, where, f"unknown gold_label {gold!r}; expected one of {SNLI_LABELS}")
    pair_id = str(require(rec, "pairID", (str, int), path, where))
    if not pair_id.strip():
        raise DataError(path, where, "empty pairID")

    meta = {"pair_id": pair_id, "flickr30k_id": flickr_id}
    premise = rec.get("sentence1")
    if isinstance(premise, str) and premise:
        meta["premise_caption"] = premise
    inst = Instance(
        key=f"snli-{sanitize_key(pair_id)}",
        task="snli_ve",
        image_id=f"flickr-{flickr_id}",
        split=split,
        hypothesis=hypothesis,
        label=SNLI_LABELS.index(gold),
        meta=meta,
    )
    return inst, root / "flickr30k_images" / f"{flickr_id}.jpg"
