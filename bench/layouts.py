"""The production layouts' price: the daemon through Sentinel, and with WAIT 1 after enqueues.

Both sections run on one replicated layout started here: a primary and a replica on loopback
TCP (high ports picked free at run time) and three sentinels watching them. Each row compares
the daemon configured one way with the daemon on the same primary by its plain redis:// URL
(the single-server row), in alternating slices of the same run, so the ratio is the price of
Sentinel (a lookup per new connection) or of waiting for the replica (one WAIT per pipeline
that carries an enqueue).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.redis_server import RedisProcess, RedisServerError

MASTER_NAME = "benchq"
LAYOUT_FILE = "layout.json"
READY_TIMEOUT_S = 30.0


def _free_port() -> int:
    for _ in range(200):
        port = random.randrange(20_000, 45_000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RedisServerError("no free TCP port in 20000-45000")


def _cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
    return out.stdout


def _wait(what: str, *, port: int, args: tuple[str, ...], needle: tuple[str, ...]) -> None:
    """Bounded poll of another process's state: until every needle is in the reply."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            reply = _cli(port, *args)
            if all(n in reply for n in needle):
                return
        time.sleep(0.05)
    raise RedisServerError(f"{what}: not within {READY_TIMEOUT_S} s")


def _node(folder: Path, name: str, port: int, *extra: str) -> RedisProcess:
    sub = folder / name
    sub.mkdir()
    args = ["--port", str(port), "--bind", "127.0.0.1", *extra]
    return RedisProcess(str(sub / "redis.sock"), args).start()


def _sentinel(folder: Path, name: str, primary_port: int) -> tuple[int, subprocess.Popen[bytes]]:
    port = _free_port()
    sub = folder / name
    sub.mkdir()
    conf = sub / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {sub}\nlogfile {sub / 'log'}\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} 500\n"
        f"sentinel failover-timeout {MASTER_NAME} 2000\n"
    )
    proc = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    return port, proc


@contextlib.contextmanager
def replicated(folder: Path) -> Iterator[dict[str, str]]:
    """Primary, replica, three sentinels, all agreed; writes the addresses to LAYOUT_FILE."""
    servers: list[RedisProcess] = []
    sentinels: list[subprocess.Popen[bytes]] = []
    try:
        primary_port = _free_port()
        servers.append(_node(folder, "primary", primary_port))
        replica_port = _free_port()
        servers.append(_node(folder, "replica", replica_port,
                             "--replicaof", "127.0.0.1", str(primary_port)))  # fmt: skip
        _wait("replica in sync", port=replica_port, args=("INFO", "replication"),
              needle=("master_link_status:up",))  # fmt: skip
        ports = []
        for i in range(3):
            port, proc = _sentinel(folder, f"sentinel{i}", primary_port)
            sentinels.append(proc)
            ports.append(port)
        for port in ports:
            _wait("sentinels agree", port=port, args=("SENTINEL", "master", MASTER_NAME),
                  needle=("num-other-sentinels\n2", "num-slaves\n1"))  # fmt: skip
        layout = {
            "url": f"redis://127.0.0.1:{primary_port}/0",
            "sentinels": ",".join(f"127.0.0.1:{p}" for p in ports),
            "master": MASTER_NAME,
        }
        (folder / LAYOUT_FILE).write_text(json.dumps(layout))
        yield layout
    finally:
        for proc in sentinels:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for server in reversed(servers):
            server.stop()
        for sub in folder.glob("sentinel*"):
            shutil.rmtree(sub, ignore_errors=True)


def layout_env(folder: Path, how: str) -> dict[str, str | None]:
    """The daemon's Redis settings for `how`: single (plain URL), sentinel, or wait1."""
    layout = json.loads((folder / LAYOUT_FILE).read_text())
    if how == "sentinel":
        return {"REDIS_URL": None, "REDIS_SENTINELS": layout["sentinels"],
                "REDIS_SENTINEL_MASTER": layout["master"]}  # fmt: skip
    env: dict[str, str | None] = {"REDIS_URL": layout["url"]}
    if how == "wait1":
        env["REDIS_MIN_REPLICAS_ACK"] = "1"
    return env
