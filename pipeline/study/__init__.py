"""The evidence study (issue 25): its grid, where each cell's run lives, and the study report.

The study is a second DVC pipeline (study/dvc.yaml) over the same stages as the quick default: every
(task, condition, method, seed, init, teacher) cell is its own stage, so an interrupted study resumes at the
first cell not yet finished. study/params.yaml holds the grid; DVC's ``matrix`` is a full product, so each
part of the grid that is not one (pooled_fd only on some conditions, ablations on low-shot, a scratch init
for some methods, weaker teachers for clip_td) is a group of its own, and ``cells`` expands the groups the
same way the matrices do.

A cell's run directory is ``RUNS/<init>-<teacher>/<task>-<condition>-<method>-s<seed>``: ``teacher`` is
``full`` (the main pipeline's teacher and cache) or ``step<N>`` (the teacher after N of its pretraining steps,
with its own cache). Everything the report says is computed from those directories' eval.json files, the
teachers' zero-shot files and the selection diagnostic; every verdict on the issue's targets is computed
here, never typed.
"""

from .aggregate import collect_study, load_zeroshot_files, summarise_study, summary_entries
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
from .report import write_study_report
from .targets import dose_table, explain, targets

__all__ = [
    "BASELINE", "ENTRY_KEYS", "FULL_TEACHER", "INITS", "Cell", "DoseGroup", "Group", "StudyError", "StudyParams",
    "cells", "collect_study", "dose_table", "explain", "load_study", "load_zeroshot_files", "override_args",
    "summarise_study", "summary_entries", "targets", "teacher_name", "teachers", "write_study_report",
]  # fmt: skip
