"""The local store: state transitions (`state`), their events (`events`), the journal files
(`journal`) and the store that serves the contract over them (`store`)."""

from __future__ import annotations

from sidecar.queue.local.journal import Journal, JournalError
from sidecar.queue.local.state import (
    RECORD_OVERHEAD_BYTES,
    RETAINED_OVERHEAD_BYTES,
    LocalState,
    held_cost,
)
from sidecar.queue.local.store import LocalQueue

__all__ = [
    "RECORD_OVERHEAD_BYTES",
    "RETAINED_OVERHEAD_BYTES",
    "Journal",
    "JournalError",
    "LocalQueue",
    "LocalState",
    "held_cost",
]
