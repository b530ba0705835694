"""Stage `extract-teacher`: run the frozen teacher once over every unique image and text into the Zarr cache."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import click

from stages.common import stage_command, stage_params, write_json


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: bad data, a stale or foreign store, a locked or unwritable location, a
    teacher that cannot load, a failed write, NaN/Inf outputs (imported when the stage runs, not for --help)."""
    from pipeline.cache import CacheFormatError, StaleCacheError
    from pipeline.data.errors import DataError
    from pipeline.extract import NonFiniteOutput, StoreLocationError, UnitWriteError
    from pipeline.lock import StoreLocked, StoreNotWritable
    from pipeline.teacher import TeacherError

    return (
        DataError, StaleCacheError, CacheFormatError, TeacherError, StoreLocked, StoreNotWritable, UnitWriteError,
        NonFiniteOutput, StoreLocationError,
    )  # fmt: skip


@stage_command(user_errors=_user_errors)
@click.option(
    "--shards",
    "shards",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A prepared dataset directory (holding dataset.json) or a folder of them (repeatable). [default: every "
    "prepared dataset under data.out/data.source (data/shards/synthetic) except the caption corpora "
    "captions*, which only train the embedded teacher]",
)
@click.option(
    "--out",
    "store",
    default=None,
    help="The store: a local path or any fsspec URL (file://, s3://, gs://, …): a new or empty folder, or a "
    "teacher cache to resume or rebuild; anything else there, or a path overlapping a --shards folder, is "
    "refused. [default: cache.store]",
)
@click.option(
    "--model",
    default=None,
    help="open_clip model name (ViT-B-32) or path to an open_clip model-config JSON. [default: teacher.model]",
)
@click.option(
    "--pretrained",
    default=None,
    help="open_clip pretrained tag, a local checkpoint path, or '' for random init. [default: teacher.pretrained]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Teacher batch. [default: cache.batch_size]",
)
@click.option(
    "--scheduler",
    default=None,
    help="'local' starts a dask LocalCluster of cache.n_workers worker processes (one unit at a time each, "
    "torch using cores/n_workers threads); 'sync' runs the units in this process, cache.n_workers at a time "
    "on threads sharing one teacher (for a GPU teacher: one unit's decode and shard writes overlap "
    "another's); anything else is the address of a running dask scheduler (tcp://host:8786) whose workers "
    "see the same data paths and store URL. [default: cache.scheduler]",
)
@click.option(
    "--views",
    type=click.IntRange(min=0),
    default=None,
    help="K > 0 also caches K views per image under views/ (view 0 = the eval transform, views 1..K-1 random "
    "resized crops + flips with their boxes) so a student can replay them. [default: cache.views]",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "int8"]),
    default=None,
    help="Token storage: float16, or int8 with a float16 scale per token (half the bytes; the reconstruction "
    "cosine goes into the metrics). [default: cache.dtype]",
)
@click.option(
    "--device",
    default="auto",
    help="Torch device of the teacher in every worker; 'auto' = CUDA when available, else CPU.",
)
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Metrics JSON: instances, images/texts before and after deduplication, units computed vs skipped "
    "(resumed), seconds, items/s, bytes on disk, uncompressed bytes, compression ratio, reconstruction cosine. "
    "[default: <store>.extract.json beside a local store (dvc.yaml passes metrics/extract.json); none for "
    "a remote store URL]",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Rebuild an existing teacher cache from scratch. Without it, a store built from another teacher or "
    "store settings is refused (naming the differing fields) and a matching one is resumed (committed units "
    "are skipped) and grown: images and texts of --shards it does not hold are appended as new units, its "
    "rows untouched. A local store is rebuilt beside it (<store>.tmp-rebuild) and swapped in when complete, "
    "so a failed rebuild leaves it as it was. --out holding anything but a teacher cache is never replaced.",
)
@click.option(
    "--rebuild-stale",
    is_flag=True,
    help="Rebuild a store whose teacher or store settings differ instead of refusing it (beside it, as "
    "--overwrite does; an interrupted rebuild is resumed); a matching store is still resumed and grown. "
    "dvc.yaml uses this, so a changed teacher rebuilds, new data is appended and an interrupted run resumes.",
)
@click.option("--quiet", is_flag=True, help="No progress bar or plan log.")
def main(
    shards, store, model, pretrained, batch_size, scheduler, views, dtype, device, metrics_path, params_path,
    overrides, overwrite, rebuild_stale, quiet,
) -> None:  # fmt: skip
    """Extract the teacher cache (docs/method.md §1): teacher outputs for every unique image and text, once.

    Images are deduplicated by content (SHA-1) across all datasets and texts (every text the student and the
    confidence weights will look up, pipeline.texts.instance_texts) by content hash. Work is split into units
    that each own whole Zarr shards (cache.image_rows_per_unit images or cache.text_rows_per_unit texts) and
    commit a manifest entry when written, so an interrupted run resumes where it stopped. A store grows: run it
    again with more --shards (another dataset, another split) and only what the store lacks is computed,
    appended after its rows (docs/cache.md, "Growing a store"). An image unit writes
    each of its shards (cache.image_shard_bytes) behind the teacher's next batches: with a GPU teacher, give
    units many shards (e.g. --set cache.image_rows_per_unit=2048 for ViT-B-16).
    """
    from pipeline.data.shards import find_datasets
    from pipeline.extract import (
        TeacherSpec,
        check_store_outside,
        default_metrics_path,
        extract,
        find_default_datasets,
        open_datasets,
    )

    params = stage_params(params_path, overrides)
    cp = params.cache
    changes = {
        "batch_size": batch_size,
        "scheduler": scheduler,
        "views": views,
        "dtype": dtype,
        "store": store,
    }
    cp = dataclasses.replace(cp, **{k: v for k, v in changes.items() if v is not None})
    if not quiet:
        # The plan and unit counts; open_clip's own INFO chatter stays hidden.
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("clip_td").setLevel(logging.INFO)

    if shards:
        paths = []
        for s in shards:
            found = [s] if (s / "dataset.json").exists() else find_datasets(s)
            if not found:
                raise click.UsageError(f"--shards {s}: no prepared dataset (dataset.json) there")
            paths += [str(p) for p in found]
    else:
        root = Path(params.data.out) / params.data.source
        paths = find_default_datasets(str(root))
        if not paths:
            raise click.UsageError(
                f"no prepared datasets under {root} (run `python -m stages.prepare_data` first)"
            )
    spec = TeacherSpec(
        model if model is not None else params.teacher.model,
        pretrained if pretrained is not None else params.teacher.pretrained,
        params.teacher.precision,
        device,
    )
    # The folders as given too: a store inside a folder of datasets (not inside any one of them) still writes
    # into what --shards names.
    check_store_outside(cp.store, [*shards, *paths])
    datasets = open_datasets(paths)
    metrics = extract(
        datasets,
        cp.store,
        spec,
        cp,
        scheduler=cp.scheduler,
        progress=not quiet,
        overwrite=overwrite,
        rebuild_stale=rebuild_stale,
        vqa_candidates=params.distill.vqa_candidates,
    )
    if metrics_path is None:
        metrics_path = default_metrics_path(cp.store)
    if metrics_path is not None:
        write_json(Path(metrics_path), metrics, newline=False)
    appended = ""
    if metrics.get("images_appended") or metrics.get("aliases_appended") or metrics.get("texts_appended"):
        appended = (
            f"appended {metrics['images_appended']} images, {metrics['aliases_appended']} aliases and "
            f"{metrics['texts_appended']} texts the store did not hold; "
        )
    click.echo(
        f"{cp.store}: {appended}{metrics['unique_images']} images "
        f"({metrics['image_duplicates_removed']} duplicates removed), {metrics['unique_texts']} texts ({metrics['text_duplicates_removed']} duplicates removed); units "
        f"{metrics['units_computed']} computed, {metrics['units_skipped']} skipped; {metrics['seconds']:.1f}s, "
        f"{metrics['items_per_s']:.1f} items/s; {metrics['bytes_on_disk'] / 1e6:.1f} MB on disk "
        f"(ratio {metrics['compression_ratio']:.2f}) -> {metrics_path or 'no metrics file (pass --metrics)'}"
    )


if __name__ == "__main__":
    main()
