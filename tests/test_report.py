"""The report stage: statistics checked against hand-computed values, markdown, plots and error handling."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.report import (
    ReportError,
    betainc,
    collect,
    holm,
    load_zeroshot,
    lowshot_series,
    markdown,
    paired_test,
    plot_lowshot,
    plot_shift,
    summarise,
    t_cdf,
    t_quantile,
)
from stages.report import main
from tests.conftest import REPO

BASE = [0.40, 0.42, 0.44]  # mean 0.42, std 0.02
TD = [0.46, 0.47, 0.51]  # mean 0.48; paired diffs 0.06, 0.05, 0.07 → mean 0.06, std 0.01; gain 14.29 %
# Paired CI by hand: se = 0.01 / √3; t(0.975, 2) = 0.95 / √(2 · 0.975 · 0.025) = 4.30265 → 0.06 ± 0.024841.
# t = 0.06 / se = 6√3; with 2 df the t CDF is ½ + t / (2√(2 + t²)), so p = 1 − √(108 / 110) = 0.00913.
TD_CI = (0.06 - 0.024841, 0.06 + 0.024841)
TD_P = 1 - math.sqrt(108 / 110)
# pooled_fd: diffs 0.02, 0.05, 0.08 → mean 0.05 > std 0.03 (the old rule's "difference"), but the 95% CI
# 0.05 ± 4.303 · 0.03 / √3 = [−0.0245, 0.1245] holds 0: not marked.
POOLED = [0.02, 0.05, 0.08]
# clip_td_no_select: consistently worse → the CI lies below 0: a loss.
NO_SELECT = [-0.05, -0.06, -0.04]
# blind: the text-only floor, well below the baseline.
BLIND = [0.25, 0.26, 0.24]


def write_eval(
    runs: Path, task: str, condition: str, method: str, seed: int, primary: float, **extra
) -> Path:
    metric = {"vqa": "vqa_score", "snli_ve": "accuracy", "vcr": "q2ar"}[task]
    overall = {metric: primary, **extra}
    # full tests every domain, so it carries the shift target (outline) too: the shift plot's reference bar.
    domains = {"shift": ["outline"], "full": ["plain", "outline"]}.get(condition, ["plain"])
    d = runs / f"{task}-{condition}-{method}-s{seed}"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(
        json.dumps(
            {
                "run": {"task": task, "condition": condition, "method": method, "seed": seed},
                "primary_metric": metric,
                "primary": primary,
                "metrics": {
                    "n": 10,
                    "overall": overall,
                    "per_domain": {d: {"n": 10, **overall} for d in domains},
                },
                "train": {"steps": 100, "train_seconds": 2.0, "best_val": None, "student_parameters": 1000},
            }
        )
    )
    return d / "eval.json"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    r = tmp_path / "runs"
    for seed, (b, t) in enumerate(zip(BASE, TD, strict=True)):
        # VCR carries secondaries: q2a = primary + 0.1 for both methods, so the q2a paired diff equals the primary's.
        write_eval(r, "vcr", "lowshot-0.05", "baseline", seed, b, q2a=b + 0.1, qa2r=0.5)
        write_eval(r, "vcr", "lowshot-0.05", "clip_td", seed, t, q2a=t + 0.1, qa2r=0.5)
        write_eval(r, "vcr", "full", "baseline", seed, b + 0.2)
        write_eval(r, "vcr", "full", "clip_td", seed, t + 0.2)
        write_eval(r, "vcr", "shift", "baseline", seed, b - 0.1)
        # naive_kd: noisy around the baseline → paired |mean| < std.
        write_eval(r, "vcr", "lowshot-0.05", "naive_kd", seed, b + [0.03, -0.04, 0.02][seed])
        write_eval(r, "vcr", "lowshot-0.05", "pooled_fd", seed, b + POOLED[seed])
        write_eval(r, "vcr", "lowshot-0.05", "clip_td_no_select", seed, b + NO_SELECT[seed])
        write_eval(r, "vcr", "lowshot-0.05", "blind", seed, BLIND[seed], q2a=0.3, qa2r=0.3)
    write_eval(r, "snli_ve", "lowshot-0.25", "clip_td", 0, 0.7)  # a single seed, no baseline
    return r


def cell(summary: list[dict], task: str, condition: str, method: str) -> dict:
    (row,) = [r for r in summary if (r["task"], r["condition"], r["method"]) == (task, condition, method)]
    return row


def test_t_distribution_matches_table_values() -> None:
    # Two-sided 95% critical values from any t table, and other quantiles.
    for df, table in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4), df
    assert t_quantile(0.995, 2) == pytest.approx(9.925, abs=5e-4)
    assert t_quantile(0.95, 5) == pytest.approx(2.015, abs=5e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)
    # Closed forms: Cauchy (1 df) and 2 df.
    assert t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)
    assert t_cdf(3.0, 2) == pytest.approx(0.5 + 3 / (2 * math.sqrt(11)), abs=1e-12)
    assert t_cdf(0.0, 7) == pytest.approx(0.5)
    assert 2 * t_cdf(-2.0, 10) == pytest.approx(0.07339, abs=1e-5)  # two-sided p of t = 2 with 10 df
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # I_0.4(2, 3), a polynomial for integers
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_interval_and_p_value_by_hand() -> None:
    t = paired_test([0.06, 0.05, 0.07])
    assert t["n"] == 3 and t["mean"] == pytest.approx(0.06) and t["std"] == pytest.approx(0.01)
    assert t["ci95"] == pytest.approx(list(TD_CI), abs=1e-6)
    assert t["p"] == pytest.approx(TD_P, abs=1e-9)
    one = paired_test([0.06])
    assert one["mean"] == pytest.approx(0.06) and one["ci95"] is None and one["p"] is None
    assert paired_test([0.0, 0.0])["p"] == 1.0  # identical methods: nothing to see


def test_holm_adjusts_a_family_of_p_values_by_hand() -> None:
    # Sorted 0.01, 0.02, 0.04 of m = 3: 3 × 0.01, 2 × 0.02, then 1 × 0.04 → kept monotone; None is not a test.
    assert holm([0.04, None, 0.01, 0.02]) == pytest.approx([0.04, None, 0.03, 0.04])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, the later rank never below the earlier
    assert holm([]) == []


def test_statistics_match_hand_computation(runs: Path) -> None:
    summary = summarise(collect(runs))
    b = cell(summary, "vcr", "lowshot-0.05", "baseline")
    assert b["n"] == 3 and b["mean"] == pytest.approx(0.42) and b["std"] == pytest.approx(0.02)
    assert b["verdict"] == "baseline" and b["paired"] is None and b["gain_pct"] is None
    t = cell(summary, "vcr", "lowshot-0.05", "clip_td")
    assert t["mean"] == pytest.approx(0.48) and t["std"] == pytest.approx(0.026457513, abs=1e-8)
    assert t["gain_pct"] == pytest.approx((0.48 - 0.42) / 0.42 * 100) == pytest.approx(14.2857, abs=1e-4)
    assert t["paired"]["n"] == 3
    assert t["paired"]["diffs"] == pytest.approx([0.06, 0.05, 0.07])
    assert t["paired"]["mean"] == pytest.approx(0.06) and t["paired"]["std"] == pytest.approx(0.01)
    assert t["paired"]["ci95"] == pytest.approx(list(TD_CI), abs=1e-6)
    assert t["paired"]["p"] == pytest.approx(TD_P, abs=1e-9)
    assert t["verdict"] == "gain"
    # Secondary metric: same values shifted by 0.1 → identical gain on a different base, identical paired diff.
    q2a = t["secondary"]["q2a"]
    assert q2a["mean"] == pytest.approx(0.58) and q2a["paired"]["mean"] == pytest.approx(0.06)
    assert q2a["gain_pct"] == pytest.approx(0.06 / 0.52 * 100) and q2a["verdict"] == "gain"
    assert t["secondary"]["qa2r"]["verdict"] == "no_difference"  # identical values: Δ = 0
    assert cell(summary, "vcr", "lowshot-0.05", "naive_kd")["verdict"] == "no_difference"
    assert cell(summary, "vcr", "shift", "baseline")["per_domain"]["outline"]["mean"] == pytest.approx(0.32)
    one = cell(summary, "snli_ve", "lowshot-0.25", "clip_td")
    assert one["n"] == 1 and one["std"] is None and one["verdict"] == "no_baseline"
    # Order: tasks as in the protocol, low-shot before shift before full, baseline first, the blind floor last.
    order = [(r["task"], r["condition"], r["method"]) for r in summary]
    assert order[:7] == [
        ("snli_ve", "lowshot-0.25", "clip_td"),
        ("vcr", "lowshot-0.05", "baseline"),
        ("vcr", "lowshot-0.05", "naive_kd"),
        ("vcr", "lowshot-0.05", "pooled_fd"),
        ("vcr", "lowshot-0.05", "clip_td"),
        ("vcr", "lowshot-0.05", "clip_td_no_select"),
        ("vcr", "lowshot-0.05", "blind"),
    ]
    assert order[7:] == [
        ("vcr", "shift", "baseline"),
        ("vcr", "full", "baseline"),
        ("vcr", "full", "clip_td"),
    ]


def test_a_cell_is_marked_only_when_its_interval_excludes_zero(runs: Path) -> None:
    summary = summarise(collect(runs))
    pooled = cell(summary, "vcr", "lowshot-0.05", "pooled_fd")
    # |mean Δ| = 0.05 > std Δ = 0.03, which the old rule called a difference; the interval still holds 0.
    assert pooled["paired"]["mean"] > pooled["paired"]["std"]
    lo, hi = pooled["paired"]["ci95"]
    assert lo == pytest.approx(0.05 - 4.302653 * 0.03 / math.sqrt(3), abs=1e-6) and lo < 0 < hi
    assert pooled["verdict"] == "no_difference"
    loss = cell(summary, "vcr", "lowshot-0.05", "clip_td_no_select")
    assert loss["paired"]["ci95"][1] < 0 and loss["verdict"] == "loss"
    blind = cell(summary, "vcr", "lowshot-0.05", "blind")
    assert blind["role"] == "floor" and blind["verdict"] == "loss"  # the baseline beats text alone

    md = markdown(summary, None, None)
    row = {m: " | ".join(cols) for m, cols in table(md, "## vcr — q2ar (primary)").items()}
    assert "▲ gain" in row["clip_td"] and "▼" not in row["clip_td"]
    assert (
        "▲" not in row["pooled_fd"]
        and "▼" not in row["pooled_fd"]
        and "95% CI [-0.025, +0.125]" in row["pooled_fd"]
    )
    assert "▼ loss" in row["clip_td_no_select"]
    assert "▲" not in row["naive_kd"] and "▼" not in row["naive_kd"]
    assert "only when the 95% interval of Δ excludes 0" in md  # the legend says so
    assert "|mean Δ| < std Δ" not in md


def test_one_seed_pair_has_no_interval_and_no_mark(tmp_path: Path) -> None:
    r = tmp_path / "runs"
    write_eval(r, "vqa", "full", "baseline", 0, 0.40)
    write_eval(r, "vqa", "full", "clip_td", 0, 0.90)
    write_eval(r, "vqa", "full", "clip_td", 1, 0.91)  # a second seed the baseline lacks: still one pair
    td = cell(summarise(collect(r)), "vqa", "full", "clip_td")
    assert td["paired"]["n"] == 1 and td["paired"]["ci95"] is None and td["paired"]["p"] is None
    assert td["verdict"] == "few_pairs"
    md = markdown(summarise(collect(r)), None, None)
    td_line = next(line for line in md.splitlines() if line.startswith("| clip_td |"))
    assert "Δ +0.500, 95% CI n/a (1 pair)" in td_line and "▲" not in td_line
    assert "No interval (fewer than 2 seeds run by both the method and baseline): vqa / full / clip_td." in md


def test_the_gain_is_taken_over_the_seeds_both_ran(tmp_path: Path) -> None:
    """A seed missing on one side must not turn the gain printed beside a ▲ into a loss: the gain compares the
    means over the paired seeds, as Δ does."""
    r = tmp_path / "runs"
    for seed, (b, t) in enumerate(zip(BASE, TD, strict=True)):
        write_eval(r, "vqa", "full", "baseline", seed, b)
        write_eval(r, "vqa", "full", "clip_td", seed, t)
    write_eval(r, "vqa", "full", "baseline", 3, 0.95)  # a seed clip_td has not run: lifts the baseline's mean
    td = cell(summarise(collect(r)), "vqa", "full", "clip_td")
    assert td["verdict"] == "gain" and td["paired"]["n"] == 3
    assert td["gain_pct"] == pytest.approx((0.48 - 0.42) / 0.42 * 100)
    td_line = next(
        line for line in markdown(summarise(collect(r)), None, None).splitlines() if "clip_td" in line
    )
    assert "+14.29% ▲" in td_line


def test_float_noise_prints_no_sign_and_a_small_interval_end_keeps_its_own() -> None:
    from pipeline.report.markdown import fmt, fmt_ci

    assert fmt(-1.1102230246251566e-17, sign=True) == "+0.000"  # an exact tie, computed in floats
    assert fmt(-0.0) == "0.000"
    # An interval ending just below 0 excludes it: "-0.000" would read as touching 0 beside a ▼.
    assert fmt_ci([-0.014058, -0.000108589]) == "[-0.014, -0.0001]"
    assert fmt(-0.0000404, sign=True) == "-0.00004" and fmt(0.0123) == "0.012"


def test_markdown_holds_the_computed_values(runs: Path) -> None:
    summary = summarise(collect(runs))
    md = markdown(summary, {"all": {"random_top1": 0.8125}, "loss_curve": [[0, 1.0]]}, None)
    assert (
        "0.480 ± 0.026 (3)<br>Δ +0.060, 95% CI [+0.035, +0.085], p = 0.009 (3 pairs) · +14.29% ▲ gain" in md
    )
    assert "0.420 ± 0.020 (3)" in md
    assert "0.700 ± — (1)" in md  # one seed: no std, no crash
    assert "## vcr — q2ar (primary)" in md and "### vcr — q2a (secondary)" in md
    assert "| all.random_top1 | 0.8125 |" in md and "`loss_curve`" in md
    assert "## Teacher cache (extract)" in md and "Not available" in md
    assert "seeds 0, 1, 2" in md and "snli_ve / lowshot-0.25 / clip_td (1)" in md
    assert (
        "Gains over baseline (95% interval of Δ above 0): vcr / lowshot-0.05 / clip_td; vcr / full / clip_td."
        in md
    )


def table(md: str, heading: str) -> dict[str, list[str]]:
    """The rows of the markdown table under ``heading``: {first column: other columns}."""
    lines = md.split(heading + "\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {cols[0]: cols[1:] for cols in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


def test_floor_and_ceiling_rows_shown_or_not_measured(runs: Path) -> None:
    summary = summarise(collect(runs))
    # Without zero-shot scores: both rows are there, saying what was not measured.
    t = table(markdown(summary, None, None), "## vcr — q2ar (primary)")
    assert list(t)[-2:] == ["blind (text only)", "teacher zero-shot"]
    blind_low, blind_shift, blind_full = t["blind (text only)"]  # conditions: lowshot-0.05, shift, full
    assert blind_low.startswith("0.250 ± 0.010 (3)<br>Δ -0.170") and blind_low.endswith("▼ loss")
    assert blind_shift == blind_full == "not measured"
    assert t["teacher zero-shot"] == ["not measured"] * 3
    snli = table(markdown(summary, None, None), "## snli_ve — accuracy (primary)")
    assert snli["blind (text only)"] == ["not measured"] and snli["teacher zero-shot"] == ["not measured"]
    assert "blind (text only)" in table(markdown(summary, None, None), "### vcr — q2a (secondary)")
    # With zero-shot scores for some conditions: the values, and "not measured" for the rest.
    md = markdown(summary, None, None, {"vcr": {"lowshot-0.05": 0.61, "full": 0.625}})
    t = table(md, "## vcr — q2ar (primary)")
    assert t["teacher zero-shot"] == ["0.610", "not measured", "0.625"]
    assert "not measured for snli_ve / lowshot-0.25; vcr / shift." in md
    # A text floor beside the ceiling (VQA's pick among its question's type), where the file gives one.
    md = markdown(summary, None, None, {"vcr": {"full": 0.625}}, floors={"vcr": {"full": 0.8}})
    assert table(md, "## vcr — q2ar (primary)")["teacher zero-shot"][-1] == "0.625 (text floor 0.800)"
    assert "(no `blind` runs) for snli_ve / lowshot-0.25; vcr / shift; vcr / full." in md


def test_zeroshot_file_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "zeroshot.json"
    assert load_zeroshot(path) is None  # missing: "not measured"
    path.write_text(json.dumps({"vqa": {"lowshot-0.1": 0.6, "shift": 1}}))
    assert load_zeroshot(path) == {"vqa": {"lowshot-0.1": 0.6, "shift": 1.0}}
    # The zeroshot stage's object form reads the same.
    path.write_text(
        json.dumps({"vqa": {"shift": {"metric": "vqa_score", "score": 0.5, "chance": 0.3, "n": 9}}})
    )
    assert load_zeroshot(path) == {"vqa": {"shift": 0.5}}
    for bad, key in (
        ({"vqa": {"lowshot-0.1": 61.0}}, "vqa.lowshot-0.1"),  # a percentage, not the metric's [0, 1]
        ({"vqa": {"lowshot-0.1": "0.6"}}, "vqa.lowshot-0.1"),
        ({"vqa": {"fewshot": 0.6}}, "vqa.fewshot"),
        ({"vqa": 0.6}, "vqa"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ReportError, match=f"zeroshot.json: key '{key}'"):
            load_zeroshot(path)


def test_lowshot_plot_shows_every_fraction_with_confidence_bars(tmp_path: Path) -> None:
    r = tmp_path / "runs"
    for seed in range(3):
        for condition, base in (
            ("lowshot-0.01", 0.2),
            ("lowshot-0.1", 0.3),
            ("lowshot-0.25", 0.35),
            ("full", 0.4),
        ):
            write_eval(r, "vqa", condition, "baseline", seed, base + 0.01 * seed)
            write_eval(r, "vqa", condition, "clip_td", seed, base + 0.05)
        write_eval(r, "vqa", "shift", "baseline", seed, 0.1)
    write_eval(r, "vqa", "lowshot-0.1", "blind", 0, 0.15)
    summary = summarise(collect(r))
    (vqa,) = lowshot_series(summary, zeroshot={"vqa": {"lowshot-0.1": 0.5, "shift": 0.4}})
    assert vqa["fractions"] == [0.01, 0.1, 0.25, 1.0] and vqa["log_x"]
    lines = {line["method"]: line for line in vqa["lines"]}
    assert list(lines) == ["baseline", "clip_td", "blind"]
    assert lines["baseline"]["x"] == [0.01, 0.1, 0.25, 1.0]
    assert lines["baseline"]["y"] == pytest.approx([0.21, 0.31, 0.36, 0.41])
    # 95% CI half-width of a 3-seed mean with std 0.01: t(0.975, 2) · 0.01 / √3.
    assert lines["baseline"]["err"] == pytest.approx([4.302653 * 0.01 / math.sqrt(3)] * 4, abs=1e-6)
    assert lines["clip_td"]["err"] == pytest.approx([0.0] * 4, abs=1e-12)  # identical seeds: no spread
    # One seed has no interval: no bar (a zero-width one would read as a mean known exactly).
    assert lines["blind"]["label"] == "blind (text only)" and lines["blind"]["err"] == [None]
    assert vqa["zeroshot"] == [(0.1, 0.5)]  # shift is not on the fraction axis
    two = lowshot_series([row for row in summary if row["condition"] in ("lowshot-0.1", "full")])
    assert two[0]["fractions"] == [0.1, 1.0] and not two[0]["log_x"]
    png = plot_lowshot(summary, tmp_path / "low.png", zeroshot={"vqa": {"lowshot-0.1": 0.5}})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Two spellings of one fraction, both accepted by --condition, tie on the axis: both points kept, no crash.
    write_eval(r, "vqa", "lowshot-0.10", "baseline", 0, 0.5)
    tied = next(
        line for line in lowshot_series(summarise(collect(r)))[0]["lines"] if line["method"] == "baseline"
    )
    assert tied["x"] == [0.01, 0.1, 0.1, 0.25, 1.0] and tied["y"][1:3] == pytest.approx([0.31, 0.5])


def test_plots_written(runs: Path, tmp_path: Path) -> None:
    summary = summarise(collect(runs))
    for fn, name in ((plot_lowshot, "low.png"), (plot_shift, "shift.png")):
        path = fn(summary, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    # No shift runs at all still yields a (placeholder) PNG rather than a crash.
    no_shift = [r for r in summary if r["condition"] != "shift"]
    assert plot_shift(no_shift, tmp_path / "empty.png").stat().st_size > 0


def _fields(spec) -> set[str]:
    """Every data field a Vega-Lite spec encodes."""
    if isinstance(spec, dict):
        own = {spec["field"]} if isinstance(spec.get("field"), str) else set()
        return own.union(*(_fields(v) for k, v in spec.items() if k != "data"))
    return set().union(*(_fields(v) for v in spec)) if isinstance(spec, list) else set()


@pytest.mark.parametrize("pipeline", ["dvc.yaml", "real/dvc.yaml"])
def test_dvc_plots_show_draws_each_task_with_a_line_per_method(
    runs: Path, tmp_path: Path, pipeline: str
) -> None:
    """`dvc plots show` with the pipeline's own plot definition and the repository's template: every field the
    template draws is in the report's plots.json, so renaming one fails here rather than in a user's browser."""
    (report,) = [s for s in yaml.safe_load((REPO / pipeline).read_text())["stages"].values() if "plots" in s]
    ((path, props),) = [next(iter(p.items())) for p in report["plots"]]
    out = tmp_path / "project"
    result = CliRunner().invoke(main, ["--runs", str(runs), "--out", str(out / Path(path).parent)])
    assert result.exit_code == 0, result.output
    dvc = [str(Path(sys.executable).parent / "dvc")]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=out, env=env, check=True)
    (out / ".dvc" / "plots").mkdir()
    shutil.copy(REPO / ".dvc" / "plots" / f"{props['template']}.json", out / ".dvc" / "plots")
    stage = {"cmd": "true", "plots": [{path: props}]}
    (out / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": stage}}))
    shown = subprocess.run([*dvc, "plots", "show", "--json", path], cwd=out, env=env, capture_output=True,
                           text=True, check=True)  # fmt: skip
    assert "failed" not in shown.stderr, shown.stderr
    spec = json.loads(shown.stdout)["data"][path][0]["content"]
    assert "<DVC_METRIC_" not in json.dumps(spec)  # DVC filled every anchor
    rows = spec["data"]["values"]
    assert {(r["task"], r["method"]) for r in rows} == {
        (r["task"], r["method"]) for r in json.loads((out / path).read_text())
    } and {"vcr", "snli_ve"} <= {r["task"] for r in rows}
    computed = {t["as"] for t in spec["transform"]}
    assert all(_fields(spec) - computed <= r.keys() for r in rows)
    assert (
        spec["facet"]["column"]["field"] in computed
        and spec["spec"]["encoding"]["color"]["field"] == "method"
    )
    assert all(r[props["x"]] > 0 for r in rows)  # the x axis is a log scale


def test_malformed_eval_names_the_file(runs: Path) -> None:
    bad = runs / "vcr-full-naive_kd-s0" / "eval.json"
    bad.parent.mkdir()
    bad.write_text('{"run": {"task": "vcr"')
    with pytest.raises(ReportError, match="vcr-full-naive_kd-s0"):
        collect(runs)
    bad.write_text(json.dumps({"run": {"task": "vcr", "condition": "full", "method": "m", "seed": 0}}))
    with pytest.raises(ReportError, match=r"vcr-full-naive_kd-s0.*primary_metric"):
        collect(runs)


def test_duplicate_and_empty_runs(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no evaluated runs"):
        collect(tmp_path / "missing")
    r = tmp_path / "runs"
    write_eval(r, "vqa", "full", "baseline", 0, 0.5)
    dup = write_eval(r / "copy", "vqa", "full", "baseline", 0, 0.5)
    dup.parent.rename(r / "zz-copy")
    with pytest.raises(ReportError, match="same task/condition/method/seed"):
        collect(r)


ENTRY_FIELDS = {
    "task", "condition", "method", "metric", "n_seeds", "mean", "std", "delta_mean", "ci95", "p", "rel_gain_pct",
}  # fmt: skip


def test_stage_writes_every_output(runs: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"domains": {"plain": {"random_top1": 0.9}}}))
    zeroshot = tmp_path / "zeroshot.json"
    zeroshot.write_text(json.dumps({"vcr": {"shift": 0.31}}))
    out = tmp_path / "reports"
    args = ["--runs", str(runs), "--teacher", str(teacher), "--extract", str(tmp_path / "none.json")]
    result = CliRunner().invoke(main, [*args, "--zeroshot", str(zeroshot), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("results.md", "lowshot.png", "shift.png", "plots.json", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == [
        "lowshot.png", "plots.json", "results.md", "shift.png", "summary.json"
    ]  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    entries = [
        e for conditions in summary.values() for methods in conditions.values() for e in methods.values()
    ]
    assert len(entries) == 11  # 10 task × condition × method cells + 1 teacher zero-shot score
    assert all(ENTRY_FIELDS <= e.keys() for e in entries)
    td = summary["vcr"]["lowshot-0.05"]["clip_td"]
    assert (td["task"], td["condition"], td["method"], td["metric"]) == (
        "vcr",
        "lowshot-0.05",
        "clip_td",
        "q2ar",
    )
    assert (
        td["n_seeds"] == 3 and td["mean"] == pytest.approx(0.48) and td["std"] == pytest.approx(0.026457513)
    )
    assert td["delta_mean"] == pytest.approx(0.06) and td["ci95"] == pytest.approx(list(TD_CI), abs=1e-6)
    assert td["p"] == pytest.approx(TD_P) and td["rel_gain_pct"] == pytest.approx(14.2857, abs=1e-4)
    assert td["secondary"]["q2a"]["delta_mean"] == pytest.approx(0.06)
    base = summary["vcr"]["lowshot-0.05"]["baseline"]
    assert base["delta_mean"] is base["ci95"] is base["p"] is base["rel_gain_pct"] is None
    assert base["mean"] == pytest.approx(0.42) and base["role"] == "baseline"
    assert summary["vcr"]["lowshot-0.05"]["blind"]["role"] == "floor"
    single = summary["snli_ve"]["lowshot-0.25"]["clip_td"]
    assert single["std"] is None and single["ci95"] is None and single["delta_mean"] is None
    ceiling = summary["vcr"]["shift"]["teacher_zeroshot"]
    assert ceiling["mean"] == 0.31 and ceiling["role"] == "ceiling" and ceiling["metric"] == "q2ar"
    records = json.loads((out / "plots.json").read_text())
    assert {"task": "vcr", "method": "clip_td", "fraction": 1.0}.items() <= next(
        r for r in records if r["condition"] == "full" and r["method"] == "clip_td"
    ).items()
    assert all(r["condition"] != "shift" for r in records)
    md = (out / "results.md").read_text()
    assert "| domains.plain.random_top1 | 0.9 |" in md and "teacher zero-shot" in md

    # A malformed zero-shot file fails in one line naming it, and leaves the previous report untouched.
    before = (out / "summary.json").read_bytes()
    zeroshot.write_text(json.dumps({"vcr": {"shift": "high"}}))
    bad = CliRunner().invoke(main, [*args, "--zeroshot", str(zeroshot), "--out", str(out)])
    assert (
        bad.exit_code != 0
        and "zeroshot.json: key 'vcr.shift'" in bad.output
        and "Traceback" not in bad.output
    )
    assert (out / "summary.json").read_bytes() == before

    empty = CliRunner().invoke(main, ["--runs", str(tmp_path / "nothing"), "--out", str(out)])
    assert empty.exit_code != 0 and "no evaluated runs" in empty.output
    assert "--zeroshot" in CliRunner().invoke(main, ["--help"]).output


def test_a_failing_report_leaves_the_previous_one_whole(runs: Path, tmp_path: Path, monkeypatch) -> None:
    import pipeline.report as report

    out = tmp_path / "reports"
    report.write_report(runs, out, tmp_path / "none.json", tmp_path / "none.json")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "plot_shift", broken)
    write_eval(runs, "vqa", "full", "baseline", 0, 0.5)  # the next report would differ
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.write_report(runs, out, tmp_path / "none.json", tmp_path / "none.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no half-written file, no leftovers


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path):
    from stages.report import END, START, inject

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\nintro\n{START}\nold table\n{END}\n## After\n")
    inject(readme, "# Results\n| a | b |\n", tmp_path / "reports")
    text = readme.read_text()
    assert "old table" not in text and "## Results" in text and "| a | b |" in text
    assert text.startswith("# Title\nintro\n") and text.endswith(f"{END}\n## After\n")
    assert "lowshot.png" in text
    # Reference sections stay in reports/results.md; the README links there.
    md = "# R\n## vqa — vqa_score (primary)\nT1\n### vcr — q2a (secondary)\nT2\n## Teacher quality\nT3\n## How\nT4\n"
    inject(readme, md, tmp_path / "reports")
    text = readme.read_text()
    assert "T1" in text and "T4" in text and "T2" not in text and "T3" not in text
    assert "reports/results.md" in text
    # A grid of full-data runs only: no empty low-shot or shift figure in the README.
    inject(readme, md, tmp_path / "reports", {"full"})
    assert "lowshot.png" not in readme.read_text() and "shift.png" not in readme.read_text()
    inject(readme, md, tmp_path / "reports", {"full", "shift"})
    assert "lowshot.png" not in readme.read_text() and "shift.png" in readme.read_text()


def test_zeroshot_files_of_several_data_roots_are_merged(runs: Path, tmp_path: Path) -> None:
    """Real data keeps each source under its own root, so zero-shot runs once per root: --zeroshot repeats,
    each task's ceiling comes from its file, and a task/condition scored twice is refused naming both files."""
    vcr, snli = tmp_path / "zs-vcr.json", tmp_path / "zs-snli.json"
    vcr.write_text(json.dumps({"vcr": {"shift": {"metric": "q2ar", "score": 0.31, "chance": 0.06, "n": 9}}}))
    snli.write_text(json.dumps({"snli_ve": {"lowshot-0.25": 0.52}}))
    out = tmp_path / "reports"
    args = [
        "--runs",
        str(runs),
        "--teacher",
        str(tmp_path / "none.json"),
        "--extract",
        str(tmp_path / "none"),
    ]
    result = CliRunner().invoke(
        main, [*args, "--zeroshot", str(vcr), "--zeroshot", str(snli), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vcr"]["shift"]["teacher_zeroshot"]["mean"] == 0.31
    assert summary["snli_ve"]["lowshot-0.25"]["teacher_zeroshot"]["mean"] == 0.52
    snli.write_text(json.dumps({"vcr": {"shift": 0.2}}))
    twice = CliRunner().invoke(
        main, [*args, "--zeroshot", str(vcr), "--zeroshot", str(snli), "--out", str(out)]
    )
    assert twice.exit_code == 1 and "zs-snli.json: key 'vcr.shift' is also scored in" in twice.output
    assert str(vcr) in twice.output
