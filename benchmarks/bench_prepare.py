"""prepare on official-format data: images read and checked ahead of the writer on threads, against in-process.

``prepare`` reads every image of an official dataset once and decodes it fully (a truncated JPEG must fail
here, not at extraction), which for COCO-sized files is most of the stage. ``--workers N`` reads the next
images on N threads while the writer stores earlier ones (``pipeline.data.readers.InstanceSink``). This
benchmark writes a VQA v2-format dataset of synthetic photos (``--images`` JPEGs of 640 x 480, COCO's typical
size, with noise so that they compress and decode like photographs; two questions per image) and converts it
with each worker count in turn, alternating, ``--rounds`` times: the one-worker time over the
N-worker time (reported). Every run's shards and skipped.json must be byte-identical to the one-worker
run's (the target).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import Result, Scratch, log, median, parser
from pipeline.config import usable_cores
from pipeline.data import vqa
from pipeline.data.errors import SkipReport
from pipeline.data.readers import read_image
from pipeline.data.shards import DatasetWriter

SPLIT = "val2014"


def write_vqa(root: Path, images: int, seed: int = 0) -> int:
    """A VQA v2 split under ``root``: JPEGs, questions and annotations; returns the bytes of the images."""
    rng = np.random.default_rng(seed)
    (root / SPLIT).mkdir(parents=True, exist_ok=True)
    questions, annotations, total = [], [], 0
    base = rng.integers(0, 256, (480 // 8, 640 // 8, 3), dtype=np.uint8)
    for i in range(images):
        # A smooth field (upsampled blocks) plus noise: JPEG sizes of 100-200 KB, like COCO's.
        field = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8))
        pixels = np.clip(field.astype(np.int16) + rng.integers(-40, 40, field.shape), 0, 255).astype(np.uint8)
        path = root / SPLIT / f"COCO_{SPLIT}_{i:012d}.jpg"  # the official name
        Image.fromarray(pixels).save(path, format="JPEG", quality=90)
        total += path.stat().st_size
        for j in range(2):
            qid = i * 10 + j
            questions.append({"image_id": i, "question": f"What is in picture {qid}?", "question_id": qid})
            answers = [{"answer": "two", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": i,
                    "answers": answers,
                    "multiple_choice_answer": "two",
                    "answer_type": "number",
                    "question_type": "how many",
                }
            )
    (root / f"v2_OpenEnded_mscoco_{SPLIT}_questions.json").write_text(json.dumps({"questions": questions}))
    (root / f"v2_mscoco_{SPLIT}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return total


def convert(root: Path, out: Path, workers: int) -> tuple[float, dict[str, bytes]]:
    """Seconds to convert, and every file written (name -> bytes)."""
    t = time.perf_counter()
    with DatasetWriter(out, source="vqa", split=SPLIT, report=SkipReport("fail")) as writer:
        vqa.convert(root, SPLIT, writer, workers)
    seconds = time.perf_counter() - t
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return seconds, files


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=1500, help="JPEGs of 640 x 480 (two questions each)")
    p.add_argument("--rounds", type=int, default=3, help="conversions per worker count, alternating")
    p.add_argument(
        "--workers", type=int, default=0, help="threads of the compared arm (0: one per usable core)"
    )
    args = p.parse_args(argv)
    images = max(100, args.images // 10) if args.quick else args.images
    workers = args.workers or usable_cores()
    res = Result("prepare")
    with Scratch(args.work) as work:
        root = work / "vqa"
        image_bytes = write_vqa(root, images)
        log(f"{images} images, {image_bytes / images / 1e3:.0f} KB each on average")
        # What the threads can take off the writer: every image read and checked, nothing written.
        t = time.perf_counter()
        for path in sorted((root / SPLIT).glob("*.jpg")):
            read_image(path)
        read_seconds = time.perf_counter() - t
        seconds: dict[int, list[float]] = {1: [], workers: []}
        reference: dict[str, bytes] | None = None
        identical = True
        for r in range(args.rounds):
            for w in (1, workers) if r % 2 == 0 else (workers, 1):
                out = work / f"out-{w}-{r}"
                s, files = convert(root, out, w)
                seconds[w].append(s)
                reference = reference or files
                identical &= files == reference
                log(f"round {r} workers {w}: {s:.2f} s")
        ratios = [a / b for a, b in zip(seconds[1], seconds[workers], strict=True)]
        res.settings = {"images": images, "rounds": args.rounds, "workers": workers, "quick": args.quick}
        res.measurements = {
            "mean_image_kb": round(image_bytes / images / 1e3, 1),
            "read_image_seconds_one_thread": round(read_seconds, 3),
            "seconds": {str(w): [round(x, 3) for x in v] for w, v in seconds.items()},
            "images_per_s": {str(w): round(images / median(v), 1) for w, v in seconds.items()},
            "one_over_n": [round(x, 3) for x in ratios],
            "byte_identical": identical,
        }
        res.target("every run's files equal the one-worker run's", float(identical), ">=", 1.0)
        # The project sets no speed target for this: the ratio is reported, the equality is the target.
        log(
            f"one worker / {workers} workers: {median(ratios):.2f} (per round {[round(x, 2) for x in ratios]})"
        )
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
