"""Start a server under test as its own process and wait for the line that says it listens."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bench.echo_server import READY_LINE

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Lines of a server's output kept to explain a failure.
TAIL_LINES = 40

ReadyCheck = Callable[[str], bool]


class ServerError(RuntimeError):
    """A server under test did not start, or died."""


@dataclass
class ServerSpec:
    """How to start one server: its command, extra environment, and its ready line."""

    name: str
    argv: list[str]
    # A value of None removes the variable (e.g. REDIS_URL for the local mode).
    env: Mapping[str, str | None] = field(default_factory=dict)
    ready: ReadyCheck = lambda line: line.strip() == READY_LINE
    ready_stream: str = "stdout"


def daemon_spec(socket_path: str, env: Mapping[str, str | None]) -> ServerSpec:
    """The real daemon (`python -m sidecar serve`), JSON logs, ready at its `serving` event."""
    base: dict[str, str | None] = {
        "SIDECAR_SOCKET": socket_path,
        # A journal of its own beside the socket: never the user's ~/.local/state.
        "SIDECAR_STATE_DIR": str(Path(socket_path).with_suffix(".state")),
        "ENVIRONMENT": "production",
        "SIDECAR_LOG_LEVEL": "info",
    }
    base.update(env)
    return ServerSpec(
        name="sidecar",
        argv=[sys.executable, "-m", "sidecar", "serve"],
        env=base,
        ready=_is_serving_event,
        ready_stream="stderr",
    )


def echo_spec(socket_path: str) -> ServerSpec:
    """The echo server with the daemon's framing."""
    return ServerSpec(name="echo", argv=[sys.executable, "-m", "bench.echo_server", socket_path])


def relay_spec(socket_path: str, redis_path: str, store: bool = False) -> ServerSpec:
    """The relay (bench/relay.py): the daemon's framing, and one command on Redis per request:
    a no-op script (the hop), or with store the daemon's functions (the hop and Redis's work)."""
    argv = [sys.executable, "-m", "bench.relay", socket_path, redis_path]
    return ServerSpec(name="relay", argv=argv + ["--store"] * store)


def _is_serving_event(line: str) -> bool:
    try:
        event = json.loads(line)
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("event") == "serving"


def _environment(overrides: Mapping[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _pump(stream: IO[str], name: str, lines: queue.Queue[tuple[str, str]]) -> None:
    """Read a pipe to its end so the server never blocks on a full pipe."""
    for line in stream:
        lines.put((name, line))
    lines.put((name, ""))


@contextlib.contextmanager
def running(spec: ServerSpec) -> Iterator[subprocess.Popen[str]]:
    """Run the server for the duration of the block; SIGTERM it (then SIGKILL) on the way out."""
    proc = subprocess.Popen(
        spec.argv,
        cwd=REPO_ROOT,
        env=_environment(spec.env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[tuple[str, str]] = queue.Queue()
    pumps = [
        threading.Thread(target=_pump, args=(stream, name, lines), daemon=True)
        for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))
        if stream is not None
    ]
    for pump in pumps:
        pump.start()
    try:
        _wait_ready(spec, proc, lines)
        yield proc
    finally:
        _stop(proc)
        for pump in pumps:
            pump.join(timeout=STOP_TIMEOUT_S)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:  # read to its end by its pump: nothing is lost
                stream.close()


def _wait_ready(
    spec: ServerSpec, proc: subprocess.Popen[str], lines: queue.Queue[tuple[str, str]]
) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    deadline = time.monotonic() + READY_TIMEOUT_S
    ended: set[str] = set()
    while len(ended) < 2:
        try:
            stream, line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not line:
            ended.add(stream)
            continue
        tail.append(line.rstrip("\n"))
        if stream == spec.ready_stream and spec.ready(line):
            return
    proc.poll()
    why = f"exited with {proc.returncode}" if proc.returncode is not None else "timed out"
    output = "\n".join(tail)
    raise ServerError(f"{spec.name} did not become ready ({why}); its output:\n{output}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
