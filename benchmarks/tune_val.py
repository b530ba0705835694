"""Tuning sweep for the embedded default, scored on the VALIDATION split only (never test).

Trains students in-process (no DVC, no per-run start-up) and scores each final student on the validation
instances of its condition: the training domains only, so a shift run never sees the held-out target domain,
not even its validation images. Tuning seeds must be disjoint from the reported ones (protocol.seeds and the
study's study.seeds): a setting chosen on the seeds it is reported on is chosen on its own result. One JSON line per run, with the
data's fingerprint, is appended to --out; docs/tuning.md cites these lines.

    python -m benchmarks.tune_val --task vqa --condition lowshot-0.1 --methods baseline,clip_td --seeds 1000,1001 \\
        --set train.steps=300 --set distill.alpha0=0.3
    python -m benchmarks.tune_val --compare TAG_A,TAG_B   # paired per-seed B - A of two tagged sweeps
    python -m benchmarks.tune_val --compare-methods baseline,clip_td   # two methods of the same sweeps
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import click
import torch

from pipeline.config import load_params
from pipeline.data.shards import PreparedDataset
from pipeline.metrics import PRIMARY
from pipeline.protocol import make_split
from pipeline.report.markdown import fmt_ci, fmt_p
from pipeline.report.stats import holm, paired_test
from pipeline.study import load_study
from student.evaluation import evaluate
from student.train import RunSpec, Trainer


def records(path: str) -> list[dict]:
    """The JSON lines of a tuning file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def summary(path: str) -> str:
    """A markdown table of the lines in ``path``: mean (min-max, seeds) per tag, task, condition and method."""
    groups: dict[tuple, list[dict]] = {}
    for r in records(path):
        # The overrides are part of the setting: two settings under one tag are two rows, never one mean.
        key = (r["tag"], tuple(r["overrides"]), r["task"], r["condition"], r["method"])
        groups.setdefault(key, []).append(r)
    rows = ["| tag | overrides | task | condition | method | seeds | val mean (min–max) | image sensitivity |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (tag, _, task, cond, method), rs in groups.items():
        vals = [r["val"] for r in rs]
        sens = [r["image_sensitivity"] for r in rs if "image_sensitivity" in r]
        rows.append(
            f"| {tag} | {' '.join(rs[0]['overrides']) or '(defaults)'} | {task} | {cond} | {method} | "
            f"{','.join(str(r['seed']) for r in rs)} | {sum(vals) / len(vals):.3f} ({min(vals):.3f}–{max(vals):.3f}) | "
            + (f"{sum(sens) / len(sens):.3f}" if sens else "")
            + " |"
        )
    return "\n".join(rows)


# What a comparison pairs on: the field whose two values are compared, then the fields naming a table row.
# Two methods are compared under one setting: a tag may hold several (a sweep), each its own row.
PAIRED_ON = {
    "tag": ("tag", ("task", "condition", "method")),
    "method": ("method", ("tag", "overrides", "task", "condition")),
}


def _field(r: dict, name: str) -> str:
    return (" ".join(r["overrides"]) or "(defaults)") if name == "overrides" else r[name]


def compare(path: str, name_a: str, name_b: str, by: str = "tag") -> str:
    """A markdown table of B against A in ``path``, two tags (``by="tag"``: per task, condition and method) or
    two methods (``by="method"``: per tag, setting, task and condition): the paired per-seed difference B − A of the
    validation score with its 95% interval, p, and p Holm-adjusted over the table's rows (seeds run under both
    only)."""
    side, row = PAIRED_ON[by]
    runs: dict[tuple, dict] = {}
    for r in records(path):
        if r[side] in (name_a, name_b):
            key = (r[side], *(_field(r, f) for f in row), r["seed"])
            # One setting per tag and seed, or the pairing would silently keep whichever line came last.
            if key in runs and runs[key]["overrides"] != r["overrides"]:
                raise click.ClickException(
                    f"{path}: tag {r['tag']!r} holds two settings for "
                    f"{' '.join(str(r[f]) for f in ('task', 'condition', 'method', 'seed'))} "
                    f"({runs[key]['overrides']} and {r['overrides']}); give each setting its own tag"
                )
            runs[key] = r

    def mean(rs: list[dict], key: str) -> float:
        return sum(r.get(key, float("nan")) for r in rs) / len(rs)

    cells = []
    for cell in sorted({k[1:-1] for k in runs}):
        seeds = sorted(
            s for (t, *c, s) in runs if t == name_a and tuple(c) == cell and (name_b, *cell, s) in runs
        )
        if seeds:
            a = [runs[(name_a, *cell, s)] for s in seeds]
            b = [runs[(name_b, *cell, s)] for s in seeds]
            cells.append(
                (cell, seeds, a, b, paired_test([y["val"] - x["val"] for x, y in zip(a, b, strict=True)]))
            )
    rows = [f"| {' | '.join(row)} | seeds | {name_a} (A) | {name_b} (B) | B − A (95% CI) | paired t | Holm over rows | "
            f"image sensitivity A / B | seconds A / B |",
            "|" + "---|" * (len(row) + 8)]  # fmt: skip
    for (cell, seeds, a, b, d), p_holm in zip(cells, holm([c[-1]["p"] for c in cells]), strict=True):
        rows.append(
            f"| {' | '.join(cell)} | {','.join(map(str, seeds))} | {mean(a, 'val'):.3f} | {mean(b, 'val'):.3f} | "
            f"{d['mean']:+.3f} {fmt_ci(d['ci95'])} | {fmt_p(d['p'])} | {fmt_p(p_holm)} | "
            f"{mean(a, 'image_sensitivity'):.3f} / {mean(b, 'image_sensitivity'):.3f} | "
            f"{mean(a, 'seconds'):.0f} / {mean(b, 'seconds'):.0f} |"
        )
    return "\n".join(rows)


@torch.no_grad()
def image_sensitivity(student, ds: PreparedDataset, keys: list[str], spec, n: int = 128) -> float:
    """Mean relative change of the pooled output when the images of a validation batch are shuffled among
    its texts: near 0 means the student answers from the text alone."""
    from student.data import eval_batches

    batch = next(eval_batches(ds, keys, spec, n))
    pixels, text = batch.pixels, batch.text_ids
    if text.dim() == 3:  # VCR: the first Q->A candidate of each instance
        text = text[:, 0]
    student.eval()
    a = student(pixels, text).pooled
    b = student(pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))], text).pooled
    return float(((a - b).norm(dim=1) / a.norm(dim=1).clamp(min=1e-8)).mean())


def text_prior(data_root: str) -> dict[str, float]:
    """Validation score of a blind predictor: the most frequent training label of the same question text (VQA)
    or hypothesis template (SNLI-VE). A student at this score is not using the image."""
    from collections import Counter, defaultdict

    from pipeline.metrics import instance_scores

    train = list(PreparedDataset(Path(data_root) / "train").iter_instances())
    val = list(PreparedDataset(Path(data_root) / "val").iter_instances())
    out = {}
    for task, key, label in (
        ("vqa", lambda i: i.question, lambda i: i.answer),
        ("snli_ve", lambda i: i.meta.get("template", ""), lambda i: i.label),
    ):
        counts: dict[str, Counter] = defaultdict(Counter)
        for i in train:
            if i.task == task:
                counts[key(i)][label(i)] += 1
        overall = sum(counts.values(), Counter())
        scores = []
        for i in (v for v in val if v.task == task):
            guess = (counts.get(key(i)) or overall).most_common(1)[0][0]
            pred = {"answer": guess} if task == "vqa" else {"label": guess}
            scores.append(instance_scores(task, pred, i)[PRIMARY[task]])
        out[task] = sum(scores) / len(scores)
    return out


def recorded_overrides(overrides: tuple[str, ...] | list[str]) -> tuple[list[str], dict[str, str]]:
    """The overrides as a record keeps them, and the SHA-256 (first 16 hex digits) of each file one names: a
    path inside the repository is written relative to it, so records read alike in any clone, and the hash
    says which file it was (a checkpoint moved or rebuilt under the same name would otherwise look alike)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    out, files = [], {}
    for item in overrides:
        key, sep, value = item.partition("=")
        path = Path(value).expanduser()
        if sep and value and path.is_file():
            files[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            with contextlib.suppress(ValueError):
                value = path.resolve().relative_to(root).as_posix()
            item = f"{key}={value}"
        out.append(item)
    return out, files


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--task", type=click.Choice(["vqa", "snli_ve", "vcr"]))
@click.option("--condition", help="full, shift or lowshot-F.")
@click.option("--methods", default="baseline,naive_kd,clip_td", help="Comma-separated methods.")
@click.option(
    "--seeds",
    default="1000,1001",
    help="Comma-separated seeds; none may be a reported seed (protocol.seeds).",
)
@click.option("--data", "data_root", default="data/shards/synthetic")
@click.option("--cache", default="artifacts/cache/teacher.zarr")
@click.option("--params", "params_path", default="params.yaml")
@click.option("--set", "overrides", multiple=True, help="key=value over params.yaml (repeatable).")
@click.option("--threads", default=1, help="torch threads (two 1-thread sweeps use both cores best).")
@click.option("--out", default="benchmarks/results/tuning.jsonl")
@click.option("--tag", default="", help="A label stored with each line.")
@click.option("--summary", "show_summary", is_flag=True, help="Print a markdown table of --out and exit.")
@click.option(
    "--compare",
    "compare_tags",
    default="",
    metavar="TAG_A,TAG_B",
    help="Print tag B against tag A from --out (paired per-seed differences, 95% CI, p) and exit.",
)
@click.option(
    "--compare-methods",
    "compare_methods",
    default="",
    metavar="METHOD_A,METHOD_B",
    help="Print method B against method A from --out, per tag, setting, task and condition (paired per seed) and exit.",
)
@click.option(
    "--prior",
    "show_prior",
    is_flag=True,
    help="Print the blind (text-only) validation score per task and exit.",
)
@click.option(
    "--study",
    "study_path",
    default="study/params.yaml",
    help="The study whose seeds (study.seeds) are reported too, so never tuned on (skipped if absent).",
)
def main(
    task, condition, methods, seeds, data_root, cache, params_path, overrides, threads, out, tag, show_summary,
    compare_tags, compare_methods, show_prior, study_path,
) -> None:  # fmt: skip
    for by, given, option in (
        ("tag", compare_tags, "--compare"),
        ("method", compare_methods, "--compare-methods"),
    ):
        if given:
            pair = given.split(",")
            if len(pair) != 2:
                raise click.BadParameter(f"{given!r}: give two, A,B", param_hint=option)
            click.echo(compare(out, *pair, by=by))
            return
    if show_summary:
        click.echo(summary(out))
        return
    if show_prior:
        click.echo(json.dumps({k: round(v, 4) for k, v in text_prior(data_root).items()}))
        return
    if not task or not condition:
        raise click.UsageError("--task and --condition are required (or --summary)")
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(threads)
    params = load_params(params_path, list(overrides))
    seed_list = [int(s) for s in seeds.split(",")]
    study_seeds = load_study(study_path).seeds if Path(study_path).is_file() else []
    reported = sorted(set(seed_list) & {*params.protocol.seeds, *study_seeds})
    if reported:
        raise click.UsageError(
            f"--seeds {','.join(map(str, reported))}: reported seeds (protocol.seeds, {study_path}'s "
            "study.seeds); tune on others"
        )
    val = PreparedDataset(Path(data_root) / "val")
    train = PreparedDataset(Path(data_root) / "train")
    pp = params.protocol
    # The condition's own validation keys: the training domains only (a shift run never scores its target).
    keys = make_split(
        task, condition, 0, train.iter_instances(), [], val.iter_instances(),
        shift_key=pp.shift_key, target=pp.shift_target_domain,
    ).val  # fmt: skip
    recorded, files = recorded_overrides(overrides)
    for method in methods.split(","):
        for seed in seed_list:
            run = RunSpec(task=task, condition=condition, method=method, seed=seed, data_root=data_root,
                          cache=cache, out=f"runs-tuning/{task}-{condition}-{method}-s{seed}")  # fmt: skip
            t0 = time.perf_counter()
            trainer = Trainer(params, run, progress=False)
            trainer.fit(resume=False)
            scored = evaluate(trainer.student, trainer.heads, val, keys, trainer.spec)
            sensitivity = image_sensitivity(trainer.student, val, keys, trainer.spec)
            line = {
                "tag": tag, "task": task, "condition": condition, "method": method, "seed": seed,
                "overrides": recorded, **({"files": files} if files else {}),
                "val": scored["primary"], "data": train.fingerprint,
                "val_per_domain": {d: m[PRIMARY[task]] for d, m in scored["metrics"]["per_domain"].items()},
                "image_sensitivity": sensitivity,
                "seconds": time.perf_counter() - t0,
            }  # fmt: skip
            click.echo(json.dumps(line))
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
