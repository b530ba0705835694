"""Stage `prepare`: a dataset (the built-in synthetic world or official VQA v2 / SNLI-VE / VCR files) → WebDataset shards."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import click

from pipeline.config import usable_cores
from pipeline.data.errors import DataError, SkipReport
from pipeline.data.schema import SchemaError
from pipeline.data.shards import DatasetWriter, check_destination, check_split_name, commit_all
from pipeline.names import DATA_SOURCES
from stages.common import one_line, stage_command, stage_params

SYNTHETIC_SPLITS = ("train", "val", "test", "captions", "captions_val")


def check_args(source: str, root: Path | None, splits: tuple[str, ...], out: Path, params) -> None:
    """Every argument problem, for every split, before anything is read or written."""
    for key in ("shard_size", "image_shard_size"):
        value = getattr(params.data, key)
        # webdataset's ShardWriter takes 0 or less as "one sample per shard" rather than refusing it.
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise click.UsageError(f"key 'data.{key}': must be an integer >= 1, got {value!r}")
    if not splits:
        raise click.BadParameter("no split to convert (data.splits is empty)", param_hint="--split")
    for split in splits:
        try:
            check_split_name(split)
        except DataError as e:
            raise click.BadParameter(f"{split!r}: {e.reason}", param_hint="--split") from None
        if source == "synthetic" and split not in SYNTHETIC_SPLITS:
            raise click.BadParameter(
                f"{split!r}: synthetic splits are {', '.join(SYNTHETIC_SPLITS)}", param_hint="--split"
            )
    if len(set(splits)) != len(splits):
        raise click.BadParameter(f"a split is named twice in {list(splits)}", param_hint="--split")
    if source != "synthetic" and root is None:
        raise click.BadParameter(f"--root is required for --source {source}", param_hint="--root")
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} exists and is not a folder", param_hint="--out")
    for split in splits:
        check_destination(out / split)  # a folder we may not replace is refused before any input is read


def build(
    source: str, root: Path | None, split: str, out: Path, params, on_error: str, workers: int = 1
) -> DatasetWriter:
    """Convert one split into a temp folder beside ``out/<split>/``; the returned writer is finished, not yet
    committed (nothing at ``out/<split>`` has changed). On an error the temp folder is gone."""
    writer = DatasetWriter(
        out / split,
        source=source,
        split=split,
        shard_size=params.data.shard_size,
        image_shard_size=params.data.image_shard_size,
        report=SkipReport(on_error),
    )
    try:
        if source == "synthetic":
            from pipeline.data import synthetic

            synthetic.generate(split, params.data.synthetic, writer, workers)
        else:
            importlib.import_module(f"pipeline.data.{source}").convert(root, split, writer, workers)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return writer


@stage_command(user_errors=(DataError, SchemaError, ValueError))
@click.option(
    "--source",
    type=click.Choice(DATA_SOURCES),
    default=None,
    help="Where instances come from: the built-in synthetic world, or the official files of VQA v2, SNLI-VE or VCR "
    "[default: data.source in params.yaml].",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Directory holding the official files. VQA v2: v2_OpenEnded_mscoco_<split>_questions.json, "
    "v2_mscoco_<split>_annotations.json and <split>/COCO_<split>_<id>.jpg. SNLI-VE: snli_ve_<split>.jsonl and "
    "flickr30k_images/. VCR: <split>.jsonl and vcr1images/. Not used for synthetic. [default: data.root]",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    help="Split to convert; repeat for several. Official: the name in the file names (e.g. train2014, dev, val); "
    "each is written under that name and plays its source's standard role (pipeline/splits.py). "
    f"Synthetic: {', '.join(SYNTHETIC_SPLITS)} [default: data.splits in params.yaml].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Parent directory; each split is written to OUT/<split>/ [default: data.out/<source> from params.yaml].",
)
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default=None,
    help="Bad input (missing file, unreadable image, malformed line, unknown label): 'fail' stops naming the file "
    "and line/key; 'skip' counts and lists every skipped item in OUT/<split>/skipped.json [default: data.on_error].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    help="Images made ahead of the shard writer: processes that render the synthetic world's (a few at most: "
    "beyond them the writer is the bound), threads that read and check official files' (PIL decodes outside "
    "the GIL). 0: one per core this process may use; 1: none, "
    "in-process. The shards and skipped.json are byte-identical for every value, so it is not a parameter DVC "
    "tracks.",
)
def main(source, root, splits, out, on_error, workers, params_path, overrides) -> None:
    """Write a dataset split as WebDataset shards in clip-td's one sample format.

    Each split becomes a directory of instance shards (one JSON sample per task example) and image shards
    (each image stored once, however many instances use it), an image index for random access, a
    dataset.json with counts and a fingerprint, and skipped.json.

    Splits are built in hidden folders beside OUT/<split>/ and moved into place only when every split of the
    run is complete, all together: a failed run changes nothing (if a move fails, those already made are
    undone). An existing OUT/<split>/ is replaced only when it is a split this stage wrote and holds nothing
    else; any other folder, file or symlink there is refused.
    """
    params = stage_params(params_path, overrides)
    source = source or params.data.source
    on_error = on_error or params.data.on_error
    out = out or Path(params.data.out) / source
    splits = splits or tuple(params.data.splits)
    if root is None and source != "synthetic" and params.data.root:
        root = Path(params.data.root).expanduser()
        if not root.is_dir():
            raise click.BadParameter(f"key 'data.root': {root} is not a folder", param_hint="--root")
    # Every split is built before any is moved into place: a run that fails on its last split leaves the
    # earlier ones as they were too, not half of the splits new and half old.
    done: list[DatasetWriter] = []
    try:
        check_args(source, root, splits, out, params)
        for split in splits:
            t0 = time.perf_counter()
            writer = build(source, root, split, out, params, on_error, workers or usable_cores())
            done.append(writer)
            info = writer.info
            click.echo(
                f"{source}/{split}: {info['instances']} instances {info['tasks']}, {info['images']} unique "
                f"images, {info['skipped']} skipped, {time.perf_counter() - t0:.1f}s"
            )
        commit_all(done)  # all or none: a refused or failed move puts every split back as it was
    except OSError as e:
        raise click.ClickException(one_line(f"{e.filename or out}: {e.strerror or e}")) from e
    finally:
        for writer in done:
            writer.abort()  # a no-op for the committed ones
    click.echo(f"-> {', '.join(str(w.out) for w in done)}")


if __name__ == "__main__":
    main()
