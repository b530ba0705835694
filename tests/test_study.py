"""The evidence study's grid (study/params.yaml, study/dvc.yaml) and its report (pipeline/study/)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.report.plots import lowshot_series
from pipeline.study import (
    ENTRY_KEYS,
    DoseGroup,
    Group,
    StudyError,
    StudyParams,
    cells,
    load_study,
)
from pipeline.study.aggregate import collect_study, load_zeroshot_files, summarise_study
from pipeline.study.report import lowshot_curve, write_study_report

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path, study: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"study": study}))
    return p


def test_study_seeds_must_be_disjoint_from_tuning_seeds_and_keys_are_checked(tmp_path):
    with pytest.raises(StudyError, match=r"study\.seeds.*\[1\].*disjoint"):
        load_study(_write(tmp_path, {"seeds": [1, 100], "tuning_seeds": [0, 1]}))
    with pytest.raises(StudyError, match=r"study\.main\.methods.*'clip_tdd'"):
        load_study(_write(tmp_path, {"main": {"conditions": ["full"], "methods": ["clip_tdd"]}}))
    with pytest.raises(StudyError, match=r"study\.main\.conditions.*lowshot-2"):
        load_study(_write(tmp_path, {"main": {"conditions": ["lowshot-2"], "methods": ["baseline"]}}))
    with pytest.raises(StudyError, match=r"study\.stepz"):
        load_study(_write(tmp_path, {"stepz": 3}))
    # The committed study parameters load, with study seeds disjoint from the tuning seeds.
    sp = load_study(ROOT / "study" / "params.yaml")
    assert sp.seeds and not set(sp.seeds) & set(sp.tuning_seeds)


def _resolve(value, params: dict):
    m = re.fullmatch(r"\$\{(.+)\}", str(value))
    if not m:
        return value
    node = params
    for part in m.group(1).split("."):
        node = node[part]
    return node


def test_dvc_matrices_expand_to_exactly_the_cells_the_report_reads():
    """study/dvc.yaml's matrix stages and pipeline.study.cells must name the same run directories, or the
    report would wait for cells no stage trains (or ignore cells the study paid for)."""
    params = yaml.safe_load((ROOT / "study" / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "study" / "dvc.yaml").read_text())["stages"]
    dirs = []
    for stage in stages.values():
        if "matrix" not in stage:
            continue
        keys = list(stage["matrix"])
        for combo in itertools.product(*(_resolve(stage["matrix"][k], params) for k in keys)):
            item = dict(zip(keys, combo, strict=True))
            out = next(iter(stage["outs"][-1]))  # .../eval.json
            dirs.append(
                str(
                    Path(re.sub(r"\$\{item\.(\w+)\}", lambda m, item=item: str(item[m.group(1)]), out)).parent
                )
            )
    assert len(dirs) == len(set(dirs)), "two matrix stages write the same cell"
    sp = load_study(ROOT / "study" / "params.yaml")
    assert sorted(dirs) == sorted(str(c.run_dir("study/runs")) for c in cells(sp))


def test_study_results_are_committed_and_checkpoints_are_not_outputs():
    """The study outlives a machine: every cell's outputs (train.json, eval.json) and every study JSON must be
    files git keeps, so a fresh clone that rebuilds the shared artifacts finds finished cells up to date. A
    cell's student.pt must be git-ignored and must not be an output (a missing output reruns the cell)."""
    import subprocess

    stages = yaml.safe_load((ROOT / "study" / "dvc.yaml").read_text())["stages"]
    json_outs, cell_outs = [], []
    for stage in stages.values():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            if path.endswith(".json"):
                json_outs.append(path)
            if "matrix" in stage:
                cell_outs.append(path)
    assert cell_outs and all(p.rsplit("/", 1)[-1] in ("train.json", "eval.json") for p in cell_outs)

    def concrete(path: str) -> str:
        return re.sub(r"\$\{item(\.\w+)?\}", "x", path)

    probes = [concrete(p) for p in json_outs]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *probes], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    assert ignored == [], f"study results git would not keep: {ignored}"
    # The cell's checkpoint and its run folder's lock (held while the cell runs) are not results.
    for leftover in ("student.pt", "checkpoint.pt", ".lock"):
        probe = f"study/runs/x-full/x-s1/{leftover}"
        assert subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=ROOT).returncode == 0


SEEDS = [100, 101, 102]


def _study() -> StudyParams:
    return StudyParams(
        seeds=SEEDS,
        tasks=["vqa"],
        main=Group(["lowshot-0.05", "shift", "full"], ["blind", "baseline", "naive_kd", "clip_td"]),
        scratch=Group([], []),
        extra=Group([], []),
        ablation=Group(["lowshot-0.05"], ["clip_td_no_select"]),
        dose=DoseGroup(["shift"], ["clip_td"], steps=[0]),
    )


OFFSET = {"blind": -0.20, "baseline": 0.0, "naive_kd": 0.01, "clip_td": 0.05, "clip_td_no_select": 0.02}


def _eval(runs: Path, variant: str, cond: str, method: str, seed: int, value: float) -> None:
    d = runs / variant / f"vqa-{cond}-{method}-s{seed}"
    d.mkdir(parents=True)
    data = {
        "run": {"task": "vqa", "condition": cond, "method": method, "seed": seed},
        "primary_metric": "vqa_score",
        "primary": value,
        "metrics": {"overall": {"vqa_score": value}, "per_domain": {}, "n": 50},
        "train": {"steps": 20, "train_seconds": 1.0},
        "cell": {"wall_seconds": 2.0, "started": 1000.0 + seed, "finished": 1002.0 + seed},
    }
    (d / "eval.json").write_text(json.dumps(data))


def _fill(
    runs: Path, full_offset: float = 0.05, skip: tuple = (), sp: StudyParams | None = None, scratch_gain=None
) -> None:
    sp = sp or _study()
    for c in cells(sp):
        if (c.condition, c.method, c.seed) in skip:
            continue
        base = 0.40 + 0.03 * (c.seed - 100)  # seeds differ a lot; the paired Δ removes it
        off = OFFSET[c.method]
        if c.teacher == "step0":
            off = 0.001 * (c.seed - 101)  # the random teacher: no gain
        elif c.method == "clip_td" and c.condition == "full":
            off = full_offset
        if c.init == "scratch" and c.method == "clip_td":
            off = scratch_gain(c.seed)
        _eval(runs, c.variant, c.condition, c.method, c.seed, base + off + 0.002 * (c.seed % 2))
    z = {
        "vqa": {c: {"metric": "vqa_score", "score": 0.6, "chance": 0.25, "n": 50} for c in sp.main.conditions}
    }
    (runs / "zeroshot").mkdir()
    (runs / "zeroshot" / "full.json").write_text(json.dumps(z))
    (runs / "zeroshot" / "step0.json").write_text(json.dumps({"vqa": {"shift": {"score": 0.26}}}))
    sel = {
        "teachers": {
            "full": {
                "tasks": {
                    "vqa": {
                        "n": 40,
                        "selected_share": 0.6,
                        "random_share": 0.3,
                        "delta_mean": 0.3,
                        "ci95": [0.2, 0.4],
                        "p": 0.001,
                    }
                }
            }
        },
        "seconds": 3.0,
    }
    (runs / "selection").mkdir()
    (runs / "selection" / "full.json").write_text(json.dumps(sel))


def _status(result) -> dict:
    return {t["id"]: t["status"] for t in result["targets"]}


def test_report_entries_statistics_and_verdicts_come_from_the_runs(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "reports"
    _fill(runs)
    result = write_study_report(_study(), runs, out)
    entries = json.loads((out / "summary.json").read_text())
    for e in entries:
        assert set(e) == {*ENTRY_KEYS, "init", "teacher"}
    by = {(e["condition"], e["method"], e["teacher"]): e for e in entries}
    base = by[("shift", "baseline", "full")]
    assert base["delta_mean"] is None and base["ci95"] is None and base["p"] is None and base["n_seeds"] == 3
    clip = by[("shift", "clip_td", "full")]
    assert clip["delta_mean"] == pytest.approx(0.05) and clip["ci95"][0] > 0 and clip["p"] < 0.05
    assert clip["rel_gain_pct"] == pytest.approx(0.05 / base["mean"] * 100)
    # The weaker teacher's cell is paired against the same baseline; the floor and ceiling have entries.
    assert by[("shift", "clip_td", "step0")]["ci95"][0] < 0 < by[("shift", "clip_td", "step0")]["ci95"][1]
    assert by[("shift", "teacher_zeroshot", "full")]["mean"] == 0.6
    assert by[("shift", "blind", "full")]["delta_mean"] == pytest.approx(-0.20)
    s = _status(result)
    assert s["gain_cells"] == "met" and s["rel_gain_vqa_lowshot-0.05"] == "met"
    assert s["full_not_worse"] == "met" and s["beats_naive_kd"] == "met"
    assert s["dose_response"] == "met" and s["selection"] == "met"
    md = (out / "results.md").read_text()
    assert "teacher zero-shot" in md and "blind (text only)" in md and "Teacher dose-response" in md
    assert json.loads((out / "selection.json").read_text())["teachers"]["full"]["tasks"]["vqa"]["n"] == 40
    assert result["wall"]["cells"] == len(cells(_study())) and result["wall"]["other_stage_seconds"] == 3.0
    # The low-shot curve: the main grid's methods (no ablation, no weaker teacher) at every low-shot fraction
    # and full, with the finished teacher's zero-shot score at each.
    assert (out / "lowshot.png").stat().st_size > 0
    summaries = summarise_study(collect_study(_study(), runs)[0])
    zeroshot = load_zeroshot_files({"full": runs / "zeroshot" / "full.json"})
    curve, scores = lowshot_curve(_study(), summaries, zeroshot)
    (series,) = lowshot_series(curve, zeroshot=scores)
    assert series["fractions"] == [0.05, 1.0] and series["zeroshot"] == [(0.05, 0.6), (1.0, 0.6)]
    assert [line["method"] for line in series["lines"]] == ["baseline", "naive_kd", "clip_td", "blind"]
    clip = next(line for line in series["lines"] if line["method"] == "clip_td")
    assert clip["y"] == pytest.approx([0.48 + 0.002 / 3, 0.48 + 0.002 / 3]) and all(
        e > 0 for e in clip["err"]
    )


@pytest.mark.parametrize(
    "scratch_gain, larger",
    [
        (lambda seed: 0.15 + 0.01 * (seed - 100), "scratch"),
        (lambda seed: 0.05 + 0.01 * (seed - 101), "no_difference"),
    ],
)
def test_scratch_and_pretrained_deltas_are_compared_per_seed(tmp_path, scratch_gain, larger):
    runs, out = tmp_path / "runs", tmp_path / "reports"
    sp = _study()
    sp.scratch = Group(["shift"], ["baseline", "clip_td"], inits=["scratch"])
    _fill(runs, sp=sp, scratch_gain=scratch_gain)
    write_study_report(sp, runs, out)
    (c,) = json.loads((out / "targets.json").read_text())["init_contrast"]
    assert (c["task"], c["condition"], c["method"], c["n_seeds"]) == ("vqa", "shift", "clip_td", 3)
    assert c["delta_pretrained"] == pytest.approx(0.05)
    diffs = [scratch_gain(s) - 0.05 for s in SEEDS]
    assert c["diff_mean"] == pytest.approx(sum(diffs) / 3) and c["verdict"] == larger
    assert (c["ci95"][0] > 0) == (larger == "scratch")
    assert c["p_holm"] == pytest.approx(c["p"])  # a family of one row: nothing to adjust
    assert "scratch against pretrained" in (out / "results.md").read_text()


def test_a_relative_gain_needs_an_interval_and_a_family_of_cells_is_adjusted(tmp_path):
    """The relative-gain target is not met on one paired seed (no interval says it is a gain at all); the
    targets that count cells say how many hold once their p-values are adjusted as one family (Holm)."""
    runs, out = tmp_path / "runs", tmp_path / "reports"
    _fill(runs, skip=(("lowshot-0.05", "clip_td", 101), ("lowshot-0.05", "clip_td", 102)))
    result = write_study_report(_study(), runs, out)
    by = {t["id"]: t for t in result["targets"]}
    assert by["rel_gain_vqa_lowshot-0.05"]["status"] == "incomplete"
    shift = next(c for c in by["gain_cells"]["cells"] if c["condition"] == "shift")
    assert shift["p_holm"] == pytest.approx(shift["p"])  # the family's other cell has no p: one test
    assert by["gain_cells"]["value"] == "1 of 2 (1 above 0, 0 below with Holm's adjustment over the 2)"
    md = (out / "results.md").read_text()
    assert (
        "| task | condition | ablation | Δ vs baseline | Δ vs clip_td | 95% CI (vs clip_td) | p | p (Holm) |"
        in md
    )


def test_a_report_refuses_cells_of_another_backbone_and_leaves_the_previous_one(tmp_path, monkeypatch):
    """While a rerun after a backbone change (or any change of the cells' inputs) is under way, study/runs
    holds cells of both: a report over them would pair a method's runs on one with the baseline's on the
    other, and replace the previous complete report with a mixed one that says nothing of it."""
    from click.testing import CliRunner

    from pipeline.study.freshness import BACKBONE
    from stages.study_report import main

    monkeypatch.chdir(tmp_path)
    runs, out = Path("study/runs"), Path("reports/study")
    _fill(runs)
    (tmp_path / "study" / "params.yaml").write_text(yaml.safe_dump({"study": dataclasses.asdict(_study())}))
    root = {"stages": {"pretrain_student": {"outs": [{"path": BACKBONE, "md5": "new.dir"}]}}}
    Path("dvc.lock").write_text(yaml.safe_dump(root))

    def lock(old: set[str]) -> None:
        stages = {
            ev.parent.name: {
                "deps": [{"path": BACKBONE, "md5": "old.dir" if ev.parent.name in old else "new.dir"}],
                "outs": [{"path": str(ev), "md5": "x"}],
            }
            for ev in sorted(runs.glob("*/*/eval.json"))
        }
        Path("study/dvc.lock").write_text(yaml.safe_dump({"stages": stages}))

    report = ["--runs", str(runs), "--teacher", "none.json", "--out", str(out)]
    lock(set())
    r = CliRunner().invoke(main, report)
    assert r.exit_code == 0, r.output
    before = (out / "results.md").read_bytes()
    lock({"vqa-shift-clip_td-s101"})
    r = CliRunner().invoke(main, report)
    assert r.exit_code == 1 and "1 cell(s) were run on other inputs" in r.output
    assert "vqa-shift-clip_td-s101" in r.output and f"{BACKBONE} changed" in r.output
    assert (out / "results.md").read_bytes() == before
    # A copy of the runs elsewhere (benchmarks.study_current's scratch folder) is not judged by the lock.
    shutil.copytree(runs, tmp_path / "copy")
    r = CliRunner().invoke(main, ["--runs", str(tmp_path / "copy"), "--teacher", "none.json", "--out", "o"])
    assert r.exit_code == 0, r.output


def test_a_missed_target_names_its_diagnostics_and_a_partial_study_says_incomplete(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "reports"
    _fill(
        runs, full_offset=-0.05, skip=(("lowshot-0.05", "naive_kd", 102), ("lowshot-0.05", "naive_kd", 101))
    )
    result = write_study_report(_study(), runs, out)
    t = {t["id"]: t for t in result["targets"]}
    assert t["full_not_worse"]["status"] == "missed"
    assert "vqa full" in t["full_not_worse"]["diagnostics"]
    # One naive_kd seed left: no interval, so that target cannot be decided yet.
    assert t["beats_naive_kd"]["status"] == "incomplete"
    assert len(result["missing"]) == 2
    assert "Incomplete: 2 cell(s)" in (out / "results.md").read_text()


def test_a_dose_response_needs_the_finished_teacher_to_beat_the_random_one_seed_for_seed(tmp_path):
    """Means in the right order are not a gain that grows with the teacher: the random teacher's cells here
    score as the finished teacher's give or take seed noise (paired difference +0.007, 95% CI across 0), so
    what the student gains is not shown to be what the teacher learned."""
    runs, out = tmp_path / "runs", tmp_path / "reports"
    _fill(runs)
    noise = {100: -0.06, 101: 0.0, 102: 0.04}
    for seed, dn in noise.items():
        full = json.loads((runs / "pretrained-full" / f"vqa-shift-clip_td-s{seed}" / "eval.json").read_text())
        rnd = runs / "pretrained-step0" / f"vqa-shift-clip_td-s{seed}" / "eval.json"
        data = json.loads(rnd.read_text())
        data["primary"] = data["metrics"]["overall"]["vqa_score"] = full["primary"] + dn
        rnd.write_text(json.dumps(data))
    result = write_study_report(_study(), runs, out)
    (cell,) = next(t for t in result["targets"] if t["id"] == "dose_response")["cells"]
    assert cell["gain_with_full_teacher"] and cell["means_ordered"] and cell["vanishes_at_random"]
    assert not cell["beats_random_teacher"] and cell["ok"] is False
    dose = json.loads((out / "targets.json").read_text())["dose"]
    full_row = next(d for d in dose if d["steps"] != 0)
    assert full_row["vs_random"]["mean"] == pytest.approx(-sum(noise.values()) / 3)
    assert full_row["vs_random"]["ci95"][0] < 0 < full_row["vs_random"]["ci95"][1]
    assert "| vs random teacher | 95% CI |" in (out / "results.md").read_text()


def test_dose_response_without_any_gain_is_a_miss_not_a_trivially_growing_curve(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "reports"
    OFFSET_NONE = {**OFFSET, "clip_td": 0.0}
    sp = _study()
    for c in cells(sp):
        value = 0.40 + 0.03 * (c.seed - 100) + (OFFSET_NONE[c.method] if c.teacher == "full" else 0.0)
        _eval(
            runs,
            c.variant,
            c.condition,
            c.method,
            c.seed,
            value + 0.001 * (c.seed % 2) * (c.method == "clip_td"),
        )
    result = write_study_report(sp, runs, out)
    dose = next(t for t in result["targets"] if t["id"] == "dose_response")
    assert dose["status"] == "missed" and dose["cells"][0]["gain_with_full_teacher"] is False


def test_a_miss_is_explained_by_the_floor_and_by_plain_distillation_when_the_numbers_say_so():
    from pipeline.study.targets import explain

    def entry(method, mean, delta=None, ci=None):  # summarise()'s row, as targets() passes it
        return {"task": "vqa", "condition": "lowshot-0.01", "method": method, "mean": mean,
                "paired": None if delta is None else {"mean": delta, "ci95": ci}}  # fmt: skip

    summary = [entry("baseline", 0.47), entry("blind", 0.40, -0.07, [-0.10, -0.03]),
               entry("clip_td", 0.36, -0.11, [-0.15, -0.07]), entry("naive_kd", 0.39, -0.08, [-0.12, -0.04])]  # fmt: skip
    why = explain("vqa", "lowshot-0.01", summary, {}, None, [])
    assert any("below the blind floor (0.400)" in w for w in why)
    assert any("naive_kd Δ -0.080" in w for w in why)
    # Neither is claimed when the numbers do not show it.
    summary[2], summary[3] = (
        entry("clip_td", 0.45, -0.02, [-0.05, 0.01]),
        entry("naive_kd", 0.47, 0.0, [-0.02, 0.02]),
    )
    why = explain("vqa", "lowshot-0.01", summary, {}, None, [])
    assert not any("floor" in w or "naive_kd" in w for w in why)
    # With per-seed Δs (as summarise gives them) the floor is a paired test: a mean below it within the seeds'
    # noise is "at" the floor, not below it.
    seeds = [100, 101, 102]
    summary[1]["paired"] |= {"seeds": seeds, "diffs": [-0.07, -0.06, -0.08]}
    summary[2] = entry("clip_td", 0.39, -0.08, [-0.2, 0.04])
    summary[2]["paired"] |= {"seeds": seeds, "diffs": [-0.12, -0.02, -0.10]}
    why = explain("vqa", "lowshot-0.01", summary, {}, None, [])
    assert any("is at the blind floor (0.400, paired 95% CI [" in w for w in why)
    summary[2]["paired"]["diffs"] = [-0.11, -0.09, -0.10]
    why = explain("vqa", "lowshot-0.01", summary, {}, None, [])
    assert any("falls below the blind floor (0.400, paired 95% CI [-0.055, -0.005])" in w for w in why)


def test_only_the_cells_that_missed_are_explained():
    from pipeline.study.targets import needs_explaining

    # Dose rows carry ok, not verdict: the passed ones were explained as misses.
    assert not needs_explaining("dose_response", {"task": "vcr", "condition": "shift", "ok": True})
    assert needs_explaining("dose_response", {"task": "vqa", "condition": "shift", "ok": False})
    assert not needs_explaining("gain_cells", {"verdict": "gain"})
    assert needs_explaining("gain_cells", {"verdict": "loss"})
    assert needs_explaining("rel_gain", {"verdict": "gain"})  # a gain below the relative bar still missed


def test_a_selection_that_beats_random_only_by_position_is_named_as_the_reason():
    from pipeline.study.targets import explain

    summary = [{"task": "vqa", "condition": "shift", "method": "baseline", "mean": 0.6, "delta_mean": None,
                "ci95": None}]  # fmt: skip

    def selection(vs_fixed_ci):
        r = {"n": 700, "selected_share": 0.18, "random_share": 0.14, "delta_mean": 0.04, "ci95": [0.03, 0.05],
             "fixed_share": 0.18, "prior_share": 0.25,
             "vs_fixed": {"delta_mean": 0.0, "ci95": vs_fixed_ci, "p": 0.9}}  # fmt: skip
        return {"teachers": {"full": {"tasks": {"vqa": r}}}}

    why = explain("vqa", "shift", summary, {}, selection([-0.01, 0.01]), [])
    assert any("selects by position" in w and "fixed 0.180" in w for w in why)
    why = explain("vqa", "shift", summary, {}, selection([0.01, 0.03]), [])
    assert not any("position" in w for w in why)
    # Beating the fixed cells but not the same image under another text: not targeted.
    untargeted = selection([0.01, 0.03])
    untargeted["teachers"]["full"]["tasks"]["vqa"].update(
        other_text_share=0.18, vs_other_text={"delta_mean": 0.0, "ci95": [-0.01, 0.01], "p": 0.8}
    )
    why = explain("vqa", "shift", summary, {}, untargeted, [])
    assert any("not targeted" in w and "0.180 with another instance's text" in w for w in why)
    # Worse than another instance's text, with the interval below 0: the text steers the selection away.
    untargeted["teachers"]["full"]["tasks"]["vqa"].update(
        other_text_share=0.22, vs_other_text={"delta_mean": -0.04, "ci95": [-0.06, -0.02], "p": 0.001}
    )
    why = explain("vqa", "shift", summary, {}, untargeted, [])
    assert any("steers the selection away" in w and "0.220 with another" in w for w in why)
    # A selection file written before the fixed control existed explains nothing new and breaks nothing.
    old = selection(None)
    del old["teachers"]["full"]["tasks"]["vqa"]["vs_fixed"]
    assert not any("position" in w for w in explain("vqa", "shift", summary, {}, old, []))


def test_the_committed_study_report_regenerates_from_the_studys_committed_files(tmp_path):
    """reports/study is generated, never typed: `python -m stages.study_report` with its defaults, on the
    committed study/runs and study/params.yaml alone (the finished teacher's record included), must give the
    committed results.md, summary.json, targets.json and selection.json byte for byte. Fails when report
    code changes what the study says without the report being regenerated, or when the report reads a file
    the study does not hold (metrics/teacher.json differs with the CPU that last ran `make repro`)."""
    from click.testing import CliRunner

    from benchmarks import study_current
    from pipeline.study.freshness import stale_cells
    from stages.study_report import main

    out = tmp_path / "study"
    # While a rerun after a change of the study's inputs is under way, reports/study is the previous complete
    # report (its cells' files are being replaced); what the committed files give then is the interim record
    # of the cells already rerun, which must regenerate byte for byte instead; before the first of them is
    # in there is none, and the command says so.
    rerun = bool(stale_cells(ROOT / "dvc.lock", ROOT / "study" / "dvc.lock"))
    command, committed = (
        (study_current.main, study_current.RECORD) if rerun else (main, Path("reports/study"))
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        if rerun and not study_current.current_cells(Path("dvc.lock"), Path("study/dvc.lock")):
            r = CliRunner().invoke(command, ["--out", str(out)])
            assert r.exit_code == 1 and "none rerun yet" in r.output, r.output
            assert not out.exists()
            return
        r = CliRunner().invoke(command, ["--out", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("results.md", "summary.json", "targets.json", "selection.json"):
        assert (out / name).read_bytes() == (ROOT / committed / name).read_bytes(), name


def test_the_teacher_record_drops_timings_and_refuses_what_is_not_teacher_metrics(tmp_path, monkeypatch):
    """The study keeps the finished teacher's metrics without the clock: retraining the same teacher leaves the
    record byte for byte (so the report's inputs stay as they were); a file that is not pretrain_teacher's
    metrics is one error line naming it, and nothing is written."""
    from click.testing import CliRunner

    from stages.study_teacher import main

    metrics = json.loads((ROOT / "metrics" / "teacher.json").read_text())
    out = tmp_path / "runs" / "metrics" / "teacher-full.json"
    records = []
    for seconds in (12.5, 700.0):
        src = tmp_path / f"teacher-{seconds}.json"
        src.write_text(json.dumps({**metrics, "seconds": seconds, "seconds_per_step": seconds / 600}))
        r = CliRunner().invoke(main, ["--teacher", str(src), "--out", str(out)])
        assert r.exit_code == 0, r.output
        records.append(out.read_bytes())
    assert records[0] == records[1]
    rec = json.loads(records[0])
    assert "seconds" not in rec and "load_seconds" not in rec
    assert rec["steps"] == metrics["steps"] and rec["all"] == metrics["all"]

    out.unlink()
    for bad, says in (("{not json", "unreadable"), (json.dumps({"steps": 3}), "random_top1")):
        src = tmp_path / "bad.json"
        src.write_text(bad)
        r = CliRunner().invoke(main, ["--teacher", str(src), "--out", str(out)])
        assert r.exit_code != 0 and str(src) in r.output and says in r.output
        assert len(r.output.strip().splitlines()) == 1
        assert not out.exists()

    # A write that fails halfway (a full disk) leaves the previous record and no partial copy beside it.
    out.write_bytes(records[0])
    real_write = Path.write_text

    def disk_full(self, text, *a, **k):
        real_write(self, text[: len(text) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    r = CliRunner().invoke(main, ["--teacher", str(tmp_path / "teacher-12.5.json"), "--out", str(out)])
    assert r.exit_code != 0 and isinstance(r.exception, OSError)
    assert out.read_bytes() == records[0] and [p.name for p in out.parent.iterdir()] == [out.name]
