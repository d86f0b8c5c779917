"""Redis I/O behind one seam: client construction and error classification.

The scripts' calls (loading, folding, the lean connection) are scripts.ScriptRunner's;
everything else the store sends goes through the redis-py client built here.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SlaveNotFoundError
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.config import ConfigError, Settings, parse_sentinel_url, sentinel_hosts
from sidecar.errors import BackendUnavailable
from sidecar.queue.redis.keys import RedisKeys

# One server (or the primary Sentinel names) or a cluster: the calls used here exist on both.
RedisClient = Redis | RedisCluster

# Error replies that mean "this Redis cannot take the call now", by redis-py class, in the order
# they are tested (subclasses first); BUSY (a script running too long) has no class of its own.
_UNAVAILABLE: tuple[tuple[type[RedisError], str], ...] = (
    (RedisTimeoutError, "timeout"),
    (BusyLoadingError, "loading"),
    (AuthenticationError, "authentication"),
    # Sentinel knows no primary (the window of a failover) or no replica: both subclass
    # ConnectionError, named here so the log says which.
    (MasterNotFoundError, "no_primary"),
    (SlaveNotFoundError, "no_replica"),
    (RedisConnectionError, "connection"),
    (ReadOnlyError, "read_only"),
    (OutOfMemoryError, "out_of_memory"),
    (MasterDownError, "master_down"),
    (ClusterDownError, "cluster_down"),
    (TryAgainError, "try_again"),
    # The cluster client's "TTL exhausted": every attempt met MOVED, ASK or TRYAGAIN (a
    # script's keys split between two nodes while their slot moves), so the call never ran.
    # After its subclass ClusterDownError. Unclassified, it failed the client's call and
    # crashed the sweeper instead of routing to the local queue until the move ends.
    (ClusterError, "cluster_redirects"),
)
# MISCONF: a failed RDB save stops writes; NOREPLICAS: min-replicas-to-write is not met.
_UNAVAILABLE_REPLIES = {
    "MASTERDOWN": "master_down",
    "BUSY": "busy",
    "MISCONF": "misconf",
    "NOREPLICAS": "no_replicas",
}


class TlsRefused(RedisConnectionError):
    """The server closed a TLS connection before answering its first command: with TLS 1.3
    the client's handshake ends before the server has checked the client's certificate, so a
    missing or refused certificate shows as this, not as a TLS error."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


# X509_V_ERR_HOSTNAME_MISMATCH: OpenSSL's message names the host, which messages here never do.
_HOSTNAME_MISMATCH = 62
# OpenSSL's reason codes an operator meets most, in words that name the setting to look at.
_TLS_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate (set "
    "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE)",
    "TLSV1_ALERT_UNKNOWN_CA": "the server refused the client certificate: not signed by a CA "
    "it trusts (REDIS_TLS_CERT_FILE)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused the client certificate "
    "(REDIS_TLS_CERT_FILE)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server refused the client certificate: expired "
    "(REDIS_TLS_CERT_FILE)",
    "WRONG_VERSION_NUMBER": "the server does not speak TLS on this port",
}


def tls_failure(exc: BaseException) -> str | None:
    """Why a connection error is a TLS failure (the server's certificate not trusted, the
    client's refused...), in words without a host name; None when it is not one."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = cause.verify_message
            if cause.verify_code == _HOSTNAME_MISMATCH:
                why = "the server's name is not in its certificate"
            return f"certificate verify failed: {why} (REDIS_TLS_CA_FILE)"
        if isinstance(cause, ssl.SSLError):
            reason = str(cause.reason or "handshake failed")
            words = _TLS_REASONS.get(reason)
            return reason if words is None else f"{reason}: {words}"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, TlsRefused):
        return exc.hint
    return None


# What a sentinel's refusal of the client's credentials (none, or a wrong password) reads as.
_SENTINEL_AUTH = ("AuthenticationError", "NOAUTH", "WRONGPASS")
# redis-py's MasterNotFoundError text starts with the master's name (its repr); what follows
# names the sentinels' hosts, which messages here never show.
_MASTER_NAMED = re.compile(r"No master found for ('[^']*'|\"[^\"]*\")")
# Kinds whose fix is a setting: the message says which.
_KIND_HINTS = {
    "sentinel_authentication": "sentinel_authentication: the sentinels need a password, or "
    "refused this one (REDIS_SENTINEL_PASSWORD_FILE)",
}


def unavailable_kind(exc: BaseException) -> str | None:
    """A short name for a Redis error that means "cannot take this now", else None."""
    if isinstance(exc, RedisConnectionError) and tls_failure(exc) is not None:
        return "tls"
    if isinstance(exc, MasterNotFoundError) and any(s in str(exc) for s in _SENTINEL_AUTH):
        # redis-py folds each sentinel's refusal into one "no master found".
        return "sentinel_authentication"
    for cls, kind in _UNAVAILABLE:
        if isinstance(exc, cls):
            return kind
    if isinstance(exc, ResponseError):
        return _UNAVAILABLE_REPLIES.get(str(exc).split(" ", 1)[0])
    return None


def translate_error(exc: BaseException) -> BaseException:
    """BackendUnavailable (cause chained) for an unavailability error; other errors unchanged."""
    kind = unavailable_kind(exc)
    if kind is None:
        return exc
    # The message names the kind only: redis-py's text may carry a host name, never needed here.
    # A TLS failure says which (tls_failure's words carry no host name): the operator's fix is
    # in a certificate or a setting, not in waiting for Redis.
    what = f"tls: {tls_failure(exc)}" if kind == "tls" else _KIND_HINTS.get(kind, kind)
    named = _MASTER_NAMED.match(str(exc)) if kind == "no_primary" else None
    if named is not None:
        # The master name is the operator's own setting (never a host): say which one.
        what = f"no_primary: no sentinel names a live primary for {named[1]}"
    err = BackendUnavailable(f"redis unavailable ({what})", {"kind": kind})
    err.__cause__ = exc
    return err


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Raise BackendUnavailable for Redis errors that mean "cannot take this now"."""
    try:
        yield
    except RedisError as exc:
        raise translate_error(exc) from exc


def as_text(value: bytes | str) -> str:
    """A reply value as str (the client runs with decode_responses=False)."""
    return value.decode() if isinstance(value, bytes) else value


# -- building a client from Settings ------------------------------------------------------------


def redis_client(settings: Settings) -> RedisClient:
    """A client for the layout the settings name: one server, Sentinel's primary, or a cluster."""
    options = _client_options(settings)
    sentinel = sentinel_spec(settings)
    if sentinel is not None:
        hosts, master, db = sentinel
        sentinel_options = {
            "socket_connect_timeout": settings.redis_connect_timeout_s,
            "socket_timeout": settings.redis_timeout_s,
            # No retry with backoff per sentinel (redis-py's default): the pool already asks
            # the next sentinel, and a window without a primary must fail over at once.
            "retry": Retry(NoBackoff(), 0),
        }
        if settings.redis_sentinel_password_file:
            sentinel_options["password"] = _read_password(
                settings.redis_sentinel_password_file, "REDIS_SENTINEL_PASSWORD_FILE"
            )
        # redis-py leaves Sentinel.__init__ unannotated.
        manager = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            hosts, sentinel_kwargs=sentinel_options, **options
        )
        # The pool asks the sentinels for the primary at every new connection, and drops its
        # connections when the primary it reached turns out to be a replica (READONLY), so the
        # client follows a failover by itself; until one completes, calls fail as unavailable.
        client: RedisClient = manager.master_for(master, redis_class=Redis, db=db)
        return client
    if settings.redis_url is None:
        raise ConfigError("REDIS_URL is not set")
    if settings.redis_cluster:
        # The cluster client routes each call (EVALSHA included, by its keys) to the node
        # that owns the slot, and follows MOVED and ASK replies during a resharding.
        return RedisCluster.from_url(settings.redis_url, **options)
    return Redis.from_url(settings.redis_url, **options)


def sentinel_spec(settings: Settings) -> tuple[list[tuple[str, int]], str, int] | None:
    """(sentinels, master name, db) when the settings name a Sentinel layout, else None."""
    if settings.redis_sentinels and settings.redis_sentinel_master:
        return sentinel_hosts(settings.redis_sentinels), settings.redis_sentinel_master, 0
    if settings.redis_url is not None and settings.redis_url.startswith("redis+sentinel://"):
        return parse_sentinel_url(settings.redis_url)
    return None


def _client_options(settings: Settings) -> dict[str, Any]:
    # A WAIT holds the reply up to its own timeout: the socket waits that long on top.
    wait_s = settings.redis_replicas_ack_timeout_ms / 1000 if settings.redis_min_replicas_ack else 0
    options: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": settings.redis_timeout_s + wait_s,
        # One immediate retry, on a fresh connection, for a connection error only: a pooled
        # connection that died with a restarted Redis fails on first use. Never on a timeout:
        # the timed-out write may still run, and the failover manager, not the client
        # library, decides what happens when Redis is slow or away. The retry resends a whole
        # pipeline, so every script is written to be safe to run twice (see lua/common.lua).
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        "client_name": f"sidecar-{socket.gethostname()}-{os.getpid()}",
        "decode_responses": False,
    }
    if settings.redis_password_file:
        options["password"] = _read_password(settings.redis_password_file, "REDIS_PASSWORD_FILE")
    url = settings.redis_url
    if url is not None and url.startswith("rediss://"):
        options.update(_tls_options(settings))
    return options


def _tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS options for a rediss:// URL: the CA, the client certificate and key.

    Each file is read here once, so a missing or unreadable one stops the start naming its
    setting (redis-py would only fail at the first connection, as if Redis were away). The
    server's certificate is always verified, its name included.
    """
    options: dict[str, Any] = {"ssl_cert_reqs": "required"}
    files = (
        ("ssl_ca_certs", settings.redis_tls_ca_file, "REDIS_TLS_CA_FILE"),
        ("ssl_certfile", settings.redis_tls_cert_file, "REDIS_TLS_CERT_FILE"),
        ("ssl_keyfile", settings.redis_tls_key_file, "REDIS_TLS_KEY_FILE"),
    )
    for option, path, env in files:
        if path:
            _check_readable(path, env)
            options[option] = path
    if not settings.redis_cluster:
        # The cluster client sets its own connect function (READONLY on replicas).
        options["redis_connect_func"] = _tls_connect(settings.redis_tls_cert_file is not None)
    return options


def _tls_connect(with_cert: bool) -> Callable[[Any], Awaitable[None]]:
    """The handshake of a new TLS connection (AUTH, SELECT, CLIENT SETNAME: redis-py's own),
    where a connection the server closes before its first reply is named as a TLS refusal."""
    if with_cert:
        hint = (
            "the server closed the connection after the TLS handshake: it may have "
            "refused the client certificate (REDIS_TLS_CERT_FILE)"
        )
    else:
        hint = (
            "the server closed the connection after the TLS handshake: it may require a client "
            "certificate (set REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE)"
        )

    async def connect(connection: Any) -> None:
        try:
            await connection.on_connect()
        except RedisConnectionError as exc:
            if tls_failure(exc) is not None:
                raise
            raise TlsRefused(hint) from exc

    return connect


def check_one_slot(keys: RedisKeys) -> None:
    """ConfigError unless every key the store builds hashes to one cluster slot.

    A script's keys must share a slot on a cluster; checked at start for every kind of key,
    so a change to the key layout fails loudly here rather than on the first call.
    """
    sample = "00000000-0000-0000-0000-000000000000"
    names = [*keys.script_keys(), keys.request(sample), keys.payload(sample)]
    names += [keys.discarded(sample), keys.probe]
    slots = {name: key_slot(name.encode()) for name in names}
    if len(set(slots.values())) > 1:
        listed = ", ".join(f"{name} -> {slot}" for name, slot in slots.items())
        raise ConfigError(f"the queue's Redis keys span several cluster slots: {listed}")


def _read_password(path: str, env: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        # The path is safe to show; the content never is.
        raise ConfigError(f"{env}={path!r} cannot be read: {exc.strerror}") from exc


def _check_readable(path: str, env: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{env}={path!r} cannot be read: {exc.strerror}") from exc
