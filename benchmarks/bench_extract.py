"""Extraction throughput against the bare teacher forward: pipeline images/s ÷ bare forward images/s.

The pipeline side is ``pipeline.extract.run_unit`` on the image units of a real extraction (DataLoader decode,
teacher forward, encoding, Zarr shard writes, manifest commit), with params.yaml's ``cache`` section
(default: batch 128, one decode worker, 512 rows per unit, float16 + zstd). The bare side pushes the same images,
decoded and resized beforehand into uint8 tensors, through ``Teacher.normalize_uint8`` + ``encode_images``
with the same batch size and torch threads. The two alternate unit by unit (repetition 0 of the pipeline is
the extraction itself, which creates the store; later repetitions rewrite its units), so machine load hits
both; the target is the median of the per-unit ratios. Also reported: the CPU-seconds ratio (this process +
its decode workers; a cross-check that moves less with other load) and the share of pipeline time spent
inside the teacher.

Two teachers: the embedded ``clip-td-tiny`` config at 64 px (the forward is cheap, so every per-image cost
outside the model shows) and ViT-B-32 at 224 px (random init; the forward dominates). The datasets hold
images (one instance, hence a handful of texts) plus some byte-identical copies under other ids, so the
extraction plans deduplication but spends its time on image units.

The ``host-…`` configs time no ratio: ViT-B-16's forward is replaced by a stub returning fixed tensors of its
output size, after sleeping ``forward_ms`` per image (0: a forward that costs nothing; a sleep holds no CPU,
like a GPU forward the host waits for). ``phase_ms_per_image`` is what one worker's host spends per image:
on the unit's thread, and ``writer`` (screen, shard writes, checksums) on the unit's writer threads, which
run behind the next batches' forward. ``after_last_forward_ms_per_image`` is what the unit still spends once
its last forward returned (the last shards' writes, the commit): in one worker with a GPU teacher, nothing
overlaps it. The ``-2ms-forward`` pair shows how much of the writing the unit's shards hide behind a 2 ms
forward: 2048-image units of 128-row shards (the default ``cache.image_shard_bytes`` at ViT-B-16's size)
against one shard per unit.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import TINY_TEACHER, Result, Scratch, cache_params, log, median, parser

CONFIGS = {
    # name: (model, image size, images, repetitions incl. the extraction); --quick: images / 4, 2 repetitions
    "tiny-64px": (TINY_TEACHER, 64, 2048, 3),
    "vit-b-32-224px": ("ViT-B-32", 224, 1024, 3),
}
# The host's share at a real teacher's output size, with the forward replaced by a stub: what a GPU teacher
# leaves to the CPU of one worker (not a ratio, so no target; the GPU check reads its ratio against it).
# name: (model, image size, images, repetitions, stub forward ms per image, cache overrides)
HOST_CONFIGS = {
    "host-vit-b-16-224px": ("ViT-B-16", 224, 1024, 3, 0.0, ()),
    "host-vit-b-16-224px-2ms-forward": ("ViT-B-16", 224, 2048, 3, 2.0, ("cache.image_rows_per_unit=2048",)),
    "host-vit-b-16-224px-2ms-forward-unit-shards": (
        "ViT-B-16", 224, 2048, 3, 2.0, ("cache.image_rows_per_unit=2048", f"cache.image_shard_bytes={1 << 40}"),
    ),
}  # fmt: skip
# Phases run on the unit's writer threads, behind the forward of the batches after their rows.
WRITER_PHASES = ("screen", "store_write", "checksum")
DUPLICATE_EVERY = 10  # every 10th image id repeats an earlier image's bytes (deduplicated to an alias)


def image_only_dataset(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """n synthetic scenes rendered at size px as a prepared dataset with duplicates and a single instance."""
    from pipeline.config import SyntheticParams
    from pipeline.data import synthetic
    from pipeline.data.schema import Instance
    from pipeline.data.shards import DatasetWriter

    if (path / "dataset.json").exists():
        return path
    sp = SyntheticParams(seed=seed, image_size=size)
    with DatasetWriter(path, source="synthetic", split="train", shard_size=1000, image_shard_size=1000) as w:
        first = None
        for i in range(n):
            if i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1 and first is not None:
                w.add_image(f"dup-{i:07d}", first, "png")
                continue
            png = synthetic.render(synthetic.make_scene(seed, "train", i, sp), size)
            first = first or png
            w.add_image(f"img-{i:07d}", png, "png")
        # A prepared dataset needs an instance; one adds a few texts (a text unit of negligible cost).
        hyp = "there is a red circle"
        w.add_instance(
            Instance(key="i0", task="snli_ve", image_id="img-0000000", split="train", hypothesis=hyp)
        )
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _worker_cpu(settle: bool = False) -> float | None:
    """CPU seconds of the finished DataLoader workers: they are children of multiprocessing's fork server,
    which reaps them, so they appear in its cutime + cstime (Linux /proc; None elsewhere)."""
    try:
        from multiprocessing import forkserver

        pid = forkserver._forkserver._forkserver_pid
        if pid is None:
            return 0.0
        if settle:
            time.sleep(0.02)  # let the fork server reap the unit's workers
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    except Exception:  # noqa: BLE001 - a missing /proc or a changed private attribute: no CPU figure
        return None


def _warm_decode_workers(X, teacher, ds, num_workers: int) -> None:
    """Start multiprocessing's fork server (it imports torch once) before anything is timed."""
    if num_workers <= 0:
        return
    steps = X.pil_steps(teacher.preprocess)
    first = ds.image_ids()[0]
    data = X.UnitImages([str(ds.path)], [(0, first, ds.image_sha1(first))], steps, teacher.image_size, 0)
    ctx = X.decode._loader_context(1, steps)
    list(
        torch.utils.data.DataLoader(
            data, num_workers=1, collate_fn=X.collate_images, multiprocessing_context=ctx
        )
    )


_MISSING = object()  # an attribute _patched found only on the class, not the object: deleted on restore


@contextlib.contextmanager
def _patched(patches: list[tuple[object, str, Callable]]):
    """Set attributes for the duration of the block (wrappers made from the current values), then restore."""
    saved = [(obj, name, obj.__dict__.get(name, _MISSING)) for obj, name, _ in patches]
    try:
        for obj, name, wrap in patches:
            setattr(obj, name, wrap(getattr(obj, name)))
        yield
    finally:
        for obj, name, old in reversed(saved):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def profile_phases(X, teacher, jobs: list, run_unit: Callable, decode_in_process: bool) -> dict:
    """One more pass over the image units with each phase of ``run_unit`` timed, in ms per image: where the
    pipeline's time outside the model goes. ``decode`` (read + PNG decode + uint8 + collate) is the CPU time
    of the thread that decodes, which runs beside the model (None when worker processes decode); the phases
    of ``writer`` are wall time summed over the unit's writer threads, behind the forward; the others are
    wall time on the unit's thread, and ``other`` is what the unit spent outside all of them (waiting for a
    decoded batch, buffer copies, waiting for the writers). ``after_last_forward`` is the unit's time after
    its last forward returned: the part of the writing nothing hides in one worker."""
    import zarr

    from pipeline import cache as C
    from pipeline.cache.direct import DirectArray

    spent: dict[str, float] = collections.defaultdict(float)
    last_forward = [0.0]

    def timed(phase: str, clock: Callable[[], float] = time.perf_counter, sync: bool = False):
        def wrap(f):
            def g(*a, **k):
                t = clock()
                try:
                    return f(*a, **k)
                finally:
                    if sync:
                        _sync(teacher.device)
                    spent[phase] += clock() - t
                    if phase == "model":
                        last_forward[0] = time.perf_counter()

            return g

        return wrap

    decode = timed("decode", time.thread_time)
    # Decode worker processes are started by pickling the dataset and collate function: a patched (local)
    # function cannot travel, and their time is not this process's to measure anyway.
    patches = (
        [
            (X.UnitImages, "decode_into", decode),  # what __getitem__ and the in-process batches call
            (X.decode, "collate_images", decode),
        ]
        if decode_in_process
        else []
    )
    patches += [
        (teacher, "normalize_uint8", timed("normalize")),
        (teacher, "encode_images", timed("model", sync=True)),
        (X.units, "_encode_batch", timed("encode")),
        (X.units, "_token_cosine", timed("encode")),
        (X.units, "screen_image_rows", timed("screen")),
        (zarr.Array, "__setitem__", timed("store_write")),
        (DirectArray, "write_rows", timed("store_write")),  # whole image shards written past zarr
        (C, "crc32", timed("checksum")),
        (C, "commit_unit", timed("commit")),
    ]
    total = after = 0.0
    with _patched(patches):
        for job in jobs:
            t = time.perf_counter()
            run_unit(job)
            end = time.perf_counter()
            total += end - t
            after += end - last_forward[0]
    images = sum(len(j.items) for j in jobs)
    main = {k: v for k, v in spent.items() if k != "decode" and k not in WRITER_PHASES}
    ms = {k: round(1e3 * v / images, 4) for k, v in sorted(main.items())}
    ms["other"] = round(1e3 * (total - sum(main.values())) / images, 4)
    ms["decode_cpu"] = round(1e3 * spent["decode"] / images, 4) if decode_in_process else None
    ms["writer"] = {k: round(1e3 * spent[k] / images, 4) for k in WRITER_PHASES}
    ms["after_last_forward"] = round(1e3 * after / images, 4)
    ms["unit"] = round(1e3 * total / images, 4)
    return ms


def _setup(name: str, model: str, size: int, n: int, work: Path, overrides: tuple, precision: str) -> tuple:
    """(dataset, teacher spec, cache params, teacher, decode workers) of one config, decode workers warmed.
    Configs of the same model, size and images share their dataset."""
    from pipeline import extract as X
    from pipeline.data.shards import PreparedDataset

    data = f"{Path(model).stem.lower()}-{size}px-{n}-data"
    ds = PreparedDataset(image_only_dataset(work / data, n, size))
    spec = X.TeacherSpec(model, "", precision)
    cp = dataclasses.replace(cache_params(overrides), store=str(work / f"{name}.zarr"))
    teacher = X.get_teacher(spec)
    workers = X.decode_workers(cp.num_workers, str(teacher.device))
    _warm_decode_workers(X, teacher, ds, workers)
    return ds, spec, cp, teacher, workers


def measure(
    name: str,
    model: str,
    size: int,
    n: int,
    reps: int,
    work: Path,
    overrides: tuple[str, ...] = (),
    precision: str = "auto",
    units_at_once: int = 1,
) -> dict:
    """``units_at_once`` > 1 also times whole passes over the image units with that many at a time (the
    ``sync`` scheduler's ``cache.n_workers`` threads sharing the teacher) against the bare forward of all of
    them, each pass right after its bare side."""
    from pipeline import extract as X
    from pipeline.cache import committed_units
    from pipeline.data.shards import decode_image

    ds, spec, cp, teacher, workers = _setup(name, model, size, n, work, overrides, precision)
    bs = max(1, cp.batch_size // max(1, cp.views))

    # Time inside the teacher during pipeline units: what the pipeline spends outside the model is the rest.
    encode = teacher.encode_images
    in_model = [0.0]

    def timed_encode(*a, **k):
        t = time.perf_counter()
        out = encode(*a, **k)
        _sync(teacher.device)
        in_model[0] += time.perf_counter() - t
        return out

    # Patched where the scheduler looks it up (pipeline.extract re-exports it; patching that name misses).
    run_unit = X.schedule.run_unit

    def timed_unit(job) -> tuple[float, float, float, dict]:
        """(wall, CPU incl. decode workers, seconds in the model, manifest record) of one pipeline unit."""
        teacher.encode_images = timed_encode
        in_model[0] = 0.0
        c0, w0 = time.process_time(), _worker_cpu() or 0.0
        t = time.perf_counter()
        try:
            record = run_unit(job)
            wall = time.perf_counter() - t
        finally:
            teacher.encode_images = encode
        return wall, time.process_time() - c0 + (_worker_cpu(settle=True) or 0.0) - w0, in_model[0], record

    # Repetition 0 is the extraction itself (which creates the store the later repetitions rewrite).
    jobs, first = [], {}

    def recording(job):
        jobs.append(job)
        if job.kind != "image":
            return run_unit(job)
        first[job.name] = timed_unit(job)
        return first[job.name][-1]

    X.schedule.run_unit = recording
    try:
        t0 = time.perf_counter()
        metrics = X.extract([ds], cp.store, spec, cp, scheduler="sync", progress=False, overwrite=True)
        extract_wall = time.perf_counter() - t0
    finally:
        X.schedule.run_unit = run_unit
    for j in jobs:  # an existing store is rebuilt beside it and swapped in: rerun the units in its place
        j.store_url = cp.store
    del teacher.encode_images  # back to the class method
    image_jobs = [j for j in jobs if j.kind == "image"]
    unit_seconds = {r["unit"]: r["seconds"] for r in committed_units(cp.store).values()}
    log(f"{name}: extraction {extract_wall:.1f} s ({len(image_jobs)} image units)")

    # The bare side's input: every unit's images decoded and resized once, as uint8 [n, 3, S, S].
    pixels = {
        j.name: torch.stack([teacher.pil_to_uint8(decode_image(ds.image_bytes(i))) for _, i, _ in j.items])
        for j in image_jobs
    }

    def bare(u8: torch.Tensor) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for lo in range(0, len(u8), bs):
            teacher.encode_images(teacher.normalize_uint8(u8[lo : lo + bs].to(teacher.device)))
        _sync(teacher.device)
        return time.perf_counter() - t, time.process_time() - c

    bare(pixels[image_jobs[0].name][:bs])  # warm the bare path (allocator, caches) with one batch
    # Unit j through the pipeline, then the same images through the bare forward: each pair is measured within
    # seconds of machine time, so the median of the pair ratios resists the load spikes of a shared machine.
    pipe_s, bare_s, model_s, pairs = [], [], [], []
    pipe_cpu = bare_cpu = 0.0
    for rep in range(reps):
        p = b = m = 0.0
        for j in image_jobs:
            dp, dpc, dm, _ = first[j.name] if rep == 0 else timed_unit(j)
            db, dbc = bare(pixels[j.name])
            p, b, m = p + dp, b + db, m + dm
            pipe_cpu, bare_cpu = pipe_cpu + dpc, bare_cpu + dbc
            pairs.append(db / dp)
        pipe_s.append(p)
        bare_s.append(b)
        model_s.append(m)
    images = sum(len(j.items) for j in image_jobs)
    together: dict = {}
    if units_at_once > 1:
        for _ in range(reps):
            db = sum(bare(pixels[j.name])[0] for j in image_jobs)
            t = time.perf_counter()
            X.schedule.run_units(image_jobs, "sync", units_at_once, False, {}, 0)
            dp = time.perf_counter() - t
            together.setdefault("images_per_s", []).append(round(images / dp, 2))
            together.setdefault("ratio_per_repetition", []).append(round(db / dp, 4))
        together = {"units_at_once": units_at_once, **together,
                    "ratio": round(median(together["ratio_per_repetition"]), 4)}  # fmt: skip
    phases = profile_phases(X, teacher, image_jobs, run_unit, decode_in_process=workers == 0)
    phases["bare_forward"] = round(1e3 * median(bare_s) / images, 4)
    ratios = [bb / pp for pp, bb in zip(pipe_s, bare_s, strict=True)]
    cpu_ok = pipe_cpu > 0 and _worker_cpu() is not None
    out = {
        "model": Path(model).stem if model.endswith(".json") else model,
        "image_size": size,
        "images": images,
        "image_ids": n,
        "image_aliases": metrics["image_aliases"],
        "units": len(image_jobs),
        "batch_size": cp.batch_size,
        "num_workers": workers,
        "image_rows_per_unit": cp.image_rows_per_unit,
        "dtype": cp.dtype,
        "compressor": f"{cp.compressor}/{cp.clevel}",
        "device": str(teacher.device),
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "repetitions": reps,
        "pipeline_images_per_s": [round(images / s, 2) for s in pipe_s],
        "bare_images_per_s": [round(images / s, 2) for s in bare_s],
        "ratio_per_repetition": [round(r, 4) for r in ratios],
        "ratio_unit_pairs": [round(r, 4) for r in pairs],
        "ratio": round(median(pairs), 4),
        # CPU seconds per image, bare ÷ pipeline (pipeline = this process + its decode workers): the share of
        # the machine's CPU the pipeline spends in the model; less sensitive to other load than wall time.
        "cpu_ratio": round(bare_cpu / pipe_cpu, 4) if cpu_ok else None,
        "model_share_of_pipeline_time": round(
            median([m / p for m, p in zip(model_s, pipe_s, strict=True)]), 4
        ),
        # ms per image in each phase of one more (profiled) pass, beside the bare forward's ms per image.
        "phase_ms_per_image": phases,
        "extract_seconds": round(extract_wall, 2),
        "manifest_unit_seconds": unit_seconds,
    }
    if together:
        out["units_together"] = together
    log(
        f"{name}: pipeline/bare = {out['ratio']} (median of unit pairs), per repetition "
        f"{out['ratio_per_repetition']}, cpu {out['cpu_ratio']}, model share {out['model_share_of_pipeline_time']}"
    )
    return out


def measure_host(
    name: str,
    model: str,
    size: int,
    n: int,
    reps: int,
    work: Path,
    overrides: tuple[str, ...] = (),
    forward_ms: float = 0.0,
) -> dict:
    """The pipeline's per-image work outside the forward at ``model``'s output size: ``encode_images`` sleeps
    ``forward_ms`` per image and returns fixed tensors of the right shape, so each phase of
    ``profile_phases`` (median over ``reps`` passes over the image units) is what the host spends around a
    forward that holds no CPU."""
    from pipeline import cache as C
    from pipeline import extract as X

    ds, spec, cp, teacher, workers = _setup(name, model, size, n, work, overrides, "auto")
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(cp.batch_size, teacher.num_patches, teacher.embed_dim, generator=g).to(teacher.device)

    def stub(_encode):
        def encode_images(pixels, relevance=()):
            b = len(pixels)
            if forward_ms:
                time.sleep(forward_ms * b / 1e3)
            return {"tokens": bank[:b], "pooled": bank[:b, 0], **{r: bank[:b] for r in relevance}}

        return encode_images

    jobs, run_unit = [], X.schedule.run_unit

    def recording(job):
        jobs.append(job)
        return run_unit(job)

    with _patched([(teacher, "encode_images", stub), (X.schedule, "run_unit", lambda _: recording)]):
        X.extract([ds], cp.store, spec, cp, scheduler="sync", progress=False, overwrite=True)
        for j in jobs:  # an existing store is rebuilt beside it and swapped in: rerun the units in its place
            j.store_url = cp.store
        image_jobs = [j for j in jobs if j.kind == "image"]
        passes = [
            profile_phases(X, teacher, image_jobs, run_unit, decode_in_process=workers == 0)
            for _ in range(reps)
        ]
    phases = {
        k: round(median([p[k] for p in passes]), 4)
        for k in passes[0]
        if passes[0][k] is not None and k != "writer"
    }
    phases["writer"] = {k: round(median([p["writer"][k] for p in passes]), 4) for k in WRITER_PHASES}
    writer = round(sum(phases["writer"].values()), 4)
    after = phases["after_last_forward"]
    shard_rows = C.open_group(cp.store, mode="r").attrs["units"]["image_rows_per_shard"]
    out = {
        "model": model,
        "image_size": size,
        "tokens_per_image": [teacher.num_patches, teacher.embed_dim],
        "store_bytes_per_image": teacher.num_patches * teacher.embed_dim * (1 if cp.dtype == "int8" else 2),
        "images": sum(len(j.items) for j in image_jobs),
        "units": len(image_jobs),
        "image_rows_per_unit": cp.image_rows_per_unit,
        "image_rows_per_shard": shard_rows,
        "batch_size": cp.batch_size,
        "num_workers": workers,
        "write_threads": X.write_threads(cp.write_threads),
        "dtype": cp.dtype,
        "compressor": f"{cp.compressor}/{cp.clevel}",
        "device": str(teacher.device),
        "torch_threads": torch.get_num_threads(),
        "stub_forward_ms_per_image": forward_ms,
        "repetitions": reps,
        "phase_ms_per_image": phases,
        "phase_ms_per_image_per_pass": passes,
        # Screen + shard writes + checksums: the writing the writer threads must keep up with.
        "writer_ms_per_image": writer,
        # What the unit spends after its last forward: in one worker, nothing overlaps it.
        "after_last_forward_ms_per_image": after,
    }
    log(
        f"{name}: unit {phases['unit']} ms/img, writing {writer} ms/img, after the last forward {after} ms/img "
        f"({shard_rows}-row shards, stub forward {forward_ms} ms/img)"
    )
    return out


def add_target(res: Result, name: str, m: dict) -> None:
    """The extraction target for one measurement (bench_extract and bench_gpu report it alike)."""
    res.target(
        f"{name}: pipeline/bare images per s",
        m["ratio"],
        ">=",
        0.95,
        f"{m['pipeline_images_per_s'][-1]} vs {m['bare_images_per_s'][-1]} img/s, {m['device']}, "
        f"{m['torch_threads']} threads, {m['num_workers']} decode workers",
    )
    if "units_together" in m:
        u = m["units_together"]
        res.target(
            f"{name}: pipeline/bare images per s, {u['units_at_once']} units at a time",
            u["ratio"],
            ">=",
            0.95,
            f"{u['images_per_s'][-1]} img/s (median of {len(u['ratio_per_repetition'])} passes)",
        )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, overrides=True)
    every = {**CONFIGS, **HOST_CONFIGS}
    p.add_argument("--configs", default=",".join(every), help="comma-separated subset of %(default)s")
    args = p.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in every]
    if unknown:
        p.error(f"--configs: unknown {unknown} (allowed: {', '.join(every)})")
    res = Result("extract")
    with Scratch(args.work) as work:
        for name in args.configs.split(","):
            model, size, n, reps, *host = every[name]
            if args.quick:
                n, reps = max(128, n // 4), 2  # one repetition after the extraction
            if host:
                forward_ms, sets = host
                res.measurements[name] = measure_host(
                    name, model, size, n, reps, work, (*sets, *args.set), forward_ms
                )
                continue
            res.measurements[name] = m = measure(name, model, size, n, reps, work, tuple(args.set))
            add_target(res, name, m)
    res.settings = {
        "configs": args.configs, "quick": args.quick, "duplicate_every": DUPLICATE_EVERY, "overrides": args.set,
    }  # fmt: skip
    res.write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
