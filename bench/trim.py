"""The daemon's RSS before a burst, at the local store's limit, and after the drain (issue 24).

`.venv/bin/python -m bench.trim [--max-mb N]`: the real daemon in local-only mode, filled with
~1.2 KB chat-completion requests until it answers `queue_full`, then drained with
dequeue + complete_many. RSS (VmRSS of /proc/<pid>/status) is read when idle, at the limit, as
the last complete returns, and once the daemon logs `memory_trimmed` (the store's malloc_trim,
sidecar/queue/local/trim.py), waited for on its log, at most TRIM_WAIT_S. Prints one Markdown
table on stdout; Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from bench.payload import llm_request
from bench.servers import REPO_ROOT, daemon_spec
from bench.tables import markdown_table, note
from sidecar.client import Client
from sidecar.errors import QueueFull
from sidecar.protocol import EnqueueItem

BATCH = 500
START_TIMEOUT_S = 60.0
TRIM_WAIT_S = 30.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")  # pragma: no cover - Linux always has it


def _events(proc: subprocess.Popen[str], out: queue.Queue[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        try:
            out.put(str(json.loads(line).get("event")))
        except ValueError:
            continue


def _wait_for(events: queue.Queue[str], name: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            if events.get(timeout=left) == name:
                return True
        except queue.Empty:
            break
    return False


def _fill(client: Client) -> int:
    payload = msgspec.Raw(msgspec.msgpack.encode(llm_request()))
    held = 0
    while True:
        try:
            client.enqueue_many([EnqueueItem(payload=payload) for _ in range(BATCH)])
        except QueueFull:
            return held
        held += BATCH


def _drain(client: Client) -> None:
    while jobs := client.dequeue(1000):
        client.complete_many([(j.queue_id, j.lease_id) for j in jobs], info=False)


def run(max_mb: float, retention_hours: float | None = None) -> str:
    with tempfile.TemporaryDirectory(prefix="sidecar-trim-") as folder:
        socket_path = str(Path(folder) / "sidecar.sock")
        env = {
            "REDIS_URL": None,
            "QUEUE_MAX_MEMORY_MB": str(max_mb),
            "QUEUE_MAX_SIZE": "10000000",
            "QUEUE_HIGH_WATERMARK": "0.99",
            "QUEUE_LOW_WATERMARK": "0.9",
        }
        if retention_hours is not None:
            env["QUEUE_RETENTION_HOURS"] = f"{retention_hours:g}"
        spec = daemon_spec(socket_path, env)
        full_env = dict(os.environ)
        for name, value in spec.env.items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        proc = subprocess.Popen(
            spec.argv, cwd=REPO_ROOT, env=full_env, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        events: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=_events, args=(proc, events), daemon=True)
        reader.start()
        try:
            if not _wait_for(events, "serving", START_TIMEOUT_S):
                raise RuntimeError("the daemon did not start")
            rows: list[list[str]] = []
            with Client(socket_path, timeout_s=60.0) as client:
                client.stats()
                idle = rss_mb(proc.pid)
                rows.append(["idle", f"{idle:.1f}", "0", ""])
                note("trim: filling to the limit")
                held = _fill(client)
                full = rss_mb(proc.pid)
                rows.append(["at the limit", f"{full:.1f}", f"{held:,}", f"+{full - idle:.1f}"])
                note("trim: draining")
                _drain(client)
                drained = rss_mb(proc.pid)
                rows.append(["drained", f"{drained:.1f}", "0", f"+{drained - idle:.1f}"])
                trimmed = _wait_for(events, "memory_trimmed", TRIM_WAIT_S)
                after = rss_mb(proc.pid)
                label = "after the trim" if trimmed else f"no trim within {TRIM_WAIT_S:.0f} s"
                rows.append([label, f"{after:.1f}", "0", f"+{after - idle:.1f}"])
        finally:
            proc.terminate()
            proc.wait(60)
            reader.join(10)
    head = ["moment", "RSS (MB)", "requests held", "above idle (MB)"]
    kept = "" if retention_hours is None else f", QUEUE_RETENTION_HOURS={retention_hours:g}"
    title = f"## trim (QUEUE_MAX_MEMORY_MB={max_mb:g}{kept})"
    return title + "\n\n" + markdown_table(head, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-mb", type=float, default=100.0, help="QUEUE_MAX_MEMORY_MB")
    parser.add_argument(
        "--retention-hours", type=float, default=None, help="QUEUE_RETENTION_HOURS (default: its)"
    )
    args = parser.parse_args()
    print(run(args.max_mb, args.retention_hours), flush=True)


if __name__ == "__main__":
    main()
