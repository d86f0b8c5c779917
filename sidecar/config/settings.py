"""The settings table: each setting once (variable, parser, default, doc), read into Settings.

Validated once at start, with errors that name the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from sidecar.config import parse as p
from sidecar.config.daemon import DaemonSettings
from sidecar.config.llm import LLMSettings
from sidecar.config.parse import default_socket_path, default_state_dir
from sidecar.config.spec import ConfigError, Spec, shown_value
from sidecar.config.web import WebSettings


# Bases in this order so the table lists the daemon's rows first (dataclass fields follow the
# reverse of the method resolution order).
@dataclass(frozen=True, kw_only=True)
class Settings(WebSettings, LLMSettings, DaemonSettings):
    """Every tunable of the daemon, each declared once with its variable, parser and doc.

    The settings table in docs/configuration.md (`python -m sidecar.config.docs --write`) and
    `sidecar serve --help` are generated from these fields (sidecar/config/docs.py).
    """

    @property
    def journal_max_bytes(self) -> int:
        return int(self.journal_max_mb * 1024 * 1024)

    @property
    def journal_compact_bytes(self) -> int:
        return int(self.journal_compact_mb * 1024 * 1024)

    @property
    def queue_max_memory_bytes(self) -> int:
        return int(self.queue_max_memory_mb * 1024 * 1024)

    @property
    def outbox_max_memory_bytes(self) -> int:
        return int(self.outbox_max_memory_mb * 1024 * 1024)

    @property
    def queue_max_dead_bytes(self) -> int:
        return int(self.queue_max_dead_mb * 1024 * 1024)

    @property
    def max_buffered_bytes(self) -> int:
        return int(self.max_buffered_mb * 1024 * 1024)

    @property
    def request_ttl_s(self) -> float:
        return self.queue_request_ttl_hours * 3600.0

    @property
    def retention_s(self) -> float:
        return self.queue_retention_hours * 3600.0

    @property
    def dead_retention_s(self) -> float:
        return self.queue_dead_retention_hours * 3600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; ConfigError lists each bad one on its own line."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        problems: list[str] = []
        for name, spec in SPECS.items():
            raw = env.get(spec.env)
            if raw is None or raw == "":
                continue
            try:
                values[name] = spec.parse(raw)
            except ValueError:
                shown = shown_value(spec, raw)
                problems.append(f"{spec.env}={shown} is invalid: expected {spec.accepted}")
        if not values.get("socket_path"):
            values["socket_path"] = default_socket_path(env)
        if not values.get("state_dir"):
            values["state_dir"] = default_state_dir(env)
        if not problems:
            problems += p.bounds(values, lambda name: getattr(cls, name))
        if not problems:
            problems += p.redis_layout(values)
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(**values)

    def redacted_redis_url(self) -> str | None:
        """The Redis URL with any password (user part or query) replaced, safe for logs."""
        return None if self.redis_url is None else p.redacted_url(self.redis_url)


# The table itself: every field of Settings is a setting (a field without one fails here, at
# import, rather than silently never reading its variable).
SPECS: dict[str, Spec] = {f.name: f.metadata["setting"] for f in fields(Settings)}
