"""The LLM side's pieces alone: breaker states, the failure table, the recorder's rules."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import structlog

from sidecar.config import Settings
from sidecar.llm.errors import (
    Outcome,
    ProviderRejected,
    ProviderUnavailable,
    classify_status,
    parse_retry_after,
)
from sidecar.llm.providers import MockProvider, OpenAIProvider, build_provider, load_api_key
from sidecar.llm.recorder import INDEX_NAME, DevelopmentResponseRecorder, atomic_write
from sidecar.llm.worker import WorkerOptions, backoff_s, build_recorder

# -- the failure table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.OK),
        (201, Outcome.OK),
        (400, Outcome.REJECTED),
        (401, Outcome.REJECTED),
        (403, Outcome.REJECTED),
        (404, Outcome.REJECTED),
        (413, Outcome.REJECTED),
        (422, Outcome.REJECTED),
        (408, Outcome.UNAVAILABLE),
        (429, Outcome.UNAVAILABLE),
        (500, Outcome.UNAVAILABLE),
        (502, Outcome.UNAVAILABLE),
        (503, Outcome.UNAVAILABLE),
        (504, Outcome.UNAVAILABLE),
        (302, Outcome.UNAVAILABLE),
    ],
)
def test_status_classification(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("30", 30.0), ("0.5", 0.5), (None, None), ("soon", None), ("-3", None), ("nan", None),
     ("1e9", 3600.0), ("Wed, 21 Oct 2026 07:28:00 GMT", None)],
)  # fmt: skip
def test_retry_after_parsing(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header) == seconds


async def _openai_against(handler: httpx.MockTransport) -> OpenAIProvider:
    p = OpenAIProvider(base_url="http://provider.test/v1", model="m", api_key="sk-unit")
    p._http = httpx.AsyncClient(base_url=p.base_url, transport=handler)
    return p


@pytest.mark.parametrize(
    ("make_exc", "expected"),
    [
        (lambda r: httpx.ConnectError("refused", request=r), "unreachable"),
        (lambda r: httpx.ReadError("reset", request=r), "unreachable"),
        (lambda r: httpx.RemoteProtocolError("closed", request=r), "unreachable"),
        (lambda r: httpx.ConnectTimeout("slow", request=r), "timed out"),
        (lambda r: httpx.ReadTimeout("slow", request=r), "timed out"),
    ],
)
async def test_transport_failures_are_unavailable(make_exc: object, expected: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise make_exc(request)  # type: ignore[operator]

    p = await _openai_against(httpx.MockTransport(fail))
    with pytest.raises(ProviderUnavailable, match=expected):
        await p.complete({"messages": []})
    await p.aclose()


async def test_http_answers_are_classified_with_retry_after() -> None:
    answers = iter([
        httpx.Response(429, headers={"retry-after": "7"}, json={"error": "slow down"}),
        httpx.Response(503, json={"error": "down"}),
        httpx.Response(400, json={"error": {"message": "bad"}}),
        httpx.Response(200, json={"id": "x", "model": "m"}),
    ])  # fmt: skip
    p = await _openai_against(httpx.MockTransport(lambda r: next(answers)))
    with pytest.raises(ProviderUnavailable) as err:
        await p.complete({})
    assert err.value.retry_after_s == 7.0
    with pytest.raises(ProviderUnavailable):
        await p.complete({})
    with pytest.raises(ProviderRejected) as rej:
        await p.complete({})
    assert rej.value.status == 400 and rej.value.body == {"error": {"message": "bad"}}
    assert (await p.complete({})).body["id"] == "x"
    await p.aclose()


async def test_mock_provider_is_deterministic_and_switchable() -> None:
    m = MockProvider()
    a = await m.complete({"messages": [{"role": "user", "content": "x"}]})
    b = await m.complete({"messages": [{"role": "user", "content": "x"}]})
    c = await m.complete({"messages": [{"role": "user", "content": "y"}]})
    assert a == b and a != c
    m.down = True
    with pytest.raises(ProviderUnavailable, match="down"):
        await m.complete({})
    m.down, m.failing = False, True
    with pytest.raises(ProviderUnavailable, match="503"):
        await m.complete({})
    m.failing, m.reject_status = False, 422
    with pytest.raises(ProviderRejected):
        await m.complete({})


def test_the_mock_is_the_development_default_and_openai_the_production_one() -> None:
    assert build_provider(Settings(environment="development")).name == "mock"
    prod = Settings(environment="production", llm_base_url="http://127.0.0.1:9/v1")
    p = build_provider(prod, env={})
    assert p.name == "openai"
    asyncio.run(p.aclose())


def test_api_key_from_env_else_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    s = Settings(llm_api_key_file=str(key_file))
    assert load_api_key(s, {"LLM_API_KEY": "sk-env"}) == "sk-env"
    assert load_api_key(s, {}) == "sk-from-file"
    assert load_api_key(Settings(), {}) is None


def test_worker_backoff_doubles_up_to_its_cap() -> None:
    opts = WorkerOptions(backoff_base_s=1.0, backoff_max_s=10.0)
    assert [backoff_s(n, opts) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 8, 10, 10]


# -- the recorder -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "flag", "enabled"),
    [("development", True, True), ("development", False, False),
     ("production", True, False), ("production", False, False)],
)  # fmt: skip
def test_recorder_on_off_matrix(
    tmp_path: Path, environment: str, flag: bool, enabled: bool
) -> None:
    folder = tmp_path / "logs"
    s = Settings(environment=environment, record_llm_responses=flag,
                 llm_response_log_dir=str(folder), llm_provider="mock")  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        rec = build_recorder(s)
    assert (rec is not None) is enabled
    refused = [e for e in logs if e["event"] == "llm_recorder_refused"]
    assert len(refused) == (1 if environment == "production" and flag else 0)
    if refused:
        assert refused[0]["log_level"] == "warning"
    assert not folder.exists()  # nothing is created before a call is recorded
    if rec is not None:
        asyncio.run(_one_record(rec))
        assert folder.is_dir()


async def _one_record(rec: DevelopmentResponseRecorder, **over: object) -> Path | None:
    fields: dict[str, object] = {
        "provider": "openai",
        "model": "gpt-x",
        "request": {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]},
        "response": {"id": "r1", "model": "gpt-x-2026", "system_fingerprint": "fp_1"},
        "status": 200,
        "headers": {"OpenAI-Version": "2020-10-01", "Set-Cookie": "s=1", "x-request-id": "q"},
        "latency_s": 0.25,
    }
    fields.update(over)
    return await rec.record(**fields)  # type: ignore[arg-type]


async def test_a_record_has_the_fields_and_no_secret(tmp_path: Path) -> None:
    rec = DevelopmentResponseRecorder(tmp_path, max_bytes=1 << 20, secrets=("sk-secret-123",))
    path = await _one_record(
        rec,
        request={"model": "gpt-x", "api_key": "sk-secret-123", "authorization": "Bearer zzz",
                 "messages": [{"role": "user", "content": "my key is sk-secret-123"}]},
        headers={"openai-version": "2020-10-01", "authorization": "Bearer sk-secret-123"},
    )  # fmt: skip
    assert path is not None
    text = path.read_text()
    assert "sk-secret-123" not in text and "Bearer" not in text and "zzz" not in text
    data = json.loads(text)
    assert data["provider"] == "openai" and data["model"] == "gpt-x" and data["status"] == 200
    assert data["api_version"] == {"headers": {"openai-version": "2020-10-01"},
                                   "model": "gpt-x-2026", "system_fingerprint": "fp_1"}  # fmt: skip
    assert data["latency_s"] == 0.25 and data["time"].endswith("+00:00")
    assert data["request"]["api_key"] == "[redacted]"
    assert data["request"]["messages"][0]["content"] == "my key is [redacted]"
    assert data["response"]["id"] == "r1"
    assert "authorization" not in data["response_headers"]


async def test_the_version_index_counts_first_and_last_seen(tmp_path: Path) -> None:
    rec = DevelopmentResponseRecorder(tmp_path, max_bytes=1 << 20)
    await _one_record(rec)
    await _one_record(rec)
    await _one_record(rec, headers={"openai-version": "2027-01-01"})
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    entries = sorted(index["versions"].values(), key=lambda e: e["count"])
    assert [e["count"] for e in entries] == [1, 2]
    assert entries[0]["headers"] == {"openai-version": "2027-01-01"}
    assert entries[1]["first_seen"] <= entries[1]["last_seen"]
    assert len([n for n in os.listdir(tmp_path) if n != INDEX_NAME]) == 3


async def test_the_size_cap_stops_writing_with_one_log_line(tmp_path: Path) -> None:
    rec = DevelopmentResponseRecorder(tmp_path, max_bytes=3000)
    with structlog.testing.capture_logs() as logs:
        written = [await _one_record(rec) for _ in range(10)]
    kept = [p for p in written if p is not None]
    assert 0 < len(kept) < 10
    assert written[len(kept):] == [None] * (10 - len(kept))  # fmt: skip
    assert [e["event"] for e in logs].count("llm_recorder_cap_reached") == 1
    assert sum(os.stat(tmp_path / n).st_size for n in os.listdir(tmp_path)) <= 3000


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    atomic_write(target, b"old")
    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
