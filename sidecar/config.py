"""Settings from the environment, validated once at start with errors that name the variable."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from sidecar.models import MAX_LEASE_S, MAX_RETENTION_S, MAX_TTL_S, MAX_WAIT_S

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting; the message names the variable, the value and what is accepted."""


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    """A path an unprivileged user can bind: $XDG_RUNTIME_DIR, else a per-uid folder in /tmp."""
    env = os.environ if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return str(Path(runtime) / "sidecar" / "sidecar.sock")
    return f"/tmp/sidecar-{os.getuid()}/sidecar.sock"


def default_state_dir(env: Mapping[str, str] | None = None) -> str:
    """Where the local journal lives: $XDG_STATE_HOME/sidecar, else ~/.local/state/sidecar."""
    env = os.environ if env is None else env
    state = env.get("XDG_STATE_HOME")
    if state:
        return str(Path(state) / "sidecar")
    home = env.get("HOME") or str(Path.home())
    return str(Path(home) / ".local" / "state" / "sidecar")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every tunable of the daemon; the environment variable of each is in ENV_NAMES."""

    # Local queue limits. 1000 items / 100 MB fit a host's spare memory during an outage of
    # tens of minutes at typical LLM request sizes (a few KB each).
    queue_max_size: int = 1000
    queue_max_memory_mb: float = 100.0
    # The breaker opens at the high watermark and closes at the low one; the gap stops it
    # flapping on every enqueue/dequeue pair near the limit.
    queue_high_watermark: float = 0.8
    queue_low_watermark: float = 0.6
    queue_request_ttl_hours: float = 4.0
    # A lease long enough for one slow LLM call; the worker helper extends it while it runs.
    queue_lease_s: float = 60.0
    # Three deliveries ride out a worker crash or a transient provider error without looping.
    queue_max_attempts: int = 3
    # Terminal statuses stay readable for a day: long enough for a service to poll an outcome.
    queue_retention_hours: float = 24.0
    # The local queue's cap on finished records kept for status reads (~330 B each): 100k is
    # about 33 MB, a day of retention at about one request a second.
    queue_max_retained: int = 100_000
    # What a queue_full reply suggests as a wait before retrying.
    queue_retry_after_s: float = 5.0
    record_llm_responses: bool = False
    environment: str = "development"
    socket_path: str = ""
    redis_url: str | None = None
    redis_password_file: str | None = None
    redis_key_prefix: str = "sidecar"
    # About a second: a frozen Redis must fail over quickly, not hold a caller for a minute.
    redis_connect_timeout_s: float = 1.0
    redis_timeout_s: float = 1.0
    # Sentinel: the sentinels (host:port,...) and the name of the primary they watch. Set
    # both, or write REDIS_URL=redis+sentinel://host:port,host:port/master[/db].
    redis_sentinels: str | None = None
    redis_sentinel_master: str | None = None
    # REDIS_URL names one node of a Redis Cluster; the client finds the others.
    redis_cluster: bool = False
    # 0: an enqueue is acknowledged once the primary has it (async replication may lose it in
    # a failover). N: only once N replicas confirm (WAIT); else it is answered locally.
    redis_min_replicas_ack: int = 0
    # Half the default command timeout: a lagging replica fails the write over quickly.
    redis_replicas_ack_timeout_ms: int = 500
    # 8 MiB frames carry a batch of large prompts; 1 MiB per payload is far above a normal request.
    max_frame_bytes: int = 8 * 1024 * 1024
    max_payload_bytes: int = 1024 * 1024
    max_batch: int = 1000
    max_connections: int = 1024
    # The longest a dequeue may wait for work before answering with nothing.
    max_wait_s: float = 30.0
    # How long shutdown waits for in-flight requests before closing connections.
    drain_timeout_s: float = 5.0
    log_level: str = "info"
    # The local store's journal. systemd's StateDirectory=sidecar sets /var/lib/sidecar.
    state_dir: str = ""
    # always: an enqueue is acknowledged once its record is synced (one fsync per loop pass);
    # off: written but not synced, so kept on a crash of the daemon, lost on one of the machine.
    journal_fsync: str = "always"
    # Snapshot plus segments; about ten times the default memory limit, so the journal only
    # refuses work when the disk is much smaller than the queue it has to hold.
    journal_max_mb: float = 1024.0
    # A group whose members may connect: the socket folder is then 0750 and setgid to it.
    socket_group: int | None = None
    # Peers allowed by SO_PEERCRED (uid or primary gid); both empty: anyone who can reach the
    # socket file.
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    # A started frame must finish this soon, and replies may stay unread this long: a local
    # client moves a whole 8 MiB frame in milliseconds, so 10 s only cuts off a stalled one.
    frame_timeout_s: float = 10.0
    # Close connections idle this long; 0 keeps them (a service's shared client idles for
    # hours between bursts, and reconnecting is its only cost).
    idle_timeout_s: float = 0.0
    # Bytes of partial frames and unanswered requests held across all connections: 64 MB is
    # eight maximal frames, far above what well-behaved clients hold at once.
    max_buffered_mb: float = 64.0
    # The HTTP listener for Prometheus (GET /metrics): off unless set; a bare port or :port
    # binds loopback only, since the numbers describe this host's traffic.
    metrics_addr: tuple[str, int] | None = None
    # -- the LLM side (sidecar.llm; the daemon itself never reads these) --
    # On by default: a provider outage queues requests (202) instead of failing them; off gives
    # the old behaviour (503) so a service can be deployed first and switched per environment.
    llm_queue_enabled: bool = True
    # Deliveries of a queued LLM request: a worker's probe while the provider is down uses one,
    # so an outage of minutes must not exhaust them (the daemon's default of 3 would).
    llm_queue_max_attempts: int = 10
    # "": the mock in development, the OpenAI-compatible provider in production.
    llm_provider: str = ""
    llm_base_url: str = "https://api.openai.com/v1"
    llm_model: str = "gpt-4o-mini"
    # The API key comes from LLM_API_KEY or this file; it is never kept in Settings or logged.
    llm_api_key_file: str | None = None
    # A refused or silent provider must send the request to the queue quickly; a completion
    # itself may take a while to stream back.
    llm_connect_timeout_s: float = 2.0
    llm_read_timeout_s: float = 60.0
    # Five failures in a row open the breaker; after 10 s one probe may close it again.
    llm_breaker_failures: int = 5
    llm_breaker_reset_s: float = 10.0
    llm_response_log_dir: str = "llm_response_logs"
    # The recorder stops writing (with one log line) once its folder holds this much.
    llm_response_log_max_mb: float = 100.0

    @property
    def journal_max_bytes(self) -> int:
        return int(self.journal_max_mb * 1024 * 1024)

    @property
    def queue_max_memory_bytes(self) -> int:
        return int(self.queue_max_memory_mb * 1024 * 1024)

    @property
    def max_buffered_bytes(self) -> int:
        return int(self.max_buffered_mb * 1024 * 1024)

    @property
    def request_ttl_s(self) -> float:
        return self.queue_request_ttl_hours * 3600.0

    @property
    def retention_s(self) -> float:
        return self.queue_retention_hours * 3600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; ConfigError lists each bad one on its own line."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in fields(cls):
            name = ENV_NAMES[f.name]
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            parse, accepted = _PARSERS[f.name]
            try:
                values[f.name] = parse(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is invalid: expected {accepted}")
        if not values.get("socket_path"):
            values["socket_path"] = default_socket_path(env)
        if not values.get("state_dir"):
            values["state_dir"] = default_state_dir(env)
        if not problems:
            low = values.get("queue_low_watermark", cls.queue_low_watermark)
            high = values.get("queue_high_watermark", cls.queue_high_watermark)
            if low >= high:
                problems.append(
                    f"QUEUE_LOW_WATERMARK={low!r} is invalid: expected a number below "
                    f"QUEUE_HIGH_WATERMARK ({high!r})"
                )
            budget = values.get("max_buffered_mb", cls.max_buffered_mb) * 1024 * 1024
            frame = values.get("max_frame_bytes", cls.max_frame_bytes)
            if budget < frame:
                problems.append(
                    f"SIDECAR_MAX_BUFFERED_MB={budget / 1024 / 1024!r} is invalid: expected at "
                    f"least one whole frame (SIDECAR_MAX_FRAME_BYTES={frame})"
                )
        if not problems:
            problems += _redis_layout(values)
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(**values)

    def redacted_redis_url(self) -> str | None:
        """The Redis URL with any password (user part or query) replaced, safe for logs."""
        if self.redis_url is None:
            return None
        from urllib.parse import parse_qsl, urlencode, urlsplit

        parts = urlsplit(self.redis_url)
        netloc = parts.netloc
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            netloc = f"{parts.username or ''}:***@{host}"
        query = [
            (k, "***" if k.lower() == "password" else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        # Built by hand: urlunsplit drops the empty host of unix:///path URLs.
        url = f"{parts.scheme}://{netloc}{parts.path}"
        return f"{url}?{urlencode(query, safe='*')}" if query else url


def _redis_layout(values: dict[str, Any]) -> list[str]:
    """Check the Sentinel and Cluster settings together; fill REDIS_URL from the sentinels."""
    sentinels = values.get("redis_sentinels")
    master = values.get("redis_sentinel_master")
    url = values.get("redis_url")
    if (sentinels is None) != (master is None):
        return ["REDIS_SENTINELS and REDIS_SENTINEL_MASTER are invalid: set both or neither"]
    if sentinels is not None:
        if url is not None:
            return ["REDIS_URL is invalid with REDIS_SENTINELS: set one or the other"]
        url = values["redis_url"] = f"redis+sentinel://{sentinels}/{master}"
    if values.get("redis_cluster") and (url is None or not url.startswith("redis")):
        return ["REDIS_CLUSTER is invalid without a redis:// REDIS_URL naming one cluster node"]
    if values.get("redis_cluster") and url is not None and url.startswith("redis+sentinel"):
        return ["REDIS_CLUSTER is invalid with Sentinel: a cluster fails over by itself"]
    return []


def sentinel_hosts(raw: str) -> list[tuple[str, int]]:
    """host:port,host:port as pairs; ValueError when one is malformed."""
    hosts: list[tuple[str, int]] = []
    for part in raw.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(raw)
        hosts.append((host, int(port)))
    return hosts


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """redis+sentinel://host:port,.../master[/db] as (sentinels, master, db); ValueError."""
    rest = url.removeprefix("redis+sentinel://")
    hosts, _, path = rest.partition("/")
    master, _, db = path.partition("/")
    if not master or (db and not db.isdigit()):
        raise ValueError(url)
    return sentinel_hosts(hosts), master, int(db or 0)


def _sentinels(raw: str) -> str:
    return ",".join(f"{host}:{port}" for host, port in sentinel_hosts(raw))


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[
    [str], float
]:
    def parse(raw: str) -> float:
        value = float(raw)
        if math.isnan(value) or math.isinf(value):
            raise ValueError(raw)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise ValueError(raw)
        if hi is not None and value > hi:
            raise ValueError(raw)
        return value

    return parse


def _whole(lo: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < lo:
            raise ValueError(raw)
        return value

    return parse


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(raw)
        return value

    return parse


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError(raw)
    return raw


def _ids(raw: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    if not values or any(v < 0 for v in values):
        raise ValueError(raw)
    return values


def _group(raw: str) -> int:
    import grp

    raw = raw.strip()
    if raw.isdigit():
        return int(raw)
    try:
        return grp.getgrnam(raw).gr_gid
    except KeyError:
        raise ValueError(raw) from None


def _redis_url(raw: str) -> str:
    if raw.startswith("redis+sentinel://"):
        parse_sentinel_url(raw)
        return raw
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(raw)
    return raw


def _listen_addr(raw: str) -> tuple[str, int]:
    """host:port, [v6]:port, :port or port; without a host, 127.0.0.1."""
    raw = raw.strip()
    host, sep, port = raw.rpartition(":")
    if not sep:
        host, port = "", raw
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535 or any(c in host for c in "[]/ "):
        raise ValueError(raw)
    return host or "127.0.0.1", int(port)


def _prefix(raw: str) -> str:
    # Braces would break the {prefix} hash tag that keeps every key in one cluster slot.
    if not raw or any(c in raw for c in "{} \t\n"):
        raise ValueError(raw)
    return raw


ENV_NAMES: dict[str, str] = {
    "queue_max_size": "QUEUE_MAX_SIZE",
    "queue_max_memory_mb": "QUEUE_MAX_MEMORY_MB",
    "queue_high_watermark": "QUEUE_HIGH_WATERMARK",
    "queue_low_watermark": "QUEUE_LOW_WATERMARK",
    "queue_request_ttl_hours": "QUEUE_REQUEST_TTL_HOURS",
    "queue_lease_s": "QUEUE_LEASE_SECONDS",
    "queue_max_attempts": "QUEUE_MAX_ATTEMPTS",
    "queue_retention_hours": "QUEUE_RETENTION_HOURS",
    "queue_max_retained": "QUEUE_MAX_RETAINED",
    "queue_retry_after_s": "QUEUE_RETRY_AFTER_SECONDS",
    "record_llm_responses": "RECORD_LLM_RESPONSES",
    "environment": "ENVIRONMENT",
    "socket_path": "SIDECAR_SOCKET",
    "redis_url": "REDIS_URL",
    "redis_password_file": "REDIS_PASSWORD_FILE",
    "redis_key_prefix": "REDIS_KEY_PREFIX",
    "redis_connect_timeout_s": "REDIS_CONNECT_TIMEOUT_SECONDS",
    "redis_timeout_s": "REDIS_TIMEOUT_SECONDS",
    "redis_sentinels": "REDIS_SENTINELS",
    "redis_sentinel_master": "REDIS_SENTINEL_MASTER",
    "redis_cluster": "REDIS_CLUSTER",
    "redis_min_replicas_ack": "REDIS_MIN_REPLICAS_ACK",
    "redis_replicas_ack_timeout_ms": "REDIS_REPLICAS_ACK_TIMEOUT_MS",
    "max_frame_bytes": "SIDECAR_MAX_FRAME_BYTES",
    "max_payload_bytes": "SIDECAR_MAX_PAYLOAD_BYTES",
    "max_batch": "SIDECAR_MAX_BATCH",
    "max_connections": "SIDECAR_MAX_CONNECTIONS",
    "max_wait_s": "SIDECAR_MAX_WAIT_SECONDS",
    "drain_timeout_s": "SIDECAR_DRAIN_TIMEOUT_SECONDS",
    "log_level": "SIDECAR_LOG_LEVEL",
    "state_dir": "SIDECAR_STATE_DIR",
    "journal_fsync": "SIDECAR_JOURNAL_FSYNC",
    "journal_max_mb": "SIDECAR_JOURNAL_MAX_MB",
    "socket_group": "SIDECAR_SOCKET_GROUP",
    "allowed_uids": "SIDECAR_ALLOWED_UIDS",
    "allowed_gids": "SIDECAR_ALLOWED_GIDS",
    "frame_timeout_s": "SIDECAR_FRAME_TIMEOUT_SECONDS",
    "idle_timeout_s": "SIDECAR_IDLE_TIMEOUT_SECONDS",
    "max_buffered_mb": "SIDECAR_MAX_BUFFERED_MB",
    "metrics_addr": "SIDECAR_METRICS_ADDR",
    "llm_queue_enabled": "LLM_QUEUE_ENABLED",
    "llm_queue_max_attempts": "LLM_QUEUE_MAX_ATTEMPTS",
    "llm_provider": "LLM_PROVIDER",
    "llm_base_url": "LLM_BASE_URL",
    "llm_model": "LLM_MODEL",
    "llm_api_key_file": "LLM_API_KEY_FILE",
    "llm_connect_timeout_s": "LLM_CONNECT_TIMEOUT_SECONDS",
    "llm_read_timeout_s": "LLM_READ_TIMEOUT_SECONDS",
    "llm_breaker_failures": "LLM_BREAKER_FAILURES",
    "llm_breaker_reset_s": "LLM_BREAKER_RESET_SECONDS",
    "llm_response_log_dir": "LLM_RESPONSE_LOG_DIR",
    "llm_response_log_max_mb": "LLM_RESPONSE_LOG_MAX_MB",
}

_PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "queue_max_size": (_whole(1), "a whole number >= 1"),
    "queue_max_memory_mb": (_number(0, lo_open=True), "a number of megabytes > 0"),
    "queue_high_watermark": (_number(0, 1, lo_open=True), "a fraction in (0, 1]"),
    "queue_low_watermark": (_number(0, 1), "a fraction in [0, 1) below QUEUE_HIGH_WATERMARK"),
    # The duration maxima are the protocol's (sidecar.models): every store can represent them.
    "queue_request_ttl_hours": (
        _number(0, MAX_TTL_S / 3600, lo_open=True),
        f"a number of hours > 0 and <= {MAX_TTL_S / 3600:g}",
    ),
    "queue_lease_s": (
        _number(0, MAX_LEASE_S, lo_open=True),
        f"a number of seconds > 0 and <= {MAX_LEASE_S:g}",
    ),
    "queue_max_attempts": (_whole(1), "a whole number >= 1"),
    "queue_retention_hours": (
        _number(0, MAX_RETENTION_S / 3600),
        f"a number of hours >= 0 and <= {MAX_RETENTION_S / 3600:g}",
    ),
    "queue_max_retained": (_whole(0), "a whole number >= 0"),
    "queue_retry_after_s": (_number(0), "a number of seconds >= 0"),
    "record_llm_responses": (_bool, "true or false"),
    "environment": (_choice("development", "production"), "development or production"),
    "socket_path": (_text, "a filesystem path"),
    "redis_url": (
        _redis_url,
        "a redis://, rediss://, unix:// or redis+sentinel://host:port,.../master[/db] URL",
    ),
    "redis_password_file": (_text, "a file path"),
    "redis_key_prefix": (_prefix, "a non-empty name without braces or spaces"),
    "redis_connect_timeout_s": (_number(0, lo_open=True), "a number of seconds > 0"),
    "redis_timeout_s": (_number(0, lo_open=True), "a number of seconds > 0"),
    "redis_sentinels": (_sentinels, "host:port[,host:port...]"),
    "redis_sentinel_master": (_text, "the name the sentinels monitor the primary under"),
    "redis_cluster": (_bool, "true or false"),
    "redis_min_replicas_ack": (_whole(0), "a whole number of replicas >= 0"),
    "redis_replicas_ack_timeout_ms": (_whole(1), "a whole number of milliseconds >= 1"),
    "max_frame_bytes": (_whole(1024), "a whole number of bytes >= 1024"),
    "max_payload_bytes": (_whole(1), "a whole number of bytes >= 1"),
    "max_batch": (_whole(1), "a whole number >= 1"),
    "max_connections": (_whole(1), "a whole number >= 1"),
    "max_wait_s": (_number(0, MAX_WAIT_S), f"a number of seconds >= 0 and <= {MAX_WAIT_S:g}"),
    "drain_timeout_s": (_number(0), "a number of seconds >= 0"),
    "log_level": (_choice("debug", "info", "warning", "error"), "debug, info, warning or error"),
    "state_dir": (_text, "a folder path"),
    "journal_fsync": (_choice("always", "off"), "always or off"),
    "journal_max_mb": (_number(1), "a number of megabytes >= 1"),
    "socket_group": (_group, "a group name or numeric gid"),
    "allowed_uids": (_ids, "comma-separated numeric uids"),
    "allowed_gids": (_ids, "comma-separated numeric gids"),
    "frame_timeout_s": (_number(0, lo_open=True), "a number of seconds > 0"),
    "idle_timeout_s": (_number(0), "a number of seconds >= 0 (0: never)"),
    "max_buffered_mb": (_number(0, lo_open=True), "a number of megabytes > 0"),
    "metrics_addr": (_listen_addr, "host:port, :port or a port (0-65535; loopback by default)"),
    "llm_queue_enabled": (_bool, "true or false"),
    "llm_queue_max_attempts": (_whole(1), "a whole number >= 1 and <= 1000"),
    "llm_provider": (_choice("mock", "openai"), "mock or openai"),
    "llm_base_url": (_text, "an http:// or https:// URL"),
    "llm_model": (_text, "a model name"),
    "llm_api_key_file": (_text, "a file path"),
    "llm_connect_timeout_s": (_number(0, lo_open=True), "a number of seconds > 0"),
    "llm_read_timeout_s": (_number(0, lo_open=True), "a number of seconds > 0"),
    "llm_breaker_failures": (_whole(1), "a whole number >= 1"),
    "llm_breaker_reset_s": (_number(0, lo_open=True), "a number of seconds > 0"),
    "llm_response_log_dir": (_text, "a folder path"),
    "llm_response_log_max_mb": (_number(0, lo_open=True), "a number of megabytes > 0"),
}
