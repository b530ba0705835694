"""prepare_data never destroys what a user has: each bad input is refused with one line naming it, and
whatever was on disk before (a good split, a foreign folder, a symlink's target) is byte-identical after."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from pipeline.data import snli_ve
from pipeline.data.errors import DataError
from pipeline.data.schema import Instance
from pipeline.data.shards import DatasetWriter, PreparedDataset
from pipeline.texts import text_hash
from stages.prepare_data import main
from tests import fixtures_official as fx
from tests.conftest import REPO, truncate_jpeg


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under root, hidden ones included: bytes for files, the target for symlinks."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = p.read_bytes()
    return out


def prepare(root: Path, out: Path, *splits: str, source: str = "snli_ve", extra: tuple = ()) -> Result:
    args = ["--source", source, "--root", str(root), "--out", str(out)]
    for split in splits:
        args += ["--split", split]
    return CliRunner().invoke(main, [*args, *extra])


def error_line(res: Result) -> str:
    """The one error line of a refused run (a message, not a traceback)."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture
def good(tmp_path: Path) -> tuple[fx.Built, Path]:
    """SNLI-VE official files and a good prepared split of them under tmp_path/out."""
    built = fx.build_snli_ve(tmp_path / "snli")
    res = prepare(built.root, tmp_path / "out", built.split)
    assert res.exit_code == 0, res.output
    return built, tmp_path / "out"


def test_rerun_with_wrong_root_leaves_the_good_split_as_it_was(tmp_path, good):
    built, out = good
    before = snapshot(out)
    (tmp_path / "wrong").mkdir()
    line = error_line(prepare(tmp_path / "wrong", out, built.split))
    assert "snli_ve_dev.jsonl" in line and "not found" in line
    assert snapshot(out) == before
    # A rerun that succeeds does replace it, and leaves no temp folder behind.
    res = prepare(built.root, out, built.split, extra=("--on-error", "skip"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["dev"]
    assert json.loads((out / "dev" / "skipped.json").read_text())["policy"] == "skip"


def test_failure_partway_leaves_no_partial_split_and_the_previous_one_intact(tmp_path, good):
    _, out = good
    bad = fx.build_snli_ve(tmp_path / "bad", knobs=("missing_image",))  # good lines first, then the bad one
    fresh = tmp_path / "fresh" / "out"
    line = error_line(prepare(bad.root, fresh, bad.split))
    assert "1000000001.jpg" in line and "line 7" in line
    assert not (tmp_path / "fresh").exists()  # not even the folders it made for the split
    before = snapshot(out)
    error_line(prepare(bad.root, out, bad.split))
    assert snapshot(out) == before


def test_a_failing_split_leaves_the_earlier_splits_of_the_run_unchanged_too(tmp_path):
    root, out = tmp_path / "snli", tmp_path / "out"
    fx.build_snli_ve(root, split="dev")
    fx.build_snli_ve(root, split="test")
    assert prepare(root, out, "dev", "test").exit_code == 0
    (root / "snli_ve_dev.jsonl").write_text((root / "snli_ve_dev.jsonl").read_text().replace("about", "of"))
    fx.build_snli_ve(root, split="test", knobs=("missing_image",))
    before = snapshot(out)
    assert "1000000001.jpg" in error_line(prepare(root, out, "dev", "test"))
    assert snapshot(out) == before


def _prepared_then_edited(tmp_path):
    """SNLI-VE dev and test prepared into out/, then both inputs edited: the next run would replace both."""
    root, out = tmp_path / "snli", tmp_path / "out"
    fx.build_snli_ve(root, split="dev")
    fx.build_snli_ve(root, split="test")
    assert prepare(root, out, "dev", "test").exit_code == 0
    for split in ("dev", "test"):
        path = root / f"snli_ve_{split}.jsonl"
        path.write_text(path.read_text().replace("about", "of"))
    return root, out


def test_a_split_refused_at_commit_leaves_the_splits_already_checked_unchanged(tmp_path, monkeypatch):
    # The destination of the run's last split gains a user file while the input is read: commit re-checks it,
    # and by then the first split must not have been replaced yet.
    root, out = _prepared_then_edited(tmp_path)
    convert = snli_ve.convert

    def convert_then_user_writes(root_, split, writer, workers=1):
        convert(root_, split, writer, workers)
        if split == "test":
            (out / "test" / "notes.txt").write_text("user file")

    monkeypatch.setattr(snli_ve, "convert", convert_then_user_writes)
    before = {**snapshot(out), "test/notes.txt": b"user file"}  # the user's file stays too
    assert "notes.txt" in error_line(prepare(root, out, "dev", "test"))
    assert snapshot(out) == before


def test_a_move_that_fails_mid_commit_puts_every_split_back(tmp_path, monkeypatch):
    root, out = _prepared_then_edited(tmp_path)
    before = snapshot(out)
    replace = os.replace

    def replace_failing_for_test(src, dst):
        # The new test split's move into place fails, after both previous splits were moved aside and the
        # new dev split moved in.
        if Path(dst) == out / "test" and ".tmp-" in Path(src).name:
            raise OSError(28, "No space left on device", str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_for_test)
    assert "No space left" in error_line(prepare(root, out, "dev", "test"))
    assert snapshot(out) == before  # hidden folders included: no temp or .old folder is left either


def kill_between_renames(root: Path, out: Path, *splits: str) -> None:
    """Run prepare in a process that dies (no cleanup) when it is about to move the new splits in."""
    code = (
        "import os, sys\n"
        "replace = os.replace\n"
        "def dying(src, dst):\n"
        "    if '.tmp-' in os.path.basename(src):\n"
        "        os._exit(9)\n"
        "    replace(src, dst)\n"
        "os.replace = dying\n"
        "from stages.prepare_data import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["--source", "snli_ve", "--root", str(root), "--out", str(out), "--workers", "1"]
    for split in splits:
        args += ["--split", split]
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 9, res.stderr


def test_a_split_left_aside_by_a_killed_commit_is_named_not_overwritten_and_cleaned_once_back(tmp_path):
    built, out = tmp_path / "snli", tmp_path / "out"
    fx.build_snli_ve(built, split="dev")
    assert prepare(built, out, "dev").exit_code == 0
    previous = snapshot(out / "dev")
    kill_between_renames(built, out, "dev")
    assert not (out / "dev").exists()
    (old,) = out.glob(".dev.old-*")
    assert snapshot(old) == previous
    # The only copy of the split is the hidden folder: a run refuses (naming it) rather than write a new split
    # whose presence would make that copy look like a leftover.
    line = error_line(prepare(built, out, "dev"))
    assert str(old) in line and "move it back" in line
    assert snapshot(old) == previous and not (out / "dev").exists()
    # Moved back as the error says, the split is replaced and the leftover of the killed commit removed.
    old.rename(out / "dev")
    kill_between_renames(built, out, "dev")
    (old,) = out.glob(".dev.old-*")
    old.rename(out / "dev")
    (out / ".dev.old-12345-0badc0de").mkdir()  # not named as this version names them: not ours to remove
    (out / ".dev.old-12345-0badc0de" / "x").write_text("?")
    assert prepare(built, out, "dev").exit_code == 0
    assert [p.name for p in out.glob(".dev.old-*")] == [".dev.old-12345-0badc0de"]
    # Nor is the new split each killed commit left in its (by then unmarked) temp folder kept.
    assert not list(out.glob(".dev.tmp-*"))


@pytest.mark.parametrize("split", ["../elsewhere/dev", "ABS", "..", ".hidden", "a/b", "a\\b"])
def test_split_that_is_not_a_plain_name_is_refused(tmp_path, good, split):
    built, out = good
    elsewhere = tmp_path / "elsewhere" / "dev"
    elsewhere.mkdir(parents=True)
    (elsewhere / "keep.txt").write_text("user data")
    split = str(elsewhere) if split == "ABS" else split
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, out, split))
    assert "--split" in line and repr(split) in line
    assert snapshot(tmp_path) == before


def test_symlinked_file_in_a_split_is_refused_and_its_target_unchanged(tmp_path, good):
    built, out = good
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    (out / "dev" / "skipped.json").unlink()
    (out / "dev" / "skipped.json").symlink_to(sentinel)
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, out, built.split))
    assert str(out / "dev" / "skipped.json") in line
    assert snapshot(tmp_path) == before and sentinel.read_text() == "precious"


def test_symlinked_dataset_json_is_not_taken_for_a_prepared_split(tmp_path, good):
    built, out = good
    sentinel = tmp_path / "sentinel.json"
    sentinel.write_text((out / "dev" / "dataset.json").read_text())  # even a valid one, behind a link
    (out / "dev" / "dataset.json").unlink()
    (out / "dev" / "dataset.json").symlink_to(sentinel)
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, out, built.split))
    assert str(out / "dev") in line and "no regular dataset.json" in line
    assert snapshot(tmp_path) == before


def test_split_folder_that_is_a_symlink_is_refused(tmp_path):
    built = fx.build_snli_ve(tmp_path / "snli")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dev").symlink_to(target, target_is_directory=True)
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, tmp_path / "out", built.split))
    assert str(tmp_path / "out" / "dev") in line and "symbolic link" in line
    assert snapshot(tmp_path) == before


def test_folder_that_is_not_a_prepared_split_is_refused(tmp_path):
    built = fx.build_snli_ve(tmp_path / "snli")
    (tmp_path / "out" / "dev").mkdir(parents=True)
    (tmp_path / "out" / "dev" / "notes.txt").write_text("user data")
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, tmp_path / "out", built.split))
    assert str(tmp_path / "out" / "dev") in line and "not a prepared split" in line
    assert snapshot(tmp_path) == before


def test_prepared_split_holding_a_user_file_is_refused_naming_the_file(tmp_path, good):
    built, out = good
    (out / "dev" / "notes.txt").write_text("user data")
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, out, built.split))
    assert str(out / "dev" / "notes.txt") in line
    assert snapshot(tmp_path) == before


def test_split_path_that_is_a_file_is_refused(tmp_path):
    built = fx.build_snli_ve(tmp_path / "snli")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dev").write_text("user data")
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, tmp_path / "out", built.split))
    assert str(tmp_path / "out" / "dev") in line and "not a folder" in line
    assert snapshot(tmp_path) == before


def test_truncated_jpeg_fails_prepare_or_is_a_counted_skip(tmp_path, good):
    built, out = good
    image = built.root / "flickr30k_images" / "3416050481.jpg"  # used by lines 3 and 4
    truncate_jpeg(image)
    before = snapshot(out)
    line = error_line(prepare(built.root, out, built.split))
    assert "3416050481.jpg" in line and "line 3" in line and "truncated" in line
    assert snapshot(out) == before
    res = prepare(built.root, out, built.split, extra=("--on-error", "skip"))
    assert res.exit_code == 0 and "2 skipped" in res.output, res.output
    assert PreparedDataset(out / "dev").info["images"] == fx.GOOD_IMAGES - 1


def _lone_surrogate_vqa(tmp_path: Path) -> tuple[fx.Built, str]:
    built = fx.build_vqa(tmp_path / "vqa")
    q = built.root / "v2_OpenEnded_mscoco_val2014_questions.json"
    text = q.read_text()
    assert "picture 1000?" in text
    q.write_text(text.replace("picture 1000?", "picture \\ud800 1000?"))  # a JSON escape: valid JSON
    return built, q.name


def _lone_surrogate_vqa_answer(tmp_path: Path) -> tuple[fx.Built, str]:
    # An annotator's answer, in the annotations file: the error names that file, not the questions file.
    built = fx.build_vqa(tmp_path / "vqa")
    a = built.root / "v2_mscoco_val2014_annotations.json"
    text = a.read_text()
    assert text.count('"answer": "Two"') == 1  # the first answer to question 1000
    a.write_text(text.replace('"answer": "Two"', '"answer": "Tw\\ud800o"'))
    return built, a.name


def _lone_surrogate_snli(tmp_path: Path) -> tuple[fx.Built, str]:
    built = fx.build_snli_ve(tmp_path / "snli")
    path = built.root / "snli_ve_dev.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("Hypothesis 1", "Hypothesis \\udc00 1")
    path.write_text("\n".join(lines) + "\n")
    return built, path.name


@pytest.mark.parametrize(
    ("source", "make", "where", "field"),
    [
        ("vqa", _lone_surrogate_vqa, "question_id=1000", "question"),
        ("vqa", _lone_surrogate_vqa_answer, "question_id=1000 answers[0]", "answer"),
        ("snli_ve", _lone_surrogate_snli, "line 2", "hypothesis"),
    ],
)
def test_lone_surrogate_in_text_fails_prepare_or_is_a_counted_skip(tmp_path, source, make, where, field):
    built, file_name = make(tmp_path)
    out = tmp_path / "out"
    line = error_line(prepare(built.root, out, built.split, source=source))
    assert file_name in line and where in line and f"field '{field}'" in line and "lone surrogate" in line
    assert not out.exists()
    res = prepare(built.root, out, built.split, source=source, extra=("--on-error", "skip"))
    assert res.exit_code == 0 and "1 skipped" in res.output, res.output
    # What was kept is text every later stage can hash.
    assert all(text_hash(i.student_text()) for i in PreparedDataset(out / built.split).iter_instances())


def test_only_stale_temp_folders_of_dead_runs_on_this_host_are_removed(tmp_path, good):
    from pipeline.process import pid_namespace, proc_start, proc_state

    built, out = good
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while proc_state(zombie.pid) not in ("Z", ""):  # exited, not yet reaped
        time.sleep(0.01)
    host, ns, me = socket.gethostname(), pid_namespace(), os.getpid()
    marks = {
        "stale": f"{host} {dead.pid} {ns} -",
        "zombie": f"{host} {zombie.pid} {ns} -",
        # the writer's pid now names another process (this one, started at another time)
        "reused": f"{host} {me} {ns} {proc_start(me) + 1}",
        "live": f"{host} {me} {ns} {proc_start(me)}",
        # another container on the same host name and volume: its pids are not this namespace's to judge
        "other-container": f"{host} {dead.pid} {ns}0 -",
        "start-unrecorded": f"{host} {dead.pid} {ns}",  # the previous version's mark: judged without it
        "live-start-unrecorded": f"{host} {me} {ns}",
        "no-namespace": f"{host} {dead.pid}",  # whose pid it is cannot be told
        "unmarked": None,
    }
    for name, mark in marks.items():
        folder = out / f".dev.tmp-{name}"
        folder.mkdir()
        (folder / "instances-000000.tar").write_bytes(b"partial")
        if mark is not None:
            (folder / ".clip-td-partial").write_text(mark + "\n")
    assert prepare(built.root, out, built.split).exit_code == 0
    removed = {"stale", "zombie", "reused", "start-unrecorded"}
    assert {n for n in marks if (out / f".dev.tmp-{n}").exists()} == set(marks) - removed
    zombie.wait()


def test_writer_used_as_context_manager_leaves_nothing_when_the_body_raises(tmp_path):
    dest = tmp_path / "a" / "split"
    with pytest.raises(RuntimeError), DatasetWriter(dest, source="test", split="split") as w:
        w.add_image("img", b"\x89PNG not checked here", "png")
        w.add_instance(Instance(key="k", task="caption", image_id="img", split="split", caption="a cat"))
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_split_folder_gets_the_permissions_of_any_new_folder(tmp_path, good):
    _, out = good
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "dev").stat().st_mode & 0o777 == 0o777 & ~umask


def test_out_below_a_file_is_one_line_naming_it(tmp_path):
    built = fx.build_snli_ve(tmp_path / "snli")
    (tmp_path / "file").write_text("user data")
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, tmp_path / "file" / "out", built.split))
    assert str(tmp_path / "file" / "out") in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["dataset.json", "images.index.json"])
@pytest.mark.parametrize("damage", [b"", b'{"format_version": 1', b"[1, 2]", b"\xff\xfe"])
def test_damaged_metadata_of_a_prepared_split_is_named_when_read(tmp_path, good, name, damage):
    _, out = good
    (out / "dev" / name).write_bytes(damage)
    with pytest.raises(DataError) as info:
        PreparedDataset(out / "dev")
    assert info.value.file == str(out / "dev" / name)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("data.shard_size=0", "data.shard_size"),
        ("data.image_shard_size=-3", "data.image_shard_size"),
        ("data.splits=[]", "no split to convert"),
    ],
)
def test_params_that_would_write_nonsense_are_refused(tmp_path, good, setting, named):
    built, out = good
    before = snapshot(out)
    res = CliRunner().invoke(
        main, ["--source", "snli_ve", "--root", str(built.root), "--out", str(out), "--set", setting]
    )
    assert named in error_line(res)
    assert snapshot(out) == before


def test_json_nested_too_deeply_is_a_line_not_a_recursion_traceback(tmp_path):
    built = fx.build_snli_ve(tmp_path / "snli")
    path = built.root / "snli_ve_dev.jsonl"
    path.write_text(path.read_text() + "[" * 100_000 + "\n")
    line = error_line(prepare(built.root, tmp_path / "out", built.split))
    assert "snli_ve_dev.jsonl" in line and "line 7" in line and "nested too deeply" in line
    res = prepare(built.root, tmp_path / "out", built.split, extra=("--on-error", "skip"))
    assert res.exit_code == 0 and "1 skipped" in res.output, res.output


def test_input_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    built = fx.build_snli_ve(tmp_path / "snli")
    image = built.root / "flickr30k_images" / "3416050481.jpg"
    image.unlink()
    image.symlink_to("/dev/zero")  # reading it would never end
    line = error_line(prepare(built.root, tmp_path / "out", built.split))
    assert "3416050481.jpg" in line and "not a regular file" in line
    jsonl = built.root / "snli_ve_dev.jsonl"
    jsonl.unlink()
    os.mkfifo(jsonl)  # opening it for reading would block
    line = error_line(prepare(built.root, tmp_path / "out", built.split))
    assert "snli_ve_dev.jsonl" in line and "not a regular file" in line


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"source": "mine"}', "not written by prepare_data"),
        (b'{"format_version": 0, "fingerprint": "x"}', "format_version 0"),
    ],
)
def test_folder_whose_dataset_json_is_not_ours_is_refused(tmp_path, good, content, why):
    built, out = good
    (out / "dev" / "dataset.json").write_bytes(content)
    before = snapshot(tmp_path)
    line = error_line(prepare(built.root, out, built.split))
    assert str(out / "dev") in line and why in line
    assert snapshot(tmp_path) == before
