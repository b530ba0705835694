"""Extraction scaling: wall time for 4N scenes ÷ wall time for N scenes (≤ 4.2: no superlinear cost).

Synthetic train splits of N and 4N scenes (each scene: one image and its VQA/SNLI-VE/VCR texts; texts shared
between scenes are deduplicated, so 4N scenes hold fewer than 4× the texts) are extracted end to end by
``pipeline.extract.extract`` with params.yaml's ``cache`` section, in this process (``scheduler="sync"``:
the teacher is loaded before timing; the fixed costs left are planning and store creation). Runs alternate
N, 4N, N, 4N, N and each 4N run is compared with the mean of the two N runs around it, so a change of
machine load over the minute the runs take moves both sides; the ratio is the mean of the two. CPU seconds
(this process + its decode workers) are reported too, as a load-insensitive cross-check.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from benchmarks.common import TINY_TEACHER, Result, Scratch, cache_params, log, make_world, parser


def extract_once(dataset: Path, url: str) -> dict:
    from benchmarks.bench_extract import _worker_cpu
    from pipeline.cache import committed_units
    from pipeline.data.shards import PreparedDataset
    from pipeline.extract import extract

    c0, w0 = time.process_time(), _worker_cpu() or 0.0
    t = time.perf_counter()
    m = extract(
        [PreparedDataset(dataset)],
        url,
        (TINY_TEACHER, "", "auto"),
        dataclasses.replace(cache_params(), store=url),
        scheduler="sync",
        progress=False,
        overwrite=True,
    )
    wall = time.perf_counter() - t
    cpu = time.process_time() - c0 + (_worker_cpu(settle=True) or 0.0) - w0
    units = committed_units(url).values()
    img = sum(r["seconds"] for r in units if r["kind"] == "image")
    txt = sum(r["seconds"] for r in units if r["kind"] == "text")
    return {
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "images": m["unique_images"],
        "texts": m["unique_texts"],
        "image_unit_seconds": round(img, 3),
        "text_unit_seconds": round(txt, 3),
        "other_seconds": round(wall - img - txt, 3),  # plan, fingerprints, store creation, metrics
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=200, help="scenes in the small runs (the large ones have 4n)")
    args = p.parse_args(argv)
    n = max(48, args.n // 4) if args.quick else args.n
    res = Result("scaling")
    with Scratch(args.work) as work:
        from pipeline.extract import TeacherSpec, get_teacher

        get_teacher(TeacherSpec(TINY_TEACHER, "", "auto"))  # loaded once, before any timing
        small = make_world(work / f"scaling-{n}", {"train": n})[0]
        large = make_world(work / f"scaling-{4 * n}", {"train": 4 * n})[0]
        extract_once(small, str(work / "warmup.zarr"))  # fork server, allocator, page cache
        runs = []
        for label, ds in (("N", small), ("4N", large), ("N", small), ("4N", large), ("N", small)):
            r = extract_once(ds, str(work / f"scaling-{label}.zarr"))
            runs.append({"run": label, **r})
            log(
                f"{label}: {r['seconds']:.1f} s, {r['cpu_seconds']:.1f} cpu-s ({r['images']} images, {r['texts']} texts)"
            )

        def ratio(key: str) -> list[float]:
            return [runs[i][key] / ((runs[i - 1][key] + runs[i + 1][key]) / 2) for i in (1, 3)]

        wall, cpu = ratio("seconds"), ratio("cpu_seconds")
        items_n = runs[0]["images"] + runs[0]["texts"]
        items_4n = runs[1]["images"] + runs[1]["texts"]
        res.settings = {"n_scenes": n, "scheduler": "sync", "cache": "params.yaml", "teacher": "clip-td-tiny"}
        res.measurements = {
            "runs": runs,
            "ratio_per_4n_run": [round(x, 4) for x in wall],
            "ratio": round(sum(wall) / 2, 4),
            "cpu_ratio_per_4n_run": [round(x, 4) for x in cpu],
            "cpu_ratio": round(sum(cpu) / 2, 4),
            "items": {"N": items_n, "4N": items_4n, "ratio": round(items_4n / items_n, 4)},
        }
        res.target(
            "extraction time 4N / N", sum(wall) / 2, "<=", 4.2, f"N = {n} scenes; cpu {sum(cpu) / 2:.3f}"
        )
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
