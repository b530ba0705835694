"""Cached views replayed in training (docs/method.md §2): with a store extracted with K views, each training
sample is shown in one view, the student's pixels are that view's crop/flip made exactly as the teacher's
were, the targets are that view's cached tokens, and cached and online targets still agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache import TeacherCache, apply_view
from pipeline.data.shards import PreparedDataset, decode_image
from pipeline.teacher import create_teacher
from student.data import CLIP_MEAN, CLIP_STD, ViewTable
from student.targets import OnlineTargets, teacher_batch
from student.train import RunSpec, Trainer
from tests.conftest import build_world, student_params

K = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("views-world"), views=K)


def _trainer(world, tmp_path, online=False, task="snli_ve", name="run") -> Trainer:
    root, _, store = world
    run = RunSpec(task, "lowshot@0.5", "clip_td", 0, str(root / "shards"), store, str(tmp_path / name))
    return Trainer(student_params(world, **{"cache.views": K}), run, online_teacher=online, progress=False)


def _teacher(tr: Trainer):
    tp = tr.params.teacher
    return create_teacher(tp.model, tp.pretrained, precision=tp.precision)


def _expected_pixels(image: bytes, box, flip: bool, size: int) -> torch.Tensor:
    """apply_view on the original image, then the student's normalisation, written out independently."""
    view = apply_view(decode_image(image), [float(c) for c in box], bool(flip), size)
    x = torch.from_numpy(np.asarray(view, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def test_views_by_rule_are_the_stored_views(world):
    # Runs without a store (online teacher, baseline) make their views with view_params_for: they must be the
    # very boxes and flips extraction stored, or online targets would be of other crops than cached ones.
    root, _, store = world
    cache = TeacherCache(store)
    ds = PreparedDataset(root / "shards" / "train")
    stored, ruled = ViewTable.from_cache(cache, ds.image_ids()), ViewTable.from_rule(ds, K)
    assert stored.k == ruled.k == K
    np.testing.assert_array_equal(stored.boxes, ruled.boxes)
    np.testing.assert_array_equal(stored.flips, ruled.flips)
    assert ruled.flips[:, 1:].any() and (ruled.boxes[:, 1:] != ruled.boxes[:, :1]).any()  # real augmentations


def test_batch_replays_the_cached_view_and_its_targets(world, tmp_path):
    tr = _trainer(world, tmp_path)
    cache: TeacherCache = tr.source.cache
    size = tr.params.student.image_size
    stream = tr.batches()
    batches = [next(stream) for _ in range(3)]
    chosen = torch.cat([b.views.index for b in batches])
    assert set(chosen.tolist()) == set(range(K))  # every view drawn, view 0 included
    # The draw is a function of (seed, position, key): a second stream (a resumed run's replay) agrees.
    again = tr.batches()
    assert all(torch.equal(next(again).views.index, b.views.index) for b in batches)
    online = OnlineTargets(_teacher(tr), [tr.train_ds])
    for batch in batches:
        ids = batch.image_ids
        vp = cache.view_params(ids)
        v = batch.views.index
        rows = np.arange(len(ids))
        box, flip = vp["boxes"][rows, v], vp["flip"][rows, v]
        torch.testing.assert_close(batch.views.boxes, box, rtol=0, atol=0)
        assert torch.equal(batch.views.flip, flip)
        for j, image_id in enumerate(ids):
            want = _expected_pixels(tr.train_ds.image_bytes(image_id), box[j], flip[j], size)
            assert torch.equal(batch.pixels[j], want)
            if v[j] > 0:  # view 0 is the teacher's eval transform, not an apply_view crop
                # Student size = teacher size here: the student's input is the teacher's own input, pixel for pixel.
                torch.testing.assert_close(batch.pixels[j], online._pixels(image_id, batch.views, j))
        tb, _ = teacher_batch(batch, tr.source, tr.cfg, tr.run.task)
        g = cache.group
        r = cache.image_rows(ids)
        want_tok = torch.from_numpy(g["views/tokens"][:][r, v.numpy()].astype(np.float32))
        want_pooled = torch.from_numpy(g["views/pooled"][:][r, v.numpy()].astype(np.float32))
        assert torch.equal(tb["img_tokens"], want_tok) and torch.equal(tb["img_pooled"], want_pooled)
        other = cache.image_targets(ids)["tokens"]  # view 0: differs wherever another view was drawn
        assert not torch.equal(tb["img_tokens"][v > 0], other[v > 0]) or not (v > 0).any()


@pytest.mark.parametrize("task", ["snli_ve", "vcr"])
def test_cached_targets_equal_online_targets_with_views(world, tmp_path, task):
    # As test_train_student's check, now with views: the online teacher recomputes each drawn view from its box
    # and flip, the cache reads it; the losses of the first steps agree (both float16-rounded).
    logs, drawn = {}, {}
    for online in (False, True):
        tr = _trainer(world, tmp_path, online=online, task=task, name=f"{task}-{online}")
        stream = tr.batches()
        batches = [next(stream) for _ in range(3)]
        drawn[online] = torch.cat([b.views.index for b in batches])
        logs[online] = [tr.train_step(b, None) for b in batches]
    assert torch.equal(drawn[False], drawn[True]) and (drawn[False] > 0).any()
    for cached, online in zip(logs[False], logs[True], strict=True):
        assert cached["loss"] == pytest.approx(online["loss"], rel=1e-4, abs=1e-5)
        assert cached["kd"] == pytest.approx(online["kd"], rel=1e-4, abs=1e-5)


def test_a_store_whose_views_differ_from_cache_views_is_refused(world, tmp_path):
    # The baseline makes its views from cache.views; replaying the store's other count would show clip_td
    # other pixels than the baseline of its seed (a warning said so, and training went on).
    from student.errors import RunSetupError

    root, _, store = world
    run = RunSpec("snli_ve", "lowshot@0.5", "clip_td", 0, str(root / "shards"), store, str(tmp_path / "r"))
    with pytest.raises(
        RunSetupError, match=rf"holds {K} view\(s\) per image but cache.views=0: set cache.views={K}"
    ):
        Trainer(student_params(world, **{"cache.views": 0}), run, progress=False)
