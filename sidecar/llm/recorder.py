"""The development response recorder: one JSON file per real provider call, for API validation.

Enabled only when ENVIRONMENT=development and RECORD_LLM_RESPONSES=true; in production the flag
is refused with a warning and nothing is written. Each file says which provider, model and API
version answered (`openai-version` and similar headers, the response's `model` and
`system_fingerprint`), the request, the response, status, latency and time. Files are written
atomically (a temporary file, then rename) in a worker thread, so the event loop never blocks
on the disk. Secrets never reach a file: Authorization and key-like headers and fields are
dropped, and the API key's text is scrubbed wherever it appears. `versions.json` indexes the
API versions seen (first seen, last seen, count), so a change of provider API shows at a glance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("sidecar.llm.recorder")

INDEX_NAME = "versions.json"
# Response headers that tell which API version answered; kept. Every other header is dropped
# except a few harmless ones that help reading a record.
VERSION_HEADERS = ("openai-version", "anthropic-version", "x-api-version", "api-version")
KEPT_HEADERS = (*VERSION_HEADERS, "content-type", "x-request-id", "openai-model",
                "openai-processing-ms", "retry-after")  # fmt: skip
# Field names whose values are secrets wherever they appear in a request or response.
SECRET_KEY = re.compile(r"(authorization|api[-_]?key|secret|password|token$|cookie)", re.I)
REDACTED = "[redacted]"


class DevelopmentResponseRecorder:
    """Writes one redacted JSON record per provider call under `directory`, up to a size cap."""

    def __init__(
        self, directory: str | Path, *, max_bytes: int, secrets: tuple[str, ...] = ()
    ) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._secrets = tuple(s for s in secrets if s)
        self._used: int | None = None  # bytes in the folder, measured at the first write
        self._full = False
        self._lock = asyncio.Lock()  # one writer of the index at a time
        self.written = 0

    @classmethod
    def from_settings(
        cls,
        environment: str,
        enabled: bool,
        directory: str,
        max_mb: float,
        secrets: tuple[str, ...] = (),
    ) -> DevelopmentResponseRecorder | None:
        """A recorder when development and the flag agree; None (with a warning in production)."""
        if not enabled:
            return None
        if environment != "development":
            log.warning("llm_recorder_refused", environment=environment,
                        reason="RECORD_LLM_RESPONSES is for development only")  # fmt: skip
            return None
        log.info("llm_recorder_enabled", directory=str(directory), max_mb=max_mb)
        return cls(directory, max_bytes=int(max_mb * 1024 * 1024), secrets=secrets)

    async def record(
        self,
        *,
        provider: str,
        model: str,
        request: Mapping[str, Any],
        response: Mapping[str, Any] | None,
        status: int | None,
        headers: Mapping[str, str],
        latency_s: float,
        error: str | None = None,
    ) -> Path | None:
        """Write one call's record (off the event loop); None when the cap stopped it."""
        now = time.time()
        lowered = {k.lower(): v for k, v in headers.items()}
        version = {
            "headers": {h: lowered[h] for h in VERSION_HEADERS if h in lowered},
            "model": (response or {}).get("model"),
            "system_fingerprint": (response or {}).get("system_fingerprint"),
        }
        entry = {
            "time": datetime.fromtimestamp(now, UTC).isoformat(),
            "provider": provider,
            "model": model,
            "api_version": version,
            "status": status,
            "latency_s": round(latency_s, 6),
            "error": error,
            "request": self._redact(dict(request)),
            "response": None if response is None else self._redact(dict(response)),
            "response_headers": {h: lowered[h] for h in KEPT_HEADERS if h in lowered},
        }
        text = self._scrub(json.dumps(entry, indent=2, sort_keys=False, default=str))
        async with self._lock:
            return await asyncio.to_thread(self._write, text, version, provider, now)

    # -- in the worker thread ---------------------------------------------------------------

    def _write(self, text: str, version: dict[str, Any], provider: str, now: float) -> Path | None:
        data = text.encode()
        if self._used is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._used = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
        if self._used + len(data) > self.max_bytes:
            if not self._full:
                log.warning("llm_recorder_cap_reached", directory=str(self.directory),
                            max_bytes=self.max_bytes, used_bytes=self._used)  # fmt: skip
            self._full = True
            return None
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.directory / f"{stamp}-{provider}-{uuid.uuid4().hex[:8]}.json"
        atomic_write(path, data)
        self._used += len(data)
        self._update_index(version, provider, now)
        self.written += 1
        return path

    def _update_index(self, version: dict[str, Any], provider: str, now: float) -> None:
        index_path = self.directory / INDEX_NAME
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            index = {"versions": {}}
        key = json.dumps({"provider": provider, **version}, sort_keys=True)
        when = datetime.fromtimestamp(now, UTC).isoformat()
        seen = index["versions"].setdefault(
            key, {"provider": provider, **version, "first_seen": when, "count": 0}
        )
        seen["last_seen"] = when
        seen["count"] += 1
        before = index_path.stat().st_size if index_path.exists() else 0
        data = self._scrub(json.dumps(index, indent=2, sort_keys=True)).encode()
        atomic_write(index_path, data)
        assert self._used is not None
        self._used += len(data) - before

    # -- redaction ------------------------------------------------------------------------

    def _redact(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: REDACTED if SECRET_KEY.search(str(k)) else self._redact(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self._redact(v) for v in value]
        return value

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


def atomic_write(path: Path, data: bytes) -> None:
    """Write data to path so a reader sees the old file or the whole new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

