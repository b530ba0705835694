"""The report stage: statistics checked against hand-computed values, markdown, plots and error handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.report import ReportError, collect, markdown, plot_lowshot, plot_shift, summarise
from stages.report import main

BASE = [0.40, 0.42, 0.44]  # mean 0.42, std 0.02
TD = [0.46, 0.47, 0.51]  # mean 0.48; paired diffs 0.06, 0.05, 0.07 → mean 0.06, std 0.01; gain 14.29 %


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
    write_eval(r, "snli_ve", "lowshot-0.25", "clip_td", 0, 0.7)  # a single seed, no baseline
    return r


def cell(summary: list[dict], task: str, condition: str, method: str) -> dict:
    (row,) = [r for r in summary if (r["task"], r["condition"], r["method"]) == (task, condition, method)]
    return row


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
    assert t["verdict"] == "distinguishable"
    # Secondary metric: same values shifted by 0.1 → identical gain on a different base, identical paired diff.
    q2a = t["secondary"]["q2a"]
    assert q2a["mean"] == pytest.approx(0.58) and q2a["paired"]["mean"] == pytest.approx(0.06)
    assert q2a["gain_pct"] == pytest.approx(0.06 / 0.52 * 100)
    assert t["secondary"]["qa2r"]["verdict"] == "not_distinguishable"  # identical values: Δ = 0
    assert cell(summary, "vcr", "lowshot-0.05", "naive_kd")["verdict"] == "not_distinguishable"
    assert cell(summary, "vcr", "shift", "baseline")["per_domain"]["outline"]["mean"] == pytest.approx(0.32)
    one = cell(summary, "snli_ve", "lowshot-0.25", "clip_td")
    assert one["n"] == 1 and one["std"] is None and one["verdict"] == "no_baseline"
    # Order: tasks as in the protocol, low-shot before shift before full, baseline first.
    order = [(r["task"], r["condition"], r["method"]) for r in summary]
    assert order[:4] == [
        ("snli_ve", "lowshot-0.25", "clip_td"),
        ("vcr", "lowshot-0.05", "baseline"),
        ("vcr", "lowshot-0.05", "naive_kd"),
        ("vcr", "lowshot-0.05", "clip_td"),
    ]
    assert order[4:] == [
        ("vcr", "shift", "baseline"),
        ("vcr", "full", "baseline"),
        ("vcr", "full", "clip_td"),
    ]


def test_markdown_holds_the_computed_values(runs: Path) -> None:
    summary = summarise(collect(runs))
    md = markdown(summary, {"all": {"random_top1": 0.8125}, "loss_curve": [[0, 1.0]]}, None)
    assert "0.480 ± 0.026 (3)<br>+14.29% · Δ +0.060 ± 0.010 (3 pairs)" in md
    assert "0.420 ± 0.020 (3)" in md
    assert "0.700 ± — (1)" in md  # one seed: no std, no crash
    assert "## vcr — q2ar (primary)" in md and "### vcr — q2a (secondary)" in md
    naive_line = next(line for line in md.splitlines() if line.startswith("| naive_kd |"))
    assert "pairs)*" in naive_line  # flagged not distinguishable
    assert "| all.random_top1 | 0.8125 |" in md and "`loss_curve`" in md
    assert "## Teacher cache (extract)" in md and "Not available" in md
    assert "seeds 0, 1, 2" in md and "snli_ve / lowshot-0.25 / clip_td (1)" in md


def test_plots_written(runs: Path, tmp_path: Path) -> None:
    summary = summarise(collect(runs))
    for fn, name in ((plot_lowshot, "low.png"), (plot_shift, "shift.png")):
        path = fn(summary, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    # No shift runs at all still yields a (placeholder) PNG rather than a crash.
    no_shift = [r for r in summary if r["condition"] != "shift"]
    assert plot_shift(no_shift, tmp_path / "empty.png").stat().st_size > 0


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


def test_stage_writes_every_output(runs: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"domains": {"plain": {"random_top1": 0.9}}}))
    out = tmp_path / "reports"
    args = ["--runs", str(runs), "--teacher", str(teacher), "--extract", str(tmp_path / "none.json")]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("results.md", "lowshot.png", "shift.png", "plots.json", "summary.json"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    td = summary["vcr"]["lowshot-0.05"]["clip_td"]
    assert td["n"] == 3 and td["mean"] == pytest.approx(0.48) and td["diff_mean"] == pytest.approx(0.06)
    assert summary["snli_ve"]["lowshot-0.25"]["clip_td"]["std"] is None
    records = json.loads((out / "plots.json").read_text())
    assert {"task": "vcr", "method": "clip_td", "fraction": 1.0}.items() <= next(
        r for r in records if r["condition"] == "full" and r["method"] == "clip_td"
    ).items()
    assert all(r["condition"] != "shift" for r in records)
    assert "| domains.plain.random_top1 | 0.9 |" in (out / "results.md").read_text()

    empty = CliRunner().invoke(main, ["--runs", str(tmp_path / "nothing"), "--out", str(out)])
    assert empty.exit_code != 0 and "no evaluated runs" in empty.output
    assert "--teacher" in CliRunner().invoke(main, ["--help"]).output


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path):
    from stages.report import END, START, inject

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\nintro\n{START}\nold table\n{END}\n## After\n")
    inject(readme, "# Results\n| a | b |\n", tmp_path / "reports")
    text = readme.read_text()
    assert "old table" not in text and "## Results" in text and "| a | b |" in text
    assert text.startswith("# Title\nintro\n") and text.endswith(f"{END}\n## After\n")
    assert "lowshot.png" in text
