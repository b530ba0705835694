"""Score a student on a set of instances with the official metrics, per instance and per domain."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.data.shards import PreparedDataset
from pipeline.metrics import PRIMARY, aggregate, instance_scores
from student.data import Batch, TaskSpec, eval_batches
from student.model import TaskHeads, images_for_texts


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


def evaluate(
    student, heads: TaskHeads, ds: PreparedDataset, keys: Sequence[str], spec: TaskSpec, batch_size: int = 128
) -> dict:
    """Every instance of ``keys`` exactly once → {"metrics": overall + per domain, "primary": float, "n": int}."""
    was_training = student.training
    student.eval()
    heads.eval()
    rows = []
    for batch in eval_batches(ds, keys, spec, batch_size):
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
