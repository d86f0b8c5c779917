"""The socket folder (owner, mode) and the peer allowlist: nobody else can take the socket."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from sidecar.client import AsyncClient, Client
from sidecar.errors import PermissionDenied, UnsafeSocket
from sidecar.socket_dir import client_owners, folder_problem
from tests.support.daemon import daemon_env, running_daemon, serve_expecting_refusal, short_tmpdir

NOBODY = 65534


@pytest.mark.slow
def test_daemon_refuses_a_folder_owned_by_another_user() -> None:
    with short_tmpdir() as tmp:
        folder = tmp / "run"
        folder.mkdir(mode=0o700)
        os.chown(folder, NOBODY, NOBODY)
        done = serve_expecting_refusal(daemon_env(str(folder / "s.sock")))
    assert done.returncode == 2
    [line] = [ln for ln in done.stderr.splitlines() if not ln.startswith("{")]  # not a log event
    assert line == (
        f"sidecar: cannot start: socket folder {folder} is owned by uid {NOBODY}, "
        "not uid 0: its owner could replace the socket"
    )


@pytest.mark.slow
def test_daemon_refuses_a_folder_others_can_write() -> None:
    with short_tmpdir() as tmp:
        folder = tmp / "run"
        folder.mkdir()
        os.chmod(folder, 0o777)
        done = serve_expecting_refusal(daemon_env(str(folder / "s.sock")))
    assert done.returncode == 2
    [line] = [ln for ln in done.stderr.splitlines() if not ln.startswith("{")]  # not a log event
    assert line == (
        f"sidecar: cannot start: socket folder {folder} is writable by others (mode 0777): "
        "anyone who can write it could replace the socket"
    )


@pytest.mark.slow
def test_daemon_creates_its_folder_private_or_for_one_group() -> None:
    with short_tmpdir() as tmp:
        private = tmp / "a" / "run"
        with running_daemon(SIDECAR_SOCKET=str(private / "s.sock")):
            st = os.stat(private)
            assert stat.S_IMODE(st.st_mode) == 0o700
        shared = tmp / "b"
        with running_daemon(SIDECAR_SOCKET=str(shared / "s.sock"), SIDECAR_SOCKET_GROUP="65534"):
            st = os.stat(shared)
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2750, NOBODY)
            assert os.stat(shared / "s.sock").st_gid == NOBODY  # inherited through setgid


@pytest.mark.slow
async def test_client_refuses_a_socket_in_a_folder_others_can_write() -> None:
    with running_daemon() as d:
        folder = os.path.dirname(d.socket_path)
        os.chmod(folder, 0o777)  # as if another user could have replaced the socket
        try:
            with pytest.raises(UnsafeSocket) as info:
                await AsyncClient(d.socket_path).health()
            assert info.value.message.startswith(f"refusing to connect: socket folder {folder}")
            assert info.value.details["sent"] is False
            with pytest.raises(UnsafeSocket):
                Client(d.socket_path).connect()
        finally:
            os.chmod(folder, 0o700)
        async with AsyncClient(d.socket_path) as c:  # the daemon carried on
            assert (await c.health()).status == "ok"


def test_client_knows_who_owns_the_per_uid_folder() -> None:
    assert client_owners("/tmp/sidecar-1234/sidecar.sock") == frozenset({1234, 0})
    assert client_owners("/srv/app/sidecar.sock") is None  # any owner; the mode still counts
    with short_tmpdir() as tmp:
        folder = tmp / "run"
        folder.mkdir(mode=0o700)
        os.chown(folder, NOBODY, NOBODY)
        sock = str(folder / "sidecar.sock")
        problem = folder_problem(sock, frozenset({1234, 0}))
        assert problem is not None and f"owned by uid {NOBODY}" in problem
        assert folder_problem(sock, None) is None
    # A shared sticky folder such as /tmp is fine: others cannot replace our file there.
    assert folder_problem("/tmp/sidecar-demo-none.sock", frozenset({0})) is None


@pytest.mark.slow
async def test_allowlist_refuses_a_peer_with_a_stable_code() -> None:
    with running_daemon(SIDECAR_ALLOWED_UIDS="12345", SIDECAR_ALLOWED_GIDS="12345") as d:
        with pytest.raises(PermissionDenied) as info:
            await AsyncClient(d.socket_path).health()
        assert info.value.code == "permission_denied"
        with pytest.raises(PermissionDenied):
            Client(d.socket_path).health()
        assert d.proc is not None and d.proc.poll() is None  # the daemon carries on
        for _ in range(200):  # the log line arrives through the daemon's stderr
            if d.events("connection_refused"):
                break
            await asyncio.sleep(0.05)
        [refused, *_] = d.events("connection_refused")
        assert (refused["code"], refused["peer_uid"], refused["peer_gid"]) == (
            "permission_denied",
            os.geteuid(),
            os.getegid(),
        )


@pytest.mark.slow
@pytest.mark.parametrize(
    "allow", [{"SIDECAR_ALLOWED_UIDS": "12345,0"}, {"SIDECAR_ALLOWED_GIDS": "0"}]
)
async def test_allowlist_admits_a_listed_uid_or_gid(allow: dict[str, str]) -> None:
    with running_daemon(**allow) as d:
        async with AsyncClient(d.socket_path) as c:
            assert (await c.health()).status == "ok"
