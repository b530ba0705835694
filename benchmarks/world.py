"""The student benchmarks' world: synthetic train/val/test splits, a teacher checkpoint and its cache.

Built once under ``<work>/student-world`` and reused by bench_train, bench_read and bench_storage when they
share ``--work`` (run_all passes one). The teacher is the embedded ``clip-td-tiny`` config: the trained
checkpoint from ``make repro`` when there is one (artifacts/teacher/teacher.pt), else a random init saved as
a checkpoint, so the cache's fingerprint holds a checksum and the online teacher loads the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import TINY_TEACHER, cache_params, log, make_world, teacher_weights

SCENES = {"train": 1200, "val": 60, "test": 120}
QUICK_SCENES = {"train": 300, "val": 30, "test": 60}


@dataclass
class World:
    root: Path  # holds train/ val/ test/
    teacher_model: str
    teacher_pt: str
    trained_teacher: bool
    overrides: tuple[str, ...] = ()  # --set key=value for the student runs (params.yaml's dotted names)
    home: Path | None = None  # where the teacher's checkpoint and caches live (default: beside the shards)

    def store(self, dtype: str = "float16") -> str:
        return str((self.home or self.root.parent) / f"cache-{dtype}.zarr")

    def params(self, *overrides: str):
        """params.yaml (the student, train and distill defaults) with this world's teacher."""
        from benchmarks.common import ROOT
        from pipeline.config import load_params

        # No pretrained student in a benchmark world: the backbone's init does not change a step's cost.
        sets = [
            f"teacher.model={self.teacher_model}",
            f"teacher.pretrained={self.teacher_pt}",
            "student.init=scratch",
        ]
        sets += [*self.overrides, *overrides]
        return load_params(ROOT / "params.yaml", sets)


def build(
    work: Path,
    quick: bool = False,
    dtypes: tuple[str, ...] = ("float16",),
    overrides: tuple[str, ...] = (),
    teacher_model: str = TINY_TEACHER,
    precision: str = "auto",
) -> World:
    """The world and one extracted cache per dtype (each reused when already complete). ``teacher_model``
    other than the embedded one (an open_clip name, e.g. ViT-B-16 for the GPU check) is a random init saved as
    a checkpoint, with its own folder; ``precision`` is the extraction's (and, through ``World.params``, an
    online teacher's)."""
    from pipeline.data.shards import PreparedDataset
    from pipeline.extract import extract

    base = Path(work) / ("student-world-quick" if quick else "student-world")
    scenes = QUICK_SCENES if quick else SCENES
    root = base / "shards"
    make_world(root, scenes)
    embedded = teacher_model == TINY_TEACHER
    if not embedded:  # the same shards; the teacher, its checkpoint and its caches apart
        base = base / Path(teacher_model).stem
        base.mkdir(parents=True, exist_ok=True)
    trained = teacher_weights() if embedded else ""
    pt = base / ("teacher-trained.pt" if trained else "teacher.pt")
    if trained:  # a snapshot: make repro may rewrite or clean artifacts/ while the benchmarks run
        import shutil

        shutil.copyfile(trained, pt)
    elif not pt.exists():
        from pipeline.teacher import create_teacher

        torch.manual_seed(0)
        teacher = create_teacher(teacher_model, "")
        torch.save({"state_dict": teacher.model.state_dict()}, pt)
    sets = (*overrides, f"teacher.precision={precision}")
    world = World(root, teacher_model, str(pt), bool(trained), sets, base)
    datasets = [PreparedDataset(root / s) for s in scenes]
    for dtype in dtypes:
        url = world.store(dtype)
        # A complete store that matches (data, teacher checkpoint, layout) costs only a re-plan here; one built
        # from another teacher (make repro trained one since) is rebuilt.
        t = time.perf_counter()
        metrics = extract(
            datasets,
            url,
            (teacher_model, str(pt), precision),
            dataclasses.replace(cache_params(), store=url, dtype=dtype),
            scheduler="sync",
            progress=False,
            rebuild_stale=True,
        )
        if metrics["units_computed"]:
            log(
                f"extracted the {dtype} cache of {sum(scenes.values())} scenes in {time.perf_counter() - t:.0f} s"
            )
            (Path(url).parent / f"extract-{dtype}.json").write_text(
                json.dumps(metrics, indent=1, default=str)
            )
    return world
