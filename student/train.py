"""One student run: a task, a protocol condition, a method and a seed — readable in one sitting.

The loop streams labelled batches (and, for the unlabeled variants, image-only batches), reads teacher
targets from the cache (or computes them online), and optimises task loss + the method's KD term with AdamW,
linear warmup and cosine decay. Model selection uses the validation split only; the test split is scored
once, with the selected weights. Checkpoints hold everything needed to resume bit-for-bit: on resume the
data stream is replayed to the checkpointed step instead of being reseeded.

Safety: checkpoints and exported students hold only tensors and plain data and load with
``weights_only=True``; a checkpoint records the run's identity (task, condition, method, seed, the params
that change the numbers, data and cache fingerprints) and is resumed only by that run; ``run_student`` holds
``<out>/.lock`` so two runs never write one directory; cached targets are checked against the store's
manifest crc32 per unit on first read, and non-finite targets are named (``student.targets``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.cache import TeacherCache, reading_fingerprint
from pipeline.config import Params
from pipeline.lock import StoreLock, StoreLocked, is_leftover
from pipeline.protocol import Split, make_split
from pipeline.splits import SplitDirs, resolve_splits
from pipeline.teacher import sha256_file
from student.checkpoint import (
    identity_differences,
    is_write_leftover,
    load_state,
    params_identity,
    sha256_json,
    write_atomic,
)
from student.data import (
    Batch,
    TaskSpec,
    load_tokenizer,
    open_prepared,
    train_loader,
    unlabeled_batches,
)
from student.errors import CheckpointError, RunError, RunLocked, RunSetupError
from student.evaluation import EVAL_BATCH, BatchCache, evaluate
from student.losses import (
    DistillHeads,
    MethodSettings,
    check_finite,
    deferred_finite_checks,
    distill_loss,
    method_config,
    prepare_teacher,
)
from student.model import StudentOutput, TaskHeads, count_parameters, create_student, images_for_texts
from student.placement import (
    average_gradients,
    broadcast_parameters,
    check_bf16,
    compile_trunk,
    mean_over_ranks,
    resolve_device,
    to_device,
)
from student.pretrain import PretrainedMismatch, load_pretrained_backbone
from student.sources import chunk_groups, open_targets, run_answer_types, teacher_resize_mode, view_table
from student.targets import CachedTargets, TargetSource, teacher_batch, unlabeled_teacher_batch


@dataclass
class RunSpec:
    task: str
    condition: str
    method: str
    seed: int
    data_root: str  # directory holding the prepared splits; pipeline/splits.py says which plays which role
    cache: str  # teacher cache URL
    out: str  # run directory: checkpoint.pt, train.json, student.pt

    @property
    def name(self) -> str:
        return f"{self.task}-{self.condition}-{self.method}-s{self.seed}"


# train.on_nonfinite=skip gives up once more than this fraction of train.steps had to be skipped.
MAX_NONFINITE_FRACTION = 0.1


class _PeerNonFinite(FloatingPointError):
    """Another rank's step was not finite; this rank skips the same step (it already voted)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def forward_student(
    student, pixels: torch.Tensor, text_ids: torch.Tensor, autocast: torch.dtype | None = None
) -> StudentOutput:
    """The student's outputs; with ``autocast`` (``train.precision: bf16``) its forward runs in that dtype's
    autocast and the outputs come back as float32, so the heads, the KD terms and their weights are computed
    as under fp32."""
    if autocast is None:
        return student(pixels, text_ids)
    with torch.autocast(pixels.device.type, dtype=autocast):
        out = student(pixels, text_ids)
    return StudentOutput(out.pooled.float(), out.image_tokens.float(), out.text_tokens.float(), out.text_mask)


def forward_task(
    student, heads: TaskHeads, task: str, batch: Batch, autocast: torch.dtype | None = None
) -> tuple[torch.Tensor, StudentOutput]:
    """Task loss and the student outputs the KD term distils (for VCR: the gold question+answer pair)."""
    if task != "vcr":
        out = forward_student(student, batch.pixels, batch.text_ids, autocast)
        loss, _ = heads.loss(task, out.pooled, batch.target)
        return loss, out
    b, k2, length = batch.text_ids.shape
    out = forward_student(
        student, images_for_texts(student, batch.pixels, k2), batch.text_ids.view(b * k2, length), autocast
    )
    pooled = out.pooled.view(b, k2, -1)
    k = k2 // 2
    l_qa, _ = heads.loss("vcr", pooled[:, :k], batch.target[:, 0])
    l_qr, _ = heads.loss("vcr", pooled[:, k:], batch.target[:, 1])
    gold = torch.arange(b, device=batch.target.device) * k2 + batch.target[:, 0]
    kd_out = StudentOutput(
        out.pooled[gold], out.image_tokens[gold], out.text_tokens[gold], out.text_mask[gold]
    )
    return l_qa + l_qr, kd_out


def _cat_outputs(a: StudentOutput, b: StudentOutput) -> StudentOutput:
    return StudentOutput(
        *(
            torch.cat([x, y])
            for x, y in zip(
                (a.pooled, a.image_tokens, a.text_tokens, a.text_mask),
                (b.pooled, b.image_tokens, b.text_tokens, b.text_mask),
                strict=True,
            )
        )
    )


def _cat_teacher(a: dict, b: dict) -> dict:
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if key == "txt_tokens" and x.shape[1] != y.shape[1]:
            width = max(x.shape[1], y.shape[1])
            x = torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]))
            y = torch.nn.functional.pad(y, (0, 0, 0, width - y.shape[1]))
        out[key] = torch.cat([x, y])
    return out


class Trainer:
    def __init__(self, params: Params, run: RunSpec, *, online_teacher: bool = False, progress: bool = True):
        self.params, self.run, self.progress = params, run, progress
        self.cfg: MethodSettings = method_config(run.method, params.distill)
        tp = params.train
        if tp.threads:
            torch.set_num_threads(tp.threads)
        self.device = resolve_device(tp.device)
        self.autocast = torch.bfloat16 if tp.precision == "bf16" else None
        if self.autocast is not None:
            check_bf16(self.device)
        # Under torchrun (WORLD_SIZE > 1) every rank streams its own shards (pipeline.data.shards.node_shards)
        # with batch_size / world_size instances, so the global batch is the 1-process batch; gradients are
        # averaged over the ranks before clipping, so every rank takes the same optimizer step.
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self._owns_group = self.ddp and not dist.is_initialized()
        if self._owns_group:
            # Rank 0 validates alone while the other ranks wait in their next all_reduce: a generous timeout
            # keeps a long validation from being taken for a dead rank.
            dist.init_process_group("gloo", timeout=timedelta(hours=2))
        self.rank = dist.get_rank() if self.ddp else 0
        self.world_size = dist.get_world_size() if self.ddp else 1
        self.batch_size = tp.task_batch_size.get(run.task, tp.batch_size)
        if self.batch_size % self.world_size:
            raise RunSetupError(
                f"train batch size {self.batch_size} ({run.task}) must be divisible by the {self.world_size} ranks "
                "(each rank takes batch_size / world_size instances per step)"
            )
        root = Path(run.data_root)
        self.splits: SplitDirs = resolve_splits(root, params.protocol.splits)
        self.train_ds = open_prepared(self.splits.train)
        self.val_ds = open_prepared(self.splits.val) if self.splits.val else None
        self.test_ds = open_prepared(self.splits.test)
        pp = params.protocol
        # Parsed once: the split is drawn from them and the training batches are served from them.
        self.train_instances = [i for i in self.train_ds.iter_instances() if i.task == run.task]
        try:
            self.split: Split = make_split(
                run.task, run.condition, run.seed,
                self.train_instances, self.test_ds.iter_instances(),
                self.val_ds.iter_instances() if self.val_ds else None,
                shift_key=pp.shift_key, target=pp.shift_target_domain, val_fraction=pp.val_fraction,
            )  # fmt: skip
        except ValueError as e:  # no training instances for the task/condition, a shift without a target
            raise RunSetupError(f"{root}: {e}") from None
        if not self.split.val:
            # Every validation would score 0.0 on no instance, and "best" would freeze at the first one.
            where = self.splits.val or f"the slice of {self.splits.train}"
            shift = f" outside the shift target ({pp.shift_key} = {pp.shift_target_domain!r})"
            raise RunSetupError(
                f"{where}: no validation instance of {run.task}"
                + (shift if run.condition.startswith("shift") else "")
                + " (protocol.splits.val)"
            )
        if self.cfg.unlabeled == "target" and not run.condition.startswith("shift"):
            raise RunSetupError(
                f"{run.method} distils on the shifted target domain's images: it needs --condition shift"
            )
        self.needs_teacher = self.cfg.kd != "none"
        self.source: TargetSource | None = None
        teacher_model = params.teacher.model
        if self.needs_teacher:
            datasets = [d for d in (self.train_ds, self.val_ds, self.test_ds) if d is not None]
            self.source = open_targets(
                params, run, self.train_ds, datasets, self.device, online=online_teacher,
                relevance=self.cfg.relevance_source if self.cfg.kd == "tokens" else None,
                train_instances=self.train_instances,
            )  # fmt: skip
        vocab = self.train_ds.answer_vocab() if run.task == "vqa" else []
        self.resize_mode = teacher_resize_mode(params, run, self.source)
        self.spec = TaskSpec(run.task, load_tokenizer(teacher_model), params.student.image_size, params.student.max_text_len,
                             vocab, params.distill.vqa_candidates, blind=self.cfg.blind,
                             resize_mode=self.resize_mode,
                             answer_types=run_answer_types(run, self.source, self.train_instances))  # fmt: skip
        self._val_batches = BatchCache()  # every validation of the run reads the same instances
        self.views = view_table(params, run, self.source, self.train_ds, self.resize_mode)
        self.order_groups = chunk_groups(params, run, self.source, self.train_instances)
        vocabulary = self._student_vocabulary()
        seed_everything(run.seed)
        self.student = create_student(params.student.arch, params.student, vocabulary=vocabulary)
        if params.student.init == "pretrained":
            try:
                load_pretrained_backbone(
                    self.student, params.student.pretrained, params.student, params.teacher.model
                )
            except PretrainedMismatch as e:
                raise RunError(str(e)) from None
            # The backbone brings the pretraining corpus's vocabulary; the task's own ids are kept from it, and
            # ids it never saw start from its unknown-id row.
            self.student.set_vocabulary(vocabulary)
        self.heads = TaskHeads(self.student.width, len(vocab), tasks=(run.task,))
        self.dheads = DistillHeads(self.student.width, self.source_dim()) if self.needs_teacher else None
        modules = [self.student, self.heads] + ([self.dheads] if self.dheads is not None else [])
        for m in modules:  # initialised on the CPU first, so a seed gives the same weights on every device
            m.to(self.device)
        # bf16 or compile with channels_last: oneDNN's convolutions then skip the layout reorders around each
        # of them (benchmarks/bench_step_layout.py measures each); the float32 default stays NCHW, whose
        # results the study records (channels_last moves them in the last bits).
        if self.autocast is not None or tp.compile:
            self.student.to(memory_format=torch.channels_last)
        if tp.compile:
            compile_trunk(self.student, params.student.arch)
        self.params_list = [p for m in modules for p in m.parameters()]
        # fused: one kernel over all parameters instead of ~10 per tensor; on 2 CPU cores the per-tensor
        # update of the 49,408-row token embedding was 40% of a default step (cProfile).
        self.opt = torch.optim.AdamW(self.params_list, lr=tp.lr, weight_decay=tp.weight_decay, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tp.warmup, tp.steps))
        self.step = 0
        # Training seconds of the sittings before this one (from the checkpoint resumed), and when this
        # sitting's loop started: train.json's train_seconds is the run's, not the last sitting's.
        self.seconds_before, self._fit_t0 = 0.0, None
        self.nonfinite_steps = 0  # optimizer steps skipped under train.on_nonfinite=skip
        self.best = {"score": -1.0, "step": 0}
        self.last_logs: dict | None = None  # the last step's logs (a resumed run at its end reports them)
        self._identity: dict | None = None
        self.out = Path(run.out)
        self.out.mkdir(parents=True, exist_ok=True)

    # --- compact student vocabulary --------------------------------------------------------------------
    def _student_vocabulary(self) -> torch.Tensor:
        """Every teacher token id the student can read in this task's prepared splits (train, val and test;
        texts only, never labels). Covering every split gives each id evaluation meets its own row, as the
        full 49,408-row table did, without the full table's gradient and AdamW update of unused rows."""
        from student.data import student_vocabulary

        others = [i for ds in (self.val_ds, self.test_ds) if ds is not None for i in ds.iter_instances()]
        return student_vocabulary(
            self.spec, [*self.train_instances, *(i for i in others if i.task == self.run.task)]
        )

    def source_dim(self) -> int:
        if isinstance(self.source, CachedTargets):
            return self.source.cache.embed_dim
        return self.source.teacher.embed_dim

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def identity(self) -> dict:
        """What makes a checkpoint this run's: task, condition, method, seed, world size, the params that
        change the numbers (hash, plus the values to name what differs), the data's and the targets'
        fingerprints."""
        if self._identity is None:
            self._identity = self._make_identity()
        return self._identity

    def _make_identity(self) -> dict:
        reads_store = isinstance(self.source, CachedTargets) or self.order_groups is not None
        params = params_identity(self.params, reads_store)
        data = {
            ds.path.name: ds.fingerprint
            for ds in (self.train_ds, self.val_ds, self.test_ds)
            if ds is not None
        }
        if isinstance(self.source, CachedTargets):
            # What this run reads of the store: an append of other datasets leaves it (and a resume) alone.
            reads = [self.train_ds.fingerprint]
            cache = {"store": sha256_json(reading_fingerprint(self.source.cache.fingerprint(), reads))}
        elif self.needs_teacher:
            tp = self.params.teacher
            cache = {"online_teacher": sha256_json([tp.model, tp.pretrained, tp.precision])}
        elif self.order_groups is not None:  # a baseline ordered by the store's chunks
            fp = TeacherCache(self.run.cache).fingerprint()
            cache = {"store": sha256_json(reading_fingerprint(fp, [self.train_ds.fingerprint]))}
        else:
            cache = {}
        if self.needs_teacher and self.run.task == "vqa":
            # The candidates the confidence weights read: a checkpoint from before same-type distractors (or
            # of other answer types) is another run's, whatever the store's fingerprint says.
            cache["vqa_answer_types"] = sha256_json(self.spec.answer_types)
        sp = self.params.student
        init = {"pretrained": sha256_file(sp.pretrained)} if sp.init == "pretrained" else {"scratch": True}
        r = self.run
        identity = {"task": r.task, "condition": r.condition, "method": r.method, "seed": r.seed,
                    "world_size": self.world_size, "params_sha256": sha256_json(params), "params": params,
                    "data": data, "cache": cache, "init": init}  # fmt: skip
        if self.resize_mode != "shortest":  # other pixels; absent for open_clip's default (older runs resume)
            identity["resize_mode"] = self.resize_mode
        return identity

    def state(self) -> dict:
        # Plain containers, numbers, strings and tensors only: the file loads with weights_only=True.
        return {
            "student": self.student.state_dict(),
            "heads": self.heads.state_dict(),
            "dheads": self.dheads.state_dict() if self.dheads is not None else None,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "step": int(self.step),
            "best": {"score": float(self.best["score"]), "step": int(self.best["step"])},
            "rng": torch.get_rng_state(),
            # Dropout on a CUDA device draws from that device's generator, which the CPU state does not hold.
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "run": asdict(self.run),
            "identity": self.identity(),
            "nonfinite_steps": int(self.nonfinite_steps),
            "last_logs": self.last_logs,
            "train_seconds": float(self.train_seconds()),
        }

    def train_seconds(self) -> float:
        """Seconds in the training loop over every sitting so far (a resumed run's time before its last
        checkpoint included; what a killed sitting did after it is lost with its steps)."""
        now = time.perf_counter() - self._fit_t0 if self._fit_t0 is not None else 0.0
        return self.seconds_before + now

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        write_atomic(self._ckpt_path(), lambda tmp: torch.save(self.state(), tmp))

    def load_checkpoint(self) -> bool:
        """Resume from checkpoint.pt when it is this run's (same identity); refuse naming what differs."""
        path = self._ckpt_path()
        if not path.exists():
            return False
        st = load_state(path, "checkpoint")
        have = st.get("identity")
        if not isinstance(have, dict):
            raise CheckpointError(
                f"{path}: the checkpoint records no run identity (written by an older version, or not a "
                "train_student checkpoint); rerun with --no-resume to start over, or use another --out"
            )
        differ = identity_differences(have, self.identity())
        if differ:
            raise CheckpointError(
                f"{path}: the checkpoint belongs to another run ({'; '.join(differ)}); "
                "rerun with --no-resume to start over in this directory, or use another --out"
            )
        try:
            self.student.load_state_dict(st["student"])
            self.heads.load_state_dict(st["heads"])
            if self.dheads is not None and st["dheads"] is not None:
                self.dheads.load_state_dict(st["dheads"])
            self.opt.load_state_dict(st["opt"])
            self.sched.load_state_dict(st["sched"])
            self.step, self.best = int(st["step"]), dict(st["best"])
            self.nonfinite_steps = int(st.get("nonfinite_steps", 0))
            self.last_logs = st.get("last_logs")
            self.seconds_before = float(st.get("train_seconds", 0.0))
            torch.set_rng_state(st["rng"])
            if self.device.type == "cuda" and st.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(st["cuda_rng"], self.device)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: the checkpoint does not fit this run's model ({reason})"
            ) from None
        return True

    # ------------------------------------------------------------------ loop
    def targets(self, batch: Batch, unlabeled) -> tuple | None:
        """The step's teacher targets, labelled instances then the KD-only images: (tb, weights [B]). Runs on
        the prefetch thread, so the copy to the device and everything the loss computes from the teacher
        alone (``prepare_teacher``, after the copy: the cache's float16 travels, not float32) overlap the
        previous step."""
        if not self.needs_teacher:
            return None
        tb, weights = teacher_batch(batch, self.source, self.cfg, self.run.task)
        if unlabeled is not None:
            utb, uweights = unlabeled_teacher_batch(unlabeled[0], self.source, self.cfg)
            tb = _cat_teacher(tb, utb)
            weights = torch.cat([weights, uweights])  # §5: KD-only images weigh 1
        tb, weights = to_device((tb, weights), self.device)
        if self.cfg.kd == "tokens":
            tb = prepare_teacher(tb, self.source.grid, self.student.grid, self.cfg)
        return tb, weights

    def train_step(self, batch: Batch, unlabeled, targets: tuple | None = None) -> dict:
        task, cfg = self.run.task, self.cfg
        self.student.train()
        batch = batch.to(self.device)
        if unlabeled is not None:
            unlabeled = (unlabeled[0], *to_device(tuple(unlabeled[1:]), self.device))
        # The step's finite checks and its logged values are each read from the device once (on a GPU every
        # read waits for the queue to drain), yet no update is made from a non-finite loss or gradient.
        with deferred_finite_checks() as checks:
            l_task, out = forward_task(self.student, self.heads, task, batch, self.autocast)
            check_finite("task loss", l_task)
            tb = weights = None
            if self.needs_teacher:
                tb, weights = targets if targets is not None else self.targets(batch, unlabeled)
                if unlabeled is not None:
                    _, u_pixels, u_text = unlabeled
                    out = _cat_outputs(out, forward_student(self.student, u_pixels, u_text, self.autocast))
            total, parts = distill_loss(
                out,
                self.dheads,
                tb,
                weights,
                l_task,
                self.step,
                self.params.train.steps,
                cfg,
                self.source.grid if self.source else 0,
            )
            check_finite("total loss", total)
            if self.ddp:  # ranks vote on the loss before the gradient all_reduce (_all_ranks_finite)
                checks.verify()
            if not self._all_ranks_finite(True):
                raise _PeerNonFinite("another rank's loss is not finite: every rank skips this step")
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            if self.ddp:
                average_gradients(self.params_list, self.world_size)
            check_finite("gradient norm", torch.nn.utils.clip_grad_norm_(self.params_list, 1.0))
            checks.verify()
        self.opt.step()
        self.sched.step()
        # float64 holds every float32 part exactly: the same numbers float() of each gave.
        values = torch.stack([t.detach().double() for t in (total, l_task, *parts.values())]).tolist()
        return dict(zip(["loss", "task", *parts], values, strict=True))

    def batches(self):
        tp = self.params.train
        return train_loader(self.train_ds, self.split.train, self.spec, batch_size=self.batch_size // self.world_size,
                            seed=tp.seed * 1000 + self.run.seed + 7919 * self.rank, num_workers=tp.num_workers,
                            views=self.views, instances=self.train_instances, group_of=self.order_groups,
                            order_window=tp.order_window)  # fmt: skip

    def unlabeled_stream(self):
        """Image-only batches for the KD-only term of the unlabeled variants (None when the method has none)."""
        if self.cfg.unlabeled == "dropped":
            sources = [(self.train_ds, self.split.unlabeled_images)]
        elif self.cfg.unlabeled == "target":
            sources = [(self.test_ds, self.split.target_images)]
        else:
            return None
        if not any(ids for _, ids in sources):
            # Under `full` no training image is dropped: the variant then reduces to clip_td, said out loud.
            warnings.warn(
                f"{self.run.name}: no unlabeled images for {self.run.method}; training without the KD-only term",
                stacklevel=2,
            )
            return None
        # Each rank draws from its own share of the images (the same list, sorted, on every rank).
        sources = [(ds, list(ids)[self.rank :: self.world_size]) for ds, ids in sources]
        batch = max(1, self.batch_size // 2 // self.world_size)
        return unlabeled_batches(sources, self.spec, batch, self.run.seed)

    def close(self) -> None:
        """Tear down the process group this trainer started (torchrun warns about one left open)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ non-finite steps
    def _all_ranks_finite(self, ok: bool) -> bool:
        """Under DDP with on_nonfinite=skip, ranks must skip a step together, or the finite ones would wait
        forever in the gradient all_reduce: one MIN-reduce of the flag per step, reached by every rank before
        that all_reduce (from ``train_step`` when finite, from ``_skip_nonfinite`` when not)."""
        if not (self.ddp and self.params.train.on_nonfinite == "skip"):
            return ok
        flag = torch.tensor([1.0 if ok else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _skip_nonfinite(self, err: FloatingPointError) -> dict:
        """train.on_nonfinite: "fail" re-raises (the message names the loss term); "skip" drops this step's
        update (the batch is consumed, so a resumed run replays the same stream), counts it, and gives up once
        more than MAX_NONFINITE_FRACTION of train.steps were skipped."""
        tp = self.params.train
        if tp.on_nonfinite != "skip":
            raise err
        if not isinstance(err, _PeerNonFinite):
            self._all_ranks_finite(False)  # the vote the other ranks are waiting in
        self.opt.zero_grad(set_to_none=True)
        # The step is spent (its batch, its place in the λ schedule and the eval cadence), so the learning rate
        # moves on with it: otherwise the schedule lags a step per skip and never reaches its last values.
        with (
            warnings.catch_warnings()
        ):  # torch's "scheduler before optimizer" note, when the first step is skipped
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.sched.step()
        self.nonfinite_steps += 1
        limit = MAX_NONFINITE_FRACTION * tp.steps
        if self.nonfinite_steps > limit:
            raise FloatingPointError(
                f"{self.run.name}: {self.nonfinite_steps} non-finite steps skipped, more than "
                f"{MAX_NONFINITE_FRACTION:.0%} of train.steps={tp.steps}; last: {err}"
            ) from err
        warnings.warn(f"{self.run.name}: step {self.step + 1} skipped: {err}", stacklevel=2)
        return {"loss": float("nan"), "skipped": 1.0}

    def validate(self) -> dict:
        ds, keys = self.val_ds or self.train_ds, self.split.val
        batches = self._val_batches.batches(ds, keys, self.spec, EVAL_BATCH, self.params.teacher.model)
        return evaluate(self.student, self.heads, ds, keys, self.spec, batches=batches)

    def fit(self, resume: bool = True, max_steps: int | None = None) -> dict:
        tp = self.params.train
        resumed_from = self.step if resume and self.load_checkpoint() else 0
        rng_after_resume = torch.get_rng_state()
        stream, unl = self.batches(), self.unlabeled_stream()
        for _ in range(resumed_from):  # replay the data stream so a resumed run sees the same batches
            next(stream)
            if unl is not None:
                next(unl)
        torch.set_rng_state(rng_after_resume)
        if self.ddp:
            broadcast_parameters([*self.params_list, *self.student.buffers(), *self.heads.buffers()])
        history: list[dict] = []
        self._fit_t0 = time.perf_counter()
        stop = min(tp.steps, max_steps) if max_steps else tp.steps
        bar = tqdm(
            total=tp.steps, initial=self.step, desc=self.run.name, disable=not self.progress or self.rank != 0
        )
        pending = _Prefetch(self, stream, unl)
        try:
            while self.step < stop:
                try:
                    logs = self.train_step(*pending.next())
                except FloatingPointError as e:
                    logs = self._skip_nonfinite(e)
                self.step += 1
                if self.ddp:
                    logs = mean_over_ranks(logs, self.world_size)
                history.append({"step": self.step, **logs})
                self.last_logs = history[-1]
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
                # Only rank 0 validates, exports and checkpoints (the weights are the same on every rank); nothing
                # inside is a collective, so the other ranks just go on to the next step's all_reduce and wait there.
                exported = False
                if (self.step % tp.eval_every == 0 or self.step == tp.steps) and self.rank == 0:
                    score = self.validate()["primary"]
                    if score > self.best["score"]:
                        self.best = {"score": score, "step": self.step}
                        self.export(self.out / "student.pt")
                        exported = True
                # A checkpoint follows every export: a run resumed from an older one would replace the export
                # only where it beats the older best, and on another device or thread count (not bit-exact)
                # an export from the steps it replays could outlive the run's own selection.
                if exported or self.step % tp.checkpoint_every == 0 or self.step == stop:
                    self.save_checkpoint()
        finally:
            pending.close()
        bar.close()
        if self.ddp:  # every rank returns rank 0's selection (this also waits for rank 0's last checkpoint)
            best = [self.best]
            dist.broadcast_object_list(best, src=0)
            self.best = best[0]
        return {"history": history, "seconds": self.train_seconds(), "resumed_from": resumed_from}

    def export(self, path: Path) -> None:
        """The deployable student: backbone + task head only; the distillation projection heads are dropped.
        Plain data and tensors (loads with weights_only=True), renamed into place when complete."""
        if self.rank != 0:
            return
        pp = self.params.protocol
        # The shifted domain it was held out from: evaluate scores on that one, whatever its own params say.
        shift = {"shift_key": pp.shift_key, "shift_target_domain": pp.shift_target_domain}
        exported = {"student": self.student.state_dict(), "heads": self.heads.state_dict(),
                    "run": asdict(self.run), "student_params": asdict(self.params.student),
                    "vocab": list(self.spec.vocab), "teacher_model": self.params.teacher.model,
                    "splits": self.splits.names(), "protocol": shift}  # fmt: skip
        if self.resize_mode != "shortest":  # evaluate and predict show new images as training did
            exported["image_resize_mode"] = self.resize_mode
        write_atomic(path, lambda tmp: torch.save(exported, tmp))


class _Prefetch:
    """Step n+1's batch, KD-only images and teacher targets are made on one background thread while step n
    computes: decoding and cache reads (zstd releases the GIL) then overlap the model instead of adding to
    it. Only this thread touches the target source during training, so the chunk cache needs no lock; the
    order of batches is the stream's, so a resumed run still replays the same data."""

    def __init__(self, trainer: Trainer, stream, unl):
        self.trainer, self.stream, self.unl = trainer, stream, unl
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-td-prefetch")
        self.future = self.pool.submit(self._make)

    def _make(self) -> tuple:
        batch = next(self.stream)
        unlabeled = next(self.unl) if self.unl is not None else None
        return batch, unlabeled, self.trainer.targets(batch, unlabeled)

    def next(self) -> tuple:
        item = self.future.result()
        self.future = self.pool.submit(self._make)
        return item

    def close(self) -> None:
        self.future.cancel()
        self.pool.shutdown(wait=True)


# What a run folder holds: this stage's files, evaluate's eval.json and the lock; besides them only hidden
# temporaries of write_atomic (.NAME.tmp-PID) and of the lock (.lock.PID.HEX.tmp, .lock.stale-HEX) a kill left.
_RUN_FILES = frozenset({"checkpoint.pt", "student.pt", "train.json", "eval.json", ".lock"})


def refuse_foreign_out(run: RunSpec) -> None:
    """A run writes only into a missing or empty folder or a run folder of its own: a folder holding files no
    run writes, or a student.pt that is not this run's export (another run's, or a user's model), would be
    overwritten, so it is refused before anything is written."""
    out = Path(run.out)
    if not out.exists():
        return
    if not out.is_dir():
        raise RunSetupError(f"--out {out}: exists and is not a folder")
    names = {p.name for p in out.iterdir() if not (is_write_leftover(p.name) or is_leftover(p.name))}
    foreign = sorted(names - _RUN_FILES)
    if foreign:
        raise RunSetupError(
            f"--out {out}: holds {', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}, which no training "
            "run writes; refusing to write into a folder that is not a run folder (use another --out)"
        )
    student = out / "student.pt"
    # With a checkpoint, resuming checks the run's whole identity and names what differs (--no-resume: the
    # user asked to start this folder over); a finished study cell keeps only its export.
    if student.exists() and not (out / "checkpoint.pt").exists():
        mine = {"task": run.task, "condition": run.condition, "method": run.method, "seed": run.seed}
        try:
            recorded = load_state(student, "exported student").get("run")
        except CheckpointError:  # unreadable, or not plain data: whatever it is, it is not this run's export
            recorded = None
        if not isinstance(recorded, dict) or {k: recorded.get(k) for k in mine} != mine:
            raise RunSetupError(
                f"--out {out}: its student.pt is not an exported student of run {run.name}; refusing to "
                "overwrite it (use another --out)"
            )


def run_student(
    params: Params, run: RunSpec, *, online_teacher: bool = False, progress: bool = True, resume: bool = True
) -> dict:
    """Train and select on validation; writes train.json and the exported student.pt in the run directory.
    The test split is scored by the evaluate stage, never here. Rank 0 holds ``<out>/.lock`` throughout, so a
    second run into the same directory is refused instead of interleaving checkpoints; a folder that is not a
    run folder of this run is refused before anything is written (``refuse_foreign_out``)."""
    if int(os.environ.get("RANK", "0")) == 0:
        refuse_foreign_out(run)
    lock = (
        StoreLock(run.out, purpose=f"train_student {run.name}")
        if int(os.environ.get("RANK", "0")) == 0
        else None
    )
    if lock is not None:
        try:
            lock.acquire()
        except StoreLocked as e:
            h = e.holder
            raise RunLocked(
                f"run directory {run.out} is in use by pid {h.get('pid', '?')} on {h.get('host', '?')} since "
                f"{h.get('started', '?')} ({h.get('purpose', '?')}): wait for it, or use another --out; "
                f"if that process is dead, delete {h.get('lock_path', run.out + '/.lock')}"
            ) from None
    try:
        return _train(params, run, online_teacher=online_teacher, progress=progress, resume=resume)
    finally:
        if lock is not None:
            lock.release()


def _train(params: Params, run: RunSpec, *, online_teacher: bool, progress: bool, resume: bool) -> dict:
    trainer = Trainer(params, run, online_teacher=online_teacher, progress=progress)
    try:
        fit = trainer.fit(resume=resume)
    finally:
        trainer.close()
    metrics = {
        "run": asdict(run),
        "split": trainer.split.summary(),
        "best_val": trainer.best,
        "steps": trainer.step,
        "train_seconds": fit["seconds"],
        "resumed_from": fit["resumed_from"],
        "nonfinite_steps_skipped": trainer.nonfinite_steps,
        "final": fit["history"][-1] if fit["history"] else trainer.last_logs,
        "student_parameters": count_parameters(trainer.student) + count_parameters(trainer.heads),
    }
    if trainer.rank == 0:
        write_atomic(Path(run.out) / "train.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=1)))
    return metrics
