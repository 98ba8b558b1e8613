"""What can go wrong in snapshot, restore, migration and the control channel, as errors a user
can act on (the CLI prints each as one `kvmpy: error:` line)."""

from __future__ import annotations

from ..errors import KvmpyError, SnapshotError

__all__ = ["ControlError", "LazyRestoreUnavailable", "MigrationError", "SnapshotError"]


class LazyRestoreUnavailable(SnapshotError):
    """userfaultfd is not permitted or not supported here (lazy restore needs it)."""


class MigrationError(KvmpyError):
    """A live migration failed; the source VM keeps running."""


class ControlError(KvmpyError):
    """A control-channel request that cannot be served (malformed, unknown, wrong state)."""
