"""Opening the prepared datasets extraction reads, with errors that name the file at fault."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.errors import DataError
from ..data.shards import PreparedDataset


def open_datasets(paths: Sequence[str | Path]) -> list[PreparedDataset]:
    """PreparedDataset for each path; a dataset.json or images.index.json that cannot be parsed or lacks what
    extraction reads raises DataError naming the file (PreparedDataset itself would fail on it with a bare
    JSON or key error, or later, mid-plan)."""
    out = []
    for p in paths:
        try:
            ds = PreparedDataset(p)
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            _diagnose_dataset(Path(p))
            raise DataError(p, "dataset", f"cannot be read: {type(e).__name__}: {e}") from None
        _diagnose_dataset(Path(p), ds)
        out.append(ds)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "file", "missing (rerun `python -m stages.prepare_data`)") from None
    except (UnicodeDecodeError, ValueError) as e:
        where = f"line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "json"
        raise DataError(path, where, f"not valid JSON ({e}); rerun `python -m stages.prepare_data`") from None
    except OSError as e:
        raise DataError(path, "file", f"cannot be read: {e}") from None


def _diagnose_dataset(path: Path, ds: PreparedDataset | None = None) -> None:
    """Raise DataError naming the file at fault when a prepared dataset's metadata is not what extraction
    reads: dataset.json an object with string lists ``instance_shards`` and ``image_shards`` and a string
    ``fingerprint``, images.index.json an object of [shard, offset, size, ext, sha1] entries."""
    from ..data.shards import INDEX_FILE, INFO_FILE

    info = ds.info if ds is not None else _read_json(path / INFO_FILE)
    if not isinstance(info, dict):
        raise DataError(path / INFO_FILE, "json", "not a JSON object")
    for key in ("instance_shards", "image_shards"):
        v = info.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise DataError(path / INFO_FILE, key, f"expected a list of shard file names, got {v!r:.80}")
    if not isinstance(info.get("fingerprint"), str):
        raise DataError(
            path / INFO_FILE, "fingerprint", f"expected a string, got {info.get('fingerprint')!r:.80}"
        )
    index = ds.index if ds is not None else _read_json(path / INDEX_FILE)
    if not isinstance(index, dict):
        raise DataError(path / INDEX_FILE, "json", "not a JSON object (image id -> entry)")
    n = len(info["image_shards"])
    for image_id, e in index.items():
        if not (
            isinstance(e, list)
            and len(e) == 5
            and isinstance(e[0], int)
            and 0 <= e[0] < n
            and all(isinstance(x, int) and x >= 0 for x in e[1:3])
            and all(isinstance(x, str) for x in e[3:])
        ):
            raise DataError(
                path / INDEX_FILE, image_id, f"expected [shard < {n}, offset, size, ext, sha1], got {e!r:.80}"
            )


def find_default_datasets(root: str = "data/shards/synthetic") -> list[str]:
    """Every prepared dataset under root except the caption corpora (those train the embedded teacher)."""
    from ..data.shards import find_datasets

    out = []
    for p in find_datasets(root):
        rel = Path(p).relative_to(root).parts if Path(p) != Path(root) else ()
        if not any(part.startswith("captions") for part in rel):
            out.append(str(p))
    return out
