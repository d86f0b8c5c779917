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
LIBRARY_NAME = "sidecar_9c7bf74e038ca49f"
LIBRARY_SHA1 = "f1655fcc1a5cba8acfa15b9c071b96701876364f"
SCRIPT_SHAS = {
    "cancel": "a8a875937ed8690c1a1e02aaa0bd0acd59415f53",
    "complete": "c073b0811fbff697a705ad9678b159fe0594671b",
    "dequeue": "9575f225a89ae5e0824211dc279b99782602d13e",
    "discard": "fecc65952840ebf2da27a7a7440182f4eacdd630",
    "enqueue": "5032801dbca55a7fba651be0500b2a3e2cd41b1f",
    "extend": "1ae110633276b8d28acffb227af4162c761e5b6d",
    "fail": "7eec7e7551d1612c6e963ba53aebb46dc042c623",
    "limit": "f57df617ff5911c96a4fa52dba754f91c17d5e8e",
    "list": "afc668a9df683218a05246637293272284e13f52",
    "purge": "eaf38d4a3db30d8a747a930aadc8e51cab73b0c1",
    "requeue": "c2b264839b04fc365ed0d0bcea1e4a7aa3daf127",
    "stats": "764f76c2b4dc60b32829b765224eb46efea8f512",
    "status": "8c32aab9a4f39ab7175fc4198df841043de39b7a",
    "sweep": "d9ad697adab3e747622762a8190597a9fdcea841",
    "take": "4c45e9c98eeff636b743e3a19f1630285961804f",
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
