"""Where and how a run's tensors are computed: the training device, bfloat16's check, the compiled image trunk,
moving nested batches onto the device, and the collectives that keep the ranks of a torchrun job in step."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from .errors import RunError


def resolve_device(name: str) -> torch.device:
    """``train.device``: "auto" is the current CUDA device when there is one, else the CPU; a CUDA device that
    is not there fails here, naming the key, instead of at the first tensor copy."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"train.device={name}: torch sees no CUDA device here (use auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(
            f"train.device={name}: torch sees {torch.cuda.device_count()} CUDA device(s) here "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return device


def check_bf16(device: torch.device) -> None:
    """``train.precision: bf16`` on ``device``: a GPU without bfloat16 fails here, naming the key; a CPU without
    native bfloat16 (AMX or AVX512-BF16) only warns, since autocast still runs there, emulated (and maybe
    slower than float32)."""
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise RunError(
                f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 (use fp32)"
            )
        return
    # Private probes (torch.cpu), absent on some builds: without them nothing is said.
    native = [getattr(torch.cpu, f"_is_{isa}_supported", None) for isa in ("amx_tile", "avx512_bf16")]
    if all(f is not None for f in native) and not any(f() for f in native):
        warnings.warn(
            "train.precision=bf16: this CPU has neither AMX nor AVX512-BF16, so bfloat16 is emulated and the "
            "steps may be slower than with fp32",
            RuntimeWarning,
            stacklevel=2,
        )


def compile_trunk(student: torch.nn.Module, arch: str) -> None:
    """``train.compile``: the student's ``image_trunk`` through ``torch.compile`` while the student trains.
    In eval mode the eager trunk runs, so evaluation's batch sizes and the dropout switch cost no compiles;
    the parameters are the same, so checkpoints and the export do not change."""
    eager = getattr(student, "image_trunk", None)
    if not callable(eager):
        raise RunError(
            f"train.compile=true: student.arch={arch} has no image_trunk to compile (the film student has one)"
        )
    # dynamic=False: the batch size fixes every shape in the trunk (bench_step_layout measures this form).
    compiled = torch.compile(eager, dynamic=False)

    def image_trunk(*args, **kwargs):
        return (compiled if student.training else eager)(*args, **kwargs)

    student.image_trunk = image_trunk


def to_device(x, device: torch.device):
    """Tensors inside (nested) tuples, lists and dicts moved to ``device``; everything else as it is."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Every gradient averaged over the ranks with one all_reduce of a flat buffer. A parameter without a
    gradient on this rank contributes zeros plus a "had one" flag: every rank then reduces the same buffer
    (a per-parameter loop that skipped None would pair different tensors across ranks, or hang), and a
    parameter no rank touched keeps grad None, so AdamW skips it as a 1-process run would."""
    grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    had = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*grads, had])
    dist.all_reduce(flat)
    offset = 0
    for p, n_had in zip(params, flat[-len(params) :].tolist(), strict=True):
        n = p.numel()
        if n_had > 0:
            p.grad = (flat[offset : offset + n] / world_size).view_as(p)
        offset += n


def broadcast_parameters(tensors) -> None:
    """Rank 0's weights to every rank. Same-seed initialisation already agrees; this makes it a guarantee."""
    for t in tensors:
        dist.broadcast(t.data, src=0)


def mean_over_ranks(logs: dict, world_size: int) -> dict:
    """The step's logged losses averaged over the ranks: the global batch's loss, as 1 process logs it."""
    keys = sorted(k for k, v in logs.items() if isinstance(v, float))
    vals = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(vals)
    return {**logs, **dict(zip(keys, (vals / world_size).tolist(), strict=True))}
