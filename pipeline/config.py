"""Typed parameters for every stage, loaded once from params.yaml.

Each section of params.yaml maps to one dataclass below. Loading validates the whole file: an unknown key,
a missing section or a value of the wrong type fails with the dotted key name and what is allowed, so a
typo never silently falls back to a default. Command-line overrides use the same dotted names
(``student.width=192``), which is also what ``dvc exp run -S`` writes into params.yaml.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

TASKS = ("vqa", "snli_ve", "vcr")


class ConfigError(ValueError):
    """A parameter file or override is invalid; the message names the file and the dotted key."""


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


@dataclass
class DataParams:
    source: Literal["synthetic", "vqa", "snli_ve", "vcr"] = "synthetic"
    root: str = ""
    out: str = "data/shards"
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    shard_size: int = 1000
    image_shard_size: int = 1000
    on_error: Literal["fail", "skip"] = "fail"
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)


@dataclass
class TeacherPretrainParams:
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    threads: int = 0  # 0: torch's default (all cores)
    eval_captions: int = 32


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
    # Extra teacher token sources stored for relevance scoring (method §3): "value" (MaskCLIP), "intermediate".
    relevance_tokens: list[str] = field(default_factory=list)
    scheduler: str = "local"  # "local" (LocalCluster), "sync" (in-process), or a dask scheduler address
    n_workers: int = 1
    on_error: Literal["fail", "skip"] = "fail"

    def validate(self) -> None:
        for key in ("image_rows_per_unit", "text_rows_per_unit", "target_chunk_bytes", "image_shard_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"key 'cache.{key}': must be at least 1, got {getattr(self, key)}")
        if self.write_threads == 0 or self.write_threads < -1:
            raise ConfigError(
                f"key 'cache.write_threads': -1 (automatic) or at least 1, got {self.write_threads}"
            )
        if self.num_workers < -1:
            raise ConfigError(
                f"key 'cache.num_workers': -1 (automatic), 0 (decode in-process) or a number of worker "
                f"processes, got {self.num_workers}"
            )


@dataclass
class StudentParams:
    # Sized for the 30-minute embedded `make repro` on 2 CPU cores; widen for real data.
    arch: str = "vilt"
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 16
    # "patch": ViLT's linear patch embedding. "conv": a small strided-conv stem ending on the same patch grid
    # (Xiao et al. 2021, "Early convolutions help transformers see better"): a from-scratch student then
    # learns to use the image in far fewer steps.
    stem: Literal["patch", "conv"] = "conv"
    image_size: int = 64
    max_text_len: int = 32
    dropout: float = 0.1


@dataclass
class TrainParams:
    # 200 steps: with the conv stem the baseline starts to use the image; the best validation score was at
    # step 200 or 300 in the tuning sweep (benchmarks/results/tuning.jsonl), and 300 does not fit 30 minutes.
    steps: int = 200
    batch_size: int = 32
    # Per-task batch sizes that replace batch_size: a VCR instance is 8 student sequences (4 Q→A + 4 QA→R).
    task_batch_size: dict[str, int] = field(default_factory=lambda: {"vcr": 4})
    # 2e-3: with 200 steps the higher rate helped every KD arm on VQA low-shot validation (tuning.jsonl)
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 10
    seed: int = 0
    num_workers: int = 0
    eval_every: int = 100
    checkpoint_every: int = 100
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

    def validate(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"key 'train.device': expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.order_window < 1:
            raise ConfigError(
                f"key 'train.order_window': expected a number of chunks >= 1, got {self.order_window}"
            )
        if self.target_cache_mb < 0:
            raise ConfigError(f"key 'train.target_cache_mb': expected MiB >= 0, got {self.target_cache_mb}")


@dataclass
class DistillParams:
    method: Literal[
        "baseline",
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
    relevance_source: Literal["last", "value", "intermediate"] = "last"
    distance: Literal["cosine", "l1", "mse"] = "cosine"
    balance: Literal["adaptive", "constant"] = "adaptive"
    # alpha0 = 1 let the KD term swamp the task in 100-300 steps (VQA low-shot val 0.26 vs baseline 0.45);
    # 0.3 -> 0.03 was the first setting where KD helped on validation (README, "How the defaults were chosen").
    alpha0: float = 0.3
    alpha_min: float = 0.03
    lambda_const: float = 1.0
    weight_clip: list[float] = field(default_factory=lambda: [0.1, 3.0])
    vqa_candidates: int = 4

    def validate(self) -> None:
        for key in ("rho_v", "rho_t", "mass_p"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"key 'distill.{key}': must be in (0, 1], got {getattr(self, key)}")
        if len(self.weight_clip) != 2 or not 0 <= self.weight_clip[0] <= self.weight_clip[1]:
            raise ConfigError(
                f"key 'distill.weight_clip': expected [low, high] with 0 <= low <= high, got {self.weight_clip}"
            )
        if self.vqa_candidates < 2:
            raise ConfigError(
                f"key 'distill.vqa_candidates': need at least 2 (gold + a distractor), got {self.vqa_candidates}"
            )


@dataclass
class ProtocolParams:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    conditions: list[str] = field(default_factory=lambda: ["lowshot-0.1", "shift"])
    methods: list[str] = field(default_factory=lambda: ["baseline", "naive_kd", "clip_td"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shift_target_domain: str = "outline"
    shift_key: str = "domain"
    val_fraction: float = 0.1

    def validate(self) -> None:
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"key 'protocol.tasks': unknown task {t!r} (allowed: {', '.join(TASKS)})")
        from .protocol import Condition  # the one parser of condition names

        for c in self.conditions:
            try:
                Condition.parse(c)
            except ValueError as e:
                raise ConfigError(f"key 'protocol.conditions': {e}") from None


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


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}': {what} (expected {_describe(tp)}, got {value!r})")

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


def _build(cls: type, raw: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{source}: unknown key '{where}' (allowed here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(
                raw[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name, source
            )
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected dotted.key=value")
    key, val = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(val) if val.strip() else ""


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set dotted keys in a raw params mapping; values are parsed as YAML (``3``, ``0.1``, ``[a, b]``)."""
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return raw


def load_params(
    path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()
) -> Params:
    """Load and validate params.yaml (or defaults when path is None) with dotted overrides applied."""
    source = str(path) if path else "<defaults>"
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: parameter file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides)
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
