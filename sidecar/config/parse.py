"""The parsers of the settings table, the defaults computed at start, the checks of settings
that bound one another, and the Redis URL as logs may show it.

A parser raises ValueError for a value it does not accept; `Settings.from_env` turns that into
a line naming the variable, the value and the setting's accepted text.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Callable[
    [str], float
]:
    """A finite float in [lo, hi] (or (lo, hi] with lo_open)."""

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


def whole(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An int in [lo, hi]."""

    def parse(raw: str) -> int:
        value = int(raw.strip())
        if value < lo or (hi is not None and value > hi):
            raise ValueError(raw)
        return value

    return parse


def boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def choice(*options: str) -> Callable[[str], str]:
    """One of the options, case-insensitive; returned in lower case."""

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(raw)
        return value

    return parse


def text(raw: str) -> str:
    if not raw.strip():
        raise ValueError(raw)
    return raw


def http_url(raw: str) -> str:
    if not raw.strip().startswith(("http://", "https://")):
        raise ValueError(raw)
    return raw.strip()


def ids(raw: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    if not values or any(v < 0 for v in values):
        raise ValueError(raw)
    return values


def group(raw: str) -> int:
    import grp

    raw = raw.strip()
    if raw.isdigit():
        return int(raw)
    try:
        return grp.getgrnam(raw).gr_gid
    except KeyError:
        raise ValueError(raw) from None


def redis_url(raw: str) -> str:
    if raw.startswith("redis+sentinel://"):
        parse_sentinel_url(raw)
        return raw
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(raw)
    return raw


def listen_addr(raw: str) -> tuple[str, int]:
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


def key_prefix(raw: str) -> str:
    # Braces would break the {prefix} hash tag that keeps every key in one cluster slot.
    if not raw or any(c in raw for c in "{} \t\n"):
        raise ValueError(raw)
    return raw


def sentinels(raw: str) -> str:
    return ",".join(f"{host}:{port}" for host, port in sentinel_hosts(raw))


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


def redacted_url(url: str) -> str:
    """The URL with any password (user part or query) replaced, safe for logs."""
    parts = urlsplit(url)
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
    base = f"{parts.scheme}://{netloc}{parts.path}"
    return f"{base}?{urlencode(query, safe='*')}" if query else base


def url_without_password(raw: str) -> str:
    """The URL as given when it holds no password, else redacted_url's form (for errors)."""
    parts = urlsplit(raw)
    if parts.password is None and "password=" not in parts.query.lower():
        return raw
    return redacted_url(raw)


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


# -- checks across settings ---------------------------------------------------------------


def bounds(values: dict[str, Any], default: Callable[[str], Any]) -> list[str]:
    """Check the settings that bound one another (each alone was valid); `default` of a name."""
    problems: list[str] = []
    low = values.get("queue_low_watermark", default("queue_low_watermark"))
    high = values.get("queue_high_watermark", default("queue_high_watermark"))
    if low >= high:
        problems.append(
            f"QUEUE_LOW_WATERMARK={low!r} is invalid: expected a number below "
            f"QUEUE_HIGH_WATERMARK ({high!r})"
        )
    budget = values.get("max_buffered_mb", default("max_buffered_mb")) * 1024 * 1024
    frame = values.get("max_frame_bytes", default("max_frame_bytes"))
    if budget < frame:
        problems.append(
            f"SIDECAR_MAX_BUFFERED_MB={budget / 1024 / 1024!r} is invalid: expected at "
            f"least one whole frame (SIDECAR_MAX_FRAME_BYTES={frame})"
        )
    first = values.get("redis_probe_initial_s", default("redis_probe_initial_s"))
    most = values.get("redis_probe_max_s", default("redis_probe_max_s"))
    if first > most:
        problems.append(
            f"REDIS_PROBE_INITIAL_SECONDS={first!r} is invalid: expected at most "
            f"REDIS_PROBE_MAX_SECONDS ({most!r})"
        )
    first = values.get("llm_retry_backoff_base_s", default("llm_retry_backoff_base_s"))
    most = values.get("llm_retry_backoff_max_s", default("llm_retry_backoff_max_s"))
    if first > most:
        problems.append(
            f"LLM_RETRY_BACKOFF_BASE_SECONDS={first!r} is invalid: expected at most "
            f"LLM_RETRY_BACKOFF_MAX_SECONDS ({most!r})"
        )
    return problems


def redis_layout(values: dict[str, Any]) -> list[str]:
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
    return redis_credentials(values, url)


# -- checks across settings: TLS and the sentinels' password --------------------------------

_TLS_FILES = (
    ("redis_tls_ca_file", "REDIS_TLS_CA_FILE"),
    ("redis_tls_cert_file", "REDIS_TLS_CERT_FILE"),
    ("redis_tls_key_file", "REDIS_TLS_KEY_FILE"),
)


def redis_credentials(values: dict[str, Any], url: str | None) -> list[str]:
    """Check the TLS files and the sentinels' password against the layout `url` names.

    A setting that would be silently ignored is refused: TLS files without a rediss:// URL
    (Sentinel over TLS is not supported), a client certificate without its key or the other
    way round, a sentinel password without sentinels.
    """
    problems: list[str] = []
    cert = values.get("redis_tls_cert_file")
    key = values.get("redis_tls_key_file")
    if (cert is None) != (key is None):
        problems.append(
            "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE are invalid: set both (the client "
            "certificate and its private key) or neither"
        )
    tls = [env for name, env in _TLS_FILES if values.get(name) is not None]
    if tls and (url is None or not url.startswith("rediss://")):
        problems.append(
            f"{', '.join(tls)} {'is' if len(tls) == 1 else 'are'} invalid without a rediss:// "
            "REDIS_URL: the daemon speaks TLS to Redis only through a rediss:// URL (one "
            "server or a cluster node; not Sentinel)"
        )
    sentinel = url is not None and url.startswith("redis+sentinel://")
    if values.get("redis_sentinel_password_file") is not None and not sentinel:
        problems.append(
            "REDIS_SENTINEL_PASSWORD_FILE is invalid without Sentinel (REDIS_SENTINELS and "
            "REDIS_SENTINEL_MASTER, or a redis+sentinel:// REDIS_URL)"
        )
    return problems


# -- the LLM side's webhook settings -------------------------------------------------------------

WEBHOOK_SECRET_PREFIX = "whsec_"
# Standard Webhooks: a symmetric secret is 24 to 64 random bytes (192 to 512 bits).
WEBHOOK_SECRET_MIN_BYTES = 24
WEBHOOK_SECRET_MAX_BYTES = 64


class Secrets(tuple[str, ...]):
    """Secrets as a tuple whose repr never shows them (Settings may be printed or logged)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{len(self)} secret(s), redacted>"

    __str__ = __repr__


def decode_webhook_secret(secret: str) -> bytes:
    """The key of one `whsec_<base64>` secret; ValueError saying what is wrong (never the value)."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"a secret must start with {WEBHOOK_SECRET_PREFIX!r}")
    encoded = secret[len(WEBHOOK_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"the part after {WEBHOOK_SECRET_PREFIX!r} is not base64") from None
    if not WEBHOOK_SECRET_MIN_BYTES <= len(key) <= WEBHOOK_SECRET_MAX_BYTES:
        raise ValueError(
            f"a secret must decode to {WEBHOOK_SECRET_MIN_BYTES} to {WEBHOOK_SECRET_MAX_BYTES} "
            f"bytes, this one is {len(key)}"
        )
    return key


def webhook_secrets(raw: str) -> tuple[str, ...]:
    """Space-separated `whsec_<base64>` secrets (several while one is rotated), each checked."""
    parts = raw.split()
    if not parts:
        raise ValueError("no secret")
    for part in parts:
        decode_webhook_secret(part)
    return Secrets(parts)


def host_list(raw: str) -> tuple[str, ...]:
    """Comma- or space-separated host names, IP addresses and CIDRs, normalised (lower case,
    a name's trailing dot removed, a CIDR's host bits cleared); ValueError naming a bad entry."""
    label = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
    entries: list[str] = []
    for part in raw.replace(",", " ").split():
        entry = part.strip().lower()
        try:
            if "/" in entry:
                entries.append(str(ipaddress.ip_network(entry, strict=False)))
            else:
                entries.append(str(ipaddress.ip_address(entry.strip("[]"))))
            continue
        except ValueError:
            pass
        name = entry.removesuffix(".")
        numeric = name.rpartition(".")[2].isdigit()  # 10.0.0.300: a bad address, not a name
        if len(name) > 253 or numeric or not re.fullmatch(rf"{label}(\.{label})*", name):
            raise ValueError(f"{part!r} is neither a host name, an IP address nor a CIDR")
        entries.append(name)
    if not entries:
        raise ValueError(raw)
    return tuple(dict.fromkeys(entries))
