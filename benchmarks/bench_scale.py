"""The cache at a real teacher's size: a ViT-B/16-shaped store (196 tokens of width 512, float16, params.yaml's
codec or ``--set cache.compressor=…``) of tens of thousands of images, built by the project's own extraction,
then read as training reads it.

* Data: N distinct 224 px JPEG images (a smooth random field plus an image-specific block; real datasets are
  JPEG) in one prepared dataset with a single instance (its few texts are a negligible text unit).
* Teacher: ``ViT-B-16`` (random init: its preprocessing and output shapes), whose ``encode_images`` is
  replaced by a stub costing nothing: it returns views into a precomputed bank of token maps. The bank holds
  the embedded teacher's (``clip-td-tiny``, random init: no trained one here) patch tokens of 1,024 of the
  images, lifted from an 8×8 grid of width 128 to ViT-B/16's 14×14 × 512: bicubic upsampling of the grid, a
  fixed random projection plus a GELU branch of another (so the lift is not rank 128), a per-token residual,
  a per-channel scale with a few outlier channels (as CLIP's tokens have) and a per-channel offset. Rows
  cycle through the bank; the codec compresses each 8-row inner chunk on its own, so the cycle gives zstd
  nothing it would not have with real data.
* Extraction host cost: ``pipeline.extract.extract`` (scheduler ``sync``, params.yaml's ``cache`` section)
  over the images with that stub: wall and CPU ms per image (decode, normalise, float16 encode, cosines,
  screen, shard writes, checksums, commits), from the image units' own seconds in the manifest; and each
  phase's share (``benchmarks.bench_extract.profile_phases``, one more pass over the first units), so that
  what a GPU teacher does on its device (normalising, float16 encoding, cosines) can be told apart; and
  ``gpu_teacher_sim``: the same units again with that device work made free (the stub hands out float16
  tokens, normalising and cosines cost nothing, the device-to-host copy stays as a host copy), so the host's
  share of a GPU extraction is measured, not subtracted. Two passes each, interleaved, of the decode as it
  is (``pipeline.extract.decode``: the JPEG fast path on ``DECODE_THREADS`` threads), the fast path on two
  threads, and PIL's decode on one thread (the decode before both): ``decode_arms``, their ratios of unit
  wall and CPU; the target's figure is the first pass of the decode as it is. A fourth arm,
  ``zlib_crc``, checksums with zlib's crc32 (the project's before ISA-L's: the same values) instead.
  Those passes come right after the store's gigabytes were written, so their writes wait on the disk.
  ``host_only`` separates the host from the disk: the same units writing into a copy of the store's
  metadata in memory (``/dev/shm``, tmpfs: the same write calls and page copies, no device behind them),
  one unit at a time and two at a time (the ``sync`` scheduler with ``cache.n_workers: 2``: one unit's
  decode beside the other's shard writes), four passes each after an untimed one, interleaved in alternating
  order (``--summarize`` pools their pairs over runs); and the disk's own sustained write rate
  (``disk``: 2 GiB written and fsynced beside the store), from which the disk-bound ms per image follows.
* Reader: ``student.targets.CachedTargets`` (the default 256 MB LRU of decoded chunks) reading image targets
  in ``train.order: chunked`` order (``student.data.epoch_order`` with the image's inner chunk as its group,
  ``train.order_window``), batches of 64: samples/s, MB/s (stored float16 bytes, and bytes the store handed
  out), read amplification (bytes zarr read ÷ the on-disk bytes of the distinct rows each batch needs). Arms:
  float32 targets, float16 targets, the per-chunk crc check (``verify``, the default: how training reads on a
  CPU device), as training on a CUDA device reads (the check and float16 targets, converted on the device),
  and the same with a pool of min(4, cores) chunk-decoding threads.
* Stub student: a step of ``--step-ms`` (a sleep: a GPU step leaves the host idle) per batch of 64 while the
  next batch's targets are read on one prefetch thread, as ``student.train`` does on a CUDA device: the share
  of time the step waits on targets, on a first pass (every chunk crc-checked as it is first read: a run's
  first epoch) and a second pass over the same batches (chunks already checked: later epochs); and the same
  with the reader's own pool of min(4, cores) threads under the prefetch thread (``stub_student_threads``),
  and with zlib's crc32 in place of ISA-L's (``stub_student_zlib_crc``, run between the two: the baseline of
  the crc change in the same process).

The store goes under ``--work`` (default: a temporary folder) and is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_extract import _patched, profile_phases
from benchmarks.bench_read import ByteCounter
from benchmarks.common import ROOT, TINY_TEACHER, Result, Scratch, cache_params, log, parser

BANK = 1024
IMAGE_SIZE = 224
BATCH = 64


def _zlib_crc() -> list[tuple[object, str, object]]:
    """Patches for ``_patched``: the cache's checksums by zlib's crc32 (same values as ISA-L's, slower)."""
    import importlib
    import zlib

    # By module path: pipeline.cache exports a function named ``checksum`` that hides its submodule.
    mods = [importlib.import_module(f"pipeline.cache.{m}") for m in ("checksum", "direct")]
    return [(m, "crc32_update", lambda _: zlib.crc32) for m in mods]


def _base_fields(n: int, size: int, seed: int) -> np.ndarray:
    """n smooth random RGB fields [n, size, size, 3] uint8 (upsampled noise: JPEG-like content)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 7, 7, generator=g)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).contiguous().numpy()


def _image(bases: np.ndarray, i: int) -> np.ndarray:
    """Image i: a base field with an image-specific coloured block, so every image has its own bytes."""
    img = bases[i % len(bases)].copy()
    rng = np.random.default_rng(i)
    s = img.shape[0]
    x, y, w = *rng.integers(0, s - 48, 2), int(rng.integers(16, 48))
    img[y : y + w, x : x + w] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def make_dataset(path: Path, n: int) -> Path:
    from PIL import Image

    from pipeline.data.schema import Instance
    from pipeline.data.shards import DatasetWriter

    if (path / "dataset.json").exists():
        return path
    bases = _base_fields(64, IMAGE_SIZE, 0)
    with DatasetWriter(path, source="synthetic", split="train", shard_size=1000, image_shard_size=2000) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(_image(bases, i)).save(buf, "JPEG", quality=90)
            w.add_image(f"img-{i:07d}", buf.getvalue(), "jpg")
        w.add_instance(
            Instance(
                key="i0", task="snli_ve", image_id="img-0000000", split="train", hypothesis="a red block"
            )
        )
    return path


def token_bank(p: int, e: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [BANK + 128, p, e], pooled [BANK + 128, e]) float32: the embedded teacher's tokens lifted to
    ViT-B/16's shape (see the module docstring); the first 128 rows repeat at the end so that any batch of
    up to 128 rows is a contiguous view (the stub's forward copies nothing)."""
    from pipeline.extract import TeacherSpec, get_teacher

    tiny = get_teacher(TeacherSpec(TINY_TEACHER, "", "fp32", "cpu"))
    bases = _base_fields(64, IMAGE_SIZE, 0)
    u8 = np.stack([_image(bases, i) for i in range(BANK)])
    small = (
        torch.nn.functional.interpolate(
            torch.from_numpy(u8).permute(0, 3, 1, 2).float(), size=(tiny.image_size,) * 2, mode="area"
        )
        .round()
        .byte()
    )
    with torch.no_grad():
        x = torch.cat(
            [
                tiny.encode_images(tiny.normalize_uint8(small[i : i + 128]))["tokens"]
                for i in range(0, BANK, 128)
            ]
        )
    gs, w = tiny.grid, x.shape[-1]
    side = int(round(p**0.5))
    grid = x.reshape(BANK, gs, gs, w).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    x = x.flatten(2).transpose(1, 2)  # [BANK, p, w]
    x = (x - x.mean((0, 1))) / x.std((0, 1)).clamp_min(1e-6)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(w, e, generator=g) / w**0.5
    w2 = torch.randn(w, e, generator=g) / w**0.5
    y = x @ w1 + 0.5 * torch.nn.functional.gelu(x @ w2)
    y = y + 0.1 * torch.randn(y.shape, generator=g)
    scale = torch.exp(0.5 * torch.randn(e, generator=g))
    scale[torch.randperm(e, generator=g)[:8]] *= 6.0  # outlier channels
    y = y * scale + 0.3 * torch.randn(e, generator=g)
    y = torch.cat([y, y[:128]]).contiguous()
    pooled = y.mean(1)
    return y, pooled


def extract_store(work: Path, n: int, overrides: tuple[str, ...], profile_units: int = 4) -> dict:
    from pipeline import cache as C
    from pipeline import extract as X
    from pipeline.data.shards import PreparedDataset

    t = time.perf_counter()
    ds = PreparedDataset(make_dataset(work / f"data-{n}", n))
    log(f"dataset: {n} JPEG images in {time.perf_counter() - t:.1f}s")
    spec = X.TeacherSpec("ViT-B-16", "", "fp32", "cpu")
    teacher = X.get_teacher(spec)
    bank, bank_pooled = token_bank(teacher.num_patches, teacher.embed_dim)
    log(f"token bank {tuple(bank.shape)} ready")
    codecs = measure_codecs(work, bank[:BANK].half().numpy())
    at = [0]

    def stub(_encode):
        def encode_images(pixels, relevance=()):
            b, o = len(pixels), at[0]
            at[0] = (o + b) % BANK
            return {"tokens": bank[o : o + b], "pooled": bank_pooled[o : o + b]}

        return encode_images

    cp = dataclasses.replace(cache_params(overrides), store=str(work / "vit-b-16.zarr"))
    jobs, run_unit = [], X.run_unit

    def recording(job):
        jobs.append(job)
        return run_unit(job)

    # Built fresh in place (not beside a leftover and swapped in): the profile pass reruns the jobs' own URL.
    shutil.rmtree(cp.store, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    with _patched([(teacher, "encode_images", stub), (X.schedule, "run_unit", lambda _: recording)]):
        m = X.extract([ds], cp.store, spec, cp, scheduler="sync", progress=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    # Where a unit's time goes: one more pass over the first units (rewritten in place), each phase timed.
    with _patched([(teacher, "encode_images", stub)]):
        some = [j for j in jobs if j.kind == "image"][:profile_units]
        phases = profile_phases(
            X, teacher, some, run_unit, decode_in_process=X.decode_workers(cp.num_workers, "cpu") == 0
        )
    # The host's share alone, as with a GPU teacher whose forward costs nothing: the device's work
    # (normalising, the float16 cast, the cosines) made free, the device-to-host copy of the float16 tokens
    # kept as a host copy. One more pass over the same units, each phase timed, and the process's CPU.
    bank16, pooled16 = bank.half(), bank_pooled.half()

    def stub16(_encode):
        def encode_images(pixels, relevance=()):
            b = len(pixels)
            o = at[0] % (BANK - b + 1)  # two units on threads share the counter: stay inside the bank
            at[0] = (o + b) % BANK
            return {"tokens": bank16[o : o + b], "pooled": pooled16[o : o + b]}

        return encode_images

    def host_copy(_encode):
        return lambda x, dtype: ({"": x.numpy().copy()}, x)  # the D2H copy, as a host memcpy

    def free_cosine(_cos):
        return lambda x, y: np.ones(x.shape[0] * x.shape[1], np.float32)

    sim_patches = [
        (teacher, "encode_images", stub16),
        (teacher, "normalize_uint8", lambda _: lambda u8: u8),
        (X.units, "_encode_batch", host_copy),
        (X.units, "_token_cosine", free_cosine),
    ]
    sim_jobs = [j for j in jobs if j.kind == "image"][: max(profile_units, 8)]
    sim_images = sum(len(j.items) for j in sim_jobs)
    pil_decode = (X.decode.UnitImages, "_decode_jpeg_at_size", lambda _: lambda self, raw, out: False)
    one_thread = (X.decode, "DECODE_THREADS", lambda _: 1)
    two_threads = (X.decode, "DECODE_THREADS", lambda _: 2)
    # The decode as it is (the JPEG fast path on DECODE_THREADS threads) against the fast path on two threads
    # and against PIL on one thread (the decode before either), the arms interleaved so load hits them alike.
    extra = {
        "sim": [],
        "fast_2_threads": [two_threads],
        "pil_1_thread": [one_thread, pil_decode],
        "zlib_crc": _zlib_crc(),
    }
    arms: dict[str, list[dict]] = {arm: [] for arm in extra}
    for arm in [*extra, *extra]:
        c = time.process_time()
        with _patched(sim_patches + extra[arm]):
            r = profile_phases(
                X, teacher, sim_jobs, run_unit, decode_in_process=X.decode_workers(cp.num_workers, "cpu") == 0
            )
        r["cpu_ms_per_image"] = round(1e3 * (time.process_time() - c) / sim_images, 4)
        arms[arm].append(r)
    sim = arms["sim"][0]  # the target's figure: the first pass, as this benchmark always reported it
    sim["images"] = sim_images
    sim["loadavg"] = [round(x, 2) for x in os.getloadavg()]

    def mean(arm: str, key: str) -> float:
        return sum(r[key] for r in arms[arm]) / len(arms[arm])

    sim["decode_arms"] = {
        "passes_unit_ms": {arm: [r["unit"] for r in arms[arm]] for arm in arms},
        "passes_cpu_ms": {arm: [r["cpu_ms_per_image"] for r in arms[arm]] for arm in arms},
        "unit_ratio_vs_pil_1_thread": {
            arm: round(mean(arm, "unit") / mean("pil_1_thread", "unit"), 3) for arm in arms
        },
        "cpu_ratio_vs_pil_1_thread": {
            arm: round(mean(arm, "cpu_ms_per_image") / mean("pil_1_thread", "cpu_ms_per_image"), 3)
            for arm in arms
        },
    }
    log(f"GPU-teacher host share: {sim['unit']} ms/img wall, {sim['cpu_ms_per_image']} CPU ms/img; {sim}")
    with _patched(sim_patches):
        sim["host_only"] = host_only(X, cp.store, sim_jobs, run_unit)
    sim["disk"] = disk_write_rate(work)
    # The store's bytes per image (its few texts included) at the disk's rate: the bound of a long extraction.
    sim["disk_bound_ms_per_image"] = round(1e3 * m["bytes_on_disk"] / n / (sim["disk"]["mb_per_s"] * 1e6), 4)
    log(f"host only: {sim['host_only']}; disk {sim['disk']}, bound {sim['disk_bound_ms_per_image']} ms/img")
    units = [r for r in C.committed_units(cp.store).values() if r["kind"] == "image"]
    images = sum(r["items"] for r in units)
    unit_s = sum(r["seconds"] for r in units)
    out = {
        "images": images,
        "store": cp.store,
        "tokens_per_image": [teacher.num_patches, teacher.embed_dim],
        "dtype": cp.dtype,
        "compressor": f"{cp.compressor}/{cp.clevel}",
        "image_rows_per_unit": cp.image_rows_per_unit,
        "batch_size": cp.batch_size,
        "decode_workers": X.decode_workers(cp.num_workers, "cpu"),
        "write_threads": X.write_threads(cp.write_threads),
        "torch_threads": torch.get_num_threads(),
        "bytes_on_disk": m["bytes_on_disk"],
        "uncompressed_bytes": m["uncompressed_bytes"],
        "compression_ratio": m["compression_ratio"],
        "disk_bytes_per_image": round(m["bytes_on_disk"] / images),
        "reconstruction_cosine": m["reconstruction_cosine"],
        "extract_seconds": round(wall, 2),
        # The image units alone (the plan, store creation and the few texts excluded).
        "host_ms_per_image": round(1e3 * unit_s / images, 4),
        # This process's CPU over the whole extraction (all its threads) per image: cores it keeps busy.
        "host_cpu_ms_per_image": round(1e3 * cpu / images, 4),
        "image_units": len(units),
        "phase_ms_per_image": phases,
        # zarr's shard writes alone, per codec, on the bank's tokens (CPU time, interleaved arms).
        "codec_write": codecs,
        "phase_profile_images": sum(len(j.items) for j in some),
        # What stays on the host when a GPU teacher runs the forward, the normalisation and the float16
        # encoding + cosines (they run on the teacher's device in pipeline.extract): the unit's time less
        # those phases, measured here on the CPU.
        # Measured: the same units with the device's work made free (see above).
        "gpu_teacher_sim": sim,
        "host_ms_per_image_gpu_teacher": round(
            phases["unit"] - phases.get("model", 0) - phases.get("normalize", 0) - phases.get("encode", 0), 4
        ),
    }
    log(
        f"extraction: {images} images, {out['host_ms_per_image']} ms/img wall in units, "
        f"{out['host_cpu_ms_per_image']} CPU ms/img; {m['bytes_on_disk'] / 1e9:.2f} GB on disk "
        f"(ratio {m['compression_ratio']}); phases {phases}"
    )
    return out


def host_only(X, store: str, jobs: list, run_unit, passes: int = 4) -> dict:
    """Wall and CPU ms per image of ``jobs`` (the GPU teacher simulated by the caller's patches) writing into
    a copy of ``store`` in memory (tmpfs; its metadata only, the units write their own shards): one unit at
    a time (``run_unit``) and two at a time on threads (the ``sync`` scheduler's ``cache.n_workers`` path),
    interleaved after one untimed pass, and the paired difference per pass. Without a tmpfs with room, the
    figures are not measured (None)."""
    import copy
    import tempfile

    images = sum(len(j.items) for j in jobs)
    shm = Path("/dev/shm")
    need = 3 * images * 200_000  # the units' shards at ViT-B/16 size, with room to spare
    if not shm.is_dir() or shutil.disk_usage(shm).free < need:
        return {"images": images, "memory_store": None}
    root = Path(tempfile.mkdtemp(prefix="clip-td-bench-", dir=shm))
    try:
        mem = root / "store.zarr"
        shutil.copytree(store, mem, ignore=lambda _d, names: [n for n in names if n == "c"])  # no chunks
        moved = []
        for j in jobs:
            j = copy.copy(j)
            j.store_url = str(mem)
            moved.append(j)
        arms = {
            "one_unit": lambda: [run_unit(j) for j in moved],
            "two_units": lambda: X.schedule.run_units(moved, "sync", 2, False, {}, 0),
        }
        out: dict = {"images": images, "memory_store": str(shm)}
        arms["two_units"]()  # untimed: tmpfs allocates the shards' pages on their first write
        for k in range(passes):  # the order alternates, so neither arm always follows the other
            for arm, run in list(arms.items())[:: 1 if k % 2 == 0 else -1]:
                t, c = time.perf_counter(), time.process_time()
                run()
                wall, cpu = time.perf_counter() - t, time.process_time() - c
                out.setdefault(arm, []).append(round(1e3 * wall / images, 4))
                out.setdefault(f"{arm}_cpu", []).append(round(1e3 * cpu / images, 4))
        out["one_minus_two"] = [
            round(a - b, 4) for a, b in zip(out["one_unit"], out["two_units"], strict=True)
        ]
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def disk_write_rate(work: Path, gib: int = 2) -> dict:
    """The disk's sustained write rate: ``gib`` GiB in 16 MiB writes, then fsync, timed together (after a sync,
    so no earlier writeback is counted); the file is removed."""
    block = np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8).tobytes()
    path = work / "disk-rate.bin"
    os.sync()
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(gib * 64):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return {
        "bytes": gib << 30,
        "seconds": round(seconds, 3),
        "mb_per_s": round((gib << 30) / seconds / 1e6, 1),
    }


CODECS = {"zstd-3": ("zstd", 3), "zstd-1": ("zstd", 1), "lz4": ("lz4", 3), "none": ("none", 0)}


def measure_codecs(work: Path, tokens: np.ndarray, reps: int = 4) -> dict:
    """CPU ms per image row that zarr spends writing whole 128-row shards of ``tokens`` (float16 [R, P, E],
    R a multiple of 128) with each codec the ``cache`` section allows, the arms interleaved ``reps`` times;
    and each codec's compression ratio. The store layout is ``pipeline.cache``'s (its ``compressors_for``,
    16 MiB shards of 8-row inner chunks, empty-chunk test off as image units write)."""
    import statistics

    import zarr

    from pipeline.cache import compressors_for

    rows = len(tokens) - len(tokens) % 128
    arrays = {}
    for name, (comp, level) in CODECS.items():
        g = zarr.open_group(str(work / f"codec-{name}.zarr"), mode="w")
        arrays[name] = g.create_array(
            "tokens", shape=tokens[:rows].shape, dtype="float16", chunks=(8, *tokens.shape[1:]),
            shards=(128, *tokens.shape[1:]), compressors=compressors_for(comp, level, 2), fill_value=0,
        ).with_config({"write_empty_chunks": True})  # fmt: skip
    cpu: dict[str, list[float]] = {k: [] for k in CODECS}
    for _ in range(reps):
        for name, a in arrays.items():
            c = time.process_time()
            for lo in range(0, rows, 128):
                a[lo : lo + 128] = tokens[lo : lo + 128]
            cpu[name].append(1e3 * (time.process_time() - c) / rows)
    out = {}
    for name in CODECS:
        folder = work / f"codec-{name}.zarr"
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")
        out[name] = {
            "cpu_ms_per_image": round(statistics.median(cpu[name]), 4),
            "cpu_ms_per_image_per_rep": [round(v, 4) for v in cpu[name]],
            "compression_ratio": round(tokens[:rows].nbytes / size, 4),
        }
        shutil.rmtree(folder, ignore_errors=True)
    log(
        "shard writes, CPU ms per image: " + ", ".join(f"{k} {v['cpu_ms_per_image']}" for k, v in out.items())
    )
    return out


def chunked_batches(cache, window: int, seed: int = 0) -> list[list[str]]:
    """One epoch of image ids in ``train.order: chunked`` order, cut into batches of BATCH."""
    from student.data import epoch_order

    ids = cache.group["image/ids"][:].tolist()
    rows_per_chunk = int(cache.group["image/tokens"].chunks[0])
    groups = np.arange(len(ids)) // rows_per_chunk
    order = epoch_order(np.random.default_rng(seed), groups, len(ids), window)
    return [[ids[i] for i in order[lo : lo + BATCH]] for lo in range(0, len(order) - BATCH + 1, BATCH)]


def _disk_bytes_per_row(store: str, n: int) -> float:
    """On-disk bytes per image row of the arrays an image target reads (tokens, pooled, valid)."""
    total = 0
    for name in ("image/tokens", "image/pooled", "image/valid"):
        folder = Path(store) / name
        total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")
    return total / n


def measure_reader(
    store: str,
    window: int,
    lru_mb: int,
    verify: bool,
    max_batches: int,
    float16: bool = False,
    threads: int = 1,
) -> dict:
    """``float16``: token targets handed out as stored (``CachedTargets(token_dtype=torch.float16)``, what
    training on a CUDA device reads); ``threads``: the reader's chunk-decoding threads (-1: its default)."""
    from pipeline.cache import TeacherCache, read_threads_for
    from student.targets import CachedTargets

    cache = TeacherCache(store)
    batches = chunked_batches(cache, window)[:max_batches]
    per_row = _disk_bytes_per_row(store, cache.n_images)
    dtype = torch.float16 if float16 else torch.float32
    threads = read_threads_for(threads)
    source = CachedTargets(
        cache, chunk_cache_bytes=lru_mb << 20, verify=verify, token_dtype=dtype, read_threads=threads
    )
    row_bytes = cache.num_patches * cache.embed_dim * 2 + cache.embed_dim * 2 + 1
    need = 0.0
    # ByteCounter sees zarr's reads and pipeline/cache/direct.py's own shard reads; counting the latter here
    # as well counted them twice (read amplification 2.0 on a store read once).
    with ByteCounter() as counter:
        t, c = time.perf_counter(), time.process_time()
        for ids in batches:
            source.images(ids, relevance=None)
            need += len(set(ids)) * per_row
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    samples = sum(len(b) for b in batches)
    lru = cache.group.lru
    out = {
        "verify": verify,
        "float16_out": float16,
        "read_threads": threads,
        "lru_mb": lru_mb,
        "order_window": window,
        "batches": len(batches),
        "samples": samples,
        "seconds": round(wall, 3),
        "samples_per_s": round(samples / wall, 1),
        "stored_mb_per_s": round(samples * row_bytes / wall / 1e6, 1),
        "disk_mb_per_s": round(counter.bytes / wall / 1e6, 1),
        "cpu_ms_per_sample": round(1e3 * cpu / samples, 4),
        "bytes_read": counter.bytes,
        "bytes_needed": round(need),
        "amplification": round(counter.bytes / need, 4),
        "chunk_hits": lru.hits,
        "chunk_misses": lru.misses,
    }
    log(
        f"reader (verify={verify}, float16 out={float16}, threads={threads}): {out['samples_per_s']} samples/s, "
        f"{out['stored_mb_per_s']} MB/s stored, amplification {out['amplification']}, "
        f"{out['cpu_ms_per_sample']} CPU ms/sample"
    )
    return out


def _wait_pass(source, batches: list, step_ms: float) -> tuple[float, float, float]:
    """(seconds waited on targets, seconds stepped, wall seconds) over ``batches``: a stub step (sleep) per
    batch while one prefetch thread reads the next batch."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    it = iter(batches)
    fut = pool.submit(source.images, next(it), None)
    waited = stepped = 0.0
    t0 = time.perf_counter()
    for ids in it:
        t = time.perf_counter()
        fut.result()
        waited += time.perf_counter() - t
        fut = pool.submit(source.images, ids, None)
        t = time.perf_counter()
        time.sleep(step_ms / 1e3)
        stepped += time.perf_counter() - t
    fut.result()
    pool.shutdown()
    return waited, stepped, time.perf_counter() - t0


def measure_wait(
    store: str, window: int, lru_mb: int, step_ms: float, max_batches: int, threads: int = 1
) -> dict:
    """A stub student step (sleep) per batch while one prefetch thread reads the next batch's targets, read
    as training on a CUDA device reads them (crc check, float16 tokens, one reading thread). Two passes over
    the same batches on one reader: the first checks every chunk it reads (a run's first epoch); the second
    reads chunks already checked in this run (later epochs: an uncompressed store's rows come from the page
    cache, a compressed store's chunks are decoded again where the LRU no longer holds them). ``threads``:
    the reader's own threads under the prefetch thread (-1: min(4, cores))."""
    from pipeline.cache import TeacherCache, read_threads_for
    from student.targets import CachedTargets

    cache = TeacherCache(store)
    batches = chunked_batches(cache, window, seed=1)[:max_batches]
    threads = read_threads_for(threads)
    source = CachedTargets(
        cache, chunk_cache_bytes=lru_mb << 20, token_dtype=torch.float16, read_threads=threads
    )
    steps = len(batches) - 1
    out = {
        "step_ms": step_ms,
        "batch": BATCH,
        "steps": steps,
        "read_threads": threads,
        "needed_samples_per_s": round(BATCH / (step_ms / 1e3), 1),
    }
    for name in ("first_pass", "checked_pass"):
        c = time.process_time()
        waited, stepped, total = _wait_pass(source, batches, step_ms)
        out[name] = {
            "wait_share": round(waited / (waited + stepped), 4),
            "wait_ms_per_step": round(1e3 * waited / max(1, steps), 3),
            "samples_per_s": round(BATCH * steps / total, 1),
            "cpu_ms_per_sample": round(1e3 * (time.process_time() - c) / (BATCH * len(batches)), 4),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        }
        log(
            f"stub student ({step_ms} ms/step, {threads} reader thread(s), {name}): waits {100 * out[name]['wait_share']:.1f}% of its time "
            "on targets"
        )
    out["wait_share"] = out["first_pass"]["wait_share"]  # the pessimistic one: what the target is held to
    return out


def codecs_only(args) -> int:
    from pipeline.extract import TeacherSpec, get_teacher

    path = Path(args.out) / "scale.json"
    payload = json.loads(path.read_text())
    teacher = get_teacher(TeacherSpec("ViT-B-16", "", "fp32", "cpu"))
    bank, _ = token_bank(teacher.num_patches, teacher.embed_dim)
    with Scratch(args.work) as work:
        t = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        codecs = measure_codecs(work, bank[:BANK].half().numpy())
    payload["measurements"]["extraction"]["codec_write"] = {
        **codecs,
        "measured_separately": {"time": t, "loadavg": [round(x, 2) for x in os.getloadavg()]},
    }
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    log(f"added codec_write to {path}")
    return 0


def summarize_host(paths: list[str]) -> dict:
    """The ``host_only`` arms of several runs' scale.json together: each arm's passes and the paired
    difference one unit − two units over every pass pair (mean, 95% t interval, p)."""
    from pipeline.report.stats import paired_test

    one, two, disk = [], [], []
    for path in paths:
        sim = json.loads(Path(path).read_text())["measurements"]["extraction"]["gpu_teacher_sim"]
        one += sim["host_only"]["one_unit"]
        two += sim["host_only"]["two_units"]
        disk.append(sim["disk"]["mb_per_s"])
    test = paired_test([a - b for a, b in zip(one, two, strict=True)])
    return {
        "runs": len(paths),
        "one_unit_ms": [min(one), max(one)],
        "two_units_ms": [min(two), max(two)],
        "one_minus_two": {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in test.items() if k != "ci95"
        }
        | {"ci95": [round(x, 4) for x in test["ci95"]] if test["ci95"] else None},
        "disk_mb_per_s": [min(disk), max(disk)],
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, overrides=True)
    p.add_argument("--images", type=int, default=0, help="images (default 24,576; --quick 2,048)")
    p.add_argument("--step-ms", type=float, default=5.0, help="stub student step per batch of 64")
    p.add_argument(
        "--read-batches", type=int, default=0, help="batches read per reader arm (default: an epoch)"
    )
    p.add_argument("--keep", action="store_true", help="keep the store and dataset under --work")
    p.add_argument(
        "--codecs-only",
        action="store_true",
        help="only the codec arm (shard-write CPU per codec on the token bank), added to an existing "
        "<out>/scale.json as measurements.extraction.codec_write",
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="SCALE_JSON",
        help="measure nothing: print the host_only arms of these runs together (one − two units per pass pair)",
    )
    args = p.parse_args(argv)
    if args.summarize:
        print(json.dumps(summarize_host(args.summarize)))
        return 0
    if args.codecs_only:
        return codecs_only(args)
    n = args.images or (2048 if args.quick else 24576)
    res = Result("scale")
    from pipeline.config import load_params

    tp = load_params(ROOT / "params.yaml", tuple(args.set)).train
    window, lru_mb = tp.order_window, tp.target_cache_mb
    max_batches = args.read_batches or 10**9
    res.settings = {
        "images": n,
        "overrides": args.set,
        "quick": args.quick,
        "order_window": window,
        "target_cache_mb": lru_mb,
        "step_ms": args.step_ms,
        "batch": BATCH,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    with Scratch(args.work) as work:
        ext = res.measurements["extraction"] = extract_store(work, n, tuple(args.set))
        store = ext["store"]
        ext["store_over_lru"] = round(ext["bytes_on_disk"] / (lru_mb << 20), 2)
        arms = {  # (verify, float16 out, reader threads): reader_verified is how training reads on a CPU device
            "reader": (False, False, 1),
            "reader_float16": (False, True, 1),
            "reader_verified": (True, False, 1),
            "reader_training_cuda": (True, True, 1),
            "reader_training_cuda_threads": (True, True, -1),
        }
        for name, (verify, half, threads) in arms.items():
            res.measurements[name] = measure_reader(store, window, lru_mb, verify, max_batches, half, threads)
        res.measurements["stub_student"] = measure_wait(store, window, lru_mb, args.step_ms, max_batches)
        with _patched(_zlib_crc()):
            res.measurements["stub_student_zlib_crc"] = measure_wait(
                store, window, lru_mb, args.step_ms, max_batches
            )
        res.measurements["stub_student_threads"] = measure_wait(
            store, window, lru_mb, args.step_ms, max_batches, threads=-1
        )
        res.settings["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(work / f"data-{n}", ignore_errors=True)
    r, rv, w = (
        res.measurements["reader"],
        res.measurements["reader_training_cuda"],
        res.measurements["stub_student"],
    )
    res.target("store size / reader LRU", ext["store_over_lru"], ">=", 15)
    res.target("store bytes on disk (GB)", ext["bytes_on_disk"] / 1e9, ">=", 4)
    res.target("extraction host ms per image (zero-cost forward)", ext["host_ms_per_image"], "<=", 0.5)
    res.target(
        "extraction host ms per image less device-side phases",
        ext["host_ms_per_image_gpu_teacher"],
        "<=",
        0.5,
    )
    res.target(
        "extraction host ms per image, GPU teacher simulated (wall, 2 cores)",
        ext["gpu_teacher_sim"]["unit"],
        "<=",
        0.5,
    )
    host = ext["gpu_teacher_sim"]["host_only"]
    for arm, what in (
        ("one_unit", "one unit at a time"),
        ("two_units", "two units at a time (cache.n_workers: 2)"),
    ):
        if arm in host:
            res.target(
                f"extraction host ms per image, GPU teacher simulated, store in memory, {what}; slowest pass",
                max(host[arm]),
                "<=",
                0.5,
            )
    sim = ext["gpu_teacher_sim"]
    res.target("disk-bound ms per image (store bytes per image at the disk's measured write rate)",
               sim["disk_bound_ms_per_image"], "<=", 0.5, f"{sim['disk']['mb_per_s']} MB/s")  # fmt: skip
    res.target("reader samples/s (chunked, default LRU, no verify)", r["samples_per_s"], ">=", 2000)
    res.target(
        "reader samples/s (chunked, default LRU, as training on CUDA reads)", rv["samples_per_s"], ">=", 2000
    )
    res.target("read amplification (no verify)", r["amplification"], "<=", 1.5)
    res.target("read amplification (as training on CUDA reads)", rv["amplification"], "<=", 1.5)
    res.target(f"stub student ({args.step_ms} ms/64) wait share, first pass", w["wait_share"], "<=", 0.05)
    res.target(
        f"stub student ({args.step_ms} ms/64) wait share, chunks already checked",
        w["checked_pass"]["wait_share"],
        "<=",
        0.05,
    )
    out = res.write(args.out)
    print(json.dumps({k: v for k, v in res.measurements["extraction"].items() if k != "store"}))
    return 0 if out else 1


if __name__ == "__main__":
    raise SystemExit(main())
