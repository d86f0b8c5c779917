"""The op registry: clients, dispatch and wire views derive from it; the server reports."""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest

from sidecar.app import build_server
from sidecar.client import AsyncClient, Client, calls
from sidecar.config import Settings
from sidecar.errors import NotFound, TooManyConnections
from sidecar.models import EnqueueOutcome, QueuedRequest, QueueStats, QueueStatus
from sidecar.protocol import (
    REGISTRY,
    EnqueuedItem,
    Metrics,
    MetricsResult,
    RequestInfo,
    encode_frame,
)
from sidecar.queue.build import build_local_queue
from sidecar.server import SidecarServer
from sidecar.server.ops import (
    METRICS_CONTENT_TYPE,
    Ops,
    compile_view,
    enqueued,
    info,
    job,
    stats_result,
)
from tests.support.daemon import short_tmpdir

# -- the clients -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.name)
def test_every_op_is_a_method_of_both_clients_with_the_same_parameters(spec: object) -> None:
    name = spec.name  # type: ignore[attr-defined]
    build = calls.BUILDERS[name]
    expected = [*inspect.signature(build).parameters.values()]
    for cls in (AsyncClient, Client):
        method = getattr(cls, name)
        params = [*inspect.signature(method).parameters.values()]
        assert params[0].name == "self"
        assert params[1:] == expected, (cls.__name__, name)
    assert inspect.iscoroutinefunction(AsyncClient.__dict__[name])
    assert not inspect.iscoroutinefunction(Client.__dict__[name])


def test_every_builder_builds_a_registry_op() -> None:
    """No client method outside the registry: each builder's request is an op of it."""
    ops = {spec.name for spec in REGISTRY}
    assert ops <= set(calls.BUILDERS)
    assert set(calls.BUILDERS) - ops == {"enqueue_many"}  # a second method of enqueue


def test_a_call_takes_resend_safety_and_deadline_from_the_registry() -> None:
    poll = calls.dequeue(3, wait_s=7.5)
    assert (poll.spec.retry_safe, poll.extra_timeout_s) == (False, 7.5)
    named = calls.enqueue_many([calls.item("x"), calls.item("y", queue_id="q")])
    # Safe to resend because every item got a queue_id here.
    assert named.spec.retry_safe
    assert [len(i.queue_id or "") for i in named.request.items] == [32, 1]  # type: ignore[attr-defined]
    assert calls.metrics().spec.retry_safe and calls.metrics().extra_timeout_s == 0


# -- exhaustive dispatch -----------------------------------------------------------------------


def _dispatch_snippet(cases: list[str]) -> str:
    body = "".join(f"        case {c}():\n            return 1\n" for c in cases)
    return (
        "from typing import assert_never\n"
        f"from sidecar.protocol import AnyRequest, {', '.join(cases)}\n\n\n"
        "def handle(req: AnyRequest) -> int:\n"
        "    match req:\n"
        f"{body}"
        "        case _:\n"
        "            assert_never(req)\n"
    )


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "snippet.py"
    path.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.mark.slow
def test_mypy_refuses_a_dispatch_without_a_registry_op(tmp_path: Path) -> None:
    """What Ops.handle relies on: a registry op left out of the match fails type checking."""
    names = [spec.request.__name__ for spec in REGISTRY]
    complete = _mypy(tmp_path, _dispatch_snippet(names))
    assert complete.returncode == 0, complete.stdout
    missing = _mypy(tmp_path, _dispatch_snippet(names[:-1]))
    assert missing.returncode == 1
    assert f'incompatible type "{names[-1]}"; expected "Never"' in missing.stdout


# -- wire views of the stores' records ---------------------------------------------------------


def _record(**fields: object) -> QueuedRequest:
    values: dict[str, object] = {
        "queue_id": "q-1", "priority": 2, "seq": 7, "created_at": 100.0, "expires_at": 200.0,
        "status": QueueStatus.PROCESSING, "attempts": 1, "max_attempts": 3, "updated_at": 150.0,
        "payload": b"\xa2hi", "size_bytes": 3, "lease_id": "l-1", "lease_expires_at": 180.0,
        "reason": "why",
    }  # fmt: skip
    values.update(fields)
    return QueuedRequest(**values)  # type: ignore[arg-type]


def test_views_carry_every_wire_field_from_the_record() -> None:
    rec = _record()
    assert msgspec.structs.asdict(info(rec)) == {
        name: getattr(rec, name) for name in RequestInfo.__struct_fields__
    } | {"status": "processing"}
    leased = job(rec)
    assert bytes(leased.payload) == rec.payload and leased.lease_id == "l-1"
    item = enqueued(EnqueueOutcome(request=rec, created=False))
    assert item == EnqueuedItem(
        queue_id="q-1", status="processing", created=False, priority=2, expires_at=200.0
    )
    assert type(info(rec).status) is str  # the wire carries the plain string


def test_a_wire_field_the_record_lacks_is_an_error() -> None:
    class Wider(msgspec.Struct, kw_only=True):
        queue_id: str
        colour: str

    with pytest.raises(TypeError, match=r"fields \['colour'\] are not fields of QueuedRequest"):
        compile_view(Wider, QueuedRequest)
    given = compile_view(Wider, QueuedRequest, "colour")
    assert given(_record(), "red") == Wider(queue_id="q-1", colour="red")


def test_the_stats_reply_encodes_exactly_as_the_store_s_stats() -> None:
    """The wire format did not change: every field, nested stores included, by name."""
    part = QueueStats(
        store="local", queued=1, processing=2, accepted=9, completed=3, failed=2, expired=1,
        items=3, bytes=99, max_items=10, max_bytes=1000, usage=0.3, breaker_open=True,
        rejections={"high_watermark": 4}, oldest_queued_age_s=1.5, max_expired_age_s=9.0,
        retained=6, retained_bytes=60, retention_cut=1, warnings=["w"], moved_out=0,
    )  # fmt: skip
    total = msgspec.structs.replace(
        part, store="resilient", mode="redis", stores={"local": part}, failovers=1,
        recoveries=1, degraded_s=2.5, redis_data_lost=1,
    )  # fmt: skip
    wire = stats_result(total)
    assert msgspec.msgpack.encode(wire) == msgspec.msgpack.encode(total)
    assert wire.balanced == total.balanced and wire.stores["local"].usage == 0.3


# -- metrics and the observer through the real server -----------------------------------------


class Recording:
    """An Observer that keeps what it is told and wakes whoever waits on it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.seconds: list[float] = []
        self._changed = asyncio.Event()

    def _add(self, *event: str) -> None:
        self.events.append(event)
        self._changed.set()

    def request_done(self, op: str, seconds: float, error_code: str | None) -> None:
        self.seconds.append(seconds)
        self._add("request", op, error_code or "")

    def connection_opened(self) -> None:
        self._add("opened")

    def connection_closed(self) -> None:
        self._add("closed")

    def connection_refused(self, reason: str) -> None:
        self._add("refused", reason)

    async def until(self, check: Callable[[list[tuple[str, ...]]], bool]) -> None:
        async with asyncio.timeout(10):
            while not check(self.events):
                self._changed.clear()
                await self._changed.wait()


_RENDERED = b"# TYPE sidecar_test gauge\nsidecar_test 1.0\n"


async def _render() -> bytes:
    return _RENDERED


@pytest.fixture
async def observed() -> AsyncIterator[tuple[SidecarServer, Recording]]:
    with short_tmpdir() as tmp:
        settings = Settings.from_env(
            {"SIDECAR_SOCKET": str(tmp / "s.sock"), "SIDECAR_MAX_CONNECTIONS": "2"}
        )
        recording = Recording()
        server = build_server(
            settings, build_local_queue(settings), observer=recording, render_metrics=_render
        )
        await server.start()
        try:
            yield server, recording
        finally:
            await server.drain(2.0)


async def test_the_server_reports_requests_and_connections(
    observed: tuple[SidecarServer, Recording],
) -> None:
    server, rec = observed
    async with AsyncClient(server.path) as client:
        assert (await client.health()).connections == 1
        with pytest.raises(NotFound):
            await client.status("nobody")
        metrics = await client.metrics()
        assert metrics == MetricsResult(content_type=METRICS_CONTENT_TYPE, text=_RENDERED.decode())
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.setblocking(False)
        await asyncio.get_running_loop().sock_connect(raw, server.path)
        await rec.until(lambda ev: ev.count(("opened",)) == 2)
        assert (await client.health()).connections == 2
        raw.send(encode_frame({"op": "nope", "id": 5}))
        await rec.until(lambda ev: ("request", "invalid", "unknown_op") in ev)
        third = AsyncClient(server.path)
        with pytest.raises(TooManyConnections):
            await third.health()
        await third.close()
        raw.close()
        await rec.until(lambda ev: ("closed",) in ev)
    await rec.until(lambda ev: ev.count(("closed",)) == 2)
    assert [e for e in rec.events if e[0] == "request"] == [
        ("request", "health", ""),
        ("request", "status", "not_found"),
        ("request", "metrics", ""),
        ("request", "health", ""),
        ("request", "invalid", "unknown_op"),
    ]
    assert ("refused", "too_many_connections") in rec.events
    assert all(0 <= s < 10 for s in rec.seconds)


async def test_the_metrics_op_without_a_renderer_answers_empty_text() -> None:
    with short_tmpdir() as tmp:
        settings = Settings.from_env({"SIDECAR_SOCKET": str(tmp / "s.sock")})
        ops = Ops(settings, build_local_queue(settings, journaled=False))
        result = await ops.handle(Metrics(id=1))
    assert result == MetricsResult(content_type=METRICS_CONTENT_TYPE, text="")
