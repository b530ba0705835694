"""The embedded synthetic world: the default dataset, generated in-process with no download.

Scenes hold 1..max_objects non-overlapping shapes (4 shapes × 6 colours × 2 sizes, each colour–shape pair at
most once so "the red circle" always names one object), rendered in three visual domains that keep each
object's colour recognisable: ``plain`` (solid shapes, light background), ``textured`` (shaded noisy shapes on a
dark textured background) and ``outline`` (thick outlines on a grey gradient). Every scene yields one
instance of each official task (VQA-, SNLI-VE- and VCR-like) and, in the caption splits, captions with hard
negatives that change exactly one attribute (the teacher's pretraining corpus and its binding test).

No label can be read off the text: per split, a balancer (``Balancer``) chooses for each scene the question
or hypothesis that keeps answers in equal shares within every question text and every word of it (VQA v2's
complementary pairs); every SNLI-VE form takes all three labels in equal shares, neutral meaning the picture
cannot settle the statement (it names an object the picture does not hold); VCR candidates are
adversarially matched (distractors are golds of other instances of the same form). tests/test_text_shortcuts.py
holds a text-only classifier to chance.

Determinism: every scene and every task instance draws from its own RNG seeded by hashing (seed, split,
index[, task]); scenes regenerate on their own, task instances by replaying their split's scenes in order
(``task_instances``: the balancers depend on the scenes before). The same seed gives byte-identical PNGs
(for a given Pillow/zlib build) and identical instances.

``verify_label`` re-derives every label from the scene objects by parsing the generated text, a code path
independent of the generators; the tests run it over every template.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import multiprocessing
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from ..names import CAPTION_SPLITS, TASK_SPLITS
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

VQA_TEMPLATES = ("color_of_shape", "shape_of_color", "count", "exists", "size", "spatial")
SNLI_TEMPLATES = ("colour", "shape", "size", "relation")
VCR_TEMPLATES = ("rel_colour", "rel_shape", "size_colour", "size_shape")
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


_SCENE_ATTEMPTS = 100


def make_scene(seed: int, split: str, index: int, params: SyntheticParams) -> Scene:
    """Scene ``index`` of ``split``; regenerable on its own from (seed, split, index). A task split's scene
    is redrawn (from a seed that adds the attempt number) in the rare case that it supports no VCR question
    (no object unique by size and no clear relation)."""
    _check_params(params)
    domain = params.domains[index % len(params.domains)]
    for attempt in range(_SCENE_ATTEMPTS):
        parts = (seed, split, index) if attempt == 0 else (seed, split, index, attempt)
        scene = _draw_scene(derive_seed("scene", *parts), domain, params)
        if split not in TASK_SPLITS or _vcr_choices(scene):
            return scene
    raise ValueError(
        f"synthetic: {_SCENE_ATTEMPTS} scenes drawn for {split} {index} and none supports a VCR question; "
        f"check min_objects/max_objects ({params.min_objects}..{params.max_objects})"
    )


def _draw_scene(s: int, domain: str, params: SyntheticParams) -> Scene:
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
    """The object counts the world draws: a count answer outside them would be a text-only giveaway."""
    return list(range(params.min_objects, params.max_objects + 1))


def _unique_by(scene: Scene, attr: str) -> list[SceneObject]:
    counts = Counter(getattr(o, attr) for o in scene.objects)
    return [o for o in scene.objects if counts[getattr(o, attr)] == 1]


def _base_meta(scene: Scene, template: str) -> dict[str, Any]:
    return {"template": template, "scene": scene.to_dict()}


# ------------------------------------------------------------------------------------------ balancing


@dataclass
class _Choice:
    """One way to pose a task about a scene. ``balance`` holds (groups, value, allowed values) triples: what the
    balancer counts when the choice is taken; ``payload`` is what the task builder needs to write it out."""

    form: str
    balance: list[tuple[list[tuple], str, tuple[str, ...]]]
    payload: Any


class Balancer:
    """The state that keeps one task's labels independent of its text across a split.

    Each scene offers several ways to pose the task (which object to ask about, which form); the balancer
    takes the one whose answer is the least used so far within every group its text belongs to (the whole
    question text, and each word in each slot of its form), then the least used form. Every question text
    and every word thus ends the split with its answers in equal shares (within one per group): VQA v2's
    complementary pairs, the same question asked of other images whose answers differ. A text-only model
    then predicts no better than chance, while the answer still follows from the image.

    Greedy and sequential, so an instance depends on the earlier scenes of its split (``task_instances``
    replays them); a fresh balancer gives an unbalanced but correct instance."""

    def __init__(self) -> None:
        self.counts: dict[tuple, Counter] = {}
        self.forms: Counter = Counter()
        self.history: dict[tuple, list[str]] = {}  # golds per (kind, form), for VCR's matched distractors
        self.positions: dict[tuple, Counter] = {}  # VCR gold positions per (field, form)

    def _deficit(self, c: _Choice) -> int:
        d = 0
        for groups, value, allowed in c.balance:
            for g in groups:
                if cnt := self.counts.get(g):
                    d += cnt[value] - min(cnt[v] for v in allowed)
        return d

    def pick(self, choices: list[_Choice], rng: random.Random) -> _Choice:
        best = min(choices, key=lambda c: (self._deficit(c), self.forms[c.form], rng.random()))
        self.forms[best.form] += 1
        for groups, value, _ in best.balance:
            for g in groups:
                self.counts.setdefault(g, Counter())[value] += 1
        return best

    def position(self, key: tuple, rng: random.Random) -> int:
        """A gold position, the least used so far for this key (ties at random): uniform to the last one."""
        used = self.positions.setdefault(key, Counter())
        low = min(used[p] for p in range(VCR_CHOICES))
        pos = rng.choice([p for p in range(VCR_CHOICES) if used[p] == low])
        used[pos] += 1
        return pos

    def matched(self, key: tuple, gold: str, allowed: tuple[str, ...], rng: random.Random) -> list[str]:
        """VCR_CHOICES - 1 distractor values: golds of earlier instances of the same form (so a distractor is
        as frequent a gold as the gold itself), topped up uniformly from the allowed values at a split's start."""
        past = self.history.setdefault(key, [])
        pool = past[-64:]
        rng.shuffle(pool)
        out = list(dict.fromkeys(v for v in pool if v != gold and v in allowed))[: VCR_CHOICES - 1]
        rest = [v for v in allowed if v != gold and v not in out]
        out += rng.sample(rest, VCR_CHOICES - 1 - len(out))
        past.append(gold)
        return out


def _slot_groups(task: str, form: str, text: str | None, slots: dict[str, str]) -> list[tuple]:
    groups: list[tuple] = [(task, form)] + [(task, form, k, v) for k, v in slots.items()]
    return groups + [(task, "text", text)] if text is not None else groups


# ------------------------------------------------------------------------------------------------ VQA

_VQA_ANSWER_TYPES = {
    "color_of_shape": "color",
    "shape_of_color": "shape",
    "count": "number",
    "exists": "yes/no",
    "size": "size",
    "spatial": "color",
}


def _answer_pool(answer_type: str, params: SyntheticParams) -> list[str]:
    return {
        "color": list(COLOURS),
        "shape": list(SHAPES),
        "size": list(SIZES),
        "yes/no": ["yes", "no"],
        "number": [str(n) for n in _count_values(params)],
    }[answer_type]


def _vqa_choices(scene: Scene, params: SyntheticParams) -> list[_Choice]:
    """Every question the scene can answer clearly, with its answer (a few hundred at most)."""
    out: list[_Choice] = []

    def add(form: str, question: str, answer: str, slots: dict[str, str], extra: dict) -> None:
        allowed = tuple(_answer_pool(_VQA_ANSWER_TYPES[form], params))
        groups = _slot_groups("vqa", form, question, slots)
        out.append(_Choice(form, [(groups, answer, allowed)], (question, answer, extra)))

    for o in _unique_by(scene, "shape"):
        add(
            "color_of_shape",
            f"what color is the {o.shape}?",
            o.colour,
            {"s": o.shape},
            {"object": o.to_dict()},
        )
    for o in _unique_by(scene, "colour"):
        q = f"what shape is the {o.colour} object?"
        add("shape_of_color", q, o.shape, {"c": o.colour}, {"object": o.to_dict()})
    if len(_count_values(params)) > 1:  # a world of one object count would answer it from the text
        add("count", "how many objects are there?", str(len(scene.objects)), {}, {})
    present = {(o.colour, o.shape): o for o in scene.objects}
    for c in COLOURS:
        for s in SHAPES:
            o = present.get((c, s))
            extra = {"object": o.to_dict() if o else None}
            add("exists", f"is there {_art(c)} {c} {s}?", "yes" if o else "no", {"c": c, "s": s}, extra)
    for o in scene.objects:
        q = f"what size is the {_name(o)}?"
        add("size", q, o.size, {"c": o.colour, "s": o.shape}, {"object": o.to_dict()})
    for ref, rel, t in _referents(scene):
        meta = {"object": t.to_dict(), "reference": ref.to_dict(), "relation": rel}
        q = f"what color is the object {rel} the {_name(ref)}?"
        add("spatial", q, t.colour, {"rel": rel, "c": ref.colour, "s": ref.shape}, meta)
    return out


def vqa_instance(
    scene: Scene,
    key: str,
    image_id: str,
    split: str,
    rng: random.Random,
    params: SyntheticParams,
    balancer: Balancer | None = None,
) -> Instance:
    """A VQA-like open question; 10 human answers with a fixed share of plausible wrong ones. ``balancer``
    (the split's) picks the question that keeps answers in equal shares per question text and word."""
    choice = (balancer or Balancer()).pick(_vqa_choices(scene, params), rng)
    template = choice.form
    question, answer, extra = choice.payload
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
# Every form takes all three labels. A hypothesis speaks of objects by colour and shape; when the picture
# holds the object, it settles the statement (entailment or contradiction); when it does not, the picture
# cannot say what colour, shape, size or place that object has (neutral). The objects named are drawn alike
# for all three labels, so only the image tells which case holds.

_SNLI_PER_FORM = 12  # choices sampled per form and scene: enough for the balancer, cheap to score


def _snli_choices(scene: Scene, label: int, rng: random.Random, params: SyntheticParams) -> list[_Choice]:
    want = SNLI_LABELS[label]
    objs = scene.objects
    present = {(o.colour, o.shape) for o in objs}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    by_form: dict[str, list[tuple[str, dict[str, str]]]] = {f: [] for f in SNLI_TEMPLATES}

    shapes_absent = [s for s in SHAPES if s not in {o.shape for o in objs}]
    colours_absent = [c for c in COLOURS if c not in {o.colour for o in objs}]
    if want == "neutral":
        by_form["colour"] = [(f"the {s} is {c}.", {"s": s, "c": c}) for s in shapes_absent for c in COLOURS]
        by_form["shape"] = [
            (f"the {c} object is {_art(s)} {s}.", {"c": c, "s": s}) for c in colours_absent for s in SHAPES
        ]
        by_form["size"] = [
            (f"the {c} {s} is {z}.", {"c": c, "s": s, "z": z}) for c, s in absent for z in SIZES
        ]
        rel_pairs = [
            pair
            for o in objs
            for c, s in rng.sample(absent, min(6, len(absent)))
            for pair in (((o.colour, o.shape), (c, s)), ((c, s), (o.colour, o.shape)))
        ]
        rels = [(a, rel, b) for a, b in rel_pairs for rel in RELATIONS]
    else:
        true = want == "entailment"
        for o in _unique_by(scene, "shape"):
            for c in [o.colour] if true else [c for c in COLOURS if c != o.colour]:
                by_form["colour"].append((f"the {o.shape} is {c}.", {"s": o.shape, "c": c}))
        for o in _unique_by(scene, "colour"):
            for s in [o.shape] if true else [s for s in SHAPES if s != o.shape]:
                by_form["shape"].append((f"the {o.colour} object is {_art(s)} {s}.", {"c": o.colour, "s": s}))
        for o in objs:
            z = o.size if true else SIZES[1 - SIZES.index(o.size)]
            by_form["size"].append((f"the {_name(o)} is {z}.", {"c": o.colour, "s": o.shape, "z": z}))
        # The false version states the opposite of a clear relation, so the image refutes it outright.
        rels = [
            ((a.colour, a.shape), rel if true else OPPOSITE[rel], (b.colour, b.shape))
            for a, rel, b in _clear_pairs(scene)
        ]
    by_form["relation"] = [
        (f"the {ac} {as_} is {rel} the {bc} {bs}.", {"ac": ac, "as": as_, "rel": rel, "bc": bc, "bs": bs})
        for (ac, as_), rel, (bc, bs) in rels
    ]
    if params.max_objects < 2:  # no relation can hold, so every relation hypothesis would be neutral
        del by_form["relation"]
    out = []
    for form, items in by_form.items():
        for text, slots in rng.sample(items, min(_SNLI_PER_FORM, len(items))):
            out.append(_Choice(form, [(_slot_groups("snli", form, None, slots), want, SNLI_LABELS)], text))
    return out


def snli_instance(
    scene: Scene,
    key: str,
    image_id: str,
    split: str,
    rng: random.Random,
    params: SyntheticParams,
    label: int | None = None,
    balancer: Balancer | None = None,
) -> Instance:
    """An SNLI-VE-like hypothesis. ``label`` (index into SNLI_LABELS) is drawn from rng when not given;
    generate() cycles it by scene index so the labels are balanced exactly, and the split's ``balancer``
    spreads each form and word evenly over the three labels."""
    if label is None:
        label = rng.randrange(len(SNLI_LABELS))
    choice = (balancer or Balancer()).pick(_snli_choices(scene, label, rng, params), rng)
    return Instance(
        key=key,
        task="snli_ve",
        image_id=image_id,
        split=split,
        domain=scene.domain,
        hypothesis=str(choice.payload),
        label=label,
        meta=_base_meta(scene, choice.form),
    )


# ------------------------------------------------------------------------------------------------ VCR
# Adversarial matching as in VCR: the distractor answers are golds of earlier instances of the same form
# (answers are balanced per form, so every candidate is as likely a gold as text), and the distractor
# rationales are the gold rationale the same question and answer would have on another image (the same
# sentence with the attribute the answer does not name taken from other instances' golds). Every candidate
# reads as plausibly as the gold; only the image tells them apart.


@dataclass
class _VcrDraft:
    question: str
    answer_kind: str  # "colour" | "shape": how answer values are written
    gold: str
    allowed: tuple[str, ...]  # answer values the question admits (never the reference's own colour)
    rationale: Callable[[str], str]  # rationale text for a value of the attribute the answer does not name
    rationale_gold: str
    rationale_allowed: tuple[str, ...]
    meta: dict[str, Any]


def _vcr_answer(kind: str, value: str) -> str:
    return f"it is {value}." if kind == "colour" else f"it is {_art(value)} {value}."


def _vcr_choices(scene: Scene) -> list[_Choice]:
    out: list[_Choice] = []

    def add(form: str, d: _VcrDraft, slots: dict[str, str]) -> None:
        q_groups = _slot_groups("vcr", form, None, slots)
        r_groups = _slot_groups("vcr-r", form, None, {**slots, "answer": d.gold})
        balance = [(q_groups, d.gold, d.allowed), (r_groups, d.rationale_gold, d.rationale_allowed)]
        out.append(_Choice(form, balance, d))

    for ref, rel, t in _referents(scene):
        tail = f"{rel} the {_name(ref)}"
        meta = {"object": t.to_dict(), "reference": ref.to_dict(), "relation": rel}
        slots = {"rel": rel, "c": ref.colour, "s": ref.shape}
        if t.colour != ref.colour:
            # The answer never repeats the reference's colour (and no candidate does), or a rationale
            # distractor would have to name the reference itself, which the text alone could rule out.
            d = _VcrDraft(
                f"what color is the object {tail}?",
                "colour",
                t.colour,
                tuple(c for c in COLOURS if c != ref.colour),
                lambda s, c=t.colour, tail=tail: f"the {c} {s} is {tail}.",
                t.shape,
                SHAPES,
                meta,
            )
            add("rel_colour", d, slots)
        d = _VcrDraft(
            f"what shape is the object {tail}?",
            "shape",
            t.shape,
            SHAPES,
            lambda c, s=t.shape, tail=tail: f"the {c} {s} is {tail}.",
            t.colour,
            tuple(c for c in COLOURS if (c, t.shape) != (ref.colour, ref.shape)),
            meta,
        )
        add("rel_shape", d, slots)

    for z in SIZES:
        xs = [o for o in scene.objects if o.size == z]
        if len(xs) != 1:
            continue
        t = xs[0]
        head = f"the only {z} object is"
        meta = {"object": t.to_dict()}
        d = _VcrDraft(
            f"what color is the {z} object?",
            "colour",
            t.colour,
            COLOURS,
            lambda s, c=t.colour, head=head: f"{head} {_art(c)} {c} {s}.",
            t.shape,
            SHAPES,
            meta,
        )
        add("size_colour", d, {"z": z})
        d = _VcrDraft(
            f"what shape is the {z} object?",
            "shape",
            t.shape,
            SHAPES,
            lambda c, s=t.shape, head=head: f"{head} {_art(c)} {c} {s}.",
            t.colour,
            COLOURS,
            meta,
        )
        add("size_shape", d, {"z": z})
    return out


def vcr_instance(
    scene: Scene,
    key: str,
    image_id: str,
    split: str,
    rng: random.Random,
    params: SyntheticParams,
    balancer: Balancer | None = None,
) -> Instance:
    """A VCR-like question with 4 answers and 4 rationales (adversarially matched, see above); gold
    positions are the least used so far for the form, so they are uniform over the split."""
    b = balancer or Balancer()
    choices = _vcr_choices(scene)
    if not choices:  # cannot happen: a lone object is the only one of its size
        raise RuntimeError(f"vcr '{key}': the scene supports no question")
    choice = b.pick(choices, rng)
    template, d = choice.form, choice.payload
    wrong = b.matched(("answer", template), d.gold, d.allowed, rng)
    label = b.position(("label", template), rng)
    values = [*wrong]
    values.insert(label, d.gold)
    r_wrong = b.matched(("rationale", template), d.rationale_gold, d.rationale_allowed, rng)
    rationale_label = b.position(("rationale_label", template), rng)
    r_values = [*r_wrong]
    r_values.insert(rationale_label, d.rationale_gold)
    return Instance(
        key=key,
        task="vcr",
        image_id=image_id,
        split=split,
        domain=scene.domain,
        question=d.question,
        answers=[_vcr_answer(d.answer_kind, v) for v in values],
        rationales=[d.rationale(v) for v in r_values],
        label=label,
        rationale_label=rationale_label,
        meta={**_base_meta(scene, template), **d.meta},
    )


def _attribute_changes(o: SceneObject) -> list[SceneObject]:
    out = [SceneObject(o.shape, c, o.size, o.x, o.y, o.r) for c in COLOURS if c != o.colour]
    out += [SceneObject(s, o.colour, o.size, o.x, o.y, o.r) for s in SHAPES if s != o.shape]
    out += [SceneObject(o.shape, o.colour, z, o.x, o.y, o.r) for z in SIZES if z != o.size]
    return out


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


def task_instances(
    split: str, params: SyntheticParams, count: int | None = None
) -> Iterator[tuple[int, Scene, list[Instance]]]:
    """(index, scene, [vqa, snli_ve, vcr instance]) for the first ``count`` scenes of a task split (all by
    default), without rendering. The balancers run over the split in order, so instance i is reproduced by
    replaying scenes 0..i; scenes themselves regenerate on their own (make_scene)."""
    _check_params(params)
    if split not in TASK_SPLITS:
        raise ValueError(f"synthetic: {split!r} is not a task split {TASK_SPLITS}")
    if split not in params.scenes:
        raise ValueError(
            f"synthetic: data.synthetic.scenes has no count for split {split!r} ({params.scenes})"
        )
    balancers = {task: Balancer() for task in ("vqa", "snli_ve", "vcr")}
    n = params.scenes[split] if count is None else min(count, params.scenes[split])
    for i in range(n):
        scene = make_scene(params.seed, split, i, params)
        image_id = f"synth-{split}-{i:07d}"

        # Domains cycle with i too: shifting the label cycle once per domain round makes every
        # (domain, label) pair equally frequent, so the rendering style cannot give the label away.
        label = (i + i // len(params.domains)) % len(SNLI_LABELS)
        insts = []
        for task, build in (("vqa", vqa_instance), ("snli_ve", snli_instance), ("vcr", vcr_instance)):
            rng = task_rng(params.seed, split, i, task)
            key = f"{split}-{task}-{i:07d}"
            extra = {"label": label} if task == "snli_ve" else {}
            insts.append(build(scene, key, image_id, split, rng, params, balancer=balancers[task], **extra))
        yield i, scene, insts


# Below this many images a split renders in-process: starting worker processes (each imports numpy and PIL)
# costs more than it saves.
_POOL_MIN_IMAGES = 1000
_POOL_CHUNK = 64  # scenes per task handed to a worker: enough to amortise the pickling of each hand-off
# At most this many: beyond a few, the shard writer in this process is what the split waits on, and each
# worker is a process with numpy and PIL loaded (five splits at once on a many-core machine would start
# five times one per core).
_POOL_MAX_WORKERS = 4


def _render_at(split: str, params: SyntheticParams, index: int) -> bytes:
    """A worker's job: a scene regenerates from (seed, split, index) alone, so the index is all it needs."""
    return render(make_scene(params.seed, split, index, params), params.image_size)


@contextlib.contextmanager
def _images_ahead(
    split: str, params: SyntheticParams, n: int, workers: int
) -> Iterator[Iterator[bytes] | None]:
    """PNG bytes of scenes 0..n-1 in order, rendered on ``workers`` processes (at most ``_POOL_MAX_WORKERS``)
    while this one writes shards; None when the split renders in-process (``workers`` <= 1, or a small
    split). The bytes are the same either way (``render`` is a function of the scene alone). Spawned, not
    forked: a caller's threads (a test runner's, a notebook's) must not be copied into a child mid-lock."""
    if workers <= 1 or n < _POOL_MIN_IMAGES:
        yield None
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, _POOL_MAX_WORKERS)) as pool:
        yield pool.imap(functools.partial(_render_at, split, params), range(n), chunksize=_POOL_CHUNK)


def generate(split: str, params: SyntheticParams, writer: DatasetWriter, workers: int = 1) -> None:
    """Write one split of the synthetic world: train/val/test (one instance per task per scene) or the
    caption corpora captions/captions_val (captions_per_scene captions per scene, separate scene streams).
    ``workers`` > 1 renders the images on that many processes; the shards are byte-identical."""
    _check_params(params)
    if split in TASK_SPLITS:
        with _images_ahead(split, params, params.scenes.get(split, 0), workers) as images:
            for i, scene, insts in task_instances(split, params):
                png = next(images) if images is not None else render(scene, params.image_size)
                writer.add_image(f"synth-{split}-{i:07d}", png, "png", scene.domain)
                for inst in insts:
                    writer.add_instance(inst)
        return
    if split in CAPTION_SPLITS:
        n = caption_scene_count(split, params)
        with _images_ahead(split, params, n, workers) as images:
            for i in range(n):
                scene = make_scene(params.seed, split, i, params)
                image_id = f"synth-{split}-{i:07d}"
                png = next(images) if images is not None else render(scene, params.image_size)
                writer.add_image(image_id, png, "png", scene.domain)
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
    "colour": rf"the {_S} is {_C}\.",
    "shape": rf"the {_C} object is an? {_S}\.",
    "size": rf"the {_C} {_S} is {_Z}\.",
    "relation": rf"the {_C} {_S} is {_R} the {_C} {_S}\.",
    "only": rf"the only {_Z} object is an? {_C} {_S}\.",
}
UNKNOWN = "unknown"


def _parse(text: str, forms: dict[str, str]) -> tuple[str, tuple[str, ...]]:
    hits = [(name, m.groups()) for name, pat in forms.items() if (m := re.fullmatch(pat, text))]
    if len(hits) != 1:
        raise _Bad(f"text {text!r} matches {len(hits)} known forms")
    return hits[0]


def _statement(text: str, scene: Scene) -> tuple[str, tuple[str, ...], bool | str]:
    """(form, arguments, truth) of a declarative sentence; truth is UNKNOWN when the image cannot decide: the
    sentence says something of an object the picture does not hold."""
    form, g = _parse(text, _STATEMENTS)
    if form in ("colour", "shape"):
        xs = _find(scene, shape=g[0]) if form == "colour" else _find(scene, colour=g[0])
        if len(xs) > 1:
            raise _Bad(f"{text!r}: ambiguous reference")
        if not xs:
            return form, g, UNKNOWN
        truth: bool | str = xs[0].colour == g[1] if form == "colour" else xs[0].shape == g[1]
    elif form == "size":
        xs = _find(scene, colour=g[0], shape=g[1])
        truth = xs[0].size == g[2] if xs else UNKNOWN
    elif form == "relation":
        a, b = _find(scene, colour=g[0], shape=g[1]), _find(scene, colour=g[3], shape=g[4])
        if not a or not b:
            truth = UNKNOWN
        elif a[0] is b[0]:
            raise _Bad(f"{text!r}: an object related to itself")
        else:
            r = _v_relation(scene, a[0], b[0], g[2])
            if r is None:
                raise _Bad(f"{text!r}: relation is ambiguous in this scene")
            truth = r
    else:  # "only"
        xs = _find(scene, size=g[0])
        truth = len(xs) == 1 and (xs[0].colour, xs[0].shape) == (g[1], g[2])
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
}
_VCR_ANSWERS = {
    "colour": rf"it is {_C}\.",
    "shape": rf"it is an? {_S}\.",
}


def _vcr_answer_value(text: str) -> tuple[str, str]:
    kind, g = _parse(text, _VCR_ANSWERS)
    return kind, g[0]


def _justifies(qform: str, qg: tuple[str, ...], gold: str, form: str, g: tuple[str, ...]) -> bool:
    """Whether a rationale of this form and wording, if true, would justify the gold answer."""
    if qform in ("rel_colour", "rel_shape"):
        if form != "relation":
            return False
        attr = g[0] if qform == "rel_colour" else g[1]
        return attr == gold and (g[2], g[3], g[4]) == qg
    if form != "only":
        return False
    attr = g[1] if qform == "size_colour" else g[2]
    return g[0] == qg[0] and attr == gold


def _check_vcr(inst: Instance, scene: Scene) -> None:
    qform, qg = _parse(inst.question, _VCR_QUESTIONS)
    if qform != inst.meta.get("template"):
        raise _Bad(f"question form {qform} != meta template {inst.meta.get('template')}")
    if qform == "rel_colour":
        gold = _unique_relative(scene, qg[0], qg[1], qg[2]).colour
    elif qform == "rel_shape":
        gold = _unique_relative(scene, qg[0], qg[1], qg[2]).shape
    elif qform == "size_colour":
        gold = _one(scene, size=qg[0]).colour
    else:
        gold = _one(scene, size=qg[0]).shape
    want_kind = "colour" if qform.endswith("colour") else "shape"
    values = [_vcr_answer_value(a) for a in inst.answers]
    if any(k != want_kind for k, _ in values):
        raise _Bad(f"answers {inst.answers} are not all of the question's kind")
    if len({v for _, v in values}) != VCR_CHOICES:
        raise _Bad(f"answers {inst.answers} are not distinct")
    if inst.label is None or values[inst.label][1] != gold:
        raise _Bad(f"answer {inst.label} is not the gold {gold!r}")
    if inst.rationale_label is None or len(set(inst.rationales)) != VCR_CHOICES:
        raise _Bad("rationales missing, duplicated or unlabelled")
    image_needed = False
    for i, text in enumerate(inst.rationales):
        # A rationale about an object the picture does not hold (truth UNKNOWN) justifies nothing.
        form, g, truth = _statement(text, scene)
        just = _justifies(qform, qg, gold, form, g)
        if i == inst.rationale_label:
            if not (truth is True and just):
                raise _Bad(
                    f"gold rationale {text!r} is not a true justification (truth={truth}, just={just})"
                )
        elif truth is True and just:
            raise _Bad(f"distractor rationale {text!r} also justifies the answer")
        elif just:
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
