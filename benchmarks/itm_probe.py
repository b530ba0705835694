"""What the student backbone's image–text matching head learns in pretraining: the image, or a shortcut.

``pretrain_student`` once fed the ITM head the MLM copy of the text, in which only matching captions carried a
mask: the image-blind rule "a mask => match" scored 0.867 and the head 0.864, but 0.554 with every mask undone
(record ``benchmarks/results/itm-probe/``). ITM now reads unmasked captions. This trains the backbone exactly as
the stage does (params.yaml's student and student.pretrain, the stage's caption splits) and scores, on the
held-out batches ``student.pretrain.evaluate`` uses:

* ``masked_itm_texts``: how many ITM captions carry a mask (the shortcut's input; 0 when ITM reads plain text);
* ``as_evaluated``: the head's ITM accuracy as the stage reports it;
* ``match``, ``hard_negative``, ``other_caption``: the same per kind of caption (a hard negative changes one
  attribute of the true caption: only the image tells it from a match);
* ``blank_image``: every image replaced by the dataset's mean image (what the head does from the text alone).

Needs the embedded world's caption splits (``make repro`` or ``dvc repro prepare@captions prepare@captions_val``).
``python -m benchmarks.itm_probe --out benchmarks/results/itm-probe-unmasked``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from benchmarks.common import log, machine
from pipeline.config import load_params
from student import pretrain as P
from student.model import fit_text


def probe(student, heads, pairs, eot_id: int, max_len: int, seed: int, n_batches: int = 8) -> dict:
    """Replays ``student.pretrain.evaluate``'s batches (same seed and sizes) and scores them several ways."""
    student.eval()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=gen)
    size = max(1, min(128, len(pairs) // n_batches))
    mean_image = pairs.images.float().mean(0, keepdim=True)
    counts = {k: [0, 0] for k in ("as_evaluated", "match", "hard_negative", "other_caption", "blank_image")}
    masked = 0
    with torch.no_grad():
        for k in range(n_batches):
            idx = order[k * size : (k + 1) * size]
            if len(idx) == 0:
                break
            batch = P.make_batch(pairs, idx, gen, eot_id, max_len)
            _, text = fit_text(batch.ids, max_len, eot_id)
            masked += int(((batch.ids == P.MASK_ID) & text).any(1).sum())
            right = P.itm_right(student, heads, batch)
            blank = dataclasses.replace(batch, pixels=mean_image.expand_as(batch.pixels))
            blind = P.itm_right(student, heads, blank)
            every = torch.ones_like(right)
            for name, hits, rows in (
                ("as_evaluated", right, every),
                ("match", right, batch.kind == P.MATCH),
                ("hard_negative", right, batch.kind == P.HARD_NEGATIVE),
                ("other_caption", right, batch.kind == P.OTHER_CAPTION),
                ("blank_image", blind, every),
            ):
                counts[name][0] += int(hits[rows].sum())
                counts[name][1] += int(rows.sum())
    student.train()
    scores = {k: {"accuracy": round(h / max(n, 1), 4), "n": n} for k, (h, n) in counts.items()}
    return {"masked_itm_texts": masked, **scores}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--captions", default="data/shards/synthetic/captions")
    p.add_argument("--val", default="data/shards/synthetic/captions_val")
    p.add_argument("--out", default="benchmarks/results/itm-probe-unmasked")
    p.add_argument("--work", default=None, help="where the probe's backbone goes (default: OUT/backbone)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    sp, pp = params.student, params.student.pretrain
    caught: dict = {}
    evaluate = P.evaluate

    def keep(
        student, heads, pairs, eot_id, max_len, seed, n_batches=8
    ):  # the trained heads, at the stage's end
        caught.update(student=student, heads=heads, pairs=pairs, eot_id=eot_id, max_len=max_len, seed=seed)
        return evaluate(student, heads, pairs, eot_id, max_len, seed, n_batches)

    P.evaluate = keep
    t0 = time.time()
    try:
        metrics = P.pretrain_student(
            sp, params.teacher.model, args.captions, args.val, Path(args.work or Path(args.out) / "backbone"),
            steps=pp.steps, batch_size=pp.batch_size, lr=pp.lr, weight_decay=pp.weight_decay,
            warmup=pp.warmup, pairs_limit=pp.pairs, seed=pp.seed, threads=pp.threads, metrics_path=None,
            progress=False,
        )  # fmt: skip
    finally:
        P.evaluate = evaluate
    scores = probe(**caught)
    result = {"benchmark": "itm_probe", "machine": machine(), "seconds": round(time.time() - t0, 1),
              "settings": {"student": dataclasses.asdict(sp), "seed": pp.seed},
              "stage_val": metrics.get("val"), "probe": scores}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "itm_probe.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"ITM captions with a mask: {scores['masked_itm_texts']}")
    for k, v in scores.items():
        if isinstance(v, dict):
            log(f"{k}: ITM accuracy {v['accuracy']:.4f} over {v['n']} held-out pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
