"""One error base with a stable code, the same on the wire, in the client and in protocol.md."""

from __future__ import annotations

from typing import Any, ClassVar


class SidecarError(Exception):
    """Base of every error the daemon reports; `code` is stable and snake_case."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InternalError(SidecarError):
    code = "internal_error"


class InvalidMessage(SidecarError):
    """A well-framed body that is not a valid request (bad MessagePack, wrong types, bad values)."""

    code = "invalid_message"


class UnknownOp(SidecarError):
    code = "unknown_op"


class UnsupportedProtocol(SidecarError):
    """A hello naming a protocol number this daemon does not speak; details list its own."""

    code = "unsupported_protocol"


class FrameTooLarge(SidecarError):
    """A frame whose declared length exceeds the limit; the connection is closed."""

    code = "frame_too_large"


class BadFrame(SidecarError):
    """The connection ended inside a frame; the connection is closed."""

    code = "bad_frame"


class PayloadTooLarge(SidecarError):
    code = "payload_too_large"


class NotFound(SidecarError):
    code = "not_found"


class InvalidState(SidecarError):
    """The request exists but is not in a state that allows the operation."""

    code = "invalid_state"


class UnknownQueue(SidecarError):
    """A request naming a queue this daemon does not serve; details list the ones it does."""

    code = "unknown_queue"


class LeaseMismatch(SidecarError):
    """The lease named is not the request's current lease (it lapsed or was never this one)."""

    code = "lease_mismatch"


class QueueFull(SidecarError):
    """The store is at its watermark or hard limit; details carry usage and a retry hint."""

    code = "queue_full"


class BackendUnavailable(SidecarError):
    code = "backend_unavailable"


class StorageUnavailable(SidecarError):
    """The local store's journal cannot write (disk full, I/O error): nothing new is accepted."""

    code = "storage_unavailable"


class TooManyConnections(SidecarError):
    code = "too_many_connections"


class ShuttingDown(SidecarError):
    code = "shutting_down"


class PermissionDenied(SidecarError):
    """The peer's uid and gid are not in the daemon's allowlist; the connection is closed."""

    code = "permission_denied"


class BadCursor(SidecarError):
    """A list cursor this daemon did not make (another daemon's, or from before a restart), or
    one that was damaged, or one made for other filters."""

    code = "bad_cursor"


class Forbidden(SidecarError):
    """The daemon's settings do not allow what was asked (a payload, SIDECAR_OPS_PAYLOADS)."""

    code = "forbidden"


class SidecarUnavailable(SidecarError):
    """Client side only: the daemon could not be reached (not running, wrong path, timed out).

    details["sent"] is False when the call never reached the daemon (nothing was stored), True
    when it was sent and no reply came (its outcome is unknown).
    """

    code = "sidecar_unavailable"


class UnsafeSocket(SidecarUnavailable):
    """Client side only: the socket's folder could be written by another user; not connected."""


class StartupError(Exception):
    """The daemon cannot start (socket path held by a live daemon, or unusable); exit 2."""


class UnsafeSocketFolder(StartupError):
    """The socket's folder belongs to another user or others can write it."""


ERRORS_BY_CODE: dict[str, type[SidecarError]] = {
    cls.code: cls
    for cls in (
        InternalError,
        InvalidMessage,
        UnknownOp,
        UnsupportedProtocol,
        FrameTooLarge,
        BadFrame,
        PayloadTooLarge,
        NotFound,
        InvalidState,
        LeaseMismatch,
        UnknownQueue,
        QueueFull,
        BackendUnavailable,
        StorageUnavailable,
        TooManyConnections,
        ShuttingDown,
        PermissionDenied,
        BadCursor,
        Forbidden,
        SidecarUnavailable,
    )
}


def error_from_code(code: str, message: str, details: dict[str, Any] | None = None) -> SidecarError:
    """Build the exception for a code received on the wire (unknown codes become the base class)."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        err = SidecarError(message, details)
        err.code = code  # type: ignore[misc]
        return err
    return cls(message, details)
