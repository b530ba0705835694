"""The teacher cache: one Zarr v3 store holding the frozen teacher's outputs for every unique image and text.

Layout (docs/method.md §1; N = unique images, M = unique texts, P patch tokens, E joint width, K views)::

    <store>/zarr.json            attrs: format, format_version, package_version, teacher (describe()), embed_dim,
                                 num_patches, grid, context_length, logit_scale, dtype, codec, views,
                                 relevance_tokens, units, data, fingerprint, complete, extract (metrics of the
                                 last run that computed a unit; a run that computes nothing leaves the store
                                 byte-identical), segments (the first extraction's rows and each append's,
                                 ``grow``), appending (only while an append's units are uncommitted)
    image/ids        [N]          str      image id used by the data shards (row order = data-shard order)
    image/sha1       [N]          str      SHA-1 of the row's image bytes (an append finds held images by it)
    image/alias_ids  [A]          str      ids whose bytes equal an earlier image (deduplicated by SHA-1) ...
    image/alias_rows [A]          int64    ... and the row they share
    image/tokens     [N, P, E]    float16 | int8   last-layer patch tokens in the joint space (no CLS)
    image/tokens_scale [N, P]     float16  int8 stores only: per-token scale (x ≈ q * scale)
    image/pooled     [N, E]       float16  encode_image output, unnormalised
    image/valid      [N]          uint8    0 = the image could not be decoded (rows zero-filled, on_error=skip)
    image/<src>_tokens [N, P, E]  relevance-scoring token sources (e.g. value_tokens, MaskCLIP-style), optional
    views/tokens     [N, K, P, E] optional: K views per image; view 0 is the deterministic eval transform
    views/pooled     [N, K, E]
    views/boxes      [N, K, 4]    float32  crop box (x0, y0, x1, y1), normalised to the original image
    views/flip       [N, K]       uint8    1 = horizontally flipped after cropping
    text/ids         [M]          str      text_hash(text)
    text/lengths     [M]          int32    L_i = EOT index + 1 (SOT … EOT inclusive)
    text/offsets     [M + 1]      int64    text i = text/tokens[offsets[i] : offsets[i] + lengths[i]]
    text/tokens      [ΣS, E]      float16 | int8   ragged token states, no per-text padding
    text/pooled      [M, E]       float16
    manifest/<unit>.json                   one JSON per committed work unit (see ``commit_unit``)
    provenance/<unit>.json                 host, pid and seconds of the run that computed the unit
    provenance/extract.json                the last extraction run's metrics (time, rates, units computed)

Work units and shards. Every large array is written through zarr's sharding codec and one work unit writes
whole shards that no other unit touches (zarr loses data when two writers share a shard). Image unit u owns
rows [u·R, (u+1)·R) with R = ``image_rows_per_unit``, a whole number of image shards of R_s =
``image_rows_per_shard`` rows: a unit writes each of its shards as soon as its rows are computed, behind the
teacher's next batches, and commits once all are written (see ``pipeline.extract``). Text unit t owns texts
[t·R_t, (t+1)·R_t); because texts are ragged, its token rows start on a shard boundary of ``text/tokens``:
every text unit owns exactly one shard of S rows, S = the largest unit's ΣL rounded up to whole inner chunks.
The S − ΣL slack rows at the end of a unit's shard are written as zeros (= the fill value), and zarr's
``write_empty_chunks=False`` (the default, honoured for the inner chunks of a shard) leaves inner chunks that
are entirely slack out of the shard, so slack costs at most one partly-filled inner chunk on disk. This is
why ``offsets[i + 1] - offsets[i]`` equals ``lengths[i]`` except for the last text of each unit: always read
``offsets[i] : offsets[i] + lengths[i]``; ``offsets[M]`` is the length of ``text/tokens``.

ids, lengths and offsets are written by the coordinator before any unit runs (tokenising is cheap), so a
unit only writes its own token/pooled shards and then its manifest entry.

Encoding. Token arrays are float16 (default) or int8 with a float16 scale per token (``<name>_scale``);
pooled vectors, boxes and masks are never quantised (they are 1/P of the bytes and feed the confidence
weights). Blosc zstd (or lz4, or none) with byte shuffle. Inner chunks hold ≈ ``target_chunk_bytes`` (text
arrays: ``text_chunk_bytes``, smaller, as texts are read a few scattered rows at a time): a random
single-row read decodes one whole inner chunk, so readers should ask for whole batches (the reader
sorts and deduplicates a batch's rows so each touched chunk is decoded once).

Views. ``views/`` repeats view 0 (identical to ``image/``) so that a student can draw a view index in
[0, K) and read one array; the duplication costs 1/K of the views group.

Modules, one concern each: ``schema`` (format constants, array specs, unit names, root attrs), ``layout``
(shape and chunk arithmetic), ``store`` (locations, open, remove, replace), ``create``, ``manifest``,
``checksum``, ``grow`` (segments: a store that grows by appends), ``fingerprint`` (comparing them, what a
store covers; which teacher it is, is ``pipeline.identity``'s answer),
``codec`` (int8, compressors), ``views``, ``reader`` (``TeacherCache`` and its chunk LRU), ``direct`` (the
LRU's whole-chunk reads from the shard files) and ``verified`` (checksum-on-read, per inner chunk). Everything is re-exported here.
"""

from __future__ import annotations

from .checksum import checksum, crc32, crc32_combine, crc32_update
from .codec import (
    compressors_for,
    decode_tokens,
    dequantize_int8,
    encode_tokens,
    quantize_int8,
    reconstruction_cosine,
)
from .create import create_store
from .errors import CacheCorrupt, CacheFormatError, StaleCacheError
from .fingerprint import (
    GROWING_FIELDS,
    VQA_ANSWER_TYPES,
    check_fingerprint,
    covered_datasets,
    flatten,
    lacks_answer_types,
    merge_datasets,
    reading_fingerprint,
    stale_fields,
    uncovered,
    vqa_answer_space,
)
from .grow import (
    APPENDING,
    SEGMENTS,
    Extents,
    StoreIndex,
    alias_rows_state,
    extend_store,
    extents,
    initial_segment,
    new_segment,
    pad_record,
    read_index,
    recorded_aliases,
    segment_units,
    store_segments,
)
from .layout import StoreLayout, chunk_rows_for, text_token_layout
from .manifest import commit_unit, committed_units, read_manifest, record_run
from .reader import TeacherCache, read_rows, read_threads_for
from .schema import (
    ALIAS_ROWS_KEPT,
    FORMAT,
    FORMAT_VERSION,
    ID_ARRAYS,
    LOCK_FILE,
    MANIFEST,
    PAD_PREFIX,
    RELEVANCE_SOURCES,
    SCALE_SUFFIX,
    TRASH_INFIX,
    ArraySpec,
    array_specs,
    attrs_problems,
    damaged_attrs_message,
    is_pad_id,
    pad_id,
    planned_units,
    root_attrs,
    token_sources,
    unit_arrays,
    unit_name,
)
from .store import (
    bytes_on_disk,
    check_metadata,
    foreign_message,
    inspect_location,
    is_local,
    local_path,
    open_group,
    package_version,
    read_store_attrs,
    remove_store,
    replace_store,
    store_exists,
)
from .verified import manifest_regions
from .views import (
    RESIZE_MODES,
    apply_view,
    eval_view_box,
    eval_view_pixels,
    sample_view_box,
    view_params_for,
    view_seed,
)

__all__ = [
    "ALIAS_ROWS_KEPT",
    "APPENDING",
    "covered_datasets",
    "uncovered",
    "extend_store",
    "extents",
    "Extents",
    "GROWING_FIELDS",
    "lacks_answer_types",
    "VQA_ANSWER_TYPES",
    "vqa_answer_space",
    "initial_segment",
    "is_pad_id",
    "merge_datasets",
    "new_segment",
    "PAD_PREFIX",
    "pad_id",
    "pad_record",
    "read_index",
    "reading_fingerprint",
    "segment_units",
    "SEGMENTS",
    "stale_fields",
    "store_segments",
    "StoreIndex",
    "apply_view",
    "array_specs",
    "attrs_problems",
    "damaged_attrs_message",
    "ArraySpec",
    "bytes_on_disk",
    "CacheCorrupt",
    "CacheFormatError",
    "check_fingerprint",
    "check_metadata",
    "checksum",
    "chunk_rows_for",
    "commit_unit",
    "committed_units",
    "compressors_for",
    "crc32",
    "crc32_combine",
    "crc32_update",
    "create_store",
    "alias_rows_state",
    "recorded_aliases",
    "decode_tokens",
    "dequantize_int8",
    "encode_tokens",
    "eval_view_box",
    "eval_view_pixels",
    "flatten",
    "foreign_message",
    "FORMAT",
    "FORMAT_VERSION",
    "ID_ARRAYS",
    "inspect_location",
    "is_local",
    "local_path",
    "LOCK_FILE",
    "MANIFEST",
    "manifest_regions",
    "open_group",
    "package_version",
    "planned_units",
    "quantize_int8",
    "read_manifest",
    "record_run",
    "read_rows",
    "read_threads_for",
    "read_store_attrs",
    "reconstruction_cosine",
    "RELEVANCE_SOURCES",
    "RESIZE_MODES",
    "remove_store",
    "replace_store",
    "root_attrs",
    "sample_view_box",
    "SCALE_SUFFIX",
    "StaleCacheError",
    "store_exists",
    "StoreLayout",
    "TeacherCache",
    "text_token_layout",
    "token_sources",
    "TRASH_INFIX",
    "unit_arrays",
    "unit_name",
    "view_params_for",
    "view_seed",
]
