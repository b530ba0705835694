"""The embedded synthetic world: the default dataset, generated in-process with no download.

Scenes hold 1..max_objects non-overlapping shapes (4 shapes × 6 colours × 2 sizes, each colour–shape pair at
most once so "the red circle" always names one object), rendered in three visual domains that keep each
object's colour recognisable: ``plain`` (solid shapes, light background), ``textured`` (shaded noisy shapes on a
dark textured background) and ``outline`` (thick outlines on a grey gradient). Every scene yields one
instance of each official task (VQA-, SNLI-VE- and VCR-like) and, in the caption splits, captions with hard
negatives that change exactly one attribute (the teacher's pretraining corpus and its binding test).

Determinism: every scene and every task instance draws from its own RNG seeded by hashing (seed, split,
index[, task]), so any one of them can be regenerated on its own and the same seed gives byte-identical PNGs
(for a given Pillow/zlib build) and identical instances.

``verify_label`` re-derives every label from the scene objects by parsing the generated text, a code path
independent of the generators; the tests run it over every template.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from .schema import SNLI_LABELS, VCR_CHOICES, VQA_HUMAN_ANSWERS, Instance

if TYPE_CHECKING:
    from ..config import SyntheticParams
    from .shards import DatasetWriter

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
DOMAINS = ("plain", "textured", "outline")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TASK_SPLITS = ("train", "val", "test")
CAPTION_SPLITS = ("captions", "captions_val")

# Saturated, well-separated hues: they must survive the dark shading of `textured` and the grey of `outline`.
PALETTE = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 85, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 55, 195),
    "orange": (245, 130, 20),
}
# Bounding radius as a fraction of the image side; small vs large must differ clearly at 64 px.
RADIUS = {"small": 0.09, "large": 0.16}
# A relation holds when centres differ by at least this fraction of the image side along its axis, and is
# false when they differ by at most a third of it; in between it is ambiguous and never asked about.
REL_MARGIN = 0.12
HARD_NEGATIVES = 5
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
MATERIALS = ("wood", "metal", "glass", "paper", "plastic", "stone")
PROPERTIES = ("heavy", "hot", "cold", "fragile", "expensive", "wet")
FUTURES = ("move", "fall over", "roll away", "disappear", "spin")

VQA_TEMPLATES = ("color_of_shape", "shape_of_color", "count", "exists", "size", "spatial")
SNLI_FACTUAL = ("present", "absent", "count", "colour", "size", "relation")
SNLI_NEUTRAL = ("material", "property", "future", "order")
SNLI_TEMPLATES = SNLI_FACTUAL + SNLI_NEUTRAL
VCR_TEMPLATES = ("rel_colour", "rel_shape", "size_colour", "size_shape", "count")
CAPTION_TEMPLATES = ("list", "relation", "single")


# --------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: int  # centre, pixels at Scene.image_size
    y: int
    r: float  # bounding radius, pixels

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "x": self.x,
            "y": self.y,
            "r": self.r,
        }


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    domain: str
    image_size: int
    seed: int  # seeds the rendering noise, so render() needs nothing but the scene

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "image_size": self.image_size,
            "seed": self.seed,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objs = tuple(SceneObject(**o) for o in d["objects"])
        return cls(objs, d["domain"], int(d["image_size"]), int(d["seed"]))


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (hash-based, so it does not depend on PYTHONHASHSEED)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


def task_rng(seed: int, split: str, index: int, task: str) -> random.Random:
    """The RNG of one task instance: independent of the other tasks of the same scene."""
    return random.Random(derive_seed("task", seed, split, index, task))


def _check_params(params: SyntheticParams) -> None:
    if not 1 <= params.min_objects <= params.max_objects <= 8:
        raise ValueError(
            f"synthetic: need 1 <= min_objects <= max_objects <= 8, got {params.min_objects}..{params.max_objects}"
        )
    bad = [d for d in params.domains if d not in DOMAINS]
    if bad or not params.domains:
        raise ValueError(f"synthetic: unknown domains {bad or params.domains}; allowed {DOMAINS}")
    if params.image_size < 16:
        raise ValueError(f"synthetic: image_size {params.image_size} is too small (>= 16)")


def make_scene(seed: int, split: str, index: int, params: SyntheticParams) -> Scene:
    """Scene ``index`` of ``split``; regenerable on its own from (seed, split, index)."""
    _check_params(params)
    domain = params.domains[index % len(params.domains)]
    s = derive_seed("scene", seed, split, index)
    rng = random.Random(s)
    size_px = params.image_size
    n = rng.randint(params.min_objects, params.max_objects)
    pairs = rng.sample([(c, sh) for c in COLOURS for sh in SHAPES], n)
    pad, gap = 0.03 * size_px, 0.05 * size_px
    objs: list[SceneObject] = []
    for colour, shape in pairs:
        size = rng.choice(SIZES)
        r = round(RADIUS[size] * size_px, 2)
        lo, hi = math.ceil(r + pad), math.floor(size_px - r - pad)
        # Rejection sampling; an object that does not fit after many tries is dropped rather than overlapped.
        for _ in range(100):
            x, y = rng.randint(lo, hi), rng.randint(lo, hi)
            if all(math.hypot(x - o.x, y - o.y) >= r + o.r + gap for o in objs):
                objs.append(SceneObject(shape, colour, size, x, y, r))
                break
    return Scene(tuple(objs), domain, size_px, s)


# ------------------------------------------------------------------------------------------ rendering


def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.8 * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        # Inscribed in the bounding circle so its centroid is the object centre used by the relations.
        return [(x, y - r), (x + 0.866 * r, y + 0.5 * r), (x - 0.866 * r, y + 0.5 * r)]
    if shape == "cross":
        a, t = 0.95 * r, 0.32 * r
        return [
            (x - t, y - a), (x + t, y - a), (x + t, y - t), (x + a, y - t), (x + a, y + t), (x + t, y + t),
            (x + t, y + a), (x - t, y + a), (x - t, y + t), (x - a, y + t), (x - a, y - t), (x - t, y - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


_SUPERSAMPLE = 3


def _mask(obj: SceneObject, scale: float, size_px: int, outline: int | None) -> np.ndarray:
    """Coverage in [0, 1] at the output size, drawn supersampled so edges are anti-aliased."""
    ss = _SUPERSAMPLE
    k = scale * ss
    canvas = Image.new("L", (size_px * ss, size_px * ss), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = obj.x * k, obj.y * k, obj.r * k
    style: dict[str, Any] = {"fill": 255} if outline is None else {"outline": 255, "width": outline * ss}
    if obj.shape == "circle":
        rc = 0.92 * r
        draw.ellipse([x - rc, y - rc, x + rc, y + rc], **style)
    else:
        draw.polygon(_polygon(obj.shape, x, y, r), **style)
    return np.asarray(canvas.resize((size_px, size_px), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, size_px: int, cells: int) -> np.ndarray:
    coarse = Image.fromarray(rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((size_px, size_px), Image.Resampling.BILINEAR), dtype=np.float32)


def render_array(scene: Scene, image_size: int | None = None) -> np.ndarray:
    """The scene as an RGB uint8 array [H, W, 3]."""
    size_px = image_size or scene.image_size
    scale = size_px / scene.image_size
    rng = np.random.default_rng(scene.seed)
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32)
    # The background is drawn before any object noise, so a scene without objects has the same background.
    if scene.domain == "plain":
        img = np.empty((size_px, size_px, 3), np.float32)
        img[:] = 236.0 + rng.integers(-6, 7, size=3)
    elif scene.domain == "textured":
        base = rng.uniform(35.0, 65.0) + rng.uniform(-8.0, 8.0, size=3)
        blotch = 16.0 * _smooth_noise(rng, size_px, 6)
        img = base + blotch[..., None] + rng.normal(0.0, 9.0, (size_px, size_px, 3))
    elif scene.domain == "outline":
        theta = rng.uniform(0.0, 2 * math.pi)
        g0, g1 = rng.uniform(100.0, 120.0), rng.uniform(150.0, 170.0)
        t = xx * math.cos(theta) + yy * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = np.repeat((g0 + (g1 - g0) * t)[..., None], 3, axis=2)
    else:
        raise ValueError(f"scene domain {scene.domain!r} not in {DOMAINS}")
    width = max(2, round(0.045 * size_px))
    for obj in scene.objects:
        colour = np.asarray(PALETTE[obj.colour], np.float32)
        if scene.domain == "textured":
            # Top-lit shading plus grain: a different look, same hue.
            top, r = (obj.y - obj.r) * scale, obj.r * scale
            shade = 1.12 - 0.4 * np.clip((yy - top) / (2 * r), 0.0, 1.0)
            fill = colour * shade[..., None] + rng.normal(0.0, 10.0, (size_px, size_px, 3))
            alpha = _mask(obj, scale, size_px, None)
        elif scene.domain == "outline":
            fill = colour
            alpha = _mask(obj, scale, size_px, width)
        else:
            fill = colour
            alpha = _mask(obj, scale, size_px, None)
        a = alpha[..., None]
        img = img * (1.0 - a) + fill * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(scene: Scene, image_size: int | None = None) -> bytes:
    """PNG bytes of the scene (positions scale with image_size when it differs from the scene's)."""
    buf = io.BytesIO()
    Image.fromarray(render_array(scene, image_size), "RGB").save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- generator helpers


def _rel(a: SceneObject, b: SceneObject, rel: str, margin: float) -> bool | None:
    """Whether a is `rel` b: True when clear, False when clearly not, None when ambiguous."""
    d = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[rel]
    if d >= margin:
        return True
    if d <= margin / 3:
        return False
    return None


def _margin(scene: Scene) -> float:
    return REL_MARGIN * scene.image_size


def _referents(scene: Scene) -> list[tuple[SceneObject, str, SceneObject]]:
    """(ref, rel, target): "the object <rel> the <ref>" names exactly one object and no other is borderline."""
    out = []
    m = _margin(scene)
    for ref in scene.objects:
        others = [o for o in scene.objects if o is not ref]
        for rel in RELATIONS:
            vals = [_rel(o, ref, rel, m) for o in others]
            if vals.count(True) == 1 and None not in vals:
                out.append((ref, rel, others[vals.index(True)]))
    return out


def _clear_pairs(scene: Scene) -> list[tuple[SceneObject, str, SceneObject]]:
    m = _margin(scene)
    return [
        (a, rel, b)
        for a in scene.objects
        for b in scene.objects
        if a is not b
        for rel in RELATIONS
        if _rel(a, b, rel, m) is True
    ]


def _art(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _name(o: SceneObject) -> str:
    return f"{o.colour} {o.shape}"


def _full(o: SceneObject) -> str:
    return f"a {o.size} {o.colour} {o.shape}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _num(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _count_values(params: SyntheticParams) -> list[int]:
    return list(range(1, max(4, params.max_objects + 1) + 1))


def _absent_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Colour–shape pairs not in the scene that share an attribute with one that is (plausible, not random)."""
    present = {(o.colour, o.shape) for o in scene.objects}
    colours = {o.colour for o in scene.objects}
    shapes = {o.shape for o in scene.objects}
    near = [
        (c, s) for c in COLOURS for s in SHAPES if (c, s) not in present and (c in colours or s in shapes)
    ]
    return near or [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]


def _unique_by(scene: Scene, attr: str) -> list[SceneObject]:
    counts = Counter(getattr(o, attr) for o in scene.objects)
    return [o for o in scene.objects if counts[getattr(o, attr)] == 1]


def _base_meta(scene: Scene, template: str) -> dict[str, Any]:
    return {"template": template, "scene": scene.to_dict()}


# ------------------------------------------------------------------------------------------------ VQA

_VQA_ANSWER_TYPES = {
    "color_of_shape": "color",
    "shape_of_color": "shape",
    "count": "number",
    "exists": "yes/no",
    "size": "size",
    "spatial": "color",
}


def _vqa_candidates(scene: Scene, rng: random.Random) -> dict[str, tuple[str, str, dict]]:
    out: dict[str, tuple[str, str, dict]] = {}
    objs = scene.objects
    if uniq := _unique_by(scene, "shape"):
        o = rng.choice(uniq)
        out["color_of_shape"] = (f"what color is the {o.shape}?", o.colour, {"object": o.to_dict()})
    if uniq := _unique_by(scene, "colour"):
        o = rng.choice(uniq)
        out["shape_of_color"] = (f"what shape is the {o.colour} object?", o.shape, {"object": o.to_dict()})
    out["count"] = ("how many objects are there?", str(len(objs)), {})
    if rng.random() < 0.5:
        o = rng.choice(objs)
        out["exists"] = (f"is there {_art(o.colour)} {_name(o)}?", "yes", {"object": o.to_dict()})
    else:
        c, s = rng.choice(_absent_pairs(scene))
        out["exists"] = (f"is there {_art(c)} {c} {s}?", "no", {"object": None})
    o = rng.choice(objs)
    out["size"] = (f"what size is the {_name(o)}?", o.size, {"object": o.to_dict()})
    if refs := _referents(scene):
        ref, rel, t = rng.choice(refs)
        meta = {"object": t.to_dict(), "reference": ref.to_dict(), "relation": rel}
        out["spatial"] = (f"what color is the object {rel} the {_name(ref)}?", t.colour, meta)
    return out


def _answer_pool(answer_type: str, params: SyntheticParams) -> list[str]:
    return {
        "color": list(COLOURS),
        "shape": list(SHAPES),
        "size": list(SIZES),
        "yes/no": ["yes", "no"],
        "number": [str(n) for n in _count_values(params)],
    }[answer_type]


def vqa_instance(
    scene: Scene, key: str, image_id: str, split: str, rng: random.Random, params: SyntheticParams
) -> Instance:
    """A VQA-like open question; 10 human answers with a fixed share of plausible wrong ones."""
    cands = _vqa_candidates(scene, rng)
    template = rng.choice(sorted(cands))
    question, answer, extra = cands[template]
    answer_type = _VQA_ANSWER_TYPES[template]
    # At most 4 of 10 wrong, so the gold answer stays the strict majority whatever the noise setting.
    n_wrong = min(round(max(0.0, params.vqa_answer_noise) * VQA_HUMAN_ANSWERS), (VQA_HUMAN_ANSWERS - 1) // 2)
    wrong_pool = [a for a in _answer_pool(answer_type, params) if a != answer]
    humans = [answer] * VQA_HUMAN_ANSWERS
    for pos in rng.sample(range(VQA_HUMAN_ANSWERS), n_wrong):
        humans[pos] = rng.choice(wrong_pool)
    meta = {**_base_meta(scene, template), "question_type": template, "answer_type": answer_type, **extra}
    return Instance(
        key=key,
        task="vqa",
        image_id=image_id,
        split=split,
        domain=scene.domain,
        question=question,
        answer=answer,
        human_answers=humans,
        meta=meta,
    )


# -------------------------------------------------------------------------------------------- SNLI-VE


def _count_sentence(n: int) -> str:
    return (
        f"there is {_num(n)} object in the picture."
        if n == 1
        else f"there are {_num(n)} objects in the picture."
    )


def _snli_factual(
    scene: Scene, rng: random.Random, truth: bool, params: SyntheticParams
) -> dict[str, str | None]:
    """One hypothesis per factual template whose truth value for this scene is `truth` (None: impossible)."""
    objs = scene.objects
    out: dict[str, str | None] = {}
    o = rng.choice(objs)
    c, s = rng.choice(_absent_pairs(scene))
    if truth:
        out["present"] = f"there is {_art(o.colour)} {_name(o)}."
        out["absent"] = f"there is no {c} {s}."
        out["count"] = _count_sentence(len(objs))
        out["size"] = f"the {_name(o)} is {o.size}."
    else:
        out["present"] = f"there is {_art(c)} {c} {s}."
        out["absent"] = f"there is no {_name(o)}."
        out["count"] = _count_sentence(rng.choice([n for n in _count_values(params) if n != len(objs)]))
        out["size"] = f"the {_name(o)} is {'large' if o.size == 'small' else 'small'}."
    out["colour"] = None
    if uniq := _unique_by(scene, "shape"):
        u = rng.choice(uniq)
        colour = u.colour if truth else rng.choice([x for x in COLOURS if x != u.colour])
        out["colour"] = f"the {u.shape} is {colour}."
    out["relation"] = None
    if pairs := _clear_pairs(scene):
        a, rel, b = rng.choice(pairs)
        # The false version states the opposite of a clear relation, so the image refutes it outright.
        out["relation"] = f"the {_name(a)} is {rel if truth else OPPOSITE[rel]} the {_name(b)}."
    return out


def _snli_neutral(scene: Scene, rng: random.Random) -> dict[str, str | None]:
    o = rng.choice(scene.objects)
    return {
        "material": f"the {_name(o)} is made of {rng.choice(MATERIALS)}.",
        "property": f"the {_name(o)} is {rng.choice(PROPERTIES)}.",
        "future": f"the {_name(o)} is about to {rng.choice(FUTURES)}.",
        # With one object, "drawn first" would be trivially true.
        "order": f"the {_name(o)} was drawn first." if len(scene.objects) > 1 else None,
    }


def snli_instance(
    scene: Scene,
    key: str,
    image_id: str,
    split: str,
    rng: random.Random,
    params: SyntheticParams,
    label: int | None = None,
) -> Instance:
    """An SNLI-VE-like hypothesis. ``label`` (index into SNLI_LABELS) is drawn from rng when not given;
    generate() cycles it by scene index so the labels are balanced exactly."""
    if label is None:
        label = rng.randrange(len(SNLI_LABELS))
    if SNLI_LABELS[label] == "neutral":
        cands = _snli_neutral(scene, rng)
    else:
        cands = _snli_factual(scene, rng, SNLI_LABELS[label] == "entailment", params)
    template = rng.choice(sorted(t for t, h in cands.items() if h))
    return Instance(
        key=key,
        task="snli_ve",
        image_id=image_id,
        split=split,
        domain=scene.domain,
        hypothesis=str(cands[template]),
        label=label,
        meta=_base_meta(scene, template),
    )


# ------------------------------------------------------------------------------------------------ VCR


@dataclass
class _VcrDraft:
    question: str
    gold: str
    wrong: list[str]  # answer distractors, most plausible first
    rationale: str
    false_rationales: list[str]  # consistent with the gold answer in wording, false for this image
    irrelevant: list[str]  # true for this image, but not a justification of the answer
    meta: dict[str, Any]


def _colour_answers(gold: str, scene: Scene, rng: random.Random) -> list[str]:
    in_scene = sorted({o.colour for o in scene.objects} - {gold})
    rest = sorted(set(COLOURS) - set(in_scene) - {gold})
    rng.shuffle(in_scene)
    rng.shuffle(rest)
    return [f"it is {c}." for c in in_scene + rest]


def _shape_answers(gold: str, rng: random.Random) -> list[str]:
    others = [s for s in SHAPES if s != gold]
    rng.shuffle(others)
    return [f"it is {_art(s)} {s}." for s in others]


def _count_answer(n: int) -> str:
    return f"there is {_num(n)} object." if n == 1 else f"there are {_num(n)} objects."


def _vcr_drafts(scene: Scene, rng: random.Random, params: SyntheticParams) -> dict[str, _VcrDraft]:
    objs = scene.objects
    present = {(o.colour, o.shape): o for o in objs}
    m = _margin(scene)
    out: dict[str, _VcrDraft] = {}

    if refs := _referents(scene):
        ref, rel, t = rng.choice(refs)
        tail = f"{rel} the {_name(ref)}"
        meta = {"object": t.to_dict(), "reference": ref.to_dict(), "relation": rel}
        irrelevant = [f"the {_name(ref)} is {ref.size}.", _count_sentence(len(objs))]

        def false_rel(c: str, s: str) -> bool:
            o = present.get((c, s))
            return o is not ref and (o is None or _rel(o, ref, rel, m) is False)

        fr = [f"the {t.colour} {s} is {tail}." for s in SHAPES if s != t.shape and false_rel(t.colour, s)]
        out["rel_colour"] = _VcrDraft(
            f"what color is the object {tail}?",
            f"it is {t.colour}.",
            _colour_answers(t.colour, scene, rng),
            f"the {_name(t)} is {tail}.",
            fr,
            irrelevant,
            meta,
        )
        fr = [f"the {c} {t.shape} is {tail}." for c in COLOURS if c != t.colour and false_rel(c, t.shape)]
        out["rel_shape"] = _VcrDraft(
            f"what shape is the object {tail}?",
            f"it is {_art(t.shape)} {t.shape}.",
            _shape_answers(t.shape, rng),
            f"the {_name(t)} is {tail}.",
            fr,
            irrelevant,
            meta,
        )

    by_size = {z: [o for o in objs if o.size == z] for z in SIZES}
    sizes = [z for z in SIZES if len(by_size[z]) == 1]
    if sizes:
        z = rng.choice(sizes)
        t = by_size[z][0]
        head = f"the only {z} object is"
        irrelevant = [_count_sentence(len(objs))] + [
            f"the {_name(o)} is {o.size}." for o in objs if o is not t
        ]
        meta = {"object": t.to_dict()}
        out["size_colour"] = _VcrDraft(
            f"what color is the {z} object?",
            f"it is {t.colour}.",
            _colour_answers(t.colour, scene, rng),
            f"{head} {_art(t.colour)} {_name(t)}.",
            [f"{head} {_art(t.colour)} {t.colour} {s}." for s in SHAPES if s != t.shape],
            irrelevant,
            meta,
        )
        out["size_shape"] = _VcrDraft(
            f"what shape is the {z} object?",
            f"it is {_art(t.shape)} {t.shape}.",
            _shape_answers(t.shape, rng),
            f"{head} {_art(t.colour)} {_name(t)}.",
            [f"{head} {_art(c)} {c} {t.shape}." for c in COLOURS if c != t.colour],
            irrelevant,
            meta,
        )

    order = list(objs)
    rng.shuffle(order)
    phrases = [_full(o) for o in order]
    false_lists = [
        f"the picture shows {_join(p)}." for p in _one_change_variants(order, phrases, lambda i, o: _full(o))
    ]
    counts = [n for n in _count_values(params) if n != len(objs)]
    rng.shuffle(counts)
    out["count"] = _VcrDraft(
        "how many objects are in the picture?",
        _count_answer(len(objs)),
        [_count_answer(n) for n in counts],
        f"the picture shows {_join(phrases)}.",
        false_lists,
        [f"the {_name(o)} is {o.size}." for o in objs],
        {},
    )
    return out


def _one_change_variants(
    order: list[SceneObject], phrases: list[str], phrase: Callable[[int, SceneObject], str]
) -> list[list[str]]:
    """Every phrase list with exactly one attribute of one object changed (colour, shape or size)."""
    out = []
    for i, o in enumerate(order):
        for variant in _attribute_changes(o):
            p = list(phrases)
            p[i] = phrase(i, variant)
            out.append(p)
    return out


def _attribute_changes(o: SceneObject) -> list[SceneObject]:
    out = [SceneObject(o.shape, c, o.size, o.x, o.y, o.r) for c in COLOURS if c != o.colour]
    out += [SceneObject(s, o.colour, o.size, o.x, o.y, o.r) for s in SHAPES if s != o.shape]
    out += [SceneObject(o.shape, o.colour, z, o.x, o.y, o.r) for z in SIZES if z != o.size]
    return out


def _place(rng: random.Random, gold: str, others: list[str]) -> tuple[list[str], int]:
    pos = rng.randrange(VCR_CHOICES)
    cands = list(others[: VCR_CHOICES - 1])
    cands.insert(pos, gold)
    return cands, pos


def vcr_instance(
    scene: Scene, key: str, image_id: str, split: str, rng: random.Random, params: SyntheticParams
) -> Instance:
    """A VCR-like question with 4 answers and 4 rationales; gold positions are random per instance."""
    drafts = _vcr_drafts(scene, rng, params)
    template = rng.choice(sorted(drafts))
    d = drafts[template]
    wrong = list(dict.fromkeys(d.wrong))
    answers, label = _place(rng, d.gold, wrong)
    # Two distractors that the wording of the gold answer cannot rule out (only the image can), and one
    # true-but-irrelevant statement; fall back to whatever remains when a pool is short.
    false_pool = [r for r in dict.fromkeys(d.false_rationales) if r != d.rationale]
    irr_pool = [r for r in dict.fromkeys(d.irrelevant) if r != d.rationale and r not in false_pool]
    picked = rng.sample(false_pool, min(2, len(false_pool)))
    picked += rng.sample(irr_pool, min(VCR_CHOICES - 1 - len(picked), len(irr_pool)))
    rest = [r for r in false_pool if r not in picked]
    picked += rest[: VCR_CHOICES - 1 - len(picked)]
    if len(picked) < VCR_CHOICES - 1:
        raise RuntimeError(f"vcr '{key}': too few rationale distractors for template {template}")
    rng.shuffle(picked)
    rationales, rationale_label = _place(rng, d.rationale, picked)
    return Instance(
        key=key,
        task="vcr",
        image_id=image_id,
        split=split,
        domain=scene.domain,
        question=d.question,
        answers=answers,
        rationales=rationales,
        label=label,
        rationale_label=rationale_label,
        meta={**_base_meta(scene, template), **d.meta},
    )


# ------------------------------------------------------------------------------------------- captions


def _holds_caption_relation(scene: Scene, a: SceneObject, rel: str, b: SceneObject) -> bool | None:
    """Truth of "a <rel> b" where a, b are attribute descriptions that may or may not match scene objects."""

    def match(d: SceneObject) -> SceneObject | None:
        for o in scene.objects:
            if (o.shape, o.colour, o.size) == (d.shape, d.colour, d.size):
                return o
        return None

    oa, ob = match(a), match(b)
    if oa is None or ob is None or oa is ob:
        return False
    return _rel(oa, ob, rel, _margin(scene))


def _pick_negatives(rng: random.Random, groups: list[list[str]], caption: str) -> list[str]:
    """Up to HARD_NEGATIVES, round-robin over the kinds of change so colour, shape, size and relation mix."""
    pools = [[n for n in dict.fromkeys(g) if n != caption] for g in groups]
    for p in pools:
        rng.shuffle(p)
    rng.shuffle(pools)
    out: list[str] = []
    while len(out) < HARD_NEGATIVES and any(pools):
        for p in pools:
            while p and len(out) < HARD_NEGATIVES:
                n = p.pop()
                if n not in out:
                    out.append(n)
                    break
    return out


def _caption_list(scene: Scene, rng: random.Random) -> tuple[str, list[str]]:
    order = list(scene.objects)
    rng.shuffle(order)
    head = f"{_num(len(order))} object{'s' if len(order) > 1 else ''}: "
    phrases = [_full(o) for o in order]
    groups: dict[str, list[str]] = {"colour": [], "shape": [], "size": []}
    for i, o in enumerate(order):
        for v in _attribute_changes(o):
            kind = "colour" if v.colour != o.colour else "shape" if v.shape != o.shape else "size"
            p = list(phrases)
            p[i] = _full(v)
            groups[kind].append(head + _join(p))  # one object changed: the multiset differs, so it is false
    caption = head + _join(phrases)
    return caption, _pick_negatives(rng, list(groups.values()), caption)


def _caption_relation(scene: Scene, rng: random.Random) -> tuple[str, list[str]] | None:
    pairs = _clear_pairs(scene)
    if not pairs:
        return None
    a, rel, b = rng.choice(pairs)

    def text(x: SceneObject, r: str, y: SceneObject) -> str:
        return f"{_full(x)} {r} {_full(y)}"

    groups: dict[str, list[str]] = {
        "colour": [],
        "shape": [],
        "size": [],
        "relation": [text(a, OPPOSITE[rel], b)],
    }
    for which in (0, 1):
        base = (a, b)[which]
        for v in _attribute_changes(base):
            x, y = (v, b) if which == 0 else (a, v)
            if _holds_caption_relation(scene, x, rel, y) is False:
                kind = "colour" if v.colour != base.colour else "shape" if v.shape != base.shape else "size"
                groups[kind].append(text(x, rel, y))
    caption = text(a, rel, b)
    return caption, _pick_negatives(rng, list(groups.values()), caption)


def _caption_single(scene: Scene, rng: random.Random) -> tuple[str, list[str]]:
    o = rng.choice(scene.objects)
    present = {(p.shape, p.colour, p.size) for p in scene.objects}
    groups: dict[str, list[str]] = {"colour": [], "shape": [], "size": []}
    for v in _attribute_changes(o):
        if (v.shape, v.colour, v.size) not in present:
            kind = "colour" if v.colour != o.colour else "shape" if v.shape != o.shape else "size"
            groups[kind].append(f"a picture with {_full(v)}")
    caption = f"a picture with {_full(o)}"
    return caption, _pick_negatives(rng, list(groups.values()), caption)


def caption_items(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, str, list[str]]]:
    """n (template, caption, hard negatives), templates rotating from a random start, distinct when possible."""
    makers: dict[str, Callable[[Scene, random.Random], tuple[str, list[str]] | None]] = {
        "list": _caption_list,
        "relation": _caption_relation,
        "single": _caption_single,
    }
    names = list(CAPTION_TEMPLATES)
    start = rng.randrange(len(names))
    names = names[start:] + names[:start]
    out: list[tuple[str, str, list[str]]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        name = names[tries % len(names)]
        tries += 1
        made = makers[name](scene, rng)
        if made is None:
            continue
        # Repeats are allowed only once distinct captions have had a fair chance (tiny scenes have few).
        if made[0] in seen and tries < 10 * n + len(names):
            continue
        seen.add(made[0])
        out.append((name, made[0], made[1]))
    return out


def captions(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, list[str]]]:
    """n (caption, hard negatives) for the scene; each negative changes exactly one attribute or relation."""
    return [(c, negs) for _t, c, negs in caption_items(scene, rng, n)]


# ------------------------------------------------------------------------------------------- generate


def caption_scene_count(split: str, params: SyntheticParams) -> int:
    if split == "captions":
        return params.caption_scenes
    if split == "captions_val":
        return max(200, params.caption_scenes // 20)
    raise ValueError(f"synthetic: {split!r} is not a caption split {CAPTION_SPLITS}")


def generate(split: str, params: SyntheticParams, writer: DatasetWriter) -> None:
    """Write one split of the synthetic world: train/val/test (one instance per task per scene) or the
    caption corpora captions/captions_val (captions_per_scene captions per scene, separate scene streams)."""
    _check_params(params)
    if split in TASK_SPLITS:
        if split not in params.scenes:
            raise ValueError(f"synthetic: no scene count for split {split!r} in scenes {params.scenes}")
        builders = (("vqa", vqa_instance), ("snli_ve", snli_instance), ("vcr", vcr_instance))
        for i in range(params.scenes[split]):
            scene = make_scene(params.seed, split, i, params)
            image_id = f"synth-{split}-{i:07d}"
            writer.add_image(image_id, render(scene, params.image_size), "png", scene.domain)
            for task, build in builders:
                rng = task_rng(params.seed, split, i, task)
                key = f"{split}-{task}-{i:07d}"
                if task == "snli_ve":
                    # Domains cycle with i too: shifting the label cycle once per domain round makes every
                    # (domain, label) pair equally frequent, so the rendering style cannot give the label away.
                    label = (i + i // len(params.domains)) % len(SNLI_LABELS)
                    inst = snli_instance(scene, key, image_id, split, rng, params, label=label)
                else:
                    inst = build(scene, key, image_id, split, rng, params)
                writer.add_instance(inst)
        return
    if split in CAPTION_SPLITS:
        for i in range(caption_scene_count(split, params)):
            scene = make_scene(params.seed, split, i, params)
            image_id = f"synth-{split}-{i:07d}"
            writer.add_image(image_id, render(scene, params.image_size), "png", scene.domain)
            rng = task_rng(params.seed, split, i, "caption")
            for j, (template, caption, negs) in enumerate(
                caption_items(scene, rng, params.captions_per_scene)
            ):
                meta = {**_base_meta(scene, template), "hard_negatives": negs}
                writer.add_instance(
                    Instance(
                        key=f"{split}-caption-{i:07d}-{j}",
                        task="caption",
                        image_id=image_id,
                        split=split,
                        domain=scene.domain,
                        caption=caption,
                        meta=meta,
                    )
                )
        return
    raise ValueError(f"synthetic: unknown split {split!r}; allowed {TASK_SPLITS + CAPTION_SPLITS}")


# ---------------------------------------------------------------------------------------- verification
# Independent of the generators on purpose: labels are re-derived by parsing the text and evaluating it
# against the scene objects, so a generator bug cannot be mirrored by its own checker.

_C = "(" + "|".join(COLOURS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_Z = "(" + "|".join(SIZES) + ")"
_R = "(" + "|".join(RELATIONS) + ")"
_W = r"(\w+)"


class _Bad(Exception):
    pass


def _word_to_int(word: str) -> int:
    if word in NUMBER_WORDS:
        return NUMBER_WORDS.index(word)
    if word.isdigit():
        return int(word)
    raise _Bad(f"not a number: {word!r}")


def _find(scene: Scene, colour: str | None = None, shape: str | None = None, size: str | None = None) -> list:
    return [
        o
        for o in scene.objects
        if (colour is None or o.colour == colour)
        and (shape is None or o.shape == shape)
        and (size is None or o.size == size)
    ]


def _one(scene: Scene, **attrs: str) -> SceneObject:
    xs = _find(scene, **attrs)
    if len(xs) != 1:
        raise _Bad(f"reference {attrs} matches {len(xs)} objects")
    return xs[0]


def _v_relation(scene: Scene, a: SceneObject, b: SceneObject, rel: str) -> bool | None:
    m = REL_MARGIN * scene.image_size
    horizontal = rel in ("left of", "right of")
    delta = (a.x - b.x) if horizontal else (a.y - b.y)  # image y grows downwards
    signed = -delta if rel in ("left of", "above") else delta
    if signed >= m:
        return True
    if signed <= m / 3:
        return False
    return None


def _multiset(scene: Scene) -> Counter:
    return Counter((o.size, o.colour, o.shape) for o in scene.objects)


def _parse_list(text: str) -> Counter:
    items = re.split(r", | and ", text)
    out: Counter = Counter()
    for item in items:
        m = re.fullmatch(rf"an? {_Z} {_C} {_S}", item)
        if not m:
            raise _Bad(f"bad list item {item!r}")
        out[m.groups()] += 1
    return out


_STATEMENTS = {
    "present": rf"there is an? {_C} {_S}\.",
    "absent": rf"there is no {_C} {_S}\.",
    "count": rf"there (?:is|are) {_W} objects? in the picture\.",
    "colour": rf"the {_S} is {_C}\.",
    "size": rf"the {_C} {_S} is {_Z}\.",
    "relation": rf"the {_C} {_S} is {_R} the {_C} {_S}\.",
    "only": rf"the only {_Z} object is an? {_C} {_S}\.",
    "shows": r"the picture shows (.+)\.",
    "material": rf"the {_C} {_S} is made of ({'|'.join(MATERIALS)})\.",
    "property": rf"the {_C} {_S} is ({'|'.join(PROPERTIES)})\.",
    "future": rf"the {_C} {_S} is about to ({'|'.join(FUTURES)})\.",
    "order": rf"the {_C} {_S} was drawn first\.",
}
UNKNOWN = "unknown"


def _parse(text: str, forms: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    hits = [(name, m.groups()) for name, pat in forms.items() if (m := re.fullmatch(pat, text))]
    if len(hits) != 1:
        raise _Bad(f"text {text!r} matches {len(hits)} known forms")
    return hits[0]


def _statement(text: str, scene: Scene) -> tuple[str, tuple[str, ...], bool | str]:
    """(form, arguments, truth) of a declarative sentence; truth is UNKNOWN when the image cannot decide."""
    form, g = _parse(text, _STATEMENTS)
    if form == "present":
        truth: bool | str = bool(_find(scene, colour=g[0], shape=g[1]))
    elif form == "absent":
        truth = not _find(scene, colour=g[0], shape=g[1])
    elif form == "count":
        truth = _word_to_int(g[0]) == len(scene.objects)
    elif form == "colour":
        xs = _find(scene, shape=g[0])
        if len(xs) > 1:
            raise _Bad(f"{text!r}: ambiguous shape reference")
        truth = bool(xs) and xs[0].colour == g[1]
    elif form == "size":
        xs = _find(scene, colour=g[0], shape=g[1])
        truth = bool(xs) and xs[0].size == g[2]
    elif form == "relation":
        a, b = _find(scene, colour=g[0], shape=g[1]), _find(scene, colour=g[3], shape=g[4])
        if not a or not b:
            truth = False
        else:
            r = _v_relation(scene, a[0], b[0], g[2])
            if r is None:
                raise _Bad(f"{text!r}: relation is ambiguous in this scene")
            truth = r
    elif form == "only":
        xs = _find(scene, size=g[0])
        truth = len(xs) == 1 and (xs[0].colour, xs[0].shape) == (g[1], g[2])
    elif form == "shows":
        truth = _parse_list(g[0]) == _multiset(scene)
    else:  # unobservable properties of an object that is there
        if not _find(scene, colour=g[0], shape=g[1]):
            truth = False
        elif form == "order" and len(scene.objects) == 1:
            truth = True
        else:
            truth = UNKNOWN
    return form, g, truth


_VQA_QUESTIONS = {
    "color_of_shape": rf"what color is the {_S}\?",
    "shape_of_color": rf"what shape is the {_C} object\?",
    "count": r"how many objects are there\?",
    "exists": rf"is there an? {_C} {_S}\?",
    "size": rf"what size is the {_C} {_S}\?",
    "spatial": rf"what color is the object {_R} the {_C} {_S}\?",
}


def _unique_relative(scene: Scene, rel: str, colour: str, shape: str) -> SceneObject:
    ref = _one(scene, colour=colour, shape=shape)
    others = [o for o in scene.objects if o is not ref]
    truths = [_v_relation(scene, o, ref, rel) for o in others]
    if None in truths or truths.count(True) != 1:
        raise _Bad(f"'the object {rel} the {colour} {shape}' is not a unique clear reference ({truths})")
    return others[truths.index(True)]


def _vqa_gold(form: str, g: tuple[str, ...], scene: Scene) -> tuple[str, set[str]]:
    """(gold answer, the answer type's vocabulary)."""
    if form == "color_of_shape":
        return _one(scene, shape=g[0]).colour, set(COLOURS)
    if form == "shape_of_color":
        return _one(scene, colour=g[0]).shape, set(SHAPES)
    if form == "count":
        return str(len(scene.objects)), {str(i) for i in range(1, 100)}
    if form == "exists":
        return ("yes" if _find(scene, colour=g[0], shape=g[1]) else "no"), {"yes", "no"}
    if form == "size":
        return _one(scene, colour=g[0], shape=g[1]).size, set(SIZES)
    return _unique_relative(scene, g[0], g[1], g[2]).colour, set(COLOURS)


def _check_vqa(inst: Instance, scene: Scene) -> None:
    form, g = _parse(inst.question, _VQA_QUESTIONS)
    if form != inst.meta.get("template"):
        raise _Bad(f"question form {form} != meta template {inst.meta.get('template')}")
    gold, vocab = _vqa_gold(form, g, scene)
    if inst.answer != gold:
        raise _Bad(f"answer {inst.answer!r} != gold {gold!r}")
    if len(inst.human_answers) != VQA_HUMAN_ANSWERS:
        raise _Bad(f"{len(inst.human_answers)} human answers")
    if inst.human_answers.count(gold) * 2 <= VQA_HUMAN_ANSWERS:
        raise _Bad(f"gold is not the strict majority of {inst.human_answers}")
    off = [a for a in inst.human_answers if a not in vocab]
    if off:
        raise _Bad(f"human answers {off} are not of the question's answer type")


def _check_snli(inst: Instance, scene: Scene) -> None:
    form, _g, truth = _statement(inst.hypothesis, scene)
    if form != inst.meta.get("template"):
        raise _Bad(f"hypothesis form {form} != meta template {inst.meta.get('template')}")
    if form not in SNLI_TEMPLATES:
        raise _Bad(f"form {form} is not an SNLI template")
    want = {True: "entailment", False: "contradiction", UNKNOWN: "neutral"}[truth]
    if inst.label is None or SNLI_LABELS[inst.label] != want:
        raise _Bad(f"label {inst.label} but the scene makes {inst.hypothesis!r} {want}")


_VCR_QUESTIONS = {
    "rel_colour": rf"what color is the object {_R} the {_C} {_S}\?",
    "rel_shape": rf"what shape is the object {_R} the {_C} {_S}\?",
    "size_colour": rf"what color is the {_Z} object\?",
    "size_shape": rf"what shape is the {_Z} object\?",
    "count": r"how many objects are in the picture\?",
}
_VCR_ANSWERS = {
    "colour": rf"it is {_C}\.",
    "shape": rf"it is an? {_S}\.",
    "count": rf"there (?:is|are) {_W} objects?\.",
}


def _vcr_answer_value(text: str) -> tuple[str, str | int]:
    kind, g = _parse(text, _VCR_ANSWERS)
    return kind, (_word_to_int(g[0]) if kind == "count" else g[0])


def _justifies(qform: str, qg: tuple[str, ...], gold: str | int, form: str, g: tuple[str, ...]) -> bool:
    """Whether a rationale of this form and wording, if true, would justify the gold answer."""
    if qform in ("rel_colour", "rel_shape"):
        if form != "relation":
            return False
        attr = g[0] if qform == "rel_colour" else g[1]
        return attr == gold and (g[2], g[3], g[4]) == qg
    if qform in ("size_colour", "size_shape"):
        if form != "only":
            return False
        attr = g[1] if qform == "size_colour" else g[2]
        return g[0] == qg[0] and attr == gold
    return form == "shows" and sum(_parse_list(g[0]).values()) == gold


def _check_vcr(inst: Instance, scene: Scene) -> None:
    qform, qg = _parse(inst.question, _VCR_QUESTIONS)
    if qform != inst.meta.get("template"):
        raise _Bad(f"question form {qform} != meta template {inst.meta.get('template')}")
    if qform == "rel_colour":
        gold: str | int = _unique_relative(scene, qg[0], qg[1], qg[2]).colour
    elif qform == "rel_shape":
        gold = _unique_relative(scene, qg[0], qg[1], qg[2]).shape
    elif qform == "size_colour":
        gold = _one(scene, size=qg[0]).colour
    elif qform == "size_shape":
        gold = _one(scene, size=qg[0]).shape
    else:
        gold = len(scene.objects)
    want_kind = {"rel_colour": "colour", "size_colour": "colour", "rel_shape": "shape", "size_shape": "shape"}
    values = [_vcr_answer_value(a) for a in inst.answers]
    if any(k != want_kind.get(qform, "count") for k, _ in values):
        raise _Bad(f"answers {inst.answers} are not all of the question's kind")
    if len({v for _, v in values}) != VCR_CHOICES:
        raise _Bad(f"answers {inst.answers} are not distinct")
    if inst.label is None or values[inst.label][1] != gold:
        raise _Bad(f"answer {inst.label} is not the gold {gold!r}")
    if inst.rationale_label is None or len(set(inst.rationales)) != VCR_CHOICES:
        raise _Bad("rationales missing, duplicated or unlabelled")
    image_needed = False
    for i, text in enumerate(inst.rationales):
        form, g, truth = _statement(text, scene)
        if truth == UNKNOWN:
            raise _Bad(f"rationale {text!r} is undecidable from the image")
        just = _justifies(qform, qg, gold, form, g)
        if i == inst.rationale_label:
            if not (truth is True and just):
                raise _Bad(
                    f"gold rationale {text!r} is not a true justification (truth={truth}, just={just})"
                )
        elif truth is True and just:
            raise _Bad(f"distractor rationale {text!r} also justifies the answer")
        elif just and truth is False:
            image_needed = True
    if not image_needed:
        raise _Bad("no rationale distractor fits the answer's wording, so QA->R would not need the image")


_CAPTIONS = {
    "list": r"(\w+) objects?: (.+)",
    "relation": rf"an? {_Z} {_C} {_S} {_R} an? {_Z} {_C} {_S}",
    "single": rf"a picture with an? {_Z} {_C} {_S}",
}


def _caption_truth(text: str, scene: Scene) -> tuple[str, bool | None]:
    form, g = _parse(text, _CAPTIONS)
    if form == "list":
        return form, _word_to_int(g[0]) == len(scene.objects) and _parse_list(g[1]) == _multiset(scene)
    if form == "single":
        return form, bool(_find(scene, size=g[0], colour=g[1], shape=g[2]))
    a = _find(scene, size=g[0], colour=g[1], shape=g[2])
    b = _find(scene, size=g[4], colour=g[5], shape=g[6])
    if not a or not b or a[0] is b[0]:
        return form, False
    return form, _v_relation(scene, a[0], b[0], g[3])


def _check_caption(inst: Instance, scene: Scene) -> None:
    form, truth = _caption_truth(inst.caption, scene)
    if form != inst.meta.get("template"):
        raise _Bad(f"caption form {form} != meta template {inst.meta.get('template')}")
    if truth is not True:
        raise _Bad(f"caption {inst.caption!r} is not true for the scene ({truth})")
    negs = inst.meta.get("hard_negatives", [])
    if len(negs) < 3 or len(set(negs)) != len(negs):
        raise _Bad(f"need >= 3 distinct hard negatives, got {negs}")
    words = inst.caption.split()
    for neg in negs:
        nform, ntruth = _caption_truth(neg, scene)
        if nform != form or ntruth is not False:
            raise _Bad(f"hard negative {neg!r} is not a false {form} caption ({nform}, {ntruth})")
        nwords = neg.split()
        if len(nwords) != len(words) or sum(a != b for a, b in zip(words, nwords, strict=True)) != 1:
            raise _Bad(f"hard negative {neg!r} does not change exactly one word of {inst.caption!r}")


def explain_label(inst: Instance, scene: Scene) -> str:
    """Why the instance's label does not follow from the scene; "" when it does."""
    checks = {"vqa": _check_vqa, "snli_ve": _check_snli, "vcr": _check_vcr, "caption": _check_caption}
    try:
        if inst.domain != scene.domain:
            raise _Bad(f"domain {inst.domain!r} != scene domain {scene.domain!r}")
        checks[inst.task](inst, scene)
    except _Bad as e:
        return f"{inst.key}: {e}"
    return ""


def verify_label(inst: Instance, scene: Scene) -> bool:
    """Re-derive the instance's label(s) from the scene objects and compare (see explain_label)."""
    return explain_label(inst, scene) == ""
