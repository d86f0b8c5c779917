"""Run the real daemon as a subprocess on a real socket, for integration tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.procs import default_signals_then

READY_TIMEOUT_S = 15.0


class Daemon:
    """A `python -m sidecar serve` process; `logs` collects its JSON log events."""

    def __init__(
        self, socket_path: str, env: dict[str, str], preexec: Callable[[], None] | None = None
    ) -> None:
        self.socket_path = socket_path
        self.env = env
        self.preexec = preexec  # runs in the child before exec (a resource limit, say)
        self.logs: list[dict[str, Any]] = []
        self.stderr_lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._logged = threading.Condition()
        self._reader: threading.Thread | None = None

    def start(self) -> Daemon:
        self._ready.clear()
        self.proc = subprocess.Popen(
            [*self.launcher, sys.executable, "-m", "sidecar", "serve"],
            env=self.env,
            pass_fds=self.pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # SIGINT/SIGTERM at their defaults whatever the suite inherited (tests/support/
            # procs.py), then the hook, which only calls setrlimit: nothing that could deadlock
            # on a lock a thread held.
            preexec_fn=default_signals_then(self.preexec),  # noqa: PLW1509
        )
        self._reader = threading.Thread(target=self._read_stderr, args=(self.proc,), daemon=True)
        self._reader.start()
        # The daemon logs `serving` once its socket accepts; waiting on that line, not polling.
        if not self._ready.wait(READY_TIMEOUT_S) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("daemon did not start:\n" + "\n".join(self.stderr_lines))
        return self

    def _read_stderr(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._logged:
                self.logs.append(event)
                self._logged.notify_all()
            if event.get("event") == "serving":
                self._ready.set()
        self._ready.set()  # exited: wake the starter, which then sees poll() is not None

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("event") == name]

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 30.0) -> None:
        """Block until the daemon has logged `name` at least `count` times (in all its runs)."""
        with self._logged:
            if not self._logged.wait_for(lambda: len(self.events(name)) >= count, timeout):
                raise AssertionError(f"no {count}x {name} within {timeout} s: {self.logs[-5:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the daemon and wait for it; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return code

    # A command run in front of the daemon (tests/activate.py, strace), and the fds it inherits;
    # set them on an instance before start().
    launcher: tuple[str, ...] = ()
    pass_fds: tuple[int, ...] = ()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def serve_expecting_refusal(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `sidecar serve` that must refuse to start; its exit code and stderr, no hanging."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def daemon_env(socket_path: str, **overrides: str) -> dict[str, str]:
    """A clean environment for a daemon: JSON logs, the socket, no inherited Redis.

    Its journal lives beside the socket, so each test's daemon has its own state folder and
    a restart of the same Daemon finds what the last run kept.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QUEUE_", "REDIS_", "SIDECAR_STATE", "SIDECAR_JOURNAL"))
    }
    env.update(
        {
            "SIDECAR_STATE_DIR": str(Path(socket_path).with_suffix(".state")),
            "SIDECAR_SOCKET": socket_path,
            "ENVIRONMENT": "production",
            "SIDECAR_LOG_LEVEL": "info",
        }
    )
    env.update(overrides)
    return env


@contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A temporary folder with a short path, so socket paths fit sun_path (~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_daemon(**env: str) -> Iterator[Daemon]:
    """Start the real daemon on a fresh socket; stop it (SIGTERM) when the block ends."""
    with short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        daemon = Daemon(sock, daemon_env(sock, **env)).start()
        try:
            yield daemon
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
