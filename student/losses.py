"""Distillation losses: CLIP-TD as docs/method.md §2–§7 defines it, and the compared methods.

The formulas are this project's reconstruction of the paper's idea (targeted tokens, per-instance confidence
weights, adaptive balance with the task loss); every default comes from ``DistillParams``.

Teacher batch: a mapping (``TeacherBatch``) with the cached teacher outputs of the instances in the batch;
tokens are in the joint space (width E) and may be float16, and are cast to float32 here.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import DistillParams

from .model import StudentOutput

Distance = Literal["cosine", "l1", "mse"]


class TeacherBatch(TypedDict):
    """img_tokens [B, P, E] on the teacher's g_T x g_T grid (row-major); img_pooled [B, E] (unnormalised);
    txt_tokens [B, Lt, E] of the distill text, padded after each row's EOT; txt_lengths [B] long, L_i = EOT
    index + 1 (0 = the instance has no text); txt_pooled [B, E] of the distill text (any value when no text);
    rel_img_tokens [B, P, E]: optional tokens that score image relevance (§3, e.g. MaskCLIP value tokens)
    instead of img_tokens."""

    img_tokens: Tensor
    img_pooled: Tensor
    txt_tokens: Tensor
    txt_lengths: Tensor
    txt_pooled: Tensor
    rel_img_tokens: NotRequired[Tensor]
    # What ``prepare_teacher`` puts in place of the three token arrays (the teacher-only half of clip_td_loss).
    img_target: NotRequired[Tensor]
    img_select: NotRequired[Tensor]
    txt_target: NotRequired[Tensor]
    txt_relevance: NotRequired[Tensor]


class DistillHeads(nn.Module):
    """h_v, h_t, h_p: Linear(d_S -> E), used only for distillation and never part of the exported student."""

    def __init__(self, d_s: int, e: int):
        super().__init__()
        self.h_v = nn.Linear(d_s, e)
        self.h_t = nn.Linear(d_s, e)
        self.h_p = nn.Linear(d_s, e)


# The checks of the step being computed when ``deferred_finite_checks`` is active (None: check at once).
_deferred: contextvars.ContextVar[list[tuple[str, Tensor]] | None] = contextvars.ContextVar(
    "clip_td_deferred_finite", default=None
)


def _raise_nonfinite(name: str, tensor: Tensor) -> None:
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int(torch.isinf(tensor).sum())
    raise FloatingPointError(
        f"loss term '{name}' is not finite ({n_nan} NaN, {n_inf} Inf of {tensor.numel()} values); "
        "check the teacher cache rows of this batch and the learning rate"
    )


def check_finite(name: str, tensor: Tensor) -> Tensor:
    """Raise FloatingPointError naming the loss term when ``tensor`` holds NaN or Inf; returns it unchanged.
    Inside ``deferred_finite_checks`` the check is recorded and made by ``verify``."""
    pending = _deferred.get()
    if pending is not None:
        pending.append((name, tensor.detach()))
    elif not torch.isfinite(tensor).all():
        _raise_nonfinite(name, tensor)
    return tensor


class FiniteChecks:
    """The finite checks of one training step, made together: each check of its own reads the device once,
    and on a GPU every read waits for the queue to drain (eight of them a clip_td step). ``verify`` reads
    once and raises the error the first failing check would have raised at once."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, Tensor]] = []

    def verify(self) -> None:
        if not self.pending:
            return
        ok = torch.stack([torch.isfinite(t).all() for _, t in self.pending])
        if not bool(ok.all()):
            name, tensor = next(
                (n, t) for (n, t), good in zip(self.pending, ok.tolist(), strict=True) if not good
            )
            _raise_nonfinite(name, tensor)
        self.pending.clear()


@contextlib.contextmanager
def deferred_finite_checks() -> Iterator[FiniteChecks]:
    """Within the block, ``check_finite`` (in this thread) records instead of reading the device; call
    ``verify()`` before the result is used (the optimizer step). Leaving the block does not verify."""
    checks = FiniteChecks()
    token = _deferred.set(checks.pending)
    try:
        yield checks
    finally:
        _deferred.reset(token)


# ---------------------------------------------------------------------------------------------- §2 alignment


def resize_teacher_grid(t_tokens: Tensor, g_t: int, g_s: int, antialias: bool = False) -> Tensor:
    """[B, g_T², E] -> [B, g_S², E] by bilinear interpolation over the 2-D grid, each channel separately.

    align_corners=False treats tokens as cell centres (the image-resize convention), so a 2x2 -> 1x1 resize
    gives the mean of the four. Without antialias, a downscale by more than 2x samples only the cells next
    to each output centre; ``antialias=True`` averages over the whole footprint instead."""
    b, p, e = t_tokens.shape
    if p != g_t * g_t:
        raise ValueError(f"teacher image tokens: {p} tokens do not form a {g_t}x{g_t} grid")
    if g_t == g_s:
        return t_tokens
    grid = t_tokens.transpose(1, 2).reshape(b, e, g_t, g_t)
    out = F.interpolate(grid, size=(g_s, g_s), mode="bilinear", align_corners=False, antialias=antialias)
    return out.reshape(b, e, g_s * g_s).transpose(1, 2)


def distillable_text_mask(txt_lengths: Tensor, length: int) -> Tensor:
    """[B, length] bool: text positions 1 .. L_i - 2, i.e. without SOT (0), EOT (L_i - 1) and padding."""
    pos = torch.arange(length, device=txt_lengths.device)
    return (pos >= 1) & (pos[None, :] <= txt_lengths[:, None] - 2)


# ---------------------------------------------------------------------------------------------- §4 distance


def token_distance(a: Tensor, b: Tensor, kind: Distance = "cosine") -> Tensor:
    """Per-token distance over the last dim: [..., E] x [..., E] -> [...].

    cosine: 1 - cos. l1 / mse: between L2-normalised vectors, *summed* over channels, so mse = 2 (1 - cos)
    keeps the cosine distance's scale and a constant λ carries over; l1 lies in [0, 2 sqrt(E)]."""
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)
    a, b = F.normalize(a, dim=-1, eps=1e-8), F.normalize(b, dim=-1, eps=1e-8)
    if kind == "l1":
        return (a - b).abs().sum(-1)
    if kind == "mse":
        return (a - b).pow(2).sum(-1)
    raise ValueError(f"unknown distance {kind!r} (allowed: cosine, l1, mse)")


# ---------------------------------------------------------------------------------------------- §3 selection


def cosine_relevance(tokens: Tensor, query: Tensor) -> Tensor:
    """r = cos(token, query): tokens [B, N, E], query [B, E] -> [B, N]."""
    return F.cosine_similarity(tokens, query[:, None, :], dim=-1, eps=1e-8)


def select_topk(relevance: Tensor, valid: Tensor, rho: float) -> Tensor:
    """Keep the top ⌈rho · n_valid⌉ valid tokens of each row (at least one when any is valid).

    Ties go to the lower index (stable sort). The ceiling subtracts 1e-6 first, so that a product that is
    an integer up to rounding (0.1 · 30) is not bumped up by one."""
    n_valid = valid.sum(1)
    k = torch.ceil(rho * n_valid.double() - 1e-6).long().clamp(min=1)
    k = torch.minimum(k, n_valid)
    order = relevance.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    return (rank < k[:, None]) & valid


def select_mass(relevance: Tensor, valid: Tensor, p: float, tau: float) -> Tensor:
    """Keep the smallest set of valid tokens whose softmax(r / tau) mass (over the row's valid tokens)
    reaches p, taken in decreasing relevance; at least one token when any is valid."""
    logits = (relevance / tau).masked_fill(~valid, float("-inf"))
    probs = torch.softmax(logits, dim=1).nan_to_num(0.0)  # an all-invalid row gives NaN; it keeps nothing
    sorted_p, order = probs.sort(dim=1, descending=True, stable=True)
    before = sorted_p.cumsum(1) - sorted_p
    keep_sorted = before < p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(valid).scatter_(1, order, keep_sorted)
    return keep & valid


def select_tokens(
    relevance: Tensor, valid: Tensor, rho: float, cfg: DistillParams | MethodSettings
) -> Tensor:
    if cfg.selection == "topk":
        return select_topk(relevance, valid, rho)
    if cfg.selection == "mass":
        return select_mass(relevance, valid, cfg.mass_p, cfg.mass_tau)
    raise ValueError(f"unknown selection {cfg.selection!r} (allowed: topk, mass)")


# ---------------------------------------------------------------------------------------------- §5 weights


def _cos_matrix(a: Tensor, b: Tensor) -> Tensor:
    return F.normalize(a.float(), dim=-1, eps=1e-8) @ F.normalize(b.float(), dim=-1, eps=1e-8).mT


def candidate_confidence(
    e_img: Tensor, cand: Tensor, gold: Tensor, tau: float, cand_mask: Tensor | None = None
) -> Tensor:
    """p_gold with p = softmax_c(tau · cos(e_img, e_c)): e_img [B, E], cand [B, K, E], gold [B] -> [B].
    Rows with gold < 0 (unlabeled) get NaN; ``cand_mask`` [B, K] drops missing candidates."""
    logits = tau * _cos_matrix(e_img[:, None, :], cand).squeeze(1)
    if cand_mask is not None:
        logits = logits.masked_fill(~cand_mask, float("-inf"))
    p = torch.softmax(logits, dim=1)
    p_gold = p.gather(1, gold.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(gold >= 0, p_gold, torch.full_like(p_gold, float("nan")))


def inbatch_probability(e_img: Tensor, e_txt: Tensor, tau: float, has_text: Tensor | None = None) -> Tensor:
    """q_nn: row n of softmax_m(tau · cos(e_img_n, e_txt_m)) over the batch's texts, at its own text; rows
    without text get NaN and are no column. Several instances sharing one image (VQA) share its mass."""
    logits = tau * _cos_matrix(e_img, e_txt)
    if has_text is not None:
        logits = logits.masked_fill(~has_text[None, :], float("-inf"))
    q = torch.softmax(logits, dim=1).diagonal()
    return q if has_text is None else torch.where(has_text, q, torch.full_like(q, float("nan")))


def snli_confidence(e_img: Tensor, e_hyp: Tensor, labels: Tensor, tau: float) -> Tensor:
    """In-batch agreement for SNLI-VE (labels: 0 entailment, 1 neutral, 2 contradiction, < 0 unlabeled).

    w = q_nn for entailment, 1 - q_nn for contradiction; neutral gets the mean of the batch's entailment and
    contradiction w (the teacher has no opinion on neutral pairs, so they get the batch's typical
    confidence), or 1 when the batch has none. Unlabeled rows get NaN."""
    q = inbatch_probability(e_img, e_hyp, tau)
    w = torch.full_like(q, float("nan"))
    w = torch.where(labels == 0, q, w)
    w = torch.where(labels == 2, 1.0 - q, w)
    decided = (labels == 0) | (labels == 2)
    neutral = w[decided].mean() if decided.any() else torch.ones((), device=q.device)
    return torch.where(labels == 1, neutral, w)


def normalise_weights(w: Tensor, clip: tuple[float, float] | list[float] = (0.1, 3.0)) -> Tensor:
    """Scale to batch mean 1, then clip. A batch whose weights are all zero (all equal) gets all ones."""
    mean = w.mean()
    w = w / mean if mean > 0 else torch.ones_like(w)
    return w.clamp(clip[0], clip[1])


def confidence_weights(
    e_img: Tensor,
    tau: float,
    *,
    cand: Tensor | None = None,
    gold: Tensor | None = None,
    cand_mask: Tensor | None = None,
    snli_labels: Tensor | None = None,
    e_txt: Tensor | None = None,
    has_text: Tensor | None = None,
    clip: tuple[float, float] | list[float] = (0.1, 3.0),
) -> Tensor:
    """Detached per-instance weights w [B] (§5), normalised to mean 1 and clipped.

    Candidate tasks (VQA, VCR Q->A, QA->R): pass cand [B, K, E] and gold [B] (and ``cand_mask`` [B, K] when
    instances hold fewer than K); the raw weight is C_n · p_gold, C_n an instance's candidates. SNLI-VE: pass snli_labels [B]
    and e_txt = the hypotheses' pooled embeddings. Unlabeled rows (gold or label < 0, or neither given)
    get the in-batch image-text probability over e_txt, or 1 when ``has_text`` is False for the row."""
    with torch.no_grad():
        b = e_img.shape[0]
        raw = torch.full((b,), float("nan"), device=e_img.device)
        if cand is not None:
            if gold is None:
                raise ValueError("confidence_weights: cand given without gold")
            # The teacher's lift over a uniform pick (C_n · p_gold, whose chance level is 1 whatever C_n): VQA's
            # same-type distractors give 2 to 4 candidates, and p_gold alone would weigh a yes/no question
            # twice a colour one for its count alone. With equal counts (VCR) the batch normalisation below
            # makes it p_gold.
            n = cand_mask.sum(1) if cand_mask is not None else torch.full_like(gold, cand.shape[1])
            raw = candidate_confidence(e_img, cand, gold, tau, cand_mask) * n.to(e_img.dtype)
        elif snli_labels is not None:
            if e_txt is None:
                raise ValueError("confidence_weights: SNLI-VE needs e_txt (the hypotheses)")
            raw = snli_confidence(e_img, e_txt, snli_labels, tau)
        unlabeled = torch.isnan(raw)
        if unlabeled.any():
            if has_text is None:
                has_text = torch.ones(b, dtype=torch.bool, device=e_img.device)
            if has_text.any():
                if e_txt is None:
                    raise ValueError("confidence_weights: unlabeled rows with text need e_txt")
                q = inbatch_probability(e_img, e_txt, tau, has_text)
            else:
                q = raw
            raw = torch.where(unlabeled & has_text, q, raw)
            raw = torch.where(unlabeled & ~has_text, torch.ones_like(raw), raw)
        return normalise_weights(raw.float(), clip)


# ---------------------------------------------------------------------------------------------- §6 balance


def alpha_schedule(step: int, total_steps: int, alpha0: float, alpha_min: float) -> float:
    """Cosine decay from alpha0 at step 0 to alpha_min at total_steps (and after)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return alpha_min + (alpha0 - alpha_min) * 0.5 * (1.0 + math.cos(math.pi * progress))


def balance_lambda(
    l_task: Tensor | float,
    l_kd_weighted: Tensor | float,
    step: int,
    total_steps: int,
    alpha0: float = 1.0,
    alpha_min: float = 0.1,
    mode: Literal["adaptive", "constant"] = "adaptive",
    lambda_const: float = 1.0,
) -> Tensor:
    """λ_t = α_t · sg(L_task) / sg(mean_n w_n L_KD,n), so the KD term always weighs α_t times the task loss;
    or ``lambda_const`` in constant mode. With no labeled instance in the batch (L_task = 0) λ is 0: pass a
    running mean of L_task instead when batches can be unlabeled only."""
    if mode == "constant":
        return torch.tensor(float(lambda_const))
    if mode != "adaptive":
        raise ValueError(f"unknown balance {mode!r} (allowed: adaptive, constant)")
    alpha = alpha_schedule(step, total_steps, alpha0, alpha_min)
    task = torch.as_tensor(l_task).detach().float()
    kd = torch.as_tensor(l_kd_weighted).detach().float()
    return alpha * task / kd.clamp(min=1e-8)


# ---------------------------------------------------------------------------------------------- §7 methods


@dataclass(frozen=True)
class MethodSettings:
    """A method's switches plus the DistillParams values the losses read.

    kd: "none" (task loss only), "tokens" (§3–§6 token KD) or "pooled" (pooled feature distillation).
    unlabeled: which extra unlabeled images the data side adds ("" none, "dropped": training images the
    low-shot subset drops, "target": the shifted target domain, reported as transductive).
    blind: the student sees a blank image in training and evaluation (the text-only floor)."""

    method: str
    kd: Literal["none", "tokens", "pooled"]
    select: bool
    weight: bool
    balance: Literal["adaptive", "constant"]
    lambda_const: float
    unlabeled: Literal["", "dropped", "target"]
    rho_v: float
    rho_t: float
    selection: str
    mass_p: float
    mass_tau: float
    relevance_source: str
    distance: Distance
    alpha0: float
    alpha_min: float
    weight_clip: tuple[float, float]
    blind: bool = False


_METHODS: dict[str, dict] = {
    "baseline": dict(kd="none", select=False, weight=False, balance="constant"),
    # The floor: the same student and budget with the image blanked, i.e. what the text alone gives.
    "blind": dict(kd="none", select=False, weight=False, balance="constant", blind=True),
    "naive_kd": dict(kd="tokens", select=False, weight=False, balance="constant"),
    "pooled_fd": dict(kd="pooled", select=False, weight=False, balance="constant"),
    "clip_td": dict(kd="tokens", select=True, weight=True),
    "clip_td_no_select": dict(kd="tokens", select=False, weight=True),
    "clip_td_no_weight": dict(kd="tokens", select=True, weight=False),
    "clip_td_const_lambda": dict(kd="tokens", select=True, weight=True, balance="constant"),
    "clip_td_unlabeled": dict(kd="tokens", select=True, weight=True, unlabeled="dropped"),
    "clip_td_transductive": dict(kd="tokens", select=True, weight=True, unlabeled="target"),
}
METHODS = tuple(_METHODS)  # the names of names.METHODS (tests/test_layering.py)


def method_config(name: str, base: DistillParams) -> MethodSettings:
    """The switches of method ``name`` over the values of ``base``. clip_td variants keep base.balance
    (adaptive by default) unless they fix it; the others use a constant λ = base.lambda_const."""
    if name not in _METHODS:
        raise ValueError(f"unknown distillation method '{name}' (allowed: {', '.join(METHODS)})")
    switches = {"balance": base.balance, "unlabeled": "", **_METHODS[name]}
    values = {
        f.name: getattr(base, f.name) for f in dataclasses.fields(MethodSettings) if hasattr(base, f.name)
    }
    values.pop("method", None)
    values["weight_clip"] = tuple(base.weight_clip)
    return MethodSettings(method=name, **{**values, **switches})


def _settings(cfg: DistillParams | MethodSettings, default: str | None = None) -> MethodSettings:
    if isinstance(cfg, MethodSettings):
        return cfg
    return method_config(default or cfg.method, cfg)


def _selected_distance(
    tokens: Tensor, head: nn.Module, target: Tensor, sel: Tensor, kind: Distance
) -> Tensor:
    """Per row, the mean over its selected tokens of distance(head(student token), teacher token); 0 for a row
    with none. tokens [B, N, d_S], target [B, N, E], sel [B, N] bool -> [B].

    Only selected tokens are projected and compared (with ρ_v = 0.25, three image tokens in four never reach
    h_v), and an unselected (e.g. padded) slot cannot leak a non-finite value. Distances go back to their
    slots in a zero [B, N] before the row sum: deterministic on every device, unlike a scatter-add."""
    rows, cols = sel.nonzero(as_tuple=True)
    d = token_distance(head(tokens[rows, cols]).float(), target[rows, cols].float(), kind)
    total = d.new_zeros(sel.shape).index_put((rows, cols), d).sum(1)
    return total / sel.sum(1).clamp(min=1).to(d.dtype)


def prepare_teacher(
    teacher: TeacherBatch, g_t: int, g_s: int, cfg: DistillParams | MethodSettings
) -> TeacherBatch:
    """The part of ``clip_td_loss`` that reads no student tensor: float32 image targets on the student's
    g_S x g_S grid (§2) as ``img_target``, the image token selection as ``img_select`` and the text tokens'
    relevance to the image as ``txt_relevance`` (§3; with selection on), float32 text targets as
    ``txt_target``. These replace the cached token arrays they are made from (``img_tokens``,
    ``rel_img_tokens``, ``txt_tokens``), so a prepared batch holds no second copy of them. The trainer runs it
    on the prefetch thread, on the training device, so that a step does not pay for it; the loss runs it
    itself on a batch without these keys. Returns a new dict; a prepared batch comes back as it is."""
    if "img_target" in teacher:
        return teacher
    s = _settings(cfg)
    f32 = torch.float32
    has_text = teacher["txt_lengths"].long() > 0
    e_img = teacher["img_pooled"].to(f32)
    out = {k: v for k, v in teacher.items() if k not in ("img_tokens", "rel_img_tokens", "txt_tokens")}
    out["img_target"] = t_img = resize_teacher_grid(teacher["img_tokens"].to(f32), g_t, g_s)
    out["txt_target"] = t_txt = teacher["txt_tokens"].to(f32)
    if s.select:
        # Image tokens: all g_S² are valid; relevance against the instance text, or against the image's own
        # pooled embedding when the instance has no text.
        rel_src = teacher.get("rel_img_tokens")
        rel_tok = t_img if rel_src is None else resize_teacher_grid(rel_src.to(f32), g_t, g_s)
        query = torch.where(has_text[:, None], teacher["txt_pooled"].to(f32), e_img)
        valid_v = torch.ones(t_img.shape[:2], dtype=torch.bool, device=t_img.device)
        out["img_select"] = select_tokens(cosine_relevance(rel_tok, query), valid_v, s.rho_v, s)
        # Per token, so the loss may cut it to the student's text length; which tokens are distillable
        # depends on the student's text mask, hence the text selection itself stays in the loss.
        out["txt_relevance"] = cosine_relevance(t_txt, e_img)
    return out  # type: ignore[return-value]


def clip_td_loss(
    out: StudentOutput,
    heads: DistillHeads,
    teacher: TeacherBatch,
    weights: Tensor | None,
    l_task: Tensor,
    step: int,
    total_steps: int,
    cfg: DistillParams | MethodSettings,
    g_t: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_task + λ_t · mean_n(w_n · L_KD,n) with targeted tokens (§3–§6); ``cfg`` picks the switches
    (a DistillParams resolves through its ``method``). Returns (total, detached logged parts).

    Instances without text (txt_lengths 0) distil image tokens only, scored against their own pooled
    image embedding since there is no text to score against."""
    s = _settings(cfg)
    if s.kd != "tokens":
        raise ValueError(f"clip_td_loss: method '{s.method}' is not a token-distillation method")
    check_finite("task", l_task)
    b, n_img, _ = out.image_tokens.shape
    g_s = math.isqrt(n_img)
    teacher = prepare_teacher(teacher, g_t, g_s, s)
    lengths = teacher["txt_lengths"].to(out.text_tokens.device).long()
    has_text = lengths > 0

    # Image tokens (§3): the selection was made by prepare_teacher, on the student's grid.
    t_img = teacher["img_target"]
    if t_img.shape[1] != n_img:
        raise ValueError(
            f"prepared teacher targets hold {t_img.shape[1]} image tokens, the student {n_img}: "
            "prepare_teacher was called with another student grid"
        )
    sel_v = teacher["img_select"] if s.select else torch.ones_like(t_img[..., 0], dtype=torch.bool)
    kd_img = _selected_distance(out.image_tokens, heads.h_v, t_img, sel_v, s.distance)

    # Text tokens: student position i <-> teacher position i, SOT / EOT / padding never distilled (§2).
    n = min(out.text_tokens.shape[1], teacher["txt_target"].shape[1])
    fits = lengths <= out.text_tokens.shape[1]
    if (fits & (out.text_mask.sum(1) != lengths)).any():
        raise ValueError(
            "student text and teacher text disagree: the student's text mask length differs from the cached "
            "txt_lengths (the student must read the teacher tokenizer's ids of the distill text)"
        )
    t_txt = teacher["txt_target"][:, :n]
    valid_t = distillable_text_mask(lengths, n) & out.text_mask[:, :n]
    if s.select:
        sel_t = select_tokens(teacher["txt_relevance"][:, :n], valid_t, s.rho_t, s)
    else:
        sel_t = valid_t
    kd_txt = _selected_distance(out.text_tokens[:, :n], heads.h_t, t_txt, sel_t, s.distance)

    l_kd = check_finite("kd_per_instance", kd_img + kd_txt)
    w = torch.ones_like(l_kd) if (weights is None or not s.weight) else weights.detach().to(l_kd)
    kd = check_finite("kd_weighted", (w * l_kd).mean())
    lam = balance_lambda(l_task, kd, step, total_steps, s.alpha0, s.alpha_min, s.balance, s.lambda_const)
    lam = check_finite("lambda", lam.to(kd.device))
    total = check_finite("total", l_task + lam * kd)
    logs = {
        "task": l_task,
        "kd": kd,
        "kd_img": kd_img.mean(),
        "kd_txt": kd_txt[has_text].mean() if has_text.any() else kd_txt.new_zeros(()),
        "lambda": lam,
        "weight_min": w.min(),
        "weight_max": w.max(),
        "sel_img_frac": sel_v.float().mean(),
        "sel_txt_frac": sel_t.sum() / valid_t.sum().clamp(min=1),
        "total": total,
    }
    return total, {k: torch.as_tensor(v).detach() for k, v in logs.items()}


def naive_kd_loss(
    out: StudentOutput,
    heads: DistillHeads,
    teacher: TeacherBatch,
    l_task: Tensor,
    cfg: DistillParams,
    g_t: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """All distillable tokens, w = 1, constant λ = cfg.lambda_const (1 by default)."""
    return clip_td_loss(out, heads, teacher, None, l_task, 0, 1, method_config("naive_kd", cfg), g_t)


def pooled_fd_loss(
    out: StudentOutput,
    heads: DistillHeads,
    teacher: TeacherBatch,
    l_task: Tensor,
    cfg: DistillParams | MethodSettings,
) -> tuple[Tensor, dict[str, Tensor]]:
    """h_p(student [CLS]) -> the teacher's pooled image and (when the instance has text) text embeddings,
    MSE between L2-normalised vectors (= 2 (1 - cos), see token_distance), constant λ."""
    s = _settings(cfg, "pooled_fd")
    p = heads.h_p(out.pooled).float()
    has_text = teacher["txt_lengths"].to(p.device) > 0
    d_img = token_distance(p, teacher["img_pooled"].float(), "mse")
    d_txt = token_distance(p, teacher["txt_pooled"].float(), "mse") * has_text
    kd = check_finite("pooled_fd", (d_img + d_txt).mean())
    lam = torch.tensor(float(s.lambda_const), device=kd.device)
    total = check_finite("total", l_task + lam * kd)
    logs = {"task": l_task, "kd": kd, "lambda": lam, "total": total}
    return total, {k: torch.as_tensor(v).detach() for k, v in logs.items()}


def distill_loss(
    out: StudentOutput,
    heads: DistillHeads | None,
    teacher: TeacherBatch | None,
    weights: Tensor | None,
    l_task: Tensor,
    step: int,
    total_steps: int,
    cfg: DistillParams | MethodSettings,
    g_t: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch on the method: baseline returns the task loss; the others add their KD term."""
    s = _settings(cfg)
    if s.kd == "none":
        check_finite("task", l_task)
        return l_task, {"task": l_task.detach(), "total": l_task.detach()}
    if heads is None or teacher is None:
        raise ValueError(f"method '{s.method}' needs distillation heads and a teacher batch")
    if s.kd == "pooled":
        return pooled_fd_loss(out, heads, teacher, l_task, s)
    return clip_td_loss(out, heads, teacher, weights, l_task, step, total_steps, s, g_t)
