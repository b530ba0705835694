"""Typed parameters for every stage, loaded once from params.yaml.

Each section of params.yaml maps to one dataclass below. Loading validates the whole file: an unknown key,
a missing section or a value of the wrong type fails with the dotted key name and what is allowed, so a
typo never silently falls back to a default. Command-line overrides use the same dotted names
(``student.width=192``), which is also what ``dvc exp run -S`` writes into params.yaml.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .conditions import Condition
from .names import METHODS, RELEVANCE_SOURCES, TASK_SPLITS, TASKS


class ConfigError(ValueError):
    """A parameter file or override is invalid; the message names the file and the dotted key. ``key`` is the
    dotted key at fault, so a value that came from ``--set`` is blamed on that override, not on the file."""

    def __init__(self, message: str, key: str | None = None, sourced: bool = True):
        super().__init__(message)
        self.key, self.sourced = key, sourced


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or ``taskset``'s share), not the
    machine's count. Every automatic setting (threads, workers) resolves against it."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _invalid(key: str, what: str, at: str | None = None) -> ConfigError:
    """A range error from a ``validate`` method; ``_build`` prefixes where the value came from. ``at``: the
    entry below ``key`` that is wrong, when it is one, so the blame goes to whatever set that entry."""
    return ConfigError(f"key '{key}': {what}", key=at or key, sourced=False)


def _at_least(section: str, obj: Any, keys: tuple[str, ...], low: int, what: str = "") -> None:
    for key in keys:
        value = getattr(obj, key)
        if value < low:
            raise _invalid(f"{section}.{key}", f"must be at least {low}{what}, got {value}")


def _positive_finite(section: str, obj: Any, keys: tuple[str, ...], allow_zero: bool = False) -> None:
    """NaN passes every comparison, so finiteness is checked first (``lr=.nan`` trained NaN weights)."""
    for key in keys:
        value = getattr(obj, key)
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise _invalid(f"{section}.{key}", f"must be a finite number {bound}, got {value}")


def _fraction(key: str, value: float, closed: bool = True) -> None:
    """A fraction in (0, 1] (``closed``) or (0, 1)."""
    if not (0.0 < value < 1.0 or (closed and value == 1.0)):
        raise _invalid(key, f"must be in (0, {'1]' if closed else '1)'}, got {value}")


@dataclass
class SyntheticParams:
    seed: int = 0
    image_size: int = 64
    domains: list[str] = field(default_factory=lambda: ["plain", "textured", "outline"])
    # Scenes per split; every scene yields one instance per task, so instances = scenes per task.
    scenes: dict[str, int] = field(default_factory=lambda: {"train": 3000, "val": 300, "test": 600})
    caption_scenes: int = 12000
    captions_per_scene: int = 2
    min_objects: int = 1
    max_objects: int = 3
    # Fraction of VQA human answers replaced by a plausible wrong answer, so the VQA score is not all-or-nothing.
    vqa_answer_noise: float = 0.1

    def validate(self) -> None:
        _at_least("data.synthetic", self, ("image_size", "captions_per_scene", "min_objects"), 1)
        _at_least("data.synthetic", self, ("caption_scenes", "seed"), 0)
        if self.max_objects < self.min_objects:
            raise _invalid(
                "data.synthetic.max_objects",
                f"must be at least min_objects={self.min_objects}, got {self.max_objects}",
            )
        for split, n in self.scenes.items():
            if split not in TASK_SPLITS:  # a misspelt split would be ignored, and the real one fail later
                raise _invalid(
                    f"data.synthetic.scenes.{split}", f"unknown split (allowed: {', '.join(TASK_SPLITS)})"
                )
            if n < 0:
                raise _invalid(f"data.synthetic.scenes.{split}", f"must be at least 0, got {n}")
        if not 0.0 <= self.vqa_answer_noise <= 1.0:
            raise _invalid(
                "data.synthetic.vqa_answer_noise", f"must be in [0, 1], got {self.vqa_answer_noise}"
            )


@dataclass
class DataParams:
    source: Literal["synthetic", "vqa", "snli_ve", "vcr"] = "synthetic"  # names.DATA_SOURCES
    root: str = ""
    out: str = "data/shards"
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    shard_size: int = 1000
    image_shard_size: int = 1000
    on_error: Literal["fail", "skip"] = "fail"
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)

    def validate(self) -> None:
        _at_least("data", self, ("shard_size", "image_shard_size"), 1)


@dataclass
class TeacherPretrainParams:
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    # torch threads of the pretraining (0: torch's default, every core). CPU results differ in the last bits
    # between thread counts, so a pinned count gives the same weights on every machine of one instruction set.
    threads: int = 2
    eval_captions: int = 32

    def validate(self) -> None:
        _at_least("teacher.pretrain", self, ("steps", "batch_size", "eval_captions"), 1)
        _at_least("teacher.pretrain", self, ("warmup", "threads", "seed"), 0)
        _positive_finite("teacher.pretrain", self, ("lr",))
        _positive_finite("teacher.pretrain", self, ("weight_decay",), allow_zero=True)


@dataclass
class TeacherParams:
    # An open_clip model name, or a path to an open_clip model-config JSON (the embedded default ships one).
    model: str = "pipeline/model_configs/clip-td-tiny.json"
    # An open_clip pretrained tag, a local checkpoint path, or "" for random init.
    pretrained: str = "artifacts/teacher/teacher.pt"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    pretrain: TeacherPretrainParams = field(default_factory=TeacherPretrainParams)


@dataclass
class CacheParams:
    store: str = "artifacts/cache/teacher.zarr"
    dtype: Literal["float16", "int8"] = "float16"
    compressor: Literal["zstd", "lz4", "none"] = "zstd"
    clevel: int = 3
    # Rows per work unit: a unit writes whole Zarr shards that no other unit touches, and a kill loses at most
    # the unit in flight.
    image_rows_per_unit: int = 512
    text_rows_per_unit: int = 4096
    target_chunk_bytes: int = 1 << 20
    # Image shards hold the fewest rows dividing image_rows_per_unit that reach this many bytes (of the largest
    # image array's rows), at most a unit. A unit writes each shard behind the teacher's next batches, so only
    # its last batch's shards are written after its last forward: with a GPU teacher, use units of many
    # shards. The embedded tiny teacher's rows are small, so its shards are whole units.
    image_shard_bytes: int = 16 << 20
    # Text arrays get smaller inner chunks: training reads a batch's texts a few rows at a time, and no
    # instance order makes those reads local (a question text is shared by images all over the store), so
    # every read decodes a whole chunk for one text (bench_read: amplification by array).
    text_chunk_bytes: int = 1 << 15
    batch_size: int = 128
    # Decode worker processes per unit. -1: automatic, i.e. 0 when the teacher runs on the CPU (images decode on a
    # thread beside the model, whose torch threads already fill the cores; a process would only contend)
    # and min(4, cores - 1) when it runs on a GPU, where decoding is what keeps the device waiting.
    num_workers: int = -1
    # Threads that compress and write an image unit's shards behind the teacher's forward. -1: automatic,
    # min(4, cores // 4) and at least 1 (a CPU teacher already fills a small machine's cores; a GPU teacher
    # needs several to keep up). Speed only: the store is the same for any value.
    write_threads: int = -1
    views: int = 0
    # Extra teacher token sources stored for relevance scoring (docs/method.md §3): "value" (MaskCLIP),
    # "intermediate".
    relevance_tokens: list[str] = field(default_factory=list)
    scheduler: str = "local"  # "local" (LocalCluster), "sync" (in-process), or a dask scheduler address
    n_workers: int = 1
    on_error: Literal["fail", "skip"] = "fail"

    def validate(self) -> None:
        _at_least(
            "cache", self,
            ("image_rows_per_unit", "text_rows_per_unit", "target_chunk_bytes", "image_shard_bytes",
             "text_chunk_bytes", "batch_size", "n_workers"),
            1,
        )  # fmt: skip
        _at_least("cache", self, ("views",), 0)
        # Blosc's levels (numcodecs.Blosc: 0 stores uncompressed, 9 is the most); the codec takes any int and
        # fails only when the first shard is written, after the teacher has run.
        if self.compressor != "none" and not 0 <= self.clevel <= 9:
            raise _invalid("cache.clevel", f"blosc {self.compressor} levels are 0..9, got {self.clevel}")
        if self.write_threads == 0 or self.write_threads < -1:
            raise _invalid("cache.write_threads", f"-1 (automatic) or at least 1, got {self.write_threads}")
        if self.num_workers < -1:
            raise _invalid(
                "cache.num_workers",
                "-1 (automatic), 0 (decode in-process) or a number of worker processes, "
                f"got {self.num_workers}",
            )
        bad = sorted(set(self.relevance_tokens) - set(RELEVANCE_SOURCES))
        if bad:  # else the stage failed with a traceback once it had taken the store's lock
            raise _invalid(
                "cache.relevance_tokens", f"unknown source(s) {bad}; allowed {list(RELEVANCE_SOURCES)}"
            )


@dataclass
class StudentPretrainParams:
    # ITM + MLM on caption pairs (student/pretrain.py). The teacher saw every caption of the corpus; the student
    # gets `pairs` of them, so the teacher still knows more, as CLIP does against a VL-pretrained student.
    # 1,000: the FiLM student's step costs ~5x the ViLT one's; held-out ITM was 0.87 after 1,000 steps
    # (the ViLT student's after 1,500), and `make repro` has 30 minutes.
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    pairs: int = 6000  # 0 = every caption pair
    seed: int = 0
    threads: int = 2  # as teacher.pretrain.threads: pinned for the same bits on every machine; 0 = every core

    def validate(self) -> None:
        _at_least("student.pretrain", self, ("steps", "batch_size", "warmup"), 1)
        # Seeds < 0 failed in torch/numpy with a message naming no key.
        _at_least("student.pretrain", self, ("pairs", "seed", "threads"), 0)
        _positive_finite("student.pretrain", self, ("lr",))
        _positive_finite("student.pretrain", self, ("weight_decay",), allow_zero=True)


@dataclass
class StudentParams:
    # Sized for the 30-minute embedded `make repro` on 2 CPU cores; widen for real data.
    # "film" (a text-conditioned CNN) or "vilt" (a single-stream transformer), or any registered student.
    # film: the ViLT student learns neither SNLI-VE nor VCR of the embedded world from labels alone, the
    # FiLM one learns both (docs/training.md, "Which student"). layers = FiLM blocks for film.
    arch: str = "film"
    width: int = 64
    layers: int = 3
    heads: int = 2
    mlp_ratio: float = 4.0
    # film: image tokens on an image_size / patch_size grid (8 x 8: the teacher's grid, so tokens pair 1:1).
    patch_size: int = 8
    # "patch": ViLT's linear patch embedding. "conv": a small strided-conv stem ending on the same patch grid
    # (Xiao et al. 2021, "Early convolutions help transformers see better"): a from-scratch student then
    # learns to use the image in far fewer steps.
    stem: Literal["patch", "conv"] = "conv"
    image_size: int = 64
    max_text_len: int = 32
    # 0: every FiLM record (docs/training.md) is without dropout; a first try at 0.1 learned SNLI-VE more
    # slowly (not kept as a record). The ViLT student was run at 0.1.
    dropout: float = 0.0
    # "pretrained": every run fine-tunes the backbone `pretrained` points at (the pretrain_student stage's
    # output; CLIP-TD's students were pretrained VL models); "scratch": random weights.
    init: Literal["scratch", "pretrained"] = "pretrained"
    pretrained: str = "artifacts/student_pretrained/student.pt"
    pretrain: StudentPretrainParams = field(default_factory=StudentPretrainParams)

    def validate(self) -> None:
        _at_least(
            "student", self, ("width", "layers", "heads", "patch_size", "image_size", "max_text_len"), 1
        )
        if self.width % self.heads:
            raise _invalid("student.heads", f"must divide student.width={self.width}, got {self.heads}")
        _positive_finite("student", self, ("mlp_ratio",))
        if not 0.0 <= self.dropout < 1.0:
            raise _invalid("student.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class TrainParams:
    # 600 steps on the full training split: the FiLM student uses the image by then on every task
    # (docs/training.md, "Which student"), and 27 runs of it fit `make repro`'s 30 minutes.
    steps: int = 600
    batch_size: int = 32
    # Per-task batch sizes that replace batch_size: a VCR instance is 8 student sequences (4 Q→A + 4 QA→R).
    task_batch_size: dict[str, int] = field(default_factory=lambda: {"vcr": 4})
    # 1e-3: the baseline's best of 5e-4 / 1e-3 / 2e-3 on VQA and SNLI-VE validation; clip_td showed no
    # consistent direction (one seed; benchmarks/results/tuning.jsonl tag lr-v2, docs/tuning.md).
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 10
    seed: int = 0
    num_workers: int = 0
    eval_every: int = 200
    checkpoint_every: int = 200
    # 1: the embedded student is fastest on one torch thread beside the prefetch thread (14.3 s vs 17.8 s for
    # 200 steps on 2 cores); 0 = torch's default (all cores), for real students.
    threads: int = 1
    # A non-finite loss term or gradient norm: "fail" raises naming the term; "skip" drops that optimizer step,
    # counts it in train.json and stops once more than 10% of train.steps were skipped.
    on_nonfinite: Literal["fail", "skip"] = "fail"
    # Where the student (and an online teacher) run: "auto" = the first CUDA device when there is one, else
    # the CPU; or "cpu", "cuda", "cuda:N". Cached targets are read on the CPU and moved with the batch.
    device: str = "auto"
    # Epoch order of the training instances. "random": a permutation. "chunked": instances grouped by the
    # teacher-cache inner chunk their image's targets sit in, groups in random order, instances shuffled
    # within windows of ``order_window`` groups: a batch then needs few chunks, so a store larger than the
    # reader's chunk LRU (``target_cache_mb``) is decompressed about once per epoch instead of once per
    # instance (benchmarks/bench_read.py). Every method of a run set sees the same order for a seed.
    order: Literal["random", "chunked"] = "random"
    order_window: int = 8
    # The training reader's LRU of decoded inner chunks, in MiB (0 turns it off).
    target_cache_mb: int = 256
    # "bf16": the student's forward runs under bfloat16 autocast with its convolutions in channels_last order
    # (weights, optimizer and every loss stay float32): faster where the CPU computes bfloat16 natively (AMX or
    # AVX512-BF16), maybe slower where it is emulated (docs/training.md). Scores move by bfloat16's rounding,
    # so runs are compared within one precision.
    precision: Literal["fp32", "bf16"] = "fp32"
    # true: the student's image trunk (the film student's stem and FiLM blocks, whose shapes the batch size
    # fixes) goes through torch.compile while it trains, its convolutions in channels_last order as under bf16;
    # evaluation runs it eagerly. Each new batch shape costs a compile (seconds to a minute) against a few
    # milliseconds a step saved (benchmarks/bench_step_layout.py), so it pays on long runs only; a student
    # without an image trunk is refused.
    compile: bool = False

    def validate(self) -> None:
        # steps=0 or -1 used to "train" nothing, export no student and exit 0.
        _at_least("train", self, ("steps", "batch_size", "eval_every", "checkpoint_every"), 1)
        _at_least("train", self, ("warmup", "num_workers", "threads", "seed"), 0)
        for task, size in self.task_batch_size.items():
            if task not in TASKS:
                raise _invalid(
                    "train.task_batch_size",
                    f"unknown task {task!r} (allowed: {', '.join(TASKS)})",
                    at=f"train.task_batch_size.{task}",
                )
            if size < 1:
                raise _invalid(f"train.task_batch_size.{task}", f"must be at least 1, got {size}")
        _positive_finite("train", self, ("lr",))
        _positive_finite("train", self, ("weight_decay",), allow_zero=True)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise _invalid("train.device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.order_window < 1:
            raise _invalid("train.order_window", f"expected a number of chunks >= 1, got {self.order_window}")
        if self.target_cache_mb < 0:
            raise _invalid("train.target_cache_mb", f"expected MiB >= 0, got {self.target_cache_mb}")


@dataclass
class DistillParams:
    method: Literal[  # names.METHODS
        "baseline",
        "blind",
        "naive_kd",
        "pooled_fd",
        "clip_td",
        "clip_td_unlabeled",
        "clip_td_transductive",
        "clip_td_no_select",
        "clip_td_no_weight",
        "clip_td_const_lambda",
    ] = "clip_td"
    rho_v: float = 0.25
    rho_t: float = 0.5
    selection: Literal["topk", "mass"] = "topk"
    mass_p: float = 0.5
    mass_tau: float = 0.1
    relevance_source: Literal["last", "value", "intermediate"] = "last"  # "last" + names.RELEVANCE_SOURCES
    distance: Literal["cosine", "l1", "mse"] = "cosine"
    balance: Literal["adaptive", "constant"] = "adaptive"
    # 0.3 -> 0.03 rather than the first reconstruction's 1 -> 0.1: with alpha0 = 1 the KD term took as much of the
    # loss as the task; what this rests on, and that it is still to be re-measured alone, is in docs/tuning.md.
    alpha0: float = 0.3
    alpha_min: float = 0.03
    lambda_const: float = 1.0
    weight_clip: list[float] = field(default_factory=lambda: [0.1, 3.0])
    vqa_candidates: int = 4

    def validate(self) -> None:
        for key in ("rho_v", "rho_t", "mass_p"):
            _fraction(f"distill.{key}", getattr(self, key))
        _positive_finite("distill", self, ("mass_tau",))
        _positive_finite("distill", self, ("alpha0", "alpha_min", "lambda_const"), allow_zero=True)
        wc = self.weight_clip
        if len(wc) != 2 or not all(map(math.isfinite, wc)) or not 0 <= wc[0] <= wc[1]:
            raise _invalid("distill.weight_clip", f"expected [low, high] with 0 <= low <= high, got {wc}")
        if self.vqa_candidates < 2:
            raise _invalid(
                "distill.vqa_candidates", f"need at least 2 (gold + a distractor), got {self.vqa_candidates}"
            )


# protocol.splits.val: no val folder; validation is a seeded slice (protocol.val_fraction) of the train role.
VAL_SLICE = "slice"


@dataclass
class SplitRoles:
    """Which prepared folder under the data root plays each role. '' = the standard one of the data's source
    (pipeline/splits.py: VQA v2 train2014 / slice / val2014, SNLI-VE train / dev / test, VCR train / slice /
    val, synthetic train / val / test)."""

    train: str = ""
    val: str = ""
    test: str = ""

    def validate(self) -> None:
        for role in ("train", "val", "test"):
            name = getattr(self, role)
            if name.startswith(".") or any(c in name for c in "/\\\0"):
                raise _invalid(
                    f"protocol.splits.{role}",
                    f"must be a plain folder name under the data root, got {name!r}",
                )
            if name == VAL_SLICE and role != "val":
                raise _invalid(f"protocol.splits.{role}", f"'{VAL_SLICE}' is only for val (a slice of train)")
        if self.train and self.train in (self.val, self.test):
            raise _invalid("protocol.splits", f"train and another role name the same folder {self.train!r}")
        if self.test and self.test == self.val:
            raise _invalid("protocol.splits", f"val and test name the same folder {self.test!r}")


@dataclass
class ProtocolParams:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    # Two low-shot fractions so the low-shot plot has a slope; the floor (blind) beside every result. naive_kd and
    # the other comparisons are the study's (study/), which the 30-minute default cannot afford.
    conditions: list[str] = field(default_factory=lambda: ["full"])
    methods: list[str] = field(default_factory=lambda: ["blind", "baseline", "clip_td"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shift_target_domain: str = "outline"
    shift_key: str = "domain"
    val_fraction: float = 0.1
    splits: SplitRoles = field(default_factory=SplitRoles)

    def validate(self) -> None:
        for key in ("tasks", "conditions", "methods", "seeds"):
            if not getattr(self, key):  # a protocol of no runs: every stage after it would do nothing
                raise _invalid(f"protocol.{key}", "must list at least one")
        for t in self.tasks:
            if t not in TASKS:
                raise _invalid("protocol.tasks", f"unknown task {t!r} (allowed: {', '.join(TASKS)})")
        for c in self.conditions:
            try:
                Condition.parse(c)
            except ValueError as e:
                raise _invalid("protocol.conditions", str(e)) from None
        # Checked here, else a misspelt method or a negative seed surfaced in a later stage naming no key.
        for m in self.methods:
            if m not in METHODS:
                raise _invalid("protocol.methods", f"unknown method {m!r} (allowed: {', '.join(METHODS)})")
        for s in self.seeds:
            if s < 0:
                raise _invalid("protocol.seeds", f"a seed must be an integer >= 0, got {s}")
        for key, values in (("methods", self.methods), ("seeds", self.seeds)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:  # the same run twice: it would count twice in every mean
                raise _invalid(f"protocol.{key}", f"listed more than once: {repeated}")
        # Held out of the training pool when there is no val split: all of it would leave nothing to train on.
        _fraction("protocol.val_fraction", self.val_fraction, closed=False)


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    cache: CacheParams = field(default_factory=CacheParams)
    student: StudentParams = field(default_factory=StudentParams)
    train: TrainParams = field(default_factory=TrainParams)
    distill: DistillParams = field(default_factory=DistillParams)
    protocol: ProtocolParams = field(default_factory=ProtocolParams)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


class _Source:
    """Where each key's value came from: the file, or the ``--set`` override that replaced it (or a section
    above it), or one that added an entry below it, so an error is blamed on what the user actually typed."""

    def __init__(self, file: str, overrides: dict[str, str] | None = None, file_raw: dict | None = None):
        self.file, self.overrides, self.file_raw = file, overrides or {}, file_raw or {}

    def _file_has(self, parts: list[str]) -> bool:
        node: Any = self.file_raw
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def __call__(self, key: str) -> str:
        parts = re.sub(r"\[\d+\]", "", key).split(".")
        for n in range(len(parts), 0, -1):
            text = self.overrides.get(".".join(parts[:n]))
            if text is not None:
                return f"--set {text}"
        # Below the failing key: ``--set trian.steps=3`` fails as the unknown key 'trian', which only the
        # override brought in. A key the file holds is the file's, whatever an override added beneath it.
        if not self._file_has(parts):
            below = ".".join(parts) + "."
            for dotted, text in self.overrides.items():
                if dotted.startswith(below):
                    return f"--set {text}"
        return self.file


def _coerce(value: Any, tp: Any, key: str, source: _Source) -> Any:
    def bad(what: str) -> ConfigError:
        return ConfigError(
            f"{source(key)}: key '{key}': {what} (expected {_describe(tp)}, got {value!r})", key
        )

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("not a mapping")
        return _build(tp, value, key, source)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad("value not allowed")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise bad("no alternative matches")
    if origin is list:
        if not isinstance(value, list):
            raise bad("not a list")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("not a mapping")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise bad("must be null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("not a boolean")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("not an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-3 (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                raise bad("not a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("not a string")
        return value
    raise bad(f"unsupported type {tp}")


def _build(cls: type, raw: dict, prefix: str, source: _Source) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(
                f"{source(where)}: unknown key '{where}' (allowed here: {', '.join(sorted(names))})", where
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(
                raw[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name, source
            )
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            if e.sourced:
                raise
            raise ConfigError(f"{source(e.key or prefix)}: {e}", e.key) from None
    return obj


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected dotted.key=value")
    key, val = text.split("=", 1)
    if not key.strip() or "" in key.strip().split("."):
        raise ConfigError(f"--set {text}: expected dotted.key=value (empty key)")
    try:
        value = yaml.safe_load(val) if val.strip() else ""
    except yaml.YAMLError as e:
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"--set {text}: value is not valid YAML ({reason})") from None
    return key.strip().split("."), value


def _default_at(path: list[str]) -> Any:
    """The value the dotted ``path`` has in ``Params()``, or None where no field is there."""
    node: Any = Params()
    for part in path:
        if dataclasses.is_dataclass(node):
            node = getattr(node, part) if part in {f.name for f in dataclasses.fields(node)} else None
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set dotted keys in a raw params mapping; values are parsed as YAML (``3``, ``0.1``, ``[a, b]``). A dotted
    key changes only what it names: below a key the mapping lacks, it goes into that key's default value."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            if part not in node:
                # A dict-valued key (train.task_batch_size) starts from its default entries, else
                # task_batch_size.snli_ve=16 would drop vcr's 4 and VCR would silently train at batch_size.
                # A section may start empty: the keys it lacks take their defaults when it is built.
                default = _default_at(path[: i + 1])
                node[part] = copy.deepcopy(default) if isinstance(default, dict) else {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
        node[path[-1]] = value
    return raw


def load_params(
    path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()
) -> Params:
    """Load and validate params.yaml (or defaults when path is None) with dotted overrides applied."""
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: parameter file not found")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
            raise ConfigError(
                f"{p}: cannot read the parameter file ({getattr(e, 'strerror', None) or e})"
            ) from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    file_raw = copy.deepcopy(raw)
    raw = apply_overrides(raw, overrides)
    source = _Source(str(path) if path else "<defaults>", {
        ".".join(_parse_override(text)[0]): text for text in overrides
    }, file_raw)  # fmt: skip
    return _build(Params, raw, "", source)


def section(params: Params, name: str) -> Any:
    return getattr(params, name)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def dump_defaults() -> str:
    """params.yaml content holding every default (used to write and to check the shipped file)."""

    class _Dumper(yaml.SafeDumper):
        pass

    # Sections as blocks (one key a line, easy to diff), short scalar lists inline.
    _Dumper.add_representer(
        list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
    )
    return yaml.dump(to_dict(Params()), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
