"""Real data as a user meets it: the folders prepare_data writes under their official names play
their standard roles with no renaming, protocol.splits overrides a role, and a teacher named by open_clip
model and tag fails offline in one line saying where its weights were looked for."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.config import ConfigError, SplitRoles, load_params
from pipeline.data.shards import DatasetWriter
from pipeline.splits import SplitError, resolve_splits
from tests.conftest import REPO, png_bytes, snli_instance


def _prepared(root, source: str, *splits: str) -> None:
    """A one-instance prepared split per name, written as prepare_data writes it (source recorded)."""
    for i, split in enumerate(splits):
        with DatasetWriter(root / split, source=source, split=split, shard_size=4, image_shard_size=4) as w:
            w.add_image(f"img-{i}", png_bytes(i), "png")
            w.add_instance(snli_instance(f"snli-{split}", f"img-{i}", split, "a hypothesis"))


@pytest.mark.parametrize(
    ("source", "folders", "roles"),
    [
        ("vqa", ("train2014", "val2014"), ("train2014", None, "val2014")),
        ("snli_ve", ("train", "dev", "test"), ("train", "dev", "test")),
        ("vcr", ("train", "val"), ("train", None, "val")),
        ("synthetic", ("train", "val", "test", "captions"), ("train", "val", "test")),
    ],
)
def test_each_source_reads_its_official_folders_in_their_standard_roles(tmp_path, source, folders, roles):
    _prepared(tmp_path, source, *folders)
    dirs = resolve_splits(tmp_path)
    assert dirs.source == source
    # None: validation is a seeded slice of train (VQA's and VCR's test labels are hidden, so their val is test)
    assert (dirs.train.name, dirs.val.name if dirs.val else None, dirs.test.name) == roles


def test_protocol_splits_overrides_a_role_and_a_missing_one_names_folder_and_key(tmp_path):
    _prepared(tmp_path, "vqa", "train2014", "minival2014", "val2014")
    params = load_params(None, ["protocol.splits.val=minival2014"])
    assert resolve_splits(tmp_path, params.protocol.splits).val == tmp_path / "minival2014"
    with pytest.raises(SplitError) as err:
        resolve_splits(tmp_path, SplitRoles(test="test2015"))
    msg = str(err.value)
    assert "test2015" in msg and "protocol.splits.test" in msg and "val2014" in msg


def test_a_val_role_on_the_test_folder_is_refused(tmp_path):
    """Real VQA's test role is the folder named val2014: naming it as protocol.splits.val would select the
    exported student on the test set it is then scored on."""
    _prepared(tmp_path, "vqa", "train2014", "val2014")
    with pytest.raises(SplitError, match=r"protocol.splits.val.*the val and test roles name the same split"):
        resolve_splits(tmp_path, SplitRoles(val="val2014"))
    with pytest.raises(SplitError, match=r"the val and train roles name the same split"):
        resolve_splits(tmp_path, SplitRoles(val="train2014"))


def test_a_missing_standard_split_says_how_to_prepare_it(tmp_path):
    _prepared(tmp_path, "vqa", "train2014")
    with pytest.raises(SplitError) as err:
        resolve_splits(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "val2014") in msg and "prepare_data --split val2014" in msg


def test_a_split_folder_given_as_the_data_root_is_refused_naming_its_parent(tmp_path):
    _prepared(tmp_path, "vqa", "train2014", "val2014")
    with pytest.raises(SplitError, match="pass the folder above it"):
        resolve_splits(tmp_path / "train2014")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("protocol.splits.train=../elsewhere", "protocol.splits.train"),
        ("protocol.splits.test=slice", "protocol.splits.test"),
        ("protocol.splits.unknown=x", "protocol.splits.unknown"),
    ],
)
def test_bad_split_roles_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(None, [override])


def test_train_student_on_a_root_missing_its_test_role_is_one_line(tmp_path):
    from stages.train_student import main

    _prepared(tmp_path / "vqa", "vqa", "train2014")
    res = CliRunner().invoke(
        main, ["--task", "vqa", "--data", str(tmp_path / "vqa"), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 1
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert "val2014" in res.output and "protocol.splits.test" in res.output


# ------------------------------------------------------------------------------------ teachers by name


def test_a_named_teacher_missing_offline_fails_in_one_line_saying_where_to_put_it(tmp_path, monkeypatch):
    import open_clip
    from huggingface_hub import constants

    from stages.extract_teacher import main
    from tests.conftest import build_dataset

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def no_download(*args, **kwargs):
        raise AssertionError("open_clip was asked to build the model, i.e. to download the weights")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_download)
    build_dataset(tmp_path / "shards" / "train", 2)
    res = CliRunner().invoke(
        main,
        ["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "cache.zarr"), "--model", "ViT-B-16",
         "--pretrained", "openai", "--scheduler", "sync", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.output
    for what in (
        "ViT-B-16",
        "'openai'",
        "timm/vit_base_patch16_clip_224.openai",
        str(hub),
        "huggingface-cli",
    ):
        assert what in lines[0], what
    assert not (tmp_path / "cache.zarr").exists()


def test_a_named_teacher_is_found_where_the_error_says_to_put_it(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline.teacher import tag_weights

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    assert tag_weights("ViT-B-16", "openai")[0] is None
    repo = hub / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    assert tag_weights("ViT-B-16", "openai")[0] == str(weights)


# ------------------------------------------------------------------------------------ the README's recipe


def _recipe() -> list[str]:
    """The commands of the README's "Real data" code block, loops unrolled (``for x in a b; do CMD; done``)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Real data\n") :]
    block = section[section.index("```bash\n") + len("```bash\n") :]
    block = block[: block.index("```")]

    def unroll(line: str) -> list[str]:
        loop = re.fullmatch(r"for (\w+) in ([^;]+); do (.+); done", line)
        if not loop:
            return [line]
        var, values, body = loop.groups()
        return [c for v in values.split() for c in unroll(body.replace(f"${var}", v))]

    lines = [line.strip() for line in block.splitlines()]
    return [c for line in lines if line and not line.startswith("#") for c in unroll(line)]


# What makes the recipe tiny: the named teacher is a local tiny open_clip checkpoint, and every size is small.
TINY = [
    "teacher.precision=fp32", "cache.image_rows_per_unit=64", "cache.text_rows_per_unit=512",
    "cache.batch_size=32", "cache.num_workers=0", "cache.scheduler=sync", "student.width=32", "student.layers=1",
    "student.heads=2", "student.image_size=32", "student.patch_size=8", "student.max_text_len=32",
    "student.dropout=0.0", "train.batch_size=4", "train.task_batch_size={vcr: 2}", "train.steps=2",
    "train.warmup=1", "train.eval_every=2", "train.checkpoint_every=2",
]  # fmt: skip


def _tiny_teacher(tmp_path) -> list[str]:
    """A local tiny open_clip teacher (config + checkpoint) under tmp_path, as the overrides that name it."""
    import torch

    from pipeline.teacher import create_teacher
    from tests.conftest import tiny_teacher_config

    cfg = tmp_path / "tiny-teacher.json"
    cfg.write_text(json.dumps(tiny_teacher_config(32)))
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny-teacher.pt"
    torch.save({"state_dict": create_teacher(str(cfg), "").model.state_dict()}, ckpt)
    return [f"teacher.model={cfg}", f"teacher.pretrained={ckpt}"]


def test_the_readme_recipe_runs_on_official_files_of_all_three_sources_sharing_one_store(
    tmp_path, monkeypatch
):
    """prepare (official names) -> extract (one store for all three) -> train -> evaluate -> report, as the
    README writes it, with no renaming or symlinks; each student is tested on its source's test role."""
    import importlib

    import torch

    from tests.fixtures_official import GOOD_INSTANCES, build_snli_ve, build_vcr, build_vqa

    official = tmp_path / "official"
    for split in ("train2014", "val2014"):
        build_vqa(official / "vqa", split)
    for split in ("train", "dev", "test"):
        build_snli_ve(official / "snli", split)
    for split in ("train", "val"):
        build_vcr(official / "vcr", split)
    work = tmp_path / "work"
    (work / "real").mkdir(parents=True)
    shutil.copy(REPO / "real" / "params.yaml", work / "real" / "params.yaml")  # the shipped params, as is
    teacher = _tiny_teacher(tmp_path)
    (work / "metrics").mkdir()  # a checkout holds the embedded teacher's record, which is not this teacher's
    shutil.copy(REPO / "metrics" / "teacher.json", work / "metrics" / "teacher.json")
    monkeypatch.chdir(work)

    commands = _recipe()
    assert [c.split()[2] for c in commands] == [
        "stages.prepare_data", "stages.prepare_data", "stages.prepare_data", "stages.extract_teacher",
        *["stages.train_student"] * 9, "stages.evaluate", *["stages.zeroshot"] * 3, "stages.report",
    ]  # fmt: skip
    for command in commands:
        command = command.replace("~/vqa", str(official / "vqa")).replace("~/snli", str(official / "snli"))
        command = command.replace("~/vcr", str(official / "vcr"))
        words = shlex.split(command)
        assert words[:2] == ["python", "-m"], command
        args = []
        for w in words[3:]:
            args += sorted(glob.glob(w)) if "*" in w else [w]
        if words[2] != "stages.report":  # the report takes no params
            args += [a for s in (*teacher, *TINY) for a in ("--set", s)]
        res = CliRunner().invoke(importlib.import_module(words[2]).main, args)
        assert res.exit_code == 0, f"{command}\n{res.output}{res.exception!r}"

    shards = work / "data" / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["snli_ve", "vcr", "vqa"]
    assert sorted(p.name for p in (shards / "vqa").iterdir()) == ["train2014", "val2014"]  # no renaming
    assert not any(p.is_symlink() for p in work.rglob("*"))
    extract = json.loads((work / "metrics" / "real" / "extract.json").read_text())
    assert extract["datasets"] == 7  # one store, the three sources' seven splits extracted together
    evals = {p.parent.name: json.loads(p.read_text()) for p in (work / "real" / "evals").glob("*/eval.json")}
    assert set(evals) == {
        f"{t}-lowshot-0.05-{m}-s0"
        for t in ("vqa", "snli_ve", "vcr")
        for m in ("blind", "baseline", "clip_td")
    }  # the text-only floor beside every result
    # Tested on each source's test role: VQA val2014, SNLI-VE test, VCR val (every fixture split has the same
    # instance count, so the count alone cannot tell; the recorded folder does).
    for task, test_folder in (("vqa", "val2014"), ("snli_ve", "test"), ("vcr", "val")):
        exported = torch.load(
            work / "real" / "runs" / f"{task}-lowshot-0.05-clip_td-s0" / "student.pt", weights_only=True
        )
        assert exported["splits"]["test"] == test_folder
    assert all(e["metrics"]["n"] == GOOD_INSTANCES for e in evals.values())
    quality = (work / "reports" / "real" / "results.md").read_text().split("## Teacher quality", 1)[1]
    assert "`metrics/teacher.json`" not in quality.split("\n## ", 1)[0]  # no embedded teacher's numbers
    # A student exported before runs recorded their folders is evaluated on the roles resolved now: the same.
    from stages.evaluate import evaluate_run

    old = work / "old" / "vqa-lowshot-0.05-clip_td-s0"
    old.mkdir(parents=True)
    exported = torch.load(work / "real" / "runs" / old.name / "student.pt", weights_only=True)
    del exported["splits"]
    torch.save(exported, old / "student.pt")
    again = evaluate_run(old, load_params(work / "real" / "params.yaml"))
    assert again["metrics"] == evals[old.name]["metrics"]
    results = (work / "reports" / "real" / "results.md").read_text()
    assert all(f"## {task} — " in results for task in ("vqa", "snli_ve", "vcr"))
    assert "| clip_td | " in results and "| baseline | " in results
    # The ceiling beside every result: each source's zero-shot score, from its own data root's file.
    for task in ("vqa", "snli_ve", "vcr"):
        row = results.split(f"## {task} — ", 1)[1].split("| teacher zero-shot |", 1)[1].splitlines()[0]
        assert "not measured" not in row, (task, row)


def test_a_store_of_one_tag_does_not_pass_for_another_tag_of_the_same_model():
    from pipeline.identity import teacher_identity

    openai, laion = teacher_identity("ViT-B-16", "openai"), teacher_identity("ViT-B-16", "laion2b_s34b_b88k")
    assert openai["config_sha256"] == laion["config_sha256"]
    assert openai["pretrained_checksum"] == "openai" and laion["pretrained_checksum"] == "laion2b_s34b_b88k"


def test_a_failed_download_names_where_the_weights_were_looked_for(tmp_path, monkeypatch):
    import open_clip
    from huggingface_hub import constants

    from pipeline.teacher import TeacherError, create_teacher

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def unreachable(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai':\nConnection refused")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", unreachable)
    with pytest.raises(TeacherError) as err:
        create_teacher("ViT-B-16", "openai")
    msg = str(err.value)
    assert "\n" not in msg and "Connection refused" in msg and str(tmp_path / "hub") in msg


def test_real_params_load_and_hold_every_key_of_params_yaml():
    """real/dvc.yaml lists its params from real/params.yaml: a key missing there fails `dvc repro`, and a bad
    value must fail at load naming the key, like params.yaml."""
    import yaml

    def keys(node: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in node.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return out

    real = load_params(REPO / "real" / "params.yaml")
    assert (real.data.source, real.teacher.model, real.teacher.pretrained) == ("vqa", "ViT-B-16", "openai")
    assert real.protocol.tasks == [real.data.source]  # one source per run of real/dvc.yaml
    shipped = keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert keys(yaml.safe_load((REPO / "real" / "params.yaml").read_text())) == shipped


def test_prepare_takes_source_root_and_splits_from_params(tmp_path, monkeypatch):
    """What real/dvc.yaml's prepare stage runs: no --source, --root or --split, only the params file."""
    from stages.prepare_data import main
    from tests.fixtures_official import GOOD_INSTANCES, build_vqa

    for split in ("train2014", "val2014"):
        build_vqa(tmp_path / "vqa", split)
    monkeypatch.chdir(tmp_path)
    sets = ["data.source=vqa", "data.splits=[train2014, val2014]"]
    args = [a for s in sets for a in ("--set", s)]
    res = CliRunner().invoke(main, [*args, "--set", f"data.root={tmp_path / 'vqa'}"])
    assert res.exit_code == 0, res.output
    dirs = resolve_splits(tmp_path / "data" / "shards" / "vqa")
    assert (dirs.train.name, dirs.test.name) == ("train2014", "val2014")
    assert json.loads((dirs.test / "dataset.json").read_text())["instances"] == GOOD_INSTANCES
    res = CliRunner().invoke(main, [*args, "--set", f"data.root={tmp_path / 'nowhere'}"])
    assert res.exit_code == 2 and "data.root" in res.output and "nowhere" in res.output


def test_a_jpeg_with_a_multi_picture_segment_is_kept_as_jpeg(tmp_path):
    """Phone cameras write JPEGs with an MPF segment, which PIL names 'MPO'; prepare refused them."""
    import io

    from PIL import Image

    from pipeline.data.readers import read_image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(
        buf, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8), (0, 255, 0))]
    )
    path = tmp_path / "photo.jpg"
    path.write_bytes(buf.getvalue())
    data, ext = read_image(path)
    assert ext == "jpg" and data == buf.getvalue()


def test_a_dataset_of_your_own_written_as_the_data_page_shows_runs_through_every_stage(tmp_path, monkeypatch):
    """docs/data.md's 'Your own dataset' block writes a VQA-style source the converters do not know; its
    folders play train/val/test by name, and extract -> train -> evaluate -> report run on them as on
    prepare's output."""
    import importlib

    import torch

    from pipeline.data.shards import PreparedDataset
    from tests.conftest import docs_python_block

    namespace: dict = {}
    exec(docs_python_block("data.md", "Your own dataset"), namespace)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        (images / f"photo{i}.png").write_bytes(png_bytes(i))
    said = ("Two", "three", "red.", "a dog", "Yes", "no")  # answers before normalisation
    work = tmp_path / "work"
    for split, n in (("train", 24), ("val", 6), ("test", 6)):
        records = [
            {"id": f"{split}{k}", "image": f"photo{k % 6}.png", "question": f"What is shown in part {k % 4}?",
             "answers": [said[(k + j // 7) % 6] for j in range(10)]}
            for k in range(n)
        ]  # fmt: skip
        namespace["write_split"](records, images, work / "data" / "shards" / "mine", split)
    root = work / "data" / "shards" / "mine"
    dirs = resolve_splits(root)
    assert (dirs.source, dirs.train.name, dirs.val.name, dirs.test.name) == ("mine", "train", "val", "test")
    first = next(PreparedDataset(dirs.train).iter_instances())
    assert first.answer == "2" and first.human_answers[0] == "2"  # normalised as VQA v2's answers are

    sets = [a for s in (*_tiny_teacher(tmp_path), "student.init=scratch", *TINY)
            for a in ("--set", s)]  # fmt: skip
    monkeypatch.chdir(work)
    store, run = "artifacts/mine.zarr", "runs/vqa-full-clip_td-s0"
    for module, args in (
        ("stages.extract_teacher", ["--shards", str(root), "--out", store, "--metrics", "metrics/extract.json"]),
        ("stages.train_student", ["--task", "vqa", "--condition", "full", "--method", "clip_td", "--seed", "0",
                                  "--data", str(root), "--cache", store, "--out", run]),
        ("stages.evaluate", [run, "--out", "evals"]),
    ):  # fmt: skip
        res = CliRunner().invoke(importlib.import_module(module).main, [*args, *sets])
        assert res.exit_code == 0, f"{module}\n{res.output}{res.exception!r}"
    res = CliRunner().invoke(
        importlib.import_module("stages.report").main,
        ["--runs", "evals", "--extract", "metrics/extract.json", "--out", "reports"],
    )
    assert res.exit_code == 0, f"report\n{res.output}{res.exception!r}"
    evaluated = json.loads((work / "evals" / "vqa-full-clip_td-s0" / "eval.json").read_text())
    assert evaluated["metrics"]["n"] == 6  # the test folder's six instances
    assert torch.load(work / run / "student.pt", weights_only=True)["splits"]["test"] == "test"
    assert "## vqa — " in (work / "reports" / "results.md").read_text()


def test_dvc_repro_of_real_dvc_yaml_runs_every_stage_and_a_student_change_leaves_the_teacher_stages(tmp_path):
    """`dvc repro real/dvc.yaml` as the README gives it, on official VQA files and a local teacher checkpoint:
    prepare -> extract -> zeroshot -> students -> evaluate -> report, all recorded; a student parameter then
    leaves prepare, extraction and zero-shot up to date."""
    import yaml

    from pipeline.config import apply_overrides
    from tests.fixtures_official import build_vqa

    for split in ("train2014", "val2014"):
        build_vqa(tmp_path / "vqa", split)
    work = tmp_path / "work"
    for code in ("stages", "pipeline", "student"):  # what the stages import and list as deps
        shutil.copytree(REPO / code, work / code, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "real").mkdir()
    shutil.copy(REPO / "real" / "dvc.yaml", work / "real" / "dvc.yaml")
    sets = [f"data.root={tmp_path / 'vqa'}", *_tiny_teacher(tmp_path),
            *TINY, "protocol.conditions=[full]", "protocol.methods=[baseline, clip_td]", "protocol.seeds=[0]"]  # fmt: skip
    params = work / "real" / "params.yaml"
    params.write_text(
        yaml.safe_dump(apply_overrides(yaml.safe_load((REPO / "real" / "params.yaml").read_text()), sets))
    )
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1"}  # fmt: skip

    def dvc(*args: str) -> str:
        res = subprocess.run(
            [str(bin_dir / "dvc"), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    dvc("init", "--no-scm", "-q")
    ran = dvc("repro", "real/dvc.yaml")
    for stage in ("prepare", "extract_teacher", "zeroshot", "train_student@vqa-full-baseline-0",
                  "train_student@vqa-full-clip_td-0", "evaluate", "report"):  # fmt: skip
        assert f"Running stage 'real/dvc.yaml:{stage}'" in ran, ran
    results = (work / "reports" / "real" / "results.md").read_text()
    assert "## vqa — " in results and "| clip_td | " in results
    assert "not measured" not in results.split("| teacher zero-shot |", 1)[1].splitlines()[0]
    assert "up to date" in dvc("status", "real/dvc.yaml")

    def change(*sets: str) -> None:
        params.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(params.read_text()), list(sets))))

    change("train.steps=3")
    stale = json.loads(dvc("status", "--json", "real/dvc.yaml"))
    assert set(stale) == {f"real/dvc.yaml:train_student@vqa-full-{m}-0" for m in ("baseline", "clip_td")}, (
        stale
    )

    # A rerun that fails leaves what the last run made: DVC deletes a stage's outputs before running it unless
    # they are marked persist, and these stages replace their outputs themselves, atomically.
    def failed_repro() -> str:
        res = subprocess.run([str(bin_dir / "dvc"), "repro", "real/dvc.yaml"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert res.returncode != 0, res.stdout
        return res.stdout + res.stderr

    student = work / "real" / "runs" / "vqa-full-baseline-s0" / "student.pt"
    trained = student.read_bytes()
    change("train.lr=-1")  # refused when the stage loads its params
    assert "train.lr" in failed_repro()
    assert student.read_bytes() == trained
    shards = work / "data" / "shards" / "vqa"
    prepared = sorted(p.relative_to(shards) for p in shards.rglob("*"))
    change(
        "train.lr=0.001", "data.splits=[train2014, val2014, test-dev2015]"
    )  # its questions file is missing
    assert "test-dev2015" in failed_repro()
    assert sorted(p.relative_to(shards) for p in shards.rglob("*")) == prepared
    assert (shards / "train2014" / "dataset.json").is_file()


def test_a_student_pretrained_on_coco_style_captions_as_the_training_page_shows_is_trained_from(
    tmp_path, monkeypatch
):
    """docs/training.md's 'A pretrained student for real data': COCO-format captions become caption splits,
    pretrain_student runs on them with the params training uses, and train_student starts from that backbone
    (its checksum in the run's identity) on official VQA files."""
    import importlib

    import torch

    from pipeline.data.shards import PreparedDataset
    from pipeline.teacher import sha256_file
    from student.data import load_tokenizer
    from student.pretrain import load_pairs
    from tests.conftest import docs_python_block
    from tests.fixtures_official import build_vqa

    namespace: dict = {}
    exec(docs_python_block("training.md", "A pretrained student for real data"), namespace)
    coco = tmp_path / "coco"
    for split in ("train2014", "val2014"):
        (coco / split).mkdir(parents=True)
        images = [{"id": 10 + i, "file_name": f"COCO_{split}_{10 + i:012d}.png"} for i in range(6)]
        for i, image in enumerate(images):
            (coco / split / image["file_name"]).write_bytes(png_bytes(i + (split == "val2014") * 6))
        said = ("a red square", "two circles", "a small triangle")
        annotations = [{"id": 100 * i + j, "image_id": 10 + i, "caption": f" {said[(i + j) % 3]}\n"}
                       for i in range(6) for j in range(2)]  # fmt: skip
        (coco / f"captions_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations})
        )
        namespace["write_captions"](
            coco / f"captions_{split}.json", coco / split, tmp_path / "shards" / "coco", split
        )
    tiny = [*_tiny_teacher(tmp_path), *TINY]
    cfg = tmp_path / "tiny-teacher.json"
    sp = load_params(REPO / "real" / "params.yaml", tiny).student
    pairs = load_pairs(
        tmp_path / "shards" / "coco" / "train2014",
        sp,
        load_tokenizer(str(cfg)),
    )
    assert len(pairs) == 12 and pairs.images.shape[0] == 6  # each image once, every caption a pair
    first = next(PreparedDataset(tmp_path / "shards" / "coco" / "train2014").iter_instances())
    assert (first.task, first.caption, first.image_id) == (
        "caption",
        "a red square",
        "COCO_train2014_000000000010",
    )

    for split in ("train2014", "val2014"):
        build_vqa(tmp_path / "vqa", split)
    monkeypatch.chdir(tmp_path)
    backbone = tmp_path / "artifacts" / "student_pretrained_coco" / "student.pt"
    sets = [*tiny, "student.pretrain.steps=2", "student.pretrain.batch_size=4", "student.pretrain.warmup=1"]
    steps = [
        ("stages.prepare_data", ["--source", "vqa", "--root", str(tmp_path / "vqa"), "--split", "train2014",
                                 "--split", "val2014", "--out", "data/shards/vqa"]),
        ("stages.pretrain_student", ["--captions", "shards/coco/train2014", "--val", "shards/coco/val2014", "--out",
                                     str(backbone.parent), "--metrics", "metrics/student_pretrain.json", "--quiet"]),
        ("stages.extract_teacher", ["--shards", "data/shards/vqa", "--out", "cache.zarr", "--metrics", "extract.json"]),
        ("stages.train_student", ["--task", "vqa", "--condition", "full", "--method", "clip_td", "--seed", "0",
                                  "--data", "data/shards/vqa", "--cache", "cache.zarr", "--out", "run",
                                  "--set", "student.init=pretrained", "--set", f"student.pretrained={backbone}"]),
    ]  # fmt: skip
    for module, args in steps:
        overrides = [a for s in sets for a in ("--set", s)] if module != "stages.prepare_data" else []
        res = CliRunner().invoke(importlib.import_module(module).main, [*args, *overrides, "--params",
                                 str(REPO / "real" / "params.yaml")])  # fmt: skip
        assert res.exit_code == 0, f"{module}\n{res.output}{res.exception!r}"
    assert json.loads((tmp_path / "metrics" / "student_pretrain.json").read_text())["steps"] == 2
    identity = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["identity"]
    assert identity["init"] == {"pretrained": sha256_file(backbone)}


def test_real_params_train_the_default_student_from_scratch():
    # real/params.yaml had kept the first ViLT student's settings (200 steps, patch 16) after the default moved
    # to FiLM: the real-data recipe trained the student the docs say cannot learn.
    import yaml

    default, real = (yaml.safe_load((REPO / p).read_text()) for p in ("params.yaml", "real/params.yaml"))
    assert real["train"] == default["train"]
    assert real["student"] == {**default["student"], "init": "scratch"}


def test_real_params_pin_the_pretrainings_threads_as_params_yaml_does():
    """The pretrainings' torch thread count decides their bits (docs/training.md): real/params.yaml copies
    params.yaml's teacher.pretrain, and had kept its old thread count (0, every core) after the default was
    pinned at 2, so a teacher pretrained from it would train to other bits on a machine of another core count."""
    import yaml

    default, real = (yaml.safe_load((REPO / p).read_text()) for p in ("params.yaml", "real/params.yaml"))
    assert real["teacher"]["pretrain"] == default["teacher"]["pretrain"]
    assert real["student"]["pretrain"]["threads"] == default["student"]["pretrain"]["threads"] == 2
