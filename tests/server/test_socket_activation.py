"""Socket activation: the daemon serves a socket passed as fd 3, and a restart refuses no client.

The test plays systemd's part: it owns the listening socket, starts each daemon on it through
tests/activate.py (fd 3, LISTEN_FDS=1, LISTEN_PID = the daemon's pid), and keeps it open
between the two daemons, as sidecar.socket does across `systemctl restart sidecar`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sidecar.client import Client
from sidecar.protocol import Hello, encode_frame
from tests.support.daemon import Daemon, daemon_env, short_tmpdir

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

ACTIVATE = str(Path(__file__).resolve().parents[1] / "activate.py")
HANG_S = 20.0  # a reply later than this counts as a hang
WAIT_S = 30.0
SERVE = [sys.executable, "-m", "sidecar", "serve"]
OLD_BATCH, NEW_BATCH = 1000, 999  # hello's limits tell which daemon answered


@contextmanager
def listening_socket(path: Path) -> Iterator[socket.socket]:
    """What sidecar.socket holds: a bound, listening Unix socket with mode 0660."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o660)
        sock.listen(1024)
        yield sock
    finally:
        sock.close()


def activated(sock: socket.socket, path: Path, **env: str) -> Daemon:
    daemon = Daemon(str(path), daemon_env(str(path), **env))
    daemon.launcher = (sys.executable, ACTIVATE, str(sock.fileno()))
    daemon.pass_fds = (sock.fileno(),)
    return daemon


@dataclass
class Outcome:
    started: float  # wall clock before connect(), comparable with the daemon's log times
    result: str  # "old" | "new" | "shutting_down" | "refused" | "eof" | "reset" | "hung" | ...


async def call_hello(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request_id: int
) -> str:
    """One hello on an open connection: which daemon answered, or how it failed."""
    try:
        writer.write(encode_frame(Hello(id=request_id)))
        (size,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), HANG_S))
        body = await asyncio.wait_for(reader.readexactly(size), HANG_S)
    except TimeoutError:
        return "hung"
    except asyncio.IncompleteReadError:
        return "eof"  # a clean end of stream: the daemon never read this call
    except ConnectionError:
        return "reset"
    reply: dict[str, Any] = msgspec.msgpack.decode(body)
    if not reply["ok"]:
        return str(reply["error"]["code"])
    batch = reply["result"]["limits"]["max_batch"]
    return {OLD_BATCH: "old", NEW_BATCH: "new"}.get(batch, f"batch {batch}")


async def new_connection(path: str) -> Outcome:
    """Connect, say hello once, close."""
    started = time.time()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), HANG_S)
    except (ConnectionRefusedError, FileNotFoundError):
        return Outcome(started, "refused")
    except TimeoutError:
        return Outcome(started, "hung")
    try:
        return Outcome(started, await call_hello(reader, writer, 1))
    finally:
        writer.close()


async def old_connection(path: str, stop: asyncio.Event) -> list[str]:
    """A client that keeps one connection and calls in a loop until the daemon ends it."""
    reader, writer = await asyncio.open_unix_connection(path)
    results: list[str] = []
    try:
        for request_id in range(1, 1_000_000):
            results.append(await call_hello(reader, writer, request_id))
            if results[-1] != "old" or stop.is_set():
                break
    finally:
        writer.close()
    return results


def log_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(180)
async def test_restart_refuses_no_client() -> None:
    with short_tmpdir() as tmp:
        path = tmp / "s.sock"
        with listening_socket(path) as listener:
            old = activated(listener, path, SIDECAR_MAX_BATCH=str(OLD_BATCH))
            new = activated(listener, path, SIDECAR_MAX_BATCH=str(NEW_BATCH))
            await asyncio.to_thread(old.start)
            assert old.events("serving")[0]["socket_activated"] is True
            stop = asyncio.Event()
            olds = [asyncio.create_task(old_connection(str(path), stop)) for _ in range(4)]
            probes: list[asyncio.Task[Outcome]] = []

            async def connect_until_stopped() -> None:
                while not stop.is_set():
                    probes.append(asyncio.create_task(new_connection(str(path))))
                    await asyncio.sleep(0.01)  # pacing the clients, not waiting for a result

            async def answered_by(who: str, count: int) -> None:
                deadline = time.monotonic() + WAIT_S
                while sum(p.done() and p.result().result == who for p in probes) < count:
                    assert time.monotonic() < deadline, f"fewer than {count} answered by {who}"
                    await asyncio.sleep(0.05)

            connector = asyncio.create_task(connect_until_stopped())
            await answered_by("old", 20)
            t_term = time.time()
            assert await asyncio.to_thread(old.stop) == 0
            # The path stays: the listening socket belongs to "systemd", not to the daemon.
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            await asyncio.to_thread(new.start)
            t_ready = time.time()
            await answered_by("new", 20)
            stop.set()
            await connector
            outcomes = await asyncio.gather(*probes)
            old_calls = await asyncio.gather(*olds)
            assert new.stop() == 0
    t_drain = log_time(old.events("draining")[0])
    every = Counter(o.result for o in outcomes)
    during = [o for o in outcomes if t_term <= o.started <= t_ready]
    after_drain = Counter(o.result for o in during if o.started > t_drain)
    counts = Counter(o.result for o in during)
    print(f"\nrestart: {len(during)} connections made during it: {dict(counts)}")
    print(f"after the old daemon stopped accepting: {dict(after_drain)}; all: {dict(every)}")
    print(f"calls on old connections: {dict(Counter(c for calls in old_calls for c in calls))}")
    before_drain = Counter(o.result for o in outcomes if o.started <= t_drain)
    # Connections made before the old daemon stopped accepting are the old daemon's: each
    # answered, or (if it drained before reading the call) refused with shutting_down at
    # connect or ended cleanly; never reset, refused by the kernel or left hanging. Every one
    # made after it is the new daemon's.
    assert set(before_drain) <= {"old", "shutting_down", "eof", "new"}, before_drain
    assert set(every) <= {"old", "shutting_down", "eof", "new"}, every
    assert sum(after_drain.values()) >= 1, "no connection was made while no daemon accepted"
    assert set(after_drain) == {"new"}, after_drain
    # Calls on the old daemon's connections: each answered but the last, which may meet the
    # drain's clean end of stream (never processed: the client sends it to the next daemon).
    for calls in old_calls:
        assert calls[:-1] == ["old"] * (len(calls) - 1), calls
        assert calls[-1] in ("old", "eof"), calls


def test_an_inherited_socket_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    with short_tmpdir() as tmp, open(tmp_path / "plain", "wb") as plain:
        sock = str(tmp / "s.sock")
        proc = subprocess.run(
            [sys.executable, ACTIVATE, str(plain.fileno()), *SERVE],
            env=daemon_env(sock),
            pass_fds=(plain.fileno(),),
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
    assert proc.returncode == 1
    assert "cannot start: fd 3 from LISTEN_FDS is not a socket" in proc.stderr


def test_an_inherited_socket_that_does_not_listen_is_refused() -> None:
    with short_tmpdir() as tmp:
        unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.run(
                [sys.executable, ACTIVATE, str(unbound.fileno()), *SERVE],
                env=daemon_env(str(tmp / "s.sock")),
                pass_fds=(unbound.fileno(),),
                capture_output=True,
                text=True,
                timeout=WAIT_S,
                check=False,
            )
        finally:
            unbound.close()
    assert proc.returncode == 1
    assert "fd 3 from LISTEN_FDS is not listening" in proc.stderr


def test_an_inherited_socket_elsewhere_than_sidecar_socket_is_served_with_a_warning() -> None:
    with short_tmpdir() as tmp:
        path = tmp / "held.sock"
        with listening_socket(path) as listener:
            daemon = activated(listener, tmp / "configured.sock")
            daemon.socket_path = str(path)
            daemon.start()
            try:
                with Client(str(path)) as client:
                    assert client.hello().server == "sidecar"
            finally:
                assert daemon.stop() == 0
    (warning,) = daemon.events("socket_path_mismatch")
    assert warning["inherited"] == str(path)
    assert warning["socket"] == str(tmp / "configured.sock")
