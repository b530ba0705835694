"""Student pretraining (ITM + MLM on captions): batches that cannot be solved from the text alone, a backbone
that loads into a student run exactly, and refusals that name what is wrong."""

from __future__ import annotations

import pickle
from dataclasses import asdict

import pytest
import torch

from pipeline.config import StudentParams, SyntheticParams
from pipeline.data import synthetic
from pipeline.data.shards import DatasetWriter
from student.data import load_tokenizer
from student.model import create_student, fit_text
from student.pretrain import (
    FORMAT,
    HARD_NEGATIVE,
    MASK_ID,
    MATCH,
    OTHER_CAPTION,
    PretrainedMismatch,
    load_pairs,
    load_pretrained_backbone,
    make_batch,
    pretrain_student,
)

TEACHER = "pipeline/model_configs/clip-td-tiny.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    sp = SyntheticParams(seed=0, image_size=32, caption_scenes=40)
    for split in ("captions", "captions_val"):
        with DatasetWriter(
            root / split, source="synthetic", split=split, shard_size=50, image_shard_size=50
        ) as w:
            synthetic.generate(split, sp, w)
    return root


def _sp(**over) -> StudentParams:
    base = dict(width=32, layers=1, heads=2, image_size=32, patch_size=8, max_text_len=24, dropout=0.0)
    return StudentParams(**{**base, **over})


def test_batches_mix_matches_and_mismatches_and_mask_only_inner_tokens(corpus):
    sp = _sp()
    pairs = load_pairs(corpus / "captions", sp, load_tokenizer(TEACHER))
    student = create_student(sp.arch, sp)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(len(pairs))
    batch = make_batch(pairs, idx, gen, student.eot_id, sp.max_text_len)
    assert batch.pixels.shape == (len(pairs), 3, 32, 32)
    assert 0.25 < batch.itm.float().mean() < 0.75  # about half the captions are replaced
    assert torch.equal(batch.itm == 1, batch.kind == MATCH)
    assert (batch.kind == HARD_NEGATIVE).any() and (batch.kind == OTHER_CAPTION).any()
    # A mismatched caption is never a caption of the instance's own image.
    own = {}
    for n in range(len(pairs)):
        own.setdefault(int(pairs.inst_image[n]), set()).add(tuple(pairs.ids[n][: sp.max_text_len].tolist()))
    for n in torch.nonzero(batch.itm == 0).flatten().tolist():
        assert tuple(batch.ids[n].tolist()) not in own[int(pairs.inst_image[n])]
    # MLM reads the matching rows' own captions, masked, never at SOT (position 0) or EOT.
    assert torch.equal(batch.mlm_rows, torch.nonzero(batch.itm == 1).flatten())
    chosen = batch.mlm >= 0
    assert chosen.any() and not chosen[:, 0].any() and not (batch.mlm == student.eot_id).any()
    assert torch.equal(batch.mlm_ids[chosen], torch.full_like(batch.mlm[chosen], MASK_ID))
    mlm_text = torch.where(chosen, batch.mlm, batch.mlm_ids)
    assert torch.equal(mlm_text, batch.ids[batch.mlm_rows])


def test_a_corpus_with_no_other_image_is_refused_not_an_endless_loop(corpus):
    """An "other caption" negative needs another image with another text: with one image, drawing one looped
    forever (a tiny student.pretrain.pairs or --val)."""
    import dataclasses

    sp = _sp()
    pairs = load_pairs(corpus / "captions", sp, load_tokenizer(TEACHER))
    one = dataclasses.replace(
        pairs, inst_image=torch.zeros_like(pairs.inst_image), negatives=[[] for _ in range(len(pairs))]
    )
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="needs at least two images with different captions"):
        make_batch(one, torch.arange(len(one)), gen, create_student(sp.arch, sp).eot_id, sp.max_text_len)


def test_the_itm_head_reads_unmasked_captions_so_a_mask_cannot_tell_a_match(corpus):
    # The head once read the MLM copy, where only matches carried a mask: "a mask => match" solved ITM blind.
    sp = _sp()
    pairs = load_pairs(corpus / "captions", sp, load_tokenizer(TEACHER))
    student = create_student(sp.arch, sp)
    batch = make_batch(pairs, torch.arange(len(pairs)), torch.Generator().manual_seed(1), student.eot_id, 24)
    _, text = fit_text(batch.ids, sp.max_text_len, student.eot_id)
    assert not ((batch.ids == MASK_ID) & text).any()
    assert (batch.mlm >= 0).any()  # the MLM copy is masked


def test_pretrained_backbone_loads_exactly_and_trains_the_itm_signal(corpus, tmp_path):
    sp = _sp()
    m = pretrain_student(
        sp, TEACHER, corpus / "captions", corpus / "captions_val", tmp_path / "out",
        steps=6, batch_size=16, lr=1e-3, weight_decay=0.0, warmup=2, pairs_limit=30, seed=0,
        metrics_path=tmp_path / "m.json", progress=False,
    )  # fmt: skip
    assert m["pairs"] == 30 and m["steps"] == 6 and 0.0 <= m["val"]["itm_acc"] <= 1.0
    for kind in ("match", "hard_negative", "other_caption"):  # per kind: only the image tells a hard negative
        assert 0.0 <= m["val"][f"itm_acc_{kind}"] <= 1.0
    saved = torch.load(tmp_path / "out" / "student.pt", weights_only=True)
    student = create_student(sp.arch, sp)
    meta = load_pretrained_backbone(student, tmp_path / "out" / "student.pt", sp)
    assert meta["steps"] == 6
    for k, v in student.state_dict().items():
        assert torch.equal(v, saved["student"][k]), k


def _one_step_backbone(corpus, sp: StudentParams, out) -> None:
    pretrain_student(
        sp, TEACHER, corpus / "captions", None, out, steps=1, batch_size=4, lr=1e-3,
        weight_decay=0.0, warmup=1, pairs_limit=8, seed=0, progress=False,
    )  # fmt: skip


def test_a_nonfinite_pretraining_loss_stops_before_the_update_and_writes_nothing(
    corpus, tmp_path, monkeypatch
):
    import student.pretrain as P

    real, calls = P.losses, {"n": 0}

    def losses(*a, **k):
        logs = real(*a, **k)
        calls["n"] += 1
        return {**logs, "loss": logs["loss"] * float("nan")} if calls["n"] == 2 else logs

    monkeypatch.setattr(P, "losses", losses)
    steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(itm [0-9.]+, mlm [0-9.]+\)"):
        pretrain_student(
            _sp(), TEACHER, corpus / "captions", None, tmp_path / "out", steps=3, batch_size=4, lr=1e-3,
            weight_decay=0.0, warmup=1, pairs_limit=8, seed=0, progress=False,
        )  # fmt: skip
    assert steps == [1] and not (tmp_path / "out").exists()  # step 0 updated, step 1 did not; no backbone


def test_a_failed_backbone_write_keeps_the_previous_backbone_and_leaves_no_temporary(
    corpus, tmp_path, monkeypatch
):
    _one_step_backbone(corpus, _sp(), tmp_path / "out")
    before = (tmp_path / "out" / "student.pt").read_bytes()
    real = torch.save

    def disk_full(obj, f, *a, **k):
        real(obj, f, *a, **k)  # half a file: the write gets as far as the disk allows
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _one_step_backbone(corpus, _sp(), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["student.pt"]
    assert (tmp_path / "out" / "student.pt").read_bytes() == before


def test_a_backbone_of_another_shape_is_refused_naming_the_keys(corpus, tmp_path):
    sp = _sp()
    _one_step_backbone(corpus, sp, tmp_path / "out")
    other = _sp(width=64)
    with pytest.raises(PretrainedMismatch, match=r"student\.width.*width=32"):
        load_pretrained_backbone(create_student(other.arch, other), tmp_path / "out" / "student.pt", other)


def test_a_backbone_read_with_another_tokenizer_is_refused(corpus, tmp_path, monkeypatch):
    """Token embeddings are indexed by the tokenizer's ids: a run whose teacher splits texts into other ids than
    the backbone's teacher did would start from rows of other words."""
    import json

    import student.pretrain as pretrain
    from tests.conftest import REPO

    sp = _sp()
    _one_step_backbone(corpus, sp, tmp_path / "out")
    path = tmp_path / "out" / "student.pt"
    # Another config of the same tokenizer (a longer context, as ViT-B-16's 77 against the tiny teacher's) fits.
    longer = json.loads((REPO / TEACHER).read_text())
    longer["text_cfg"]["context_length"] = 77
    (tmp_path / "longer.json").write_text(json.dumps(longer))
    load_pretrained_backbone(create_student(sp.arch, sp), path, sp, str(tmp_path / "longer.json"))
    load_pretrained_backbone(create_student(sp.arch, sp), path, sp, TEACHER)

    real = pretrain.load_tokenizer

    def shifted(model):  # a tokenizer of other ids (offline, no other vocabulary can be fetched)
        tok = real(TEACHER)
        return (lambda texts: tok(texts) + 1) if model == "other-vocab" else real(model)

    monkeypatch.setattr(pretrain, "load_tokenizer", shifted)
    with pytest.raises(
        PretrainedMismatch, match=r"into other ids than this run's teacher\.model='other-vocab'"
    ):
        load_pretrained_backbone(create_student(sp.arch, sp), path, sp, "other-vocab")
    monkeypatch.setattr(pretrain, "load_tokenizer", real)
    ck = torch.load(path, weights_only=True)
    ck["teacher_model"] = str(tmp_path / "gone.json")
    torch.save(ck, path)
    with pytest.raises(PretrainedMismatch, match=r"gone\.json.*does not load here"):
        load_pretrained_backbone(create_student(sp.arch, sp), path, sp, TEACHER)


def test_a_damaged_pretrained_student_is_refused_naming_the_file(corpus, tmp_path):
    sp = _sp()
    _one_step_backbone(corpus, sp, tmp_path / "out")
    path = tmp_path / "out" / "student.pt"
    ck = torch.load(path, weights_only=True)
    first = next(iter(ck["student"]))
    ck["student"][first] = torch.zeros(3)  # a tensor of another shape
    torch.save(ck, path)
    with pytest.raises(
        PretrainedMismatch, match=r"student\.pt: damaged pretrained student, its weights do not fit"
    ):
        load_pretrained_backbone(create_student(sp.arch, sp), path, sp)
    del ck["student_params"]
    torch.save(ck, path)
    with pytest.raises(
        PretrainedMismatch, match=r"student\.pt: damaged pretrained student \(no student_params"
    ):
        load_pretrained_backbone(create_student(sp.arch, sp), path, sp)


def test_a_checkpoint_that_would_run_code_is_refused_unopened(tmp_path):
    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    bad = tmp_path / "student.pt"
    bad.write_bytes(pickle.dumps({"format": Evil()}))
    sp = _sp()
    with pytest.raises(PretrainedMismatch, match="student.pt: refused to load the pretrained student") as e:
        load_pretrained_backbone(create_student(sp.arch, sp), bad, sp)
    assert not ran.exists()
    assert "weights_only" not in str(e.value)  # torch's advice to turn the guard off is not passed on
    with pytest.raises(PretrainedMismatch, match="no pretrained student here"):
        load_pretrained_backbone(create_student(sp.arch, sp), tmp_path / "missing.pt", sp)


def test_a_student_run_starts_from_the_pretrained_backbone(tmp_path):
    from student.errors import RunError
    from student.train import Trainer
    from tests.conftest import build_world, run_spec, student_params

    world = build_world(tmp_path / "w")
    params = student_params(world)
    sp = params.student
    # A backbone no seed would draw: the run must start from exactly these weights.
    backbone = create_student(sp.arch, sp)
    torch.manual_seed(7)
    for p in backbone.parameters():
        torch.nn.init.normal_(p)
    torch.save({"format": FORMAT, "student": backbone.state_dict(), "student_params": asdict(sp), "steps": 1},
               tmp_path / "pre.pt")  # fmt: skip
    pre = student_params(world, **{"student.init": "pretrained", "student.pretrained": tmp_path / "pre.pt"})
    trainer = Trainer(pre, run_spec(world, tmp_path, method="baseline"), progress=False)
    try:
        mine = trainer.student.state_dict()
        for k, v in backbone.state_dict().items():
            if k != "tok_embed.weight":
                assert torch.equal(mine[k], v), k
        # The run's compact vocabulary keeps each of its ids' pretrained rows (the last row is the unknown id's).
        ids = mine["token_ids"]
        assert torch.equal(mine["tok_embed.weight"][:-1], backbone.state_dict()["tok_embed.weight"][ids])
    finally:
        trainer.close()
    missing = student_params(
        world, **{"student.init": "pretrained", "student.pretrained": tmp_path / "none.pt"}
    )
    with pytest.raises(RunError, match="none.pt: no pretrained student here"):
        Trainer(missing, run_spec(world, tmp_path, method="baseline", name="r2"), progress=False)


def test_stage_writes_the_backbone_and_its_metrics(corpus, tmp_path):
    from click.testing import CliRunner

    from stages.pretrain_student import main

    sets = ["student.width=32", "student.layers=1", "student.image_size=32", "student.patch_size=8",
            "student.max_text_len=24", "student.pretrain.steps=2", "student.pretrain.batch_size=4",
            "student.pretrain.warmup=1", "student.pretrain.pairs=10"]  # fmt: skip
    args = ["--captions", str(corpus / "captions"), "--val", str(corpus / "captions_val"),
            "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"), "--quiet"]  # fmt: skip
    res = CliRunner().invoke(main, args + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "student.pt").is_file() and "held-out ITM" in res.output
    res = CliRunner().invoke(main, [*args[:1], str(tmp_path / "nowhere"), *args[2:]])
    assert res.exit_code != 0 and "nowhere" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(
        main, args + ["--set", "teacher.model=ViT-B-3"]
    )  # its tokenizer is the students'
    assert res.exit_code != 0 and "'ViT-B-3'" in res.output and "Traceback" not in res.output


def test_the_itm_probe_scores_every_held_out_pair_once_per_kind_and_sees_no_mask(corpus):
    """benchmarks.itm_probe measures what the ITM head reads (docs/training.md, 'Pretraining'): its split of
    the held-out pairs must cover each pair once, and it finds no mask in what the head reads."""
    from benchmarks.itm_probe import probe
    from student.pretrain import PretrainHeads

    sp = _sp()
    pairs = load_pairs(corpus / "captions_val", sp, load_tokenizer(TEACHER))
    student = create_student(sp.arch, sp)
    r = probe(
        student, PretrainHeads(student.width), pairs, student.eot_id, sp.max_text_len, seed=0, n_batches=2
    )
    n = r["as_evaluated"]["n"]
    assert n > 0 and r["blank_image"]["n"] == n and r["masked_itm_texts"] == 0
    assert r["match"]["n"] + r["hard_negative"]["n"] + r["other_caption"]["n"] == n
    hits = sum(r[k]["accuracy"] * r[k]["n"] for k in ("match", "hard_negative", "other_caption"))
    assert hits == pytest.approx(r["as_evaluated"]["accuracy"] * n, abs=1.5)  # 4 decimals each


def test_the_pretraining_runs_on_student_pretrain_threads(corpus, tmp_path, monkeypatch):
    """torch's CPU results differ in the last bits between 1 and 2 threads: the backbone's pretraining runs on
    the pinned student.pretrain.threads (the stage passes it; 2 in params.yaml), whatever the machine's cores."""
    import student.pretrain as P
    from pipeline.config import Params
    from stages.pretrain_student import main

    assert Params().student.pretrain.threads == 2 == Params().teacher.pretrain.threads
    seen, real = [], P.losses

    def losses(*a, **k):  # what every training step calls
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(P, "losses", losses)
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            seen.clear()
            pretrain_student(
                _sp(), TEACHER, corpus / "captions", None, tmp_path / f"out{threads}", steps=2, batch_size=4,
                lr=1e-3, weight_decay=0.0, warmup=1, pairs_limit=8, seed=0, threads=threads, progress=False,
            )  # fmt: skip
            assert seen == [threads, threads]
        torch.set_num_threads(3)
        seen.clear()
        pretrain_student(
            _sp(), TEACHER, corpus / "captions", None, tmp_path / "out0", steps=1, batch_size=4, lr=1e-3,
            weight_decay=0.0, warmup=1, pairs_limit=8, seed=0, threads=0, progress=False,
        )  # fmt: skip
        assert seen == [3]  # 0: torch's own count is left as it is
    finally:
        torch.set_num_threads(before)

    # The stage hands the key over.
    from click.testing import CliRunner

    got = {}
    monkeypatch.setattr(P, "pretrain_student", lambda *a, **k: got.update(k) or {"steps": 0, "pairs": 0,
                        "seconds": 0.0, "checkpoint": "x"})  # fmt: skip
    res = CliRunner().invoke(
        main, ["--captions", str(corpus / "captions"), "--val", str(corpus / "captions_val"), "--out",
               str(tmp_path / "stage"), "--set", "student.pretrain.threads=3", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert got["threads"] == 3
