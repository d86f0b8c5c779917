"""The redis-server helper that the Redis, failover and daemon tests share."""

from __future__ import annotations

import socket

import pytest

from tests.support.redis_server import RedisServer, RedisServerError


def _ping(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(path)
        sock.sendall(b"PING\r\n")
        return sock.recv(16)


@pytest.mark.slow
def test_start_pause_resume_kill_restart_on_one_socket() -> None:
    with RedisServer() as server:
        path, url, folder = server.socket_path, server.url, server.dir
        assert len(path.encode()) <= 100
        assert url == f"unix://{path}"
        assert _ping(path) == b"+PONG\r\n"
        server.pause()
        with pytest.raises(TimeoutError), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(0.2)
            sock.connect(path)  # the kernel accepts on the backlog; nobody answers
            sock.sendall(b"PING\r\n")
            sock.recv(16)
        server.resume()
        assert _ping(path) == b"+PONG\r\n"
        first_pid = server.pid
        server.kill()
        assert not server.running
        with pytest.raises(OSError):
            _ping(path)
        server.restart()
        assert server.pid != first_pid
        assert (server.socket_path, server.url) == (path, url)
        assert _ping(path) == b"+PONG\r\n"
    assert not folder.exists()


def test_signals_need_a_running_server() -> None:
    server = RedisServer()
    try:
        with pytest.raises(RedisServerError):
            server.pause()
    finally:
        server.cleanup()
