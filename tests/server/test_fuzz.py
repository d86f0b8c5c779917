"""A seeded fuzz of the real daemon through its real socket, in local mode and in Redis mode.

Each run sends FUZZ_FRAMES frames (default 20,000 per mode) built from FUZZ_SEED: random bytes,
random MessagePack, every op with wrong, extreme and non-finite values, payloads nested near
and past the limit, requests that name real queue and lease ids, and (on their own
connections) truncated frames and oversize headers. It asserts that every frame gets its reply
in order, that no reply is `internal_error`, that the daemon logs no traceback and no
`op_failed`, that the books balance, and that a normal client is served afterwards.

A longer campaign (any seed reproduces its run exactly):

    FUZZ_FRAMES=1000000 FUZZ_SEED=$RANDOM .venv/bin/python -m pytest -q -s tests/server/test_fuzz.py
"""

from __future__ import annotations

import os
import random
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from sidecar.client import Client
from sidecar.protocol import MAX_PAYLOAD_DEPTH, OPS
from tests.server.test_bad_input import Raw
from tests.support.daemon import Daemon, running_daemon
from tests.support.redis_server import RedisServer

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

FRAMES = int(os.environ.get("FUZZ_FRAMES", "20000"))
SEED = int(os.environ.get("FUZZ_SEED", "20261128"))
MAX_FRAME = 65536
BATCH = 50  # frames written per write; below the daemon's 1,024 unanswered requests
LIMITS = {
    "SIDECAR_MAX_FRAME_BYTES": str(MAX_FRAME),
    "SIDECAR_MAX_PAYLOAD_BYTES": "4096",
    "SIDECAR_MAX_BATCH": "10",
    # Long polls would only make the run slower: the fuzz is about values, not waiting.
    "SIDECAR_MAX_WAIT_SECONDS": "0",
    "QUEUE_MAX_SIZE": "500",
}

# Values chosen to break things: extremes of every MessagePack type, non-finite floats, the
# edges of each documented range, and types that are wrong everywhere.
EXTREMES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    9,
    10,
    255,
    256,
    1000,
    1001,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    0.0,
    -0.0,
    1e-300,
    5e-324,
    1e16,
    1e308,
    -1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    2592000.0,
    2592000.1,
    86400.0,
    86400.5,
    "",
    " ",
    "a" * 129,
    "x" * 2000,
    "\u0000",
    "é" * 40,
    "job-1",
    b"",
    b"\xff" * 10,
    [],
    {},
    [1, 2, 3],
    {"k": "v"},
    {1: 2},
    msgspec.msgpack.Ext(5, b"ext"),
]
FIELDS: dict[str, list[str]] = {
    "hello": ["client", "protocol"],
    "enqueue": ["items"],
    "dequeue": ["max_items", "lease_s", "wait_s"],
    "extend": ["queue_id", "lease_id", "lease_s"],
    "complete": ["queue_id", "lease_id"],
    "fail": ["queue_id", "lease_id", "reason", "retry"],
    "cancel": ["queue_id"],
    "status": ["queue_id"],
    "stats": [],
    "health": [],
    "complete_next": ["queue_id", "lease_id", "max_items", "lease_s"],
    "complete_many": ["items", "max_items", "lease_s", "info"],
}
ITEM_FIELDS = ["payload", "priority", "ttl_s", "queue_id", "max_attempts"]


class Fuzzer:
    """Builds frames from one seeded generator; remembers ids the daemon handed out."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.queue_ids: list[str] = ["job-1"]
        self.leases: list[tuple[str, str]] = [("job-1", "0123456789abcdef")]
        self.next_id = 0
        # Set when the frame being built nests too deeply to be read at all (its id then too).
        self.unreadable = False

    def value(self, depth: int = 0) -> Any:
        """A random MessagePack value, sometimes nested."""
        r = self.rng
        roll = r.random()
        if roll < 0.5 or depth > 4:
            return r.choice(EXTREMES)
        if roll < 0.65:
            return r.randint(-(2**63), 2**64 - 1)
        if roll < 0.75:
            return r.uniform(-1e6, 1e6)
        if roll < 0.85:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        if roll < 0.95:
            return {r.choice(["op", "id", "items", "k", ""]): self.value(depth + 1)}
        return bytes(r.getrandbits(8) for _ in range(r.randint(0, 40)))

    def nested(self) -> msgspec.Raw:
        """A payload nested right around the documented depth limit (or far past it)."""
        depth = self.rng.choice(
            [MAX_PAYLOAD_DEPTH - 1, MAX_PAYLOAD_DEPTH, MAX_PAYLOAD_DEPTH + 1, 3000]
        )
        level = self.rng.choice([b"\x91", b"\x81\xa1k"])
        self.unreadable |= depth > 900
        return msgspec.Raw(level * depth + b"\xc0")

    def good(self) -> dict[str, Callable[[], Any]]:
        """A plausible value for each field of op, sometimes a real queue or lease id."""
        r = self.rng
        qid, lease = r.choice(self.leases)
        values: dict[str, Callable[[], Any]] = {
            "client": lambda: "fuzz",
            "protocol": lambda: r.choice([1, 1, 1, 2]),
            "items": lambda: [self.item() for _ in range(r.randint(1, 12))],
            "max_items": lambda: r.randint(1, 20),
            "lease_s": lambda: r.choice([0.5, 30.0, 86400.0]),
            "wait_s": lambda: r.choice([0.0, 0.01]),
            "queue_id": lambda: qid if r.random() < 0.7 else r.choice(self.queue_ids),
            "lease_id": lambda: lease,
            "reason": lambda: r.choice(["", "provider 503", "x" * 1024]),
            "retry": lambda: r.random() < 0.5,
            "info": lambda: r.random() < 0.5,
            # complete_many's items: leases the daemon handed out, and some it never did.
            "settles": lambda: [
                dict(zip(("queue_id", "lease_id"), r.choice(self.leases), strict=True))
                for _ in range(r.randint(1, 12))
            ],
        }
        return values

    def item(self) -> dict[str, Any]:
        r = self.rng
        item: dict[str, Any] = {"payload": {"prompt": "hi", "n": r.randint(0, 9)}}
        if r.random() < 0.5:
            item["priority"] = r.randint(0, 9)
        if r.random() < 0.3:
            item["ttl_s"] = r.choice([0.001, 60.0, 2592000.0])
        if r.random() < 0.5:
            item["queue_id"] = f"fz-{r.randint(0, 300)}"
        if r.random() < 0.2:
            item["max_attempts"] = r.randint(1, 3)
        if r.random() < 0.05:
            item["payload"] = self.nested()
        # Often enough that even the failover run (half the frames, many of them refused for
        # other reasons first) meets payload_too_large: at 5% it met it 1-6 times, sometimes 0.
        if r.random() < 0.2:
            item["payload"] = "p" * r.choice([4090, 5000])
        for field in ITEM_FIELDS:
            if r.random() < 0.08:
                item[field] = self.value()
        if r.random() < 0.03:
            item.pop("payload")
        return item

    def request(self) -> tuple[bytes, int | None]:
        """One frame body, and the id its reply must echo (None when it need not)."""
        r = self.rng
        self.next_id += 1
        self.unreadable = False
        roll = r.random()
        if roll < 0.04:
            return bytes(r.getrandbits(8) for _ in range(r.randint(0, 64))), None
        if roll < 0.08:
            return msgspec.msgpack.encode(self.value()), None
        op = r.choice(sorted(OPS)) if r.random() < 0.97 else r.choice(["", "nope", "HELLO"])
        msg: dict[str, Any] = {"op": op, "id": self.next_id}
        good = self.good()
        for field in FIELDS.get(op, []):
            if r.random() < 0.7:
                maker = "settles" if (op, field) == ("complete_many", "items") else field
                msg[field] = good[maker]()
            if r.random() < 0.1:
                msg[field] = self.value()
        if r.random() < 0.05:
            msg[r.choice(["extra", "op", "id"])] = self.value()
        if r.random() < 0.03:
            msg.pop("id")
        body = msgspec.msgpack.encode(msg)
        readable = not self.unreadable and msg["op"] == op
        echo = msg["id"] if readable and type(msg.get("id")) is int else None
        return body, echo

    def learn(self, reply: dict[str, Any]) -> None:
        """Keep queue and lease ids from replies, so later requests hit real requests."""
        result = reply.get("result")
        if not isinstance(result, dict):
            return
        items = result.get("items")
        for job in items if isinstance(items, list) else []:
            if "lease_id" in job:
                self.leases.append((job["queue_id"], job["lease_id"]))
            elif "queue_id" in job:
                self.queue_ids.append(job["queue_id"])
        del self.leases[:-200], self.queue_ids[:-200]


def framing_abuse(daemon: Daemon, rng: random.Random) -> str:
    """A truncated frame or an oversize header on its own connection: answered, then closed."""
    conn = Raw(daemon.socket_path)
    try:
        if rng.random() < 0.5:
            size = rng.choice([MAX_FRAME + 1, 2**31, 2**32 - 1])
            conn.send(struct.pack(">I", size) + bytes(rng.getrandbits(8) for _ in range(8)))
            expected = "frame_too_large"
        else:
            declared = rng.randint(1, 100)
            conn.send(
                (struct.pack(">I", declared) + b"\x82" * declared)[: rng.randint(1, declared + 3)]
            )
            conn.sock.shutdown(socket.SHUT_WR)
            expected = "bad_frame"
        reply = conn.reply()
        assert (reply["id"], reply["error"]["code"]) == (None, expected), reply
        assert conn.closed_by_peer()
    finally:
        conn.close()
    return expected


def run_fuzz(
    daemon: Daemon, seed: int, frames: int, at_batch: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Send `frames` frames; return a count of reply codes. Asserts as it goes.

    at_batch(sent) runs before each batch: the failover run kills and restarts Redis there.
    """
    fuzz = Fuzzer(seed)
    codes: dict[str, int] = {}
    conn = Raw(daemon.socket_path)
    conn.sock.settimeout(30)
    sent = 0
    try:
        while sent < frames:
            if at_batch is not None:
                at_batch(sent)
            if fuzz.rng.random() < 0.15:  # per batch: about 3 in 1,000 frames
                code = framing_abuse(daemon, fuzz.rng)
                codes[code] = codes.get(code, 0) + 1
                sent += 1
                continue
            batch = [fuzz.request() for _ in range(min(BATCH, frames - sent))]
            conn.send(b"".join(struct.pack(">I", len(body)) + body for body, _ in batch))
            for body, echo in batch:
                reply = conn.reply()
                code = "ok" if reply["ok"] else reply["error"]["code"]
                codes[code] = codes.get(code, 0) + 1
                context = f"seed {seed}, frame {sent}: {body[:200].hex()} -> {reply}"
                assert code != "internal_error", context
                if echo is not None:
                    assert reply["id"] == echo, context
                fuzz.learn(reply)
                sent += 1
    finally:
        conn.close()
    return codes


def check_after_fuzz(daemon: Daemon, codes: dict[str, int], frames: int) -> None:
    """The run reached deep into the ops; the daemon lives, logged nothing bad, still serves."""
    assert sum(codes.values()) == frames
    assert codes["ok"] > frames // 10, codes
    expected = ("invalid_message", "unknown_op", "not_found", "unsupported_protocol", "bad_frame")
    for code in (*expected, "frame_too_large", "payload_too_large", "lease_mismatch"):
        assert codes.get(code, 0) > 0, codes
    assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
    with Client(daemon.socket_path) as c:
        queued = c.enqueue({"after": "fuzz"}, queue_id="after-fuzz", priority=0)
        assert c.status(queued.queue_id).status == "queued"
        stats = c.stats()
        assert stats.balanced, stats
        assert c.health().status in ("ok", "degraded")
    # Everything the daemon wrote so far: no traceback, no op that failed inside.
    assert not [line for line in daemon.stderr_lines if "Traceback" in line]
    assert daemon.events("op_failed") == []


@pytest.fixture(params=["local", "redis"])
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    if request.param == "local":
        with running_daemon(**LIMITS) as d:
            yield d
    else:
        with RedisServer() as server, running_daemon(REDIS_URL=server.url, **LIMITS) as d:
            yield d


# A campaign longer than the CI run has no time limit (0); the CI run a generous one.
@pytest.mark.timeout(300 if FRAMES <= 20_000 else 0)
def test_fuzz_through_the_socket(daemon: Daemon) -> None:
    codes = run_fuzz(daemon, SEED, FRAMES)
    check_after_fuzz(daemon, codes, FRAMES)
    print(f"fuzz seed={SEED} frames={FRAMES} replies={codes}")


@pytest.mark.timeout(300 if FRAMES <= 20_000 else 0)
def test_fuzz_while_redis_dies_and_comes_back() -> None:
    """Hostile input across a failover: Redis is killed a third in, restarted two thirds in."""
    frames = FRAMES // 2
    with (
        RedisServer(appendonly=True) as server,
        running_daemon(REDIS_URL=server.url, REDIS_TIMEOUT_SECONDS="0.3", **LIMITS) as daemon,
    ):

        def fault(sent: int) -> None:
            if sent >= frames // 3 and server.running and sent < 2 * frames // 3:
                server.kill()
            elif sent >= 2 * frames // 3 and not server.running:
                server.start()

        codes = run_fuzz(daemon, SEED + 1, frames, at_batch=fault)
        check_after_fuzz(daemon, codes, frames)
        assert daemon.events("redis_down"), "no failover"
        # The probe needs two writes in a row and backs off after flaps: wait for it, bounded.
        daemon.wait_for_event("redis_recovered", timeout=30.0)
        print(f"fuzz (failover) seed={SEED + 1} frames={frames} replies={codes}")
