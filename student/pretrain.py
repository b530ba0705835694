"""Pretraining the student as a vision-language model before any task: image–text matching + masked language
modelling on an image–caption corpus, as ViLT-style students are pretrained (docs/method.md §7).

CLIP-TD's students were pretrained VL models distilled while fine-tuning; a student from random weights
spends its budget learning to see at all. This stage gives every student run the same starting point, once,
from fewer pairs than the teacher saw, so the teacher still knows more than the student.

- ITM: the pooled [CLS] classifies (image, caption) as matching or not; half of each batch's captions are
  replaced: half of those by a hard negative (one attribute changed) when the corpus has one, the rest (and all
  when it has none) by another image's caption. The ITM head reads the captions as they are, never masked.
- MLM: the matching captions again, with 15% of their tokens (never SOT/EOT) replaced by a mask id, predicted
  from the output token states through the (tied) token embedding.

ITM and MLM read separate copies of the text (one forward over both, as ALBEF and ViLT run the two objectives
on separate inputs): with one masked copy for both, only matching captions carried a mask and the ITM head
learned "a mask => match" instead of matching (``benchmarks/itm_probe.py`` measures which it learned).

The checkpoint holds only the backbone (no ITM/MLM heads), loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import StudentParams
from pipeline.data.shards import PreparedDataset
from pipeline.teacher import TeacherError

from .checkpoint import load_state, write_atomic
from .data import image_tensor, load_tokenizer
from .errors import CheckpointError
from .model import PAD_ID, create_student, fit_text, text_vocabulary

CHECKPOINT_NAME = "student.pt"
FORMAT = "clip-td-student-pretrained"
MASK_ID = PAD_ID  # open_clip's vocabulary has no mask token; id 0 inside a caption marks a masked position


@dataclass
class CaptionPairs:
    """Caption instances with their images as normalised tensors (one row per unique image) and token ids."""

    images: Tensor  # float16 [N_img, 3, S, S]
    inst_image: Tensor  # long [N]
    ids: Tensor  # long [N, L]
    negatives: list[list[int]]  # per instance: rows in ``neg_ids`` of its hard negatives
    neg_ids: Tensor  # long [M, L]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.inst_image)


def load_pairs(path: str | Path, sp: StudentParams, tokenizer, limit: int = 0, seed: int = 0) -> CaptionPairs:
    """Caption instances of a prepared dataset (``limit`` > 0: a seeded subset of that many)."""
    ds = PreparedDataset(path)
    insts = [i for i in ds.iter_instances() if i.task == "caption"]
    if not insts:
        raise ValueError(f"{path}: no caption instances (task='caption'); prepare the captions split first")
    if 0 < limit < len(insts):
        keep = np.sort(np.random.default_rng(seed).choice(len(insts), size=limit, replace=False))
        insts = [insts[i] for i in keep]
    image_ids = list(dict.fromkeys(i.image_id for i in insts))
    row = {iid: n for n, iid in enumerate(image_ids)}
    images = torch.stack([image_tensor(ds.image_bytes(iid), sp.image_size).half() for iid in image_ids])
    negs_text: list[str] = []
    negatives = []
    for inst in insts:
        hn = inst.meta.get("hard_negatives", []) if isinstance(inst.meta, dict) else []
        negatives.append(list(range(len(negs_text), len(negs_text) + len(hn))))
        negs_text += [str(h) for h in hn]
    ids = tokenizer([i.caption for i in insts])[:, : sp.max_text_len]
    neg_ids = tokenizer(negs_text)[:, : sp.max_text_len] if negs_text else ids[:0]
    return CaptionPairs(
        images=images,
        inst_image=torch.tensor([row[i.image_id] for i in insts]),
        ids=ids,
        negatives=negatives,
        neg_ids=neg_ids,
        fingerprint=ds.fingerprint,
    )


class PretrainHeads(nn.Module):
    """ITM classifier on the pooled [CLS]; MLM transform whose decoder is the student's token embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.itm = nn.Linear(width, 2)
        self.mlm = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))


# A batch row's caption: its own, a one-attribute hard negative, or another image's caption.
MATCH, HARD_NEGATIVE, OTHER_CAPTION = 0, 1, 2


@dataclass
class PretrainBatch:
    """One step's inputs: ITM over every row's (image, caption), MLM over the matching rows' masked captions."""

    pixels: Tensor  # float [B, 3, S, S]
    ids: Tensor  # long [B, L]: the ITM captions, unmasked
    itm: Tensor  # long [B]: 1 = the caption matches the image
    kind: Tensor  # long [B]: MATCH, HARD_NEGATIVE or OTHER_CAPTION
    mlm_rows: Tensor  # long [M]: the matching rows, whose images the MLM captions are read with
    mlm_ids: Tensor  # long [M, L]: those rows' captions with the mask id at the chosen positions
    mlm: Tensor  # long [M, L]: the masked positions' token ids, -100 elsewhere


# Draws of an "other caption" negative before the corpus is taken to have none (one draw in two succeeds in
# the embedded world; a thousand failures in a row mean there is no such caption).
MAX_NEGATIVE_DRAWS = 1000


def make_batch(
    pairs: CaptionPairs, idx: Tensor, gen: torch.Generator, eot_id: int, max_len: int
) -> PretrainBatch:
    """The ITM and MLM inputs for instances ``idx``."""
    b = len(idx)
    ids = pairs.ids[idx].clone()
    match = torch.rand(b, generator=gen) < 0.5
    kind = torch.full((b,), MATCH)
    for n in torch.nonzero(~match).flatten().tolist():
        own = pairs.negatives[int(idx[n])]
        if own and torch.rand(1, generator=gen).item() < 0.5:
            ids[n] = pairs.neg_ids[own[int(torch.randint(len(own), (1,), generator=gen))]]
            kind[n] = HARD_NEGATIVE
        else:
            # Another image's caption, and not the same text (simple scenes share captions: a true match).
            for _ in range(MAX_NEGATIVE_DRAWS):
                j = int(torch.randint(len(pairs), (1,), generator=gen))
                if pairs.inst_image[j] != pairs.inst_image[idx[n]] and not torch.equal(pairs.ids[j], ids[n]):
                    break
            else:  # a corpus of one image, or of one text: no negative exists, and the loop never ended
                raise ValueError(
                    f"no caption of another image with another text in {MAX_NEGATIVE_DRAWS} draws: the "
                    "pretraining corpus needs at least two images with different captions"
                )
            ids[n] = pairs.ids[j]
            kind[n] = OTHER_CAPTION
    ids, mask = fit_text(ids, max_len, eot_id)
    rows = torch.nonzero(match).flatten()
    own, own_mask = ids[rows], mask[rows]
    # SOT (position 0) and EOT are never masked.
    can = own_mask & (own != eot_id)
    can[:, 0] = False
    chosen = can & (torch.rand(own.shape, generator=gen) < 0.15)
    return PretrainBatch(
        pixels=pairs.images[pairs.inst_image[idx]].float(),
        ids=ids,
        itm=match.long(),
        kind=kind,
        mlm_rows=rows,
        mlm_ids=torch.where(chosen, torch.full_like(own, MASK_ID), own),
        mlm=torch.where(chosen, own, torch.full_like(own, -100)),
    )


def losses(student, heads: PretrainHeads, batch: PretrainBatch) -> dict[str, Tensor]:
    """The step's loss (ITM + MLM), its parts and their accuracies, each a scalar."""
    b = len(batch.ids)
    # One forward over both copies: the student treats every (image, text) row on its own.
    out = student(
        torch.cat([batch.pixels, batch.pixels[batch.mlm_rows]]), torch.cat([batch.ids, batch.mlm_ids])
    )
    itm_logits = heads.itm(out.pooled[:b])
    itm = F.cross_entropy(itm_logits, batch.itm)
    sel = batch.mlm >= 0
    if sel.any():
        h = heads.mlm(out.text_tokens[b:][sel])
        # Targets are teacher ids; the tied decoder scores embedding rows, so map ids to rows first.
        rows = student._rows(batch.mlm[sel])
        mlm_logits = h @ student.tok_embed.weight.T
        mlm = F.cross_entropy(mlm_logits, rows)
        mlm_acc = (mlm_logits.argmax(-1) == rows).float().mean()
    else:
        mlm = itm_logits.sum() * 0.0
        mlm_acc = torch.zeros(())
    itm_acc = (itm_logits.argmax(-1) == batch.itm).float().mean()
    return {"loss": itm + mlm, "itm": itm, "mlm": mlm, "itm_acc": itm_acc, "mlm_acc": mlm_acc}


def itm_right(student, heads: PretrainHeads, batch: PretrainBatch) -> Tensor:
    """bool [B]: which rows the ITM head classifies right (no MLM copy: the head reads only ``batch.ids``)."""
    return heads.itm(student(batch.pixels, batch.ids).pooled).argmax(-1) == batch.itm


_KINDS = (("match", MATCH), ("hard_negative", HARD_NEGATIVE), ("other_caption", OTHER_CAPTION))


@torch.no_grad()
def evaluate(student, heads, pairs: CaptionPairs, eot_id: int, max_len: int, seed: int, n_batches: int = 8):
    """ITM and MLM accuracy on held-out pairs (fixed seed, so every run is scored on the same batches), and ITM
    accuracy per kind of caption: an image-blind matcher cannot score well on both matches and hard negatives."""
    student.eval()
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {"itm_acc": 0.0, "mlm_acc": 0.0, "itm": 0.0, "mlm": 0.0}
    kinds = {name: [0, 0] for name, _ in _KINDS}
    order = torch.randperm(len(pairs), generator=gen)
    size = max(1, min(128, len(pairs) // n_batches))
    n = 0
    for k in range(n_batches):
        idx = order[k * size : (k + 1) * size]
        if len(idx) == 0:
            break
        batch = make_batch(pairs, idx, gen, eot_id, max_len)
        logs = losses(student, heads, batch)
        for key in sums:
            sums[key] += float(logs[key])
        right = itm_right(student, heads, batch)
        for name, code in _KINDS:
            rows = batch.kind == code
            kinds[name][0] += int(right[rows].sum())
            kinds[name][1] += int(rows.sum())
        n += 1
    student.train()
    out = {k: round(v / max(n, 1), 4) for k, v in sums.items()}
    for name, (hits, total) in kinds.items():
        if total:  # a corpus without hard negatives has none to score
            out[f"itm_acc_{name}"] = round(hits / total, 4)
    return out


def pretrain_student(
    sp: StudentParams,
    teacher_model: str,
    captions: str | Path,
    val: str | Path | None,
    out: str | Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup: int,
    pairs_limit: int,
    seed: int,
    threads: int = 0,
    metrics_path: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train ``sp``'s student backbone with ITM + MLM; write ``out/student.pt`` atomically and the metrics.
    ``threads``: torch's thread count for it (``student.pretrain.threads``; 0 leaves torch's default, every
    core): CPU results differ in the last bits between counts, so a pinned one gives the same backbone on
    every machine of one instruction set."""
    from tqdm import tqdm

    if threads > 0:  # as the teacher's pretraining (pipeline.pretrain) sets teacher.pretrain.threads
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(teacher_model)
    t_load = time.perf_counter()
    pairs = load_pairs(captions, sp, tokenizer, pairs_limit, seed)
    val_pairs = load_pairs(val, sp, tokenizer) if val is not None else None
    load_seconds = time.perf_counter() - t_load

    # A compact vocabulary (the corpus's ids, texts only): a full 49,408-row table would cost every step a dense
    # gradient and AdamW update of rows no caption uses. Fine-tuning maps the task's ids onto it.
    texts = [pairs.ids, pairs.neg_ids] + ([val_pairs.ids, val_pairs.neg_ids] if val_pairs is not None else [])
    student = create_student(sp.arch, sp, vocabulary=text_vocabulary(texts))
    heads = PretrainHeads(student.width)
    params = [*student.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    eot_id, max_len = student.eot_id, student.max_text_len
    history: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain student", unit="step", disable=not progress, mininterval=2)
    for step in bar:
        scale = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
        )
        for g in opt.param_groups:
            g["lr"] = lr * scale
        idx = torch.randint(len(pairs), (batch_size,), generator=gen)
        logs = losses(student, heads, make_batch(pairs, idx, gen, eot_id, max_len))
        opt.zero_grad(set_to_none=True)
        logs["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        # The step's values in one read (on a GPU each read waits for the queue), checked before the update;
        # float64 holds each float32 value exactly.
        row = dict(zip(logs, torch.stack([v.detach().double() for v in logs.values()]).tolist(), strict=True))
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(
                f"pretrain_student: non-finite loss at step {step} (itm {row['itm']}, mlm {row['mlm']})"
            )
        opt.step()
        history.append(row)
        if step % 20 == 0:
            bar.set_postfix(itm=f"{history[-1]['itm_acc']:.2f}", mlm=f"{history[-1]['mlm_acc']:.2f}")
    seconds = time.perf_counter() - t0

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_NAME
    backbone = {
        "format": FORMAT,
        "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
        "student_params": asdict(sp),
        "teacher_model": teacher_model,
        "steps": steps,
        "seed": seed,
        "data_fingerprint": pairs.fingerprint,
    }
    # A crash never leaves a half-written backbone that student runs would trust, nor a temporary beside it.
    write_atomic(ckpt, lambda tmp: torch.save(backbone, tmp))

    window = max(1, min(50, steps // 5))
    metrics: dict = {
        "steps": steps,
        "batch_size": batch_size,
        "pairs": len(pairs),
        "images": int(pairs.images.shape[0]),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(steps, 1), 4),
        "load_seconds": round(load_seconds, 2),
        "final_train": {k: round(float(np.mean([h[k] for h in history[-window:]])), 4) for k in history[0]}
        if history
        else {},
        "checkpoint": str(ckpt),
    }
    if val_pairs is not None:
        metrics["val"] = evaluate(student, heads, val_pairs, eot_id, max_len, seed)
        metrics["val"]["chance_itm"] = 0.5
    if metrics_path is not None:
        mp = Path(metrics_path)
        mp.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(mp, lambda tmp: tmp.write_text(json.dumps(metrics, indent=1) + "\n"))
    return metrics


class PretrainedMismatch(ValueError):
    """A pretrained student checkpoint does not fit the student a run builds."""


# Short texts of letters, digits, punctuation and an accent: two tokenizers that give them the same ids share a
# vocabulary and a splitting, which is what a backbone's token embeddings rest on. Short, so that two context
# lengths (where each tokenizer writes EOT when it cuts) cannot tell them apart.
_TOKENIZER_PROBES = (
    "a photo of 2 red dogs, isn't it?",
    "Why is [person1] smiling at the café?",
    "entailment",
)


def _same_tokenizer(a: str, b: str, max_len: int) -> bool:
    ta, tb = load_tokenizer(a)(list(_TOKENIZER_PROBES)), load_tokenizer(b)(list(_TOKENIZER_PROBES))
    return torch.equal(ta[:, :max_len], tb[:, :max_len])


def load_pretrained_backbone(
    student: nn.Module, path: str | Path, sp: StudentParams, teacher_model: str | None = None
) -> dict:
    """Copy a pretrained backbone into ``student`` (same architecture params required); returns its metadata.
    ``teacher_model``: the run's teacher, whose tokenizer must split texts as the backbone's did (its token
    embeddings are indexed by those ids).

    Loaded with ``weights_only=True``: a checkpoint a user hands over can hold tensors and plain data only."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedMismatch(
            f"{path}: no pretrained student here (run python -m stages.pretrain_student, or set student.init=scratch)"
        )
    try:  # the project's weights-only loader: its refusal of a pickle that would run code is one line
        ck = load_state(path, "the pretrained student")
    except CheckpointError as e:
        raise PretrainedMismatch(str(e)) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise PretrainedMismatch(
            f"{path}: not a clip-td pretrained student (format={ck.get('format') if isinstance(ck, dict) else None!r})"
        )
    if not isinstance(ck.get("student_params"), dict) or not isinstance(ck.get("student"), dict):
        raise PretrainedMismatch(f"{path}: damaged pretrained student (no student_params or student weights)")
    theirs, ours = ck["student_params"], asdict(sp)
    arch_keys = (
        "arch",
        "width",
        "layers",
        "heads",
        "mlp_ratio",
        "patch_size",
        "stem",
        "image_size",
        "max_text_len",
    )
    diff = [k for k in arch_keys if theirs.get(k) != ours.get(k)]
    if diff:
        raise PretrainedMismatch(
            f"{path}: pretrained with different student.{', student.'.join(diff)} "
            f"({', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}); re-run pretrain_student"
        )
    theirs_teacher = ck.get("teacher_model")
    if teacher_model is not None and isinstance(theirs_teacher, str) and theirs_teacher != teacher_model:
        try:
            same = _same_tokenizer(theirs_teacher, teacher_model, sp.max_text_len)
        except (TeacherError, OSError, ValueError) as e:  # a config gone, a hub tokenizer offline
            raise PretrainedMismatch(
                f"{path}: pretrained reading the tokenizer of teacher.model={theirs_teacher!r}, which does not "
                f"load here ({e}); re-run pretrain_student with this run's teacher.model"
            ) from None
        if not same:
            raise PretrainedMismatch(
                f"{path}: pretrained reading the tokenizer of teacher.model={theirs_teacher!r}, which splits texts "
                f"into other ids than this run's teacher.model={teacher_model!r}; re-run pretrain_student with it"
            )
    try:
        student.load_state_dict(ck["student"])
    except RuntimeError as e:  # same params, other tensors: a damaged or hand-edited file
        first = str(e).strip().splitlines()[1:2] or [type(e).__name__]
        raise PretrainedMismatch(
            f"{path}: damaged pretrained student, its weights do not fit ({first[0].strip()}); re-run pretrain_student"
        ) from None
    return {k: ck.get(k) for k in ("steps", "seed", "data_fingerprint", "teacher_model")}
