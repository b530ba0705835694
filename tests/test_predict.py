"""predict: a trained student answers new inputs as the evaluate stage scores them, through the Python API and
the command; a bad input fails in one line naming it."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from student.data import eval_batches, open_prepared
from student.evaluation import predict
from student.inference import PredictError, Predictor
from student.train import run_student
from tests.conftest import build_world, png_bytes, run_spec, student_params

RUNS = ("vqa-clip_td", "snli_ve-baseline", "vcr-clip_td", "snli_ve-blind", "vcr-baseline-vilt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A few exported students (4 steps each) of the tiny world, by '<task>-<method>[-<arch>]'."""
    tmp = tmp_path_factory.mktemp("predict")
    world = build_world(tmp / "world")
    for name in RUNS:
        task, method, *arch = name.split("-")  # the default student, or the one named last
        over = {"train.steps": 4, "train.eval_every": 4, **({"student.arch": arch[0]} if arch else {})}
        params = student_params(world, **over)
        run_student(params, run_spec(world, tmp, task=task, method=method, name=name), progress=False)
    return tmp / "world" / "shards" / "test", {name: tmp / name for name in RUNS}


@pytest.mark.parametrize("name", RUNS)
def test_a_prediction_is_the_one_evaluate_scores(runs, name):
    test, dirs = runs
    p = Predictor(dirs[name])  # a run folder; its student.pt is loaded
    ds = open_prepared(test)
    insts = [i for i in ds.iter_instances() if i.task == p.task][:10]
    (batch,) = eval_batches(ds, [i.key for i in insts], p.spec, len(insts))
    scored = predict(p.student, p.heads, p.task, batch, p.spec.vocab)  # what the evaluate stage scores
    for inst, want in zip(batch.instances, scored, strict=True):
        image = ds.image_bytes(inst.image_id)
        if p.task == "vcr":  # VCR's QA->R reads the rationales with the gold answer
            got = p.predict(image, inst.question, inst.answers, inst.rationales, given_answer=inst.label)
            assert (got["answer"], got["rationale"]) == (want["answer"], want["rationale"])
            assert sum(got["answer_probabilities"]) == pytest.approx(1.0, abs=1e-5)
        elif p.task == "vqa":
            got = p.predict(image, inst.question)
            assert got["answer"] == want["answer"] == got["top"][0][0] and len(got["top"]) == 5
            assert [s for _, s in got["top"]] == sorted((s for _, s in got["top"]), reverse=True)
        else:
            got = p.predict(image, inst.hypothesis)
            labels = ["entailment", "neutral", "contradiction"]
            assert got["label"] == labels[want["label"]]
            assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", RUNS)
def test_a_student_on_the_gpu_answers_as_on_the_cpu(runs, name):
    test, dirs = runs
    cpu, gpu = Predictor(dirs[name], device="cpu"), Predictor(dirs[name], device="cuda")
    assert next(gpu.student.parameters()).device.type == "cuda"
    ds = open_prepared(test)
    for inst in [i for i in ds.iter_instances() if i.task == cpu.task][:10]:
        image = ds.image_bytes(inst.image_id)
        if cpu.task == "vcr":
            args = (image, inst.question, inst.answers, inst.rationales)
        else:
            args = (image, inst.question if cpu.task == "vqa" else inst.hypothesis)
        want, got = cpu.predict(*args), gpu.predict(*args)
        # TF32 and other kernels move probabilities in the last digits; a pick may flip only on a near-tie.
        pick = {"vqa": "answer", "snli_ve": "label", "vcr": "answer"}[cpu.task]
        probs = {"vqa": "top", "snli_ve": "probabilities", "vcr": "answer_probabilities"}[cpu.task]
        assert _flat(got[probs]) == pytest.approx(_flat(want[probs]), abs=1e-3), inst.key
        assert got[pick] == want[pick] or max(_flat(want[probs])) - sorted(_flat(want[probs]))[-2] < 1e-3


def _flat(x) -> list[float]:
    """A prediction's probabilities as one list: VQA's [[answer, p], ...], SNLI-VE's {label: p}, VCR's [p]."""
    if isinstance(x, dict):
        return [x[k] for k in sorted(x)]
    return [e[1] if isinstance(e, list | tuple) else e for e in x]


def test_vcr_rationales_follow_the_chosen_answer_unless_one_is_given(runs):
    test, dirs = runs
    p = Predictor(dirs["vcr-clip_td"] / "student.pt")
    ds = open_prepared(test)
    inst = next(i for i in ds.iter_instances() if i.task == "vcr")
    image = ds.image_bytes(inst.image_id)
    free = p.predict(image, inst.question, inst.answers, inst.rationales)
    chosen = p.predict(image, inst.question, inst.answers, inst.rationales, given_answer=free["answer"])
    assert chosen == free
    assert "rationale" not in p.predict(image, inst.question, inst.answers)  # rationales are optional


def test_a_blind_student_never_sees_the_image(runs):
    _, dirs = runs
    p = Predictor(dirs["snli_ve-blind"])
    assert p.predict(png_bytes(1), "a red circle") == p.predict(png_bytes(2), "a red circle")
    assert p.predict(b"not decoded at all", "a red circle")["label"]  # blank, as evaluation feeds it


def test_bad_inputs_fail_naming_what_is_wrong(runs, tmp_path):
    _, dirs = runs
    vcr, snli = Predictor(dirs["vcr-clip_td"]), Predictor(dirs["snli_ve-baseline"])
    cases = [
        (lambda: snli.predict(b"\x89PNG broken", "a dog"), "not an image PIL can decode"),
        (lambda: snli.predict(tmp_path / "missing.png", "a dog"), "missing.png: cannot be read"),
        (lambda: snli.predict(png_bytes(0), "  "), "the text is empty: a snli_ve student needs the hypothesis"),
        (lambda: snli.predict(png_bytes(0), "a dog", answers=["a", "b"]), "this student is a snli_ve one"),
        (lambda: vcr.predict(png_bytes(0), "why?", ["only one"]), "answers: a VCR student chooses among >= 2"),
        (lambda: vcr.predict(png_bytes(0), "why?", ["a", "b"], ["r"]), "rationales: choose among >= 2"),
        (lambda: vcr.predict(png_bytes(0), "why?", ["a", "b"], given_answer=2), "given_answer: 2 is not an index"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(PredictError, match=message):
            call()
    with pytest.raises(FileNotFoundError, match="no exported student"):
        Predictor(tmp_path)
    with pytest.raises(PredictError, match="device 'gpu': "):
        Predictor(dirs["vqa-clip_td"], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(PredictError, match="device 'cuda': torch sees no CUDA device here"):
            Predictor(dirs["vqa-clip_td"], device="cuda")


def test_the_command_answers_one_input_or_a_jsonl_file_as_the_api_does(runs, tmp_path):
    from stages.cli import main as clip_td
    from stages.predict import main

    test, dirs = runs
    ds = open_prepared(test)
    insts = [i for i in ds.iter_instances() if i.task == "snli_ve"][:2]
    for i, inst in enumerate(insts):
        (tmp_path / f"img{i}.png").write_bytes(ds.image_bytes(inst.image_id))
    api = Predictor(dirs["snli_ve-baseline"])
    want = [api.predict(tmp_path / f"img{i}.png", inst.hypothesis) for i, inst in enumerate(insts)]

    one = CliRunner().invoke(main, [str(dirs["snli_ve-baseline"]), "--image", str(tmp_path / "img0.png"),
                                    "--text", insts[0].hypothesis])  # fmt: skip
    assert one.exit_code == 0, one.output
    assert json.loads(one.output) == want[0]

    (tmp_path / "in.jsonl").write_text(
        "".join(
            json.dumps({"id": f"q{i}", "image": f"img{i}.png", "text": inst.hypothesis}) + "\n"
            for i, inst in enumerate(insts)
        )  # fmt: skip
    )
    out = tmp_path / "preds" / "out.jsonl"
    many = CliRunner().invoke(clip_td, ["predict", str(dirs["snli_ve-baseline"] / "student.pt"), "--jsonl",
                                        str(tmp_path / "in.jsonl"), "--out", str(out)])  # fmt: skip
    assert many.exit_code == 0, many.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"id": f"q{i}", **w} for i, w in enumerate(want)]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "img0.png", "txt": "a dog"}) + "\n")
    bad = CliRunner().invoke(main, [str(dirs["snli_ve-baseline"]), "--jsonl", str(tmp_path / "bad.jsonl")])
    assert bad.exit_code == 1 and "bad.jsonl:1: unknown key 'txt'" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    (tmp_path / "latin1.jsonl").write_bytes(b'{"image": "img0.png", "text": "caf\xe9"}\n')
    latin1 = CliRunner().invoke(
        main, [str(dirs["snli_ve-baseline"]), "--jsonl", str(tmp_path / "latin1.jsonl")]
    )
    assert latin1.exit_code == 1 and "latin1.jsonl: not UTF-8 text" in latin1.output
    (tmp_path / "broken.png").write_bytes(b"not an image")
    broken = CliRunner().invoke(main, [str(dirs["vcr-clip_td"]), "--image", str(tmp_path / "broken.png"),
                                       "--text", "why?", "--answer", "a", "--answer", "b"])  # fmt: skip
    assert broken.exit_code == 1 and "broken.png: not an image PIL can decode" in broken.output
    vcr = [str(dirs["vcr-clip_td"]), "--image", str(tmp_path / "img0.png"), "--text", "why?", "--answer", "a",
           "--answer", "b", "--rationale", "r", "--rationale", "s", "--given-answer", "1"]  # fmt: skip
    given = CliRunner().invoke(main, vcr)
    assert given.exit_code == 0, given.output
    api_vcr = Predictor(dirs["vcr-clip_td"])
    assert json.loads(given.output) == api_vcr.predict(
        tmp_path / "img0.png", "why?", ["a", "b"], ["r", "s"], 1
    )
    neither = CliRunner().invoke(main, [str(dirs["vcr-clip_td"])])
    assert neither.exit_code == 2 and "--jsonl" in neither.output
    assert "predict" in CliRunner().invoke(clip_td, ["--help"]).output


def test_the_docs_block_runs(runs, tmp_path, monkeypatch, capsys):
    import shutil

    from tests.conftest import docs_python_block

    test, dirs = runs
    for cell, name in (("vqa-full-clip_td-s0", "vqa-clip_td"), ("vcr-full-clip_td-s0", "vcr-clip_td")):
        shutil.copytree(dirs[name], tmp_path / "runs" / cell)
    ds = open_prepared(test)
    for file, image_id in zip(("kitchen.jpg", "scene.jpg"), ds.image_ids()[:2], strict=True):
        (tmp_path / file).write_bytes(ds.image_bytes(image_id))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(docs_python_block("training.md", "Using a trained student"), scope)
    assert scope["best"]["answer"] in scope["vqa"].exported["vocab"] and len(scope["best"]["top"]) == 5
    assert scope["pick"]["answer"] in (0, 1) and scope["pick"]["rationale"] in (0, 1)
    assert capsys.readouterr().out.count("\n") == 2
