"""The LLM gateway's cost, as ratios measured in one run: `python -m bench.llm [--quick]`.

Three ways to serve one chat request, each against the same loopback provider (llm_provider.py,
its own process) and the real daemon (its own process, local store):

- `direct`: `OpenAIProvider.complete`, the call a service makes without the sidecar;
- `gateway fresh`: `Gateway.handle` with the provider up (limiter acquire, provider, report
  and settle, 200);
- `gateway queued`: `Gateway.handle` with the provider's scope paused in the limiter, so the
  request goes straight to the sidecar (the 202 a caller gets during an outage).

Slices alternate between the three, and each ratio is the median of per-slice ratios over
`direct`: absolute times on a shared machine drift, ratios taken within seconds do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog
import uvloop

from bench.servers import ServerSpec, daemon_spec, running
from bench.tables import markdown_table, note, print_section
from sidecar.client import AsyncClient
from sidecar.llm.gateway import Gateway, LLMRequest
from sidecar.llm.providers import OpenAIProvider
from sidecar.logs import configure_logging

BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "x" * 1000}]}
Call = Callable[[], Awaitable[object]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _time_calls(call: Call, n: int) -> float:
    """Mean seconds per call over n sequential calls."""
    start = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - start) / n


async def measure(socket_path: str, port: int, calls: int, slices: int) -> dict[str, list[float]]:
    """Per-slice mean latency of each way, in the same order for every slice."""
    up = OpenAIProvider(base_url=f"http://127.0.0.1:{port}/v1", model="bench-model", api_key="k")
    down = OpenAIProvider(base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", api_key="k")
    sidecar = await AsyncClient(socket_path).connect()
    fresh = Gateway(up, sidecar, scope="bench-up")
    # The scope paused for the whole run: every call goes straight to the queue, as in an outage.
    queued = Gateway(down, sidecar, scope="bench-down")
    await sidecar.limit_pause("bench-down", pause_s=86_400, reason="bench")
    ways: dict[str, Call] = {
        "direct": lambda: up.complete(BODY),
        "gateway fresh": lambda: fresh.handle(LLMRequest(body=BODY)),
        "gateway queued": lambda: queued.handle(LLMRequest(body=BODY)),
    }
    for call in ways.values():  # warm-up: connections, JIT-free but caches and pools
        await _time_calls(call, max(1, calls // 10))
    out: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(slices):
        for name, call in ways.items():
            out[name].append(await _time_calls(call, calls // slices))
    probe = await queued.handle(LLMRequest(body=BODY))
    assert probe.status == 202, probe
    await up.aclose()
    await down.aclose()
    await sidecar.close()
    return out


def table(samples: dict[str, list[float]]) -> str:
    """Each way's median latency and its median per-slice ratio over `direct`."""
    direct = samples["direct"]
    rows = []
    for name, times in samples.items():
        ratio = statistics.median(t / d for t, d in zip(times, direct, strict=True))
        rows.append([name, f"{statistics.median(times) * 1e6:.0f}", f"{ratio:.2f}"])
    return markdown_table(["way", "median µs per call", "ratio over direct"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llm", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=3000, help="timed calls per way")
    p.add_argument("--slices", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="a smoke run: 60 calls, 2 slices")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.slices = 60, 2
    # The service logs one JSON line per decision; keep that cost in, its output out.
    configure_logging("production", "info")
    devnull = open(os.devnull, "w")  # noqa: SIM115 - open for the whole run
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=devnull))
    port = _free_port()
    provider = ServerSpec(name="provider", argv=[sys.executable, "-m", "bench.llm_provider",
                                                 str(port)])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bl", dir="/tmp") as tmp:
        sock = str(Path(tmp) / "s.sock")
        room = {"QUEUE_MAX_SIZE": "10000000", "QUEUE_MAX_MEMORY_MB": "8192",
                "SIDECAR_JOURNAL_FSYNC": "off", "REDIS_URL": None}  # fmt: skip
        with running(provider), running(daemon_spec(sock, room)):
            note(f"llm: {args.calls} calls per way in {args.slices} slices")
            samples = uvloop.run(measure(sock, port, args.calls, args.slices))
    print_section("llm: the gateway beside a direct provider call", table(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
