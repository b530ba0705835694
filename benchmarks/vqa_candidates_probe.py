"""What the teacher knows of VQA through two candidate sets: the previous method's (the gold answer and K − 1
distractors from the whole answer vocabulary, which the confidence weights and the zero-shot stage read until
the record below decided the switch) and the method's (``pipeline.texts.vqa_answers``: distractors of the
question's answer type, drawn with the same per-instance seed), where the question's wording rules nothing out.
The record (benchmarks/results/vqa-candidates/probe.json) was taken before the switch: its "method" is the
whole-vocabulary set (now "whole_vocabulary") and its "same_type" the method's set now ("method").

For each set, on the test split's VQA instances: the teacher's zero-shot VQA score (the candidate closest to the
image), the chance level (a uniform pick), the text floor (a uniform pick among the candidates of the question's
answer type; equal to chance for the method's set) and the mean confidence weight before normalisation
(p_gold = softmax(τ · cos) over the set, docs/method.md §5). Both sets are scored from texts this script
encodes with the teacher, so the method's score reproducing the zero-shot stage's checks the encoding.

Needs the embedded default built (`make repro`): the prepared test split, the teacher checkpoint and its cache
(extracted with the answer types: ``pipeline.cache.vqa_answer_space``).
``python -m benchmarks.vqa_candidates_probe --out benchmarks/results/vqa-candidates/probe.json``
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import machine
from pipeline.cache import TeacherCache, vqa_answer_space
from pipeline.config import load_params
from pipeline.data.shards import PreparedDataset
from pipeline.metrics import vqa_score
from pipeline.teacher import create_teacher
from pipeline.texts import join_text, vqa_answer_type, vqa_distractors


def score(teacher, e_img: torch.Tensor, insts, answer_sets: list[list[str]], types: dict[str, str]) -> dict:
    texts = [join_text(i.question, a) for i, answers in zip(insts, answer_sets, strict=True) for a in answers]
    with torch.no_grad():
        pooled = torch.cat([teacher.encode_texts(teacher.tokenize(texts[s : s + 256]))["pooled"]
                            for s in range(0, len(texts), 256)])  # fmt: skip
    picked, chance, floor, p_gold, pos = [], [], [], [], 0
    for n, (inst, answers) in enumerate(zip(insts, answer_sets, strict=True)):
        e_txt = pooled[pos : pos + len(answers)]
        pos += len(answers)
        cos = F.normalize(e_txt, dim=-1) @ F.normalize(e_img[n], dim=-1)
        humans = inst.human_answers or [inst.answer]
        picked.append(vqa_score(answers[int(cos.argmax())], humans))
        chance.append(np.mean([vqa_score(a, humans) for a in answers]))
        own = vqa_answer_type(inst, types)
        kept = [a for a in answers if types.get(a, own) == own]
        floor.append(np.mean([vqa_score(a, humans) for a in kept]))
        p_gold.append(float(torch.softmax(teacher.logit_scale * cos, dim=0)[0]))  # the gold is answers[0]
    return {
        "zeroshot": float(np.mean(picked)),
        "chance": float(np.mean(chance)),
        "text_floor": float(np.mean(floor)),
        "mean_p_gold": float(np.mean(p_gold)),
        "mean_candidates": float(np.mean([len(a) for a in answer_sets])),
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write JSON here.")
def main(params_path: str, out: Path | None) -> None:
    """Score the teacher's VQA zero-shot through the whole-vocabulary candidates and through the method's."""
    params = load_params(params_path)
    root = Path(params.data.out) / params.data.source
    test = [i for i in PreparedDataset(root / "test").iter_instances() if i.task == "vqa" and i.answer]
    tc = TeacherCache(params.cache.store)
    vocab, types = vqa_answer_space(params.cache.store, tc.attrs)  # the method's, as the store records them
    vocab = vocab or PreparedDataset(root / "train").answer_vocab()
    teacher = create_teacher(params.teacher.model, params.teacher.pretrained, "cpu", "fp32")
    e_img = tc.image_targets([i.image_id for i in test])["pooled"]
    k = params.distill.vqa_candidates
    result = {
        "n": len(test),
        "k": k,
        # types None: every question untyped, its distractors from the whole vocabulary (the previous method).
        "whole_vocabulary": score(
            teacher, e_img, test, [[i.answer, *vqa_distractors(i, vocab, k, None)] for i in test], types
        ),
        "method": score(
            teacher, e_img, test, [[i.answer, *vqa_distractors(i, vocab, k, types)] for i in test], types
        ),
        "machine": machine(),
    }
    click.echo(json.dumps(result, indent=1))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
