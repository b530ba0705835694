"""What reading or writing a teacher cache can fail with."""

from __future__ import annotations


class StaleCacheError(RuntimeError):
    """A store was built from a different teacher, data or layout than the one asked for."""

    def __init__(self, url: str, fields: list[str], detail: str = ""):
        self.url, self.fields = url, list(fields)
        hint = detail or "rerun extraction with --overwrite to rebuild it"
        super().__init__(f"teacher cache {url} is stale: differing fields: {', '.join(fields)}; {hint}")

    def __reduce__(self) -> tuple:  # picklable across dask workers despite the custom __init__
        return (type(self), (self.url, self.fields))


class CacheFormatError(RuntimeError):
    """The path is not a (complete) teacher cache this code can read."""


class CacheCorrupt(RuntimeError):
    """A unit's stored bytes differ from the crc32 its manifest entry recorded when it was committed (bit rot,
    a foreign writer), the manifest itself cannot be read or lacks planned units, or the index arrays (text
    offsets and lengths, alias rows) contradict the layout; names the store and the array (and unit, rows)."""
