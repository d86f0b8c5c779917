"""The blocking client: one request at a time per instance, thread-safe with a lock.

Its methods are built from the same call builders (sidecar.client.calls) as AsyncClient's.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from sidecar.client import calls as ops
from sidecar.client.calls import Call, describe
from sidecar.client.connection import (
    CLIENT_MAX_FRAME,
    CONNECT_TIMEOUT_ENV,
    CONNECT_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    TIMEOUT_ENV,
    decode_reply,
    decode_result,
    ends_connection,
    env_seconds,
    lost,
    raise_for,
    socket_path,
)
from sidecar.errors import SidecarError, SidecarUnavailable, error_from_code
from sidecar.protocol import FrameReader, Reply, Request, encode_frame
from sidecar.socket_dir import check_socket_folder

T = TypeVar("T")
P = ParamSpec("P")


def _sync(build: Callable[P, Call[T]]) -> Callable[Concatenate[Client, P], T]:
    """Client's method for an op: the same builder as AsyncClient's, sent blocking."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._call(build(*args, **kwargs))

    describe(method, build, "Client")
    return method


class Client:
    """A blocking client (one request at a time per instance; thread-safe with a lock)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        connect_timeout_s: float | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.path = socket_path(path)
        self.connect_timeout_s = connect_timeout_s or env_seconds(
            CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S
        )
        self.timeout_s = timeout_s or env_seconds(TIMEOUT_ENV, REQUEST_TIMEOUT_S)
        self._sock: socket.socket | None = None
        self._frames = FrameReader(CLIENT_MAX_FRAME)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def connect(self) -> Client:
        """Open the connection, failing fast with SidecarUnavailable when nobody listens."""
        check_socket_folder(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout_s)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise SidecarUnavailable(
                f"sidecar unavailable at {self.path}: {exc.__class__.__name__}: {exc}",
                {"path": self.path, "sent": False},
            ) from exc
        self._sock = sock
        self._frames = FrameReader(CLIENT_MAX_FRAME)
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    hello = _sync(ops.hello)
    enqueue = _sync(ops.enqueue)
    enqueue_many = _sync(ops.enqueue_many)
    dequeue = _sync(ops.dequeue)
    extend = _sync(ops.extend)
    complete = _sync(ops.complete)
    complete_next = _sync(ops.complete_next)
    complete_many = _sync(ops.complete_many)
    fail = _sync(ops.fail)
    cancel = _sync(ops.cancel)
    status = _sync(ops.status)
    stats = _sync(ops.stats)
    health = _sync(ops.health)
    metrics = _sync(ops.metrics)
    requeue = _sync(ops.requeue)
    purge = _sync(ops.purge)
    take = _sync(ops.take)
    limit_acquire = _sync(ops.limit_acquire)
    limit_settle = _sync(ops.limit_settle)
    limit_pause = _sync(ops.limit_pause)
    limit_report = _sync(ops.limit_report)

    def _call(self, call: Call[T]) -> T:
        req, extra_timeout_s = call.request, call.extra_timeout_s
        with self._lock:
            # A connection kept from an earlier call may have been closed by a daemon restart:
            # a call that is safe to repeat gets one more try on a new connection.
            reused = self._sock is not None
            try:
                reply = self._exchange(req, extra_timeout_s)
            except SidecarUnavailable as err:
                if not (reused and err.details.get("reason") == "connection_lost"):
                    raise
                if not call.spec.retry_safe:
                    raise
                reply = self._exchange(req, extra_timeout_s)
        raise_for(reply)
        return call.unwrap(decode_result(reply, call.spec.result))

    def _exchange(self, req: Request, extra_timeout_s: float) -> Reply:
        if self._sock is not None and _closed_by_peer(self._sock):
            self.close()  # the daemon restarted while we idled: nothing was sent on this one
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        req.id = next(self._ids)
        try:
            self._sock.settimeout(self.timeout_s + extra_timeout_s)
            self._sock.sendall(encode_frame(req))
            return self._read_reply(req.id)
        except TimeoutError as exc:
            self.close()
            raise lost(f"no reply from the sidecar within {self.timeout_s}s", "timeout") from exc
        except OSError as exc:
            refused = self._refusal_sent()
            self.close()
            if refused is not None:
                raise refused from exc
            raise lost(f"connection to the sidecar failed: {exc}", "connection_lost") from exc

    def _refusal_sent(self) -> SidecarError | None:
        """The connection error the daemon sent before closing on us, if it can still be read.

        A refused connection (permission_denied, too_many_connections) is closed at once; a
        send can then fail before the reply that says why was read.
        """
        sock = self._sock
        if sock is None:
            return None
        frames = FrameReader(CLIENT_MAX_FRAME)
        sock.setblocking(False)
        try:
            while data := sock.recv(65536):
                for body in frames.feed(data):
                    reply = decode_reply(body)
                    if reply.id is None and ends_connection(reply):
                        assert reply.error is not None
                        return error_from_code(
                            reply.error.code, reply.error.message, reply.error.details
                        )
        except OSError:
            pass
        return None

    def _read_reply(self, request_id: int) -> Reply:
        assert self._sock is not None
        while True:
            data = self._sock.recv(65536)
            if not data:
                self.close()
                raise lost("the sidecar closed the connection", "connection_lost")
            for body in self._frames.feed(data):
                reply = decode_reply(body)
                if reply.id is None and ends_connection(reply):
                    self.close()
                    raise_for(reply)
                if reply.id in (request_id, None):  # one request at a time: nil is ours too
                    return reply


    # Last in the class body: above, `list` in annotations is still the builtin.
    list = _sync(ops.list_)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle connection was closed by the daemon (EOF or reset waiting to be read)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False  # open, nothing to read: the usual case
    except OSError:
        return True
    finally:
        sock.setblocking(True)
