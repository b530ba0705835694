"""The frozen open_clip teacher: the one way every stage loads it and reads its per-token outputs.

docs/method.md §1 defines what the cache holds; this module computes exactly that, so extraction,
verification and any on-the-fly use agree to the bit:

* image ``tokens`` [B, P, E]: the last block's patch outputs (CLS / prefix excluded) through the visual
  tower's final norm ``ln_post`` and projection ``proj`` — the same head that turns the CLS token into the
  pooled embedding, so patch tokens live in the joint space and are comparable with text embeddings;
* image ``pooled`` [B, E]: ``model.encode_image`` output, unnormalised;
* text ``tokens`` [B, ctx, E]: the last block's states at every position through ``ln_final`` and the text
  projection; ``pooled`` [B, E] = ``model.encode_text`` (open_clip pools one of these positions, EOT for
  the standard tokenizer); ``lengths`` = EOT index + 1 (the caller keeps SOT … EOT).

Relevance sources (docs/method.md §3), optional per call:

* ``value``: MaskCLIP (Zhou et al., ECCV 2022) value tokens. The last block is run on its input with the
  attention restricted to the identity (each patch attends only to itself), so the attention output is
  ``out_proj(v_proj(ln_1(x)))``; the block's residual and MLP follow as in MaskCLIP's reference code, then
  ``ln_post`` and ``proj``. Restricting attention this way reuses open_clip's own block (any block type,
  layer scale, head scale) instead of re-implementing it.
* ``intermediate``: the patch outputs of layer ``n_layers // 2`` (i.e. after that many blocks) through
  ``ln_post`` and ``proj``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .names import RELEVANCE_SOURCES


class TeacherError(RuntimeError):
    """The teacher cannot be built or used; the message names the model / checkpoint at fault."""


# The folder holding the pipeline package: the checkout, or site-packages for an installed copy.
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def register_model(model: str) -> str:
    """Resolve ``model`` (an open_clip model name or a path to a model-config JSON) to an open_clip name.

    A JSON path is registered with open_clip under its file stem, which is what open_clip's factory looks up.
    """
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")):
        return model  # open_clip resolves these schemas itself
    if model.endswith(".json") or Path(model).is_file():
        path = Path(model)
        if not path.is_file() and not path.is_absolute() and (_PACKAGE_ROOT / path).is_file():
            # A config this package ships (pipeline/model_configs/…), as dvc.yaml and every export name it,
            # read from another working directory (predicting or evaluating outside the checkout).
            path = _PACKAGE_ROOT / path
        if not path.is_file():
            raise TeacherError(f"teacher model config '{model}': file not found")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TeacherError(f"teacher model config '{model}': unreadable or not valid JSON: {e}") from e
        missing = [
            k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg
        ]
        if missing:
            # open_clip silently ignores such files, which would surface later as a confusing 'not found'.
            raise TeacherError(
                f"teacher model config '{model}': missing keys {missing} of an open_clip model config"
            )
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(model) is None:
        raise TeacherError(
            f"teacher model '{model}': neither a model-config JSON path nor an open_clip model name "
            f"(known names include {', '.join(open_clip.list_models()[:8])}, …)"
        )
    return model


def pretrained_kind(name: str, pretrained: str) -> Literal["random", "file", "tag"]:
    """What ``pretrained`` names for the open_clip model ``name``: nothing ("random"), a local checkpoint file
    ("file") or an open_clip pretrained tag ("tag"). A value that looks like a path but names no file, or that
    is neither a file nor a tag, fails naming it. Loading a teacher and checking a store's teacher against
    the params both decide by this, so the check cannot pass over a value that loading refuses."""
    import open_clip

    if not pretrained:
        return "random"
    if Path(pretrained).is_file():
        return "file"
    if open_clip.get_pretrained_cfg(name, pretrained):
        return "tag"
    if os.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz"):
        raise TeacherError(f"teacher checkpoint '{pretrained}' (for model '{name}'): file not found")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise TeacherError(
        f"teacher pretrained '{pretrained}' for model '{name}': not a file and not a known open_clip tag "
        f"(tags for this model: {tags or 'none'})"
    )


def configured_resize_mode(model: str, pretrained: str) -> str | None:
    """The preprocess ``resize_mode`` open_clip gives ``model`` with ``pretrained``, read from its configs
    without loading weights (open_clip takes it from a pretrained tag's config or a local-dir's
    open_clip_config.json; a checkpoint file or random init keep the default "shortest"). None where only a
    hub config would say (``hf-hub:`` names): the store's record or the loaded teacher decides there."""
    if model.startswith("hf-hub:"):
        return None
    if model.startswith("local-dir:"):
        cfg_path = Path(model.removeprefix("local-dir:")) / "open_clip_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TeacherError(f"teacher '{model}': cannot read {cfg_path}: {e}") from None
        pp = cfg.get("preprocess_cfg") if isinstance(cfg, dict) else None
        return (pp.get("resize_mode") if isinstance(pp, dict) else None) or "shortest"
    name = register_model(model)
    if pretrained_kind(name, pretrained) != "tag":
        return "shortest"
    import open_clip

    return open_clip.get_pretrained_cfg(name, pretrained).get("resize_mode") or "shortest"


def _resolve_pretrained(name: str, pretrained: str) -> tuple[str | None, str]:
    """(value for open_clip, kind) with kind one of 'random', 'file', 'tag'; fails naming what is missing."""
    kind = pretrained_kind(name, pretrained)
    if kind == "tag":
        found, looked, fix = tag_weights(name, pretrained)
        if found is None and _offline():
            # Offline, open_clip would try the download anyway and fail several lines later without saying
            # where the weights were expected.
            raise TeacherError(
                f"teacher '{name}' pretrained '{pretrained}': weights not found offline (HF_HUB_OFFLINE): "
                f"looked for {looked}; {fix}"
            )
    return (None if kind == "random" else pretrained), kind


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (at its import) or as set since."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def tag_weights(name: str, tag: str) -> tuple[str | None, str, str]:
    """Where open_clip finds the weights of a pretrained tag without a download, found or not:
    (the cached file or None, what was looked for and where, how to put it there). Mirrors
    ``open_clip.pretrained.download_pretrained``: the Hugging Face Hub cache when the tag has a hub entry and
    huggingface_hub is installed, else open_clip's URL cache (~/.cache/clip)."""
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import has_hf_hub

    cfg = open_clip.get_pretrained_cfg(name, tag)
    local = "or pass a local checkpoint file as teacher.pretrained" + (
        f" with teacher.model {name}-quickgelu (these weights use QuickGELU)" if cfg.get("quick_gelu") else ""
    )
    if cfg.get("file"):
        path = str(cfg["file"])
        return (path if Path(path).is_file() else None), f"file {path}", f"put the weights file at {path}"
    if has_hf_hub() and cfg.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        # open_clip tries a safetensors copy of the file first.
        if filename == HF_WEIGHTS_NAME:
            names = [HF_SAFE_WEIGHTS_NAME, filename]
        elif filename.endswith((".bin", ".pth")):
            names = [filename[:-4] + ".safetensors", filename]
        else:
            names = [filename]
        for candidate in names:
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return found, "", ""
        cache = constants.HF_HUB_CACHE
        return (
            None,
            f"Hugging Face repo {repo} file {' or '.join(names)} in the hub cache {cache}",
            f"fetch it once where there is network (huggingface-cli download {repo} {names[0]}) and copy that "
            f"machine's hub cache to {cache} (or point HF_HUB_CACHE at the copy), {local}",
        )
    url = cfg.get("url", "")
    target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
    return (
        (target if os.path.isfile(target) else None),
        f"file {target} (open_clip's download cache)",
        f"download {url} to {target}, {local}",
    )


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting, or None for plain fp32.

    "auto" uses bf16 on CUDA where supported (no loss scaling needed), else fp16, and fp32 on CPU, where
    reduced precision is slower and only adds error.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"precision {precision!r}: expected auto, fp32, fp16 or bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def _split_preprocess(preprocess: Any) -> tuple[list, Any]:
    """Split open_clip's eval Compose into the PIL part (resize, crop, mode) and the Normalize at the end.

    Running the PIL part once and keeping uint8 lets callers hold a whole corpus in memory; ``ToTensor``
    is then just ``/255``, so the result equals ``preprocess(img)`` exactly.
    """
    transforms = list(getattr(preprocess, "transforms", []))
    idx = next((i for i, t in enumerate(transforms) if "ToTensor" in type(t).__name__), None)
    if idx is None:
        raise TeacherError(f"unexpected open_clip preprocess (no ToTensor step): {preprocess}")
    return transforms[:idx], transforms[idx + 1 :]


class Teacher:
    """A frozen open_clip CLIP model with the token-level outputs docs/method.md §1 caches.

    Every output is float32 on ``self.device``. Build one with :func:`create_teacher`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        preprocess: Any,
        *,
        name: str,
        model_source: str = "",
        pretrained: str = "",
        pretrained_kind: str = "random",
        device: str | torch.device = "cpu",
        precision: str = "auto",
    ):
        import open_clip

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.model_source = model_source or name
        self.pretrained = pretrained
        self.pretrained_kind = pretrained_kind
        self.precision = precision
        self._amp = autocast_dtype(self.device, precision)
        self._pil_steps, _ = _split_preprocess(preprocess)
        self._check_supported()

        visual = self.model.visual
        gh, gw = visual.grid_size
        if gh != gw:
            raise TeacherError(f"teacher '{name}': non-square patch grid {gh}x{gw} is not supported")
        self.grid: int = int(gh)
        self.num_patches: int = self.grid * self.grid
        self.n_layers: int = len(visual.transformer.resblocks)
        # The output width of the projection is E; fall back to the final norm width without a projection.
        self.embed_dim: int = int(visual.proj.shape[1]) if visual.proj is not None else int(visual.output_dim)
        self.context_length: int = int(self.model.context_length)
        self.logit_scale: float = float(self.model.logit_scale.detach().exp().float().reshape(-1)[0])
        cfg = dict(visual.preprocess_cfg)
        self.image_size: int = int(to_pair(cfg["size"])[0])
        # Which region of a non-square image the eval transform shows (the pretrained tag's config picks it).
        self.resize_mode: str = cfg.get("resize_mode") or "shortest"
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.open_clip_version = open_clip.__version__

    # ------------------------------------------------------------------ architecture checks
    def _check_supported(self) -> None:
        from open_clip.transformer import TextTransformer, VisionTransformer

        visual = self.model.visual
        if not isinstance(visual, VisionTransformer):
            raise TeacherError(
                f"teacher '{self.name}': visual tower {type(visual).__name__} has no patch tokens of the kind "
                "docs/method.md §1 needs (only open_clip's VisionTransformer is supported)"
            )
        if visual.attn_pool is not None:
            # With an attentional pooler the pooled vector is not ln_post/proj of any token: tokens and pooled
            # would not share a head, so patch tokens would not be in the joint space.
            raise TeacherError(f"teacher '{self.name}': attentional-pool visual towers are not supported")
        text = getattr(self.model, "text", None)
        if text is not None:
            if not isinstance(text, TextTransformer):
                raise TeacherError(
                    f"teacher '{self.name}': text tower {type(text).__name__} is not supported"
                )
            if text.cls_emb is not None:
                raise TeacherError(
                    f"teacher '{self.name}': text towers with an appended CLS (CoCa) are not supported"
                )

    # ------------------------------------------------------------------ preprocessing helpers
    def pil_to_uint8(self, img: Any) -> Tensor:
        """PIL image -> uint8 [3, H, W] after the eval resize/crop; ``normalize_uint8`` finishes preprocess."""
        import numpy as np

        for t in self._pil_steps:
            img = t(img)
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def normalize_uint8(self, u8: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] (any device) -> normalised float pixels, equal to stacking ``preprocess``."""
        x = u8.float().div_(255.0)
        # In place: the same operations in the same order (bit-identical), without two more batch-sized
        # float buffers (at 224 px a batch of 128 is 77 MB each; on a CPU teacher that halved the time).
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    # ------------------------------------------------------------------ encoding
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp)

    def _visual_head(self, x: Tensor) -> Tensor:
        visual = self.model.visual
        x = visual.ln_post(x)
        return x @ visual.proj if visual.proj is not None else x

    def _text_head(self, x: Tensor) -> Tensor:
        text = getattr(self.model, "text", self.model)
        x = text.ln_final(x)
        proj = text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def _identity_attention_block(self, x: Tensor) -> Tensor:
        """The last visual block with attention restricted to the diagonal (MaskCLIP's value path).

        Each token then attends only to itself, so the attention output is out_proj(v_proj(ln_1(x))) and the
        result for a token does not depend on the others: running it on patch tokens alone is exact.
        """
        transformer = self.model.visual.transformer
        block = transformer.resblocks[-1]
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf"), device=x.device, dtype=torch.float32)
        mask.fill_diagonal_(0.0)
        if not transformer.batch_first:
            return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        return block(x, attn_mask=mask)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, relevance: Sequence[str] = ()) -> dict[str, Tensor]:
        """Preprocessed pixels [B, 3, H, W] -> ``tokens`` [B, P, E], ``pooled`` [B, E], plus one [B, P, E]
        entry per requested relevance source (``value``, ``intermediate``)."""
        unknown = [r for r in relevance if r not in RELEVANCE_SOURCES]
        if unknown:
            raise ValueError(f"unknown relevance source(s) {unknown}; allowed {RELEVANCE_SOURCES}")
        n = self.n_layers
        mid = max(n // 2, 1) - 1  # block index whose output is "layer n//2"
        want = {n - 1}
        if "intermediate" in relevance:
            want.add(mid)
        if "value" in relevance and n >= 2:
            want.add(n - 2)  # the last block's input
        indices = sorted(want)
        pixels = pixels.to(self.device)
        with self._autocast():
            out = self.model.forward_intermediates(
                image=pixels,
                image_indices=indices,
                image_output_fmt="NLC",
                image_output_extra_tokens=False,
                normalize=False,
            )
            inter = dict(zip(indices, out["image_intermediates"], strict=True))
            result = {"tokens": self._visual_head(inter[n - 1]), "pooled": out["image_features"]}
            if "value" in relevance:
                x_in = inter[n - 2] if n >= 2 else self.model.visual._embeds(pixels)[:, 1:]
                result["value"] = self._visual_head(self._identity_attention_block(x_in))
            if "intermediate" in relevance:
                result["intermediate"] = self._visual_head(inter[mid])
        return {k: v.float() for k, v in result.items()}

    def text_lengths(self, token_ids: Tensor) -> Tensor:
        """EOT index + 1 per row, located the way open_clip pools text (``argmax`` / ``eos``)."""
        text = getattr(self.model, "text", None)
        pool = text.pool_type if text is not None else self.model.text_pool_type
        eos = text.eos_id if text is not None else getattr(self.model, "text_eos_id", None)
        if pool == "argmax":
            idx = token_ids.argmax(dim=-1)
        else:
            # 'eos' pools at the first eos id; for 'first'/'last' pooling the EOT still ends the text.
            if pool != "eos":
                eos = getattr(self.tokenizer, "eot_token_id", eos)
            if eos is None:
                idx = token_ids.argmax(dim=-1)
            else:
                idx = (token_ids == eos).int().argmax(dim=-1)
        return (idx + 1).long()

    @torch.no_grad()
    def encode_texts(self, token_ids: Tensor) -> dict[str, Tensor]:
        """Token ids [B, ctx] -> ``tokens`` [B, ctx, E] (every position), ``pooled`` [B, E], ``lengths`` [B]."""
        ids = token_ids.to(self.device)
        with self._autocast():
            out = self.model.forward_intermediates(text=ids, text_indices=1, normalize=False)
            tokens = self._text_head(out["text_intermediates"][-1])
            pooled = out["text_features"]
        return {"tokens": tokens.float(), "pooled": pooled.float(), "lengths": self.text_lengths(ids)}

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts))

    # ------------------------------------------------------------------ provenance
    def describe(self) -> dict:
        """JSON-able provenance: what the cache's store attrs record about the teacher."""
        import open_clip

        if self.pretrained_kind == "file":
            checksum = sha256_file(self.pretrained)
        else:
            checksum = self.pretrained  # a tag names its weights; random init has none
        pp = dict(self.model.visual.preprocess_cfg)
        info = {
            "model": self.name,
            "model_source": self.model_source,
            "model_config": open_clip.get_model_config(self.name),
            "pretrained": self.pretrained,
            "pretrained_kind": self.pretrained_kind,
            "pretrained_checksum": checksum,
            "preprocess": {
                "image_size": list(to_pair(pp.get("size"))),
                "mean": list(pp.get("mean", ())),
                "std": list(pp.get("std", ())),
                "interpolation": pp.get("interpolation"),
                "resize_mode": pp.get("resize_mode"),
            },
            "embed_dim": self.embed_dim,
            "num_patches": self.num_patches,
            "grid": self.grid,
            "context_length": self.context_length,
            "visual_layers": self.n_layers,
            "intermediate_layer": max(self.n_layers // 2, 1),
            "logit_scale": self.logit_scale,
            "tokenizer": type(self.tokenizer).__name__,
            "precision": self.precision,
            "open_clip_version": open_clip.__version__,
        }
        return json.loads(json.dumps(info))  # fail here, not in a store writer, if something is not JSON-able


def to_pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def create_teacher(
    model: str, pretrained: str = "", device: str | torch.device = "cpu", precision: str = "auto"
) -> Teacher:
    """Load a frozen teacher.

    model: an open_clip model name (``ViT-B-32``) or a path to an open_clip model-config JSON (registered under
    its file stem). pretrained: an open_clip tag, a local checkpoint path, or "" for random init.
    """
    import open_clip

    name = register_model(model)
    source, kind = _resolve_pretrained(name, pretrained)
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=source, device="cpu")
    except TeacherError:
        raise
    except Exception as e:  # torch.load / state-dict mismatch / download failure: say which file and model
        what = (
            f"checkpoint '{pretrained}'"
            if kind == "file"
            else f"pretrained tag '{pretrained}'"
            if source
            else ""
        )
        reason = " ".join(str(e).split()) or type(e).__name__
        if kind == "tag":
            _, looked, fix = tag_weights(name, pretrained)
            if looked:  # the download failed: say where open_clip looked and how to place the weights
                reason = f"{reason}; looked for {looked}; {fix}"
        raise TeacherError(
            f"teacher '{model}' ({name}){': cannot load ' + what if what else ''}: {reason}"
        ) from e
    tokenizer = open_clip.get_tokenizer(name)
    return Teacher(
        net,
        tokenizer,
        preprocess,
        name=name,
        model_source=model,
        pretrained=pretrained,
        pretrained_kind=kind,
        device=device,
        precision=precision,
    )


__all__ = [
    "RELEVANCE_SOURCES",
    "Teacher",
    "TeacherError",
    "autocast_dtype",
    "create_teacher",
    "register_model",
    "sha256_file",
    "tag_weights",
]
