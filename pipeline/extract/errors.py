"""What extraction fails with, each error naming the unit, array, image or text at fault; and the test
hook that makes a unit fail in the worst place."""

from __future__ import annotations

import os

from ..data.errors import DataError

FAIL_ENV = "CLIP_TD_EXTRACT_FAIL_UNIT"


class ImageError(DataError):
    """An image the teacher cannot read; names the dataset directory and the image id."""

    def __reduce__(self) -> tuple:  # DataError's 3-argument __init__ breaks default exception pickling (dask)
        return (type(self), (self.file, self.where, self.reason))


class TextError(DataError):
    """A teacher text with no content; names the dataset directory and the instance key."""

    def __reduce__(self) -> tuple:
        return (type(self), (self.file, self.where, self.reason))


class InjectedFailure(RuntimeError):
    """Raised by the test hook ``CLIP_TD_EXTRACT_FAIL_UNIT``."""


class UnitWriteError(RuntimeError):
    """Writing a unit's arrays failed (disk full, store went read-only, …); names the unit, the array, the rows
    and the store. The unit is not committed, so a rerun recomputes it."""

    def __init__(self, store: str, unit: str, key: str, rows: tuple[int, int], reason: str):
        self.store, self.unit, self.key, self.rows, self.reason = store, unit, key, tuple(rows), reason
        super().__init__(
            f"unit {unit}: writing {key} rows [{rows[0]}, {rows[1]}) of {store} failed: {reason}; "
            "the unit was not committed (rerun to resume)"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.store, self.unit, self.key, self.rows, self.reason))


class StoreLocationError(ValueError):
    """The store location would overlap a dataset it is extracted from; names both."""


class NonFiniteOutput(FloatingPointError):
    """The teacher returned NaN/Inf; names the unit, the arrays and the images (or texts) at fault."""

    def __init__(self, unit: str, items: list[str], arrays: list[str], kind: str = "image"):
        self.unit, self.items, self.arrays, self.kind = unit, list(items), list(arrays), kind
        shown = ", ".join(repr(i) for i in self.items[:10]) + (" …" if len(self.items) > 10 else "")
        hint = (
            "set cache.on_error=skip to store them as invalid (image/valid = 0)"
            if kind == "image"
            else "texts have no validity flag: fix the teacher precision or the text"
        )
        super().__init__(
            f"unit {unit}: teacher output is not finite (NaN/Inf in {', '.join(self.arrays)}) for "
            f"{len(self.items)} {kind}(s): {shown}; nothing of this unit was written; {hint}"
        )

    def __reduce__(self) -> tuple:
        return (type(self), (self.unit, self.items, self.arrays, self.kind))


def maybe_fail(name: str) -> None:
    """The test hook ``CLIP_TD_EXTRACT_FAIL_UNIT=<unit>`` (raise) or ``<unit>:kill`` (SIGKILL, no ``finally``
    runs): called once a unit has written its first array and before it commits."""
    want = os.environ.get(FAIL_ENV, "")
    if want == f"{name}:kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if want == name:
        raise InjectedFailure(f"injected failure in unit {name} ({FAIL_ENV})")
