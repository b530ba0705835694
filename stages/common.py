"""What every stage shares: the click command around it (``stage_command``), the --params / --set options and
loading them into typed parameters, and how a stage writes a result file (``write_json``)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import click

from pipeline.config import ConfigError, Params, load_params

DEFAULT_PARAMS = "params.yaml"
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}

ErrorTypes = tuple[type[BaseException], ...]


def write_text(path: Path, text: str) -> None:
    """Write beside ``path`` and rename into place: a reader never sees half a file, a failed write leaves the
    previous file and no temporary beside it, and a symlink at ``path`` is replaced, not followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object, newline: bool = True) -> None:
    """``obj`` as JSON (indent 1) through ``write_text``. ``newline=False`` keeps the files that were always
    written without a final newline (eval.json) byte for byte as they were: DVC records their hashes."""
    write_text(path, json.dumps(obj, indent=1) + ("\n" if newline else ""))


def one_line(e: object) -> str:
    """An error message as one line: messages quote values from the input, and one holding a newline or a
    lone surrogate must not break the line (or the terminal encoding) that reports it."""
    text = " ".join(str(e).split()).encode("utf-8", "backslashreplace").decode()
    return text or type(e).__name__


def stage_command(
    *, user_errors: ErrorTypes | Callable[[], ErrorTypes] = (), params: bool = True
) -> Callable[[Callable], click.Command]:
    """The click command a stage is: -h/--help, defaults shown, ``--params``/``--set`` (``params``, passed as
    ``params_path`` and ``overrides``), and the errors a user can cause and fix (``user_errors``; a callable
    returning them lets a stage import its modules only when it runs) reported as one ``Error: …`` line with
    exit status 1. Anything else is a bug and keeps its traceback."""

    def decorate(f: Callable) -> click.Command:
        @functools.wraps(f)
        def run(*args, **kwargs):
            errors = user_errors() if callable(user_errors) else user_errors
            try:
                return f(*args, **kwargs)
            except click.ClickException:
                raise
            except errors as e:
                raise click.ClickException(one_line(e)) from None

        return click.command(context_settings=CONTEXT_SETTINGS)(params_options(run) if params else run)

    return decorate


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
