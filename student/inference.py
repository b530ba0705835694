"""Use a trained student on new inputs: answer a question about an image (VQA), judge a hypothesis against an
image (SNLI-VE), choose an answer and a rationale (VCR).

The student runs alone, with no teacher and no cache: what CLIP-TD adds is gone at export. Inputs are read as
evaluation reads them (the same image preprocessing, the teacher's tokenizer, the same text cut, blank images
for a ``blind`` student), so a prediction here is the one the evaluate stage scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.config import DistillParams
from pipeline.data.schema import SNLI_LABELS
from pipeline.texts import join_text
from student.data import image_tensor
from student.errors import RunError
from student.evaluation import export_spec, load_student
from student.model import images_for_texts
from student.placement import resolve_device


class PredictError(ValueError):
    """An input the student cannot take; the message names the input and what is wrong with it."""


class Predictor:
    """An exported student (``RUN_DIR/student.pt``), loaded once with ``weights_only=True`` and checked as the
    evaluate stage checks it; ``predict`` then answers one input at a time.

    VQA: ``predict(image, question)`` -> ``{"answer": str, "top": [[answer, probability], ...]}`` (each answer's
    own sigmoid probability: the head is trained with binary cross-entropy on soft targets).
    SNLI-VE: ``predict(image, hypothesis)`` -> ``{"label": "entailment" | "neutral" | "contradiction",
    "probabilities": {label: p}}``.
    VCR: ``predict(image, question, answers=[...], rationales=[...])`` -> ``{"answer": index,
    "answer_probabilities": [...], "rationale": index, "rationale_probabilities": [...]}``; the rationales are
    scored given the chosen answer (Q->AR), or given ``given_answer`` (VCR's QA->R)."""

    def __init__(self, path: str | Path, device: str = "auto", top_k: int = 5):
        path = Path(path)
        self.path = path / "student.pt" if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no exported student (train_student writes RUN_DIR/student.pt)"
            )
        self.exported, self.student, self.heads = load_student(self.path)
        self.task: str = self.exported["run"]["task"]
        # Only the tokenizer, the sizes, the vocabulary and blindness matter here; no distill key reaches them.
        self.spec = export_spec(self.exported, self.path, DistillParams())
        try:  # "auto": the current CUDA device when there is one, as train.device
            self.device = resolve_device(device)
        except RunError:
            raise PredictError(
                f"device {device!r}: torch sees no CUDA device here (use auto or cpu)"
            ) from None
        except RuntimeError as e:  # torch's parse error for a device name it does not know
            raise PredictError(f"device {device!r}: {e}") from None
        self.student.to(self.device).eval()
        self.heads.to(self.device).eval()
        self.top_k = top_k

    def image(self, image: bytes | str | Path) -> torch.Tensor:
        """Encoded image bytes, or a file of them -> the student's normalised [3, S, S] input."""
        name = "the image"
        if not isinstance(image, bytes):
            name = str(image)
            try:
                image = Path(image).read_bytes()
            except OSError as e:
                raise PredictError(f"{name}: cannot be read ({e.strerror or e})") from None
        if self.spec.blind:  # as evaluation feeds a blind student: no image information at all
            return torch.zeros(3, self.spec.image_size, self.spec.image_size)
        try:
            return image_tensor(image, self.spec.image_size, resize_mode=self.spec.resize_mode)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bytes that are no image it reads
            raise PredictError(f"{name}: not an image PIL can decode ({type(e).__name__}: {e})") from None

    @torch.no_grad()
    def _scores(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """The task head's output for one image read with each of ``texts``: [len(texts), ...]."""
        ids = self.spec.tokens(texts).to(self.device)
        images = images_for_texts(self.student, pixels[None].to(self.device), len(texts))
        return self.heads(self.task, self.student(images, ids).pooled).float().cpu()

    def predict(
        self,
        image: bytes | str | Path,
        text: str,
        answers: Sequence[str] = (),
        rationales: Sequence[str] = (),
        given_answer: int | None = None,
    ) -> dict:
        """One input: ``text`` is the question (VQA, VCR) or the hypothesis (SNLI-VE); ``answers`` and
        ``rationales`` are VCR's candidates (rationales optional)."""
        if not isinstance(text, str) or not text.strip():
            raise PredictError(f"the text is empty: a {self.task} student needs the {_TEXT_ROLE[self.task]}")
        if self.task != "vcr" and (answers or rationales or given_answer is not None):
            raise PredictError(
                f"answers, rationales and given_answer are VCR's; this student is a {self.task} one"
            )
        pixels = self.image(image)
        if self.task == "vqa":
            probs = torch.sigmoid(self._scores(pixels, [text])[0])
            top = probs.topk(min(self.top_k, probs.numel()))
            vocab = self.exported["vocab"]
            ranked = [[vocab[i], round(float(p), 6)] for p, i in zip(top.values, top.indices, strict=True)]
            return {"answer": ranked[0][0], "top": ranked}
        if self.task == "snli_ve":
            probs = torch.softmax(self._scores(pixels, [text])[0], 0)
            return {
                "label": SNLI_LABELS[int(probs.argmax())],
                "probabilities": {lab: round(float(p), 6) for lab, p in zip(SNLI_LABELS, probs, strict=True)},
            }
        return self._vcr(pixels, text, answers, rationales, given_answer)

    def _vcr(self, pixels, question: str, answers, rationales, given_answer: int | None) -> dict:
        for name, cands in (("answers", answers), ("rationales", rationales)):
            if any(not isinstance(c, str) or not c.strip() for c in cands):
                raise PredictError(f"{name}: every candidate must be a non-empty text")
        if len(answers) < 2:
            raise PredictError(
                f"answers: a VCR student chooses among >= 2 candidate answers, got {len(answers)}"
            )
        if rationales and len(rationales) < 2:
            raise PredictError(
                f"rationales: choose among >= 2 candidates (or give none), got {len(rationales)}"
            )
        if given_answer is not None and not 0 <= given_answer < len(answers):
            raise PredictError(
                f"given_answer: {given_answer} is not an index into the {len(answers)} answers"
            )
        # Each (image, question + candidate) pair is scored alone; softmax over the candidates, as trained.
        a = torch.softmax(self._scores(pixels, [join_text(question, x) for x in answers]), 0)
        out: dict = {"answer": int(a.argmax()), "answer_probabilities": [round(float(p), 6) for p in a]}
        if rationales:
            chosen = answers[out["answer"] if given_answer is None else given_answer]
            r = torch.softmax(self._scores(pixels, [join_text(question, chosen, x) for x in rationales]), 0)
            out.update(rationale=int(r.argmax()), rationale_probabilities=[round(float(p), 6) for p in r])
        return out


_TEXT_ROLE = {"vqa": "question", "snli_ve": "hypothesis", "vcr": "question"}
