"""Which instances a run trains, validates and tests on (docs/method.md §8).

Conditions:
  full         every labelled training instance of the task;
  lowshot-f    a fraction f of them, stratified by label, nested across fractions (the 5% subset is inside the
               25% subset for the same seed) and fixed per seed;
  shift        training instances whose grouping key (default ``domain``) is not the target; tested on the
               target group only.
Validation (model selection) never touches the test split: it is the ``val`` split restricted to the
condition's training groups, or, when there is no val split, a seeded slice of the training pool.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction

from .conditions import Condition  # noqa: F401 - re-exported: the protocol's conditions
from .data.schema import Instance


def stratum(inst: Instance) -> str:
    """The label a low-shot subset is stratified by."""
    if inst.task == "vqa":
        return inst.answer
    if inst.task == "vcr":
        return f"{inst.label}"
    return str(inst.label)


def group_of(inst: Instance, key: str) -> str:
    """The grouping value for domain shift: an Instance field (``domain``) or a ``meta`` key (e.g. question_type)."""
    if hasattr(inst, key) and key != "meta":
        return str(getattr(inst, key))
    return str(inst.meta.get(key, ""))


def _rank(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


@dataclass
class Split:
    """Instance keys for one (task, condition, seed) run, plus the unlabeled images for the KD-only variants."""

    train: list[str]
    val: list[str]
    test: list[str]
    unlabeled_images: list[str] = field(default_factory=list)  # training images the low-shot subset drops
    target_images: list[str] = field(
        default_factory=list
    )  # shifted target-domain images (transductive variant)

    def summary(self) -> dict:
        return {k: len(v) for k, v in self.__dict__.items()}


def lowshot_subset(pool: Iterable[Instance], fraction: float, seed: int) -> list[str]:
    """Stratified, nested, seeded subset: within each label stratum the instances are ordered by a seeded hash
    and the first ⌈f·n⌉ kept, so a smaller fraction's subset is a prefix of a larger one's. Every label keeps
    at least one instance, so with many rare labels (real VQA's long answer tail) the subset is larger than
    f of the pool: a warning says by how much when it is over 1.5 f."""
    by_stratum: dict[str, list[Instance]] = defaultdict(list)
    for inst in pool:
        by_stratum[stratum(inst)].append(inst)
    keep: list[str] = []
    for members in by_stratum.values():
        members.sort(key=lambda i: _rank(seed, i.key))
        # ⌈F·n⌉ of the decimal F the condition names: in floats 0.07 · 100 is 7.000000000000001, one too many.
        keep += [i.key for i in members[: math.ceil(Fraction(repr(fraction)) * len(members))]]
    n = sum(len(m) for m in by_stratum.values())
    if n and len(keep) > 1.5 * fraction * n:
        warnings.warn(
            f"lowshot-{fraction:g} keeps {len(keep)} of {n} labelled instances ({len(keep) / n:.1%}, not "
            f"{fraction:.1%}): each of the {len(by_stratum)} labels keeps at least one (⌈F·n⌉ per label)",
            stacklevel=2,
        )
    return sorted(keep)


class SplitError(ValueError):
    """A split that cannot be drawn from the data as the protocol names it (a user's data or params to fix)."""


def make_split(
    task: str,
    condition: str | Condition,
    seed: int,
    train: Iterable[Instance],
    test: Iterable[Instance],
    val: Iterable[Instance] | None = None,
    *,
    shift_key: str = "domain",
    target: str = "",
    val_fraction: float = 0.1,
) -> Split:
    cond = Condition.parse(condition) if isinstance(condition, str) else condition
    if cond.kind == "shift" and not target:
        raise SplitError("the shift condition needs a target group (protocol.shift_target_domain)")

    def in_source(inst: Instance) -> bool:
        return cond.kind != "shift" or group_of(inst, shift_key) != target

    pool = [i for i in train if i.task == task and (i.label is not None or bool(i.answer))]
    source = [i for i in pool if in_source(i)]
    if val is not None:
        val_keys = sorted(i.key for i in val if i.task == task and in_source(i))
    else:
        # No val split: hold out a seeded slice of the training source; it is removed from training. Whole
        # images go (VQA and VCR ask several questions of one image): a question held out beside another of
        # its image in training would select the checkpoint on an image the student was trained on.
        by_image: dict[str, list[Instance]] = defaultdict(list)
        for i in source:
            by_image[i.image_id].append(i)
        want, cut = max(1, int(val_fraction * len(source))), []
        for image in sorted(by_image, key=lambda im: _rank(seed + 10_000, im)):
            if len(cut) >= want:
                break
            cut += by_image[image]
        val_keys = sorted(i.key for i in cut)
        held = set(val_keys)
        source = [i for i in source if i.key not in held]
    if cond.kind == "lowshot":
        train_keys = lowshot_subset(source, cond.fraction, seed)
    else:
        train_keys = sorted(i.key for i in source)
    chosen = set(train_keys)
    labelled_images = {i.image_id for i in source if i.key in chosen}
    unlabeled = sorted({i.image_id for i in source if i.key not in chosen} - labelled_images)
    test_list = [i for i in test if i.task == task]
    if cond.kind == "shift":
        groups = {group_of(i, shift_key) for i in test_list}
        if test_list and target not in groups:
            # A mistyped target would train on every domain and score an empty test set as 0.
            raise SplitError(
                f"{task}/{cond.name}: no test instance has {shift_key} = {target!r} (protocol.shift_key, "
                f"protocol.shift_target_domain); the test split's: {sorted(groups)[:10]}"
            )
        test_list = [i for i in test_list if group_of(i, shift_key) == target]
        target_images = sorted({i.image_id for i in test_list})
    else:
        target_images = []
    if not train_keys:
        raise SplitError(
            f"{task}/{cond.name}/seed {seed}: no training instances (check the task and shift target)"
        )
    return Split(train_keys, val_keys, sorted(i.key for i in test_list), unlabeled, target_images)
