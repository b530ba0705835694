"""Students: a text-conditioned CNN (FiLM, the default) and a compact single-stream (ViLT-style) vision-language
transformer, their task heads, and a registry.

A student reads an image and token ids produced by the *teacher's* tokenizer, so student text position i
is teacher text position i (method §2) and no span mapping is needed. Every student exposes per-token
features through ``StudentOutput``; the distillation projection heads live in ``student.losses`` so that
an exported student carries no distillation-only parameters.

Text-id conventions (open_clip's tokenizer): SOT = vocab_size - 2, EOT = vocab_size - 1, padding = 0. A
row whose ids are all padding means "no text" (an unlabeled image); its text mask is all False.

Compact vocabulary. The data use a few dozen of the tokenizer's 49,408 ids, and a full embedding table made
every step pay a dense gradient, clip and AdamW update of 49,408 rows. ``ViltStudent.set_vocabulary`` keeps
only the rows of the ids the student can read (``text_vocabulary``) plus one unknown-id row; the student
still takes the teacher's ids, so position i is still teacher token i and only the row lookup changes. The
vocabulary is a buffer in the state dict: an exported student carries it, and loading that state into a
freshly built student adopts it, so evaluation maps ids exactly as training did.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import StudentParams


class StudentParamsError(ValueError):
    """student.* params no registered student can be built from; the message names the keys (a stage
    reports it in one line: the user fixes a param)."""


CLIP_VOCAB_SIZE = 49408
PAD_ID = 0


def text_vocabulary(token_ids: Iterable[Tensor], vocab_size: int = CLIP_VOCAB_SIZE) -> Tensor:
    """The sorted teacher ids occurring in ``token_ids`` (tensors of any shape), plus padding, SOT and EOT,
    which a student reads whatever the texts are. Depends only on the set of ids, so the same texts in
    any order give the same vocabulary."""
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    seen[[PAD_ID, vocab_size - 2, vocab_size - 1]] = True
    for ids in token_ids:
        ids = torch.as_tensor(ids).reshape(-1).long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token id outside the tokenizer's vocabulary of {vocab_size}")
        seen[ids] = True
    return seen.nonzero().flatten()


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


def images_for_texts(student: nn.Module, pixels: Tensor, k: int) -> Tensor:
    """The images to pass with k texts per image (VCR's answers and rationales): each once for a student that
    shares images (its stem runs once per image, the rest once per pair), else repeated k times."""
    return pixels if getattr(student, "shares_images", False) else pixels.repeat_interleave(k, 0)


def check_inputs(pixels: Tensor, text_ids: Tensor, image_size: int) -> tuple[int, int]:
    """(text rows, images) of a student's inputs: images of the student's size, and the same number of text
    rows for every image (text row r is read with image r // (rows / images))."""
    if pixels.shape[-2:] != (image_size, image_size):
        raise ValueError(f"student expects {image_size}px images, got {tuple(pixels.shape[-2:])}")
    b, n_img = text_ids.shape[0], pixels.shape[0]
    if b % n_img:
        raise ValueError(f"{b} text rows for {n_img} images: each image needs the same number of texts")
    return b, n_img


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """A bool mask, True with probability 1 - p (p rounded to a multiple of 2**-16), four elements per
    64-bit draw. torch's dropout draws a Bernoulli per element, which on the CPU cost 8 ns an element and
    was among the dearest ops of a default student step (torch.profiler); 16 random bits an element do."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    threshold = round(p * 65536) - 32768
    return (bits.view(torch.int16)[:n] >= threshold).view(shape)


def inverted_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout as ``F.dropout``, with the cheaper mask of ``dropout_keep_mask``; the scale uses the
    rounded p, so the expected value of every element is unchanged."""
    if not training or p == 0.0:
        return x
    p_used = round(p * 65536) / 65536
    if p_used >= 1.0:
        return x * 0.0
    keep = dropout_keep_mask(x.shape, p, x.device)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p_used))


class Dropout(nn.Dropout):
    """nn.Dropout through ``inverted_dropout`` (same arguments, same state dict: none)."""

    def forward(self, x: Tensor) -> Tensor:
        return inverted_dropout(x, self.p, self.training)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_bias: Tensor) -> Tensor:
    """Scaled dot-product attention; under CPU bfloat16 autocast (``train.precision: bf16``) computed in float32
    and cast back, because torch's CPU bfloat16 flash-attention kernel is the slow one at a text's lengths:
    forward + backward 6.0-9.4 ms against 0.65-1.32 ms in float32 at 16-32 tokens, 32 rows, 2 heads (one
    thread; the attention table of ``python -m benchmarks.bench_step_layout``). Float32 inputs, and every GPU,
    take torch's call unchanged."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_bias.float())
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))


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
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), Dropout(dropout)
        )
        self.resid_drop = Dropout(dropout)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        """x [B, N, d]; attn_bias [B, 1, 1, N]: 0 for a key that is attended to, -inf for a masked one."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.training and self.dropout > 0:
            # Attention by hand only to drop attention weights with the cheaper mask; no dropout: SDPA.
            att = torch.add(attn_bias, q @ k.transpose(-2, -1), alpha=1.0 / math.sqrt(d // self.heads))
            y = inverted_dropout(att.softmax(-1), self.dropout, True) @ v
        else:
            y = attention(q, k, v, attn_bias)
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))
        return x + self.mlp(self.ln2(x))


class CompactVocabulary:
    """The compact token table both students share: ``tok_embed`` holds rows only for ``token_ids`` plus one
    unknown-id row (module docstring). The host module provides ``tok_embed``, ``vocab_size``, ``width`` and
    registers the ``token_ids`` (persistent) and ``row_of`` buffers as None."""

    def set_vocabulary(self, token_ids: Tensor | Iterable[int] | None) -> None:
        """Keep only the embedding rows of ``token_ids`` (sorted unique teacher ids) plus a last row that every
        other id maps to; None goes back to one row per tokenizer id. A kept id keeps its current row; the
        unknown row starts at zero (an unseen id then adds only its position and type embedding). A no-op
        when the vocabulary is already this one, so an optimizer holding the table stays valid."""
        w = self.tok_embed.weight
        if token_ids is None:
            if self.token_ids is None:
                return
            table = w.new_zeros(self.vocab_size, self.width)
            table[self.token_ids] = w.detach()[:-1]
            self.token_ids = self.row_of = None
        else:
            ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().to(w.device)
            if ids.numel() and (
                bool((ids[1:] <= ids[:-1]).any()) or ids[0] < 0 or ids[-1] >= self.vocab_size
            ):
                raise ValueError(f"a student vocabulary is sorted unique token ids in [0, {self.vocab_size})")
            if self.token_ids is not None and torch.equal(ids, self.token_ids):
                return
            rows = self._rows(ids) if self.token_ids is not None else ids
            unk = w.detach()[-1:] if self.token_ids is not None else w.new_zeros(1, self.width)
            table = torch.cat([w.detach()[rows], unk])
            row_of = torch.full((self.vocab_size,), len(ids), dtype=torch.long, device=w.device)
            row_of[ids] = torch.arange(len(ids), device=w.device)
            self.token_ids, self.row_of = ids, row_of
        self.tok_embed = nn.Embedding.from_pretrained(table.clone(), freeze=False)

    def _rows(self, ids: Tensor) -> Tensor:
        """Embedding rows of teacher ids: the ids themselves under the full vocabulary."""
        return ids if self.row_of is None else self.row_of[ids]

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """``tok_embed`` of teacher ids, under whichever vocabulary the student holds (a plugin's way in)."""
        return self.tok_embed(self._rows(ids))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # The vocabulary comes with the weights: a student built from params alone (evaluation) adopts the
        # exported one before its embedding rows are copied in.
        ids = state_dict.get(prefix + "token_ids")
        table = state_dict.get(prefix + "tok_embed.weight")
        if ids is not None:
            self.set_vocabulary(ids)
        elif table is not None and table.shape[0] == self.vocab_size:
            self.set_vocabulary(None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class ViltStudent(CompactVocabulary, nn.Module):
    """[CLS] + image patches + text tokens in one sequence; padding keys are masked out of attention."""

    def __init__(self, params: StudentParams, vocab_size: int = CLIP_VOCAB_SIZE):
        super().__init__()
        if params.image_size % params.patch_size:
            raise StudentParamsError(
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
        self.drop = Dropout(params.dropout)
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
        # Full vocabulary until set_vocabulary: the table is drawn whole, so a seed gives the same weights
        # (every kept row included) with or without a compact vocabulary.
        self.register_buffer("token_ids", None)
        self.register_buffer("row_of", None, persistent=False)

    # forward takes one image per k consecutive text rows (pixels [B], text_ids [B*k, L]); see forward_task.
    shares_images = True

    def forward(self, pixels: Tensor, text_ids: Tensor) -> StudentOutput:
        """pixels [B_img, 3, H, W]; text_ids [B, L] with B a multiple of B_img: text row r is read with image
        r // (B / B_img), as if each image were repeated B / B_img times."""
        b, n_img = check_inputs(pixels, text_ids, self.image_size)
        ids, text_mask = fit_text(text_ids, self.max_text_len, self.eot_id)
        # Only up to the batch's longest real text enters the sequence: later slots are padding in every row,
        # masked out as keys, so they change no real token's output; they come back as zeros, which no loss
        # reads (the losses read text_mask's positions only). Texts are short (VQA: 13 of 32 slots).
        n_txt = int(text_mask.sum(1).max()) if text_mask.numel() else 0
        # channels_last: oneDNN's convolutions run without layout reorders (the stem's forward + backward took
        # 25% less on the CPU); the patch tokens then come out contiguous.
        patches = self.patch_embed(pixels.contiguous(memory_format=torch.channels_last))
        # Position + type summed on the small [1, n, d] tables first: one add over the batch, not two.
        img = patches.flatten(2).transpose(1, 2) + (self.img_pos + self.type_embed.weight[1])
        if (
            b != n_img
        ):  # the stem once per image, not once per (image, text) pair: VCR pairs 8 texts with each
            img = img.repeat_interleave(b // n_img, 0)
        txt = self.tok_embed(self._rows(ids[:, :n_txt])) + (
            self.txt_pos[:, :n_txt] + self.type_embed.weight[0]
        )
        x = self.drop(torch.cat([self.cls.expand(b, -1, -1), img, txt], dim=1))
        always = torch.ones(b, 1 + img.shape[1], dtype=torch.bool, device=x.device)
        key_mask = torch.cat([always, text_mask[:, :n_txt]], dim=1)
        attn_bias = torch.zeros(key_mask.shape, dtype=x.dtype, device=x.device).masked_fill_(
            ~key_mask, -math.inf
        )
        for block in self.blocks:
            x = block(x, attn_bias[:, None, None, :])
        x = self.ln_f(x)
        g2 = img.shape[1]
        text_tokens = F.pad(x[:, 1 + g2 :], (0, 0, 0, self.max_text_len - n_txt))
        return StudentOutput(x[:, 0], x[:, 1 : 1 + g2], text_tokens, text_mask)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """F.gelu over the memory order of a channels_last tensor: torch's GELU took 1.7x longer (forward) on a
    channels_last layout than on the same bytes read as one contiguous NHWC tensor (ViLT's stem), and at the
    FiLM blocks' maps forward + backward 11-20% longer (the GELU table of ``python -m
    benchmarks.bench_step_layout``). The values are those of torch's contiguous kernel, i.e. of the NCHW map;
    F.gelu on channels_last takes another kernel, whose float32 values differ in the last bit."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return F.gelu(x.permute(0, 2, 3, 1), approximate=approximate).permute(0, 3, 1, 2)
    return F.gelu(x, approximate=approximate)


class _GELU(nn.GELU):
    """nn.GELU through ``gelu`` (same arguments, same state dict: none)."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x, self.approximate)


def make_stem(kind: str, width: int, patch: int) -> nn.Module:
    """Pixels [B,3,H,W] -> [B,width,H/patch,W/patch]."""
    if kind == "patch":
        return nn.Conv2d(3, width, patch, stride=patch)
    if kind != "conv":
        raise StudentParamsError(f"unknown student.stem {kind!r} (allowed: patch, conv)")
    if patch < 4 or patch & (patch - 1):
        raise StudentParamsError(
            f"student.stem=conv needs a power-of-two student.patch_size >= 4, got {patch}"
        )
    # Two stride-2 3x3 convs, then one conv covering the remaining patch/4 factor.
    c1, c2, rest = max(8, width // 4), max(16, width // 2), patch // 4
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, stride=2, padding=1), _GELU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), _GELU(),
        nn.Conv2d(c2, width, rest, stride=rest),
    )  # fmt: skip


class FilmStudent(CompactVocabulary, nn.Module):
    """A text-conditioned CNN (FiLM: Perez et al. 2018): a one-layer text transformer summarises the text, and
    that summary scales and shifts every channel of ``layers`` residual conv blocks over the image.

    Why a second student: on the embedded world, whose labels each need the text and the image together
    ("the yellow object is a triangle": find the yellow object, then check its shape), the ViLT student
    trained from labels alone stayed at chance on SNLI-VE after 1,000 full-data steps, while this one
    learns it (docs/training.md). Conditioning every conv channel on the text is the inductive bias that
    makes "find what the text names, then look at it" cheap to learn at this size.

    Tokens for distillation: image_tokens are the last block's feature map average-pooled to the
    image_size / patch_size grid (text-conditioned, as a single-stream student's image tokens are);
    text_tokens are the text transformer's outputs at the teacher's positions; pooled joins the map's
    max-pool and the text summary."""

    shares_images = True

    def __init__(self, params: StudentParams, vocab_size: int = CLIP_VOCAB_SIZE):
        super().__init__()
        s, patch = params.image_size, params.patch_size
        if s % 4 or s % patch or patch < 4 or patch & (patch - 1):
            raise StudentParamsError(
                f"student.arch=film needs student.image_size ({s}) divisible by 4 and by a power-of-two "
                f"student.patch_size >= 4 (got {patch})"
            )
        d = params.width
        self.width, self.image_size, self.max_text_len = d, s, params.max_text_len
        self.grid = s // patch
        self.vocab_size, self.eot_id = vocab_size, vocab_size - 1
        self.n_blocks = params.layers
        self.tok_embed = nn.Embedding(vocab_size, d)
        self.txt_pos = nn.Parameter(torch.randn(1, self.max_text_len, d) * 0.02)
        self.text_block = Block(d, params.heads, params.mlp_ratio, params.dropout)
        self.ln_t = nn.LayerNorm(d)
        # Two stride-2 convs: the FiLM blocks work at a quarter of the image size (16 x 16 for 64 px), fine
        # enough that one cell holds one small object.
        half = max(8, d // 2)
        self.stem = nn.Sequential(nn.Conv2d(3, half, 3, 2, 1), _GELU(), nn.Conv2d(half, d, 3, 2, 1), _GELU())
        self.convs = nn.ModuleList(nn.Conv2d(d, d, 3, padding=1) for _ in range(params.layers))
        # GroupNorm over the whole map (one group): per sample, so a step does not depend on what else is in
        # the batch (BatchNorm made two DDP ranks differ from one process, and VCR's repeated images count
        # k times).
        self.norms = nn.ModuleList(nn.GroupNorm(1, d, affine=False) for _ in range(params.layers))
        self.film = nn.Linear(d, 2 * d * params.layers)
        self.drop = Dropout(params.dropout)
        self.out = nn.Sequential(nn.Linear(2 * d, d), nn.LayerNorm(d))
        self.register_buffer("token_ids", None)
        self.register_buffer("row_of", None, persistent=False)

    def forward(self, pixels: Tensor, text_ids: Tensor) -> StudentOutput:
        """As ``ViltStudent.forward``: pixels [B_img, 3, H, W], text_ids [B, L] with B a multiple of B_img."""
        b, _ = check_inputs(pixels, text_ids, self.image_size)
        ids, text_mask = fit_text(text_ids, self.max_text_len, self.eot_id)
        n_txt = max(1, int(text_mask.sum(1).max()) if text_mask.numel() else 1)
        mask = text_mask[:, :n_txt]
        t = self.tok_embed(self._rows(ids[:, :n_txt])) + self.txt_pos[:, :n_txt]
        # A row without text (an unlabeled image) attends to its first slot so that softmax stays finite;
        # its summary is zeroed below, so the image blocks see no text.
        keys = mask.clone()
        keys[:, 0] |= ~mask.any(1)
        bias = torch.zeros(keys.shape, dtype=t.dtype, device=t.device).masked_fill_(~keys, -math.inf)
        t = self.ln_t(self.text_block(self.drop(t), bias[:, None, None, :]))
        m = mask[..., None].to(t.dtype)
        summary = (t * m).sum(1) / m.sum(1).clamp(min=1.0)
        gamma_beta = self.film(summary).view(b, self.n_blocks, 2, self.width, 1, 1)
        z = self.image_trunk(pixels, gamma_beta)
        pooled = self.out(torch.cat([z.amax((2, 3)), summary], 1))
        image_tokens = F.adaptive_avg_pool2d(z, self.grid).flatten(2).transpose(1, 2)
        text_tokens = F.pad(t * m, (0, 0, 0, self.max_text_len - n_txt))
        return StudentOutput(pooled, image_tokens, text_tokens, text_mask)

    def image_trunk(self, pixels: Tensor, gamma_beta: Tensor) -> Tensor:
        """pixels [B_img, 3, H, W], gamma_beta [B, layers, 2, width, 1, 1] -> the last block's map [B, width,
        H/4, W/4]. Every shape in it is fixed by the batch size, so it is the part a benchmark can hand to
        ``torch.compile`` whole (the text side cuts at the batch's longest text)."""
        b, n_img = gamma_beta.shape[0], pixels.shape[0]
        z = self.stem(pixels)
        if b != n_img:  # the stem once per image; the FiLM blocks once per (image, text) pair
            z = z.repeat_interleave(b // n_img, 0)
        for k in range(self.n_blocks):
            y = self.norms[k](self.convs[k](z)) * (1 + gamma_beta[:, k, 0]) + gamma_beta[:, k, 1]
            z = z + self.drop(gelu(y))
        return z


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- registry

StudentFactory = Callable[[StudentParams, int], nn.Module]
_STUDENTS: dict[str, StudentFactory] = {}
# Installed packages offer students under this entry-point group (``name = "package.module:Factory"``), so the
# stages build them from ``student.arch`` alone. Only code the user installed is ever imported: a name read
# from a params file or an exported student selects among installed entry points, never a module to import.
PLUGIN_GROUP = "clip_td.students"


def register_student(name: str) -> Callable[[StudentFactory], StudentFactory]:
    """Decorator: make a class or factory ``(params, vocab_size) -> module`` available to ``create_student``."""

    def add(factory: StudentFactory) -> StudentFactory:
        if name in _STUDENTS:
            raise ValueError(f"student '{name}' is already registered")
        _STUDENTS[name] = factory
        return factory

    return add


def _installed_students() -> dict[str, Any]:
    """Entry points of ``PLUGIN_GROUP`` by name (each loaded only when its name is asked for)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}


def _load_installed(name: str) -> None:
    ep = _installed_students().get(name)
    if ep is None:
        return
    where = f"the entry point {name} = {ep.value!r} of group {PLUGIN_GROUP}" + (
        f" (package {ep.dist.name})" if getattr(ep, "dist", None) is not None else ""
    )
    try:
        factory = ep.load()
    except Exception as e:  # an installed plugin's own import error: say whose it is
        raise StudentParamsError(
            f"student.arch '{name}': {where} failed to load ({type(e).__name__}: {e})"
        ) from e
    if not callable(factory):
        raise StudentParamsError(f"student.arch '{name}': {where} is not a class or factory")
    if name not in _STUDENTS:  # importing it may have registered it already, with @register_student
        register_student(name)(factory)


def list_students() -> list[str]:
    """Every name ``student.arch`` can take: the registered students and the installed plugins'."""
    return sorted(set(_STUDENTS) | set(_installed_students()))


def create_student(
    name: str,
    params: StudentParams,
    vocab_size: int = CLIP_VOCAB_SIZE,
    vocabulary: Tensor | Iterable[int] | None = None,
) -> nn.Module:
    """The one constructor: look ``name`` (normally ``params.arch``) up in the registry and check the result.
    ``vocabulary`` (``text_vocabulary``'s ids) gives the student a compact embedding table; the student must
    then provide ``set_vocabulary``. A name nobody registered is looked up among installed plugins
    (``PLUGIN_GROUP``)."""
    if name not in _STUDENTS:
        _load_installed(name)
    if name not in _STUDENTS:
        raise StudentParamsError(
            f"unknown student.arch '{name}' (available: {', '.join(list_students())}; a package adds one "
            f"under the entry-point group {PLUGIN_GROUP})"
        )
    model = _STUDENTS[name](params, vocab_size)
    if not isinstance(model, StudentInterface):
        raise TypeError(f"student '{name}' does not provide width, grid, max_text_len and forward")
    if vocabulary is not None:
        if not hasattr(model, "set_vocabulary"):
            raise TypeError(f"student '{name}' has no set_vocabulary: it cannot take a compact vocabulary")
        model.set_vocabulary(vocabulary)
    return model


register_student("vilt")(ViltStudent)
register_student("film")(FilmStudent)


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
