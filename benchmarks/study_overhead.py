"""DVC's work around each study cell, from a `make study` log: `python -m benchmarks.study_overhead LOG`.

The runner prints "done <stage> (N s)" when `dvc repro --single-item` returns; the cell's eval.json records
when its own command started and finished (`cell.started`, `cell.finished`), and the stage's log under
.dvc/tmp/repro-logs/ was last written when DVC finished. So DVC's work before the command is
started - (end - N) and after it end - finished (docs/study.md, Sizing). The last line gives the cells
finished per hour (between the first and the last finish; `--since` drops cells started before a UTC time,
e.g. while another job shared the machine). Save the runner's output to read it later
(`make study 2>&1 | tee study.log`).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import click

from pipeline.repro import log_path

DONE = re.compile(r"done    (study/dvc\.yaml:\w+@\S+) \((\d+) s\)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("log", type=click.Path(exists=True, dir_okay=False))
@click.option("--since", type=click.DateTime(), help="Only cells started at or after this UTC time.")
def main(log: str, since: datetime | None) -> None:
    """Per cell of LOG: DVC's seconds before and after the cell's own command; then the cells per hour."""
    cutoff = since.replace(tzinfo=UTC).timestamp() if since else float("-inf")
    before, after, finished = [], [], []
    for stage, secs in DONE.findall(Path(log).read_text(errors="replace")):
        stage_log = Path(log_path(stage))
        out = re.search(r"--out (\S+)", stage_log.read_text(errors="replace"))
        if not out or not (Path(out.group(1)) / "eval.json").exists():
            continue  # not a cell, or its log was overwritten by a later run
        cell = json.loads((Path(out.group(1)) / "eval.json").read_text())["cell"]
        if cell["started"] < cutoff:
            continue
        end = stage_log.stat().st_mtime
        before.append(cell["started"] - (end - int(secs)))
        after.append(end - cell["finished"])
        finished.append(cell["finished"])
        click.echo(
            f"{stage.split(':', 1)[1]}: before {before[-1]:.1f} s, cell {cell['wall_seconds']:.0f} s, "
            f"after {after[-1]:.1f} s"
        )
    if len(finished) > 1:
        hours = (max(finished) - min(finished)) / 3600
        click.echo(
            f"{len(finished)} cells; before {min(before):.1f}-{max(before):.1f} s, after {min(after):.1f}-"
            f"{max(after):.1f} s; {(len(finished) - 1) / hours:.1f} cells per hour over {hours * 60:.0f} min"
        )


if __name__ == "__main__":
    main()
