"""Stage `zeroshot`: the teacher's own zero-shot score per task and protocol condition, from the cache alone."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cache import (
    CacheCorrupt,
    CacheFormatError,
    StaleCacheError,
    TeacherCache,
    uncovered,
    vqa_answer_space,
)
from pipeline.config import SplitRoles
from pipeline.data.errors import DataError
from pipeline.data.shards import PreparedDataset
from pipeline.metrics import UnlabelledInstance
from pipeline.protocol import SplitError
from pipeline.splits import resolve_splits
from pipeline.zeroshot import task_zeroshot
from stages.common import stage_command, stage_params, write_json


def role_instances(root: Path, roles: SplitRoles) -> tuple[list, list | None, list, Path]:
    """Train, val (None: a seeded slice of train) and test instances of a data root, by role
    (pipeline/splits.py), and the train folder (whose answer vocabulary VQA uses)."""
    dirs = resolve_splits(root, roles)
    train, test = (list(PreparedDataset(p).iter_instances()) for p in (dirs.train, dirs.test))
    val = list(PreparedDataset(dirs.val).iter_instances()) if dirs.val else None
    return train, val, test, dirs.train


def check_covered(tc: TeacherCache, url: str, root: Path, roles: SplitRoles) -> None:
    """Refuse, naming the split and the fix, data the store was not extracted from: its texts and images
    would be missing from the cache (or, worse, other data's under the same ids)."""
    dirs = resolve_splits(root, roles)
    for path in (p for p in (dirs.train, dirs.val, dirs.test) if p):
        why = uncovered(url, tc.attrs, path, PreparedDataset(path).fingerprint)
        if why:
            raise click.ClickException(why)


@stage_command(user_errors=(CacheFormatError, CacheCorrupt, StaleCacheError, DataError, UnlabelledInstance))
@click.option(
    "--data",
    "data_root",
    default=None,
    help="Directory with the prepared splits (roles: the source's standard ones or protocol.splits) "
    "[default: data.out/data.source].",
)
@click.option("--cache", default=None, help="Teacher cache (Zarr store path) [default: cache.store].")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("metrics/zeroshot.json"),
    help="Where to write {task: {condition: {metric, score, chance, n, how}}}.",
)
def main(data_root, cache, out, params_path, overrides) -> None:
    """Score the teacher zero-shot on every task and condition of protocol.* (the ceiling beside each result).

    Reads pooled embeddings from the cache through the candidate texts the confidence weights use (docs/method.md
    §5): VCR candidates, VQA declarative candidates, SNLI-VE image–hypothesis cosine cut by two thresholds fitted
    on validation. The teacher does not run again; test instances are only scored.
    """
    params = stage_params(params_path, overrides)
    root = Path(data_root or Path(params.data.out) / params.data.source)
    url = cache or params.cache.store
    train, val, test, train_dir = role_instances(root, params.protocol.splits)
    pp = params.protocol
    # Real data holds one source per root: a task it lacks said only "no training instances".
    held = sorted({i.task for i in train})
    missing = [t for t in pp.tasks if t not in held]
    if missing:
        raise click.UsageError(
            f"protocol.tasks names {', '.join(missing)}, which {train_dir} does not hold (it holds "
            f"{', '.join(held) or 'no labelled task'}); pass --set 'protocol.tasks=[{','.join(held)}]'"
        )
    tc = TeacherCache(url)
    # Checked reads, as training's: a lost or damaged shard would otherwise score zero vectors (or fail in
    # zarr naming neither store nor array). Checks only read: the scores are the same on an intact store.
    tc.configure_reads(verify=True)
    check_covered(tc, url, root, params.protocol.splits)
    # The store's VQA vocabulary and answer types: its candidate texts were built from them (a store from before
    # the types is refused, naming the key and the rebuild).
    vocab, types = vqa_answer_space(url, tc.attrs)
    vocab = vocab or PreparedDataset(train_dir).answer_vocab()
    result: dict = {}
    for task in pp.tasks:
        try:
            scores = task_zeroshot(
                tc, task, pp.conditions, train, val, test,
                vocab=vocab, types=types, vqa_candidates=params.distill.vqa_candidates,
                shift_key=pp.shift_key, shift_target=pp.shift_target_domain,
            )  # fmt: skip
        except SplitError as e:  # a task the data lacks, a shift target no test instance has
            raise DataError(root, "protocol", str(e)) from None
        for z in scores:
            result.setdefault(task, {})[z.condition] = z.as_dict()
            floor = "" if z.text_floor is None else f", text floor {z.text_floor:.4f}"
            click.echo(
                f"{task}/{z.condition}: {z.metric} {z.score:.4f} (chance {z.chance:.4f}{floor}, n={z.n})"
            )
    write_json(out, result)


if __name__ == "__main__":
    main()
