"""Stage `report`: aggregate every evaluated run into results.md, plots and DVC metrics/plots files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.conditions import Condition
from pipeline.report import ReportError, write_report
from stages.common import stage_command, write_text


@stage_command(user_errors=(ReportError,), params=False)
@click.option(
    "--runs",
    "runs_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs"),
    help="Directory of run folders; every RUNS/<task>-<condition>-<method>-s<seed>/eval.json (written by the "
    "evaluate stage) is one run. A malformed file fails the stage, naming it.",
)
@click.option(
    "--teacher",
    "teacher_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("metrics/teacher.json"),
    help="Teacher metrics JSON (zero-shot retrieval per domain, …); its scalar entries form the teacher-quality "
    "section. Missing: the section says 'not available'.",
)
@click.option(
    "--extract",
    "extract_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("metrics/extract.json"),
    help="Teacher-cache metrics JSON from extract-teacher (sizes, compression, throughput); optional like "
    "--teacher.",
)
@click.option(
    "--zeroshot",
    "zeroshot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    default=(Path("metrics/zeroshot.json"),),
    help='Teacher zero-shot scores, the ceiling row of every task table: {"<task>": {"<condition>": score}}, '
    "score in the task's primary metric (in [0, 1]). Repeatable: one file per data root (python -m "
    "stages.zeroshot per source), merged; a task and condition in two files is refused. Missing file, task "
    "or condition: 'not measured'.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("reports"),
    help="Output directory: results.md, lowshot.png, shift.png, plots.json (records for `dvc plots show`: x = "
    "fraction, y = mean) and summary.json (for `dvc metrics show`: task → condition → method → n_seeds, mean, "
    "std, delta_mean, ci95, p, rel_gain_pct, …).",
)
@click.option(
    "--baseline",
    default="baseline",
    help="Method every other method is compared with (relative gain and paired per-seed difference).",
)
@click.option(
    "--blind",
    default="blind",
    help="Method whose runs are the floor: the same student with the image blanked, shown as the "
    "'blind (text only)' row ('not measured' where it has no runs).",
)
@click.option(
    "--readme",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also copy results.md into this file between the lines '<!-- results:start -->' and "
    "'<!-- results:end -->' (make repro keeps the README's table current this way).",
)
def main(
    runs_dir: Path,
    teacher_path: Path,
    extract_path: Path,
    zeroshot_path: tuple[Path, ...],
    out_dir: Path,
    baseline: str,
    blind: str,
    readme: Path | None,
) -> None:
    """Summarise the runs (docs/method.md §8): per task a table of methods × conditions with mean ± std over
    seeds and, against the baseline, the paired per-seed difference with its 95% confidence interval (Student
    t) and p-value — a cell is marked a gain or a loss only when that interval excludes 0 — beside the floor
    (blind runs, text only) and the ceiling (teacher zero-shot); the teacher's quality; plots of accuracy vs
    labeled fraction and under domain shift.

    Every number is computed from the input files; nothing is typed in by hand.
    """
    paths = write_report(
        runs_dir,
        out_dir,
        teacher_path,
        extract_path,
        baseline=baseline,
        zeroshot_path=zeroshot_path,
        blind=blind,
    )
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
    if readme is not None:
        conditions = _conditions(Path(paths["summary"]))
        inject(readme, Path(paths["results"]).read_text(), out_dir, conditions)
        click.echo(f"readme: {readme}")


START, END = "<!-- results:start -->", "<!-- results:end -->"


# Sections of results.md the README leaves to the full report: the README is for users, the tables of every
# teacher and cache metric and the secondary metrics are reference material.
README_SKIPS = ("## Teacher quality", "## Teacher cache", "(secondary)")


def readme_body(results_md: str, out_dir: Path) -> str:
    """results.md without the README_SKIPS sections, headings demoted one level, pointing at the full report."""
    kept, skipping = [], False
    for line in results_md.strip().splitlines():
        if line.startswith("#"):
            skipping = any(line.startswith(s) or s in line for s in README_SKIPS)
            line = "#" + line
        if not skipping:
            kept.append(line)
    kept += [
        "",
        f"Secondary metrics, teacher quality and cache statistics: [{out_dir}/results.md]({out_dir}/results.md).",
    ]
    return "\n".join(kept)


def _conditions(summary_json: Path) -> set[str]:
    """Conditions with results in summary.json (task → condition → method → ...)."""
    data = json.loads(summary_json.read_text())
    return {c for per_task in data.values() if isinstance(per_task, dict) for c in per_task}


def inject(readme: Path, results_md: str, out_dir: Path, conditions: set[str] | None = None) -> None:
    """Replace the README's results block with the generated report (headings demoted one level, reference
    sections left to the full report). A plot is embedded only when ``conditions`` (None: any) has runs it
    draws: a grid without low-shot or shift runs gets no empty figure in the README."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise click.ClickException(f"{readme}: no '{START}' … '{END}' block to fill")
    body = readme_body(results_md, out_dir)
    kinds = None if conditions is None else {Condition.parse(c).kind for c in conditions}
    plots = "\n".join(
        f"![{title}]({out_dir}/{name})"
        for kind, title, name in (
            ("lowshot", "accuracy vs labelled fraction", "lowshot.png"),
            ("shift", "domain shift", "shift.png"),
        )
        if kinds is None or kind in kinds
    )
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    write_text(readme, f"{head}{START}\n{body}\n\n{plots}\n{END}{tail}")


if __name__ == "__main__":
    main()
