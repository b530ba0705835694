from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, dump_defaults, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_hold_every_default():
    # params.yaml is the one place a user reads defaults: it must list every key the code knows, unchanged.
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load(dump_defaults())
    assert load_params(ROOT / "params.yaml") == Params()


def test_unknown_key_names_key_and_allowed(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("student:\n  widht: 3\n")
    with pytest.raises(ConfigError) as e:
        load_params(p)
    msg = str(e.value)
    assert "student.widht" in msg and "width" in msg and str(p) in msg


def test_mistyped_value_names_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"train\.steps.*not an integer"):
        load_params(p)


def test_literal_lists_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"distill\.method.*'clip_td'"):
        load_params(None, ["distill.method=clip-td"])


def test_overrides_parse_yaml_values():
    p = load_params(
        None,
        ["student.width=192", "distill.rho_v=0.5", "protocol.seeds=[0, 1]", "data.synthetic.scenes.train=10"],
    )
    assert p.student.width == 192 and p.distill.rho_v == 0.5 and p.protocol.seeds == [0, 1]
    assert p.data.synthetic.scenes["train"] == 10
    assert isinstance(load_params(None, ["distill.alpha0=1"]).distill.alpha0, float)
    # YAML 1.1 reads 3e-3 as a string; a float key still takes it, and a word is still refused.
    assert load_params(None, ["train.lr=3e-3"]).train.lr == 3e-3
    with pytest.raises(ConfigError, match=r"train\.lr.*not a number"):
        load_params(None, ["train.lr=fast"])


def test_range_validation_names_key():
    with pytest.raises(ConfigError, match=r"distill\.rho_t"):
        load_params(None, ["distill.rho_t=1.5"])
    with pytest.raises(ConfigError, match=r"protocol\.conditions.*lowshot@2"):
        load_params(None, ["protocol.conditions=[lowshot@2]"])
    with pytest.raises(ConfigError, match=r"cache\.num_workers.*-1 \(automatic\)"):
        load_params(None, ["cache.num_workers=-2"])
    with pytest.raises(ConfigError, match=r"cache\.write_threads.*-1 \(automatic\) or at least 1, got 0"):
        load_params(None, ["cache.write_threads=0"])
    with pytest.raises(ConfigError, match=r"cache\.image_shard_bytes.*at least 1, got 0"):
        load_params(None, ["cache.image_shard_bytes=0"])
    with pytest.raises(ConfigError, match=r"train\.device.*'gpu'"):
        load_params(None, ["train.device=gpu"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"--set student.width: expected dotted.key=value"):
        load_params(None, ["student.width"])


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.steps=0", r"train\.steps': must be at least 1, got 0"),
        ("train.batch_size=0", r"train\.batch_size': must be at least 1, got 0"),
        ("train.task_batch_size.vcr=0", r"train\.task_batch_size\.vcr': must be at least 1"),
        ("train.lr=.nan", r"train\.lr': must be a finite number > 0, got nan"),
        ("train.lr=.inf", r"train\.lr': must be a finite number > 0, got inf"),
        ("train.lr=0", r"train\.lr': must be a finite number > 0, got 0"),
        ("teacher.pretrain.batch_size=0", r"teacher\.pretrain\.batch_size': must be at least 1"),
        ("cache.clevel=99", r"cache\.clevel': blosc zstd levels are 0\.\.9, got 99"),
        ("cache.batch_size=0", r"cache\.batch_size': must be at least 1"),
        ("cache.relevance_tokens=[foo]", r"cache\.relevance_tokens': unknown source\(s\) \['foo'\]; allowed"),
        ("train.seed=-1", r"train\.seed': must be at least 0, got -1"),
        ("student.pretrain.seed=-1", r"student\.pretrain\.seed': must be at least 0"),
        ("student.pretrain.threads=-1", r"student\.pretrain\.threads': must be at least 0, got -1"),
        ("teacher.pretrain.threads=-1", r"teacher\.pretrain\.threads': must be at least 0, got -1"),
        (
            "student.pretrain.weight_decay=-1",
            r"student\.pretrain\.weight_decay': must be a finite number >= 0",
        ),
        ("protocol.val_fraction=1.0", r"protocol\.val_fraction': must be in \(0, 1\), got 1\.0"),
        ("distill.mass_p=0", r"distill\.mass_p': must be in \(0, 1\], got 0"),
        ("student.heads=3", r"student\.heads': must divide student\.width=64"),
        (
            "protocol.conditions=[lowshot-x]",
            r"protocol\.conditions': condition 'lowshot-x'.*'x' is not a number",
        ),
    ],
)
def test_ranges_are_checked_at_load_naming_the_key(override, says):
    with pytest.raises(ConfigError, match=says):
        load_params(None, [override])


def test_an_error_is_blamed_on_where_the_value_came_from(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  steps: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'train\.steps': must be at least 1"):
        load_params(path)
    # the same value from --set is blamed on the option, not on a file that holds a good value
    path.write_text("train:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"^--set train\.lr=\.nan: key 'train\.lr'"):
        load_params(path, ["train.lr=.nan"])
    with pytest.raises(ConfigError, match=r"^--set train=\{lr: x\}: key 'train\.lr': not a number"):
        load_params(path, ["train={lr: x}"])
    with pytest.raises(ConfigError, match=r"^--set train\.lr=\[: value is not valid YAML"):
        load_params(path, ["train.lr=["])
    assert load_params(path, ["cache.clevel=0"]).cache.clevel == 0  # blosc's "stored", a valid level


def test_unreadable_or_broken_parameter_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read the parameter file"):
        load_params(tmp_path)  # a directory
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid YAML: ") as e:
        load_params(bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("trian.steps=3", r"^--set trian\.steps=3: unknown key 'trian'"),
        ("train.stpes.x=3", r"^--set train\.stpes\.x=3: unknown key 'train\.stpes'"),
        ("train.task_batch_size.vqq=2", r"^--set train\.task_batch_size\.vqq=2: .*unknown task 'vqq'"),
    ],
)
def test_an_override_below_the_failing_key_is_blamed_not_the_file(override, says):
    # params.yaml holds only good values: the mistake is the override's, though it sits below the bad key.
    with pytest.raises(ConfigError, match=says):
        load_params(ROOT / "params.yaml", [override])


def test_a_bad_entry_the_file_holds_stays_the_files(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  task_batch_size:\n    vqq: 2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: key 'train\.task_batch_size': unknown task 'vqq'"):
        load_params(path, ["train.task_batch_size.vcr=2"])
    path.write_text("trian:\n  x: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'trian'"):
        load_params(path, ["trian.y=2"])


def test_a_dotted_override_changes_only_the_entry_it_names(tmp_path):
    # Without the key in the file, the override goes into the default dict: VCR keeps its batch of 4.
    assert load_params(None, ["train.task_batch_size.snli_ve=16"]).train.task_batch_size == {
        "vcr": 4,
        "snli_ve": 16,
    }
    scenes = load_params(None, ["data.synthetic.scenes.train=50"]).data.synthetic.scenes
    assert scenes == {"train": 50, "val": 300, "test": 600}
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  steps: 100\n")
    assert load_params(path, ["train.task_batch_size.snli_ve=16"]).train.task_batch_size == {
        "vcr": 4,
        "snli_ve": 16,
    }
    # A dict the file writes out in full is the user's: no default entry is merged into it.
    path.write_text("train:\n  task_batch_size:\n    vqa: 8\n")
    tbs = load_params(path, ["train.task_batch_size.snli_ve=16"]).train.task_batch_size
    assert tbs == {"vqa": 8, "snli_ve": 16}
    # Nor into one an override writes out in full.
    assert load_params(None, ["train.task_batch_size={vqa: 8}"]).train.task_batch_size == {"vqa": 8}


@pytest.mark.parametrize(
    ("override", "says"),
    [
        (
            "protocol.methods=[baseline, clipt_td]",
            r"^--set protocol\.methods=\[baseline, clipt_td\]: key 'protocol\.methods': unknown method "
            r"'clipt_td' \(allowed: baseline, blind, .*clip_td,",
        ),
        ("protocol.methods=[blind, blind]", r"key 'protocol\.methods': listed more than once: \['blind'\]"),
        ("protocol.seeds=[0, -1]", r"key 'protocol\.seeds': a seed must be an integer >= 0, got -1"),
        ("protocol.seeds=[0, 0]", r"key 'protocol\.seeds': listed more than once: \[0\]"),
        ("protocol.methods=[]", r"key 'protocol\.methods': must list at least one"),
        ("protocol.tasks=[]", r"key 'protocol\.tasks': must list at least one"),
        (
            "data.synthetic.scenes={trian: 5}",
            r"key 'data\.synthetic\.scenes\.trian': unknown split \(allowed: train, val, test\)",
        ),
    ],
)
def test_protocol_lists_and_scene_splits_are_checked_at_load(override, says):
    with pytest.raises(ConfigError, match=says):
        load_params(ROOT / "params.yaml", [override])
