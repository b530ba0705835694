"""`python -m stages.verify_cache`: a clean store passes; each kind of damage fails its check, naming the unit,
array, row or id at fault, with a non-zero exit status."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import cache as C
from pipeline import extract as X
from pipeline.config import CacheParams
from pipeline.verify import verify_store
from stages.verify_cache import main
from tests.conftest import TINY_CFG, build_dataset, tiny_teacher_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("verify")
    cfg, ckpt = tiny_teacher_files(root, "tiny-verify.json")
    ds = build_dataset(root / "train", 6)
    url = str(root / "clean.zarr")
    cp = dataclasses.replace(
        CacheParams(),
        image_rows_per_unit=2,
        text_rows_per_unit=4,
        batch_size=4,
        num_workers=0,
        target_chunk_bytes=2048,
    )
    X.extract(
        [ds], url, X.TeacherSpec(str(cfg), str(ckpt), "fp32", "cpu"), cp, scheduler="sync", progress=False
    )
    return url


@pytest.fixture
def store(clean, tmp_path) -> str:
    """A private copy to damage."""
    dst = str(tmp_path / "store.zarr")
    shutil.copytree(clean, dst)
    return dst


def verify(url: str, *extra: str) -> tuple[int, str, dict]:
    out = Path(url).parent / "report.json"
    r = CliRunner().invoke(main, [url, "--json", str(out), *extra])
    report = json.loads(out.read_text()) if out.exists() else {}
    return r.exit_code, r.output, report


def line(output: str, check: str) -> str:
    return next(ln for ln in output.splitlines() if ln.split()[1:2] == [check])


def test_clean_store_passes_every_check(clean):
    code, out, report = verify(clean)
    assert code == 0, out
    assert report["ok"] and [c["name"] for c in report["checks"]] == [
        "format", "shapes", "offsets", "ids", "manifest", "checksums", "nonfinite"
    ]  # fmt: skip
    assert all(ln.startswith("OK") for ln in out.splitlines()[1:8]) and "RESULT OK: 7/7" in out
    assert "manifest   13/13 planned units committed, 0 unknown" in out  # 3 image + 10 text units
    assert "0 non-finite row(s)" in line(out, "nonfinite")


def test_help_explains_the_checks_and_exit_status():
    out = CliRunner().invoke(main, ["--help"]).output
    for word in ("checksums", "nonfinite", "manifest", "offsets", "--json", "Exit status: 0"):
        assert word in out


def test_module_entry_point_exits_non_zero_on_damage(store):
    os.remove(Path(store) / C.MANIFEST / "text-000001.json")
    r = subprocess.run(
        [sys.executable, "-m", "stages.verify_cache", store, "--no-scan"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 1
        and "FAIL  manifest" in r.stdout
        and "text-000001: planned but not committed" in r.stdout
    )


def test_region_rewritten_with_other_values_fails_checksum_naming_the_unit(store):
    g = C.open_group(store, mode="r+")
    tokens = g["image/tokens"]
    tokens[3] = tokens[3] * 2  # valid data, wrong numbers: only the manifest's crc32 can tell
    code, out, report = verify(store)
    assert code == 1 and report["failed"] == ["checksums"]
    assert "image-000001: image/tokens rows [2, 4) (inner chunk of unit rows [2, 4)) crc32" in line(
        out, "checksums"
    )
    assert "1 unit(s) differ" in line(out, "checksums")


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_a_flipped_byte_inside_one_inner_chunk_is_named_by_its_rows(tmp_path, compressor):
    root = tmp_path
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    ds = build_dataset(root / "train", 8)
    url = str(root / "s.zarr")
    cp = dataclasses.replace(
        CacheParams(), image_rows_per_unit=4, text_rows_per_unit=8, batch_size=4, num_workers=0,
        target_chunk_bytes=1024, compressor=compressor,
    )  # fmt: skip
    X.extract([ds], url, X.TeacherSpec(str(cfg), "", "fp32", "cpu"), cp, scheduler="sync", progress=False)
    tokens = C.open_group(url, mode="r+")["image/tokens"]
    assert tokens.chunks[0] == 1  # one image row per inner chunk, four per unit
    row = tokens[6:7]
    row.view(np.uint8).reshape(-1)[37] ^= 0x10  # one bit of one byte
    tokens[6:7] = row
    code, out, report = verify(url)
    assert code == 1 and report["failed"] == ["checksums"]
    faults = next(c for c in report["checks"] if c["name"] == "checksums")["faults"]
    assert len(faults) == 1 and faults[0].startswith(
        "image-000001: image/tokens rows [6, 7) (inner chunk of unit rows [4, 8)) crc32 "
    )


def test_a_manifest_crc32_that_its_chunk_crcs_do_not_chain_to_is_a_fault(store):
    rec = C.committed_units(store)["image-000000"]
    rec["arrays"]["image/pooled"]["crc32"] = "00000000"
    C.commit_unit(store, "image-000000", rec)
    code, out, report = verify(store)
    assert code == 1 and report["failed"] == ["checksums"]
    assert "image-000000: image/pooled rows [0, 2) crc32" in line(out, "checksums")
    assert "the entry's crc32 was changed" in out


def test_overwritten_shard_bytes_fail_checksum_naming_the_unit(store):
    shard = Path(store) / "text" / "pooled" / "c" / "1" / "0"  # text unit 1's shard of text/pooled
    data = bytearray(shard.read_bytes())
    mid = len(data) // 3
    data[mid : mid + 32] = bytes(b ^ 0xFF for b in data[mid : mid + 32])
    shard.write_bytes(bytes(data))
    code, out, report = verify(store)
    assert code == 1 and "checksums" in report["failed"]
    assert "text-000001: text/pooled rows [4, 8)" in line(out, "checksums")


def test_nan_fails_the_scan_naming_array_row_and_id(store):
    g = C.open_group(store, mode="r+")
    pooled = g["image/pooled"][:]
    pooled[4, 7] = np.nan
    g["image/pooled"][:] = pooled
    offsets = g["text/offsets"][:]
    tokens = g["text/tokens"]
    tokens[int(offsets[5]) + 1] = np.full(tokens.shape[1], np.inf, np.float16)
    code, out, report = verify(store)
    assert code == 1 and set(report["failed"]) == {"checksums", "nonfinite"}
    scan = line(out, "nonfinite")
    image_id, text_id = str(g["image/ids"][4]), str(g["text/ids"][5])
    assert f"image/pooled row 4 (image {image_id!r}): NaN/Inf" in scan
    assert f"text/tokens row {int(offsets[5]) + 1} (text {text_id!r}): NaN/Inf" in scan
    assert "2 non-finite row(s)" in scan
    code, out, _ = verify(store, "--no-scan")  # the scan can be left out; checksums still catch the change
    assert code == 1 and "nonfinite" not in out


def test_deleted_or_foreign_manifest_entries_fail_the_manifest_check(store):
    os.remove(Path(store) / C.MANIFEST / "image-000002.json")
    (Path(store) / C.MANIFEST / "image-000099.json").write_text(
        json.dumps({"unit": "image-000099", "arrays": {}})
    )
    code, out, report = verify(store)
    assert code == 1 and report["failed"] == ["manifest"]
    m = line(out, "manifest")
    assert "12/13 planned units committed, 1 unknown" in m
    assert "image-000002: planned but not committed" in m and "image-000099: committed but not part" in m


@pytest.mark.parametrize(
    ("damage", "check", "says"),
    [
        ("offsets", "offsets", "offsets decrease at text 2"),
        ("ids", "ids", "repeats"),
        ("attrs", "shapes", "image/tokens: shape (6, 16, 32) != (6, 12, 32)"),
        ("incomplete", "format", "not marked complete"),
    ],
)
def test_structural_damage_fails_its_check(store, damage, check, says):
    g = C.open_group(store, mode="r+")
    if damage == "offsets":
        off = g["text/offsets"][:]
        off[3] = off[2] - 1
        g["text/offsets"][:] = off
    elif damage == "ids":
        ids = g["image/ids"][:]
        ids[1] = ids[0]
        g["image/ids"][:] = ids
    elif damage == "attrs":
        g.attrs["num_patches"] = 12
    else:
        g.attrs["complete"] = False
    code, out, report = verify(store, "--no-scan")
    assert code == 1 and check in report["failed"], out
    assert says in line(out, check)


def test_not_a_cache_exits_2(tmp_path):
    r = CliRunner().invoke(main, [str(tmp_path)])
    assert r.exit_code == 2 and "no teacher cache here" in r.output


def test_a_params_file_that_does_not_exist_is_refused_not_replaced_by_the_defaults(tmp_path, monkeypatch):
    # Falling back to params.yaml's defaults would verify another store than the one meant and exit 0.
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["--params", "real/param.yaml", "--no-scan"])
    assert r.exit_code == 2 and "--params real/param.yaml: no such file" in r.output


def test_api_report_matches_the_cli(clean):
    report = verify_store(clean, scan=False)
    assert report.ok and [c.name for c in report.checks][-1] == "checksums"


def test_truncated_root_metadata_exits_2_naming_the_file(store):
    meta = Path(store) / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    r = CliRunner().invoke(main, [store])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: {meta}: not valid JSON") and lines[0].endswith("metadata is damaged")


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [("grid", "eight", "grid = 'eight' (an integer >= 1)"), ("units", "x", "units = 'x' (an object)"),
     ("fingerprint", [1], "fingerprint = [1] (an object)"), ("logit_scale", None, "logit_scale = None")],
)  # fmt: skip
def test_damaged_root_attributes_stop_verify_and_readers_naming_the_key(store, key, value, says):
    """Valid JSON, wrong values (a hand edit, a damaged copy): every reader trusts these numbers, so verify,
    training and zero-shot stop in one line naming zarr.json and the key, not in a conversion deep inside."""
    meta = Path(store) / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][key] = value
    meta.write_text(json.dumps(doc))
    r = CliRunner().invoke(main, [store])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith(f"Error: {meta}: damaged root attributes: ") and says in lines[0]
    with pytest.raises(C.CacheFormatError, match="damaged root attributes"):
        C.TeacherCache(store)


def test_garbage_manifest_entry_is_a_manifest_fault_naming_the_file(store):
    entry = Path(store) / C.MANIFEST / "image-000001.json"
    entry.write_text("garbage{")
    code, out, report = verify(store, "--no-scan")
    assert code == 1 and report["failed"] == ["manifest"], out  # the other units' checksums still ran
    m = line(out, "manifest")
    assert f"image-000001: entry unreadable: {entry}: not valid JSON" in m and "1 entry unreadable" in m
    assert "12 units, 0 unit(s) differ" in line(out, "checksums")


def test_truncated_array_metadata_names_the_file(store):
    meta = Path(store) / "image" / "tokens" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    code, out, report = verify(store)
    assert code == 1 and {"shapes", "checksums"} <= set(report["failed"]) and "Traceback" not in out
    assert f"{meta}: cannot open array image/tokens" in line(out, "shapes")
    assert f"image-000000: {meta}" in line(out, "checksums")
    assert line(out, "nonfinite").startswith("OK")  # the readable arrays were still scanned
