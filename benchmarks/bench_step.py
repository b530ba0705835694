"""Student step, the original against the compact one: ``old step / new step`` at the default size.

"old" is the student as it was before the compact vocabulary, frozen below (``LegacyStudent``): a dense
49,408-row token table, every one of the 32 text slots in the sequence, torch's per-element Bernoulli
dropout, an NCHW stem run once per (image, text) pair. "new" is ``student.model.ViltStudent`` as the
trainer builds it: the compact vocabulary of the task's texts, the sequence cut at the batch's longest
text, the cheaper dropout mask, a channels_last stem run once per image (VCR reads each with 8 texts).
"default" is the student params.yaml builds today (``student.arch: film`` since the ViLT student could
not learn the world from labels, docs/training.md): a different model, so only its time is compared.
All are driven by ``Trainer.train_step`` (same optimizer, clipping, losses) on the same pre-collected
batches, round-robin step by step so that load on the machine hits every arm alike; after a few warm-up
steps each step's old/new and old/default ratios are taken back to back, and the median (with quartiles,
min and max) is reported, with CPU seconds beside wall seconds.

Equality. The two arms start from the same weights (one seed; the new table's rows are the old table's
rows of its ids, checked). With dropout off (``student.dropout=0``; with dropout on the two draw
different masks of the same rate), a few steps of each method on the same batches give the same losses
and parameters up to float error: the max relative loss difference is a target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import Result, Scratch, log, median, parser, quartiles
from benchmarks.world import build
from pipeline.config import StudentParams
from student.model import CLIP_VOCAB_SIZE, StudentOutput, _init_weights, fit_text, make_stem

TASKS = ("vqa", "snli_ve", "vcr")
DEFAULT_TASKS = ("vqa", "snli_ve")
METHODS = ("baseline", "clip_td")
WARMUP = 3
EQUAL_STEPS = 5  # dropout-free steps per method compared for equal losses
LOSS_RTOL = 1e-4  # float32 through a few AdamW steps; a wrong row or a leaked pad slot is far above it


# ------------------------------------------------------------- the student before the compact vocabulary


class LegacyBlock(nn.Module):
    """student.model.Block as of commit a029978 (torch dropout inside SDPA and after the residual branches)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout)
        )
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))
        return x + self.mlp(self.ln2(x))


class LegacyStudent(nn.Module):
    """student.model.ViltStudent as of commit a029978: the full token table and all max_text_len slots."""

    def __init__(self, params: StudentParams, vocab_size: int = CLIP_VOCAB_SIZE):
        super().__init__()
        d = params.width
        self.width = d
        self.grid = params.image_size // params.patch_size
        self.image_size = params.image_size
        self.max_text_len = params.max_text_len
        self.vocab_size = vocab_size
        self.eot_id = vocab_size - 1
        self.patch_embed = make_stem(params.stem, d, params.patch_size)
        self.tok_embed = nn.Embedding(vocab_size, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.img_pos = nn.Parameter(torch.zeros(1, self.grid**2, d))
        self.txt_pos = nn.Parameter(torch.zeros(1, self.max_text_len, d))
        self.type_embed = nn.Embedding(2, d)
        self.drop = nn.Dropout(params.dropout)
        self.blocks = nn.ModuleList(
            LegacyBlock(d, params.heads, params.mlp_ratio, params.dropout) for _ in range(params.layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.apply(_init_weights)
        if params.stem == "conv":
            for m in self.patch_embed.modules():
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()
        for p in (self.cls, self.img_pos, self.txt_pos):
            nn.init.normal_(p, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * params.layers))

    def forward(self, pixels: Tensor, text_ids: Tensor) -> StudentOutput:
        # Today's VCR path: forward_task repeated each image for its 8 texts before the stem.
        pixels = pixels.repeat_interleave(text_ids.shape[0] // pixels.shape[0], 0)
        b = pixels.shape[0]
        ids, text_mask = fit_text(text_ids, self.max_text_len, self.eot_id)
        img = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.img_pos + self.type_embed.weight[1]
        txt = self.tok_embed(ids) + self.txt_pos + self.type_embed.weight[0]
        x = self.drop(torch.cat([self.cls.expand(b, -1, -1), img, txt], dim=1))
        always = torch.ones(b, 1 + img.shape[1], dtype=torch.bool, device=x.device)
        key_mask = torch.cat([always, text_mask], dim=1)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.ln_f(x)
        g2 = img.shape[1]
        return StudentOutput(x[:, 0], x[:, 1 : 1 + g2], x[:, 1 + g2 :], text_mask)


@contextlib.contextmanager
def legacy_students():
    """Trainers built inside get the legacy student (same seed, so the same initial weights)."""
    import student.train as T

    original = T.create_student
    T.create_student = lambda name, params, vocab_size=CLIP_VOCAB_SIZE, vocabulary=None: LegacyStudent(params)
    try:
        yield
    finally:
        T.create_student = original


# ---------------------------------------------------------------------------------------------- measuring


ARMS = ("old", "new", "default")


def make_trainers(
    world,
    task: str,
    work: Path,
    overrides: tuple[str, ...] = (),
    arms=ARMS,
    default_sets: tuple[str, ...] = (),
) -> dict:
    """Per method: "old" (the legacy ViLT student), "new" (today's ViLT student: the same model with the
    compact vocabulary, so its losses must equal old's) and "default" (params.yaml's student, the FiLM
    student, chosen when the ViLT one could not learn the world, with ``default_sets`` over it: a different
    model, timed only)."""
    from student.train import RunSpec, Trainer

    trainers = {}
    for method in METHODS:
        for arm in arms:
            params = world.params(*overrides, *(("student.arch=vilt",) if arm != "default" else default_sets))
            tag = f"{arm}-{method}"
            run = RunSpec(
                task, "full", method, 0, str(world.root), world.store(), str(work / f"step-{task}-{tag}")
            )
            with legacy_students() if arm == "old" else contextlib.nullcontext():
                trainers[tag] = Trainer(params, run, progress=False)
    return trainers


def same_initial_weights(old: nn.Module, new: nn.Module) -> bool:
    """Every parameter equal; the new token table equal to the old one's rows of its vocabulary (+ a zero
    unknown row)."""
    o, n = old.state_dict(), new.state_dict()
    ids = n["token_ids"]
    table_ok = (
        torch.equal(n["tok_embed.weight"][:-1], o["tok_embed.weight"][ids])
        and not n["tok_embed.weight"][-1].any()
    )
    rest = [k for k in o if k != "tok_embed.weight"]
    return table_ok and all(torch.equal(o[k], n[k]) for k in rest)


def check_equal(world, task: str, work: Path) -> dict:
    """Dropout-free steps of each method, old and new on the same batches: per-step losses and the weights
    after the last step."""
    trainers = make_trainers(world, task, work / "equal", ("student.dropout=0.0",), arms=("old", "new"))
    stream = trainers["new-baseline"].batches()
    batches = [next(stream) for _ in range(EQUAL_STEPS)]
    out: dict = {"steps": EQUAL_STEPS, "same_initial_weights": {}, "losses": {}, "max_rel_loss_diff": {}}
    for method in METHODS:
        old, new = trainers[f"old-{method}"], trainers[f"new-{method}"]
        out["same_initial_weights"][method] = same_initial_weights(old.student, new.student)
        losses = {"old": [], "new": []}
        for batch in batches:
            for arm, tr in (("old", old), ("new", new)):
                logs = tr.train_step(batch, None)
                tr.step += 1
                losses[arm].append(logs["loss"])
        rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses["old"], losses["new"], strict=True)]
        out["losses"][method] = {a: [round(x, 7) for x in v] for a, v in losses.items()}
        out["max_rel_loss_diff"][method] = max(rel)
        o, n = old.student.state_dict(), new.student.state_dict()
        ids = n["token_ids"]
        diffs = [(o["tok_embed.weight"][ids] - n["tok_embed.weight"][:-1]).abs().max()]
        diffs += [(o[k] - n[k]).abs().max() for k in o if k != "tok_embed.weight"]
        out.setdefault("max_abs_weight_diff_after", {})[method] = float(max(diffs))
    return out


def measure(world, task: str, steps: int, work: Path, default_sets: tuple[str, ...] = ()) -> dict:
    trainers = make_trainers(world, task, work / "time", default_sets=default_sets)
    stream = trainers["new-baseline"].batches()
    batches = [next(stream) for _ in range(WARMUP + steps)]
    # The teacher targets as the training loop's prefetch thread makes them, outside the timed step (the
    # same for both arms: they depend on the batch and the student's grid only).
    targets = [trainers["new-clip_td"].targets(b, None) for b in batches]
    wall = {t: [] for t in trainers}
    cpu = {t: [] for t in trainers}
    order = list(trainers)
    for i, batch in enumerate(batches):
        # Rotate who goes first, so no arm always runs right after the same other one.
        for tag in order[i % len(order) :] + order[: i % len(order)]:
            tr = trainers[tag]
            t, c = time.perf_counter(), time.process_time()
            tr.train_step(batch, None, targets[i] if tr.needs_teacher else None)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            tr.step += 1
            if i >= WARMUP:
                wall[tag].append(dt)
                cpu[tag].append(dc)
    new = trainers["new-baseline"]
    out = {
        "task": task,
        "torch_threads": torch.get_num_threads(),
        "batch_size": len(batches[0].instances),
        "steps_timed": steps,
        "warmup_steps": WARMUP,
        "vocabulary": int(new.student.token_ids.numel()),
        "token_table_rows": {"old": CLIP_VOCAB_SIZE, "new": int(new.student.tok_embed.weight.shape[0])},
        "longest_text_per_batch_median": median(
            [float(b.text_ids.ne(0).flatten(0, -2).sum(-1).max()) for b in batches]
        ),
        "step_seconds_median": {t: round(median(v), 5) for t, v in wall.items()},
        "cpu_seconds_median": {t: round(median(v), 5) for t, v in cpu.items()},
    }
    for method in METHODS:
        pairs = [o / n for o, n in zip(wall[f"old-{method}"], wall[f"new-{method}"], strict=True)]
        cpu_pairs = [o / n for o, n in zip(cpu[f"old-{method}"], cpu[f"new-{method}"], strict=True)]
        default = [o / n for o, n in zip(wall[f"old-{method}"], wall[f"default-{method}"], strict=True)]
        d1, d2, d3 = quartiles(default)
        q1, q2, q3 = quartiles(pairs)
        out[method] = {
            "old_over_default": round(d2, 4),
            "old_over_default_quartiles": [round(d1, 4), round(d3, 4)],
            "old_over_new": round(q2, 4),
            "old_over_new_quartiles": [round(q1, 4), round(q3, 4)],
            "old_over_new_min_max": [round(min(pairs), 4), round(max(pairs), 4)],
            "old_over_new_of_medians": round(
                median(wall[f"old-{method}"]) / median(wall[f"new-{method}"]), 4
            ),
            "cpu_old_over_new": round(median(cpu_pairs), 4),
            "pair_ratios": [round(r, 4) for r in pairs],
        }
        log(
            f"{task} {method}: step old {median(wall[f'old-{method}']) * 1e3:.1f} ms, new "
            f"{median(wall[f'new-{method}']) * 1e3:.1f} ms, default "
            f"{median(wall[f'default-{method}']) * 1e3:.1f} ms: old÷new {q2:.2f} (quartiles {q1:.2f}-{q3:.2f}), "
            f"old÷default {d2:.2f}"
        )
    return out


def measure_loop(
    world, task: str, steps: int, work: Path, block: int = 10, default_sets: tuple[str, ...] = ()
) -> dict:
    """Seconds per step as the training loop pays them (bench_train's loop arm): the batch and the targets of
    step n+1 are made on ``Trainer.fit``'s prefetch thread while step n runs, so a step made cheaper than the
    data path would show here, not in ``measure``. Old and new take turns in blocks of ``block`` steps."""
    from student.train import _Prefetch

    trainers = make_trainers(world, task, work / "loop", default_sets=default_sets)
    blocks = max(2, steps // block) + 1  # each arm's first block warms up
    out: dict = {"task": task, "block_steps": block, "blocks_timed": blocks - 1}
    for method in METHODS:
        arms = {arm: trainers[f"{arm}-{method}"] for arm in ARMS}
        stream = arms["new"].batches()
        batches = [next(stream) for _ in range(blocks * block)]
        pending = {arm: _Prefetch(tr, iter(batches), None) for arm, tr in arms.items()}
        per_step: dict[str, list[float]] = {arm: [] for arm in arms}
        try:
            for i in range(blocks):
                for arm in ARMS[i % len(ARMS) :] + ARMS[: i % len(ARMS)]:
                    t = time.perf_counter()
                    for _ in range(block):
                        arms[arm].train_step(*pending[arm].next())
                        arms[arm].step += 1
                    if i:
                        per_step[arm].append((time.perf_counter() - t) / block)
        finally:
            for p in pending.values():
                p.close()
        pairs = [o / n for o, n in zip(per_step["old"], per_step["new"], strict=True)]
        q1, q2, q3 = quartiles(pairs)
        default = [o / n for o, n in zip(per_step["old"], per_step["default"], strict=True)]
        out[method] = {
            "loop_old_over_default": round(median(default), 4),
            "loop_step_seconds_median": {a: round(median(v), 5) for a, v in per_step.items()},
            "loop_old_over_new": round(q2, 4),
            "loop_old_over_new_quartiles": [round(q1, 4), round(q3, 4)],
            "loop_pair_ratios": [round(r, 4) for r in pairs],
        }
        log(
            f"{task} {method} training loop: old÷new {q2:.2f} (quartiles {q1:.2f}-{q3:.2f}), old÷default "
            f"{median(default):.2f}"
        )
    return out


def summary_markdown(payload: dict) -> str:
    """A short table of what step.json holds: per task and method, old/new per step (median of back-to-back
    pairs, quartiles, min-max), the CPU-time ratio, the loop ratio, and the dropout-free loss check."""
    m, machine = payload["measurements"], payload["machine"]
    lines = [
        "# Student step: the original (ViLT, full 49,408-row token table, 32 text slots) vs the compact ViLT "
        "and the default student (bench_step)",
        "",
        f"{machine['time']}, {machine['cpu_model']} ({machine['nproc']} cores, torch {machine['torch']}), "
        f"1 torch thread, load average at start {machine['loadavg_at_start']}; "
        f"{payload['settings']['steps']} timed steps per arm. Ratios are old / new: > 1 means the new step is faster. "
        "new = the same ViLT with the compact vocabulary (equal losses); default = params.yaml's student "
        f"(`{payload['settings']['student']['arch']}`"
        + "".join(f", {o}" for o in payload["settings"].get("default_overrides", []))
        + "), a different model, timed only.",
        "",
        "| task | method | step old/new (median) | quartiles | min - max | CPU-time old/new | loop old/new "
        "| old / new ms (median) | max rel. loss diff (dropout off) | step old/default | loop old/default "
        "| default ms (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in payload["settings"]["tasks"].split(","):
        if task not in m:
            continue
        t, loop, eq = m[task], m.get(f"{task}@loop", {}), m[f"{task}@equal"]
        for method in METHODS:
            r, ms = t[method], t["step_seconds_median"]
            (q1, q3), (lo, hi) = r["old_over_new_quartiles"], r["old_over_new_min_max"]
            in_loop = f"{loop[method]['loop_old_over_new']:.2f}" if loop else "-"
            cells = [
                task,
                method,
                f"{r['old_over_new']:.2f}",
                f"{q1:.2f} - {q3:.2f}",
                f"{lo:.2f} - {hi:.2f}",
                f"{r['cpu_old_over_new']:.2f}",
                in_loop,
                f"{ms[f'old-{method}'] * 1e3:.1f} / {ms[f'new-{method}'] * 1e3:.1f}",
                f"{eq['max_rel_loss_diff'][method]:.1e}",
                f"{r['old_over_default']:.2f}",
                f"{loop[method]['loop_old_over_default']:.2f}" if loop else "-",
                f"{ms[f'default-{method}'] * 1e3:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, overrides=True)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, of {TASKS}")
    p.add_argument("--steps", type=int, default=60, help=f"timed steps per arm (after {WARMUP} warm-up)")
    p.add_argument(
        "--loop-steps", type=int, default=100, help="timed steps per arm of the loop (blocks of 10)"
    )
    p.add_argument(
        "--default-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for the default arm only (e.g. student.width=32: a cheaper default, timed against the "
        "original student; repeatable)",
    )
    args = p.parse_args(argv)
    default_sets = tuple(args.default_set)
    steps = max(5, args.steps // 4) if args.quick else args.steps
    loop_steps = max(20, args.loop_steps // 5) if args.quick else args.loop_steps
    res = Result("step")
    with Scratch(args.work) as work:
        world = build(work, args.quick, overrides=tuple(args.set))
        params = world.params(*default_sets)
        res.settings = {
            "overrides": args.set,
            "default_overrides": list(default_sets),
            "tasks": args.tasks,
            "steps": steps,
            "loop_steps": loop_steps,
            "warmup": WARMUP,
            "equal_steps": EQUAL_STEPS,
            "methods": list(METHODS),
            "condition": "full",
            "student": dataclasses.asdict(params.student),
            "batch_size": params.train.batch_size,
            "device": params.train.device,
            "quick": args.quick,
        }
        for task in args.tasks.split(","):
            eq = check_equal(world, task, work)
            res.measurements[f"{task}@equal"] = eq
            for method in METHODS:
                res.target(
                    f"{task} {method}: same initial weights (old table's rows of the vocabulary)",
                    float(eq["same_initial_weights"][method]),
                    ">=",
                    1.0,
                )
                res.target(
                    f"{task} {method}: max relative loss difference over {EQUAL_STEPS} dropout-free steps",
                    eq["max_rel_loss_diff"][method],
                    "<=",
                    LOSS_RTOL,
                )
            m = measure(world, task, steps, work, default_sets)
            res.measurements[task] = m
            for method in METHODS:
                r = m[method]
                res.target(
                    f"{task} {method}: old step / new step",
                    r["old_over_new"],
                    ">=",
                    2.0,
                    f"median of {steps} back-to-back pairs, quartiles {r['old_over_new_quartiles'][0]} - "
                    f"{r['old_over_new_quartiles'][1]}",
                )
                res.target(
                    f"{task} {method}: old step / default student's step",
                    r["old_over_default"],
                    ">=",
                    2.0,
                    f"median of {steps} rotations; the default student is {params.student.arch}",
                )
            if loop_steps:
                res.measurements[f"{task}@loop"] = measure_loop(
                    world, task, loop_steps, work, default_sets=default_sets
                )
    path = res.write(args.out)
    path.with_suffix(".md").write_text(summary_markdown(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
