"""The LLM side: providers, the gateway (fresh 200 or queued 202), workers and the recorder.

An optional extra (`pip install 'sidecar[llm]'`, which brings httpx): the daemon never imports
this package. It talks to the daemon only through the public client, like any service would.
`pacing.py` is the client of the daemon's fleet-wide limiter (rates, pauses, the shared
breaker); `outbox.py` keeps each result until it reaches its caller (the `deliveries` and
`pickups` queues) and delivers callbacks; `webhooks.py` signs and verifies them (Standard
Webhooks); `callbacks.py` holds the callback-URL policy (no request forgery against internal
addresses) and the POST itself. The breaker is the daemon's, shared by the fleet (through
`pacing.py`).
"""

from __future__ import annotations

from sidecar.llm.callbacks import (
    AllowList,
    CallbackRefused,
    CallbackSender,
    DeliveryOutcome,
    Verdict,
    check_callback_url,
    deliver,
)
from sidecar.llm.errors import ProviderRejected, ProviderUnavailable, classify_status
from sidecar.llm.outbox import Deliverer, Delivery, Pickup
from sidecar.llm.pacing import Pacer, PacingOptions, pause_from_headers, scope_for
from sidecar.llm.providers import MockProvider, OpenAIProvider, Provider, ProviderReply
from sidecar.llm.webhooks import (
    WebhookSecretError,
    WebhookSigner,
    WebhookVerificationError,
    sign,
    verify,
)

__all__ = [
    "AllowList",
    "CallbackRefused",
    "CallbackSender",
    "Deliverer",
    "Delivery",
    "DeliveryOutcome",
    "MockProvider",
    "OpenAIProvider",
    "Pacer",
    "PacingOptions",
    "Pickup",
    "Provider",
    "ProviderRejected",
    "ProviderReply",
    "ProviderUnavailable",
    "Verdict",
    "WebhookSecretError",
    "WebhookSigner",
    "WebhookVerificationError",
    "check_callback_url",
    "classify_status",
    "deliver",
    "pause_from_headers",
    "scope_for",
    "sign",
    "verify",
]
