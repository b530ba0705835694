"""Streams training batches: instances from the shards, their images decoded, and the teacher targets.

CPU work that scales with the batch (image decode, tokenisation, label tensors) runs in DataLoader workers.
Teacher targets are read afterwards, in the main process, with one batched sorted read per batch: zarr's
event loop and forked workers can deadlock, so no worker ever touches the store. The same ``Batch`` can be
given targets from the cache (``CachedTargets``) or from a teacher run inside the loop (``OnlineTargets``);
both return identical dictionaries so the loss cannot tell them apart.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.schema import Instance
from pipeline.data.shards import PreparedDataset, decode_image, instance_pipeline
from pipeline.texts import InstanceTexts, instance_texts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_tokenizer(model: str):
    """The teacher's tokenizer without loading the teacher (students read the teacher's token ids)."""
    import open_clip

    from pipeline.teacher import register_model

    return open_clip.get_tokenizer(register_model(model))


def soft_vqa_target(human_answers: Sequence[str], vocab_index: dict[str, int]) -> torch.Tensor:
    """Standard VQA soft target: min(#humans giving the answer / 3, 1) for each answer in the vocabulary."""
    t = torch.zeros(len(vocab_index))
    for a in set(human_answers):
        if a in vocab_index:
            t[vocab_index[a]] = min(list(human_answers).count(a) / 3.0, 1.0)
    return t


def image_tensor(
    data: bytes, size: int, view: tuple[float, float, float, float, bool] | None = None
) -> torch.Tensor:
    """Encoded bytes → normalised [3,size,size]. ``view`` = (x0, y0, x1, y1, flip) replays a cached teacher view."""
    img = decode_image(data)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    if view is not None:
        x0, y0, x1, y1, flip = view
        h, w = x.shape[1:]
        x = x[
            :,
            int(round(y0 * h)) : max(int(round(y1 * h)), int(round(y0 * h)) + 1),
            int(round(x0 * w)) : max(int(round(x1 * w)), int(round(x0 * w)) + 1),
        ]
        if flip:
            x = x.flip(-1)
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[
            0
        ].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class TaskSpec:
    """Everything a worker needs to turn an instance into tensors (picklable)."""

    task: str
    tokenizer: object
    image_size: int
    max_text_len: int
    vocab: list[str] = field(default_factory=list)  # VQA answer vocabulary
    vqa_candidates: int = 4

    def __post_init__(self) -> None:
        self.vocab_index = {a: i for i, a in enumerate(self.vocab)}

    def tokens(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))[:, : self.max_text_len]

    def texts(self, inst: Instance) -> InstanceTexts:
        return instance_texts(inst, self.vocab, self.vqa_candidates)


def encode_sample(sample: dict, spec: TaskSpec) -> dict:
    """One instance (+ image bytes) → student inputs and labels; runs in DataLoader workers."""
    inst: Instance = sample["instance"]
    out: dict = {"instance": inst, "pixels": image_tensor(sample["image"], spec.image_size), "labeled": True}
    texts = spec.texts(inst)
    out["teacher_texts"] = texts
    if spec.task == "vcr":
        # Q→A pairs then QA→R pairs (gold answer), scored by one head; the KD term uses the gold Q→A pair.
        out["text_ids"] = spec.tokens(texts.candidates + texts.rationale_candidates)
    else:
        out["text_ids"] = spec.tokens([inst.student_text()])
    if spec.task == "vqa":
        out["target"] = soft_vqa_target(inst.human_answers or [inst.answer], spec.vocab_index)
    elif spec.task == "snli_ve":
        out["target"] = torch.tensor(inst.label)
    elif spec.task == "vcr":
        out["target"] = torch.tensor([inst.label, inst.rationale_label])
    return out


def encode_unlabeled(image_id: str, data: bytes, spec: TaskSpec) -> dict:
    """An image without a label (KD term only). Its text row is all padding, which the student and the loss
    read as "no text": only image tokens are distilled (§5: w = 1 when the instance has no text)."""
    width = spec.tokens([""]).shape[1]
    return {
        "image_id": image_id,
        "pixels": image_tensor(data, spec.image_size),
        "text_ids": torch.zeros(1, width, dtype=torch.long),
    }


@dataclass
class Batch:
    instances: list[Instance]
    pixels: torch.Tensor  # [B,3,H,W]
    text_ids: torch.Tensor  # [B,L] (vqa, snli_ve) or [B,8,L] (vcr: 4 Q→A then 4 QA→R)
    target: torch.Tensor
    teacher_texts: list[InstanceTexts]
    unlabeled_ids: list[str] = field(default_factory=list)
    unlabeled_pixels: torch.Tensor | None = None
    unlabeled_text_ids: torch.Tensor | None = None

    @property
    def image_ids(self) -> list[str]:
        return [i.image_id for i in self.instances]


def collate(samples: list[dict]) -> Batch:
    return Batch(
        instances=[s["instance"] for s in samples],
        pixels=torch.stack([s["pixels"] for s in samples]),
        text_ids=torch.stack(
            [s["text_ids"] if s["text_ids"].shape[0] > 1 else s["text_ids"][0] for s in samples]
        ),
        target=torch.stack([s["target"] for s in samples]),
        teacher_texts=[s["teacher_texts"] for s in samples],
    )


class _Encoded(IterableDataset):
    def __init__(self, pipeline, spec: TaskSpec):
        self.pipeline, self.spec = pipeline, spec

    def __iter__(self) -> Iterator[dict]:
        for sample in self.pipeline:
            yield encode_sample(sample, self.spec)


def train_loader(
    ds: PreparedDataset,
    keys: Sequence[str],
    spec: TaskSpec,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    shuffle_buffer: int = 2000,
) -> Iterator[Batch]:
    """Endless shuffled batches of the labelled training instances ``keys`` (DDP ranks and workers each stream
    their own shards)."""
    wanted = frozenset(keys)
    pipe = instance_pipeline(
        ds, training=True, seed=seed, shuffle_buffer=shuffle_buffer, select=lambda i: i.key in wanted
    )
    loader = DataLoader(
        _Encoded(pipe, spec),
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


def eval_batches(
    ds: PreparedDataset, keys: Sequence[str], spec: TaskSpec, batch_size: int
) -> Iterator[Batch]:
    """Every instance in ``keys`` exactly once, in shard order."""
    wanted = frozenset(keys)
    pipe = instance_pipeline(ds, training=False, select=lambda i: i.key in wanted)
    it = (encode_sample(s, spec) for s in pipe)
    while chunk := list(itertools.islice(it, batch_size)):
        yield collate(chunk)


def unlabeled_batches(
    sources: Sequence[tuple[PreparedDataset, Sequence[str]]], spec: TaskSpec, batch_size: int, seed: int
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of unlabeled images (ids, pixels, empty-text ids) for the KD-only term."""
    pool = [(ds, i) for ds, ids in sources for i in ids]
    if not pool:
        return
    rng = np.random.default_rng(seed)
    for epoch in itertools.count():
        order = rng.permutation(len(pool))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            items = [
                encode_unlabeled(pool[j][1], pool[j][0].image_bytes(pool[j][1]), spec)
                for j in order[start : start + batch_size]
            ]
            yield (
                [s["image_id"] for s in items],
                torch.stack([s["pixels"] for s in items]),
                torch.cat([s["text_ids"] for s in items]),
            )
        if (
            epoch > 10_000
        ):  # pragma: no cover - a guard against a silent infinite loop on an empty permutation
            return


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
