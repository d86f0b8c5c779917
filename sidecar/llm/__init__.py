"""The LLM side: providers, the gateway (fresh 200 or queued 202), workers and the recorder.

An optional extra (`pip install 'sidecar[llm]'`, which brings httpx): the daemon never imports
this package. It talks to the daemon only through the public client, like any service would.
`webhooks.py` signs and verifies result deliveries (Standard Webhooks); `callbacks.py` holds
the callback-URL policy (no request forgery against internal addresses) and the delivery.
"""

from __future__ import annotations

from sidecar.llm.breaker import Breaker, BreakerState
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
    "Breaker",
    "BreakerState",
    "CallbackRefused",
    "CallbackSender",
    "DeliveryOutcome",
    "MockProvider",
    "OpenAIProvider",
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
    "sign",
    "verify",
]
