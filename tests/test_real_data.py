"""Real data as a user meets it (issue 26): the folders prepare_data writes under their official names play
their standard roles with no renaming, protocol.splits overrides a role, and a teacher named by open_clip
model and tag fails offline in one line saying where its weights were looked for."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.config import ConfigError, SplitRoles, load_params
from pipeline.data.shards import DatasetWriter
from pipeline.splits import SplitError, resolve_splits
from tests.conftest import png_bytes, snli_instance


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
