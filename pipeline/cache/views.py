"""Augmented views: the crop box and flip of each cached view, drawn from the image content, and replaying
one on a PIL image."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# open_clip's eval transform per preprocess ``resize_mode`` (the teacher's pretrained config picks it: SigLIP,
# CLIPA and DFN weights squash): "shortest" resizes the short side and keeps the centre square, "squash" resizes
# the whole image to the square, "longest" resizes the long side and pads the rest with black.
RESIZE_MODES = ("shortest", "squash", "longest")


def _mode(resize_mode: str | None) -> str:
    mode = resize_mode or "shortest"
    if mode not in RESIZE_MODES:
        raise ValueError(
            f"unknown image resize_mode {resize_mode!r} (open_clip knows {', '.join(RESIZE_MODES)})"
        )
    return mode


def eval_view_box(
    width: int, height: int, resize_mode: str | None = "shortest"
) -> tuple[float, float, float, float]:
    """The region open_clip's eval transform shows, normalised to the image: the centre square ("shortest",
    the default, also for None), the whole image ("squash"), or a square around it reaching past the short side,
    which ``apply_view`` fills with black ("longest")."""
    mode = _mode(resize_mode)
    if mode == "squash":
        return (0.0, 0.0, 1.0, 1.0)
    side = min(width, height) if mode == "shortest" else max(width, height)
    x0, y0 = (width - side) / 2 / width, (height - side) / 2 / height
    return (x0, y0, 1.0 - x0, 1.0 - y0)


def eval_view_pixels(
    width: int, height: int, resize_mode: str | None = "shortest"
) -> tuple[int, int, int, int]:
    """``eval_view_box`` in whole pixels (left, top, right, bottom), square by construction for "shortest" and
    "longest" (rounding both ends of the normalised box can leave it a pixel off square when the sides differ
    by an odd number); the whole image for "squash"."""
    mode = _mode(resize_mode)
    if mode == "squash":
        return (0, 0, width, height)
    side = min(width, height) if mode == "shortest" else max(width, height)
    left, top = round((width - side) / 2), round((height - side) / 2)
    return (left, top, left + side, top + side)


def sample_view_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
    """A random-resized-crop box (torchvision's sampling rule), normalised to the image."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return (x / width, y / height, (x + w) / width, (y + h) / height)
    return eval_view_box(width, height)


def view_seed(image_sha1: str, view: int) -> int:
    """A view's RNG seed from the image content, so reruns and other datasets holding the image agree."""
    return int(hashlib.sha1(f"{image_sha1}:{view}".encode()).hexdigest()[:12], 16)


def view_params_for(
    image_sha1: str, width: int, height: int, k: int, resize_mode: str | None = "shortest"
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [K, 4] (float32, normalised) and flips [K] (bool) of an image's K views by extraction's rule: view
    0 = the teacher's eval region (``resize_mode``), view v ≥ 1 drawn from ``view_seed(image_sha1, v)``. What a
    store with ``--views K`` holds in ``views/boxes`` and ``views/flip``; lets a run without a store (online
    teacher, no teacher) show its images in the same views."""
    boxes = np.zeros((k, 4), np.float32)
    flips = np.zeros(k, bool)
    if k > 0:
        boxes[0] = eval_view_box(width, height, resize_mode)
    for v in range(1, k):
        rng = np.random.default_rng(view_seed(image_sha1, v))
        boxes[v] = sample_view_box(rng, width, height)
        flips[v] = rng.random() < 0.5
    return boxes, flips


def apply_view(img: Any, box: Sequence[float], flip: bool, size: int) -> Any:
    """Crop a PIL image to a normalised box, resize to size×size (bicubic) and flip: the student replays a
    cached view with exactly this call followed by the teacher's ToTensor + Normalize. A box reaching past the
    image (a "longest" eval region) is black there, as open_clip pads."""
    from PIL import Image

    w, h = img.size
    px = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    out = img.crop(px).resize((size, size), Image.Resampling.BICUBIC)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out
