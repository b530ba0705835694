"""Pretraining the embedded teacher: a tiny open_clip model trained contrastively on the caption corpus.

The synthetic world has no public CLIP that knows it, so the embedded pipeline first trains one (the
``pretrain-teacher`` stage), then freezes it and treats it exactly like a downloaded CLIP from there on.

Design choices (each sized by a feasibility run on this 2-core machine before the project's code existed):

* every corpus image is decoded and resized once into one uint8 tensor (~24k × 3 × 64 × 64 ≈ 300 MB), and
  every distinct caption tokenized once, so a step costs only the model (≈0.7 s at batch 128 on 2 cores);
* a batch never holds the same image twice nor the same caption text twice: ``open_clip.ClipLoss`` treats
  every off-diagonal pair as a negative, and the corpus has several captions per scene and identical
  captions for simple scenes, which would otherwise be trained as negatives of themselves. A caption true
  of another image in the batch (a one-object caption such as "a picture with a small red circle") is not
  kept out: most batches of 128 hold some such pair (docs/training.md, "Known limits");
* the optimiser follows open_clip's training script: AdamW without decay on gains, biases and the logit
  scale, linear warmup then cosine decay, the logit scale clamped at 100.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import TeacherParams
from .data.shards import PreparedDataset, decode_image
from .durable import sync_dir, sync_files
from .teacher import Teacher, autocast_dtype, create_teacher, register_model

CHECKPOINT_NAME = "teacher.pt"


def snapshot_name(step: int) -> str:
    """The file an intermediate teacher is saved to (``save_at``): the weights after ``step`` optimiser steps."""
    return f"teacher-step{step}.pt"


@dataclass
class CaptionCorpus:
    """Caption instances with their images decoded once (rows of ``images`` are unique image ids)."""

    images: torch.Tensor  # uint8 [N_img, 3, H, W]
    image_ids: list[str]
    inst_image: np.ndarray  # int64 [N_inst]: row in images
    captions: list[str]  # per instance
    domains: list[str]  # per instance
    hard_negatives: list[list[str]]  # per instance (may be empty)
    fingerprint: str = ""
    texts: list[str] = field(default_factory=list)  # distinct caption strings
    inst_text: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # row in texts

    def __len__(self) -> int:
        return len(self.captions)


def load_caption_corpus(path: str | Path, teacher: Teacher, progress: bool = True) -> CaptionCorpus:
    """Read every ``task="caption"`` instance of a prepared dataset and decode its images once."""
    from tqdm import tqdm

    ds = PreparedDataset(path)
    captions, domains, negs, image_of = [], [], [], []
    for inst in ds.iter_instances():
        if inst.task != "caption":
            continue
        captions.append(inst.caption)
        domains.append(inst.domain)
        hn = inst.meta.get("hard_negatives", []) if isinstance(inst.meta, dict) else []
        negs.append([str(h) for h in hn])
        image_of.append(inst.image_id)
    if not captions:
        raise ValueError(f"{path}: no caption instances (task='caption'); prepare the captions split first")
    image_ids = list(dict.fromkeys(image_of))
    row = {iid: i for i, iid in enumerate(image_ids)}
    first = teacher.pil_to_uint8(decode_image(ds.image_bytes(image_ids[0])))
    images = torch.empty((len(image_ids), *first.shape), dtype=torch.uint8)
    images[0] = first
    it = tqdm(
        image_ids[1:], desc=f"decode {Path(path).name}", unit="img", disable=not progress, mininterval=2
    )
    for i, iid in enumerate(it, start=1):
        images[i] = teacher.pil_to_uint8(decode_image(ds.image_bytes(iid)))
    texts = list(dict.fromkeys(captions))
    trow = {t: i for i, t in enumerate(texts)}
    return CaptionCorpus(
        images=images,
        image_ids=image_ids,
        inst_image=np.array([row[i] for i in image_of], dtype=np.int64),
        captions=captions,
        domains=domains,
        hard_negatives=negs,
        fingerprint=ds.fingerprint,
        texts=texts,
        inst_text=np.array([trow[c] for c in captions], dtype=np.int64),
    )


class PairSampler:
    """Batches of instance indices with no repeated image and no repeated caption text.

    Instances are visited in a fresh seeded permutation per epoch; an instance that would repeat an image or
    a text already in the batch is passed over for this epoch, so captions shared by many scenes (one-object
    ones) are drawn less often than the others.
    """

    def __init__(self, inst_image: np.ndarray, inst_text: np.ndarray, batch_size: int, seed: int):
        self.inst_image, self.inst_text = inst_image, inst_text
        self.batch_size = batch_size
        feasible = min(len(np.unique(inst_image)), len(np.unique(inst_text)))
        if batch_size > feasible:
            raise ValueError(
                f"batch_size {batch_size} exceeds the corpus's {feasible} distinct images/captions; "
                "a contrastive batch needs that many distinct pairs"
            )
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(inst_image))
        self.pos = 0

    def next(self) -> np.ndarray:
        batch: list[int] = []
        seen_img: set[int] = set()
        seen_txt: set[int] = set()
        scanned = 0
        while len(batch) < self.batch_size:
            if self.pos >= len(self.order):
                self.order, self.pos = self.rng.permutation(len(self.inst_image)), 0
            i = int(self.order[self.pos])
            self.pos += 1
            scanned += 1
            im, tx = int(self.inst_image[i]), int(self.inst_text[i])
            if im in seen_img or tx in seen_txt:
                if scanned > 4 * len(self.order):
                    raise RuntimeError(
                        "cannot fill a batch of distinct image/caption pairs; lower batch_size"
                    )
                continue
            batch.append(i)
            seen_img.add(im)
            seen_txt.add(tx)
        return np.array(batch, dtype=np.int64)


def cosine_lr(step: int, base_lr: float, warmup: int, steps: int) -> float:
    """open_clip's schedule: linear warmup to base_lr, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(steps - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Same exclusion rule as open_clip's training script: gains, biases and the temperature are not decayed.
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def tokenize(teacher: Teacher, texts: list[str], batch: int = 4096) -> torch.Tensor:
    return torch.cat([teacher.tokenizer(texts[i : i + batch]) for i in range(0, len(texts), batch)])


@torch.no_grad()
def _embed_corpus(
    teacher: Teacher, corpus: CaptionCorpus, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled embeddings of every distinct image and every distinct caption/hard negative."""
    img = []
    for i in range(0, len(corpus.images), batch):
        px = teacher.normalize_uint8(corpus.images[i : i + batch])
        img.append(teacher.encode_images(px)["pooled"].cpu())
    ids = tokenize(teacher, corpus.texts)
    txt = [teacher.encode_texts(ids[i : i + batch])["pooled"].cpu() for i in range(0, len(ids), batch)]
    norm = torch.nn.functional.normalize
    return norm(torch.cat(img), dim=-1), norm(torch.cat(txt), dim=-1)


def evaluate_retrieval(teacher: Teacher, corpus: CaptionCorpus, n_captions: int = 32, seed: int = 0) -> dict:
    """Zero-shot image→caption top-1 per visual domain, against two candidate sets per instance:

    * ``random``: the gold caption + ``n_captions - 1`` captions drawn from other scenes (never a text that
      is also a caption of this image; another scene's caption can still be true of it, which can only lower
      the score);
    * ``hard``: the gold caption + its ``meta["hard_negatives"]`` (one attribute changed).

    A hit needs the gold score strictly above every other candidate. Chance levels are averaged per
    instance, since small corpora may offer fewer negatives.
    """
    # Hard negatives are texts too: add them to the encoded set once.
    texts = list(corpus.texts)
    index = {t: i for i, t in enumerate(texts)}
    for hn in corpus.hard_negatives:
        for t in hn:
            if t not in index:
                index[t] = len(texts)
                texts.append(t)
    full = CaptionCorpus(**{**corpus.__dict__, "texts": texts})
    img_emb, txt_emb = _embed_corpus(teacher, full)

    captions_of_image: dict[int, set[int]] = {}
    for i, r in enumerate(corpus.inst_image):
        captions_of_image.setdefault(int(r), set()).add(int(corpus.inst_text[i]))
    caption_rows = np.unique(corpus.inst_text)
    rng = np.random.default_rng(seed)
    stats: dict[str, dict[str, list[float]]] = {}

    def add(domain: str, key: str, value: float) -> None:
        for d in (domain, "all"):
            stats.setdefault(d, {}).setdefault(key, []).append(value)

    for i in range(len(corpus)):
        r, gold = int(corpus.inst_image[i]), int(corpus.inst_text[i])
        dom = corpus.domains[i] or "default"
        own = captions_of_image[r]
        pool = caption_rows[~np.isin(caption_rows, list(own))]
        k = min(n_captions - 1, len(pool))
        negs = rng.choice(pool, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)
        scores = img_emb[r] @ txt_emb[[gold, *negs.tolist()]].T
        add(dom, "random_top1", float(k == 0 or bool(scores[0] > scores[1:].max())))
        add(dom, "random_chance", 1.0 / (k + 1))
        hn = [index[t] for t in corpus.hard_negatives[i] if index[t] not in own]
        if hn:
            scores = img_emb[r] @ txt_emb[[gold, *hn]].T
            add(dom, "hard_top1", float(bool(scores[0] > scores[1:].max())))
            add(dom, "hard_chance", 1.0 / (len(hn) + 1))
    out: dict[str, Any] = {}
    for d, s in sorted(stats.items()):
        out[d] = {
            "n": len(s["random_top1"]),
            "random_top1": float(np.mean(s["random_top1"])),
            "random_chance": float(np.mean(s["random_chance"])),
            "n_hard": len(s.get("hard_top1", [])),
            "hard_top1": float(np.mean(s["hard_top1"])) if s.get("hard_top1") else None,
            "hard_chance": float(np.mean(s["hard_chance"])) if s.get("hard_chance") else None,
        }
    return out


def _save_checkpoint(model: torch.nn.Module, path: Path, meta: dict) -> None:
    """An open_clip-loadable checkpoint: open_clip's loader takes ``checkpoint["state_dict"]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save({"state_dict": state, "clip_td": meta}, tmp)
        sync_files([tmp])
        os.replace(tmp, path)  # a crash never leaves a half-written teacher that later stages would trust
        sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # a failed save (a full disk) leaves no partial copy beside it


def pretrain_teacher(
    params: TeacherParams,
    captions: str | Path,
    val: str | Path | None,
    out: str | Path,
    device: str | torch.device | None = None,
    progress: bool = True,
    save_at: tuple[int, ...] | list[int] = (),
    stop_at: int | None = None,
) -> dict:
    """Pretrain ``params.model`` from random init on ``captions``; write ``out/teacher.pt`` and the metrics.

    ``save_at`` also writes ``out/teacher-step<N>.pt`` with the weights after N steps (0: the random init),
    for the study's teacher dose-response. ``stop_at`` ends the run after that many steps while the learning
    rate still follows the schedule of ``params.pretrain.steps``, so a snapshot is exactly the full run's
    teacher at that point; a stopped run writes no ``teacher.pt`` (it is not the full teacher). Every
    snapshot's zero-shot retrieval on ``val`` goes into ``metrics["snapshots"]``.

    Returns the metrics dict; the stage writes it (stages/pretrain_teacher.py), beside the file it replaces.
    """
    import open_clip
    from tqdm import tqdm

    p = params.pretrain
    steps_run = p.steps if stop_at is None else stop_at
    if not 0 <= steps_run <= p.steps:
        raise ValueError(f"stop_at {stop_at}: must be in 0..teacher.pretrain.steps ({p.steps})")
    bad = [s for s in save_at if not 0 <= s <= steps_run]
    if bad:
        raise ValueError(
            f"save_at {bad[0]}: a snapshot step must be in 0..{steps_run} (the steps this run trains)"
        )
    if steps_run < p.steps and (Path(out) / CHECKPOINT_NAME).exists():
        # A stopped run writes no finished teacher; one already there (an earlier full run's) would stay beside
        # this run's snapshots and metrics as if it were theirs.
        raise ValueError(
            f"{Path(out) / CHECKPOINT_NAME}: a run stopped at step {steps_run} of {p.steps} writes no finished "
            "teacher, and OUT holds one from another run: choose another --out, or remove that file"
        )
    save_set = set(save_at)
    if p.threads > 0:
        torch.set_num_threads(p.threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(p.seed)
    np.random.seed(p.seed)
    torch.manual_seed(p.seed)

    name = register_model(params.model)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu")
    tokenizer = open_clip.get_tokenizer(name)
    # A Teacher view of the untrained model gives the exact eval preprocessing for corpus decoding; it freezes
    # parameters, so they are unfrozen again right after.
    helper = Teacher(model, tokenizer, preprocess, name=name, model_source=params.model, device="cpu")
    for q in model.parameters():
        q.requires_grad_(True)

    t_load = time.perf_counter()
    corpus = load_caption_corpus(captions, helper, progress=progress)
    text_ids = tokenize(helper, corpus.texts)
    load_seconds = time.perf_counter() - t_load

    sampler = PairSampler(corpus.inst_image, corpus.inst_text, p.batch_size, p.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(_param_groups(model, p.weight_decay), lr=p.lr, betas=(0.9, 0.98), eps=1e-6)
    amp = autocast_dtype(device, params.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    loss_fn = open_clip.ClipLoss()
    images = corpus.images.to(device)
    text_ids = text_ids.to(device)
    losses: list[float] = []

    out = Path(out)
    snapshots: dict[int, Path] = {}
    fingerprint = corpus.fingerprint

    def snapshot(step: int) -> None:
        snap = out / snapshot_name(step)
        meta = {"model": name, "model_source": params.model, "model_config": open_clip.get_model_config(name),
                "steps": step, "planned_steps": p.steps, "batch_size": p.batch_size, "seed": p.seed,
                "data_fingerprint": fingerprint}  # fmt: skip
        _save_checkpoint(model, snap, meta)
        snapshots[step] = snap

    t0 = time.perf_counter()
    bar = tqdm(range(steps_run), desc="pretrain teacher", unit="step", disable=not progress, mininterval=2)
    for step in bar:
        if step in save_set:
            snapshot(step)
        lr = cosine_lr(step, p.lr, p.warmup, p.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(sampler.next())
        px = helper.normalize_uint8(images[torch.from_numpy(corpus.inst_image)[idx].to(device)])
        ids = text_ids[torch.from_numpy(corpus.inst_text)[idx].to(device)]
        with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            img_f = model.encode_image(px, normalize=True)
            txt_f = model.encode_text(ids, normalize=True)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == p.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
    if steps_run in save_set:
        snapshot(steps_run)
    seconds = time.perf_counter() - t0

    ckpt = out / CHECKPOINT_NAME
    meta = {
        "model": name,
        "model_source": params.model,
        "model_config": open_clip.get_model_config(name),
        "steps": p.steps,
        "batch_size": p.batch_size,
        "seed": p.seed,
        "data_fingerprint": corpus.fingerprint,
    }
    complete = steps_run == p.steps
    if complete:
        _save_checkpoint(model, ckpt, meta)

    window = max(1, min(20, steps_run // 5))
    every = max(1, steps_run // 50)
    metrics: dict[str, Any] = {
        "steps": steps_run,
        "planned_steps": p.steps,
        "batch_size": p.batch_size,
        "pairs_seen": steps_run * p.batch_size,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(steps_run, 1), 4),
        "load_seconds": round(load_seconds, 2),
        "device": str(device),
        "train_instances": len(corpus),
        "train_images": len(corpus.image_ids),
        "initial_loss": float(np.mean(losses[:window])) if losses else None,
        "final_loss": float(np.mean(losses[-window:])) if losses else None,
        "last_loss": losses[-1] if losses else None,
        "loss_curve": [[s, float(np.mean(losses[s : s + every]))] for s in range(0, len(losses), every)],
        "logit_scale": float(model.logit_scale.detach().exp()),
        "checkpoint": str(ckpt) if complete else None,
    }
    del images, text_ids, corpus  # the training corpus is not needed for evaluation

    if val is not None and snapshots:
        metrics["eval_captions"], metrics["snapshots"] = p.eval_captions, {}
        for step, snap in sorted(snapshots.items()):
            teacher = create_teacher(
                params.model, pretrained=str(snap), device=device, precision=params.precision
            )
            r = evaluate_retrieval(
                teacher,
                load_caption_corpus(val, teacher, progress=False),
                n_captions=p.eval_captions,
                seed=p.seed,
            )
            metrics["snapshots"][str(step)] = {"checkpoint": str(snap), "all": r["all"]}
    if val is not None and complete:
        t_eval = time.perf_counter()
        # Evaluate through the same loader every later stage uses, which also proves the checkpoint loads.
        teacher = create_teacher(
            params.model, pretrained=str(ckpt), device=device, precision=params.precision
        )
        val_corpus = load_caption_corpus(val, teacher, progress=progress)
        retrieval = evaluate_retrieval(teacher, val_corpus, n_captions=p.eval_captions, seed=p.seed)
        metrics["eval_captions"] = p.eval_captions
        metrics["chance"] = {
            "random": retrieval["all"]["random_chance"],
            "hard": retrieval["all"]["hard_chance"],
        }
        metrics["all"] = retrieval.pop("all")
        metrics["domains"] = retrieval
        metrics["eval_seconds"] = round(time.perf_counter() - t_eval, 2)
    return metrics
