"""The FiLM default's step made faster, in the same math and in bfloat16: how far toward the 2× target it gets.

The step target (docs/benchmarks.md): a student step at the default size at least 2× faster than the
original one (``bench_step``'s "old" arm: the ViLT student with the dense 49,408-row token table), with
the same losses up to float error. The default student has been the FiLM student since, whose step is
about as dear as the old one (``bench_step``: old ÷ default 0.95–0.97). This benchmark measures what the
same FiLM step costs when only the way it is computed changes, or its precision:

* ``default``      params.yaml's student as the trainer runs it (NCHW tensors, eager);
* ``cl``           the same weights in channels_last memory order (oneDNN's convolutions skip the layout
                   reorders they do for NCHW);
* ``cl_compiled``  ``train.compile: true``: channels_last, and ``FilmStudent.image_trunk`` (stem + FiLM blocks,
                   every shape fixed by the batch size) handed to ``torch.compile`` while it trains (inductor:
                   fused elementwise kernels around oneDNN's convolutions);
* ``bf16``         ``train.precision: bf16`` as the trainer runs it: the forward under bfloat16 autocast,
                   channels_last (float32 weights, optimizer and losses). Not the same math: its losses differ
                   from default's by bfloat16's rounding, held to ``BF16_RTOL`` instead of ``LOSS_RTOL``;
* ``bf16_compiled`` ``train.precision: bf16`` with ``train.compile: true``;
* ``old``          the original step (``bench_step``'s legacy ViLT), for the ratio the target names.

All are driven by ``Trainer.train_step`` on the same pre-collected batches and teacher targets, rotated step
by step so that load on the machine hits every arm alike; each variant's ratio to ``old`` and to ``default``
is taken step by step and the median reported (quartiles beside). Before timing, a few steps of each variant
on the same batches give its losses, compared with ``default``'s (the max relative difference: float error,
not a different model; for the bf16 arms, bfloat16's 8-bit mantissa). A torch profile of each FiLM arm's steps gives the convolutions' share (forward and
backward): what the step would still cost if everything around them were free. A last table times the text
block's attention alone (forward + backward) in torch's kernels at the student's text lengths: float32, bfloat16
(what autocast picked before ``student.model.attention``) and ``attention`` on bfloat16 inputs; another the FiLM
maps' GELU, torch's on NCHW and channels_last maps against ``student.model.gelu`` on channels_last ones.

Compilation needs a C++ compiler; where it fails, the arm is reported as unavailable with torch's error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks.bench_step import METHODS, WARMUP, make_trainers
from benchmarks.common import Result, Scratch, log, median, parser, quartiles
from benchmarks.world import build

DEFAULT_TASKS = ("vqa", "snli_ve")
VARIANTS = ("cl", "cl_compiled", "bf16", "bf16_compiled")
EQUAL_STEPS = 5
LOSS_RTOL = 1e-4  # as bench_step: float32 through a few AdamW steps
# bfloat16 keeps 8 significant bits (relative rounding up to 2^-9 ≈ 2e-3 per value); a loss averages many
# such values, so its own error is well below that.
BF16_RTOL = 2e-3
CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")
COMPILE_WARMUP = 2  # extra untimed steps for the compiled arm (the first call compiles)


# Each arm but ``cl`` is a setting of the trainer, so the benchmark times what a user's run does.
SETTINGS = {
    "cl": (),
    "cl_compiled": ("train.compile=true",),
    "bf16": ("train.precision=bf16",),
    "bf16_compiled": ("train.precision=bf16", "train.compile=true"),
}


def tolerance(variant: str) -> float:
    return BF16_RTOL if variant.startswith("bf16") else LOSS_RTOL


def trainers_for(world, task: str, work: Path) -> dict:
    """Per method: old, default and each variant, all from the same seed (so each FiLM arm starts from the
    same weights)."""
    out = make_trainers(world, task, work, arms=("old", "default"))
    for variant in VARIANTS:
        more = make_trainers(world, task, work / variant, arms=("default",), default_sets=SETTINGS[variant])
        for method in METHODS:
            tr = more[f"default-{method}"]
            # Module.to swaps each parameter's data, so the optimizer's references stay valid.
            if variant == "cl":
                tr.student.to(memory_format=torch.channels_last)
            out[f"{variant}-{method}"] = tr
    return out


def step(tr, batch, target) -> dict:
    logs = tr.train_step(batch, None, target if tr.needs_teacher else None)
    tr.step += 1
    return logs


def conv_share(tr, batches, targets) -> dict:
    """Self CPU time of the convolution ops (forward + backward) over the whole step's, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b, t in zip(batches, targets, strict=True):
            step(tr, b, t)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS)
    return {
        "steps": len(batches),
        "conv_share": round(conv / total, 4),
        "step_ms": round(total / 1e3 / len(batches), 2),
    }


def measure(world, task: str, steps: int, work: Path) -> dict:
    trainers = trainers_for(world, task, work)
    stream = trainers["default-baseline"].batches()
    n = WARMUP + COMPILE_WARMUP + steps
    batches = [next(stream) for _ in range(max(n, EQUAL_STEPS))]
    targets = [trainers["default-clip_td"].targets(b, None) for b in batches]
    out: dict = {"task": task, "batch_size": len(batches[0].instances), "unavailable": {}}

    # Equality first, on fresh trainers: the losses of each variant's first steps against default's.
    eq = trainers_for(world, task, work / "equal")
    out["max_rel_loss_diff"] = {}
    for method in METHODS:
        ref = [
            step(eq[f"default-{method}"], b, t)["loss"]
            for b, t in zip(batches[:EQUAL_STEPS], targets, strict=False)
        ]
        for variant in VARIANTS:
            try:
                got = [
                    step(eq[f"{variant}-{method}"], b, t)["loss"]
                    for b, t in zip(batches[:EQUAL_STEPS], targets, strict=False)
                ]
            except Exception as e:  # noqa: BLE001 - a compiler missing here is a result, reported by name
                out["unavailable"][variant] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                continue
            rel = max(abs(a - g) / max(abs(a), 1e-12) for a, g in zip(ref, got, strict=True))
            out["max_rel_loss_diff"][f"{variant}-{method}"] = rel
    del eq

    arms = [a for a in trainers if a.split("-")[0] not in out["unavailable"]]
    wall: dict[str, list[float]] = {a: [] for a in arms}
    for i in range(n):
        for tag in arms[i % len(arms) :] + arms[: i % len(arms)]:
            t = time.perf_counter()
            step(trainers[tag], batches[i], targets[i])
            if i >= WARMUP + COMPILE_WARMUP:
                wall[tag].append(time.perf_counter() - t)
    out["step_seconds_median"] = {a: round(median(v), 5) for a, v in wall.items()}
    for method in METHODS:
        for variant in ("default", *VARIANTS):
            tag = f"{variant}-{method}"
            if tag not in wall:
                continue
            vs_old = [o / v for o, v in zip(wall[f"old-{method}"], wall[tag], strict=True)]
            vs_default = [d / v for d, v in zip(wall[f"default-{method}"], wall[tag], strict=True)]
            q = quartiles(vs_old)
            out[tag] = {
                "old_over": round(q[1], 4),
                "old_over_quartiles": [round(q[0], 4), round(q[2], 4)],
                "default_over": round(median(vs_default), 4),
            }
            log(
                f"{task} {tag}: {median(wall[tag]) * 1e3:.1f} ms, old÷this {q[1]:.2f} "
                f"(quartiles {q[0]:.2f}-{q[2]:.2f}), default÷this {median(vs_default):.2f}"
            )
    prof_n = min(10, len(batches))
    out["profile"] = {
        tag: conv_share(trainers[tag], batches[:prof_n], targets[:prof_n])
        for tag in arms
        if not tag.startswith("old-")
    }
    return out


def rotated_medians(calls: dict, reps: int) -> dict[str, float]:
    """Median ms of each zero-argument call, the calls rotated rep by rep after ``WARMUP`` untimed reps, so
    that load on the machine hits every call alike."""
    wall: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(WARMUP + reps):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = time.perf_counter()
            calls[name]()
            if i >= WARMUP:
                wall[name].append(time.perf_counter() - t)
    return {name: round(median(w) * 1e3, 3) for name, w in wall.items()}


def attention_kernels(batch: int, heads: int, width: int, lengths=(8, 16, 32), reps: int = 40) -> dict:
    """Median ms of one attention forward + backward per (text length, kernel); the last quarter of each row's
    keys masked as padding, as a batch's shorter texts are."""
    import math

    import torch.nn.functional as F

    from student.model import attention

    def torch_sdpa(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    kernels = {
        "float32": (torch.float32, torch_sdpa),
        "bf16 (torch)": (torch.bfloat16, torch_sdpa),
        "bf16 (student.model.attention)": (torch.bfloat16, attention),
    }
    out: dict = {}
    for n in lengths:
        calls = {}
        for name, (dtype, fn) in kernels.items():
            q, k, v = (
                torch.randn(batch, heads, n, width // heads, dtype=dtype, requires_grad=True)
                for _ in range(3)
            )
            bias = torch.zeros(batch, 1, 1, n, dtype=dtype)
            bias[..., n - max(1, n // 4) :] = -math.inf
            calls[name] = lambda fn=fn, args=(q, k, v, bias): fn(*args).float().sum().backward()
        out[str(n)] = rotated_medians(calls, reps)
    return out


def gelu_kernels(batch: int, maps: dict[str, tuple[int, int]], reps: int = 40) -> dict:
    """Median ms of one GELU forward + backward per (FiLM map, dtype, call): torch's F.gelu on the NCHW map
    and on the channels_last one (the layout of the bf16 arms), and ``student.model.gelu`` on the
    channels_last one. ``maps``: name -> (channels, side)."""
    import torch.nn.functional as F

    from student.model import gelu

    out: dict = {}
    for name, (c, side) in maps.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, c, side, side).to(dtype)
            up = torch.randn(batch, c, side, side).to(dtype)
            cl = torch.channels_last
            inputs = {
                "F.gelu (NCHW)": (F.gelu, x, up),
                "F.gelu (channels_last)": (
                    F.gelu,
                    x.contiguous(memory_format=cl),
                    up.contiguous(memory_format=cl),
                ),
                "student.model.gelu (channels_last)": (
                    gelu,
                    x.contiguous(memory_format=cl),
                    up.contiguous(memory_format=cl),
                ),
            }
            calls = {}
            for call, (fn, a, g) in inputs.items():
                a = a.clone(memory_format=torch.preserve_format).requires_grad_()
                calls[call] = lambda fn=fn, a=a, g=g: fn(a).backward(g)
            out[f"{name} {str(dtype).removeprefix('torch.')}"] = rotated_medians(calls, reps)
    return out


def kernel_table(rows: dict[str, dict[str, float]], title: str, first: str) -> list[str]:
    """Markdown lines of one kernel table: a row per measured shape, a column per call."""
    names = list(next(iter(rows.values())))
    return [
        title,
        "",
        f"| {first} | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        *(f"| {n} | " + " | ".join(f"{row[k]:.2f}" for k in names) + " |" for n, row in rows.items()),
    ]


def summary_markdown(payload: dict) -> str:
    m, machine = payload["measurements"], payload["machine"]
    lines = [
        "# The FiLM default's step: same math in other layouts, and bfloat16 (bench_step_layout)",
        "",
        f"{machine['time']}, {machine['cpu_model']} ({machine['nproc']} cores, torch {machine['torch']}), 1 torch "
        f"thread; {payload['settings']['steps']} timed steps per arm, rotated step by step. old = the original "
        "step (ViLT, dense token table); ratios > 1 mean the arm is faster than old (or default).",
        "",
        "| task | method | arm | ms (median) | old ÷ arm (median) | quartiles | default ÷ arm | max rel. loss diff vs default |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in payload["settings"]["tasks"]:
        t = m[task]
        for method in METHODS:
            for variant in ("default", *VARIANTS):
                tag = f"{variant}-{method}"
                if tag not in t:
                    lines.append(
                        f"| {task} | {method} | {variant} | unavailable: {t['unavailable'].get(variant, '?')} | | | | |"
                    )
                    continue
                r = t[tag]
                diff = t["max_rel_loss_diff"].get(tag)
                lines.append(
                    f"| {task} | {method} | {variant} | {t['step_seconds_median'][tag] * 1e3:.1f} | {r['old_over']:.2f} "
                    f"| {r['old_over_quartiles'][0]:.2f} - {r['old_over_quartiles'][1]:.2f} | {r['default_over']:.2f} "
                    f"| {'-' if diff is None else f'{diff:.1e}'} |"
                )
    lines += [
        "",
        "Convolutions' share of each FiLM arm's CPU time (forward + backward, torch profiler over its own "
        "steps; the profiler adds to every op, so these milliseconds are above the timed ones):",
        "",
    ]
    for task in payload["settings"]["tasks"]:
        for tag, p in m[task]["profile"].items():
            lines.append(
                f"- {task} {tag}: {p['conv_share']:.0%} of {p['step_ms']:.1f} ms, i.e. "
                f"{p['conv_share'] * p['step_ms']:.1f} ms of convolutions ({p['steps']} steps)"
            )
    tables = (
        ("attention_ms", "The text block's attention", "attention", "text length"),
        ("gelu_ms", "The FiLM student's GELU", "gelu", "map, dtype"),
    )
    for key, what, setting, first in tables:
        if m.get(key):
            lines += [
                "",
                *kernel_table(
                    m[key],
                    f"{what} alone, forward + backward, median ms ({payload['settings'][setting]}):",
                    first,
                ),
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, overrides=True)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated: vqa, snli_ve, vcr")
    p.add_argument("--steps", type=int, default=60, help="timed steps per arm")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as a student stage runs in make repro (one core each, two side by side)
    steps = max(5, args.steps // 4) if args.quick else args.steps
    tasks = args.tasks.split(",")
    res = Result("step-layout")
    with Scratch(args.work) as work:
        world = build(work, args.quick, overrides=tuple(args.set))
        params = world.params()
        res.settings = {
            "overrides": args.set,
            "tasks": tasks,
            "steps": steps,
            "warmup": WARMUP + COMPILE_WARMUP,
            "equal_steps": EQUAL_STEPS,
            "student_arch": params.student.arch,
            "student_width": params.student.width,
            "torch_threads": torch.get_num_threads(),
            "quick": args.quick,
        }
        shape = {
            "batch": params.train.batch_size,
            "heads": params.student.heads,
            "width": params.student.width,
        }
        res.settings["attention"] = ", ".join(f"{k} {v}" for k, v in shape.items())
        res.measurements["attention_ms"] = attention_kernels(**shape)
        # The FiLM maps a GELU reads: the stem's first (half width, half side) and the blocks' (width, quarter side).
        width, side = params.student.width, params.student.image_size
        maps = {
            f"stem {max(8, width // 2)}x{side // 2}x{side // 2}": (max(8, width // 2), side // 2),
            f"block {width}x{side // 4}x{side // 4}": (width, side // 4),
        }
        res.settings["gelu"] = f"batch {params.train.batch_size}, maps channels x height x width"
        res.measurements["gelu_ms"] = gelu_kernels(params.train.batch_size, maps)
        for task in tasks:
            m = measure(world, task, steps, work / task)
            res.measurements[task] = m
            for method in METHODS:
                for variant in VARIANTS:
                    tag = f"{variant}-{method}"
                    if tag in m["max_rel_loss_diff"]:
                        res.target(
                            f"{task} {tag}: max relative loss difference to default over {EQUAL_STEPS} steps",
                            m["max_rel_loss_diff"][tag],
                            "<=",
                            tolerance(variant),
                        )
                for label, group in (
                    ("same-math (float32)", ("cl", "cl_compiled")),
                    ("bfloat16", ("bf16", "bf16_compiled")),
                ):
                    best = max(
                        (m[f"{v}-{method}"]["old_over"] for v in group if f"{v}-{method}" in m), default=0.0
                    )
                    res.target(
                        f"{task} {method}: old step / the fastest {label} FiLM step",
                        best,
                        ">=",
                        2.0,
                        f"median of {steps} rotations; default alone {m[f'default-{method}']['old_over']}",
                    )
    path = res.write(args.out)
    path.with_suffix(".md").write_text(summary_markdown(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
