"""Names the whole project shares, each defined once: a leaf module that imports nothing of the project, so
any layer may use it. Where a params field's typing ``Literal`` must list the same names, a test asserts
that it does (tests/test_layering.py)."""

from __future__ import annotations

# Every relevance source the teacher can return besides the last-layer tokens (docs/method.md §3); the cache
# stores one token array per source (``<src>_tokens``).
RELEVANCE_SOURCES = ("value", "intermediate")
