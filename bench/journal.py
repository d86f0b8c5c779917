"""The journal's cost and its replay: the local store with fsync `always` beside `off`, and the
time a restart takes to rebuild a backlog of 100k queued requests.

The ratio rows run in bench/run.py as the `journal` mode (two daemons in one run, alternating
slices, so the ratio compares the same seconds of the machine). The replay table fills one
daemon with requests, kills it (SIGKILL: the restart replays every record of the segment, the
slow case) and, once more, stops it cleanly (the restart reads one snapshot), and reports the
`seconds` the daemon logs in `journal_replayed` and the wall time from launch to `serving`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec

from bench.servers import REPO_ROOT, daemon_spec
from bench.tables import markdown_table, note
from sidecar.client import Client
from sidecar.protocol import EnqueueItem

REPLAY_SIZES = (100_000,)
QUICK_REPLAY_SIZES = (5_000,)
FILL_BATCH = 1000
PAYLOAD = {"prompt": "p" * 180}  # about 200 bytes, like the growth table's backlog
START_TIMEOUT_S = 300.0
ROOM: dict[str, str | None] = {
    "QUEUE_MAX_SIZE": "10000000",
    "QUEUE_MAX_MEMORY_MB": "8192",
    "REDIS_URL": None,
}


def quick_replay(args: object) -> None:
    args.replay_sizes = QUICK_REPLAY_SIZES  # type: ignore[attr-defined]


class _Daemon:
    """One daemon process whose JSON log lines are read until `serving`."""

    def __init__(self, socket_path: str, env: Mapping[str, str | None]) -> None:
        spec = daemon_spec(socket_path, env)
        self.env = dict(os.environ)
        for name, value in spec.env.items():
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            spec.argv,
            cwd=REPO_ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: dict[str, dict[str, object]] = {}
        assert self.proc.stderr is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events[str(event.get("event"))] = event
            if event.get("event") == "serving":
                self.ready_s = time.perf_counter() - self.started
                return
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError(f"daemon did not start: {self.events}")

    def stop(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(60)
        if self.proc.stderr is not None:
            self.proc.stderr.read()
            self.proc.stderr.close()


def _fill(path: str, n: int) -> None:
    with Client(path, timeout_s=60.0) as client:
        for start in range(0, n, FILL_BATCH):
            count = min(FILL_BATCH, n - start)
            client.enqueue_many([_item() for _ in range(count)])


def _item() -> EnqueueItem:
    return EnqueueItem(payload=msgspec.Raw(msgspec.msgpack.encode(PAYLOAD)))


def _journal_mb(folder: Path) -> float:
    state = folder / "sidecar.state"
    return sum(p.stat().st_size for p in state.iterdir() if p.is_file()) / 1e6


def run_replay(args: object) -> str:
    """The replay table: one row per backlog size and way of stopping."""
    sizes = getattr(args, "replay_sizes", REPLAY_SIZES)
    body = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="sc-replay-") as tmp:
            folder = Path(tmp)
            sock = str(folder / "sidecar.sock")
            note(f"replay: filling {n:,} requests")
            daemon = _Daemon(sock, ROOM)
            _fill(sock, n)
            for how, sig in (
                ("SIGKILL: segment", signal.SIGKILL),
                ("SIGTERM: snapshot", signal.SIGTERM),
            ):
                daemon.stop(sig)
                size = _journal_mb(folder)
                daemon = _Daemon(sock, ROOM)
                replayed = daemon.events["journal_replayed"]
                body.append(
                    (
                        f"{n:,}",
                        how,
                        f"{size:.1f}",
                        f"{replayed['records']:,}",
                        f"{replayed['seconds']:.2f}",
                        f"{daemon.ready_s:.2f}",
                    )
                )
            daemon.stop(signal.SIGTERM)
    head = ("queued", "stopped by", "journal MB", "records read", "replay s", "start to serving s")
    return markdown_table(head, body)


if __name__ == "__main__":  # pragma: no cover - run through bench.run
    print(run_replay(object()))
    sys.exit(0)
