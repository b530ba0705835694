"""The evidence study: its grid, where each cell's run lives, and the study report.

The study is a second DVC pipeline (study/dvc.yaml) over the same stages as the quick default: every
(task, condition, method, seed, init, teacher) cell is its own stage, so an interrupted study resumes at the
first cell not yet finished. study/params.yaml holds the grid; DVC's ``matrix`` is a full product, so each
part of the grid that is not one (pooled_fd only on some conditions, ablations on low-shot, a scratch init
for some methods, weaker teachers for clip_td) is a group of its own, and ``cells`` expands the groups the
same way the matrices do.

A cell's run directory is ``RUNS/<init>-<teacher>/<task>-<condition>-<method>-s<seed>``: ``teacher`` is
``full`` (the main pipeline's teacher and cache) or ``step<N>`` (the teacher after N of its pretraining steps,
with its own cache). Everything the report says is computed from those directories' eval.json files, the
teachers' zero-shot files and the selection diagnostic; every verdict on the study's targets is computed
here, never typed.

This package exports the grid only (``grid``): it is what a cell runs, and a cell's DVC deps are its import
closure, so the report side (``aggregate``, ``targets``, ``report``) is imported from its own module and can
change without rerunning a single cell.
"""

from .grid import (
    BASELINE,
    ENTRY_KEYS,
    FULL_TEACHER,
    INITS,
    Cell,
    DoseGroup,
    Group,
    StudyError,
    StudyParams,
    cells,
    load_study,
    override_args,
    teacher_name,
    teachers,
)

__all__ = [
    "BASELINE", "ENTRY_KEYS", "FULL_TEACHER", "INITS", "Cell", "DoseGroup", "Group", "StudyError", "StudyParams",
    "cells", "load_study", "override_args", "teacher_name", "teachers",
]  # fmt: skip
