"""Command `predict`: a trained student answers new inputs, one JSON line each (student/inference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from stages.common import stage_command, write_text


def _user_errors() -> tuple[type[BaseException], ...]:
    from student.evaluation import ExportError
    from student.inference import PredictError

    return ExportError, PredictError, FileNotFoundError


def _jsonl_inputs(path: Path) -> list[dict]:
    """Each line of a JSONL file as predict's keyword arguments; images relative to the file's folder."""
    from student.inference import PredictError

    known = {"image", "text", "answers", "rationales", "given_answer", "id"}
    inputs = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PredictError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PredictError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise PredictError(f"{where}: not a JSON object")
        unknown = sorted(set(row) - known)
        if unknown:
            raise PredictError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
        for key in ("image", "text"):
            if not isinstance(row.get(key), str):
                raise PredictError(f"{where}: key {key!r} must be a string")
        for key in ("answers", "rationales"):
            if not isinstance(row.get(key, []), list):
                raise PredictError(f"{where}: key {key!r} must be a list of texts")
        given = row.get("given_answer")
        if given is not None and (not isinstance(given, int) or isinstance(given, bool)):
            raise PredictError(f"{where}: key 'given_answer' must be an answer index")
        row["image"] = str(path.parent / row["image"])
        inputs.append({"where": where, **row})
    return inputs


@stage_command(user_errors=_user_errors, params=False)
@click.argument("student", type=click.Path(exists=True, path_type=Path))
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), help="The image file (one input).")
@click.option("--text", help="The question (VQA, VCR) or the hypothesis (SNLI-VE) (one input).")
@click.option("--answer", "answers", multiple=True, help="VCR: a candidate answer (repeat for each).")
@click.option(
    "--rationale", "rationales", multiple=True, help="VCR: a candidate rationale (repeat for each)."
)
@click.option(
    "--given-answer",
    type=click.IntRange(min=0),
    default=None,
    help="VCR: read the rationales with this answer (QA->R) instead of the one the student chooses.",
)
@click.option(
    "--jsonl",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='Many inputs, one JSON object a line: {"image": path relative to this file, "text": ..., and for VCR '
    '"answers": [...], "rationales": [...], optionally "given_answer": index; "id": anything, echoed back}.',
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the predictions here (JSON lines, written whole or not at all) instead of to stdout.",
)
@click.option(
    "--device",
    default="auto",
    help="Where the student runs: auto (a CUDA device when there is one), cpu, cuda:1, …",
)
@click.option("--top-k", type=click.IntRange(min=1), default=5, help="VQA: how many ranked answers to list.")
def main(student, image, text, answers, rationales, given_answer, jsonl, out, device, top_k) -> None:
    """Answer new inputs with the student exported to STUDENT (a run folder or its student.pt).

    \b
    The student runs alone: no teacher, no cache. Inputs are read as the evaluate stage reads them.
      VQA      --image kitchen.jpg --text "what colour is the kettle?"
               -> {"answer": ..., "top": [[answer, probability], ...]}
      SNLI-VE  --image park.jpg --text "two dogs are running"
               -> {"label": ..., "probabilities": {...}}
      VCR      --image scene.jpg --text "why is [person1] smiling?" --answer ... --answer ...
               [--rationale ... --rationale ...]
               -> {"answer": index, "answer_probabilities": [...], "rationale": index, ...}
    One JSON line per input, in input order; --jsonl reads many inputs from a file.
    """
    from student.inference import PredictError, Predictor

    if (jsonl is None) == (image is None and text is None):
        raise click.UsageError("give either --image and --text (one input) or --jsonl FILE (many)")
    if jsonl is None and (image is None or text is None):
        raise click.UsageError("one input needs both --image and --text")
    inputs = (
        _jsonl_inputs(jsonl)
        if jsonl is not None
        else [
            {
                "where": "--image/--text",
                "image": str(image),
                "text": text,
                "answers": list(answers),
                "rationales": list(rationales),
                "given_answer": given_answer,
            }
        ]
    )
    predictor = Predictor(student, device=device, top_k=top_k)
    lines = []  # kept for --out, which is written whole once every input is answered
    for row in inputs:
        where, ident = row.pop("where"), row.pop("id", None)
        try:
            result = predictor.predict(**row)
        except PredictError as e:
            raise PredictError(f"{where}: {e}") from None
        line = json.dumps({"id": ident, **result} if ident is not None else result, ensure_ascii=False)
        if out is None:
            click.echo(line)
        else:
            lines.append(line)
    if out is not None:
        write_text(out, "".join(f"{line}\n" for line in lines))
        click.echo(f"{len(lines)} predictions: {out}", err=True)


if __name__ == "__main__":
    main()
