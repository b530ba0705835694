"""Score a student on a set of instances with the official metrics, per instance and per domain."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from pipeline.data.shards import PreparedDataset
from pipeline.metrics import PRIMARY, aggregate, instance_scores
from student.data import Batch, TaskSpec, eval_batches
from student.model import TaskHeads, images_for_texts

EVAL_BATCH = 128  # instances a scoring batch holds (validation and the evaluate stage)


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
               tuple(spec.vocab), spec.vqa_candidates, spec.blind)  # fmt: skip
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
