"""What a student run can fail with for a reason the user can fix: each is one line naming the file or field."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot go on for a reason the user can fix; the message is one line naming the file or field."""


class RunSetupError(RunError, ValueError):
    """The run's options do not fit together or fit the data (a ValueError, as it was before it was named)."""


class FingerprintMismatch(RunError):
    """The cache was extracted from other data or another teacher than this run uses."""


class CheckpointError(RunError):
    """checkpoint.pt cannot be resumed: unreadable, not written by this code, or another run's."""


class RunLocked(RunError):
    """Another process is training into the same run directory."""
