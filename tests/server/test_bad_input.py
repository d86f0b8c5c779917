"""Every kind of bad input gets a clear error; the daemon and its other clients carry on.

Framing errors (oversize length, EOF inside a frame) are answered and close that connection;
a well-framed but invalid body is answered and the connection stays usable.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from sidecar.client import Client
from tests.support.daemon import Daemon, running_daemon

# Many real servers or daemons, one per test: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

MAX_FRAME = 65536


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon(
        SIDECAR_MAX_FRAME_BYTES=str(MAX_FRAME),
        SIDECAR_MAX_PAYLOAD_BYTES="4096",
        SIDECAR_MAX_BATCH="10",
        SIDECAR_MAX_CONNECTIONS="16",
    ) as d:
        yield d


class Raw:
    """A bare socket speaking frames by hand, to send what no well-behaved client would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, body: bytes) -> None:
        self.send(struct.pack(">I", len(body)) + body)

    def msg(self, obj: object) -> None:
        self.frame(msgspec.msgpack.encode(obj))

    def reply(self) -> dict[str, Any]:
        while len(self.buf) < 4 or len(self.buf) < 4 + struct.unpack(">I", self.buf[:4])[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed before a whole reply")
            self.buf += chunk
        size = struct.unpack(">I", self.buf[:4])[0]
        body, self.buf = self.buf[4 : 4 + size], self.buf[4 + size :]
        result: dict[str, Any] = msgspec.msgpack.decode(body)
        return result

    def closed_by_peer(self) -> bool:
        return self.buf == b"" and self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[Raw]:
    conn = Raw(daemon.socket_path)
    yield conn
    conn.close()


def still_serving(daemon: Daemon, conn: Raw | None = None) -> None:
    """The same connection (when given) and a new one both still get answers."""
    if conn is not None:
        conn.msg({"op": "health", "id": 999})
        assert conn.reply()["ok"] is True
    with Client(daemon.socket_path) as other:
        assert other.health().status == "ok"


def error_of(reply: dict[str, Any]) -> tuple[Any, str]:
    assert reply["ok"] is False, reply
    return reply["id"], reply["error"]["code"]


# -- framing errors: answered, then that connection closes -----------------------------------


def test_eof_inside_a_header(daemon: Daemon, raw: Raw) -> None:
    raw.send(b"\x00\x00")
    raw.sock.shutdown(socket.SHUT_WR)
    reply = raw.reply()
    assert error_of(reply) == (None, "bad_frame")
    assert "inside a frame" in reply["error"]["message"]
    assert raw.closed_by_peer()
    still_serving(daemon)


def test_truncated_body(daemon: Daemon, raw: Raw) -> None:
    raw.send(struct.pack(">I", 100) + b"\x82" * 10)
    raw.sock.shutdown(socket.SHUT_WR)
    reply = raw.reply()
    assert error_of(reply) == (None, "bad_frame")
    assert reply["error"]["details"]["partial_bytes"] == 14
    assert raw.closed_by_peer()
    still_serving(daemon)


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 0xFFFFFFFF])
def test_length_over_the_limit(daemon: Daemon, raw: Raw, length: int) -> None:
    raw.send(struct.pack(">I", length) + b"\x00" * 16)
    reply = raw.reply()
    assert error_of(reply) == (None, "frame_too_large")
    assert reply["error"]["details"] == {"size": length, "max_frame_bytes": MAX_FRAME}
    assert raw.closed_by_peer()
    still_serving(daemon)


def test_requests_before_a_framing_error_are_still_answered(daemon: Daemon, raw: Raw) -> None:
    hello = msgspec.msgpack.encode({"op": "hello", "id": 1})
    raw.send(struct.pack(">I", len(hello)) + hello + struct.pack(">I", 0xFFFFFFFF))
    assert raw.reply()["id"] == 1
    assert error_of(raw.reply()) == (None, "frame_too_large")
    assert raw.closed_by_peer()


# -- well framed, invalid body: answered, the connection stays usable ------------------------


def test_zero_length_frame(daemon: Daemon, raw: Raw) -> None:
    raw.frame(b"")
    assert error_of(raw.reply()) == (None, "invalid_message")
    still_serving(daemon, raw)


def test_two_frames_in_one_write(daemon: Daemon, raw: Raw) -> None:
    a = msgspec.msgpack.encode({"op": "health", "id": 1})
    b = msgspec.msgpack.encode({"op": "stats", "id": 2})
    raw.send(struct.pack(">I", len(a)) + a + struct.pack(">I", len(b)) + b)
    first, second = raw.reply(), raw.reply()
    assert (first["id"], second["id"]) == (1, 2)
    assert first["result"]["status"] == "ok"
    assert "queued" in second["result"]


def test_one_frame_in_one_byte_writes(daemon: Daemon, raw: Raw) -> None:
    body = msgspec.msgpack.encode({"op": "health", "id": 77})
    for byte in struct.pack(">I", len(body)) + body:
        raw.send(bytes([byte]))
    reply = raw.reply()
    assert reply["id"] == 77 and reply["ok"] is True


# A well-formed complete_many item, for the requests refused for another field.
LEASE = {"queue_id": "q", "lease_id": "l"}


@pytest.mark.parametrize(
    ("body", "expect_id", "code", "fragment"),
    [
        (b"\xc1", None, "invalid_message", "malformed"),
        (msgspec.msgpack.encode({"op": "health", "id": 3}) + b"\x00", None, "invalid_message", ""),
        (msgspec.msgpack.encode(42), None, "invalid_message", "Expected `object`"),
        (
            # invalid UTF-8 inside a string
            b"\x83\xa2op\xa6status\xa2id\x05\xa8queue_id\xa3\xff\xfe\xfd",
            5,
            "invalid_message",
            "UTF-8",
        ),
        (
            # a payload of 60k nested arrays
            b"\x83\xa2op\xa7enqueue\xa2id\x06\xa5items\x91\x81\xa7payload"
            + b"\x91" * 60_000
            + b"\xc0",
            None,  # unreadable as a whole, so its id cannot be recovered either
            "invalid_message",
            "nested too deeply",
        ),
        (
            msgspec.msgpack.encode({"op": "dequeue", "id": 8, "max_items": "ten"}),
            8,
            "invalid_message",
            "$.max_items",
        ),
        (msgspec.msgpack.encode({"op": "explode", "id": 9}), 9, "unknown_op", "explode"),
        (msgspec.msgpack.encode({"op": 12, "id": 10}), 10, "invalid_message", ""),
        (msgspec.msgpack.encode({"op": "health"}), None, "invalid_message", "`id`"),
        (
            # a str32 declaring 4 GiB of string inside a 30-byte frame
            b"\x83\xa2op\xa6status\xa2id\x0b\xa8queue_id\xdb\xff\xff\xff\xffabc",
            None,
            "invalid_message",
            "truncated",
        ),
        (
            msgspec.msgpack.encode(
                {"op": "enqueue", "id": 12, "items": [{"payload": 1, "priority": 10}]}
            ),
            12,
            "invalid_message",
            "$.items[0].priority",
        ),
        (
            msgspec.msgpack.encode(
                {"op": "enqueue", "id": 13, "items": [{"payload": 1, "ttl_s": -1}]}
            ),
            13,
            "invalid_message",
            "ttl_s",
        ),
        (
            msgspec.msgpack.encode({"op": "enqueue", "id": 14, "items": []}),
            14,
            "invalid_message",
            "$.items",
        ),
        (
            msgspec.msgpack.encode({"op": "status", "id": 15, "queue_id": "has space"}),
            15,
            "invalid_message",
            "$.queue_id",
        ),
        (
            msgspec.msgpack.encode({"op": "enqueue", "id": 16, "items": [{"payload": "x" * 5000}]}),
            16,
            "payload_too_large",
            "over the limit of 4096",
        ),
        (
            msgspec.msgpack.encode({"op": "enqueue", "id": 17, "items": [{"payload": 1}] * 11}),
            17,
            "invalid_message",
            "over the limit of 10",
        ),
        (
            msgspec.msgpack.encode(
                {"op": "complete_next", "id": 18, "queue_id": "q", "lease_id": "l", "max_items": 0}
            ),
            18,
            "invalid_message",
            "$.max_items",
        ),
        (
            msgspec.msgpack.encode({"op": "complete_next", "id": 19, "queue_id": "q"}),
            19,
            "invalid_message",
            "lease_id",
        ),
        (
            msgspec.msgpack.encode({"op": "complete_many", "id": 20, "items": []}),
            20,
            "invalid_message",
            "$.items",
        ),
        (
            msgspec.msgpack.encode(
                {"op": "complete_many", "id": 21, "items": [{"queue_id": "q"}]}
            ),
            21,
            "invalid_message",
            "lease_id",
        ),
        (
            msgspec.msgpack.encode(
                {"op": "complete_many", "id": 22, "items": [LEASE], "max_items": -1}
            ),
            22,
            "invalid_message",
            "$.max_items",
        ),
        (
            msgspec.msgpack.encode(
                {"op": "complete_many", "id": 23, "items": [LEASE], "info": "no"}
            ),
            23,
            "invalid_message",
            "$.info",
        ),
        (
            msgspec.msgpack.encode({"op": "complete_many", "id": 24, "items": [LEASE] * 11}),
            24,
            "invalid_message",
            "over the limit of 10",
        ),
    ],
    ids=[
        "invalid-msgpack",
        "trailing-bytes",
        "not-a-map",
        "invalid-utf8",
        "deep-nesting",
        "wrong-field-type",
        "unknown-op",
        "op-not-a-string",
        "missing-id",
        "huge-declared-string",
        "priority-out-of-range",
        "negative-ttl",
        "empty-batch",
        "queue-id-with-space",
        "payload-too-large",
        "batch-too-large",
        "complete-next-of-no-jobs",
        "complete-next-without-a-lease",
        "complete-many-of-nothing",
        "complete-many-without-a-lease",
        "complete-many-negative-max-items",
        "complete-many-info-not-a-bool",
        "complete-many-batch-too-large",
    ],
)
def test_invalid_body_is_answered_and_the_connection_survives(
    daemon: Daemon, raw: Raw, body: bytes, expect_id: int | None, code: str, fragment: str
) -> None:
    raw.frame(body)
    reply = raw.reply()
    assert error_of(reply) == (expect_id, code)
    assert fragment in reply["error"]["message"]
    still_serving(daemon, raw)


def test_rejected_enqueue_stores_nothing(daemon: Daemon, raw: Raw) -> None:
    with Client(daemon.socket_path) as c:
        before = c.stats().accepted
    items = [{"payload": 1, "queue_id": "never-stored"}, {"payload": "x" * 5000}]
    raw.msg({"op": "enqueue", "id": 1, "items": items})
    assert error_of(raw.reply()) == (1, "payload_too_large")
    raw.msg({"op": "status", "id": 2, "queue_id": "never-stored"})
    assert error_of(raw.reply()) == (2, "not_found")
    with Client(daemon.socket_path) as c:
        assert c.stats().accepted == before


def test_a_client_that_never_reads_does_not_stall_others(daemon: Daemon, raw: Raw) -> None:
    """Backpressure: 20k pipelined requests unread; others are served; nothing is dropped."""
    frames = b"".join(
        struct.pack(">I", len(body)) + body
        for body in (msgspec.msgpack.encode({"op": "health", "id": i}) for i in range(20_000))
    )
    raw.sock.settimeout(30)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    raw.sock.setblocking(False)
    sent = 0
    try:
        while sent < len(frames):
            sent += raw.sock.send(frames[sent:])
    except BlockingIOError:
        pass  # the daemon stopped reading us: backpressure reached the sender
    raw.sock.setblocking(True)
    still_serving(daemon)
    raw.send(frames[sent:])
    ids = [raw.reply()["id"] for _ in range(20_000)]
    assert ids == list(range(20_000))


def test_connection_limit() -> None:
    with running_daemon(SIDECAR_MAX_CONNECTIONS="2") as d:
        first, second = Raw(d.socket_path), Raw(d.socket_path)
        first.msg({"op": "health", "id": 1})
        second.msg({"op": "health", "id": 1})
        assert first.reply()["ok"] and second.reply()["ok"]
        third = Raw(d.socket_path)
        reply = third.reply()
        assert error_of(reply) == (None, "too_many_connections")
        assert third.closed_by_peer()
        first.close()
        second.msg({"op": "health", "id": 2})  # after this reply the daemon has seen the close
        assert second.reply()["ok"]
        fourth = Raw(d.socket_path)
        fourth.msg({"op": "health", "id": 3})
        assert fourth.reply()["ok"]
        for conn in (second, third, fourth):
            conn.close()


# -- issue 7, items 12, 13 and 15: ids, duplicate keys, payload depth, nil, protocol ------------


def nested_payload_request(request_id: int, depth: int, kind: str) -> bytes:
    """An enqueue whose payload nests `depth` arrays (or single-key maps) around nil."""
    level = b"\x91" if kind == "array" else b"\x81\xa1k"
    return (
        b"\x83\xa2op\xa7enqueue\xa2id"
        + msgspec.msgpack.encode(request_id)
        + b"\xa5items\x91\x82\xa8queue_id"
        + msgspec.msgpack.encode(f"deep-{kind}-{depth}")
        + b"\xa7payload"
        + level * depth
        + b"\xc0"
    )


@pytest.mark.parametrize("kind", ["array", "map"])
def test_payload_depth_limit_is_exact(daemon: Daemon, raw: Raw, kind: str) -> None:
    """256 levels are stored and handed back byte for byte; 257 are refused, naming the limit."""
    from sidecar.protocol import MAX_PAYLOAD_DEPTH

    raw.frame(nested_payload_request(1, MAX_PAYLOAD_DEPTH, kind))
    ok = raw.reply()
    assert ok["ok"] is True and ok["result"]["items"][0]["created"] is True, ok
    raw.frame(nested_payload_request(2, MAX_PAYLOAD_DEPTH + 1, kind))
    reply = raw.reply()
    assert error_of(reply) == (2, "invalid_message")
    assert f"more than {MAX_PAYLOAD_DEPTH} levels" in reply["error"]["message"]
    assert reply["error"]["details"] == {"index": 0, "max_payload_depth": MAX_PAYLOAD_DEPTH}
    raw.msg({"op": "status", "id": 3, "queue_id": f"deep-{kind}-{MAX_PAYLOAD_DEPTH + 1}"})
    assert error_of(raw.reply()) == (3, "not_found")  # a rejected enqueue stores nothing
    raw.msg({"op": "cancel", "id": 4, "queue_id": f"deep-{kind}-{MAX_PAYLOAD_DEPTH}"})
    assert raw.reply()["ok"] is True
    still_serving(daemon, raw)


def test_nil_payload_is_a_payload(daemon: Daemon, raw: Raw) -> None:
    with Client(daemon.socket_path) as c:
        queued = c.enqueue(None, queue_id="nil-payload", priority=0)
        assert queued.created
        [job] = c.dequeue(max_items=1)
        assert job.queue_id == "nil-payload" and bytes(job.payload) == b"\xc0"
        assert c.status("nil-payload").size_bytes == 1
        c.complete(job.queue_id, job.lease_id)


@pytest.mark.parametrize(
    "bad_key",
    [7, b"id", None, 1.5, True, [1, 2]],
    ids=["int-key", "bin-key", "nil-key", "float-key", "bool-key", "array-key"],
)
def test_id_is_echoed_despite_a_key_of_the_wrong_type(
    daemon: Daemon, raw: Raw, bad_key: object
) -> None:
    """Item 12: a map with an int id gets its id back, whatever other key is wrong."""
    body = (
        b"\x83"
        + msgspec.msgpack.encode("op")
        + msgspec.msgpack.encode("status")
        + msgspec.msgpack.encode("id")
        + msgspec.msgpack.encode(41)
        + msgspec.msgpack.encode(bad_key)
        + msgspec.msgpack.encode("x")
    )
    raw.frame(body)
    assert error_of(raw.reply()) == (41, "invalid_message")
    still_serving(daemon, raw)


def test_unknown_op_with_a_wrong_key_still_names_the_op(daemon: Daemon, raw: Raw) -> None:
    body = b"\x83\xa2op\xa7explode\xa2id\x2a" + msgspec.msgpack.encode(3) + b"\xa1x"
    raw.frame(body)
    reply = raw.reply()
    assert error_of(reply) == (42, "unknown_op")
    assert reply["error"]["details"] == {"op": "explode"}


def test_a_repeated_key_takes_its_last_value(daemon: Daemon, raw: Raw) -> None:
    """Item 13: duplicate keys are not refused; the last occurrence wins, as documented."""
    body = b"\x83\xa2op\xa5stats\xa2id\x01\xa2id\x02"
    raw.frame(body)
    reply = raw.reply()
    assert reply["ok"] is True and reply["id"] == 2
    body = b"\x84\xa2op\xa5stats\xa2id\x03\xa2op\xa5stats\xa2id\x04"
    raw.frame(body)
    reply = raw.reply()
    assert reply["ok"] is True and reply["id"] == 4 and "queued" in reply["result"]
    # `op` picks the request type, so a second, different `op` is refused, not obeyed.
    raw.frame(b"\x83\xa2op\xa6health\xa2id\x05\xa2op\xa5stats")
    reply = raw.reply()
    assert error_of(reply) == (5, "invalid_message")
    assert "$.op" in reply["error"]["message"]
    raw.frame(b"\x83\xa2op\xa6health\xa2id\x06\xa2op\xa7explode")
    assert error_of(raw.reply()) == (6, "unknown_op")


@pytest.mark.parametrize("number", [0, 2, 99, -1])
def test_hello_refuses_a_protocol_it_does_not_speak(daemon: Daemon, raw: Raw, number: int) -> None:
    """Item 15: an unknown protocol number is refused with the numbers the daemon speaks."""
    raw.msg({"op": "hello", "id": 5, "client": "future", "protocol": number})
    reply = raw.reply()
    assert error_of(reply) == (5, "unsupported_protocol")
    assert reply["error"]["details"] == {"protocol": number, "supported": [1]}
    raw.msg({"op": "hello", "id": 6, "protocol": 1})
    assert raw.reply()["result"]["protocol"] == 1
    still_serving(daemon, raw)


def test_fail_without_a_reason_records_unspecified(daemon: Daemon) -> None:
    """Item 10: protocol.md 8.6 says an empty reason is recorded as "unspecified"."""
    with Client(daemon.socket_path) as c:
        c.enqueue("r", queue_id="no-reason", priority=0, max_attempts=2)
        [job] = c.dequeue(max_items=1)
        assert c.fail(job.queue_id, job.lease_id).reason == "unspecified"
        [job] = c.dequeue(max_items=1)
        final = c.fail(job.queue_id, job.lease_id, reason="")
        assert (final.status, final.reason) == ("failed", "attempts_exhausted: unspecified")
