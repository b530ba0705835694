"""Selection quality (the study's "why it works"): do clip_td's selected image tokens fall on what the text is about?

For each instance, the tokens clip_td distils are chosen teacher-side exactly as in training
(``student.losses.prepare_teacher``: the cached teacher image tokens resized to the student's grid, their
cosine relevance to the instance's distill text, the top ρ_v of them). The synthetic scene in the instance's
meta says where every object is, so each grid cell is "on a named object" or not, and:

  selected share = (selected cells on a named object) / (selected cells),
  random share   = (cells on a named object) / (all cells)  — the expected share of as many random cells,
  fixed share    = the same for the cells the teacher selects most often over all scored instances (as many
                   as it selects for this one): a selection that ignores the instance,
  prior share    = the same for the cells most often on a named object over all scored instances: the best
                   selection that ignores the instance (fitted in-sample, so an upper bound),
  other-text share = the same when the image's tokens are ranked against another instance's text (the next
                   scored one's): what the image alone makes the teacher select.

Beating random alone can come from where objects tend to be (a random-init teacher's tokens differ by
position, so it selects the same cells everywhere); selected above fixed says the selection follows the
instance, and selected above other-text says it follows the text, i.e. is targeted (a teacher can pick out
objects in general, from the image alone, without picking the ones the text names).

Objects the text names: the scene objects whose attributes (shape, colour, size) agree with every attribute
category the distill text mentions (a word of the category, plural allowed), plus the objects the meta names
(``object``, ``reference``). An instance whose text names no object of its scene (a count over the whole
scene, an absent object) is left out. A cell is on an object when at least ``min_cover`` of the cell's area
lies inside the object's bounding box.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.data.schema import Instance
from pipeline.report import paired_test
from pipeline.texts import instance_texts

ATTRIBUTES = ("shape", "colour", "size")


def scene_of(inst: Instance) -> dict | None:
    meta = inst.meta if isinstance(inst.meta, dict) else {}
    scene = meta.get("scene")
    return scene if isinstance(scene, dict) and isinstance(scene.get("objects"), list) else None


def object_box(obj: dict, image_size: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in [0, 1], from a normalised ``box`` or from a centre (x, y) and radius r in pixels."""
    if "box" in obj:
        x0, y0, x1, y1 = (float(v) for v in obj["box"])
        return x0, y0, x1, y1
    s = float(image_size)
    x, y, r = float(obj["x"]), float(obj["y"]), float(obj["r"])
    return max(0.0, (x - r) / s), max(0.0, (y - r) / s), min(1.0, (x + r) / s), min(1.0, (y + r) / s)


def cell_mask(
    boxes: Sequence[tuple[float, float, float, float]], grid: int, min_cover: float = 0.1
) -> np.ndarray:
    """[grid²] bool, row-major (row = y from the top, as the ViT's tokens): cells covered by any box for at least
    ``min_cover`` of their area."""
    mask = np.zeros((grid, grid), dtype=bool)
    edges = np.linspace(0.0, 1.0, grid + 1)
    cell = 1.0 / (grid * grid)
    for x0, y0, x1, y1 in boxes:
        ox = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None)  # per column
        oy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None)  # per row
        mask |= (oy[:, None] * ox[None, :]) >= min_cover * cell
    return mask.reshape(-1)


def _mentions(text: str, value: str) -> bool:
    return re.search(rf"\b{re.escape(value.lower())}(e?s)?\b", text) is not None


def named_objects(inst: Instance, text: str, vocab: dict[str, set[str]]) -> list[dict]:
    """The scene objects ``text`` names (module docstring); ``vocab`` lists every value of each attribute."""
    scene = scene_of(inst)
    if scene is None:
        return []
    low = text.lower()
    said = {a: {v for v in vocab.get(a, ()) if _mentions(low, v)} for a in ATTRIBUTES}
    said = {a: vs for a, vs in said.items() if vs}
    objs = scene["objects"]
    named = [o for o in objs if said and all(str(o.get(a)) in vs for a, vs in said.items())]
    meta = inst.meta if isinstance(inst.meta, dict) else {}
    for key in ("object", "reference"):
        ref = meta.get(key)
        if isinstance(ref, dict):
            named += [
                o
                for o in objs
                if o.get("x") == ref.get("x") and o.get("y") == ref.get("y") and o not in named
            ]
    return named


def attribute_vocab(instances: Sequence[Instance]) -> dict[str, set[str]]:
    """Every attribute value the scenes hold (taken from the data, so a new world's words need no list here)."""
    vocab: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    for inst in instances:
        for o in (scene_of(inst) or {}).get("objects", []):
            for a in ATTRIBUTES:
                if a in o:
                    vocab[a].add(str(o[a]))
    return vocab


def selection_masks(
    cache: Any, instances: Sequence[Instance], texts: Sequence[str], g_s: int, cfg: Any, batch: int = 256
) -> np.ndarray:
    """[N, g_s²] bool: clip_td's image token selection per instance, from the cache, via prepare_teacher."""
    from .losses import prepare_teacher
    from .targets import assemble_teacher_batch

    out = []
    for i in range(0, len(instances), batch):
        insts, txts = instances[i : i + batch], list(texts[i : i + batch])
        relevance = cfg.relevance_source if cfg.relevance_source != "last" else None
        img = cache.image_targets([x.image_id for x in insts], relevance=relevance)
        txt = cache.text_targets(txts, tokens=True)
        tb = assemble_teacher_batch(img, txt)
        with torch.no_grad():
            out.append(prepare_teacher(tb, cache.grid, g_s, cfg)["img_select"].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, g_s * g_s), dtype=bool)


def selection_quality(
    cache: Any,
    instances: Sequence[Instance],
    g_s: int,
    cfg: Any,
    vocab_answers: list[str],
    vqa_candidates: int = 4,
    min_cover: float = 0.1,
) -> dict:
    """Selected vs random share of tokens on named objects over ``instances`` (one task), with the paired
    per-instance difference's 95% t interval (report.paired_test)."""
    attrs = attribute_vocab(instances)
    keep, texts, masks = [], [], []
    for inst in instances:
        scene = scene_of(inst)
        if scene is None:
            continue
        text = instance_texts(inst, vocab_answers, vqa_candidates).distill
        objs = named_objects(inst, text, attrs)
        if not objs:
            continue
        on = cell_mask([object_box(o, int(scene["image_size"])) for o in objs], g_s, min_cover)
        if on.all() or not on.any():  # every (or no) cell on an object: selection cannot do better or worse
            continue
        keep.append(inst)
        texts.append(text)
        masks.append(on)
    if not keep:
        return {
            "n": 0,
            "n_scored": len(instances),
            "selected_share": None,
            "random_share": None,
            "delta_mean": None,
            "ci95": None,
            "p": None,
            "fixed_share": None,
            "prior_share": None,
            "vs_fixed": None,
            "other_text_share": None,
            "vs_other_text": None,
        }
    sel = selection_masks(cache, keep, texts, g_s, cfg)
    on = np.stack(masks)
    k = sel.sum(1)
    selected = (sel & on).sum(1) / np.maximum(k, 1)
    random = on.mean(1)
    fixed = (_most_frequent(sel, k) & on).sum(1) / np.maximum(k, 1)
    prior = (_most_frequent(on, k) & on).sum(1) / np.maximum(k, 1)
    other_sel = selection_masks(cache, keep, texts[1:] + texts[:1], g_s, cfg)
    other = (other_sel & on).sum(1) / np.maximum(other_sel.sum(1), 1)
    test = paired_test([float(d) for d in selected - random])
    vs_fixed = paired_test([float(d) for d in selected - fixed])
    vs_other = paired_test([float(d) for d in selected - other])
    return {
        "n": len(keep),
        "n_scored": len(instances),
        "selected_share": float(selected.mean()),
        "random_share": float(random.mean()),
        "lift": float(selected.mean() / random.mean()) if random.mean() > 0 else None,
        "tokens_selected": float(sel.sum(1).mean()),
        "grid": g_s,
        "delta_mean": test["mean"],
        "ci95": test["ci95"],
        "p": test["p"],
        "fixed_share": float(fixed.mean()),
        "prior_share": float(prior.mean()),
        "vs_fixed": {"delta_mean": vs_fixed["mean"], "ci95": vs_fixed["ci95"], "p": vs_fixed["p"]},
        "other_text_share": float(other.mean()),
        "vs_other_text": {"delta_mean": vs_other["mean"], "ci95": vs_other["ci95"], "p": vs_other["p"]},
    }


def _most_frequent(masks: np.ndarray, k: np.ndarray) -> np.ndarray:
    """[N, cells] bool: for row i, the k[i] cells set most often across ``masks``' rows (ties by cell order)."""
    order = np.argsort(-masks.mean(0), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[None, :] < k[:, None]
