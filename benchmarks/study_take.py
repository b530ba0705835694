"""Bring the study cells a sitting ran in another checkout into this one: their dvc.lock entries and the
files they output. The study needs the shared artifacts (teacher, stores, pretrained student), which a
working checkout may not hold, so a sitting runs in a clone that builds them (`make study` there); this takes
what it finished back.

``python -m benchmarks.study_take SRC`` takes every entry of SRC's study/dvc.lock whose outputs or pretrained
student differ from this checkout's entry and whose ``artifacts/student_pretrained`` dep is this checkout's (the root lock's
``pretrain_student`` output): a cell of the current backbone. ``--any-backbone`` drops that condition.

Each taken entry replaces this lock's entry of the same name (a stage SRC has and this lock lacks is refused:
the two checkouts must hold the same study/dvc.yaml); its output files are copied beside their destination and
renamed into place. Code changed here since the clone's revision leaves the taken entries recording the older
code: rehash them afterwards (``python -m pipeline.dvc_lockfile rehash --from <the clone's revision> …``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from pipeline.dvc_lockfile import fast_load, stage_blocks

LOCK = "study/dvc.lock"
BACKBONE = "artifacts/student_pretrained"


def backbone_md5(root: Path) -> str:
    """The pretrained student's hash as the root dvc.lock records it."""
    entry = fast_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"]["pretrain_student"]
    return next(o["md5"] for o in entry["outs"] if o["path"] == BACKBONE)


def cells_to_take(src: Path, dst: Path, backbone: str | None) -> list[str]:
    """The entries of SRC's study lock that differ from DST's, of the given backbone (None: any)."""
    theirs = fast_load((src / LOCK).read_text(encoding="utf-8"))["stages"]
    ours = fast_load((dst / LOCK).read_text(encoding="utf-8"))["stages"]
    unknown = sorted(set(theirs) - set(ours))
    if unknown:
        raise click.ClickException(f"{src / LOCK} has stages {LOCK} here lacks: {unknown[:5]}")

    def backbone_of(entry: dict) -> str | None:
        return next((d.get("md5") for d in entry.get("deps", []) if d["path"] == BACKBONE), None)

    # Outputs or backbone: the entries also differ where this checkout rehashed code the clone's revision
    # recorded (the same cells, already taken), and those stay as they are here.
    return [
        name
        for name, entry in theirs.items()
        if (entry.get("outs") != ours[name].get("outs") or backbone_of(entry) != backbone_of(ours[name]))
        and (backbone is None or backbone_of(entry) == backbone)
    ]


def take(src: Path, dst: Path, names: list[str]) -> int:
    """Replace DST's entries ``names`` by SRC's and copy their outputs; returns how many files were copied."""
    text = (src / LOCK).read_text(encoding="utf-8")
    entries = fast_load(text)["stages"]
    theirs = text.splitlines(keepends=True)
    ours = (dst / LOCK).read_text(encoding="utf-8").splitlines(keepends=True)
    tb, _ = stage_blocks(theirs)
    ob, _ = stage_blocks(ours)
    copied = 0
    for name in names:  # the outputs first: a lock entry never claims files that are not here yet
        for o in entries[name].get("outs", []):
            s, d = src / o["path"], dst / o["path"]
            d.parent.mkdir(parents=True, exist_ok=True)
            tmp = d.with_name(f".{d.name}.take-{os.getpid()}")
            if s.is_dir():
                shutil.copytree(s, tmp)
                if d.exists():
                    shutil.rmtree(d)
            else:
                shutil.copyfile(s, tmp)
            os.replace(tmp, d)
            copied += 1
    heads = [f"  {n}:\n" for n in names]
    for h in sorted(heads, key=lambda h: -ob[h][0]):  # bottom up: the spans above stay valid
        a, b = ob[h]
        ours[a:b] = theirs[slice(*tb[h])]
    tmp = dst / f"{LOCK}.take-{os.getpid()}"
    tmp.write_text("".join(ours), encoding="utf-8")
    os.replace(tmp, dst / LOCK)
    return copied


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--any-backbone", is_flag=True, help="Take changed cells of any pretrained student, not only this one's."
)
@click.option("--dry-run", is_flag=True, help="List the cells, take nothing.")
def main(src: Path, any_backbone: bool, dry_run: bool) -> None:
    """Take the study cells SRC (another checkout of this repository) finished: lock entries and outputs."""
    dst = Path.cwd()
    names = cells_to_take(src, dst, None if any_backbone else backbone_md5(dst))
    if dry_run:
        click.echo("\n".join(names))
    else:
        click.echo(f"{len(names)} cells taken, {take(src, dst, names) if names else 0} output files copied")


if __name__ == "__main__":
    main()
