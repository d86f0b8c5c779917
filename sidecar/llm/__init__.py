"""The LLM side: providers, the gateway (fresh 200 or queued 202), workers and the recorder.

An optional extra (`pip install 'sidecar[llm]'`, which brings httpx): the daemon never imports
this package. It talks to the daemon only through the public client, like any service would.
"""

from __future__ import annotations

from sidecar.llm.breaker import Breaker, BreakerState
from sidecar.llm.errors import ProviderRejected, ProviderUnavailable, classify_status
from sidecar.llm.providers import MockProvider, OpenAIProvider, Provider, ProviderReply

__all__ = [
    "Breaker",
    "BreakerState",
    "MockProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderRejected",
    "ProviderReply",
    "ProviderUnavailable",
    "classify_status",
]
