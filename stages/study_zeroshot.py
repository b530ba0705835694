"""Stage `study_zeroshot`: one teacher's zero-shot score on every task and condition of the study."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from pipeline.study import StudyError, cells, load_study, override_args
from stages.common import params_options, stage_params, write_json, write_text


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--study", "study_path", default="study/params.yaml", help="The study's parameters (study.*).")
@click.option("--cache", required=True, help="The teacher cache (Zarr store) to score.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write {task: {condition: {metric, score, chance, n, how}}}.",
)
@params_options
def main(study_path, cache, out, params_path, overrides) -> None:
    """The ceiling beside every study cell: stages.zeroshot's scoring (pipeline.zeroshot.task_zeroshot, from
    the cache alone) over study.tasks and every condition of the study's grid."""
    from pipeline.cache import CacheCorrupt, CacheFormatError, StaleCacheError, TeacherCache, vqa_answer_space
    from pipeline.data.errors import DataError
    from pipeline.data.shards import PreparedDataset
    from pipeline.zeroshot import task_zeroshot
    from stages.zeroshot import role_instances

    t0 = time.time()
    try:
        sp = load_study(study_path)
    except StudyError as e:
        raise click.UsageError(str(e)) from None
    params = stage_params(params_path, (*override_args(sp), *overrides))
    root = Path(params.data.out) / params.data.source
    try:
        tc = TeacherCache(cache)
        tc.configure_reads(verify=True)  # checked reads, as training's (stages.zeroshot says why)
    except (CacheFormatError, CacheCorrupt) as e:
        raise click.ClickException(str(e)) from e
    try:
        train, val, test, train_dir = role_instances(root, params.protocol.splits)
    except DataError as e:
        raise click.ClickException(str(e)) from None
    try:
        vocab, types = vqa_answer_space(cache, tc.attrs)  # what the store's candidate texts were built from
    except StaleCacheError as e:
        raise click.ClickException(str(e)) from None
    vocab = vocab or PreparedDataset(train_dir).answer_vocab()
    conditions = list(dict.fromkeys(c.condition for c in cells(sp)))
    pp = params.protocol
    result: dict = {}
    for task in sp.tasks:
        try:
            scores = task_zeroshot(
                tc,
                task,
                conditions,
                train,
                val,
                test,
                vocab=vocab,
                types=types,
                vqa_candidates=params.distill.vqa_candidates,
                shift_key=pp.shift_key,
                shift_target=pp.shift_target_domain,
            )
        except CacheCorrupt as e:  # names the store, array and unit: one line, no traceback
            raise click.ClickException(str(e)) from None
        for z in scores:
            result.setdefault(task, {})[z.condition] = z.as_dict()
            click.echo(f"{task}/{z.condition}: {z.metric} {z.score:.4f} (chance {z.chance:.4f}, n={z.n})")
    result_seconds = round(time.time() - t0, 2)
    write_json(out, result)
    # Its cost, beside the scores (the scores file keeps stages.zeroshot's format).
    write_text(out.with_name(out.stem + ".time.json"), json.dumps({"seconds": result_seconds}) + "\n")


if __name__ == "__main__":
    main()
