"""What every part of the report shares: its constants and its error."""

from __future__ import annotations

from ..conditions import Condition
from ..names import METHODS

# The protocol asks for at least 3 seeds per cell (docs/method.md §8); cells with fewer are listed in the
# report.
MIN_SEEDS = 3
# Marks appended to a cell's comparison line: only where the paired Δ's 95% interval excludes 0.
MARK_GAIN = "▲ gain"
MARK_LOSS = "▼ loss"
NOT_RUN = "·"
NOT_MEASURED = "not measured"
# The floor: the same student with the image blanked (see the module docstring).
BLIND = "blind"
# summary.json's method name for the teacher's zero-shot score (the ceiling).
ZEROSHOT = "teacher_zeroshot"
CI_LEVEL = 0.95

# Table order: the methods in the order params.yaml's distill.method lists them, unknown ones after.
METHOD_ORDER = METHODS


class ReportError(ValueError):
    """Inputs cannot be reported on; the message names the offending file or cell."""


def lowshot_fraction(condition: str) -> float | None:
    """Labeled fraction of a condition on the low-shot axis; full = 1.0; shift is not on that axis."""
    c = Condition.parse(condition)
    return c.fraction if c.kind in ("lowshot", "full") else None
