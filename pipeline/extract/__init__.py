"""Run the frozen teacher once over every unique image and text of the prepared datasets into the cache.

The coordinator (``extract``) plans the work: unique images (deduplicated by SHA-1 across datasets, first
seen first, i.e. data-shard order), unique texts (every text ``pipeline.texts.instance_texts`` gives for any
instance, deduplicated by ``text_hash``), their token lengths, and the store layout. It creates the store
(or reopens a matching one), then hands out *work units* as dask tasks. A unit owns whole Zarr shards: image
unit u = rows [u·R, (u+1)·R), text unit t = texts [t·R_t, (t+1)·R_t) and one shard of token rows (see
``pipeline.cache``). A unit loads the teacher once per worker process, reads its images through a torch
DataLoader (worker processes decode and resize only; they never touch zarr), runs the teacher batch by
batch, writes each image shard on a writer thread as soon as the teacher has filled its rows (behind the next
batches' forward) and, once every shard is written, commits ``manifest/<unit>.json``. A rerun skips committed
units, so an interrupted extraction resumes where it stopped; a unit that died half-way is recomputed and
overwrites its own shards.

Test hook: the environment variable ``CLIP_TD_EXTRACT_FAIL_UNIT=<unit name>`` makes that unit raise after it
has written its first array and before it commits (a crash in the worst place); ``<unit name>:kill`` makes
the process SIGKILL itself there instead (no ``finally`` runs: the lock is left behind, as after an OOM kill).
An append has two more such places: ``append-index`` (its index written, its segment not yet recorded) and
``append-recorded`` (recorded, no unit of it committed).

A store grows: a run whose datasets hold images or texts a matching store (same teacher and store settings)
lacks appends them as a new segment of units after its rows (``pipeline.cache.grow``); committed rows, their
checksums and the old index stay as they were, and the fingerprint names the new datasets once every unit
is committed.

One writer per store: ``extract`` holds ``<store>/.lock`` (``pipeline.lock``) for its whole run, so a second
extraction of the same store is refused naming the holder, and a lock left by a killed run is taken over.
Teacher outputs are screened before they are written: a NaN/Inf row fails the unit naming the image (or
text) under ``on_error=fail``, and under ``skip`` an image's rows are zero-filled with ``image/valid = 0``.

Nothing is deleted that extraction did not make: a store location holding anything but a teacher cache (or
inside, equal to or around a dataset) is refused before anything is written. A new store is built in place
(there is nothing to lose, and a killed run resumes there). A store replaced under ``overwrite`` or
``rebuild_stale`` is rebuilt beside it, in ``<store>.tmp-rebuild`` (which a rerun resumes), and swapped into
place only once complete, so a failed rebuild leaves the previous store as it was (on an object store,
which has no directory rename, a replaced store is rebuilt in place). A rerun that computes nothing leaves
the store byte-identical (DVC sees no change).

Modules, one concern each: ``errors`` (and the test hook), ``teachers`` (one teacher per process), ``plan``
(unique images and texts, the units), ``decode`` (a unit's images through a DataLoader), ``units`` (a unit's
compute), ``screen`` (NaN/Inf), ``writer`` (shards on writer threads), ``schedule`` (dask), ``target``
(where a store is built), ``datasets`` (opening the inputs) and ``coordinator`` (``extract`` and its metrics).
"""

from __future__ import annotations

from .coordinator import default_metrics_path, extract
from .datasets import find_default_datasets, open_datasets
from .decode import MP_CONTEXT_ENV, UnitImages, collate_images, pil_steps, unit_batches
from .errors import (
    FAIL_ENV,
    ImageError,
    InjectedFailure,
    NonFiniteOutput,
    StoreLocationError,
    TextError,
    UnitWriteError,
)
from .plan import Growth, Plan, UnitJob, decode_workers, make_jobs, plan_extraction, plan_growth, unit_jobs
from .schedule import local_cluster, run_units
from .screen import nonfinite_rows
from .target import REBUILD_SUFFIX, check_store_outside, rebuild_url
from .teachers import TeacherSpec, get_teacher, weights_sha256
from .units import UNIT_RUNS, ImageUnit, UnitBuffers, run_unit
from .writer import UnitWriter, write_threads

__all__ = [
    "FAIL_ENV",
    "Growth",
    "ImageError",
    "ImageUnit",
    "InjectedFailure",
    "MP_CONTEXT_ENV",
    "NonFiniteOutput",
    "Plan",
    "REBUILD_SUFFIX",
    "StoreLocationError",
    "TeacherSpec",
    "TextError",
    "UNIT_RUNS",
    "UnitBuffers",
    "UnitImages",
    "UnitJob",
    "UnitWriteError",
    "UnitWriter",
    "check_store_outside",
    "collate_images",
    "decode_workers",
    "default_metrics_path",
    "extract",
    "find_default_datasets",
    "get_teacher",
    "local_cluster",
    "make_jobs",
    "nonfinite_rows",
    "open_datasets",
    "pil_steps",
    "plan_extraction",
    "plan_growth",
    "rebuild_url",
    "run_unit",
    "run_units",
    "unit_batches",
    "unit_jobs",
    "weights_sha256",
    "write_threads",
]
