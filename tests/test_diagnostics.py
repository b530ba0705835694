"""The selection-quality diagnostic: which grid cells hold the objects a text names, and whether clip_td's
selection (computed from the cache as in training) lands on them more often than random selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import DistillParams
from pipeline.data.schema import Instance
from student.diagnostics import attribute_vocab, cell_mask, named_objects, object_box, selection_quality
from student.losses import method_config

SIZE = 64


def _obj(shape, colour, x, y, r=6.0, size="small"):
    return {"shape": shape, "colour": colour, "size": size, "x": x, "y": y, "r": r}


def _inst(key, question, objects, answer="red"):
    scene = {"domain": "plain", "image_size": SIZE, "seed": 0, "objects": objects}
    return Instance(
        key=key,
        task="vqa",
        image_id=f"img-{key}",
        split="train",
        question=question,
        answer=answer,
        human_answers=[answer] * 10,
        meta={"template": "t", "scene": scene},
    )


def test_cells_follow_the_object_box_in_row_major_order():
    # A small object in the top-left corner and one in the bottom-right, on a 4 x 4 grid.
    tl = cell_mask([object_box(_obj("circle", "red", 8, 8), SIZE)], 4)
    br = cell_mask([object_box(_obj("circle", "red", 56, 56), SIZE)], 4)
    assert tl.nonzero()[0].tolist() == [0] and br.nonzero()[0].tolist() == [15]
    # An object straddling the centre covers the four middle cells; a sliver under min_cover does not count.
    mid = cell_mask([object_box(_obj("square", "blue", 32, 32, r=10), SIZE)], 4)
    assert mid.nonzero()[0].tolist() == [5, 6, 9, 10]
    assert not cell_mask([(0.0, 0.0, 0.01, 0.01)], 4, min_cover=0.1).any()
    # A normalised box (a world that stores boxes) is taken as it is.
    assert object_box({"box": [0.5, 0.0, 1.0, 0.25]}, SIZE) == (0.5, 0.0, 1.0, 0.25)


def test_named_objects_are_those_matching_every_attribute_the_text_mentions():
    objs = [_obj("circle", "red", 8, 8), _obj("square", "red", 56, 8), _obj("circle", "blue", 8, 56)]
    inst = _inst("a", "is there a red circle?", objs)
    vocab = attribute_vocab([inst])
    assert named_objects(inst, "is there a red circle?", vocab) == [objs[0]]
    assert named_objects(inst, "how many circles are there?", vocab) == [objs[0], objs[2]]
    assert named_objects(inst, "how many objects are there?", vocab) == []
    # The meta's own object reference counts even when the text names it by relation only.
    inst.meta["object"] = objs[1]
    assert objs[1] in named_objects(inst, "what color is the object right of the circle?", vocab)


class _AlignedCache:
    """A teacher cache whose image tokens point along the text's embedding exactly on the named object's
    cells (and elsewhere along an orthogonal direction), or nowhere in particular when ``aligned`` is off."""

    grid = 4

    def __init__(self, instances, aligned=True):
        self.aligned = aligned
        self.on = {}
        self.text_of = {}
        for inst in instances:
            scene = inst.meta["scene"]
            vocab = attribute_vocab(instances)
            boxes = [object_box(o, SIZE) for o in named_objects(inst, inst.question, vocab)]
            self.on[inst.image_id] = torch.from_numpy(cell_mask(boxes, self.grid))
            assert scene["image_size"] == SIZE

    def image_targets(self, image_ids, relevance=None):
        e = 8
        tok = torch.zeros(len(image_ids), self.grid**2, e)
        gen = torch.Generator().manual_seed(0)
        for i, iid in enumerate(image_ids):
            if self.aligned:
                tok[i, :, 1] = 1.0
                tok[i, self.on[iid], 0] = 1.0
                tok[i, self.on[iid], 1] = 0.0
            else:
                tok[i] = torch.randn(self.grid**2, e, generator=gen)
        return {"tokens": tok, "pooled": tok.mean(1), "valid": torch.ones(len(image_ids), dtype=torch.bool)}

    def text_targets(self, texts, tokens=True):
        e = 8
        pooled = torch.zeros(len(texts), e)
        pooled[:, 0] = 1.0
        return {
            "tokens": [torch.ones(5, e) for _ in texts],
            "pooled": pooled,
            "lengths": torch.full((len(texts),), 5, dtype=torch.long),
        }


def _world():
    rng = np.random.default_rng(0)
    insts = []
    for k in range(12):
        x, y = (int(v) for v in rng.integers(14, 50, 2))
        # Large enough to cover at least the ρ_v · 16 = 4 cells clip_td selects.
        objs = [_obj("circle", "red", x, y, r=13.0), _obj("square", "blue", 64 - x, 64 - y)]
        insts.append(_inst(str(k), "what color is the circle?", objs))
    return insts


def test_selection_on_named_objects_beats_random_when_the_teacher_points_there():
    insts = _world()
    cfg = method_config("clip_td", DistillParams())
    good = selection_quality(_AlignedCache(insts), insts, 4, cfg, ["red", "blue"], 4)
    assert good["n"] == 12
    assert good["selected_share"] == pytest.approx(1.0)
    assert good["random_share"] < 0.75
    assert good["ci95"][0] > 0 and good["p"] < 0.05
    # A teacher whose tokens carry no information about the text does no better than chance on average.
    blind = selection_quality(_AlignedCache(insts, aligned=False), insts, 4, cfg, ["red", "blue"], 4)
    assert blind["selected_share"] < good["selected_share"]
    # Instances whose text names nothing in the scene are left out rather than scored as misses.
    none = [_inst("z", "how many objects are there?", insts[0].meta["scene"]["objects"])]
    assert selection_quality(_AlignedCache(insts), none, 4, cfg, ["red"], 4)["n"] == 0


class _PositionalCache(_AlignedCache):
    """A teacher that points at the same central cells of every image, whatever the instance (as a random-init
    teacher's position-dependent tokens do)."""

    CENTRE = torch.tensor([5, 6, 9, 10])

    def image_targets(self, image_ids, relevance=None):
        tok = torch.zeros(len(image_ids), self.grid**2, 8)
        tok[:, :, 1] = 1.0
        tok[:, self.CENTRE, 0], tok[:, self.CENTRE, 1] = 1.0, 0.0
        return {"tokens": tok, "pooled": tok.mean(1), "valid": torch.ones(len(image_ids), dtype=torch.bool)}


def test_a_selection_that_ignores_the_instance_is_told_apart_from_one_that_follows_it():
    insts = _world()
    cfg = method_config("clip_td", DistillParams())
    # Following each instance's named object beats the teacher's own most frequent cells.
    good = selection_quality(_AlignedCache(insts), insts, 4, cfg, ["red", "blue"], 4)
    assert good["fixed_share"] < good["selected_share"]
    assert good["vs_fixed"]["ci95"][0] > 0
    assert good["fixed_share"] <= good["prior_share"] <= 1.0
    # Pointing at the centre, where these objects tend to be, beats random but is exactly its own fixed mask.
    central = selection_quality(_PositionalCache(insts), insts, 4, cfg, ["red", "blue"], 4)
    assert central["ci95"][0] > 0
    assert central["fixed_share"] == pytest.approx(central["selected_share"])
    assert central["vs_fixed"]["delta_mean"] == 0.0 and central["vs_fixed"]["p"] == 1.0
    assert central["selected_share"] <= central["prior_share"]


class _TextCache:
    """A teacher that tells the circle's cells (direction 0) and the square's (direction 2) from the background
    (direction 1) and embeds a text along the shape it names: only the text says which object to select."""

    grid = 4

    def __init__(self, instances):
        self.cells = {}
        for inst in instances:
            objs = inst.meta["scene"]["objects"]
            self.cells[inst.image_id] = {
                o["shape"]: torch.from_numpy(cell_mask([object_box(o, SIZE)], self.grid)) for o in objs
            }

    def image_targets(self, image_ids, relevance=None):
        tok = torch.zeros(len(image_ids), self.grid**2, 8)
        tok[:, :, 1] = 1.0
        for i, iid in enumerate(image_ids):
            for shape, axis in (("circle", 0), ("square", 2)):
                on = self.cells[iid][shape]
                tok[i, on, axis], tok[i, on, 1] = 1.0, 0.0
        return {"tokens": tok, "pooled": tok.mean(1), "valid": torch.ones(len(image_ids), dtype=torch.bool)}

    def text_targets(self, texts, tokens=True):
        pooled = torch.zeros(len(texts), 8)
        for i, t in enumerate(texts):
            pooled[i, 0 if "circle" in t else 2] = 1.0
        return {
            "tokens": [p.expand(5, 8).clone() for p in pooled],
            "pooled": pooled,
            "lengths": torch.full((len(texts),), 5, dtype=torch.long),
        }


def test_a_selection_that_follows_the_text_beats_the_same_image_ranked_against_another_text():
    insts = _world()
    for k, inst in enumerate(insts):  # every other question names the square
        if k % 2:
            inst.question = "what color is the square?"
    cfg = method_config("clip_td", DistillParams())
    targeted = selection_quality(_TextCache(insts), insts, 4, cfg, ["red", "blue"], 4)
    assert targeted["other_text_share"] < targeted["selected_share"]
    assert targeted["vs_other_text"]["ci95"][0] > 0
    # A teacher that finds objects from the image alone selects the same cells whatever the text says.
    salient = selection_quality(_AlignedCache(insts), insts, 4, cfg, ["red", "blue"], 4)
    assert salient["vs_other_text"]["delta_mean"] == 0.0
