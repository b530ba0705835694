"""What the student backbone's image–text matching head learns in pretraining: the image, or the mask.

``pretrain_student`` masks 15% of a *matching* caption's tokens for MLM and feeds the same masked text to the
ITM head, so a caption that carries a mask is always a match: an image-blind rule ("a mask => match") scores
ITM without looking. This trains the backbone exactly as the stage does (params.yaml's student and
student.pretrain, the stage's caption splits) and scores, on the held-out batches ``student.pretrain.evaluate``
uses:

* ``blind_rule``: the image-blind rule's ITM accuracy;
* ``as_evaluated``: the head's ITM accuracy as the stage reports it (masked matching captions);
* ``unmasked``: the same pairs with every mask undone (what an image-based matcher is scored on);
* the head's accuracy on matching captions with a mask, matching captions without one, and non-matches.

Needs the embedded world's caption splits (``make repro`` or ``dvc repro prepare@captions prepare@captions_val``).
``python -m benchmarks.itm_probe --out benchmarks/results/itm-probe``.
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
    """Replays ``student.pretrain.evaluate``'s batches (same seed and sizes) and scores them four ways."""
    student.eval()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=gen)
    size = max(1, min(128, len(pairs) // n_batches))
    counts = {k: [0, 0] for k in ("blind_rule", "as_evaluated", "unmasked", "match_masked", "match_plain",
                                  "non_match")}  # fmt: skip
    with torch.no_grad():
        for k in range(n_batches):
            idx = order[k * size : (k + 1) * size]
            if len(idx) == 0:
                break
            pixels, ids, itm_y, mlm = P.make_batch(pairs, idx, gen, eot_id, max_len)
            cut, text_mask = fit_text(ids, max_len, eot_id)
            masked = ((cut == P.MASK_ID) & text_mask).any(1)
            plain_ids = torch.where(mlm >= 0, mlm, ids)  # every masked slot back to its token
            seen = heads.itm(student(pixels, ids).pooled).argmax(1)
            honest = heads.itm(student(pixels, plain_ids).pooled).argmax(1)
            match = itm_y == 1
            for name, pred, rows in (
                ("blind_rule", masked.long(), torch.ones_like(match)),
                ("as_evaluated", seen, torch.ones_like(match)),
                ("unmasked", honest, torch.ones_like(match)),
                ("match_masked", seen, match & masked),
                ("match_plain", seen, match & ~masked),
                ("non_match", seen, ~match),
            ):
                counts[name][0] += int((pred == itm_y)[rows].sum())
                counts[name][1] += int(rows.sum())
    student.train()
    return {k: {"accuracy": round(h / max(n, 1), 4), "n": n} for k, (h, n) in counts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--captions", default="data/shards/synthetic/captions")
    p.add_argument("--val", default="data/shards/synthetic/captions_val")
    p.add_argument("--out", default="benchmarks/results/itm-probe")
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
            warmup=pp.warmup, pairs_limit=pp.pairs, seed=pp.seed, metrics_path=None, progress=False,
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
    for k, v in scores.items():
        log(f"{k}: ITM accuracy {v['accuracy']:.4f} over {v['n']} held-out pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
