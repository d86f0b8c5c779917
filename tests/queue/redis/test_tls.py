"""TLS to Redis and a password for the sentinels, against real servers (GitHub issue 24, item 3).

The certificates are made for each test by `openssl` (tests/support/redis_tls.py); the
redis-server takes TLS only (its plain TCP port is off), and asks clients for a certificate
from its CA (`tls-auth-clients yes`). The daemon's store is built from Settings as the daemon
builds it (sidecar.queue.build), so what is tested is what an operator configures.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.config import ConfigError, Settings
from sidecar.errors import BackendUnavailable
from sidecar.models import ServingMode
from sidecar.queue.build import build_local_queue, build_redis_queue
from sidecar.queue.redis import RedisQueue
from sidecar.queue.resilient import ResilientQueue
from tests.support.helpers import make_request
from tests.support.redis_tls import Pki, TlsRedis
from tests.support.redis_topology import MASTER_NAME, PasswordSentinel, PasswordSentinelLayout

TIMEOUT_S = 2.0
SENTINEL_PASSWORD = "s3nt1nel-pw"

# Real processes: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA: the server does not know it, and it does not know the server."""
    return Pki(tmp_path_factory.mktemp("other"), name="other")


@pytest.fixture
def server(pki: Pki) -> Iterator[TlsRedis]:
    with TlsRedis(pki) as s:
        yield s


def tls_settings(server: TlsRedis, tmp_path: Path, **files: object) -> Settings:
    """Settings for the TLS port, the default files those of server's CA unless overridden."""
    pki = server.pki
    options: dict[str, object] = {
        "redis_tls_ca_file": str(pki.ca),
        "redis_tls_cert_file": str(pki.client_cert),
        "redis_tls_key_file": str(pki.client_key),
    }
    options.update(files)
    return Settings(
        redis_url=server.tls_url,
        redis_connect_timeout_s=TIMEOUT_S,
        redis_timeout_s=TIMEOUT_S,
        state_dir=str(tmp_path / "state"),
        **options,  # type: ignore[arg-type]
    )


async def round_trip(queue: RedisQueue | ResilientQueue) -> None:
    """Enqueue, dequeue and complete one request."""
    [outcome] = await queue.enqueue([make_request(time.time, queue_id="tls-1")])
    assert outcome.created
    [job] = await queue.dequeue(1, 30)
    assert job.queue_id == "tls-1"
    assert job.lease_id is not None
    done = await queue.complete("tls-1", job.lease_id)
    assert done.status == "completed"


async def refusal(settings: Settings) -> BackendUnavailable:
    """What starting the Redis store with these settings raises (it must not start)."""
    queue = build_redis_queue(settings)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await queue.start()
    finally:
        await queue.close()
    return caught.value


# -- TLS ------------------------------------------------------------------------------------


async def test_the_store_works_over_tls_with_a_client_certificate(
    server: TlsRedis, tmp_path: Path
) -> None:
    queue = build_redis_queue(tls_settings(server, tmp_path))
    await queue.start()
    try:
        await round_trip(queue)
        health = await queue.health()
        assert health.status == "ok", health
        # The store's connections are on the TLS port (the server has no plain TCP port).
        mine = [c for c in server.clients() if "name=sidecar-" in c]
        assert mine and all(f"laddr=127.0.0.1:{server.tls_port}" in c for c in mine), mine
    finally:
        await queue.close()


async def test_without_a_client_certificate_the_server_refuses_and_says_why(
    server: TlsRedis, tmp_path: Path
) -> None:
    settings = tls_settings(server, tmp_path, redis_tls_cert_file=None, redis_tls_key_file=None)
    err = await refusal(settings)
    assert err.details["kind"] == "tls", err
    assert "client certificate" in err.message and "REDIS_TLS_CERT_FILE" in err.message, err


async def test_a_client_certificate_from_another_ca_is_refused(
    server: TlsRedis, tmp_path: Path, other_pki: Pki
) -> None:
    settings = tls_settings(
        server, tmp_path,
        redis_tls_cert_file=str(other_pki.client_cert),
        redis_tls_key_file=str(other_pki.client_key),
    )  # fmt: skip
    err = await refusal(settings)
    assert err.details["kind"] == "tls", err
    assert "refused the client certificate" in err.message, err
    assert "REDIS_TLS_CERT_FILE" in err.message, err


async def test_a_server_certificate_from_another_ca_is_refused(
    server: TlsRedis, tmp_path: Path, other_pki: Pki
) -> None:
    err = await refusal(tls_settings(server, tmp_path, redis_tls_ca_file=str(other_pki.ca)))
    assert err.details["kind"] == "tls", err
    assert "certificate verify failed" in err.message, err


async def test_a_refused_tls_connection_loses_nothing_acknowledged(
    server: TlsRedis, tmp_path: Path
) -> None:
    """The resilient store answers from the local queue, and health names the TLS refusal."""
    settings = tls_settings(server, tmp_path, redis_tls_cert_file=None, redis_tls_key_file=None)
    queue = ResilientQueue(
        build_redis_queue(settings),
        build_local_queue(settings),
        probe_initial_s=0.05,
        probe_max_s=0.2,
    )
    await queue.start()
    try:
        assert queue.mode == ServingMode.LOCAL_FALLBACK
        await round_trip(queue)  # acknowledged by the local store, then served from it
        health = await queue.health()
        assert health.status == "degraded"
        assert any("tls" in r and "client certificate" in r for r in health.reasons), health
    finally:
        await queue.close(0)


# -- the settings ------------------------------------------------------------------------------


def test_a_client_certificate_needs_its_key_and_the_key_its_certificate() -> None:
    base = {"REDIS_URL": "rediss://127.0.0.1:6380/0"}
    for one in ("REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE"):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env(base | {one: "/etc/sidecar/redis.pem"})
        message = str(caught.value)
        assert "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE" in message, message
        assert "set both" in message, message


def test_tls_files_without_a_rediss_url_are_refused() -> None:
    for url in ("redis://127.0.0.1:6379/0", "unix:///run/redis.sock", None):
        env = {"REDIS_TLS_CA_FILE": "/etc/sidecar/ca.pem"}
        if url is not None:
            env["REDIS_URL"] = url
        with pytest.raises(ConfigError, match="REDIS_TLS_CA_FILE is invalid without a rediss://"):
            Settings.from_env(env)


def test_a_sentinel_password_without_sentinels_is_refused() -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:6379/0", "REDIS_SENTINEL_PASSWORD_FILE": "/pw"}
    with pytest.raises(ConfigError, match="REDIS_SENTINEL_PASSWORD_FILE is invalid without"):
        Settings.from_env(env)


def test_a_tls_file_that_cannot_be_read_is_named(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "nope.pem"
    settings = Settings(
        redis_url="rediss://127.0.0.1:6380/0",
        redis_tls_ca_file=str(pki.ca),
        redis_tls_cert_file=str(missing),
        redis_tls_key_file=str(pki.client_key),
    )
    with pytest.raises(ConfigError, match=r"REDIS_TLS_CERT_FILE='.*nope.pem' cannot be read"):
        build_redis_queue(settings)


# -- Sentinel with a password -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinels() -> Iterator[PasswordSentinelLayout]:
    with PasswordSentinelLayout(SENTINEL_PASSWORD) as layout:
        yield layout


def sentinel_settings(layout: PasswordSentinelLayout, password_file: Path | None) -> Settings:
    return Settings(
        redis_sentinels=layout.addresses,
        redis_sentinel_master=MASTER_NAME,
        redis_sentinel_password_file=None if password_file is None else str(password_file),
        redis_connect_timeout_s=TIMEOUT_S,
        redis_timeout_s=TIMEOUT_S,
        redis_key_prefix="sentinel-pw",
    )


async def test_the_store_asks_sentinels_that_need_a_password(
    sentinels: PasswordSentinelLayout, tmp_path: Path
) -> None:
    password_file = tmp_path / "sentinel-password"
    password_file.write_text(SENTINEL_PASSWORD + "\n")
    queue = build_redis_queue(sentinel_settings(sentinels, password_file))
    await queue.start()
    try:
        await round_trip(queue)
    finally:
        await queue.close()


async def test_without_the_sentinel_password_the_store_does_not_start(
    sentinels: PasswordSentinelLayout, tmp_path: Path
) -> None:
    err = await refusal(sentinel_settings(sentinels, None))
    assert err.details["kind"] == "sentinel_authentication", err
    assert "REDIS_SENTINEL_PASSWORD_FILE" in err.message, err


async def test_a_wrong_sentinel_password_is_named(
    sentinels: PasswordSentinelLayout, tmp_path: Path
) -> None:
    password_file = tmp_path / "sentinel-password"
    password_file.write_text("not-the-password")
    err = await refusal(sentinel_settings(sentinels, password_file))
    assert err.details["kind"] == "sentinel_authentication", err


# The sentinels refuse anyone without the password: the layout's own check proves they are set.
def test_the_sentinels_do_need_the_password(sentinels: PasswordSentinelLayout) -> None:
    first = sentinels.sentinels[0]
    assert isinstance(first, PasswordSentinel)
    ask = functools.partial(first.ask, "PING")
    assert ask(password=SENTINEL_PASSWORD) == "PONG"
    assert "NOAUTH" in ask(password=None)
