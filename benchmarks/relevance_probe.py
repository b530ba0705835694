"""A follow-up probe beside the study: clip_td with its image tokens selected by MaskCLIP value-token relevance.

The study's cells score relevance with last-layer tokens (``distill.relevance_source: last``, fixed before they
ran), and its selection diagnostic found that selection steered away from the objects the text names
(docs/study.md). This trains the same clip_td cells with ``distill.relevance_source=value`` from the study's
``extract_relevance`` store (the finished teacher's tokens, bit-identical to the main cache's, plus its value
tokens), on the study's seeds, and pairs each with the study's own baseline and clip_td cells of the same task,
condition and seed: only the selection differs. The variant was chosen from a train-split diagnostic, never
from a validation or test score. Not part of the study's grid or report; a run whose eval.json exists is
skipped, so the probe resumes where it stopped.

    python -m benchmarks.relevance_probe --task vqa --task vcr --condition lowshot-0.01
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from pipeline.report import paired_test
from pipeline.report.markdown import fmt_ci
from pipeline.study import load_study
from pipeline.study.grid import Cell

STUDY_RUNS = Path("study/runs")


def _primary(path: Path) -> float | None:
    return json.loads(path.read_text())["primary"] if path.exists() else None


def summarise(
    out: Path, tasks: tuple[str, ...], conditions: tuple[str, ...], seeds: list[int], relevance: str
):
    """Per task and condition: the probe's mean and its paired Δ (95% t interval, p) against the study's
    baseline and clip_td on the seeds all three have."""
    rows = []
    for task in tasks:
        for cond in conditions:
            trip = []
            for s in seeds:
                probe = _primary(out / f"{task}-{cond}-clip_td-{relevance}-s{s}" / "eval.json")
                # The study's own cells of this seed (pretrained student, finished teacher), where its grid puts them.
                base, ctd = (
                    _primary(Cell("main", task, cond, m, s, "pretrained").run_dir(STUDY_RUNS) / "eval.json")
                    for m in ("baseline", "clip_td")
                )
                if None not in (probe, base, ctd):
                    trip.append((s, probe, base, ctd))
            if not trip:
                continue
            vs_base = paired_test([p - b for _, p, b, _ in trip])
            vs_ctd = paired_test([p - c for _, p, _, c in trip])
            rows.append(
                {
                    "task": task,
                    "condition": cond,
                    "relevance_source": relevance,
                    "seeds": [s for s, *_ in trip],
                    "mean": sum(p for _, p, _, _ in trip) / len(trip),
                    "baseline_mean": sum(b for _, _, b, _ in trip) / len(trip),
                    "clip_td_mean": sum(c for *_, c in trip) / len(trip),
                    "vs_baseline": {k: vs_base[k] for k in ("mean", "ci95", "p")},
                    "vs_clip_td": {k: vs_ctd[k] for k in ("mean", "ci95", "p")},
                }
            )
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--task", "tasks", multiple=True, default=("vqa", "snli_ve", "vcr"))
@click.option("--condition", "conditions", multiple=True, default=("lowshot-0.01",))
@click.option("--relevance", default="value", help="distill.relevance_source of the probe's cells.")
@click.option(
    "--cache",
    default="study/artifacts/cache/teacher-relevance.zarr",
    help="A store holding the relevance tokens (study/dvc.yaml's extract_relevance builds this one).",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/relevance-probe"))
@click.option("--summary-only", is_flag=True, help="Train nothing; summarise the runs there are.")
def main(tasks, conditions, relevance, cache, out, summary_only) -> None:
    """Train the probe's missing cells one at a time (each a `python -m stages.study_cell` run), then write
    OUT/summary.json and print the paired comparison."""
    seeds = load_study("study/params.yaml").seeds
    if not summary_only:
        if not Path(cache).exists():
            raise click.ClickException(
                f"{cache}: no such store (run: dvc repro study/dvc.yaml:extract_relevance)"
            )
        todo = [(t, c, s) for t in tasks for c in conditions for s in seeds]
        for i, (task, cond, seed) in enumerate(todo, 1):
            run = out / f"{task}-{cond}-clip_td-{relevance}-s{seed}"
            if (run / "eval.json").exists():
                continue
            click.echo(f"[{i}/{len(todo)}] {run}", err=True)
            cmd = [sys.executable, "-m", "stages.study_cell", "--task", task, "--condition", cond,
                   "--method", "clip_td", "--seed", str(seed), "--init", "pretrained", "--cache", cache,
                   "--set", f"distill.relevance_source={relevance}", "--out", str(run)]  # fmt: skip
            subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            (run / "student.pt").unlink(missing_ok=True)  # a few hundred KB each; the scores are what is kept
    rows = summarise(out, tasks, conditions, seeds, relevance)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        click.echo(
            f"{r['task']} {r['condition']} (seeds {r['seeds']}): clip_td[{relevance}] {r['mean']:.3f}, "
            f"baseline {r['baseline_mean']:.3f}, clip_td[last] {r['clip_td_mean']:.3f}; "
            f"vs baseline {r['vs_baseline']['mean']:+.3f} {fmt_ci(r['vs_baseline']['ci95'])}, "
            f"vs clip_td[last] {r['vs_clip_td']['mean']:+.3f} {fmt_ci(r['vs_clip_td']['ci95'])}"
        )


if __name__ == "__main__":
    main()
