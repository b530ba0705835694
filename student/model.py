"""Students: a compact single-stream (ViLT-style) vision-language transformer, its task heads, and a registry.

A student reads an image and token ids produced by the *teacher's* tokenizer, so student text position i
is teacher text position i (method §2) and no span mapping is needed. Every student exposes per-token
features through ``StudentOutput``; the distillation projection heads live in ``student.losses`` so that
an exported student carries no distillation-only parameters.

Text-id conventions (open_clip's tokenizer): SOT = vocab_size - 2, EOT = vocab_size - 1, padding = 0. A
row whose ids are all padding means "no text" (an unlabeled image); its text mask is all False.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import StudentParams

CLIP_VOCAB_SIZE = 49408
PAD_ID = 0


@dataclass
class StudentOutput:
    """pooled [B, d]: final-LN [CLS]; image_tokens [B, g*g, d] in row-major grid order; text_tokens [B, L, d]
    with L = max_text_len; text_mask [B, L] bool, True = real token including SOT and EOT."""

    pooled: Tensor
    image_tokens: Tensor
    text_tokens: Tensor
    text_mask: Tensor


@runtime_checkable
class StudentInterface(Protocol):
    """What the trainer and the losses rely on; any registered student must satisfy it."""

    width: int
    grid: int
    max_text_len: int

    def forward(self, pixels: Tensor, text_ids: Tensor) -> StudentOutput: ...


def fit_text(text_ids: Tensor, max_len: int, eot_id: int) -> tuple[Tensor, Tensor]:
    """Cut or pad ids to ``max_len`` and return (ids, mask).

    Cutting keeps positions 0..max_len-1 unchanged (no EOT is written into the last slot, unlike open_clip's
    tokenizer) so that student position i still matches teacher position i; a cut row has no EOT and is
    all True. Positions after the first EOT are padding."""
    ids = text_ids[:, :max_len]
    if ids.shape[1] < max_len:
        ids = F.pad(ids, (0, max_len - ids.shape[1]), value=PAD_ID)
    is_eot = ids == eot_id
    # True up to and including the first EOT: no EOT strictly before this position.
    mask = (is_eot.long().cumsum(1) - is_eot.long()) == 0
    has_text = (text_ids != PAD_ID).any(1, keepdim=True)
    return ids, mask & has_text


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"student width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout)
        )
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))
        return x + self.mlp(self.ln2(x))


class ViltStudent(nn.Module):
    """[CLS] + image patches + text tokens in one sequence; padding keys are masked out of attention."""

    def __init__(self, params: StudentParams, vocab_size: int = CLIP_VOCAB_SIZE):
        super().__init__()
        if params.image_size % params.patch_size:
            raise ValueError(
                f"student.image_size {params.image_size} is not a multiple of student.patch_size {params.patch_size}"
            )
        d = params.width
        self.width = d
        self.grid = params.image_size // params.patch_size
        self.image_size = params.image_size
        self.max_text_len = params.max_text_len
        self.vocab_size = vocab_size
        self.eot_id = vocab_size - 1
        self.patch_embed = make_stem(params.stem, d, params.patch_size)
        self.tok_embed = nn.Embedding(vocab_size, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.img_pos = nn.Parameter(torch.zeros(1, self.grid**2, d))
        self.txt_pos = nn.Parameter(torch.zeros(1, self.max_text_len, d))
        self.type_embed = nn.Embedding(2, d)  # 0 text, 1 image
        self.drop = nn.Dropout(params.dropout)
        self.blocks = nn.ModuleList(
            Block(d, params.heads, params.mlp_ratio, params.dropout) for _ in range(params.layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.apply(_init_weights)
        if params.stem == "conv":  # conv layers keep PyTorch's fan-in init; N(0, 0.02) would starve the stem
            for m in self.patch_embed.modules():
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()
        for p in (self.cls, self.img_pos, self.txt_pos):
            nn.init.normal_(p, std=0.02)
        # GPT-2's scaled init of residual projections keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * params.layers))

    def forward(self, pixels: Tensor, text_ids: Tensor) -> StudentOutput:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"student expects {self.image_size}px images, got {tuple(pixels.shape[-2:])}")
        b = pixels.shape[0]
        ids, text_mask = fit_text(text_ids, self.max_text_len, self.eot_id)
        img = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.img_pos + self.type_embed.weight[1]
        txt = self.tok_embed(ids) + self.txt_pos + self.type_embed.weight[0]
        x = self.drop(torch.cat([self.cls.expand(b, -1, -1), img, txt], dim=1))
        always = torch.ones(b, 1 + img.shape[1], dtype=torch.bool, device=x.device)
        key_mask = torch.cat([always, text_mask], dim=1)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.ln_f(x)
        g2 = img.shape[1]
        return StudentOutput(x[:, 0], x[:, 1 : 1 + g2], x[:, 1 + g2 :], text_mask)


def make_stem(kind: str, width: int, patch: int) -> nn.Module:
    """Pixels [B,3,H,W] -> [B,width,H/patch,W/patch]."""
    if kind == "patch":
        return nn.Conv2d(3, width, patch, stride=patch)
    if kind != "conv":
        raise ValueError(f"unknown student.stem {kind!r} (allowed: patch, conv)")
    if patch < 4 or patch & (patch - 1):
        raise ValueError(f"student.stem=conv needs a power-of-two student.patch_size >= 4, got {patch}")
    # Two stride-2 3x3 convs, then one conv covering the remaining patch/4 factor.
    c1, c2, rest = max(8, width // 4), max(16, width // 2), patch // 4
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2d(c2, width, rest, stride=rest),
    )  # fmt: skip


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- registry

StudentFactory = Callable[[StudentParams, int], nn.Module]
_STUDENTS: dict[str, StudentFactory] = {}


def register_student(name: str) -> Callable[[StudentFactory], StudentFactory]:
    """Decorator: make a class or factory ``(params, vocab_size) -> module`` available to ``create_student``."""

    def add(factory: StudentFactory) -> StudentFactory:
        if name in _STUDENTS:
            raise ValueError(f"student '{name}' is already registered")
        _STUDENTS[name] = factory
        return factory

    return add


def list_students() -> list[str]:
    return sorted(_STUDENTS)


def create_student(name: str, params: StudentParams, vocab_size: int = CLIP_VOCAB_SIZE) -> nn.Module:
    """The one constructor: look ``name`` (normally ``params.arch``) up in the registry and check the result."""
    if name not in _STUDENTS:
        raise ValueError(f"unknown student '{name}' (registered: {', '.join(list_students())})")
    model = _STUDENTS[name](params, vocab_size)
    if not isinstance(model, StudentInterface):
        raise TypeError(f"student '{name}' does not provide width, grid, max_text_len and forward")
    return model


register_student("vilt")(ViltStudent)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------- task heads


def _mlp_head(width: int, out: int) -> nn.Sequential:
    # ViLT's head shape: a 2x-wide hidden layer with LayerNorm before the classifier.
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out)
    )


class TaskHeads(nn.Module):
    """Task heads on the student's pooled [CLS]; part of every method's model (baseline included).

    vqa: pooled [B, d] -> [B, num_answers] logits, trained with BCE on soft VQA targets.
    snli_ve: pooled [B, d] -> [B, 3] logits (entailment, neutral, contradiction).
    vcr: pooled of each (image, question + candidate) pair [B, K, d] -> [B, K] scores, softmaxed over K;
    one head serves Q->A and QA->R."""

    def __init__(self, width: int, num_answers: int = 0, tasks: tuple[str, ...] = ("vqa", "snli_ve", "vcr")):
        super().__init__()
        self.heads = nn.ModuleDict()
        if "vqa" in tasks:
            if num_answers < 1:
                raise ValueError("the vqa head needs num_answers >= 1 (the answer vocabulary size)")
            self.heads["vqa"] = _mlp_head(width, num_answers)
        if "snli_ve" in tasks:
            self.heads["snli_ve"] = _mlp_head(width, 3)
        if "vcr" in tasks:
            self.heads["vcr"] = _mlp_head(width, 1)

    def forward(self, task: str, pooled: Tensor) -> Tensor:
        if task not in self.heads:
            raise ValueError(f"no head for task '{task}' (have: {', '.join(self.heads)})")
        out = self.heads[task](pooled)
        return out.squeeze(-1) if task == "vcr" else out

    def loss(self, task: str, pooled: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(task loss, logits). vqa target: soft scores [B, A] in [0, 1]; snli_ve / vcr target: class index [B]."""
        logits = self(task, pooled)
        if task == "vqa":
            # Summed over answers, averaged over instances: ViLT's / the VQA literature's scaling.
            loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype)) * logits.shape[1]
        else:
            loss = F.cross_entropy(logits, target)
        return loss, logits
