"""An exported student: load it (checked), read inputs as it was trained to, and score it on a set of instances
with the official metrics, per instance and per domain."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from pipeline.cache import RESIZE_MODES
from pipeline.conditions import Condition
from pipeline.config import DistillParams, StudentParams
from pipeline.data.shards import PreparedDataset
from pipeline.metrics import PRIMARY, aggregate, instance_scores
from pipeline.teacher import TeacherError
from student.checkpoint import load_state
from student.data import Batch, TaskSpec, eval_batches, load_tokenizer
from student.errors import CheckpointError
from student.losses import METHODS, method_config
from student.model import TaskHeads, create_student, images_for_texts

EVAL_BATCH = 128  # instances a scoring batch holds (validation and the evaluate stage)


class ExportError(RuntimeError):
    """student.pt is not a student exported by train_student (or does not load); names the file."""


def _run_record_problem(run: dict) -> str:
    """What is wrong with an export's ``run`` record ("" when nothing): each key as train_student writes it."""
    if not isinstance(run["task"], str) or run["task"] not in PRIMARY:
        return f"run.task = {run['task']!r} is none of {', '.join(PRIMARY)}"
    try:
        Condition.parse(run["condition"])
    except (TypeError, ValueError) as e:
        return f"run.condition = {run['condition']!r}: {e}"
    if not isinstance(run["method"], str) or run["method"] not in METHODS:
        return f"run.method = {run['method']!r} is none of {', '.join(METHODS)}"
    if not isinstance(run["seed"], int) or isinstance(run["seed"], bool) or run["seed"] < 0:
        return f"run.seed = {run['seed']!r} is not an integer >= 0"
    if not isinstance(run["data_root"], str):
        return f"run.data_root = {run['data_root']!r} is not a path"
    return ""


def load_student(path: Path) -> tuple[dict, torch.nn.Module, TaskHeads]:
    """The exported student, loaded with weights_only=True: (export dict, student, task head)."""
    try:
        exported = load_state(path, "exported student")
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    missing = [
        k
        for k in ("run", "student_params", "student", "heads", "vocab", "teacher_model")
        if k not in exported
    ]
    if missing:
        raise ExportError(f"{path}: not a student exported by train_student (no {', '.join(missing)})")
    if not isinstance(exported["teacher_model"], str):
        raise ExportError(f"{path}: teacher_model is not a model name or config path")
    run = exported["run"]
    if not isinstance(run, dict) or any(
        k not in run for k in ("task", "condition", "method", "seed", "data_root")
    ):
        raise ExportError(f"{path}: not a student exported by train_student (its 'run' record is incomplete)")
    problem = _run_record_problem(run)
    if problem:
        raise ExportError(f"{path}: the exported run record is not one train_student writes: {problem}")
    try:
        sp = StudentParams(**exported["student_params"])
        student = create_student(sp.arch, sp)
        student.load_state_dict(exported["student"])
        heads = TaskHeads(student.width, len(exported["vocab"]), tasks=(run["task"],))
        heads.load_state_dict(exported["heads"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(
            f"{path}: the exported student does not load ({type(e).__name__}: {reason})"
        ) from None
    return exported, student, heads


def export_spec(exported: dict, path: Path, distill: DistillParams) -> TaskSpec:
    """How the exported student reads its inputs: the teacher's tokenizer (the export names the teacher), the
    student's image size and text length, its answer vocabulary, and blank images for the blind method."""
    try:
        tokenizer = load_tokenizer(exported["teacher_model"])
    except TeacherError as e:  # the text side is tokenised as the teacher did: its recorded config must load
        raise ExportError(
            f"{path}: the teacher it was trained with (teacher_model {exported['teacher_model']!r}) does not "
            f"load: {e}"
        ) from None
    run, sp = exported["run"], StudentParams(**exported["student_params"])
    resize_mode = exported.get("image_resize_mode", "shortest")  # absent: open_clip's default centre square
    if resize_mode not in RESIZE_MODES:
        raise ExportError(f"{path}: image_resize_mode {resize_mode!r} is none of {', '.join(RESIZE_MODES)}")
    return TaskSpec(run["task"], tokenizer, sp.image_size, sp.max_text_len, exported["vocab"],
                    distill.vqa_candidates, blind=method_config(run["method"], distill).blind,
                    resize_mode=resize_mode)  # fmt: skip


@torch.no_grad()
def predict(student, heads: TaskHeads, task: str, batch: Batch, vocab: Sequence[str]) -> list[dict]:
    batch = batch.to(next(student.parameters()).device)
    if task == "vcr":
        b, k2, length = batch.text_ids.shape
        out = student(images_for_texts(student, batch.pixels, k2), batch.text_ids.view(b * k2, length))
        scores = heads("vcr", out.pooled.view(b, k2, -1))
        k = k2 // 2
        return [
            {"answer": int(a), "rationale": int(r)}
            for a, r in zip(scores[:, :k].argmax(1), scores[:, k:].argmax(1), strict=True)
        ]
    logits = heads(task, student(batch.pixels, batch.text_ids).pooled)
    if task == "vqa":
        return [{"answer": vocab[int(i)]} for i in logits.argmax(1)]
    return [{"label": int(i)} for i in logits.argmax(1)]


class BatchCache:
    """Encoded evaluation batches kept for the next pass over the same instances (the runs of one evaluate
    process that share a test split, a run's validations): reading the shards, decoding and tokenising again
    was a third of a pass. A pass whose batches outgrow ``max_bytes`` is streamed and not kept, so a large
    split costs no memory; the oldest passes make room for a new one."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self.kept: dict[tuple, tuple[list[Batch], int]] = {}

    def batches(
        self, ds: PreparedDataset, keys: Sequence[str], spec: TaskSpec, batch_size: int, tokenizer: str
    ) -> Iterator[Batch]:
        """``eval_batches``' batches; ``tokenizer`` names the spec's tokenizer (a spec holds the object)."""
        key = (str(ds.path), tuple(keys), batch_size, tokenizer, spec.task, spec.image_size, spec.max_text_len,
               tuple(spec.vocab), spec.vqa_candidates, spec.blind, spec.resize_mode)  # fmt: skip
        if key in self.kept:
            yield from self.kept[key][0]
            return
        kept: list[Batch] | None = []
        size = 0
        for batch in eval_batches(ds, keys, spec, batch_size):
            if kept is not None:
                size += sum(t.nbytes for t in (batch.pixels, batch.text_ids, batch.target))
                if size <= self.max_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            while self.kept and sum(n for _, n in self.kept.values()) + size > self.max_bytes:
                del self.kept[next(iter(self.kept))]
            self.kept[key] = (kept, size)


def evaluate(
    student,
    heads: TaskHeads,
    ds: PreparedDataset,
    keys: Sequence[str],
    spec: TaskSpec,
    batch_size: int = EVAL_BATCH,
    batches: Iterator[Batch] | None = None,
) -> dict:
    """Every instance of ``keys`` exactly once → {"metrics": overall + per domain, "primary": float, "n": int}.
    ``batches``: those instances already encoded (``BatchCache``), instead of reading them from ``ds``."""
    if not keys:
        raise ValueError(f"{ds.path}: no {spec.task} instance to evaluate (a score on none would read 0.0)")
    was_training = student.training
    student.eval()
    heads.eval()
    rows = []
    for batch in batches if batches is not None else eval_batches(ds, keys, spec, batch_size):
        for inst, pred in zip(
            batch.instances, predict(student, heads, spec.task, batch, spec.vocab), strict=True
        ):
            rows.append({"domain": inst.domain, **instance_scores(spec.task, pred, inst)})
    student.train(was_training)
    heads.train(was_training)
    agg = aggregate(rows)
    if agg["n"] != len(keys):
        raise RuntimeError(
            f"{ds.path}: evaluated {agg['n']} instances, expected {len(keys)} (every instance exactly once)"
        )
    return {"metrics": agg, "primary": agg["overall"].get(PRIMARY[spec.task], 0.0), "n": agg["n"]}
