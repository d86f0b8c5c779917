"""sidecar: a per-host daemon that owns a resilient priority queue of LLM requests."""

from __future__ import annotations

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
