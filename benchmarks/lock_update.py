"""DVC's dvc.lock update against pipeline/dvc_lockfile.py's splice, on a copy of a real lock:
`python -m benchmarks.lock_update [LOCK]` (default study/dvc.lock).

Both replace one recorded stage's entry (one output hash changed) and add one new stage, as a finished cell
does; prints each one's seconds and whether the two files are byte for byte equal.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from pathlib import Path

import click
import yaml
from dvc.utils.serialize._yaml import modify_yaml

from pipeline.dvc_lockfile import modify_lockfile


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("lock", default="study/dvc.lock", type=click.Path(exists=True, dir_okay=False))
def main(lock: str) -> None:
    stages = yaml.load(Path(lock).read_text(), Loader=yaml.CSafeLoader)["stages"]
    name = next(n for n, e in stages.items() if e.get("outs"))
    changed = copy.deepcopy(stages[name])
    changed["outs"][0]["md5"] = "0" * 32
    added = copy.deepcopy(changed)
    added["cmd"] += " --probe"
    with tempfile.TemporaryDirectory() as tmp:
        texts, secs = [], []
        for arm, modify in (("dvc", modify_yaml), ("splice", modify_lockfile)):
            path = Path(tmp, arm, "dvc.lock")
            path.parent.mkdir()
            shutil.copy(lock, path)
            start = time.perf_counter()
            with modify(str(path)) as data:
                data["stages"].update({name: copy.deepcopy(changed), "probe@new": copy.deepcopy(added)})
            secs.append(time.perf_counter() - start)
            texts.append(path.read_text())
    size = Path(lock).stat().st_size / 1e6
    click.echo(
        f"{lock} ({size:.1f} MB, {len(stages)} stages): DVC's update {secs[0]:.1f} s, splice {secs[1]:.1f} s, "
        f"equal bytes: {texts[0] == texts[1]}"
    )


if __name__ == "__main__":
    main()
