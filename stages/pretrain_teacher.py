"""Stage `pretrain-teacher`: train the embedded world's tiny open_clip teacher on the caption corpus."""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import stage_command, stage_params, write_json


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.data.errors import DataError
    from pipeline.teacher import TeacherError

    return (DataError, TeacherError, ValueError)


@stage_command(user_errors=_user_errors)
@click.option(
    "--captions",
    type=click.Path(path_type=Path),
    default=Path("data/shards/synthetic/captions"),
    help="Prepared dataset of task='caption' instances to train on (every image is decoded once into memory).",
)
@click.option(
    "--val",
    type=click.Path(path_type=Path),
    default=Path("data/shards/synthetic/captions_val"),
    help="Prepared caption dataset for the zero-shot retrieval metrics (scenes not seen in training).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("artifacts/teacher"),
    help="Output directory; OUT/teacher.pt is an open_clip checkpoint (load it with teacher.pretrained).",
)
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("metrics/teacher.json"),
    help="Metrics JSON: steps, seconds, initial/final loss, and per visual domain the image→caption top-1 "
    "among eval_captions captions (gold + random captions of other scenes) and among gold + its hard "
    "negatives (one attribute changed), with chance levels.",
)
@click.option(
    "--device",
    default="auto",
    help="Torch device to train on; 'auto' picks CUDA when available, else CPU.",
)
@click.option(
    "--save-at",
    type=click.IntRange(min=0),
    multiple=True,
    help="Also save OUT/teacher-step<N>.pt, the teacher after N steps (0: its random init); repeatable. "
    "The study's teacher dose-response distils from these.",
)
@click.option(
    "--stop-at",
    type=click.IntRange(min=0),
    default=None,
    help="Stop after this many steps (0: save the random init only), the learning rate still on the "
    "schedule of teacher.pretrain.steps (a snapshot is then the full run's teacher at that step); no "
    "OUT/teacher.pt is written. [default: all steps]",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(params_path, overrides, captions, val, out, metrics_path, device, save_at, stop_at, quiet) -> None:
    """Pretrain the embedded teacher contrastively (open_clip ClipLoss) from random init.

    The teacher is the model in teacher.model (default: the tiny ViT config shipped in
    pipeline/model_configs), trained with AdamW, linear warmup and cosine decay for teacher.pretrain.steps
    steps of teacher.pretrain.batch_size image–caption pairs; no batch holds the same image or caption text
    twice. Every later stage then loads OUT/teacher.pt frozen, exactly as it would a downloaded CLIP.
    """
    from pipeline.pretrain import pretrain_teacher

    params = stage_params(params_path, overrides)
    m = pretrain_teacher(
        params.teacher,
        captions,
        val,
        out,
        device=None if device == "auto" else device,
        progress=not quiet,
        save_at=save_at,
        stop_at=stop_at,
    )
    # Bytes as the library wrote them before (no final newline): DVC records the file's hash.
    write_json(metrics_path, m, newline=False)
    line = f"teacher: {m['steps']} steps in {m['seconds']:.0f}s"
    if m["initial_loss"] is not None:
        line += f", loss {m['initial_loss']:.3f} -> {m['final_loss']:.3f}"
    for dom, r in m.get("domains", {}).items():
        hard = f"{r['hard_top1']:.3f}" if r["hard_top1"] is not None else "n/a"
        line += f"\n  {dom}: top1@{m['eval_captions']} {r['random_top1']:.3f}, hard {hard} (n={r['n']})"
    if "chance" in m:
        ch = m["chance"]
        hard_ch = f"{ch['hard']:.3f}" if ch["hard"] is not None else "n/a"
        line += f"\n  chance: {ch['random']:.3f} / hard {hard_ch}"
    for step, snap in m.get("snapshots", {}).items():
        r = snap["all"]
        line += f"\n  step {step}: top1 {r['random_top1']:.3f} (chance {r['random_chance']:.3f})"
        line += f" -> {snap['checkpoint']}"
    click.echo(line + f"\n  -> {m['checkpoint'] or 'no teacher.pt (stopped early)'}, {metrics_path}")


if __name__ == "__main__":
    main()
