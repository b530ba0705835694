"""Bring the study cells a sitting ran in another checkout into this one: their dvc.lock entries and the
files they output. The study needs the shared artifacts (teacher, stores, pretrained student), which a
working checkout may not hold, so a sitting runs in a clone that builds them (`make study` there); this takes
what it finished back.

``python -m benchmarks.study_take SRC`` takes the cells the sitting changed: the entries of SRC's
study/dvc.lock whose outputs or pretrained student differ from the lock SRC's git revision committed, if
that student is this checkout's (the root lock's ``pretrain_student`` output; ``--any-backbone`` drops that
condition). A cell this checkout changed since that revision too (another sitting's, taken already) is a
conflict, and nothing is taken; so is a stage this checkout's study/dvc.yaml does not define.

A stage the sitting reran with the very outputs it had (its code or params had changed, its result had not)
is taken too when its entry records this checkout's inputs, as ``pipeline.study.freshness`` judges a cell
current. Otherwise this lock keeps the old inputs and every sitting reruns it.

The outputs are copied beside their destinations first, then renamed into place, then the lock is written:
an entry never claims files that are not there. A taken entry replaces this lock's entry of the same name, or
goes last (where DVC puts a new stage). Code changed here since the clone's revision leaves the taken entries
recording the older code: rehash them afterwards (``python -m pipeline.dvc_lockfile rehash --from <the
clone's revision> …``, and ``--new`` for a module added since).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from pipeline.dvc_lockfile import fast_load, stage_blocks
from pipeline.study.freshness import Inputs, backbone, entry_backbone

LOCK = "study/dvc.lock"


def _result(entry: dict | None) -> tuple:
    """What a run of the cell decides: its outputs and the backbone it fine-tuned. The entries also differ
    where a checkout rehashed code (the same run, recorded against newer code), which is not a run."""
    return (entry.get("outs"), entry_backbone(entry)) if entry else (None, None)


def cells_to_take(src: Path, dst: Path, only_backbone: str | None) -> list[str]:
    """The cells SRC's sitting ran (its study lock against the one its revision committed), of the given
    backbone (None: any); refuses cells DST changed since that revision too, and stages DST does not define."""
    import subprocess

    import yaml

    shown = subprocess.run(["git", "-C", str(src), "show", f"HEAD:{LOCK}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise click.ClickException(f"{src}: no committed {LOCK} to compare with ({shown.stderr.strip()})")
    base = fast_load(shown.stdout)["stages"]
    theirs = fast_load((src / LOCK).read_text(encoding="utf-8"))["stages"]
    ours = fast_load((dst / LOCK).read_text(encoding="utf-8"))["stages"]
    defined = set(yaml.safe_load((dst / "study" / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
    ran = [
        n
        for n, e in theirs.items()
        if _result(e) != _result(base.get(n))
        and (only_backbone is None or entry_backbone(e) == only_backbone)
    ]
    unknown = [n for n in ran if n.split("@")[0] not in defined]
    if unknown:
        raise click.ClickException(
            f"{src / LOCK} has stages study/dvc.yaml here does not define: {unknown[:5]}"
        )
    both = [n for n in ran if _result(ours.get(n)) not in (_result(base.get(n)), _result(theirs[n]))]
    if both:
        raise click.ClickException(
            f"{len(both)} cells changed here too since {src}'s revision (another sitting's?), e.g. {both[:3]}: "
            "nothing taken"
        )
    taken = [n for n in ran if _result(ours.get(n)) != _result(theirs[n])]
    inputs = Inputs(dst / "dvc.lock", dst / LOCK)
    return taken + [
        n for n in theirs if n in ours and n not in ran and _refreshed(theirs[n], ours[n], inputs)
    ]


def _refreshed(theirs: dict, ours: dict, inputs: Inputs) -> bool:
    """Whether THEIRS is OURS rerun with the same result on the inputs this checkout records: the same command
    and outputs, and no dep or param that differs from this checkout's (``Inputs.stale``)."""
    if theirs == ours or any(theirs.get(k) != ours.get(k) for k in ("cmd", "outs")):
        return False
    return inputs.stale(theirs) is None


def take(src: Path, dst: Path, names: list[str]) -> int:
    """Put SRC's entries ``names`` in DST's lock and copy their outputs; returns how many files were copied."""
    text = (src / LOCK).read_text(encoding="utf-8")
    entries = fast_load(text)["stages"]
    theirs = text.splitlines(keepends=True)
    ours = (dst / LOCK).read_text(encoding="utf-8").splitlines(keepends=True)
    tb, _ = stage_blocks(theirs)
    ob, end = stage_blocks(ours)
    outs = [o["path"] for n in names for o in entries[n].get("outs", [])]
    missing = [p for p in outs if not (src / p).exists()]
    missing += [p for p in outs if (dst / p).exists() and (dst / p).is_dir() != (src / p).is_dir()]
    if missing:
        raise click.ClickException(
            f"{src}: outputs its lock records are missing (or a file here and a folder there), e.g. {missing[:3]}: "
            "nothing taken"
        )
    staged: list[tuple[Path, Path]] = []
    try:  # every copy made before anything here is replaced
        for p in outs:
            s, d = src / p, dst / p
            d.parent.mkdir(parents=True, exist_ok=True)
            tmp = d.with_name(f".{d.name}.take-{os.getpid()}")
            staged.append((tmp, d))  # before the copy: a copy that fails half way is removed too
            shutil.copytree(s, tmp) if s.is_dir() else shutil.copyfile(s, tmp)
    except BaseException:
        for tmp, _ in staged:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()
        raise
    for tmp, d in staged:
        if d.is_dir():
            shutil.rmtree(d)
        os.replace(tmp, d)
    new = [h for h in (f"  {n}:\n" for n in names) if h not in ob]
    ours[end:end] = [line for h in new for line in theirs[slice(*tb[h])]]
    for h in sorted((h for h in (f"  {n}:\n" for n in names) if h in ob), key=lambda h: -ob[h][0]):
        a, b = ob[h]  # bottom up: the spans above stay valid
        ours[a:b] = theirs[slice(*tb[h])]
    tmp = dst / f"{LOCK}.take-{os.getpid()}"
    tmp.write_text("".join(ours), encoding="utf-8")
    os.replace(tmp, dst / LOCK)
    return len(staged)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--any-backbone", is_flag=True, help="Take changed cells of any pretrained student, not only this one's."
)
@click.option("--dry-run", is_flag=True, help="List the cells, take nothing.")
def main(src: Path, any_backbone: bool, dry_run: bool) -> None:
    """Take the study cells SRC (another checkout of this repository) finished: lock entries and outputs."""
    dst = Path.cwd()
    names = cells_to_take(src, dst, None if any_backbone else backbone(dst / "dvc.lock"))
    if dry_run:
        click.echo("\n".join(names))
    else:
        click.echo(f"{len(names)} cells taken, {take(src, dst, names) if names else 0} output files copied")


if __name__ == "__main__":
    main()
