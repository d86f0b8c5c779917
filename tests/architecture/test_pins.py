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
LIBRARY_NAME = "sidecar_27999634272dedb2"
LIBRARY_SHA1 = "c849f7e0d7f820a87941386ea70c505b520458dd"
SCRIPT_SHAS = {
    "cancel": "376e93a5f7165b12a7d22ec69d4ed07ff85afbaf",
    "complete": "800a1c060c4b3f41f4a12e4b8c5d98725654fe5c",
    "dequeue": "015ceac2c07e7cbee1e5e06e7dca28d22c7b3acb",
    "discard": "d3cb6988c63a79c3c60acb3075e4ec8dfbb48ca0",
    "enqueue": "164afe7fb05252ec1b7f07fb0e08cad7ba237253",
    "extend": "d3fc151cb0fba18b8d139cbbb0861d9f057ef0b1",
    "fail": "6e1806b9b49984f68ddd0a733fbf867361670e35",
    "limit": "e2105b63c1b3130ced0cd6ca17d9c7336ae85767",
    "list": "296772732f3545b0cc6065bf09e3e3c41de984d2",
    "purge": "77e21793ae9e5b05177c570f8cb8f61a2d63c503",
    "requeue": "da8dc60729a85fa6f09f718c56aee0384b703b34",
    "stats": "3702be6392d86dd2f471094422d20274ce420dc1",
    "status": "5b2526cbf25433fd11a3779fd7dce41ba647d027",
    "sweep": "c1d019c16a1263a71a63a652eadcf9e2b4b34f0b",
    "take": "486c10179cdc19a324d4232777a745e6bd05de55",
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
