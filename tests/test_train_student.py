"""Student training from the teacher cache: cached == online targets, bit-exact resume, fingerprint refusal,
every method runs, export drops the distillation heads; docs/training.md's plugin student and own-loop recipe."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from student.errors import FingerprintMismatch, RunSetupError
from student.losses import METHODS
from student.model import count_parameters, create_student
from student.targets import OnlineTargets
from student.train import RunSpec, Trainer, run_student
from tests.conftest import REPO, build_world, docs_python_block, prepare_synthetic, run_spec, student_params


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize("task", ["snli_ve", "vqa", "vcr"])
def test_cached_targets_equal_online_targets(world, tmp_path, task):
    # Same seed, same batches: the losses of the first steps agree whether the teacher targets come from the
    # cache or from the teacher run inside the loop (both in float16, so only summation order differs).
    params = student_params(world)
    logs = {}
    for online in (False, True):
        tr = Trainer(
            params,
            run_spec(world, tmp_path, task=task, name=f"{task}-{online}"),
            online_teacher=online,
            progress=False,
        )
        stream = tr.batches()
        logs[online] = [tr.train_step(next(stream), None) for _ in range(3)]
    for cached, online in zip(logs[False], logs[True], strict=True):
        assert cached["loss"] == pytest.approx(online["loss"], rel=1e-4, abs=1e-5)
        assert cached["kd"] == pytest.approx(online["kd"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_exact(world, tmp_path, precision):
    # bf16: the checkpoint's float32 weights and AdamW moments go back into channels_last parameters.
    params = student_params(world, **{"train.precision": precision})
    straight = Trainer(params, run_spec(world, tmp_path, name="straight"), progress=False)
    straight.fit(resume=False)
    first = Trainer(params, run_spec(world, tmp_path, name="resumed"), progress=False)
    first.fit(resume=False, max_steps=3)  # stops after the step-3 checkpoint, as a killed run would
    second = Trainer(params, run_spec(world, tmp_path, name="resumed"), progress=False)
    out = second.fit(resume=True)
    assert out["resumed_from"] == 3 and second.step == 6
    for a, b in zip(
        straight.student.state_dict().values(), second.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_resume_with_the_gpus_dropout_generator(world, tmp_path):
    # Dropout on the GPU draws from the CUDA generator: a checkpoint holding only the CPU's state resumed
    # with the masks of step 1 (benchmarks/gpu_check.sh runs this where a GPU is lent). Compared as generator
    # states, not weights, which a GPU's non-deterministic kernels may move in the last bits.
    params = student_params(world, **{"train.device": "cuda", "student.dropout": 0.1})
    first = Trainer(params, run_spec(world, tmp_path), progress=False)
    first.fit(resume=False, max_steps=3)  # stops after the step-3 checkpoint, as a killed run would
    after = torch.cuda.get_rng_state()
    second = Trainer(params, run_spec(world, tmp_path), progress=False)  # seeds every generator afresh
    assert not torch.equal(torch.cuda.get_rng_state(), after)
    assert second.load_checkpoint()
    assert torch.equal(torch.cuda.get_rng_state(), after)


def test_every_export_is_checkpointed_so_a_resume_never_replays_past_the_selected_student(
    world, tmp_path, monkeypatch
):
    """A run killed after exporting a new best but before its next periodic checkpoint resumed from the older
    checkpoint: off the same device and thread count (not bit-exact) the export from the replayed steps could
    outlive the run's own selection. Every export now writes a checkpoint at its step."""
    params = student_params(world, **{"train.steps": 6, "train.eval_every": 1, "train.checkpoint_every": 100})
    tr = Trainer(params, run_spec(world, tmp_path), progress=False)
    scores = iter([0.1, 0.5, 0.2, 0.3])
    monkeypatch.setattr(tr, "validate", lambda: {"primary": next(scores)})
    real_step = tr.train_step

    def killed_at_step_5(*a, **k):
        if tr.step == 4:
            raise KeyboardInterrupt  # the kill, after step 4's validation and before step 5
        return real_step(*a, **k)

    monkeypatch.setattr(tr, "train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(resume=False)
    tr.close()
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["best"] == {"score": 0.5, "step": 2}  # the step of the last export
    exported = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    for k, v in exported["student"].items():
        assert torch.equal(v, ckpt["student"][k]), k  # the export is the checkpoint's student


def test_train_seconds_count_every_sitting_of_a_resumed_run(world, tmp_path):
    """train.json's train_seconds is the run's: a resumed run adds the time recorded by its checkpoint, and
    rerunning a finished run (nothing left to train) keeps it instead of writing the rerun's ~0 s."""
    params = student_params(world, **{"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2})
    first = Trainer(params, run_spec(world, tmp_path), progress=False)
    first.fit(resume=False, max_steps=2)  # stops after the step-2 checkpoint, as a killed run would
    first.close()
    before = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["train_seconds"]
    assert before > 0
    resumed = run_student(params, run_spec(world, tmp_path), progress=False)
    assert resumed["resumed_from"] == 2 and resumed["train_seconds"] > before
    again = run_student(params, run_spec(world, tmp_path), progress=False)  # finished: no step left
    assert again["resumed_from"] == 4 and again["train_seconds"] == pytest.approx(
        resumed["train_seconds"], abs=0.5
    )


def test_transductive_needs_the_shift_condition(world, tmp_path):
    with pytest.raises(ValueError, match="--condition shift"):
        Trainer(
            student_params(world),
            run_spec(world, tmp_path, method="clip_td_transductive", condition="full"),
            progress=False,
        )


def test_cache_from_other_data_is_refused(world, tmp_path):
    root, _, _ = world
    other = tmp_path / "other"
    prepare_synthetic(other, seed=1)
    run = RunSpec("snli_ve", "full", "clip_td", 0, str(other), world[2], str(tmp_path / "r"))
    with pytest.raises(
        FingerprintMismatch, match=f"does not cover this run's training data {other / 'train'}"
    ):
        Trainer(student_params(world), run, progress=False)


def test_a_store_of_another_vqa_vocabulary_is_refused_saying_how_to_rebuild(world, tmp_path):
    """VQA prepared again with other answers and added to the store: the store keeps the vocabulary it was
    built from, so the refusal names the answers that differ and the rebuild that fixes it."""
    import shutil

    import zarr

    store = tmp_path / "store.zarr"
    shutil.copytree(world[2], store)
    group = zarr.open_group(str(store), mode="r+")
    data = dict(group.attrs["data"])
    data["vqa_vocab"] = [a for a in data["vqa_vocab"] if a != data["vqa_vocab"][0]] + ["zebra"]
    group.attrs["data"] = data
    run = RunSpec("vqa", "full", "clip_td", 0, str(world[0] / "shards"), str(store), str(tmp_path / "r"))
    with pytest.raises(
        FingerprintMismatch, match=r"answers only here: \[.*only in the store's.*'zebra'.*--overwrite"
    ):
        Trainer(student_params(world), run, progress=False)


def _store_with_data(world, tmp_path, edit) -> str:
    """A copy of the world's store whose ``data`` attrs ``edit`` changed in place."""
    import shutil

    import zarr

    store = tmp_path / "store.zarr"
    shutil.copytree(world[2], store)
    group = zarr.open_group(str(store), mode="r+")
    data = dict(group.attrs["data"])
    edit(data)
    group.attrs["data"] = data
    return str(store)


def test_a_store_from_before_the_answer_types_is_refused_saying_how_to_rebuild(world, tmp_path):
    """A store extracted before VQA distractors shared the gold's type holds the old candidates: read with the
    whole vocabulary its confidence weights would be the old rule's. Refused, naming the store and the key."""
    store = _store_with_data(world, tmp_path, lambda d: d.pop("vqa_answer_types"))
    run = RunSpec("vqa", "full", "clip_td", 0, str(world[0] / "shards"), store, str(tmp_path / "r"))
    with pytest.raises(
        FingerprintMismatch,
        match=r"store\.zarr.*data\.vqa_answer_types.*stages\.extract_teacher.*--rebuild-stale",
    ):
        Trainer(student_params(world), run, progress=False)


def test_a_store_of_other_answer_types_is_refused_naming_them(world, tmp_path):
    def retype(data):
        data["vqa_answer_types"] = {**data["vqa_answer_types"], "yes": "color"}

    store = _store_with_data(world, tmp_path, retype)
    run = RunSpec("vqa", "full", "clip_td", 0, str(world[0] / "shards"), store, str(tmp_path / "r"))
    with pytest.raises(
        FingerprintMismatch, match=r"data\.vqa_answer_types.*'yes': color → yes/no.*--overwrite"
    ):
        Trainer(student_params(world), run, progress=False)


def test_training_reads_the_vqa_candidates_extraction_cached(world, tmp_path):
    """The texts a VQA run looks up for its confidence weights are those extraction encoded: built from the
    store's vocabulary and answer types, distractors of the question's type, every one in the store."""
    from pipeline.cache import TeacherCache
    from pipeline.data.shards import PreparedDataset
    from pipeline.extract import plan_extraction
    from pipeline.texts import answer_types, instance_texts, text_hash

    tr = Trainer(student_params(world), run_spec(world, tmp_path, task="vqa"), progress=False)
    attrs = TeacherCache(world[2]).attrs["data"]
    types = attrs["vqa_answer_types"]
    assert tr.spec.answer_types == types == answer_types(tr.train_instances)
    assert {"yes/no", "color", "number"} <= set(types.values())
    shards = world[0] / "shards"
    plan = plan_extraction([PreparedDataset(shards / s) for s in ("train", "val", "test")])
    extracted = set(plan.text_ids)
    counts = Counter()
    for inst in tr.train_instances:
        texts = tr.spec.texts(inst)
        assert {text_hash(t) for t in texts.all()} <= extracted
        answers = [c.removeprefix(inst.question).strip() for c in texts.candidates]
        assert {types[a] for a in answers} == {inst.meta["answer_type"]}
        counts[len(answers)] += 1
        assert texts == instance_texts(inst, attrs["vqa_vocab"], 4, types)
    assert counts[2] and counts[4]  # yes/no questions have one distractor, colour questions three
    # The whole vocabulary's candidates (the previous rule) are not what the store holds.
    old = [instance_texts(i, attrs["vqa_vocab"], 4) for i in tr.train_instances]
    assert any(text_hash(c) not in extracted for t in old for c in t.candidates)


def test_cache_from_other_teacher_is_refused(world, tmp_path):
    root, _, _ = world
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(FingerprintMismatch, match=r"teacher\.pretrained_checksum"):
        Trainer(
            student_params(world, **{"teacher.pretrained": tmp_path / "other.pt"}),
            run_spec(world, tmp_path),
            progress=False,
        )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_exports_a_baseline_sized_student(world, tmp_path, method):
    params = student_params(world, **{"train.steps": 2, "train.eval_every": 2})
    task = "vcr" if method == "clip_td" else "snli_ve"
    condition = "shift" if method == "clip_td_transductive" else "lowshot-0.5"
    metrics = run_student(
        params, run_spec(world, tmp_path, task=task, method=method, condition=condition), progress=False
    )
    assert metrics["steps"] == 2 and metrics["final"]["loss"] == metrics["final"]["loss"]  # finite, not NaN
    exported = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    student = create_student(params.student.arch, params.student)
    student.load_state_dict(exported["student"])  # strict: no distillation heads or extra weights inside
    # The export carries the task's compact vocabulary: compare with a student of that vocabulary.
    same_vocab = create_student(
        params.student.arch, params.student, vocabulary=exported["student"]["token_ids"]
    )
    assert count_parameters(student) == count_parameters(same_vocab)
    assert set(exported) >= {"student", "heads", "vocab", "run"} and "dheads" not in exported
    assert "image_resize_mode" not in exported  # the tiny teacher keeps open_clip's default centre square
    if method == "baseline":
        assert metrics["final"]["task"] == pytest.approx(metrics["final"]["loss"])


def test_training_device_resolves_and_a_missing_gpu_names_the_key(monkeypatch):
    from student.placement import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match=r"train\.device=cuda:1.*no CUDA device"):
        resolve_device("cuda:1")
    # A machine with one GPU: cuda:1 is not there either (it failed at the first tensor copy).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match=r"train\.device=cuda:1: torch sees 1 CUDA device\(s\)"):
        resolve_device("cuda:1")


def test_batches_and_targets_move_to_the_training_device(world, tmp_path):
    """What a GPU run moves: the model inputs and every teacher target tensor; instances and texts stay."""
    from student.placement import to_device

    tr = Trainer(student_params(world), run_spec(world, tmp_path, task="vqa"), progress=False)
    batch = next(tr.batches())
    tb, weights = tr.targets(batch, None)
    moved = batch.to("meta")  # a device without memory: shows where each tensor would go
    assert {moved.pixels.device.type, moved.text_ids.device.type, moved.target.device.type} == {"meta"}
    assert moved.instances is batch.instances and moved.teacher_texts is batch.teacher_texts
    assert batch.pixels.device.type == "cpu"  # the host batch is left as it was
    tb_m, w_m = to_device((tb, weights), torch.device("meta"))
    assert {"img_target", "img_select", "txt_target", "txt_relevance"} <= set(tb)  # prepared off the step
    assert set(tb_m) == set(tb) and {t.device.type for t in tb_m.values()} == {"meta"}
    assert w_m.device.type == "meta"


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def losses_on_the_same_batches(
    world, tmp_path, task: str, arms: dict, common: dict, inspect=None
) -> dict[str, list[float]]:
    """Per arm: the losses of three training steps of a Trainer built with ``common`` and that arm's settings,
    every arm on the same three batches (drawn by the first arm's trainer); ``inspect(arm, trainer)`` runs
    after its steps."""
    logs, batches = {}, None
    for arm, sets in arms.items():
        params = student_params(world, **common, **sets)
        tr = Trainer(params, run_spec(world, tmp_path, task=task, name=arm), progress=False)
        try:
            if batches is None:
                stream = tr.batches()
                batches = [next(stream) for _ in range(3)]
            logs[arm] = [tr.train_step(b, None)["loss"] for b in batches]
            if inspect is not None:
                inspect(arm, tr)
        finally:
            tr.close()
    return logs


def channels_last(tr: Trainer) -> bool:
    convs = [m.weight for m in tr.student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    return all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("task", ["vqa", "vcr"])
def test_bf16_steps_follow_the_fp32_steps_and_export_a_float32_student(world, tmp_path, task, device):
    """train.precision=bf16: from the same weights on the same batches the losses are fp32's up to bfloat16's
    rounding (and not fp32's exactly: the forward did run in bfloat16), the convolutions sit in channels_last,
    and what is exported loads into a plain float32 student."""
    arms = {precision: {"train.precision": precision} for precision in ("fp32", "bf16")}
    common = {"train.steps": 2, "train.eval_every": 2, "train.device": device}

    def inspect(precision, tr):
        assert channels_last(tr) == (precision == "bf16")

    logs = losses_on_the_same_batches(world, tmp_path, task, arms, common, inspect)
    assert logs["bf16"] != logs["fp32"]
    assert logs["bf16"] == pytest.approx(logs["fp32"], rel=2e-2)

    params = student_params(world, **common, **arms["bf16"])
    metrics = run_student(params, run_spec(world, tmp_path, task=task, name="export"), progress=False)
    assert metrics["steps"] == 2 and metrics["final"]["loss"] == metrics["final"]["loss"]
    exported = torch.load(tmp_path / "export" / "student.pt", weights_only=True)["student"]
    assert {t.dtype for t in exported.values() if t.is_floating_point()} == {torch.float32}
    plain = create_student(params.student.arch, params.student, vocabulary=exported["token_ids"])
    plain.load_state_dict(exported)


CXX = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
    reason="torch.compile on a CPU needs a C++ compiler",
)
TRITON = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="torch.compile on a GPU needs a CUDA device and triton",
)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=CXX), pytest.param("cuda", marks=TRITON)])
def test_compiled_trunk_trains_as_the_eager_one_and_evaluation_runs_eagerly(
    world, tmp_path, monkeypatch, device
):
    """train.compile=true: the film student's image trunk trains through torch.compile, in channels_last, with
    the eager NCHW trunk's losses up to float error (inductor fuses the ops around the convolutions),
    validation runs the eager trunk (no compile per evaluation batch size), and a student without an image
    trunk is refused by key."""
    real_compile, compiled_calls = torch.compile, []

    def counting_compile(fn, **kwargs):
        compiled = real_compile(fn, **kwargs)

        def call(*args, **kw):
            compiled_calls.append(1)
            return compiled(*args, **kw)

        return call

    monkeypatch.setattr(torch, "compile", counting_compile)
    arms = {"eager": {"train.compile": False}, "compiled": {"train.compile": True}}
    common = {"train.steps": 3, "train.eval_every": 3, "train.device": device}

    def inspect(arm, tr):
        assert channels_last(tr) == (arm == "compiled")
        if arm == "compiled":
            assert len(compiled_calls) == 3
            tr.validate()
            assert len(compiled_calls) == 3 and tr.student.training

    logs = losses_on_the_same_batches(world, tmp_path, "vqa", arms, common, inspect)
    assert logs["compiled"] == pytest.approx(logs["eager"], rel=1e-5 if device == "cpu" else 1e-4)

    vilt = student_params(world, **{"train.compile": True, "student.arch": "vilt"})
    with pytest.raises(RuntimeError, match=r"train\.compile=true: student\.arch=vilt has no image_trunk"):
        Trainer(vilt, run_spec(world, tmp_path, task="vqa", name="vilt"), progress=False)


def test_bf16_names_the_key_on_a_gpu_without_it_and_warns_on_a_cpu_that_emulates_it(monkeypatch):
    from student.placement import check_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "an old GPU")
    with pytest.raises(RuntimeError, match=r"train\.precision=bf16: an old GPU has no bfloat16"):
        check_bf16(torch.device("cuda"))
    for isa in ("amx_tile", "avx512_bf16"):
        monkeypatch.setattr(torch.cpu, f"_is_{isa}_supported", lambda: False, raising=False)
    with pytest.warns(RuntimeWarning, match=r"train\.precision=bf16: .*emulated"):
        check_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_bf16(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_match_cpu_steps(world, tmp_path):
    logs = {}
    for device in ("cpu", "cuda"):
        tr = Trainer(student_params(world, **{"train.device": device}), run_spec(world, tmp_path, name=device),
                     progress=False)  # fmt: skip
        assert next(tr.student.parameters()).device.type == device
        stream = tr.batches()
        logs[device] = [tr.train_step(next(stream), None) for _ in range(3)]
    for c, g in zip(logs["cpu"], logs["cuda"], strict=True):
        assert g["loss"] == pytest.approx(c["loss"], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("task", ["vqa", "vcr"])
@pytest.mark.parametrize("method", ["clip_td", "clip_td_no_weight"])
def test_teacher_batch_reads_candidate_texts_pooled_only(world, tmp_path, task, method):
    """A batch reads its distill texts' tokens, and the candidate texts only for the §5 weights and only their
    pooled embeddings; the weights come out as computed by hand from the plain store reader."""
    from student.losses import confidence_weights
    from student.targets import teacher_batch

    tr = Trainer(student_params(world), run_spec(world, tmp_path, task=task, method=method), progress=False)
    calls = []
    source = tr.source

    class Spy:
        grid, logit_scale = source.grid, source.logit_scale

        def images(self, *a, **k):
            return source.images(*a, **k)

        def texts(self, texts, tokens=True):
            calls.append((list(texts), tokens))
            return source.texts(texts, tokens=tokens)

    batch = next(tr.batches())
    tb, w = teacher_batch(batch, Spy(), tr.cfg, task)
    distill = [t.distill for t in batch.teacher_texts]
    cands = [c for t in batch.teacher_texts for c in t.candidates + t.rationale_candidates]
    weighted = method == "clip_td"
    assert calls == [(distill, True)] + ([(cands, False)] if weighted else [])
    plain = source.cache.text_targets(distill + cands)
    b = len(distill)
    assert torch.equal(tb["txt_pooled"], plain["pooled"][:b]) and torch.equal(
        tb["txt_lengths"], plain["lengths"][:b]
    )
    for i, t in enumerate(plain["tokens"][:b]):
        assert torch.equal(tb["txt_tokens"][i, : len(t)], t) and not tb["txt_tokens"][i, len(t) :].any()
    if not weighted:
        assert torch.equal(w, torch.ones(b))
        return
    k = len(batch.teacher_texts[0].candidates)
    img = source.cache.image_targets(batch.image_ids)["pooled"]
    clip = tr.cfg.weight_clip

    def conf(cand, gold, mask=None):
        return confidence_weights(
            img, source.logit_scale, cand=cand, gold=torch.tensor(gold), cand_mask=mask, clip=clip
        )

    if task == "vqa":
        # Distractors of the question's type: a yes/no question has 2 candidates, a colour question 4.
        counts = [len(t.candidates) for t in batch.teacher_texts]
        assert len(set(counts)) > 1, counts
        pooled = torch.zeros(b, max(counts), plain["pooled"].shape[-1])
        mask = torch.zeros(b, max(counts), dtype=torch.bool)
        rows = iter(plain["pooled"][b:])
        for n, c in enumerate(counts):
            for j in range(c):
                pooled[n, j], mask[n, j] = next(rows), True
        want = conf(pooled, [t.gold for t in batch.teacher_texts], mask)
        torch.testing.assert_close(w, want, rtol=0, atol=0)
        return
    pooled = plain["pooled"][b:].view(b, -1, plain["pooled"].shape[-1])
    want = conf(pooled[:, :k], [t.gold for t in batch.teacher_texts])
    if task == "vcr":
        want = 0.5 * (want + conf(pooled[:, k:], [t.rationale_gold for t in batch.teacher_texts]))
    torch.testing.assert_close(w, want, rtol=0, atol=0)


def test_chunked_order_is_chunk_local_and_the_same_for_every_method(tmp_path):
    """train.order=chunked: every method (the baseline reads no targets but orders by the same store) sees the
    same batches, and a window of order_window chunks is used up before the next begins."""
    world = build_world(tmp_path / "w", target_chunk_bytes=8 << 10)  # 8 image rows per inner chunk
    params = student_params(
        world, **{"train.order": "chunked", "train.order_window": 1, "train.batch_size": 4}
    )
    trs = {
        m: Trainer(params, run_spec(world, tmp_path, method=m, name=m), progress=False)
        for m in ("baseline", "clip_td")
    }
    streams = {m: tr.batches() for m, tr in trs.items()}
    tr = trs["clip_td"]
    group_of = tr.order_groups
    n = len(tr.split.train)
    keys, groups = [], []
    for _ in range(-(-n // 4)):
        b = {m: next(s) for m, s in streams.items()}
        assert [i.key for i in b["baseline"].instances] == [i.key for i in b["clip_td"].instances]
        keys += [i.key for i in b["clip_td"].instances]
        groups += [group_of[i] for i in b["clip_td"].image_ids]
    first_epoch = groups[:n]
    assert len(set(keys[:n])) == n  # each training instance once in the first epoch
    # window 1: each chunk's instances come as one run, so the chunk sequence changes exactly once per chunk
    changes = sum(a != b for a, b in zip(first_epoch, first_epoch[1:], strict=False))
    assert changes == len(set(first_epoch)) - 1 > 0
    random = Trainer(student_params(world), run_spec(world, tmp_path, name="random"), progress=False)
    assert random.order_groups is None
    assert [i.key for i in next(random.batches()).instances] != keys[:8]


def test_chunked_order_without_a_cache_is_refused(world, tmp_path):
    root, _, _ = world
    run = RunSpec("snli_ve", "lowshot-0.5", "baseline", 0, str(root / "shards"), "", str(tmp_path / "r"))
    with pytest.raises(ValueError, match="train.order=chunked.*no cache"):
        Trainer(student_params(world, **{"train.order": "chunked"}), run, progress=False)


def test_blind_runs_never_see_an_image_in_training_or_evaluation(world, tmp_path, monkeypatch):
    """The `blind` floor: the same student and budget with the image blanked, in training and in evaluation."""
    import student.data as data
    from stages.evaluate import evaluate_run

    def no_image(*a, **k):
        raise AssertionError("a blind run decoded an image")

    monkeypatch.setattr(data, "image_tensor", no_image)
    params = student_params(world, **{"train.steps": 2, "train.eval_every": 2})
    run_student(params, run_spec(world, tmp_path, task="vqa", method="blind"), progress=False)
    result = evaluate_run(tmp_path / "run", params)
    assert result["run"]["method"] == "blind" and result["metrics"]["n"] > 0
    # The baseline on the same data does decode images: the patch above is what the blind run avoided.
    with pytest.raises(AssertionError, match="decoded an image"):
        run_student(
            params, run_spec(world, tmp_path, task="vqa", method="baseline", name="b"), progress=False
        )


def test_a_shift_student_is_scored_on_the_domain_it_was_held_out_from(world, tmp_path):
    """evaluate reads the shift target from the export, not from its own params: a params file edited after
    training (or another one) must not score the student on a domain it trained on."""
    from stages.evaluate import evaluate_run

    params = student_params(world, **{"train.steps": 2, "train.eval_every": 2})
    run_student(params, run_spec(world, tmp_path, task="snli_ve", condition="shift"), progress=False)
    as_trained = evaluate_run(tmp_path / "run", params)
    assert as_trained["protocol"] == {"shift_key": "domain", "shift_target_domain": "outline"}
    other = student_params(world, **{"train.steps": 2, "protocol.shift_target_domain": "plain"})
    assert evaluate_run(tmp_path / "run", other) == as_trained
    # An export from before the target was recorded is scored with the params given (what evaluate did).
    exported = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    del exported["protocol"]
    torch.save(exported, tmp_path / "run" / "student.pt")
    old = evaluate_run(tmp_path / "run", other)
    assert old["protocol"]["shift_target_domain"] == "plain"
    assert set(old["metrics"]["per_domain"]) == {"plain"}
    assert set(as_trained["metrics"]["per_domain"]) == {"outline"}


def test_a_folder_that_is_not_this_runs_is_refused_untouched(world, tmp_path):
    """--out holding a user's files, or another run's exported student, is refused before anything is written;
    the run's own folder is taken again (a rerun of the same cell)."""
    params = student_params(world)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (user / "train.json").write_text('{"mine": 1}')
    with pytest.raises(RunSetupError, match=r"user: holds notes\.txt, which no training run writes"):
        run_student(params, run_spec(world, user, name=""), progress=False)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "train.json"]
    assert (user / "train.json").read_text() == '{"mine": 1}'

    backbone = tmp_path / "backbone"
    backbone.mkdir()
    torch.save({"weights": torch.zeros(2)}, backbone / "student.pt")
    before = (backbone / "student.pt").read_bytes()
    with pytest.raises(RunSetupError, match="student.pt is not an exported student of run"):
        run_student(params, run_spec(world, backbone, name=""), progress=False)
    assert (backbone / "student.pt").read_bytes() == before and len(list(backbone.iterdir())) == 1

    done = run_spec(world, tmp_path, name="done")
    run_student(params, done, progress=False, resume=False)
    (tmp_path / "done" / "checkpoint.pt").unlink()  # as a finished study cell leaves it
    other = RunSpec(
        done.task, done.condition, done.method, done.seed + 1, done.data_root, done.cache, done.out
    )
    with pytest.raises(RunSetupError, match=f"not an exported student of run {other.name}"):
        run_student(params, other, progress=False, resume=False)
    run_student(params, done, progress=False, resume=False)  # its own folder: trained again


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_finite_check_names_the_first_bad_row_and_passes_huge_finite_rows(dtype):
    """The targets' NaN/Inf check decides by row sums first: a row with NaN, +Inf or -Inf anywhere is still the
    one named, and finite rows whose float32 sum overflows are not taken for non-finite."""
    from student.targets import _first_nonfinite

    x = torch.randn(6, 7, 5).to(dtype)
    assert _first_nonfinite(x) is None
    for row, bad in ((4, float("nan")), (2, float("inf")), (1, float("-inf"))):
        y = x.clone()
        y[row, 3, 2] = bad
        y[5, 6, 4] = bad  # a later row too: the first is named
        assert _first_nonfinite(y) == row
    both = x.clone()
    both[3, 0, 0], both[3, 0, 1] = float("inf"), float("-inf")  # their sum is NaN, not a cancellation
    assert _first_nonfinite(both) == 3
    if dtype == torch.float32:
        huge = torch.full((2, 4), 3e38)  # finite, but a float32 sum of a row overflows to Inf
        assert _first_nonfinite(huge) is None


def _count_device_reads(monkeypatch) -> Counter:
    """How often Python reads a tensor's value back (on a GPU each read waits for the queued work)."""
    counts: Counter = Counter()
    for name in ("__bool__", "__float__", "__int__", "item", "tolist", "nonzero"):
        real = getattr(torch.Tensor, name)

        def read(self, *a, _real=real, _name=name, **k):
            counts[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counts


@pytest.mark.parametrize(("method", "most"), [("baseline", 3), ("clip_td", 7)])
def test_a_step_reads_few_values_back_from_the_device(world, tmp_path, monkeypatch, method, most):
    """A GPU step is only as fast as its host round trips: the finite checks are read together and the logged
    values in one transfer (reading each on its own was 9 reads a baseline step and 25 a clip_td step). What
    stays: the text cut at the batch's longest text, clip_td's selected tokens and its two shape checks."""
    tr = Trainer(student_params(world), run_spec(world, tmp_path, method=method), progress=False)
    stream = tr.batches()
    tr.train_step(next(stream), None)  # first-step work (optimizer state) is not the steady state
    batch = next(stream)
    targets = tr.targets(batch, None)  # the prefetch thread's part, off the step
    counts = _count_device_reads(monkeypatch)
    logs = tr.train_step(batch, None, targets)
    assert sum(counts.values()) <= most, dict(counts)
    assert all(isinstance(v, float) for v in logs.values()) and logs["loss"] == logs["total"]


def test_a_nonfinite_kd_term_is_named_and_changes_no_weight(world, tmp_path):
    """The step's finite checks are made together, after the backward pass, but still before the update: the
    error names the first bad term as an immediate check would, and no parameter or optimizer state moves."""
    tr = Trainer(student_params(world), run_spec(world, tmp_path, method="clip_td"), progress=False)
    stream = tr.batches()
    tr.train_step(next(stream), None)
    before = [p.detach().clone() for p in tr.params_list]
    opt_steps = {int(s["step"]) for s in tr.opt.state_dict()["state"].values()}
    batch = next(stream)
    tb, weights = tr.targets(batch, None)
    tb["img_target"][0] = float("nan")  # one instance's teacher image tokens
    with pytest.raises(FloatingPointError, match="loss term 'kd_per_instance' is not finite"):
        tr.train_step(batch, None, (tb, weights))
    assert all(torch.equal(a, p) for a, p in zip(before, tr.params_list, strict=True))
    assert {int(s["step"]) for s in tr.opt.state_dict()["state"].values()} == opt_steps


def test_evaluation_batches_are_kept_for_the_next_pass_within_their_budget(world, tmp_path, monkeypatch):
    """A run's validations (and an evaluate process's runs of one test split) encode the instances once: later
    passes score the same from memory. Passes over the budget are streamed; the oldest pass makes room."""
    import student.evaluation as E

    tr = Trainer(student_params(world), run_spec(world, tmp_path, task="vcr"), progress=False)
    ds, keys = tr.val_ds or tr.train_ds, tr.split.val
    reads, real = [], E.eval_batches
    monkeypatch.setattr(E, "eval_batches", lambda *a, **k: (reads.append(1), real(*a, **k))[1])
    plain = E.evaluate(tr.student, tr.heads, ds, keys, tr.spec)

    def passes(cache: E.BatchCache, keys, n: int) -> list[dict]:
        return [E.evaluate(tr.student, tr.heads, ds, keys, tr.spec, batches=cache.batches(ds, keys, tr.spec, 8, "t"))
                for _ in range(n)]  # fmt: skip

    cache = E.BatchCache()
    assert (
        passes(cache, keys, 3) == [plain] * 3 and len(reads) == 2
    )  # the plain pass, then one read for three
    (size,) = [n for _, n in cache.kept.values()]
    assert passes(E.BatchCache(max_bytes=size - 1), keys, 2) == [plain] * 2 and len(reads) == 4  # streamed
    one = E.BatchCache(max_bytes=size)
    passes(one, keys, 1)
    passes(one, keys[: len(keys) // 2], 1)
    assert [k[1] for k in one.kept] == [tuple(keys[: len(keys) // 2])]


def _install_plugin(tmp_path, monkeypatch, module: str, source: str, entry_points: str) -> None:
    """What ``pip install`` of a package leaves on sys.path: its module and a dist-info folder naming its
    entry points (importlib.metadata finds both)."""
    import student.model as M

    site = tmp_path / "site"
    (site / f"{module}-0.1.dist-info").mkdir(parents=True)
    (site / f"{module}.py").write_text(source)
    (site / f"{module}-0.1.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n"
    )
    (site / f"{module}-0.1.dist-info" / "entry_points.txt").write_text(entry_points)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(M, "_STUDENTS", dict(M._STUDENTS))  # what the plugin registers goes with the test


def test_an_installed_plugin_student_pretrains_distils_and_evaluates_by_name(world, tmp_path, monkeypatch):
    """docs/training.md's example plugin, installed as a package would be: ``student.arch`` names its entry
    point; the student pretraining builds its backbone, clip_td distils into it from there, and evaluate
    rebuilds it from the export by that name alone."""
    from pipeline.config import SyntheticParams
    from pipeline.data import synthetic
    from pipeline.data.shards import DatasetWriter
    from stages.evaluate import evaluate_run
    from student.pretrain import pretrain_student

    # The page's pyproject entry, as pip writes it into the dist-info.
    assert 'late_fusion = "my_students:LateFusion"' in (REPO / "docs" / "training.md").read_text()
    entry = "[clip_td.students]\nlate_fusion = my_students:LateFusion\n"
    _install_plugin(
        tmp_path, monkeypatch, "my_students", docs_python_block("training.md", "Your own student"), entry
    )
    root, teacher_cfg, _ = world
    sp = SyntheticParams(seed=0, image_size=32, caption_scenes=20)
    with DatasetWriter(tmp_path / "captions", source="synthetic", split="captions", shard_size=50) as w:
        synthetic.generate("captions", sp, w)
    params = student_params(
        world, **{"student.arch": "late_fusion", "student.init": "pretrained", "student.pretrained":
                  tmp_path / "pre" / "student.pt", "train.steps": 2, "train.eval_every": 2},
    )  # fmt: skip
    pretrain_student(
        params.student, str(teacher_cfg), tmp_path / "captions", None, tmp_path / "pre", steps=2, batch_size=8,
        lr=1e-3, weight_decay=0.0, warmup=1, pairs_limit=16, seed=0, progress=False,
    )  # fmt: skip
    for task in ("snli_ve", "vcr"):  # VCR: each image read with several texts
        run = run_spec(world, tmp_path, task=task, method="clip_td", name=task)
        logs = run_student(params, run, progress=False)["final"]
        assert logs["kd_img"] > 0 and logs["kd_txt"] > 0  # the teacher's tokens reached both kinds of token
        trained = torch.load(Path(run.out) / "student.pt", weights_only=True)
        assert trained["student_params"]["arch"] == "late_fusion"
        assert trained["student"]["token_ids"].numel() < 100  # the compact vocabulary came with it
        result = evaluate_run(Path(run.out), params)
        assert result["run"]["method"] == "clip_td" and result["metrics"]["n"] > 0


def test_a_plugin_that_fails_to_load_or_is_not_installed_is_named(tmp_path, monkeypatch):
    from pipeline.config import StudentParams
    from student.model import StudentParamsError, create_student, list_students

    _install_plugin(
        tmp_path, monkeypatch, "broken_students", "raise ImportError('needs a package that is missing')\n",
        "[clip_td.students]\nbroken = broken_students:Student\n",
    )  # fmt: skip
    assert "broken" in list_students()
    with pytest.raises(
        StudentParamsError, match=r"'broken'.*broken_students:Student.*package broken_students.*missing"
    ):
        create_student("broken", StudentParams())
    with pytest.raises(
        StudentParamsError,
        match=r"unknown student.arch 'nope' \(available: broken, film, .*vilt; .*group clip_td.students",
    ):
        create_student("nope", StudentParams())


@pytest.mark.parametrize("task", ["vqa", "snli_ve"])
def test_the_own_loop_recipe_gives_the_trainers_loss(world, tmp_path, task):
    """docs/training.md's 'Your own training loop' block, run on a trainer's batch: the same total loss and
    parts as the trainer's own clip_td_no_weight step (the recipe weights every instance alike)."""
    from student.losses import distill_loss
    from student.train import forward_task

    source = docs_python_block("training.md", "Your own training loop")
    _, _, store = world
    tr = Trainer(
        student_params(world),
        run_spec(world, tmp_path, task=task, method="clip_td_no_weight"),
        progress=False,
    )
    try:
        ns = {"student": tr.student}
        exec(source.replace('"artifacts/cache/teacher.zarr"', repr(store)), ns)
        assert ns["heads"].h_v.weight.shape == tr.dheads.h_v.weight.shape
        ns["heads"].load_state_dict(tr.dheads.state_dict())
        batch = next(tr.batches())
        l_task, out = forward_task(tr.student, tr.heads, task, batch)
        want, want_parts = distill_loss(
            out, tr.dheads, *tr.targets(batch, None), l_task, 5, 20, tr.cfg, tr.source.grid
        )
        got, parts = ns["clip_td_total"](out, l_task, batch.instances, 5, 20)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert parts.keys() == want_parts.keys() and float(parts["kd_txt"]) > 0
        for k, v in want_parts.items():
            torch.testing.assert_close(parts[k], v, rtol=1e-6, atol=1e-8, msg=k)
        got.backward()
        heads = ns["heads"]  # h_p serves pooled_fd only
        assert all(p.grad is not None for h in (heads.h_v, heads.h_t) for p in h.parameters())
        assert all(p.grad is not None for p in tr.student.parameters() if p.requires_grad)
    finally:
        tr.close()


def test_a_kd_only_pool_smaller_than_its_batch_still_trains(world, tmp_path):
    # clip_td_unlabeled drew only whole KD-only batches: with fewer dropped images than one, none came and
    # training stopped on a bare StopIteration.
    run = run_spec(world, tmp_path, task="vqa", method="clip_td_unlabeled", condition="lowshot-0.8")
    tr = Trainer(student_params(world, **{"train.batch_size": 64, "train.steps": 2}), run, progress=False)
    pool = tr.split.summary()["unlabeled_images"]
    assert 0 < pool < tr.batch_size // 2, pool
    try:
        tr.fit(resume=False)
    finally:
        tr.close()
    assert tr.step == 2


def test_a_non_square_image_shows_the_student_the_square_the_teacher_sees():
    """open_clip's eval transform keeps the centre square of an image; the student squashed the whole image,
    so on real (non-square) images the teacher tokens it distils covered other content than its own."""
    import io

    from PIL import Image

    from student.data import CLIP_MEAN, CLIP_STD, image_tensor

    def green_pixels(size, band) -> int:
        img = Image.new("RGB", size, (200, 30, 30))
        img.paste((30, 200, 30), band)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        x = image_tensor(buf.getvalue(), 32) * torch.tensor(CLIP_STD).view(3, 1, 1)
        x = x + torch.tensor(CLIP_MEAN).view(3, 1, 1)
        return int(((x - torch.tensor([30, 200, 30]).view(3, 1, 1) / 255.0).abs().amax(0) < 0.1).sum())

    assert green_pixels((128, 64), (0, 0, 32, 64)) == 0  # a left band outside the centre square: cut
    assert green_pixels((64, 128), (0, 96, 64, 128)) == 0  # a bottom band: cut
    assert green_pixels((64, 64), (0, 0, 16, 64)) > 0  # a square image is shown whole, as before


def test_a_non_square_image_is_cut_as_the_teachers_resize_mode_says():
    """Squashing weights (DFN, CLIPA) see the whole image; padding ones ("longest") see it whole with black
    above and below: the student is shown the same region."""
    import io

    from PIL import Image

    from student.data import CLIP_MEAN, CLIP_STD, image_tensor

    img = Image.new("RGB", (128, 64), (200, 30, 30))
    img.paste((30, 200, 30), (0, 0, 32, 64))  # a left band outside the centre square
    buf = io.BytesIO()
    img.save(buf, "PNG")
    std, mean = torch.tensor(CLIP_STD).view(3, 1, 1), torch.tensor(CLIP_MEAN).view(3, 1, 1)
    shown = {
        m: image_tensor(buf.getvalue(), 32, resize_mode=m) * std + mean
        for m in ("shortest", "squash", "longest")
    }
    green = torch.tensor([30, 200, 30]).view(3, 1, 1) / 255.0
    assert int(((shown["shortest"] - green).abs().amax(0) < 0.1).sum()) == 0
    assert int(((shown["squash"] - green).abs().amax(0) < 0.1).sum()) > 0
    pad = shown["longest"]
    assert pad[:, :6].abs().amax() < 0.02 and pad[:, -6:].abs().amax() < 0.02  # black above and below
    assert int(((pad - green).abs().amax(0) < 0.1).sum()) > 0


def test_every_method_is_shown_the_stores_resize_mode_and_the_export_keeps_it(world, tmp_path):
    """The baseline reads no targets, yet must see the pixels clip_td sees: every method takes the region
    from the store's teacher record, and evaluate and predict take it from the export."""
    import json

    from pipeline.config import DistillParams
    from student.evaluation import export_spec, load_student
    from student.sources import teacher_resize_mode

    def store(name: str, mode: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        attrs = {"teacher": {"preprocess": {"resize_mode": mode}}}
        doc = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        (folder / "zarr.json").write_text(json.dumps(doc))
        return folder

    squash = store("squash.zarr", "squash")
    params = student_params(world, **{"train.steps": 1, "train.eval_every": 1})
    root = str(world[0] / "shards")
    run_student(
        params, RunSpec("snli_ve", "lowshot-0.5", "baseline", 0, root, str(squash), str(tmp_path / "r"))
    )
    exported, _, _ = load_student(tmp_path / "r" / "student.pt")
    assert exported["image_resize_mode"] == "squash"
    assert export_spec(exported, tmp_path / "r" / "student.pt", DistillParams()).resize_mode == "squash"
    # No store: the teacher's configs say (a pretrained tag's, read without its weights), for every method.
    no_store = SimpleNamespace(cache=str(tmp_path / "none"))
    assert teacher_resize_mode(params, no_store, None) == "shortest"  # a checkpoint file: open_clip's default
    dfn = dataclasses.replace(
        params, teacher=dataclasses.replace(params.teacher, model="ViT-H-14-quickgelu", pretrained="dfn5b")
    )
    assert teacher_resize_mode(dfn, no_store, None) == "squash"
    gone = dataclasses.replace(
        params, teacher=dataclasses.replace(params.teacher, pretrained=str(tmp_path / "x.pt"))
    )
    assert teacher_resize_mode(gone, no_store, None) == "shortest"  # a baseline needs no teacher file
    # An online teacher must agree with what the methods that read no targets are shown.
    online = OnlineTargets.__new__(OnlineTargets)
    online.teacher = SimpleNamespace(resize_mode="shortest")
    with pytest.raises(
        RunSetupError, match="squash.zarr: teacher.preprocess.resize_mode is 'squash' but the online"
    ):
        teacher_resize_mode(params, SimpleNamespace(cache=str(squash)), online)
    assert teacher_resize_mode(params, no_store, online) == "shortest"
    bogus = store("bogus.zarr", "stretch")
    with pytest.raises(RunSetupError, match="bogus.zarr: teacher.preprocess.resize_mode='stretch'"):
        teacher_resize_mode(params, SimpleNamespace(cache=str(bogus)), None)


def test_a_resume_is_refused_when_the_image_region_changed_and_eval_batches_are_kept_per_region(
    world, monkeypatch
):
    from student import evaluation as E
    from student.checkpoint import identity_differences
    from student.data import TaskSpec

    base = {"task": "vqa"}
    assert identity_differences(base, {**base, "resize_mode": "shortest"}) == []  # absent is the default
    assert identity_differences(base, {**base, "resize_mode": "squash"}) == [
        "resize_mode (shortest → squash)"
    ]
    encoded = []

    def eval_batches(ds, keys, spec, batch_size):  # one batch, tagged with the region it was cut with
        encoded.append(spec.resize_mode)
        t = torch.zeros(1)
        yield SimpleNamespace(pixels=t, text_ids=t, target=t, mode=spec.resize_mode)

    monkeypatch.setattr(E, "eval_batches", eval_batches)
    cache = E.BatchCache()
    ds = SimpleNamespace(path=Path("ds"))
    for mode in ("shortest", "squash", "shortest"):
        spec = TaskSpec("vqa", None, 32, 16, resize_mode=mode)
        assert [b.mode for b in cache.batches(ds, ["a"], spec, 4, "tok")] == [mode]
    assert encoded == ["shortest", "squash"]  # the third pass read what the first kept


@pytest.mark.parametrize("method", ["clip_td", "clip_td_no_weight"])
def test_an_image_the_cache_marks_invalid_is_not_distilled(world, tmp_path, method):
    """With cache.on_error=skip, an image whose teacher output was not finite is stored as zeros with
    image/valid = 0: its instance was distilled toward zeros with a nonzero weight, silently. Its KD weight is
    0 now (labelled and KD-only alike), with a warning; the other instances keep theirs."""
    from student.targets import teacher_batch, unlabeled_teacher_batch

    tr = Trainer(student_params(world), run_spec(world, tmp_path, method=method), progress=False)
    source = tr.source

    class FirstInvalid:
        grid, logit_scale = source.grid, source.logit_scale

        def images(self, *a, **k):
            out = source.images(*a, **k)
            out["valid"] = out["valid"].clone()
            out["valid"][0] = False
            out["pooled"][0] = 0.0
            out["tokens"][0] = 0.0
            return out

        def texts(self, *a, **k):
            return source.texts(*a, **k)

    batch = next(tr.batches())
    _, good = teacher_batch(batch, source, tr.cfg, "snli_ve")
    with pytest.warns(UserWarning, match="no teacher targets"):
        _, w = teacher_batch(batch, FirstInvalid(), tr.cfg, "snli_ve")
    assert w[0] == 0 and (w[1:] > 0).all()
    if method == "clip_td_no_weight":
        assert torch.equal(w[1:], good[1:])
    with pytest.warns(UserWarning, match="no teacher targets"):
        _, uw = unlabeled_teacher_batch(batch.image_ids[:3], FirstInvalid(), tr.cfg)
    assert uw.tolist() == [0.0, 1.0, 1.0]


def test_more_loader_workers_than_training_instances_is_refused_not_a_hang(world):
    """A worker whose share of the epoch is empty yielded nothing, and the DataLoader waited on it forever
    (a tiny low-shot subset with train.num_workers above its size; the stuck worker outlived the run)."""
    from pipeline.data.shards import PreparedDataset
    from student.data import train_loader

    root, _, _ = world
    ds = PreparedDataset(root / "shards" / "train")
    two = [i for i in ds.iter_instances() if i.task == "snli_ve"][:2]
    with pytest.raises(ValueError, match=r"train.num_workers=3 exceeds this rank's 2 training instances"):
        next(train_loader(ds, [i.key for i in two], None, batch_size=2, seed=0, num_workers=3, instances=two))


def test_ddp_ranks_get_equal_shares_that_cover_every_instance(monkeypatch):
    """Ranks step together: with 9 instances on 8 ranks, a rank holding one instance fewer cycled its share
    twice as fast and drew those instances twice as often. Shares are padded by wrapping round instead."""
    from types import SimpleNamespace

    import student.data as D

    insts = [SimpleNamespace(key=f"k{i}", image_id=f"img{i}") for i in range(9)]
    shares = []
    for rank in range(8):
        monkeypatch.setattr(D, "node_info", lambda rank=rank: (rank, 8))
        shares.append([i.key for i in D._Selected(SimpleNamespace(path="train"), insts, seed=0).instances])
    assert {len(s) for s in shares} == {2} and {k for s in shares for k in s} == {f"k{i}" for i in range(9)}
    monkeypatch.setattr(D, "node_info", lambda: (0, 1))
    assert [i.key for i in D._Selected(SimpleNamespace(path="train"), insts, seed=0).instances] == sorted(
        i.key for i in insts
    )  # one process: every instance once, in key order, as before
