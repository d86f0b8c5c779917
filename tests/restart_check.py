"""Run inside a booted systemd (tests/systemd_test.sh): count clients across a real restart.

    python restart_check.py [SOCKET]

Clients keep opening connections (one hello each) and four keep one connection busy while
`systemctl restart sidecar` runs. Prints the counts as JSON; exits 1 if any connection was
refused, reset, or left hanging. Standard library only.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
from collections import Counter

HANG_S = 20.0
WAIT_S = 60.0


def hello_frame(request_id: int) -> bytes:
    """{"op": "hello", "id": n} as a frame (n < 128), written out so no package is needed."""
    body = b"\x82\xa2op\xa5hello\xa2id" + bytes([request_id & 0x7F])
    return struct.pack(">I", len(body)) + body


async def call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> str:
    try:
        writer.write(hello_frame(n))
        (size,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), HANG_S))
        body = await asyncio.wait_for(reader.readexactly(size), HANG_S)
    except TimeoutError:
        return "hung"
    except asyncio.IncompleteReadError:
        return "eof"  # the drain's clean end of stream: this call was never read
    except ConnectionError:
        return "reset"
    if b"shutting_down" in body:
        return "shutting_down"
    return "answered" if b"\xa2ok\xc3" in body else "error"


async def new_connection(path: str) -> tuple[float, str]:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), HANG_S)
    except (ConnectionRefusedError, FileNotFoundError):
        return started, "refused"
    except TimeoutError:
        return started, "hung"
    try:
        return started, await call(reader, writer, 1)
    finally:
        writer.close()


async def busy_connection(path: str, stop: asyncio.Event) -> list[str]:
    reader, writer = await asyncio.open_unix_connection(path)
    results: list[str] = []
    try:
        n = 1
        while not stop.is_set():
            results.append(await call(reader, writer, n % 100))
            n += 1
            if results[-1] != "answered":
                break
    finally:
        writer.close()
    return results


async def main(path: str) -> int:
    stop = asyncio.Event()
    probes: list[asyncio.Task[tuple[float, str]]] = []

    async def connect_until_stopped() -> None:
        while not stop.is_set():
            probes.append(asyncio.create_task(new_connection(path)))
            await asyncio.sleep(0.01)  # pacing the clients

    def answered(since: float) -> int:
        done = (p.result() for p in probes if p.done())
        return sum(t >= since and result == "answered" for t, result in done)

    async def answered_since(since: float, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while answered(since) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"fewer than {count} answered")
            await asyncio.sleep(0.05)

    busy = [asyncio.create_task(busy_connection(path, stop)) for _ in range(4)]
    connector = asyncio.create_task(connect_until_stopped())
    await answered_since(0, 20)
    t_start = time.monotonic()
    proc = await asyncio.create_subprocess_exec("systemctl", "restart", "sidecar.service")
    assert await proc.wait() == 0, "systemctl restart failed"
    t_end = time.monotonic()
    await answered_since(t_end, 20)
    stop.set()
    await connector
    outcomes = await asyncio.gather(*probes)
    old_calls = await asyncio.gather(*busy)
    during = Counter(r for t, r in outcomes if t_start <= t <= t_end)
    every = Counter(r for _, r in outcomes)
    busy_calls = Counter(r for calls in old_calls for r in calls)
    summary = {
        "restart_s": round(t_end - t_start, 3),
        "during_restart": dict(during),
        "all_connections": dict(every),
        "busy_connection_calls": dict(busy_calls),
    }
    print(json.dumps(summary))
    bad = {"refused", "reset", "hung", "error"}
    return 1 if (set(every) | set(busy_calls)) & bad or not during else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "/run/sidecar/sidecar.sock")))
