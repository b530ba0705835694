"""The teacher of each worker process, loaded once and reused by every unit the process runs."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..identity import weights_sha256  # noqa: F401 - re-exported


@dataclass(frozen=True)
class TeacherSpec:
    model: str
    pretrained: str = ""
    precision: str = "auto"
    device: str = "auto"  # "auto": CUDA when available, else CPU

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"


_TEACHERS: dict[TeacherSpec, Any] = {}
# Units on threads of one process (the sync scheduler) ask for the teacher at once: a random init seeds the
# global RNG and draws the weights, which two loads side by side would interleave.
_LOAD = threading.Lock()


def get_teacher(spec: TeacherSpec, threads: int = 0) -> Any:
    """The teacher for a spec, loaded once per process (every unit a worker runs reuses it)."""
    from ..teacher import create_teacher

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with _LOAD:
        t = _TEACHERS.get(spec)
        if t is None:
            if not spec.pretrained:
                # Random init must give the same weights in every worker process as in the coordinator.
                torch.manual_seed(0)
            t = _TEACHERS[spec] = create_teacher(
                spec.model, spec.pretrained, spec.resolved_device(), spec.precision
            )
    return t
