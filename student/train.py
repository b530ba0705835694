"""One student run: a task, a protocol condition, a method and a seed — readable in one sitting.

The loop streams labelled batches (and, for the unlabeled variants, image-only batches), reads teacher
targets from the cache (or computes them online), and optimises task loss + the method's KD term with AdamW,
linear warmup and cosine decay. Model selection uses the validation split only; the test split is scored
once, with the selected weights. Checkpoints hold everything needed to resume bit-for-bit: on resume the
data stream is replayed to the checkpointed step instead of being reseeded.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.cache import TeacherCache, check_fingerprint
from pipeline.config import Params
from pipeline.data.shards import PreparedDataset
from pipeline.protocol import Split, make_split
from student.data import Batch, TaskSpec, load_tokenizer, train_loader, unlabeled_batches
from student.evaluation import evaluate
from student.losses import DistillHeads, MethodSettings, check_finite, distill_loss, method_config
from student.model import StudentOutput, TaskHeads, count_parameters, create_student
from student.targets import CachedTargets, OnlineTargets, TargetSource, teacher_batch, unlabeled_teacher_batch


@dataclass
class RunSpec:
    task: str
    condition: str
    method: str
    seed: int
    data_root: str  # directory holding the prepared train/val/test splits
    cache: str  # teacher cache URL
    out: str  # run directory: checkpoints, metrics.json, student.pt

    @property
    def name(self) -> str:
        return f"{self.task}-{self.condition}-{self.method}-s{self.seed}"


class FingerprintMismatch(RuntimeError):
    """The cache was extracted from other data or another teacher than this run uses."""


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


def forward_task(student, heads: TaskHeads, task: str, batch: Batch) -> tuple[torch.Tensor, StudentOutput]:
    """Task loss and the student outputs the KD term distils (for VCR: the gold question+answer pair)."""
    if task != "vcr":
        out = student(batch.pixels, batch.text_ids)
        loss, _ = heads.loss(task, out.pooled, batch.target)
        return loss, out
    b, k2, length = batch.text_ids.shape
    out = student(batch.pixels.repeat_interleave(k2, 0), batch.text_ids.view(b * k2, length))
    pooled = out.pooled.view(b, k2, -1)
    k = k2 // 2
    l_qa, _ = heads.loss("vcr", pooled[:, :k], batch.target[:, 0])
    l_qr, _ = heads.loss("vcr", pooled[:, k:], batch.target[:, 1])
    gold = torch.arange(b) * k2 + batch.target[:, 0]
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
        self.ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.ddp and not dist.is_initialized():
            dist.init_process_group("gloo")
        self.rank = dist.get_rank() if self.ddp else 0
        root = Path(run.data_root)
        self.train_ds = PreparedDataset(root / "train")
        self.val_ds = PreparedDataset(root / "val") if (root / "val" / "dataset.json").exists() else None
        self.test_ds = PreparedDataset(root / "test")
        pp = params.protocol
        self.split: Split = make_split(
            run.task, run.condition, run.seed,
            self.train_ds.iter_instances(), self.test_ds.iter_instances(),
            self.val_ds.iter_instances() if self.val_ds else None,
            shift_key=pp.shift_key, target=pp.shift_target_domain, val_fraction=pp.val_fraction,
        )  # fmt: skip
        if self.cfg.unlabeled == "target" and not run.condition.startswith("shift"):
            raise ValueError(
                f"{run.method} distils on the shifted target domain's images: it needs --condition shift"
            )
        self.needs_teacher = self.cfg.kd != "none"
        self.source: TargetSource | None = None
        teacher_model = params.teacher.model
        if self.needs_teacher:
            self.source = self._target_source(online_teacher)
        vocab = self.train_ds.answer_vocab() if run.task == "vqa" else []
        self.spec = TaskSpec(run.task, load_tokenizer(teacher_model), params.student.image_size, params.student.max_text_len,
                             vocab, params.distill.vqa_candidates)  # fmt: skip
        seed_everything(run.seed)
        self.student = create_student(params.student.arch, params.student)
        self.heads = TaskHeads(self.student.width, len(vocab), tasks=(run.task,))
        self.dheads = DistillHeads(self.student.width, self.source_dim()) if self.needs_teacher else None
        modules = [self.student, self.heads] + ([self.dheads] if self.dheads is not None else [])
        self.params_list = [p for m in modules for p in m.parameters()]
        self.opt = torch.optim.AdamW(self.params_list, lr=tp.lr, weight_decay=tp.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(tp.warmup, tp.steps))
        self.step = 0
        self.best = {"score": -1.0, "step": 0}
        self.out = Path(run.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def source_dim(self) -> int:
        if isinstance(self.source, CachedTargets):
            return self.source.cache.embed_dim
        return self.source.teacher.embed_dim

    def _target_source(self, online: bool) -> TargetSource:
        tp = self.params.teacher
        if online:
            from pipeline.teacher import create_teacher

            teacher = create_teacher(tp.model, tp.pretrained, precision=tp.precision)
            return OnlineTargets(
                teacher, [d for d in (self.train_ds, self.val_ds, self.test_ds) if d is not None]
            )
        cache = TeacherCache(self.run.cache)
        expected: dict = {"data": {"datasets": {self.train_ds.path.name: self.train_ds.fingerprint}}}
        if tp.pretrained and Path(tp.pretrained).is_file():
            from pipeline.teacher import sha256_file

            # The checkpoint the params name must be the one the cache was extracted with.
            expected["teacher"] = {"pretrained_checksum": sha256_file(tp.pretrained)}
        differ = check_fingerprint(cache.attrs, expected)
        if differ:
            raise FingerprintMismatch(
                f"{self.run.cache}: the teacher cache does not match this run's data ({self.train_ds.path}) and "
                f"teacher ({tp.pretrained or tp.model}): differing fields {', '.join(differ)}; "
                "re-run python -m stages.extract_teacher"
            )
        cached_vocab = cache.attrs.get("data", {}).get("vqa_vocab")
        if (
            self.run.task == "vqa"
            and cached_vocab is not None
            and cached_vocab != self.train_ds.answer_vocab()
        ):
            raise FingerprintMismatch(
                f"{self.run.cache}: VQA answer vocabulary differs from {self.train_ds.path}'s"
            )
        return CachedTargets(cache)

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def state(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "heads": self.heads.state_dict(),
            "dheads": self.dheads.state_dict() if self.dheads is not None else None,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "step": self.step,
            "best": self.best,
            "rng": torch.get_rng_state(),
            "run": asdict(self.run),
        }

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        tmp = self._ckpt_path().with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, self._ckpt_path())  # a kill mid-save leaves the previous checkpoint intact

    def load_checkpoint(self) -> bool:
        path = self._ckpt_path()
        if not path.exists():
            return False
        st = torch.load(path, map_location="cpu", weights_only=False)
        self.student.load_state_dict(st["student"])
        self.heads.load_state_dict(st["heads"])
        if self.dheads is not None and st["dheads"] is not None:
            self.dheads.load_state_dict(st["dheads"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.step, self.best = st["step"], st["best"]
        torch.set_rng_state(st["rng"])
        return True

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: Batch, unlabeled) -> dict:
        task, cfg = self.run.task, self.cfg
        self.student.train()
        l_task, out = forward_task(self.student, self.heads, task, batch)
        check_finite("task loss", l_task)
        tb = weights = None
        if self.needs_teacher:
            tb, weights = teacher_batch(batch, self.source, cfg, task)
            if unlabeled is not None:
                u_ids, u_pixels, u_text = unlabeled
                u_out = self.student(u_pixels, u_text)
                out = _cat_outputs(out, u_out)
                tb = _cat_teacher(tb, unlabeled_teacher_batch(u_ids, self.source, cfg))
                weights = torch.cat([weights, torch.ones(len(u_ids))])
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
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.ddp:
            for p in self.params_list:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        torch.nn.utils.clip_grad_norm_(self.params_list, 1.0)
        self.opt.step()
        self.sched.step()
        return {
            "loss": float(total.detach()),
            "task": float(l_task.detach()),
            **{k: float(v) for k, v in parts.items()},
        }

    def batches(self):
        tp = self.params.train
        return train_loader(self.train_ds, self.split.train, self.spec, batch_size=tp.batch_size,
                            seed=tp.seed * 1000 + self.run.seed + 7919 * self.rank, num_workers=tp.num_workers)  # fmt: skip

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
        return unlabeled_batches(sources, self.spec, max(1, self.params.train.batch_size // 2), self.run.seed)

    def validate(self) -> dict:
        return evaluate(self.student, self.heads, self.val_ds or self.train_ds, self.split.val, self.spec)

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
        history: list[dict] = []
        t0 = time.perf_counter()
        stop = min(tp.steps, max_steps) if max_steps else tp.steps
        bar = tqdm(
            total=tp.steps, initial=self.step, desc=self.run.name, disable=not self.progress or self.rank != 0
        )
        while self.step < stop:
            logs = self.train_step(next(stream), next(unl) if unl is not None else None)
            self.step += 1
            history.append({"step": self.step, **logs})
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if self.step % tp.eval_every == 0 or self.step == tp.steps:
                score = self.validate()["primary"]
                if score > self.best["score"]:
                    self.best = {"score": score, "step": self.step}
                    self.export(self.out / "student.pt")
            if self.step % tp.checkpoint_every == 0 or self.step == stop:
                self.save_checkpoint()
        bar.close()
        return {"history": history, "seconds": time.perf_counter() - t0, "resumed_from": resumed_from}

    def export(self, path: Path) -> None:
        """The deployable student: backbone + task head only; the distillation projection heads are dropped."""
        if self.rank != 0:
            return
        torch.save({"student": self.student.state_dict(), "heads": self.heads.state_dict(), "run": asdict(self.run),
                    "student_params": asdict(self.params.student), "vocab": self.spec.vocab,
                    "teacher_model": self.params.teacher.model}, path)  # fmt: skip


def run_student(
    params: Params, run: RunSpec, *, online_teacher: bool = False, progress: bool = True, resume: bool = True
) -> dict:
    """Train and select on validation; writes train.json and the exported student.pt in the run directory.
    The test split is scored by the evaluate stage, never here."""
    trainer = Trainer(params, run, online_teacher=online_teacher, progress=progress)
    fit = trainer.fit(resume=resume)
    metrics = {
        "run": asdict(run),
        "split": trainer.split.summary(),
        "best_val": trainer.best,
        "steps": trainer.step,
        "train_seconds": fit["seconds"],
        "resumed_from": fit["resumed_from"],
        "final": fit["history"][-1] if fit["history"] else None,
        "student_parameters": count_parameters(trainer.student) + count_parameters(trainer.heads),
    }
    if trainer.rank == 0:
        (Path(run.out) / "train.json").write_text(json.dumps(metrics, indent=1))
    return metrics
