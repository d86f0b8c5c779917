"""systemd integration in the standard library: sd_notify, the watchdog, socket activation.

Everything here is silent outside systemd: without `NOTIFY_SOCKET` no message is sent, and
without `LISTEN_FDS`/`LISTEN_PID` for this process no socket is inherited.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

from sidecar.errors import StartupError

log = structlog.get_logger("sidecar.systemd")

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at fd 3
# How often STATUS= may change: systemctl status is read by people, not by a hot loop.
STATUS_INTERVAL_S = 1.0
# Bounds one status refresh, so a frozen Redis delays the next one, never the watchdog.
STATUS_REFRESH_TIMEOUT_S = 2.0
# EXTEND_TIMEOUT_USEC covers the drain deadline plus this, for closing files and sockets.
STOP_SLACK_S = 5.0


class ActivationError(StartupError):
    """LISTEN_FDS names sockets this daemon cannot serve."""


def inherited_socket(expected_path: str) -> socket.socket | None:
    """The socket systemd passed in, if any; warns when it is not at `expected_path`."""
    sock = listen_socket()
    if sock is not None and sock.getsockname() != expected_path:
        # Clients and `sidecar health` find the daemon through SIDECAR_SOCKET.
        log.warning("socket_path_mismatch", inherited=sock.getsockname(), socket=expected_path)
    return sock


def listen_socket(
    env: Mapping[str, str] | None = None, *, unset: bool = True
) -> socket.socket | None:
    """The listening Unix socket passed by systemd (sd_listen_fds), or None when not activated.

    The variables are removed from os.environ (as sd_listen_fds(1) does) so that no child
    process mistakes the sockets for its own.
    """
    source = os.environ if env is None else env
    pid, count = source.get("LISTEN_PID"), source.get("LISTEN_FDS")
    if unset and env is None:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid or not count:
        return None
    try:
        if int(pid) != os.getpid():
            return None  # meant for another process (a parent that exec'd us without updating it)
        n = int(count)
    except ValueError as exc:
        raise ActivationError(f"LISTEN_PID={pid!r} LISTEN_FDS={count!r} are not numbers") from exc
    if n != 1:
        raise ActivationError(f"LISTEN_FDS={n}: the daemon serves exactly one socket")
    fd = SD_LISTEN_FDS_START
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ActivationError(f"LISTEN_FDS=1 but fd {fd} is not open: {exc}") from exc
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"fd {fd} from LISTEN_FDS is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()  # not ours to close
        raise ActivationError(f"fd {fd} from LISTEN_FDS is not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"fd {fd} from LISTEN_FDS is not listening")
    os.set_inheritable(fd, False)
    return sock


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """WatchdogSec= in seconds when it is meant for this process (sd_watchdog_enabled)."""
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    try:
        if not usec or int(usec) <= 0:
            return None
        if pid and int(pid) != os.getpid():
            return None
        return int(usec) / 1_000_000
    except ValueError:
        return None


class Notifier:
    """Sends sd_notify datagrams to NOTIFY_SOCKET; does nothing when there is none."""

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        if address:
            # A leading '@' names an abstract socket (sd_notify(3)).
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for $NOTIFY_SOCKET (silent when it is unset)."""
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields in one datagram; False (logged once) if it could not go."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            # The manager being away must never stop the daemon; one warning is enough.
            if not self._warned:
                self._warned = True
                log.warning("notify_failed", error=str(exc), fields=list(fields))
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Supervisor:
    """The daemon's side of Type=notify: READY, STATUS, the WATCHDOG timer, STOPPING.

    The watchdog ping is a plain loop callback (one timer, nothing per request): a loop that
    is blocked cannot send it, which is the point of WatchdogSec=.
    """

    def __init__(
        self,
        notifier: Notifier,
        *,
        watchdog_s: float | None = None,
        status_interval_s: float = STATUS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.notifier = notifier
        self.watchdog_s = watchdog_s
        self.status_interval_s = status_interval_s
        self._clock = clock
        self._last_status: str | None = None
        self._last_status_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._status_task: asyncio.Task[None] | None = None
        self._stopping = False

    def ready(self, status: str) -> None:
        """The socket accepts and the store is chosen: READY=1 with the first status."""
        if not self.notifier.enabled:
            return
        self.notifier.send("READY=1", f"STATUS={status}")
        self._last_status, self._last_status_at = status, self._clock()
        if self.watchdog_s:
            self._ping()

    def start_status(self, source: Callable[[], Awaitable[str]]) -> None:
        """Keep STATUS= current from `source`, at most once per status interval."""
        if self.notifier.enabled:
            loop = asyncio.get_running_loop()
            self._status_task = loop.create_task(self._status_loop(source))

    def publish_status(self, status: str) -> bool:
        """Send STATUS= if it changed and the last one is old enough; True when sent."""
        now = self._clock()
        if status == self._last_status or self._stopping:
            return False
        if self._last_status_at is not None and now - self._last_status_at < self.status_interval_s:
            return False
        self._last_status, self._last_status_at = status, now
        return self.notifier.send(f"STATUS={status}")

    def stopping(self, deadline_s: float) -> None:
        """Draining starts: STOPPING=1, and extend the stop timeout over the whole deadline."""
        if not self.notifier.enabled:
            return
        self._stopping = True
        usec = int((deadline_s + STOP_SLACK_S) * 1_000_000)
        self.notifier.send("STOPPING=1", "STATUS=draining", f"EXTEND_TIMEOUT_USEC={usec}")

    def close(self) -> None:
        """Stop the timer and the status task (the process is about to exit)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._status_task is not None:
            self._status_task.cancel()
        self.notifier.close()

    def _ping(self) -> None:
        assert self.watchdog_s is not None
        self.notifier.send("WATCHDOG=1")
        # Half the interval, as sd_watchdog_enabled(3) advises: one late ping is not fatal.
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.watchdog_s / 2, self._ping)

    async def _status_loop(self, source: Callable[[], Awaitable[str]]) -> None:
        while True:
            await asyncio.sleep(self.status_interval_s)
            try:
                status = await asyncio.wait_for(source(), STATUS_REFRESH_TIMEOUT_S)
            except Exception as exc:  # a status that cannot be read must not end the loop
                status = f"status unavailable: {type(exc).__name__}"
            self.publish_status(status)


def install_debug_hooks(loop: asyncio.AbstractEventLoop, block_s: float) -> None:
    """Test-only: SIGUSR2 blocks the event loop for `block_s` seconds (the watchdog test)."""

    def block() -> None:
        log.warning("debug_loop_blocked", seconds=block_s)
        time.sleep(block_s)  # deliberately blocking: it stands for a stuck loop
        log.warning("debug_loop_unblocked", seconds=block_s)

    loop.add_signal_handler(signal.SIGUSR2, block)
