"""The events of the local store: what each transition returns and the journal appends.

Replay applies the same events through the same code path as the live store, so the state
rebuilt after a restart is the state that was acknowledged. Array-like encoding keeps each
record small (a lease is about 60 bytes on disk).
"""

from __future__ import annotations

import msgspec

from sidecar.models import QueuedRequest, QueueStatus


class Event(msgspec.Struct, tag_field="t", array_like=True, gc=False):
    """Base of every change of the local store."""


class Enqueued(Event, tag="enq"):
    """A new request, with its seq; `uncertain` when a Redis write of it may still land."""

    rec: QueuedRequest
    uncertain: bool = False


class Leased(Event, tag="lease"):
    qid: str
    lease_id: str
    until: float
    at: float


class Extended(Event, tag="ext"):
    qid: str
    until: float
    at: float


class Requeued(Event, tag="req"):
    """Back to queued: a failure with retry, or a lapsed lease."""

    qid: str
    at: float
    reason: str | None
    # The lease of the `fail` that asked for it (None for a lapse), kept to recognise a repeat.
    failed_lease: str | None = None
    # A `fail` with delay_s: not handed out before this time (epoch seconds).
    not_before: float | None = None
    # A `fail` whose delivery does not count (counts false): attempts goes back by one. Last,
    # with a default, so an event journaled before it existed replays as it did then.
    refund: bool = False


class Finished(Event, tag="fin"):
    """A terminal status: completed, failed (cancel included) or expired."""

    qid: str
    status: QueueStatus
    reason: str | None
    at: float
    failed_lease: str | None = None


class Forgotten(Event, tag="forget"):
    """A terminal record's retention ended (`cut`: early, because the cap was reached)."""

    qid: str
    cut: bool


class Revived(Event, tag="revive"):
    """Dead letters back to queued by an operator: attempts 0, last in line, TTL anew."""

    qids: list[str]
    at: float


class Purged(Event, tag="purge"):
    """Records an operator purged: forgotten now (a live one ends failed, `purged`, first)."""

    qids: list[str]
    at: float


class Taken(Event, tag="take"):
    """Queued requests taken for the hand-over to Redis: findable, never dequeued."""

    qids: list[str]


class Returned(Event, tag="ret"):
    """A hand-over failed: the requests are queued here again (uncertain if Redis timed out)."""

    qids: list[str]
    uncertain: bool = False


class MovedOut(Event, tag="out"):
    """Redis confirmed these requests (or already held them): this store forgets them."""

    qids: list[str]


class Resolved(Event, tag="res"):
    """The uncertainty about a request's Redis copy was settled; it stays here."""

    qid: str


class Unaccepted(Event, tag="unacc"):
    """An enqueue whose record never reached the disk is undone (never journaled)."""

    qids: list[str]


class SnapshotHead(Event, tag="head"):
    """The books at the moment of a snapshot; the Held records follow it."""

    next_seq: int
    counts: dict[str, int]
    retention_cut: int
    max_expired_age_s: float | None
    rejections: dict[str, int]


class Held(Event, tag="held"):
    """One record as a snapshot keeps it (queued, processing or retained until purge_at)."""

    rec: QueuedRequest
    uncertain: bool
    purge_at: float | None
    not_before: float | None = None


AnyEvent = (
    Enqueued
    | Leased
    | Extended
    | Requeued
    | Finished
    | Forgotten
    | Taken
    | Returned
    | MovedOut
    | Resolved
    | Unaccepted
    | SnapshotHead
    | Held
    | Revived
    | Purged
)
