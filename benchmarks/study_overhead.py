"""DVC's work around each study cell, from a `make study` log: `python -m benchmarks.study_overhead LOG`.

The runner prints "done <stage> (N s)" when `dvc repro --single-item` returns; the cell's eval.json records
when its own command started and finished (`cell.started`, `cell.finished`), and the stage's log under
.dvc/tmp/repro-logs/ was last written when DVC finished. So DVC's work before the command is
started - (end - N) and after it end - finished (docs/study.md, Sizing). Save the runner's output to read it
later (`make study 2>&1 | tee study.log`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from pipeline.repro import _log_path

DONE = re.compile(r"done    (study/dvc\.yaml:\w+@\S+) \((\d+) s\)")


def main(log: str) -> None:
    for stage, secs in DONE.findall(Path(log).read_text(errors="replace")):
        cmd = Path(_log_path(stage)).read_text(errors="replace")
        out = re.search(r"--out (\S+)", cmd)
        if not out or not (Path(out.group(1)) / "eval.json").exists():
            continue  # not a cell, or its log was overwritten by a later run
        cell = json.loads((Path(out.group(1)) / "eval.json").read_text())["cell"]
        end = os.stat(_log_path(stage)).st_mtime
        print(
            f"{stage.split(':', 1)[1]}: before {cell['started'] - (end - int(secs)):.1f} s, "
            f"cell {cell['wall_seconds']:.0f} s, after {end - cell['finished']:.1f} s"
        )


if __name__ == "__main__":
    main(sys.argv[1])
