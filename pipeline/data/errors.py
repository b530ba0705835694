"""Bad-input handling shared by every converter: fail naming the place, or skip and count under a policy."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

OnError = Literal["fail", "skip"]


class DataError(ValueError):
    """Bad input. ``file`` and ``where`` (a line number or key) say exactly what to look at."""

    def __init__(self, file: str | Path, where: str, reason: str):
        self.file, self.where, self.reason = str(file), where, reason
        super().__init__(f"{file}: {where}: {reason}")

    def __reduce__(self) -> tuple:  # picklable across dask worker processes despite the 3-argument __init__
        return (type(self), (self.file, self.where, self.reason))


@dataclass
class SkipReport:
    """Every item skipped under ``--on-error skip``: nothing is dropped without a line here."""

    policy: OnError = "fail"
    skipped: list[dict] = field(default_factory=list)

    def handle(self, err: DataError) -> None:
        """Raise under the fail policy; record under the skip policy."""
        if self.policy == "fail":
            raise err
        self.skipped.append({"file": err.file, "where": err.where, "reason": err.reason})

    @property
    def count(self) -> int:
        return len(self.skipped)

    def write(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps({"policy": self.policy, "count": self.count, "skipped": self.skipped}, indent=1)
        )
