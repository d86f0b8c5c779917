"""A webhook receiver on a real loopback port that checks every delivery's signature.

    receiver = FakeReceiver(secret).start()   # accepts (200)
    url = receiver.url("/hooks/a")
    receiver.go_down()                        # the port closed: connections refused
    receiver.answer(500)                      # every delivery answered 500 (recorded)
    receiver.answer(410, path="/hooks/gone")  # only that path answers 410
    receiver.come_up()                        # accepts again, on the same port

Each delivery is recorded whole (arrival time, path, headers, raw body, the status answered)
with the verdict of the independent Standard Webhooks implementation (`standardwebhooks` from
PyPI, a test dependency): `verified` is True when its `Webhook(secret).verify(body, headers)`
accepted the delivery with one of the receiver's secrets. `check()` states the at-least-once
rules a scenario asserts: every accepted delivery verified, and two deliveries of one result
share one `webhook-id` while two results never do.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

DEFAULT_PATH = "/results"


@dataclass(frozen=True)
class Delivery:
    """One POST the receiver got, and what it answered."""

    at: float  # time.monotonic() on arrival
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int  # what the receiver answered
    verified: bool  # the signature checked out with standardwebhooks
    verify_error: str | None

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def queue_id(self) -> str | None:
        try:
            value = self.json().get("queue_id")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a sender that timed out leaves a closed socket: not the receiver's failure


@dataclass
class _Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


class FakeReceiver:
    """See the module docstring. Thread-safe: the test switches answers while POSTs arrive."""

    def __init__(self, *secrets: str, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host  # another loopback address (127.0.0.2) makes a second, distinct peer
        self.port = port or _free_port(host)
        self.secrets = secrets
        self._webhooks = [Webhook(s) for s in secrets]
        self.default = _Answer(200)
        self.by_path: dict[str, _Answer] = {}
        self.deliveries: list[Delivery] = []
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def url(self, path: str = DEFAULT_PATH, *, host: str | None = None) -> str:
        """Its URL; `host` names it otherwise (a name that resolves to its address)."""
        return f"http://{host or self.host}:{self.port}{path}"

    # -- life and answers -------------------------------------------------------------------

    def start(self) -> FakeReceiver:
        self.come_up()
        return self

    def come_up(self) -> None:
        """Accept every delivery (200) again, reopening the port if it was closed."""
        with self._cond:
            self.default = _Answer(200)
            self.by_path.clear()
        self._listen()

    def go_down(self) -> None:
        """Close the port: every delivery is refused at connect() until come_up()."""
        with self._cond:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def answer(self, status: int, *, path: str | None = None, **headers: str) -> None:
        """Answer `status` (with `headers`, e.g. Retry-After="3") to every delivery, or only
        to those POSTed to `path`; the port is opened if it was closed."""
        answer = _Answer(status, {k.replace("_", "-"): v for k, v in headers.items()})
        with self._cond:
            if path is None:
                self.default = answer
            else:
                self.by_path[path] = answer
        self._listen()

    def stop(self) -> None:
        self.go_down()

    def __enter__(self) -> FakeReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        with self._cond:
            if self._server is not None:
                return
            server = _Server((self.host, self.port), self._handler())
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, args=(0.05,), name="fake-receiver", daemon=True
            )
            self._thread.start()

    # -- what the test reads ----------------------------------------------------------------

    def snapshot(self) -> list[Delivery]:
        with self._cond:
            return list(self.deliveries)

    def accepted(self) -> list[Delivery]:
        return [d for d in self.snapshot() if d.accepted]

    def accepted_ids(self) -> set[str]:
        """The queue_ids whose result was accepted at least once."""
        return {d.queue_id for d in self.accepted() if d.queue_id is not None}

    def wait_until(self, predicate: Callable[[list[Delivery]], bool], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.deliveries), timeout_s)

    def wait_accepted(self, queue_ids: Iterable[str], timeout_s: float) -> set[str]:
        """Until each of queue_ids was accepted; returns those still missing at the deadline."""
        wanted = set(queue_ids)

        def done(deliveries: list[Delivery]) -> bool:
            return wanted <= {d.queue_id for d in deliveries if d.accepted}

        self.wait_until(done, timeout_s)
        return wanted - self.accepted_ids()

    def check(self) -> list[str]:
        """What breaks the delivery rules, as readable lines (empty when all hold):
        every accepted delivery verified with standardwebhooks; one webhook-id per result
        (a duplicate repeats it), and no webhook-id shared by two results."""
        problems: list[str] = []
        ids_by_result: dict[str, set[str | None]] = defaultdict(set)
        results_by_id: dict[str | None, set[str]] = defaultdict(set)
        for d in self.snapshot():
            if d.accepted and not d.verified:
                problems.append(f"{d.path} {d.queue_id}: not verified ({d.verify_error})")
            if d.queue_id is not None:
                ids_by_result[d.queue_id].add(d.webhook_id)
                results_by_id[d.webhook_id].add(d.queue_id)
        for qid, ids in ids_by_result.items():
            if len(ids) != 1 or None in ids:
                problems.append(f"result {qid} came with webhook-ids {sorted(map(str, ids))}")
        for wid, qids in results_by_id.items():
            if len(qids) > 1:
                problems.append(f"webhook-id {wid} carried results {sorted(qids)}")
        return problems

    # -- the handler ------------------------------------------------------------------------

    def _verify(self, body: bytes, headers: dict[str, str]) -> tuple[bool, str | None]:
        if not self._webhooks:
            return False, "the receiver has no secret"
        error = "no secret"
        for webhook in self._webhooks:
            try:
                webhook.verify(body, headers)
            except WebhookVerificationError as exc:
                error = str(exc)
            except ValueError as exc:  # a body that is not JSON (json_parse)
                error = f"body: {exc}"
            else:
                return True, None
        return False, error

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                at = time.monotonic()
                headers = {k.lower(): v for k, v in self.headers.items()}
                verified, error = receiver._verify(body, headers)
                with receiver._cond:
                    answer = receiver.by_path.get(self.path.split("?")[0], receiver.default)
                    receiver.deliveries.append(
                        Delivery(at, self.path, headers, body, answer.status, verified, error)
                    )
                    receiver._cond.notify_all()
                data = json.dumps({"ok": 200 <= answer.status < 300}).encode()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in answer.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
