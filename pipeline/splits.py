"""Which prepared folder plays which role (train, val, test): the one place every stage resolves it.

``prepare_data`` writes each split under the name the official files use (``data/shards/vqa/train2014``,
``val2014``); training, evaluation, zero-shot and the report read those folders as they are, with no renaming.
Each source has standard roles (``STANDARD_ROLES``): VQA v2 train2014 → train, val2014 → test
(its test-server labels are hidden) and validation a seeded slice of train, as low-shot VQA papers do;
SNLI-VE train / dev / test; VCR train → train, val → test, validation a slice of train; the synthetic world
train / val / test. ``protocol.splits`` overrides any role.

The data's source is read from the folders' own ``dataset.json``, so a root prepared from VQA gets VQA's
roles whatever ``data.source`` says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import VAL_SLICE, SplitRoles
from .data.errors import DataError
from .data.shards import INFO_FILE

ROLES = ("train", "val", "test")

# Kept here rather than in each converter: every training stage reads this table, and a converter change
# must not rerun every student (dvc.yaml's deps are each stage's import closure).
STANDARD_ROLES: dict[str, dict[str, str]] = {
    "synthetic": {"train": "train", "val": "val", "test": "test"},
    # The test server's labels are hidden: low-shot VQA papers test on val2014 and select on a slice of train.
    "vqa": {"train": "train2014", "val": VAL_SLICE, "test": "val2014"},
    "snli_ve": {"train": "train", "val": "dev", "test": "test"},
    # VCR's test labels are hidden too.
    "vcr": {"train": "train", "val": VAL_SLICE, "test": "val"},
}


class SplitError(DataError):
    """A role's folder is missing or the data root is not a folder of prepared splits; names both."""


@dataclass(frozen=True)
class SplitDirs:
    """The folders of one data root by role. ``val`` is None when validation is a seeded slice of train
    (``protocol.val_fraction``, drawn by pipeline.protocol.make_split)."""

    root: Path
    source: str
    train: Path
    val: Path | None
    test: Path

    def names(self) -> dict[str, str | None]:
        """Role → folder name (None: a slice of train): what a run records, so evaluation reads the same."""
        return {"train": self.train.name, "val": self.val.name if self.val else None, "test": self.test.name}


def _source(root: Path) -> str:
    """The source every prepared folder directly under ``root`` was written from."""
    if (root / INFO_FILE).is_file():
        raise SplitError(
            root, "data root", f"is one prepared split; pass the folder above it ({root.parent}), which holds "
            "the splits"
        )  # fmt: skip
    sources: dict[str, list[str]] = {}
    for info in sorted(root.glob(f"*/{INFO_FILE}")):
        try:
            src = json.loads(info.read_text()).get("source")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue  # opening that split reports it, naming the file, if a role needs it
        if isinstance(src, str):
            sources.setdefault(src, []).append(info.parent.name)
    if not sources:
        raise SplitError(
            root, "data root", "no prepared split here (run python -m stages.prepare_data first)"
        )
    if len(sources) > 1:
        found = "; ".join(f"{s}: {', '.join(d)}" for s, d in sorted(sources.items()))
        raise SplitError(root, "data root", f"holds splits of several sources ({found}); one source per root")
    return next(iter(sources))


def resolve_splits(data_root: str | Path, roles: SplitRoles | None = None) -> SplitDirs:
    """The train, val and test folders of ``data_root`` under the source's standard roles, each replaced by
    ``roles`` (``protocol.splits``) where it names one. A missing folder is an error naming the role and the
    key that sets it; a missing standard val folder falls back to a slice of train."""
    root = Path(data_root)
    roles = roles or SplitRoles()
    if not root.is_dir():
        raise SplitError(root, "data root", "no such folder (run python -m stages.prepare_data first)")
    source = _source(root)
    standard = STANDARD_ROLES.get(source, STANDARD_ROLES["synthetic"])
    chosen: dict[str, Path | None] = {}
    for role in ROLES:
        given = getattr(roles, role)
        name = given or standard[role]
        if role == "val" and name == VAL_SLICE:
            chosen[role] = None
            continue
        path = root / name
        if (path / INFO_FILE).is_file():
            chosen[role] = path
        elif role == "val" and not given:
            chosen[role] = None  # the standard val folder was not prepared: select on a slice of train
        else:
            how = "as set by protocol.splits" if given else f"the standard {role} split of {source}"
            have = sorted(p.parent.name for p in root.glob(f"*/{INFO_FILE}"))
            raise SplitError(
                path, f"protocol.splits.{role}",
                f"no prepared split here ({how}); prepared: {', '.join(have)}. Prepare it "
                f"(python -m stages.prepare_data --split {name}) or set protocol.splits.{role}",
            )  # fmt: skip
    train, val, test = chosen["train"], chosen["val"], chosen["test"]
    assert train is not None and test is not None
    # Two roles on one folder: a val (or train) folder that is the test folder selects the checkpoint on the
    # test set it is then scored on; a val folder that is train selects on the training data.
    for role, other in (("val", "test"), ("train", "test"), ("val", "train")):
        if chosen[role] is not None and chosen[role] == chosen[other]:
            key = f"protocol.splits.{role}" if getattr(roles, role) else f"protocol.splits.{other}"
            raise SplitError(
                chosen[role], key,
                f"the {role} and {other} roles name the same split; give each its own (the val role may be "
                f"'{VAL_SLICE}': a slice of train)",
            )  # fmt: skip
    return SplitDirs(root, source, train, val, test)


def recorded_splits(data_root: str | Path, names: dict) -> SplitDirs:
    """The folders a run recorded (``SplitDirs.names``), so evaluation tests on what training held out."""
    root = Path(data_root)
    dirs = {r: (root / names[r]) if names.get(r) else None for r in ROLES}
    for role in ("train", "test"):
        if dirs[role] is None or not (dirs[role] / INFO_FILE).is_file():
            raise SplitError(dirs[role] or root, f"{role} split", "the run's prepared split is gone")
    return SplitDirs(root, "", dirs["train"], dirs["val"], dirs["test"])
