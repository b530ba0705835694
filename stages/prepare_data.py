"""Stage `prepare`: a dataset (the built-in synthetic world or official VQA v2 / SNLI-VE / VCR files) → WebDataset shards."""

from __future__ import annotations

import contextlib
import importlib
import time
from pathlib import Path

import click

from pipeline.data.errors import DataError, SkipReport
from pipeline.data.schema import SchemaError
from pipeline.data.shards import DatasetWriter
from stages.common import params_options, stage_params

SOURCES = ("synthetic", "vqa", "snli_ve", "vcr")
SYNTHETIC_SPLITS = ("train", "val", "test", "captions", "captions_val")


def prepare(source: str, root: Path | None, split: str, out: Path, params, on_error: str) -> dict:
    """Convert one split into ``out/<split>/``; returns the written dataset.json content."""
    report = SkipReport(on_error)
    dest = out / split
    writer = DatasetWriter(
        dest,
        source=source,
        split=split,
        shard_size=params.data.shard_size,
        image_shard_size=params.data.image_shard_size,
        report=report,
    )
    try:
        if source == "synthetic":
            from pipeline.data import synthetic

            if split not in SYNTHETIC_SPLITS:
                raise click.BadParameter(
                    f"synthetic splits are {', '.join(SYNTHETIC_SPLITS)}", param_hint="--split"
                )
            synthetic.generate(split, params.data.synthetic, writer)
        else:
            if root is None:
                raise click.BadParameter(f"--root is required for --source {source}", param_hint="--root")
            importlib.import_module(f"pipeline.data.{source}").convert(root, split, writer)
    except BaseException:
        # Release the shard files; the conversion error is the one to report, not a follow-on from close.
        with contextlib.suppress(Exception):
            writer.close()
        raise
    return writer.close()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "--source",
    type=click.Choice(SOURCES),
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
    "flickr30k_images/. VCR: <split>.jsonl and vcr1images/. Not used for synthetic.",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    help="Split to convert; repeat for several. Official: the name in the file names (e.g. train2014, dev, val). "
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
@params_options
def main(source, root, splits, out, on_error, params_path, overrides) -> None:
    """Write a dataset split as WebDataset shards in clip-td's one sample format.

    Each split becomes a directory of instance shards (one JSON sample per task example) and image shards
    (each image stored once, however many instances use it), an image index for random access, a
    dataset.json with counts and a fingerprint, and skipped.json.
    """
    params = stage_params(params_path, overrides)
    source = source or params.data.source
    on_error = on_error or params.data.on_error
    out = out or Path(params.data.out) / source
    splits = splits or tuple(params.data.splits)
    for split in splits:
        t0 = time.perf_counter()
        try:
            info = prepare(source, root, split, out, params, on_error)
        except (DataError, SchemaError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(
            f"{source}/{split}: {info['instances']} instances {info['tasks']}, {info['images']} unique images, "
            f"{info['skipped']} skipped, {time.perf_counter() - t0:.1f}s -> {out / split}"
        )


if __name__ == "__main__":
    main()
