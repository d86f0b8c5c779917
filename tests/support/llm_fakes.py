"""Real HTTP parts for the LLM flow's tests: a fake provider, a callback sink, and processes.

The fake provider speaks OpenAI's chat-completions shape on loopback; a test takes it down
(the port then refuses connections) and brings it back on the same port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.procs import default_signals

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-e2e-secret-0123456789"
API_VERSION = "2020-10-01"


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """A threaded HTTP server on a fixed loopback port that can stop and start again."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _read_json(handler: BaseHTTPRequestHandler) -> Any:
    length = int(handler.headers.get("Content-Length") or 0)
    return json.loads(handler.rfile.read(length) or b"null")


def _send_json(
    handler: BaseHTTPRequestHandler, status: int, body: object, headers: dict[str, str]
) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for k, v in headers.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)


class FakeProvider(_Server):
    """POST /v1/chat/completions: 200 with a completion; 400 for the model "bad-model"."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.received = 0
        self.unauthorised = 0
        self._lock = threading.Lock()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = _read_json(self)
                with fake._lock:
                    fake.received += 1
                    if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                        fake.unauthorised += 1
                headers = {"openai-version": API_VERSION, "x-request-id": "req-fake"}
                if body.get("model") == "bad-model":
                    err = {"error": {"message": "The model does not exist", "type": "invalid"}}
                    _send_json(self, 400, err, headers)
                    return
                answer = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "model": "fake-gpt-2026-01-01",
                    "system_fingerprint": "fp_fake",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "fake answer"}}],
                }  # fmt: skip
                _send_json(self, 200, answer, headers)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class CallbackSink(_Server):
    """Collects the JSON bodies POSTed to it; `wait_for` blocks until enough arrived.

    Each delivery is also kept whole in `received` (raw body, headers, arrival time), and
    `answers` scripts the replies: each delivery takes the next (status, headers) from it,
    and answers 200 once it is empty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []
        self.received: list[Delivery] = []
        self.answers: list[tuple[int, dict[str, str]]] = []
        self._cond = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/results"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with sink._cond:
                    sink.received.append(
                        Delivery(raw, {k.lower(): v for k, v in self.headers.items()},
                                 time.monotonic())
                    )  # fmt: skip
                    status, headers = sink.answers.pop(0) if sink.answers else (200, {})
                    if status < 300:
                        sink.bodies.append(json.loads(raw or b"null"))
                    sink._cond.notify_all()
                _send_json(self, status, {"ok": status < 300}, headers)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.bodies) >= count, timeout)

    def wait_received(self, count: int, timeout: float) -> bool:
        """Until `count` deliveries arrived, whatever they were answered."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.received) >= count, timeout)


@dataclass(frozen=True)
class Delivery:
    """One POST the sink received, as it came."""

    body: bytes
    headers: dict[str, str]  # names in lower case
    at: float  # time.monotonic() on arrival


class Proc:
    """A child process whose stderr lines are collected; `wait_for_line` waits on them."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
            preexec_fn=default_signals,  # noqa: PLW1509 (stop() sends SIGTERM; see procs.py)
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def count(self, text: str) -> int:
        with self._cond:
            return self.count_unlocked(text)

    def wait_for_line(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self.count_unlocked(text) >= count or self.proc.poll() is not None,
                timeout,
            )
            if not ok or self.count_unlocked(text) < count:
                tail = "\n".join(self.lines[-30:])
                raise AssertionError(f"no {count}x {text!r} within {timeout}s:\n{tail}")

    def count_unlocked(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self._reader.join(5)  # the pipe ends with the process; then close our end
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def llm_env(
    base: dict[str, str], provider_port: int, record_dir: Path, **over: str
) -> dict[str, str]:
    """The environment of the example app and the worker: the fake provider, recorder on."""
    env = dict(base)
    env.update(
        {
            "ENVIRONMENT": "development",
            "LLM_PROVIDER": "openai",
            "LLM_BASE_URL": f"http://127.0.0.1:{provider_port}/v1",
            "LLM_MODEL": "fake-gpt",
            "LLM_API_KEY": API_KEY,
            "LLM_CONNECT_TIMEOUT_SECONDS": "1",
            "LLM_READ_TIMEOUT_SECONDS": "5",
            "LLM_BREAKER_FAILURES": "1",
            "LLM_BREAKER_RESET_SECONDS": "0.3",
            "RECORD_LLM_RESPONSES": "true",
            "LLM_RESPONSE_LOG_DIR": str(record_dir),
            # The callback sinks of these tests listen on loopback, which is refused by default.
            "LLM_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    env.update(over)
    return env


def start_app(env: dict[str, str], port: int) -> Proc:
    """The example service under uvicorn; returns once it accepts requests."""
    app = Proc([sys.executable, "-m", "uvicorn", "examples.llm_service.app:app",
                "--host", "127.0.0.1", "--port", str(port)], env)  # fmt: skip
    app.wait_for_line("Application startup complete")
    return app


def start_worker(env: dict[str, str], concurrency: int = 2) -> Proc:
    """`sidecar work`; returns once it logged that it started."""
    worker = Proc([sys.executable, "-m", "sidecar", "work", "--concurrency", str(concurrency)], env)
    worker.wait_for_line("llm_worker_started")
    return worker
