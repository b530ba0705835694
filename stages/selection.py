"""Stage `selection`: the selection-quality diagnostic of the study (student/diagnostics.py) per teacher cache."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipeline.study import StudyError, load_study, override_args
from stages.common import params_options, stage_params, write_json


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--study", "study_path", default="study/params.yaml", help="The study's parameters (study.*).")
@click.option(
    "--cache",
    "caches",
    multiple=True,
    required=True,
    metavar="NAME=PATH",
    help="A teacher cache to score, under a name (full, step0, …); repeatable.",
)
@click.option("--data", "data_root", default=None, help="Prepared splits [default: data.out/data.source].")
@click.option(
    "--split",
    default=None,
    help="The split folder whose instances are scored [default: the train role's folder, pipeline/splits.py: "
    "what distillation sees].",
)
@click.option(
    "--min-cover",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.1,
    help="Share of a grid cell's area an object's box must cover for the cell to be on it.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("reports/study/selection.json"),
)
@params_options
def main(study_path, caches, data_root, split, min_cover, out, params_path, overrides) -> None:
    """Share of clip_td's selected image tokens on the objects each instance's text names, against random
    selection, per task and teacher cache (the first study.selection_instances instances of SPLIT per task).
    The selection is computed from the cache exactly as training does (student.losses.prepare_teacher), on the
    student's grid, with distill.rho_v / selection / relevance_source from params.yaml + study.overrides."""
    from pipeline.cache import CacheCorrupt, CacheFormatError, TeacherCache
    from pipeline.data.shards import PreparedDataset
    from student.diagnostics import selection_quality
    from student.losses import method_config

    t0 = time.time()
    try:
        sp = load_study(study_path)
    except StudyError as e:
        raise click.UsageError(str(e)) from None
    params = stage_params(params_path, (*override_args(sp), *overrides))
    named = {}
    for c in caches:
        name, sep, path = c.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{c!r}: expected NAME=PATH", param_hint="--cache")
        named[name] = path
    root = Path(data_root or Path(params.data.out) / params.data.source)
    if split is None:
        from pipeline.data.errors import DataError
        from pipeline.splits import resolve_splits

        try:
            split = resolve_splits(root, params.protocol.splits).train.name
        except DataError as e:
            raise click.ClickException(str(e)) from None
    if not (root / split / "dataset.json").exists():
        raise click.ClickException(
            f"{root / split}: no prepared split here (run python -m stages.prepare_data)"
        )
    ds = PreparedDataset(root / split)
    by_task: dict[str, list] = {t: [] for t in sp.tasks}
    for inst in ds.iter_instances():
        if inst.task in by_task and len(by_task[inst.task]) < sp.selection_instances:
            by_task[inst.task].append(inst)
    cfg = method_config("clip_td", params.distill)
    g_s = params.student.image_size // params.student.patch_size
    result = {
        "split": split,
        "grid": g_s,
        "rho_v": cfg.rho_v,
        "selection": cfg.selection,
        "relevance_source": cfg.relevance_source,
        "min_cover": min_cover,
        "teachers": {},
    }
    for name, path in named.items():
        try:
            tc = TeacherCache(path)
            tc.configure_reads(verify=True)  # checked reads, as training's (stages.zeroshot says why)
        except (CacheFormatError, CacheCorrupt) as e:
            raise click.ClickException(str(e)) from None
        vocab = tc.attrs.get("data", {}).get("vqa_vocab") or ds.answer_vocab()
        tasks = {}
        for task, insts in by_task.items():
            try:
                r = selection_quality(tc, insts, g_s, cfg, vocab, params.distill.vqa_candidates, min_cover)
            except CacheCorrupt as e:  # names the store, array and unit: one line, no traceback
                raise click.ClickException(str(e)) from None
            tasks[task] = r
            sel = "n/a" if r["selected_share"] is None else f"{r['selected_share']:.3f}"
            rnd = "n/a" if r["random_share"] is None else f"{r['random_share']:.3f}"
            click.echo(f"{name}/{task}: selected {sel} vs random {rnd} on named objects (n={r['n']})")
        result["teachers"][name] = {"cache": path, "tasks": tasks}
    result["seconds"] = round(time.time() - t0, 2)
    write_json(out, result)


if __name__ == "__main__":
    main()
