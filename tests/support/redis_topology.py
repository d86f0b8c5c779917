"""Real Redis layouts for tests: a primary with a replica and three sentinels, a cluster.

Every process listens on 127.0.0.1 on a port picked free at run time (sentinels and cluster
nodes speak TCP to each other), never on 6379; each also keeps the Unix socket of RedisServer,
which the readiness check uses. Every wait is bounded and fails with the logs' tails.

    with SentinelLayout() as layout:        # primary, replica, 3 sentinels, all agreed
        layout.kill_primary()               # SIGKILL
        layout.wait_for_new_primary(old)    # bounded: the sentinels promoted the replica
    with ClusterLayout() as cluster:        # 3 primaries, 16384 slots assigned, state ok
        cluster.migrate_slot(slot, to)      # SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE
    with ReplicatedCluster() as cluster:    # the same with one replica per primary, in sync
        cluster.cut_replication(primary)    # its replica paused, its link dropped
        cluster.wait_for_new_owner(slot, old)   # bounded: the cluster promoted the replica
        cluster.rejoin(old)                 # the killed node back as the new owner's replica
"""

from __future__ import annotations

import contextlib
import functools
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest

from sidecar.config import Settings
from sidecar.queue.redis import RedisQueue, redis_client
from tests.support.procs import default_signals
from tests.support.redis_server import READY_TIMEOUT_S, RedisServer, RedisServerError

MASTER_NAME = "sidecarq"
# Short sentinel timings keep a failover within a few seconds (production uses ~5-30 s).
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000
LAYOUT_TIMEOUT_S = 30.0

T = TypeVar("T")


def free_port() -> int:
    """A high TCP port nobody listens on now, whose cluster bus port (+10000) is free too.

    Drawn at random from 20000-45000: a cluster node's bus port must stay below 65536.
    """
    for _ in range(200):
        port = random.randrange(20_000, 45_000)
        if _bindable(port) and _bindable(port + 10_000):
            return port
    raise RedisServerError("no free TCP port in 20000-45000")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cli(port: int, *args: str, timeout_s: float = 10.0) -> str:
    """One redis-cli command against 127.0.0.1:port; its stdout (raises on failure)."""
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=True,
    )
    return out.stdout.strip()


def wait_until(what: str, check: Callable[[], T | None], timeout_s: float = LAYOUT_TIMEOUT_S) -> T:
    """Poll check() (a bounded poll of another process's state) until it returns a value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            value = check()
            if value is not None:
                return value
        time.sleep(0.05)
    raise RedisServerError(f"{what}: not within {timeout_s} s")


class TcpRedis(RedisServer):
    """A RedisServer that also listens on 127.0.0.1:port (its Unix socket stays for PING)."""

    def __init__(
        self, extra_args: tuple[str, ...] = (), *, port: int | None = None, appendonly: bool = False
    ) -> None:
        self.port = free_port() if port is None else port
        args = ("--port", str(self.port), "--bind", "127.0.0.1", *extra_args)
        super().__init__(appendonly=appendonly, extra_args=args)

    def __enter__(self) -> TcpRedis:
        self.start()
        return self

    def info(self, section: str) -> dict[str, str]:
        lines = cli(self.port, "INFO", section).splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)


class Sentinel:
    """One `redis-server --sentinel` on its own port, watching MASTER_NAME."""

    def __init__(self, primary_port: int) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sn", dir="/tmp"))
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sentinel:
        self._proc = subprocess.Popen(
            ["redis-server", str(self.conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=default_signals,  # noqa: PLW1509 (stop() sends SIGTERM; see procs.py)
        )
        wait_until("sentinel answers", lambda: cli(self.port, "PING") == "PONG" or None)
        return self

    def primary(self) -> int | None:
        """The port of the primary this sentinel names now."""
        out = cli(self.port, "SENTINEL", "get-master-addr-by-name", MASTER_NAME).splitlines()
        return int(out[1]) if len(out) == 2 else None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(READY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(READY_TIMEOUT_S)
        self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


L = TypeVar("L", bound="_Layout")


class _Layout:
    """A set of servers started together and cleaned up together, also when start fails."""

    def start(self: L) -> L:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def __enter__(self: L) -> L:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class SentinelLayout(_Layout):
    """A primary, one replica and three sentinels that all know both and each other."""

    def __init__(self) -> None:
        self.primary = TcpRedis()
        self.replica: TcpRedis | None = None
        self.sentinels: list[Sentinel] = []
        self.killed: TcpRedis | None = None

    @property
    def addresses(self) -> str:
        """REDIS_SENTINELS for this layout."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> SentinelLayout:
        self.primary.start()
        self.replica = TcpRedis(("--replicaof", "127.0.0.1", str(self.primary.port)))
        self.replica.start()
        wait_replica_linked(self.replica)
        self.sentinels = [Sentinel(self.primary.port).start() for _ in range(3)]
        for s in self.sentinels:
            # Both other sentinels and the replica seen (hello messages, every ~2 s).
            wait_until("sentinels agree", functools.partial(_sentinel_knows_all, s))
        return self

    def cut_replication(self) -> int:
        """Freeze the replica and drop its link: the primary's later writes reach no replica.

        Returns the primary's replication offset at the cut. (A SIGKILL alone loses nothing on
        loopback: the kernel still delivers what the primary wrote to the replica's socket.)
        """
        assert self.replica is not None
        self.replica.pause()
        cli(self.primary.port, "CLIENT", "KILL", "TYPE", "replica")
        return self.primary_offset()

    def primary_offset(self) -> int:
        return int(self.primary.info("replication")["master_repl_offset"])

    def kill_primary(self) -> int:
        """SIGKILL the primary; returns its port."""
        self.primary.kill()
        self.killed = self.primary
        return self.primary.port

    def wait_for_new_primary(self, old_port: int) -> int:
        """Bounded: every sentinel names a primary other than old_port; returns its port."""

        def promoted() -> int | None:
            ports = {s.primary() for s in self.sentinels}
            if len(ports) == 1 and None not in ports and old_port not in ports:
                return ports.pop()
            return None

        return wait_until("a replica promoted", promoted)

    def rejoin_killed_as_replica(self, new_primary_port: int) -> TcpRedis:
        """Start a fresh server on the killed primary's port as a replica of the new one."""
        assert self.killed is not None
        port = self.killed.port
        self.killed.cleanup()
        node = TcpRedis(("--replicaof", "127.0.0.1", str(new_primary_port)), port=port)
        node.start()
        wait_replica_linked(node)
        self.killed = node
        return node

    def cleanup(self) -> None:
        for s in self.sentinels:
            s.stop()
        for node in (self.primary, self.replica, self.killed):
            if node is not None:
                node.cleanup()


def wait_replica_linked(node: TcpRedis) -> None:
    wait_until(
        "replica in sync",
        lambda: node.info("replication").get("master_link_status") == "up" or None,
    )


def _sentinel_knows_all(s: Sentinel) -> bool | None:
    fields = cli(s.port, "SENTINEL", "master", MASTER_NAME).splitlines()
    info = dict(zip(fields[::2], fields[1::2], strict=False))
    return (info.get("num-other-sentinels") == "2" and info.get("num-slaves") == "1") or None


class ClusterLayout(_Layout):
    """Three cluster primaries (no replicas: the machine has two shared cores)."""

    replicas = 0  # per primary (ReplicatedCluster: 1)

    def __init__(self, size: int = 3) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000")  # fmt: skip
        self.nodes = [TcpRedis(args) for _ in range(size)]

    @property
    def url(self) -> str:
        """REDIS_URL (one seed node) for REDIS_CLUSTER=true."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> ClusterLayout:
        for node in self.nodes:
            node.start()
        hosts = [f"127.0.0.1:{n.port}" for n in self.nodes]
        cli(self.nodes[0].port, "--cluster", "create", *hosts,
            "--cluster-replicas", str(self.replicas),
            "--cluster-yes", timeout_s=LAYOUT_TIMEOUT_S)  # fmt: skip
        for node in self.nodes:
            wait_until("cluster state ok", functools.partial(_cluster_ok, node))
        return self

    def node_id(self, node: TcpRedis) -> str:
        return cli(node.port, "CLUSTER", "MYID")

    def owner(self, slot: int) -> TcpRedis:
        """The node that serves `slot` now (as the first running node sees it)."""
        seed = next(n for n in self.nodes if n.running)
        for line in cli(seed.port, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            for r in parts[8:]:
                lo, _, hi = r.partition("-")
                if not lo.startswith("[") and int(lo) <= slot <= int(hi or lo):
                    return next(n for n in self.nodes if n.port == port)
        raise RedisServerError(f"no owner for slot {slot}")

    def migrate_slot(
        self, slot: int, target: TcpRedis, batch: int = 50, timeout_s: float = LAYOUT_TIMEOUT_S
    ) -> int:
        """Move one slot by hand, as `redis-cli --cluster reshard` does; returns keys moved.

        Bounded: redis-cli exits 0 on an error reply, so a MIGRATE that fails would leave the
        same keys in the slot and this loop would go round forever; each reply is checked
        and the whole move has a deadline.
        """
        deadline = time.monotonic() + timeout_s
        source = self.owner(slot)
        dst_id = self.node_id(target)
        self.move_keys(slot, target, [])
        moved = 0
        while True:
            if time.monotonic() > deadline:
                raise RedisServerError(f"slot {slot}: not moved within {timeout_s} s")
            keys = cli(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), str(batch)).split()
            if not keys:
                break
            self.move_keys(slot, target, keys)
            moved += len(keys)
        for node in (target, source, *[n for n in self.nodes if n not in (target, source)]):
            cli(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
        return moved

    def move_keys(self, slot: int, target: TcpRedis, keys: list[str]) -> None:
        """Mark `slot` as moving to target (again, if it is already) and MIGRATE `keys` there.

        With only some of a slot's keys moved, a script that names keys on both sides gets
        TRYAGAIN from both nodes until the move ends.
        """
        source = self.owner(slot)
        cli(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", self.node_id(source))
        cli(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", self.node_id(target))
        if not keys:
            return
        reply = cli(source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000",
                    "KEYS", *keys)  # fmt: skip
        if reply not in ("OK", "NOKEY"):
            raise RedisServerError(f"slot {slot}: MIGRATE answered {reply!r}")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


def _cluster_ok(node: TcpRedis) -> bool | None:
    info = cli(node.port, "CLUSTER", "INFO")
    return ("cluster_state:ok" in info and "cluster_slots_assigned:16384" in info) or None


class ReplicatedCluster(ClusterLayout):
    """Three primaries with one replica each, every replica in sync; a 1 s node timeout, so
    the cluster promotes a dead primary's replica within a few seconds."""

    replicas = 1

    def __init__(self) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000")  # fmt: skip
        self.nodes = [TcpRedis(args) for _ in range(6)]

    def start(self) -> ReplicatedCluster:
        super().start()
        for node in self.nodes:
            if node.info("replication")["role"] == "slave":
                wait_replica_linked(node)
        return self

    def replica_of(self, primary: TcpRedis) -> TcpRedis:
        """The replica of `primary` (as the primary itself sees it)."""
        info = primary.info("replication")  # slave0:ip=...,port=...,state=online,...
        [port] = [int(v.split("port=")[1].split(",")[0])
                  for k, v in info.items() if k.startswith("slave")]  # fmt: skip
        return next(n for n in self.nodes if n.port == port)

    def cut_replication(self, primary: TcpRedis) -> tuple[TcpRedis, int]:
        """Freeze primary's replica and drop its link (see SentinelLayout.cut_replication);
        returns the replica and the primary's replication offset at the cut."""
        replica = self.replica_of(primary)
        replica.pause()
        cli(primary.port, "CLIENT", "KILL", "TYPE", "replica")
        return replica, int(primary.info("replication")["master_repl_offset"])

    def wait_for_new_owner(self, slot: int, old: TcpRedis) -> TcpRedis:
        """Bounded: every running node names an owner of `slot` other than `old` and reports
        cluster_state ok; returns the new owner."""

        def promoted() -> int | None:
            live = [n for n in self.nodes if n.running]
            if not all(_cluster_ok(n) for n in live):
                return None
            owners = {self._owner_seen_by(n, slot) for n in live}
            return owners.pop() if len(owners) == 1 and old.port not in owners else None

        port = wait_until("a replica promoted", promoted)
        return next(n for n in self.nodes if n.port == port)

    def _owner_seen_by(self, viewer: TcpRedis, slot: int) -> int | None:
        for line in cli(viewer.port, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            for r in parts[8:]:
                lo, _, hi = r.partition("-")
                if not lo.startswith("[") and int(lo) <= slot <= int(hi or lo):
                    return int(parts[1].split("@")[0].rsplit(":", 1)[1])
        return None

    def rejoin(self, node: TcpRedis) -> None:
        """Start a killed node again (its nodes.conf kept, its data gone): the cluster makes
        it a replica of the node promoted in its place; bounded wait for its first sync."""
        node.start()
        wait_until("rejoined as a replica",
                   lambda: node.info("replication").get("role") == "slave" or None)  # fmt: skip
        wait_replica_linked(node)


@pytest.fixture(scope="session", name="redis_cluster")
def redis_cluster_fixture() -> Iterator[ClusterLayout]:
    """One cluster for the whole session; each user takes its own key prefix."""
    with ClusterLayout() as cluster:
        yield cluster


def cluster_queue(
    cluster: ClusterLayout, clock: Callable[[], float], *, retention_s: float, **options: Any
) -> RedisQueue:
    """A RedisQueue on the cluster under a fresh prefix (not started)."""
    settings = Settings(redis_url=cluster.url, redis_cluster=True)
    prefix = options.pop("prefix", f"t{uuid.uuid4().hex[:12]}")
    return RedisQueue(
        redis_client(settings), retention_s=retention_s, clock=clock, prefix=prefix, **options
    )


def make_cluster_contract_store(
    request: pytest.FixtureRequest, clock: Callable[[], float], retention_s: float, **options: Any
) -> RedisQueue:
    """For the contract suite: a RedisQueue on the session's cluster, under its own prefix."""
    cluster: ClusterLayout = request.getfixturevalue("redis_cluster")
    return cluster_queue(cluster, clock, retention_s=retention_s, **options)


# -- sentinels that need a password -------------------------------------------------------------


def _auth_args(password: str | None) -> tuple[str, ...]:
    return () if password is None else ("-a", password, "--no-auth-warning")


class PasswordSentinel(Sentinel):
    """A Sentinel with `requirepass`: clients must AUTH, and it AUTHs to the other sentinels
    with the same password (so every sentinel of a layout shares it)."""

    def __init__(self, primary_port: int, password: str) -> None:
        super().__init__(primary_port)
        self.password = password
        with self.conf.open("a") as conf:
            conf.write(f"requirepass {password}\n")

    def ask(self, *args: str, password: str | None) -> str:
        """One redis-cli command to this sentinel, with the password given (or none)."""
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *_auth_args(password), *args],
            capture_output=True, text=True, timeout=10.0, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    def start(self) -> PasswordSentinel:
        self._proc = subprocess.Popen(
            ["redis-server", str(self.conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=default_signals,  # noqa: PLW1509 (stop() sends SIGTERM; see procs.py)
        )
        wait_until(
            "sentinel answers", lambda: self.ask("PING", password=self.password) == "PONG" or None
        )
        return self

    def primary(self) -> int | None:
        args = ("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        out = self.ask(*args, password=self.password).splitlines()
        return int(out[1]) if len(out) == 2 else None

    def knows_all(self) -> bool | None:
        fields = self.ask("SENTINEL", "master", MASTER_NAME, password=self.password).splitlines()
        info = dict(zip(fields[::2], fields[1::2], strict=False))
        return (info.get("num-other-sentinels") == "2" and info.get("num-slaves") == "1") or None


class PasswordSentinelLayout(SentinelLayout):
    """SentinelLayout whose three sentinels need `password` (the data nodes need none)."""

    def __init__(self, password: str) -> None:
        super().__init__()
        self.password = password

    def start(self) -> PasswordSentinelLayout:
        self.primary.start()
        self.replica = TcpRedis(("--replicaof", "127.0.0.1", str(self.primary.port)))
        self.replica.start()
        wait_replica_linked(self.replica)
        sentinels = [PasswordSentinel(self.primary.port, self.password) for _ in range(3)]
        self.sentinels = list(sentinels)
        for s in sentinels:
            s.start()
        for s in sentinels:
            wait_until("sentinels agree", s.knows_all)
        return self
