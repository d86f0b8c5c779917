"""A fake OpenAI-compatible provider on a real loopback port, with the knobs an outage needs.

    provider = FakeProvider(rpm=600, tpm=60_000, completion_tokens=60).start()
    env["LLM_BASE_URL"] = provider.base_url      # http://127.0.0.1:<port>/v1
    provider.go_down()                           # the port closed: connections refused
    provider.fail_with(503, retry_after_s=2)     # every call answered 503 (and recorded)
    provider.come_up()                           # answers again, on the same port
    provider.mark("ramp")                        # later calls carry this phase label
    provider.calls                               # every call the server saw, in arrival order

`POST /v1/chat/completions` answers a chat completion with `usage` (prompt tokens estimated
from the messages' characters, completion tokens `min(completion_tokens, max_tokens)`).
Past `rpm` requests or `tpm` tokens within any `window_s` seconds (60 by default: per minute)
it answers 429 with `Retry-After` (whole seconds, the time until enough of the window has
passed), as OpenAI does; with `ratelimit_headers=True` every answer also carries OpenAI's
`x-ratelimit-limit|remaining|reset-requests|tokens` headers. A 429 or an error answer costs
nothing against the limits (only the calls answered 200 count), as with OpenAI.

The server runs in threads of the test's process (ThreadingHTTPServer) but is a real peer over
TCP: workers in other processes reach it only through the port. Times are `time.monotonic()`
of this process, the clock the tests measure with. The functions at the bottom turn the record
into what the scenarios assert on: per-second series, window maxima, 429 share.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CHAT_PATH = "/v1/chat/completions"
API_VERSION = "2020-10-01"
# Characters per token of the fake's tokenizer: OpenAI's rule of thumb for English text.
CHARS_PER_TOKEN = 4
# What the listening socket queues: a fleet of workers connecting at once must not meet
# ThreadingHTTPServer's default of 5 (a SYN dropped there costs the client a second's retransmit).
LISTEN_BACKLOG = 512


class Mode(StrEnum):
    """How the fake answers right now."""

    UP = "up"  # completions, within the limits
    DOWN = "down"  # the port closed: connect() is refused; nothing is recorded
    ERROR = "error"  # every call answered `error_status` (503 by default), recorded
    RESET = "reset"  # the connection is closed without an answer, recorded with status 0


@dataclass(frozen=True)
class Call:
    """One request the fake received, as it answered it."""

    at: float  # monotonic time the request arrived (its headers and body read)
    done: float  # monotonic time the answer was ready to send
    status: int  # the HTTP status answered; 0 for a connection closed without an answer
    prompt_tokens: int
    completion_tokens: int
    phase: str  # the label of provider.mark() current when it arrived
    tag: str  # the last message's content: what the test put there to name the request
    model: str
    authorised: bool  # the Authorization header carried the expected key (when one is set)

    @property
    def tokens(self) -> int:
        """What the call costs against the tokens-per-minute limit (0 unless answered 200)."""
        return self.prompt_tokens + self.completion_tokens if self.status == 200 else 0

    @property
    def ok(self) -> bool:
        return self.status == 200


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """The fake's token count of a request's messages: characters / 4, at least 1."""
    chars = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes x-ratelimit-reset-*: "120ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3g}s"


class _Limits:
    """Sliding-window request and token limits over the calls answered 200."""

    def __init__(self, rpm: int, tpm: int, window_s: float) -> None:
        self.requests = rpm  # per window_s; 0 = no limit
        self.tokens = tpm
        self.window_s = window_s
        self._admitted: deque[tuple[float, int]] = deque()  # (time, tokens), oldest first
        self._token_sum = 0

    def _expire(self, now: float) -> None:
        while self._admitted and self._admitted[0][0] <= now - self.window_s:
            _, tokens = self._admitted.popleft()
            self._token_sum -= tokens

    def admit(self, now: float, tokens: int) -> float | None:
        """Charge a call and return None, or return the seconds until it would fit."""
        self._expire(now)
        waits: list[float] = []
        if self.requests and len(self._admitted) + 1 > self.requests:
            # The oldest call that must leave the window for this one to fit.
            oldest = self._admitted[len(self._admitted) - self.requests][0]
            waits.append(oldest + self.window_s - now)
        if self.tokens and self._token_sum + tokens > self.tokens:
            excess, freed = self._token_sum + tokens - self.tokens, 0
            for t, n in self._admitted:
                freed += n
                if freed >= excess:
                    waits.append(t + self.window_s - now)
                    break
            else:
                waits.append(self.window_s)  # larger than the whole budget: never fits
        if waits:
            return max(0.001, *waits)
        self._admitted.append((now, tokens))
        self._token_sum += tokens
        return None

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the state after this call."""
        self._expire(now)
        out: dict[str, str] = {}
        oldest = self._admitted[0][0] + self.window_s - now if self._admitted else 0.0
        if self.requests:
            out["x-ratelimit-limit-requests"] = str(self.requests)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.requests - len(self._admitted)))
            out["x-ratelimit-reset-requests"] = go_duration(max(0.0, oldest))
        if self.tokens:
            out["x-ratelimit-limit-tokens"] = str(self.tokens)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.tokens - self._token_sum))
            out["x-ratelimit-reset-tokens"] = go_duration(max(0.0, oldest))
        return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its timeout) leaves the handler a closed socket: not a
        # failure of the fake worth a traceback on the run's stderr.
        pass


class FakeProvider:
    """See the module docstring. Thread-safe: the test changes modes while calls arrive."""

    def __init__(
        self,
        *,
        rpm: int = 0,
        tpm: int = 0,
        window_s: float = 60.0,
        completion_tokens: int = 20,
        latency_s: float = 0.0,
        ratelimit_headers: bool = False,
        api_key: str | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or _free_port()
        self.completion_tokens = completion_tokens
        self.latency_s = latency_s  # how long each completion takes to "generate"
        self.ratelimit_headers = ratelimit_headers
        self.api_key = api_key
        self.limits = _Limits(rpm, tpm, window_s)
        self.mode = Mode.DOWN
        self.error_status = 503
        self.error_retry_after_s: float | None = None
        self.phase = ""
        self.calls: list[Call] = []
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- life and modes ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What LLM_BASE_URL is set to."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeProvider:
        """Listen on the port and answer (Mode.UP)."""
        self.come_up()
        return self

    def come_up(self) -> None:
        """Answer completions again; reopen the port if it was closed."""
        with self._cond:
            self.mode = Mode.UP
        self._listen()

    def go_down(self) -> None:
        """Close the port: every connection is refused until come_up()."""
        with self._cond:
            self.mode = Mode.DOWN
        self._close()

    def fail_with(self, status: int = 503, retry_after_s: float | None = None) -> None:
        """Answer every call with `status` (and `Retry-After` when given) until come_up()."""
        with self._cond:
            self.mode, self.error_status, self.error_retry_after_s = (
                Mode.ERROR, status, retry_after_s,
            )  # fmt: skip
        self._listen()

    def reset_connections(self) -> None:
        """Accept each call and close it unanswered (a reset peer) until come_up()."""
        with self._cond:
            self.mode = Mode.RESET
        self._listen()

    def mark(self, phase: str) -> float:
        """Label the calls that arrive from now on; returns the time of the change."""
        with self._cond:
            self.phase = phase
            return time.monotonic()

    def stop(self) -> None:
        """Close the port for good (the end of a test)."""
        self.go_down()

    def _listen(self) -> None:
        with self._cond:
            if self._server is not None:
                return
            server = _Server(("127.0.0.1", self.port), self._handler())
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, args=(0.05,), name="fake-provider", daemon=True
            )
            self._thread.start()

    def _close(self) -> None:
        with self._cond:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the test reads ----------------------------------------------------------------

    def snapshot(self) -> list[Call]:
        """A copy of the calls so far."""
        with self._cond:
            return list(self.calls)

    def wait_until(self, predicate: Callable[[list[Call]], bool], timeout_s: float) -> bool:
        """Block until predicate(calls) holds (re-checked at each call), up to timeout_s."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.calls), timeout_s)

    def wait_for_calls(self, count: int, timeout_s: float, *, status: int | None = None) -> bool:
        """Until `count` calls (answered `status`, when given) have arrived."""
        return self.wait_until(
            lambda calls: sum(status is None or c.status == status for c in calls) >= count,
            timeout_s,
        )

    # -- the handler ------------------------------------------------------------------------

    def _answer(self, body: dict[str, Any], authorised: bool, at: float) -> _Reply:
        """Decide one call's answer under the lock; the caller sends it and records it."""
        prompt = estimate_prompt_tokens(body)
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        completion = self.completion_tokens
        if isinstance(asked, int) and asked > 0:
            completion = min(completion, asked)
        messages = body.get("messages") or [{}]
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        reply = _Reply(prompt=prompt, completion=completion, phase=self.phase,
                       tag=str(last.get("content", "")), model=str(body.get("model", "")),
                       authorised=authorised)  # fmt: skip
        if self.mode is Mode.RESET:
            reply.status = 0
        elif self.mode is Mode.ERROR:
            reply.status = self.error_status
            if self.error_retry_after_s is not None:
                reply.headers["Retry-After"] = str(math.ceil(self.error_retry_after_s))
            reply.body = {"error": {"message": f"fake provider answers {self.error_status}",
                                    "type": "server_error"}}  # fmt: skip
        else:
            wait = self.limits.admit(at, prompt + completion)
            if wait is None:
                reply.status = 200
            else:
                reply.status = 429
                reply.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                reply.body = {"error": {"message": "Rate limit reached", "type": "requests",
                                        "code": "rate_limit_exceeded"}}  # fmt: skip
            if self.ratelimit_headers:
                reply.headers.update(self.limits.headers(at))
        if reply.status == 200:
            reply.body = _completion(body, prompt, completion)
        return reply

    def _record(self, reply: _Reply, at: float) -> None:
        call = Call(at=at, done=time.monotonic(), status=reply.status, prompt_tokens=reply.prompt,
                    completion_tokens=reply.completion if reply.status == 200 else 0,
                    phase=reply.phase, tag=reply.tag, model=reply.model,
                    authorised=reply.authorised)  # fmt: skip
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                at = time.monotonic()
                if self.path != CHAT_PATH:
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                try:
                    body = json.loads(raw or b"{}")
                    assert isinstance(body, dict)
                except (ValueError, AssertionError):
                    self._send(400, {"error": {"message": "the body is not a JSON object"}}, {})
                    return
                expected = f"Bearer {fake.api_key}" if fake.api_key else None
                authorised = expected is None or self.headers.get("Authorization") == expected
                with fake._cond:
                    reply = fake._answer(body, authorised, at)
                if reply.status == 0:
                    # An abortive close: the client sees a reset, not an answer.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    fake._record(reply, at)
                    return
                if reply.status == 200 and fake.latency_s:
                    time.sleep(fake.latency_s)  # the completion's generation time
                # Recorded before the answer leaves: a client that has its answer finds its
                # call in the record.
                fake._record(reply, at)
                self._send(reply.status, reply.body, reply.headers)

            def _send(self, status: int, body: object, headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("openai-version", API_VERSION)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@dataclass
class _Reply:
    prompt: int
    completion: int
    phase: str
    tag: str
    model: str
    authorised: bool
    status: int = 200
    body: object = None
    headers: dict[str, str] = field(default_factory=dict)


def _completion(request: dict[str, Any], prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-fake-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": f"{request.get('model') or 'fake'}-2026-01-01",
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant",
                                 "content": " ".join(["tok"] * completion)}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- reading the record ----------------------------------------------------------------------


def answered(calls: Iterable[Call], *statuses: int) -> list[Call]:
    """The calls answered with one of `statuses`."""
    return [c for c in calls if c.status in statuses]


def per_second(
    calls: Iterable[Call], start: float, end: float, *, ok_only: bool = True
) -> list[int]:
    """Calls (answered 200 unless ok_only=False) that arrived in each second [start, end)."""
    buckets = [0] * max(0, math.ceil(end - start))
    for c in calls:
        if (c.ok or not ok_only) and start <= c.at < end:
            buckets[int(c.at - start)] += 1
    return buckets


def window_max(
    calls: Sequence[Call], window_s: float, weight: Callable[[Call], int] = lambda c: int(c.ok)
) -> tuple[int, float]:
    """The largest total weight (calls answered 200, by default) over any window of window_s
    seconds, and where that window starts. Every window that starts at a call's arrival is
    looked at: those are the windows where the total can be largest."""
    ordered = sorted((c for c in calls if weight(c)), key=lambda c: c.at)
    times = [c.at for c in ordered]
    prefix = [0]
    for c in ordered:
        prefix.append(prefix[-1] + weight(c))
    best, where = 0, ordered[0].at if ordered else 0.0
    for i, t in enumerate(times):
        j = bisect_left(times, t + window_s)
        if prefix[j] - prefix[i] > best:
            best, where = prefix[j] - prefix[i], t
    return best, where


def token_weight(call: Call) -> int:
    """window_max's weight for the tokens-per-minute check."""
    return call.tokens


def share(calls: Sequence[Call], status: int) -> float:
    """The fraction of the calls answered `status` (0 when there were none)."""
    return sum(c.status == status for c in calls) / len(calls) if calls else 0.0


def overlapping(calls: Sequence[Call]) -> int:
    """The most calls that were in flight at once (arrival to answer)."""
    events = sorted([(c.at, 1) for c in calls] + [(c.done, -1) for c in calls])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most
