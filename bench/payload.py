"""The request the benchmarks enqueue: a realistic chat-completion call of about 1.5 KB."""

from __future__ import annotations

from typing import Any

import msgspec

# The TTL the BullMQ rows and the relay give each request (BullMQ has none for a waiting job).
TTL_S = 3600.0

_SYSTEM = (
    "You are a support assistant for an online store. Answer in the customer's language, "
    "cite the order number when you use it, never invent a tracking code, and hand the "
    "conversation to a human when the customer asks for a refund over 200 EUR. "
) * 2
_USER = (
    "Hello, I ordered a pair of running shoes (order 4411-2093) ten days ago and the "
    "tracking page has said 'label created' since then. Could you tell me where the parcel "
    "is, and whether I can still change the size from 42 to 43 before it ships? Thanks! "
) * 2


def llm_request() -> dict[str, Any]:
    """One chat-completion request as a service would hand it to the sidecar."""
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": _USER},
        ],
        "temperature": 0.2,
        "max_tokens": 512,
        "metadata": {
            "tenant": "acme-eu",
            "service": "support-web",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "callback": "https://support.internal/llm/results",
        },
    }


PAYLOAD_BYTES = len(msgspec.msgpack.encode(llm_request()))
