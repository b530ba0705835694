"""Stage `pretrain_student`: the student backbone pretrained once as a VL model (ITM + MLM on captions)."""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import stage_command, stage_params


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.data.errors import DataError
    from pipeline.teacher import TeacherError  # the tokenizer's teacher.model

    return (DataError, ValueError, FloatingPointError, TeacherError)


@stage_command(user_errors=_user_errors)
@click.option(
    "--captions",
    type=click.Path(path_type=Path),
    default=Path("data/shards/synthetic/captions"),
    help="Prepared dataset of task='caption' instances (student_pretrain.pairs of them are used; 0 = all).",
)
@click.option(
    "--val",
    type=click.Path(path_type=Path),
    default=Path("data/shards/synthetic/captions_val"),
    help="Prepared caption dataset for held-out ITM / MLM accuracy.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("artifacts/student_pretrained"),
    help="Output directory; OUT/student.pt is what student.pretrained points at.",
)
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("metrics/student_pretrain.json"),
    help="Metrics JSON: steps, seconds, final training and held-out ITM / MLM accuracy.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def main(params_path, overrides, captions, val, out, metrics_path, quiet) -> None:
    """Pretrain the student backbone (student.*) with image–text matching and masked language modelling.

    Every student run with student.init=pretrained then fine-tunes from OUT/student.pt, as CLIP-TD's students
    were pretrained VL models. It uses fewer caption pairs than the teacher saw (student.pretrain.pairs), so the
    teacher still knows more than the student. A train/distill change never reruns this stage.
    """
    from student.pretrain import pretrain_student

    params = stage_params(params_path, overrides)
    p = params.student.pretrain
    m = pretrain_student(
        params.student, params.teacher.model, captions, val, out,
        steps=p.steps, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, warmup=p.warmup,
        pairs_limit=p.pairs, seed=p.seed, threads=p.threads, metrics_path=metrics_path, progress=not quiet,
    )  # fmt: skip
    v = m.get("val", {})
    # Hard negatives change one attribute of the true caption: only the image tells them from a match.
    hard = f"; hard negatives {v['itm_acc_hard_negative']:.3f}" if "itm_acc_hard_negative" in v else ""
    click.echo(
        f"student pretrain: {m['steps']} steps on {m['pairs']} pairs in {m['seconds']:.0f}s; held-out ITM "
        f"{v.get('itm_acc', float('nan')):.3f} (chance 0.5{hard}), MLM {v.get('mlm_acc', float('nan')):.3f} "
        f"-> {m['checkpoint']}"
    )


if __name__ == "__main__":
    main()
