"""What a move of the code must not change: the Lua that runs in Redis, the public import paths."""

from __future__ import annotations

import hashlib
import importlib
import re
from pathlib import Path

import pytest

from sidecar.queue.redis import keys

ROOT = Path(__file__).resolve().parents[2]

# What runs in Redis. A move of the code must leave these alone; a change to a script changes
# them, and a daemon of the other version may meet its keys: say why in the commit.
LIBRARY_NAME = "sidecar_7ac7a6cd4c150b2d"
LIBRARY_SHA1 = "d0472054596623a7a7dd8302d00043ea9cd8a4f7"
SCRIPT_SHAS = {
    "cancel": "684da4543c2c770e1c181c2623bc7ad5e04abb68",
    "complete": "a9ab933b508b979c52fc7b9e67b0b0663c8539c2",
    "dequeue": "bf29f098376aafe01f36ff4bddd8255f31c97460",
    "discard": "5c8fddfc416238f8a0f265d175aec1e9501fd7eb",
    "enqueue": "5cf0bbc14ff5abdfa8a684075cc4ba97278d485a",
    "extend": "5bd71395a02838825e4f27dbdd81ed8267694910",
    "fail": "32a97ecba167932ecc16cdd78141a5c6ff5f4de0",
    "stats": "31b15d886f8b8ae670331316250e552399d846c5",
    "status": "045e7459fcfa5dc3414383796fc397cdfb5d99ef",
    "sweep": "2620a5e1e4f24f79cd2e3fa08feb5754df540c4b",
}


def test_the_lua_library_and_scripts_are_the_pinned_ones() -> None:
    assert keys.LIBRARY_NAME == LIBRARY_NAME
    assert hashlib.sha1(keys.LIBRARY.encode()).hexdigest() == LIBRARY_SHA1
    assert dict(keys.SCRIPT_SHAS) == SCRIPT_SHAS
    assert set(keys.FUNCTION_NAMES.values()) == {f"{LIBRARY_NAME}_{n}" for n in SCRIPT_SHAS}


# The public import paths: each package's face keeps what services, workers and operators
# import. Names the README and protocol.md use are read from them below, on top of these.
PUBLIC = {
    "sidecar.client": [
        "AsyncClient", "Client", "Handler", "PermanentFailure", "SidecarError",
        "SidecarUnavailable", "connect", "decode_payload", "item", "run_worker", "socket_path",
    ],
    "sidecar.config": [
        "SPECS", "ConfigError", "Settings", "default_socket_path", "default_state_dir",
        "parse_sentinel_url", "sentinel_hosts",
    ],
    "sidecar.protocol": [
        "REGISTRY", "SPECS", "OPS", "AnyRequest", "FrameReader", "OpSpec", "Reply", "OkReply",
        "ErrorReply", "append_frame", "decode_request", "encode_frame", "error_reply",
        "Hello", "Enqueue", "EnqueueItem", "Dequeue", "Extend", "Complete", "CompleteNext",
        "CompleteMany", "CompleteItem", "Fail", "Cancel", "Status", "Stats", "Health", "Metrics",
        "Job", "RequestInfo", "StatsResult", "HealthResult", "HelloResult", "Limits",
        "MAX_FRAME_LIMIT", "MAX_PAYLOAD_DEPTH",
    ],
    "sidecar.queue.redis": ["RedisQueue", "RedisKeys", "SCRIPT_ERRORS", "redis_client"],
    "sidecar.queue.local": ["LocalQueue", "Journal", "JournalError", "LocalState"],
    "sidecar.queue.resilient": ["ResilientQueue"],
    "sidecar.queue.build": ["build_queue", "build_local_queue", "build_redis_queue"],
    "sidecar.server": ["SidecarServer", "ServerState", "Ops", "StartupError"],
    "sidecar.metrics": ["DaemonMetrics", "MetricsListener", "CONTENT_TYPE"],
    "sidecar.errors": ["SidecarError", "QueueFull", "SidecarUnavailable", "StartupError"],
    "sidecar.models": ["QueueStatus", "QueuedRequest", "QueueStats", "HealthReport"],
}  # fmt: skip


def _documented() -> dict[str, set[str]]:
    """Every `from sidecar... import a, b` the README, the docs and protocol.md show."""
    found: dict[str, set[str]] = {}
    pages = [ROOT / "README.md", ROOT / "protocol.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        pattern = r"from (sidecar[\w.]*) import (?:\(([\w,\s]+)\)|([\w, ]+))"
        for module, wrapped, plain in re.findall(pattern, text):
            names = (wrapped or plain).split(",")
            found.setdefault(module, set()).update(n.strip() for n in names if n.strip())
    return found


def test_the_documents_show_imports() -> None:
    # Guards the scan below: the README's service and worker examples import from the client.
    assert {"AsyncClient", "run_worker"} <= _documented().get("sidecar.client", set())


@pytest.mark.parametrize("module", sorted(set(PUBLIC) | set(_documented())))
def test_each_public_name_imports_from_its_face(module: str) -> None:
    names = set(PUBLIC.get(module, [])) | _documented().get(module, set())
    face = importlib.import_module(module)
    assert sorted(n for n in names if not hasattr(face, n)) == []
