"""sd_notify, the watchdog and the second-signal exit, against the real daemon and in units."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sidecar.client import Client
from sidecar.protocol import Dequeue, encode_frame
from sidecar.systemd import (
    STOP_SLACK_S,
    ActivationError,
    Notifier,
    Supervisor,
    listen_socket,
    watchdog_interval_s,
)
from tests.support.daemon import Daemon, daemon_env, short_tmpdir

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

WAIT_S = 20.0  # the bound on every wait for a message or a log line


class NotifyListener:
    """A bound NOTIFY_SOCKET: what systemd's manager reads, with arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive_until(
        self, done: Callable[[list[dict[str, str]]], bool], timeout: float = WAIT_S
    ) -> list[dict[str, str]]:
        """Read datagrams until `done(all so far)` holds; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done(self.fields()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"notify messages so far: {self.fields()}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            pairs = (line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), dict(pairs)))
        return self.fields()

    def fields(self) -> list[dict[str, str]]:
        return [m for _, m in self.messages]

    def close(self) -> None:
        self.sock.close()


@contextmanager
def notified_daemon(**env: str) -> Iterator[tuple[Daemon, NotifyListener]]:
    with short_tmpdir() as tmp:
        listener = NotifyListener(tmp / "notify")
        sock = str(tmp / "s.sock")
        daemon = Daemon(sock, daemon_env(sock, NOTIFY_SOCKET=listener.path, **env))
        try:
            yield daemon.start(), listener
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop(signal.SIGKILL)
            listener.close()


def _has(key: str, value: str | None = None) -> Callable[[list[dict[str, str]]], bool]:
    return lambda msgs: any(key in m and (value is None or m[key] == value) for m in msgs)


def test_notify_ready_status_stopping_in_order() -> None:
    with notified_daemon(SIDECAR_DRAIN_TIMEOUT_SECONDS="7") as (daemon, listener):
        listener.receive_until(_has("READY"))
        ready = listener.fields()[0]
        # READY=1 comes first, with the status, and only once the socket answers.
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "ok: mode=local_only queued=0 processing=0"
        with Client(daemon.socket_path) as client:
            assert client.hello().mode == "local_only"
            client.enqueue({"prompt": "a"})
            client.enqueue({"prompt": "b"})
            client.dequeue(1)
        # STATUS follows the queue within a status interval or two.
        listener.receive_until(_has("STATUS", "ok: mode=local_only queued=1 processing=1"))
        assert daemon.stop() == 0
        listener.receive_until(_has("STOPPING"))
        msgs = listener.fields()
    stopping = [i for i, m in enumerate(msgs) if "STOPPING" in m]
    assert [i for i, m in enumerate(msgs) if "READY" in m] == [0]
    assert len(stopping) == 1 and stopping[0] == len(msgs) - 1  # nothing after STOPPING=1
    last = msgs[-1]
    assert last["STOPPING"] == "1"
    assert int(last["EXTEND_TIMEOUT_USEC"]) == int((7 + STOP_SLACK_S) * 1_000_000)
    assert not any("WATCHDOG" in m for m in msgs)  # no WatchdogSec, no pings


def pings(msgs: list[dict[str, str]]) -> int:
    return sum("WATCHDOG" in m for m in msgs)


def test_watchdog_pings_stop_while_the_loop_is_blocked() -> None:
    block_s = 2.0
    env = {
        "WATCHDOG_USEC": "200000",  # WatchdogSec=0.2: a ping every 0.1 s
        "SIDECAR_DEBUG_HOOKS": "1",
        "SIDECAR_DEBUG_BLOCK_SECONDS": str(block_s),
    }
    with notified_daemon(**env) as (daemon, listener):
        listener.receive_until(lambda msgs: pings(msgs) >= 3)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGUSR2)
        before = pings(listener.fields())
        # Pings resume once the loop is free again: three more after the block.
        listener.receive_until(lambda msgs: pings(msgs) >= before + 3 + int(block_s / 0.1))
        assert daemon.events("debug_loop_unblocked")
        times = [t for t, m in listener.messages if "WATCHDOG" in m]
        assert daemon.stop() == 0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # The blocked loop sent nothing for the whole block: ten times WatchdogSec, so systemd
    # would have restarted it. A timer thread would have kept pinging through it.
    assert max(gaps) >= block_s * 0.9, gaps


def test_second_signal_during_the_drain_exits_at_once() -> None:
    big = {"blob": "x" * 300_000}
    with notified_daemon(SIDECAR_DRAIN_TIMEOUT_SECONDS="120") as (daemon, listener):
        listener.receive_until(_has("READY"))
        with Client(daemon.socket_path) as client:
            for _ in range(4):
                client.enqueue(big, priority=0)
            client.enqueue({"small": 1}, priority=9)
            client.enqueue({"small": 2}, priority=9)
        # A client that never reads: the 1.2 MB reply fills the socket, and the second
        # dequeue leaves this connection's task waiting for room to write, so the drain waits.
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck.connect(daemon.socket_path)
        stuck.sendall(
            encode_frame(Dequeue(id=1, max_items=4))
            + encode_frame(Dequeue(id=2, max_items=1, wait_s=0.01))
        )
        assert daemon.proc is not None
        with Client(daemon.socket_path) as client:
            # The stuck connection's second dequeue has run once one small request is leased.
            deadline = time.monotonic() + WAIT_S
            while client.stats().processing < 5:
                assert time.monotonic() < deadline, "the stuck connection never dequeued"
        daemon.proc.send_signal(signal.SIGTERM)
        listener.receive_until(_has("STOPPING"))
        daemon.proc.send_signal(signal.SIGTERM)
        # A drain of 120 s cut short: the bound here is far below it.
        assert daemon.proc.wait(WAIT_S) == 1
        stuck.close()
        daemon.stop()
        forced = daemon.events("forced_exit")
    assert len(forced) == 1
    assert forced[0]["signal"] == "SIGTERM"
    # The stuck connection at least; the stats client's may not be gone yet.
    assert forced[0]["connections"] >= 1
    assert forced[0]["local_queued"] == 1
    assert forced[0]["local_processing"] == 5
    assert not daemon.events("stopped")


def test_first_signal_alone_drains_and_exits_zero() -> None:
    with notified_daemon() as (daemon, listener):
        listener.receive_until(_has("READY"))
        assert daemon.stop(signal.SIGINT) == 0
        assert daemon.events("stopped") and not daemon.events("forced_exit")


def test_a_signal_after_the_stop_finished_is_not_a_forced_exit() -> None:
    """Once everything is kept (`stopped`), a second signal has nothing left to cut short."""
    with notified_daemon() as (daemon, listener):
        listener.receive_until(_has("READY"))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_for_event("stopped", timeout=WAIT_S)
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(WAIT_S) == 0
        daemon.stop()
        assert not daemon.events("forced_exit")


# -- units ---------------------------------------------------------------------------------------


class RecordingNotifier(Notifier):
    """A notifier that keeps what it would send."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[tuple[str, ...]] = []

    @property
    def enabled(self) -> bool:
        return True

    def send(self, *fields: str) -> bool:
        self.sent.append(fields)
        return True


def test_status_changes_at_most_once_per_interval() -> None:
    now = [100.0]
    notifier = RecordingNotifier()
    sup = Supervisor(notifier, status_interval_s=1.0, clock=lambda: now[0])
    sup.ready("ok: queued=0")
    assert not sup.publish_status("ok: queued=1")  # 0 s after READY's status
    now[0] += 0.6
    assert not sup.publish_status("ok: queued=2")
    now[0] += 0.4
    assert sup.publish_status("ok: queued=2")
    now[0] += 5
    assert not sup.publish_status("ok: queued=2")  # unchanged: nothing to say
    assert notifier.sent == [("READY=1", "STATUS=ok: queued=0"), ("STATUS=ok: queued=2",)]


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.send("READY=1")
    sup = Supervisor(notifier, watchdog_s=0.1)
    sup.ready("ok")  # no NOTIFY_SOCKET: no timer is armed, nothing to close
    sup.stopping(5)
    assert not sup.publish_status("ok: other")
    sup.close()


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"sidecar-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send("READY=1", "STATUS=ok")
        server.settimeout(WAIT_S)
        assert server.recv(100) == b"READY=1\nSTATUS=ok"
        notifier.close()
    finally:
        server.close()


def test_notifier_with_no_listener_warns_once_and_carries_on(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody"))
    assert not notifier.send("READY=1")
    assert not notifier.send("WATCHDOG=1")
    notifier.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env) == expected


def test_listen_socket_ignores_another_process_variables() -> None:
    assert listen_socket({}) is None
    assert listen_socket({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) is None


@pytest.mark.parametrize(
    ("fds", "message"),
    [("2", "exactly one socket"), ("x", "not numbers")],
)
def test_listen_socket_refuses_what_it_cannot_serve(fds: str, message: str) -> None:
    with pytest.raises(ActivationError, match=message):
        listen_socket({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": fds})



def test_status_says_why_the_daemon_is_degraded() -> None:
    with short_tmpdir() as tmp:
        missing_redis = f"unix://{tmp}/no-redis.sock"  # nothing listens: local fallback
        with notified_daemon(REDIS_URL=missing_redis) as (daemon, listener):
            listener.receive_until(_has("READY"))
            status = listener.fields()[0]["STATUS"]
            assert daemon.stop() == 0
    assert status.startswith("degraded: mode=local_fallback queued=0 processing=0 (")
    assert "redis unavailable" in status
