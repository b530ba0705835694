"""Stage `verify-cache`: check a teacher cache's integrity offline and report one line per check."""

from __future__ import annotations

from pathlib import Path

import click

from stages.common import stage_command, stage_params, write_json


@stage_command(params=False)
@click.argument("store", required=False)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the report as JSON: every check with ok, summary and its faults (up to 1000 each).",
)
@click.option(
    "--no-scan",
    is_flag=True,
    help="Skip the NaN/Inf scan (the one check that decodes every value); the checksums still read everything.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    help="Threads for the checksum and NaN/Inf checks (0: 4 for checksums, dask's default for the scan).",
)
@click.option(
    "--params",
    "params_path",
    default=None,
    help="Parameter file whose cache.store is checked when STORE is not given (default: params.yaml if "
    "present, else the built-in defaults).",
)
def main(
    store: str | None, json_path: Path | None, no_scan: bool, workers: int, params_path: str | None
) -> None:
    """Verify the teacher cache at STORE (a path or fsspec URL; default: cache.store from --params).

    \b
    Checks, one report line each (OK/FAIL with counts, then the first faults):
      format     attrs name a teacher cache of this version, marked complete, no append unfinished, not
                 locked by a writer
      shapes     every array's shape/dtype follows from the attrs (N_img, P, E, K views, M texts)
      offsets    text offsets start at 0, are monotonic, fit each text's length, end at the token rows,
                 and every text unit starts on its own shard
      ids        image, alias and text ids are unique; alias rows exist
      manifest   every planned unit (of every segment, a store grown by appends has one per append) is
                 committed, no unknown unit is, entries cover their rows and arrays
      checksums  each committed region's crc32, and each inner chunk's where recorded, equals its manifest
                 entry (names the unit, the array and the rows of the chunk at fault)
      nonfinite  no NaN/Inf in any float array (dask, per unit shard; names the array, row and id)

    Exit status: 0 when every check passes, 1 when any fails, 2 when STORE is not a teacher cache.
    """
    from pipeline.cache import CacheFormatError
    from pipeline.verify import verify_store

    # An explicit --params that does not exist is refused, never the defaults' store checked instead.
    if store is None:
        store = stage_params(params_path).cache.store
    try:
        report = verify_store(store, scan=not no_scan, workers=workers)
    except CacheFormatError as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(2) from e
    for line in report.lines():
        click.echo(line)
    if json_path is not None:
        write_json(Path(json_path), report.to_json(), newline=False)
        click.echo(f"report -> {json_path}")
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
