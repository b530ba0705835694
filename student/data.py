"""Streams training batches: instances from the shards, their images decoded, and the teacher targets.

CPU work that scales with the batch (image decode, tokenisation, label tensors) runs in DataLoader workers.
Teacher targets are read afterwards, in the main process, with one batched sorted read per batch: zarr's
event loop and forked workers can deadlock, so no worker ever touches the store. The same ``Batch`` can be
given targets from the cache (``CachedTargets``) or from a teacher run inside the loop (``OnlineTargets``);
both return identical dictionaries so the loss cannot tell them apart.

Views (method §2). When the store holds K augmented views per image, each training sample is shown in one of
them: the index is drawn in the worker (a hash of the stream seed, the sample's position and its key, so a
replayed stream draws the same views), the student's pixels are that view's crop + flip made by
``pipeline.cache.apply_view`` exactly as the teacher's were, and the index travels in ``Batch.views`` so the
targets are read for the same view.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from pipeline.cache import TeacherCache, apply_view, eval_view_pixels, view_params_for
from pipeline.data.errors import DataError
from pipeline.data.schema import Instance
from pipeline.data.shards import (
    INDEX_FILE,
    INFO_FILE,
    PreparedDataset,
    _read_tar_samples,
    decode_image,
    instance_pipeline,
    node_info,
    node_shards,
)
from pipeline.texts import InstanceTexts, instance_texts

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_prepared(path: str | Path) -> PreparedDataset:
    """A prepared split; a damaged dataset.json or image index is a DataError naming the file (the bare JSON
    error names no file, and a missing key only its name)."""
    path = Path(path)
    try:
        return PreparedDataset(path)
    except DataError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as e:
        for name in (INFO_FILE, INDEX_FILE):
            try:
                json.loads((path / name).read_text())
            except (ValueError, OSError) as bad:
                raise DataError(
                    path / name, "file", f"unreadable ({bad}); rerun python -m stages.prepare_data"
                ) from None
        raise DataError(
            path / INFO_FILE, "dataset", f"not a readable prepared split ({type(e).__name__}: {e})"
        ) from None


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
    data: bytes,
    size: int,
    view: tuple[float, float, float, float, bool] | None = None,
    resize_mode: str | None = "shortest",
) -> torch.Tensor:
    """Encoded bytes → normalised [3,size,size]. ``view`` = (x0, y0, x1, y1, flip) replays a cached teacher view;
    without one, a non-square image is first cut to the region the teacher's eval transform shows
    (``resize_mode``, docs/method.md §2): its centre square, the whole image, or a square padded with black."""
    img = decode_image(data)
    if view is not None:
        # The teacher's own crop + bicubic resize + flip (PIL), so the student sees the very pixels the teacher
        # saw (at the student's resolution); only the normalisation below is the student's.
        img = apply_view(img, view[:4], bool(view[4]), size)
    elif img.width != img.height:
        # Another region would show the student other content than the teacher's tokens cover, while §2 maps
        # the teacher's grid onto the student's as one area (real images are rarely square).
        img = img.crop(eval_view_pixels(img.width, img.height, resize_mode))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
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
    blind: bool = False  # every image blank (the `blind` method): nothing to decode
    resize_mode: str = "shortest"  # the teacher's eval region of a non-square image (``image_tensor``)
    # VQA: each answer's type, which the candidates' distractors share (``pipeline.texts.vqa_answers``); the
    # store's (``pipeline.cache.vqa_answer_space``) when the run reads one. None: none known, every question's
    # distractors come from the whole vocabulary (an exported student's spec: it reads no candidates).
    answer_types: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.vocab_index = {a: i for i, a in enumerate(self.vocab)}

    def tokens(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))[:, : self.max_text_len]

    def texts(self, inst: Instance) -> InstanceTexts:
        return instance_texts(inst, self.vocab, self.vqa_candidates, self.answer_types)


@dataclass
class ViewTable:
    """Crop box and flip of each of the K views of every training image. Read once from the store (or made by
    extraction's rule when there is no store) and shipped to the DataLoader workers, which never touch zarr."""

    k: int
    rows: dict[str, int]  # image id -> row of boxes / flips
    boxes: np.ndarray  # [N, K, 4] float32, normalised (x0, y0, x1, y1)
    flips: np.ndarray  # [N, K] bool

    @classmethod
    def from_cache(cls, cache: TeacherCache, image_ids: Sequence[str]) -> ViewTable:
        vp = cache.view_params(image_ids)
        return cls(
            cache.views, {i: r for r, i in enumerate(image_ids)}, vp["boxes"].numpy(), vp["flip"].numpy()
        )

    @classmethod
    def from_rule(cls, ds: PreparedDataset, k: int, resize_mode: str | None = "shortest") -> ViewTable:
        """The views a store extracted with ``--views k`` by a teacher with this ``resize_mode`` would hold
        (``view_params_for``); reads only each image's header for its size."""
        from PIL import Image

        ids = ds.image_ids()
        boxes, flips = np.zeros((len(ids), k, 4), np.float32), np.zeros((len(ids), k), bool)
        for r, i in enumerate(ids):
            with Image.open(io.BytesIO(ds.image_bytes(i))) as img:
                boxes[r], flips[r] = view_params_for(ds.image_sha1(i), *img.size, k, resize_mode)
        return cls(k, {i: r for r, i in enumerate(ids)}, boxes, flips)

    def view(self, image_id: str, v: int) -> tuple[float, float, float, float, bool]:
        r = self.rows[image_id]
        return (*(float(c) for c in self.boxes[r, v]), bool(self.flips[r, v]))


def choose_view(seed: int, position: int, key: str, k: int) -> int:
    """The view sample number ``position`` of a seeded stream (instance ``key``) is shown in. A hash rather than
    an RNG so every worker process agrees without shared state and a resumed run replays the same views."""
    h = hashlib.sha1(f"{seed}:{position}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") % k


def student_texts(inst: Instance, spec: TaskSpec, texts: InstanceTexts | None = None) -> list[str]:
    """The texts the student reads for one instance (one row each); ``texts``: ``spec.texts(inst)`` if made."""
    if spec.task == "vcr":
        # Q→A pairs then QA→R pairs (gold answer), scored by one head; the KD term uses the gold Q→A pair.
        texts = texts if texts is not None else spec.texts(inst)
        return texts.candidates + texts.rationale_candidates
    return [inst.student_text()]


# --- compact student vocabulary ------------------------------------------------------------------------
def student_vocabulary(
    spec: TaskSpec, instances: Iterable[Instance], vocab_size: int | None = None, chunk: int = 2048
) -> torch.Tensor:
    """``student.model.text_vocabulary`` of every text the student reads for ``instances`` (texts only, never
    a label), tokenized and cut exactly as ``encode_sample`` does; ``vocab_size``: the tokenizer's (CLIP's)."""
    from student.model import CLIP_VOCAB_SIZE, text_vocabulary

    # Each distinct text once: templated texts repeat, and the tokenizer is the slow part (VCR: 8 per instance).
    texts = iter(sorted({t for inst in instances for t in student_texts(inst, spec)}))

    def chunks():
        while batch := list(itertools.islice(texts, chunk)):
            yield spec.tokens(batch)

    return text_vocabulary(chunks(), vocab_size or CLIP_VOCAB_SIZE)


def encode_sample(sample: dict, spec: TaskSpec, view: tuple[int, tuple] | None = None) -> dict:
    """One instance (+ image bytes) → student inputs and labels; runs in DataLoader workers. ``view`` =
    (index, (x0, y0, x1, y1, flip)) shows the image in that cached teacher view."""
    inst: Instance = sample["instance"]
    if spec.blind:  # 0 after normalisation: the dataset's mean colour everywhere, no image information
        pixels = torch.zeros(3, spec.image_size, spec.image_size)
    else:
        pixels = image_tensor(
            sample["image"], spec.image_size, view[1] if view is not None else None, spec.resize_mode
        )
    out: dict = {"instance": inst, "pixels": pixels, "labeled": True}
    if view is not None:
        out["view"] = view
    texts = spec.texts(inst)
    out["teacher_texts"] = texts
    out["text_ids"] = spec.tokens(student_texts(inst, spec, texts))
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
        "pixels": image_tensor(data, spec.image_size, resize_mode=spec.resize_mode),
        "text_ids": torch.zeros(1, width, dtype=torch.long),
    }


class ImageViews(NamedTuple):
    """The cached view each image of a batch was shown in: cached targets are read by ``index``, an online
    teacher recomputes the view from ``boxes`` and ``flip``."""

    index: torch.Tensor  # [B] long
    boxes: torch.Tensor  # [B,4] float32, normalised (x0, y0, x1, y1)
    flip: torch.Tensor  # [B] bool


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
    views: ImageViews | None = None  # None: every image in view 0 (no views cached, or evaluation)

    @property
    def image_ids(self) -> list[str]:
        return [i.image_id for i in self.instances]

    def to(self, device: torch.device) -> Batch:
        """The model inputs on ``device`` (instances, texts and views stay host-side: only the loss and the
        targets' weights read them, on the CPU)."""
        if self.pixels.device == torch.device(device):
            return self

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device, non_blocking=True) if t is not None else None

        return dataclasses.replace(
            self,
            pixels=move(self.pixels),
            text_ids=move(self.text_ids),
            target=move(self.target),
            unlabeled_pixels=move(self.unlabeled_pixels),
            unlabeled_text_ids=move(self.unlabeled_text_ids),
        )


def collate(samples: list[dict]) -> Batch:
    return Batch(
        instances=[s["instance"] for s in samples],
        pixels=torch.stack([s["pixels"] for s in samples]),
        text_ids=torch.stack(
            [s["text_ids"] if s["text_ids"].shape[0] > 1 else s["text_ids"][0] for s in samples]
        ),
        target=torch.stack([s["target"] for s in samples]),
        teacher_texts=[s["teacher_texts"] for s in samples],
        views=_collate_views(samples) if "view" in samples[0] else None,
    )


def _collate_views(samples: list[dict]) -> ImageViews:
    return ImageViews(
        index=torch.tensor([s["view"][0] for s in samples], dtype=torch.long),
        boxes=torch.tensor([s["view"][1][:4] for s in samples], dtype=torch.float32),
        flip=torch.tensor([s["view"][1][4] for s in samples], dtype=torch.bool),
    )


class _Encoded(IterableDataset):
    def __init__(self, pipeline, spec: TaskSpec, views: ViewTable | None = None, seed: int = 0):
        self.pipeline, self.spec, self.views, self.seed = pipeline, spec, views, seed

    def __iter__(self) -> Iterator[dict]:
        for position, sample in enumerate(self.pipeline):
            view = None
            if self.views is not None:
                key = sample["instance"].key
                v = choose_view(self.seed, position, key, self.views.k)
                view = (v, self.views.view(sample["instance"].image_id, v))
            yield encode_sample(sample, self.spec, view)


def epoch_order(rng: np.random.Generator, groups: np.ndarray | None, n: int, window: int = 8) -> np.ndarray:
    """One epoch's order of n instances. Without ``groups``: ``rng.permutation(n)``. With ``groups`` (an id
    per instance, e.g. the cache chunk of its image): the groups in random order, cut into windows of
    ``window`` groups, the instances of each window shuffled together; so any stretch of the epoch draws on
    at most ``window`` groups at a time, plus the next window's at a boundary."""
    if groups is None:
        return rng.permutation(n)
    uniq, inverse = np.unique(groups, return_inverse=True)
    place = np.empty(len(uniq), dtype=np.int64)
    place[rng.permutation(len(uniq))] = np.arange(len(uniq))
    return np.lexsort((rng.random(n), place[inverse] // window))


class _Selected(IterableDataset):
    """Endless seeded epochs over instances already in memory, each joined with its image bytes (read by
    byte offset). Each DDP rank takes every ``world``-th instance (its share padded to ⌈n / world⌉ by
    wrapping round, so every rank draws its instances equally often) and each DataLoader worker every
    ``workers``-th position of the rank's epoch order, so nothing is seen twice within a rank's epoch.
    ``group_of`` (image id -> group) makes the epochs chunk-local (``epoch_order``)."""

    def __init__(
        self,
        ds: PreparedDataset,
        instances: Sequence[Instance],
        seed: int,
        group_of: Mapping[str, int] | None = None,
        window: int = 8,
    ):
        rank, world = node_info()
        self.ds, self.seed, self.window = ds, seed, window
        ordered = sorted(instances, key=lambda i: i.key)
        if len(ordered) < world:
            raise ValueError(
                f"{ds.path}: rank {rank} of {world} got none of the {len(instances)} selected training instances"
            )
        # Every rank the same share, ⌈n / world⌉, wrapping round as DistributedSampler does: ranks step together,
        # so a rank with one instance fewer cycled its share faster and drew those instances more often.
        share = -(-len(ordered) // world)
        self.instances = [ordered[(rank + k * world) % len(ordered)] for k in range(share)]
        self.groups = None
        if group_of is not None:
            missing = sorted({i.image_id for i in self.instances} - group_of.keys())
            if missing:
                raise KeyError(f"{ds.path}: no order group for image {missing[0]!r} ({len(missing)} images)")
            self.groups = np.array([group_of[i.image_id] for i in self.instances], dtype=np.int64)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng(self.seed)
        if nw > len(self.instances):  # train_loader refuses it; a worker with no position would spin forever
            raise RuntimeError(
                f"{self.ds.path}: worker {wid} of {nw} has none of {len(self.instances)} instances"
            )
        while True:
            for j in epoch_order(rng, self.groups, len(self.instances), self.window)[wid::nw]:
                inst = self.instances[j]
                yield {"instance": inst, "image": self.ds.image_bytes(inst.image_id)}


def train_loader(
    ds: PreparedDataset,
    keys: Sequence[str],
    spec: TaskSpec,
    *,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    shuffle_buffer: int = 2000,
    views: ViewTable | None = None,
    instances: Sequence[Instance] | None = None,
    group_of: Mapping[str, int] | None = None,
    order_window: int = 8,
) -> Iterator[Batch]:
    """Endless shuffled batches of the labelled training instances ``keys``. With ``views``, every sample is
    shown in one of its cached views (``Batch.views``). With ``group_of`` (needs ``instances``), epochs are
    chunk-local: see ``epoch_order``.

    Given ``instances`` (the parsed Instance of every key, which the caller already holds from drawing the
    split) the batches come from memory in seeded epochs: a low-shot subset is a few percent of the shards, and
    streaming would read and parse every shard to keep that few percent (cProfile: 150 ms of a 200 ms step).
    Without them, each DDP rank and worker streams its own shards and a shuffle buffer mixes them."""
    wanted = frozenset(keys)
    if instances is not None:
        chosen = [i for i in instances if i.key in wanted]
        if len(chosen) != len(wanted):
            raise ValueError(f"{ds.path}: {len(wanted) - len(chosen)} selected keys have no instance")
        pipe = _Selected(ds, chosen, seed, group_of, order_window)
        if num_workers > len(pipe.instances):
            # A worker whose share of the epoch is empty yields nothing, and the DataLoader waited on it forever.
            raise ValueError(
                f"{ds.path}: train.num_workers={num_workers} exceeds this rank's {len(pipe.instances)} training "
                "instances (a low-shot subset this small needs fewer workers: set train.num_workers lower)"
            )
    else:
        if group_of is not None:
            raise ValueError("a chunk-local order (group_of) needs the instances in memory (instances=...)")
        if node_info()[1] > 1:
            _check_rank_has_instances(ds, wanted)
        pipe = instance_pipeline(
            ds, training=True, seed=seed, shuffle_buffer=shuffle_buffer, select=lambda i: i.key in wanted
        )
    loader = DataLoader(
        _Encoded(pipe, spec, views, seed),
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    return iter(loader)


def _check_rank_has_instances(ds: PreparedDataset, wanted: frozenset[str]) -> None:
    """A rank whose shards hold none of the selected instances would filter its resampled stream forever
    (e.g. a small low-shot subset over few large shards); say so instead of hanging."""
    for url in node_shards(ds):
        if any(Instance.from_json(s["json"]).key in wanted for s in _read_tar_samples(url)):
            return
    rank, world = node_info()
    raise ValueError(
        f"{ds.path}: rank {rank} of {world} streams shards holding none of the {len(wanted)} selected training "
        "instances; train on fewer ranks or prepare the data with a smaller data.shard_size"
    )


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
    """Endless shuffled batches of unlabeled images (ids, pixels, empty-text ids) for the KD-only term; a pool
    smaller than ``batch_size`` gives batches of the whole pool (only whole batches are drawn, so it gave
    none, and training stopped on a bare StopIteration)."""
    pool = [(ds, i) for ds, ids in sources for i in ids]
    if not pool:
        return
    batch_size = min(batch_size, len(pool))
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
