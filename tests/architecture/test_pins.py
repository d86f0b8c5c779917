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
LIBRARY_NAME = "sidecar_6be7968ae8d0dadf"
LIBRARY_SHA1 = "423dae5b8284e1a4e218ea8c83a817aba4706618"
SCRIPT_SHAS = {
    "cancel": "878c1becfea64305d342f9e300b823326f116d9b",
    "complete": "e42b064667f43a64dd74e589b40b59251bc29625",
    "dequeue": "812ec8289512bb58272c2f22674610dbc6d7953d",
    "discard": "19a1e636518cef1b2cb5a98241ac13855785438c",
    "enqueue": "8ada55dc2e761a4892d64f585e913d31381d1456",
    "extend": "3f0972c8456aec1edaa11b4c8f74eba90290f34c",
    "fail": "71c0a36f1abd28bc64e1ce80f3ba4f15b0e63963",
    "stats": "236af0f5387dcae840e4a58ce7dda2347b9bf59c",
    "status": "c4dcf46aa6289d98cd759ce96c23e45e0f060855",
    "sweep": "264702a53015a2b0f78d4a3ad7f9084dbbc6d8e3",
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
