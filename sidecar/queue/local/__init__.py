"""The local store: state transitions (`state`), their events (`events`), the journal files
(`journal`), what a held request costs (`cost`), the transitions reported to the hooks
(`reporting`), the store that serves the contract over them (`store`) and its side of the
hand-over to Redis (`handover`)."""

from __future__ import annotations

from sidecar.queue.local.cost import RECORD_OVERHEAD_BYTES, RETAINED_OVERHEAD_BYTES, held_cost
from sidecar.queue.local.journal import Journal, JournalError
from sidecar.queue.local.state import LocalState
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
