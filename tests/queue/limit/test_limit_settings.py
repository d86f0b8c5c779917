"""LIMITER_LOCAL_SHARE: this host's share of each limit while the limiter runs without Redis."""

from __future__ import annotations

import pytest

from sidecar.config import ConfigError, Settings
from tests.support.daemon import daemon_env, serve_expecting_refusal, short_tmpdir


def test_the_share_defaults_to_the_whole_limit_and_reads_a_fraction() -> None:
    assert Settings().limiter_local_share == 1.0
    assert Settings.from_env({"LIMITER_LOCAL_SHARE": "0.25"}).limiter_local_share == 0.25


@pytest.mark.parametrize("raw", ["0", "-0.1", "1.5", "abc", "nan", "inf"])
def test_a_bad_share_is_refused_by_name(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"LIMITER_LOCAL_SHARE": raw})
    assert f"LIMITER_LOCAL_SHARE={raw!r} is invalid: expected a fraction in (0, 1]" in str(
        info.value
    )


@pytest.mark.slow
def test_the_daemon_refuses_to_start_with_a_bad_share() -> None:
    with short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        done = serve_expecting_refusal(daemon_env(sock, LIMITER_LOCAL_SHARE="2"))
    assert done.returncode == 2
    assert "LIMITER_LOCAL_SHARE='2' is invalid" in done.stderr
