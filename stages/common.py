"""What every stage shares: the --params / --set options and loading them into typed parameters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from pipeline.config import ConfigError, Params, load_params

DEFAULT_PARAMS = "params.yaml"


def params_options(f: Callable) -> Callable:
    """Add ``--params PATH`` and repeatable ``--set KEY=VALUE`` (passed as ``params_path`` and ``overrides``)."""
    f = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a parameter by its dotted name, e.g. train.steps=200 (repeatable; values parse as YAML).",
    )(f)
    return click.option(
        "--params",
        "params_path",
        default=None,
        help=f"Parameter file holding the defaults [default: {DEFAULT_PARAMS} if present, else the built-in defaults].",
    )(f)


def stage_params(params_path: str | None, overrides: tuple[str, ...] = ()) -> Params:
    """Typed parameters; a bad file, key or value becomes a usage error naming it. A --params path given
    explicitly must exist (a typo must not silently fall back to the defaults)."""
    if params_path is not None and not Path(params_path).exists():
        raise click.UsageError(f"--params {params_path}: no such file")
    path = params_path or (DEFAULT_PARAMS if Path(DEFAULT_PARAMS).exists() else None)
    try:
        return load_params(path, overrides)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
