"""Crash tests through the real daemon: acknowledged requests survive its death (issue 8).

Each test counts what the daemon acknowledged against what it finds after a restart: lost
must be 0, and no completion it acknowledged may be handed out again.
"""

from __future__ import annotations

import resource
import signal
import time

import pytest

from sidecar.client import Client
from sidecar.errors import StorageUnavailable
from tests.support.crash import check, load_then
from tests.support.daemon import Daemon, daemon_env, running_daemon, short_tmpdir

# Real processes under load or fault injection: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

LOCAL_ENV = {"QUEUE_LEASE_SECONDS": "1", "QUEUE_MAX_SIZE": "100000"}


async def test_sigkill_in_local_only_mode_loses_nothing_acknowledged() -> None:
    with running_daemon(**LOCAL_ENV) as daemon:
        ledger = await load_then(
            daemon.socket_path, daemon.kill, acked_at_least=400, completed_at_least=100
        )
        daemon.start()
        outcome = await check(daemon.socket_path, ledger)
        replayed = daemon.events("journal_replayed")
    print(f"acked={outcome.acked} completed={outcome.completed} lost={len(outcome.lost)}")
    assert outcome.acked >= 400 and outcome.completed >= 100
    assert outcome.lost == []
    assert outcome.completion_lost == []
    assert outcome.settled_twice == []
    assert replayed and replayed[-1]["records"] > 0


async def test_sigterm_in_local_only_mode_keeps_the_queue_and_exits_0() -> None:
    with running_daemon(**LOCAL_ENV) as daemon:
        ledger = await load_then(
            daemon.socket_path,
            lambda: daemon.stop(signal.SIGTERM),
            acked_at_least=200,
            completed_at_least=20,
        )
        assert daemon.proc is not None and daemon.proc.returncode == 0
        assert daemon.events("stopped")[-1]["unkept"] == 0
        daemon.start()
        outcome = await check(daemon.socket_path, ledger)
    assert outcome.lost == [] and outcome.completion_lost == [] and outcome.settled_twice == []


def test_a_stop_that_cannot_write_its_journal_exits_1_and_says_how_many() -> None:
    """RLIMIT_FSIZE makes the journal's writes fail (EFBIG) inside the real daemon."""
    limit = 350_000  # three 100 kB requests fit in one file, four do not

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    acked: list[str] = []
    refused: list[StorageUnavailable] = []
    with short_tmpdir() as tmp:
        sock = str(tmp / "s.sock")
        daemon = Daemon(sock, daemon_env(sock), preexec=small_files).start()
        try:
            with Client(sock) as client:
                deadline = time.monotonic() + 20
                # Refused with four held: no snapshot of them fits in a file, the disk is stuck.
                stuck = False
                while not stuck:
                    assert time.monotonic() < deadline, (acked, refused)
                    try:
                        acked.append(client.enqueue({"pad": "x" * 100_000}).queue_id)
                    except StorageUnavailable as err:
                        refused.append(err)
                        stuck = len(acked) >= 4
                        if not stuck:
                            time.sleep(0.1)  # the store retries its disk at most once a second
                health = client.health()
            assert "EFBIG" in refused[0].message and refused[0].code == "storage_unavailable"
            assert health.status == "degraded" and "journal cannot write" in health.reasons[0]
            code = daemon.stop(signal.SIGTERM)
            last = daemon.logs[-1]
            assert code == 1
            assert last["event"] == "stopped" and last["unkept"] == len(acked)
            assert last["level"] == "error"
            daemon.preexec = None
            daemon.start()  # without the limit: every acknowledged request is on disk
            with Client(sock) as client:
                found = [client.status(q).status for q in acked]
            assert found == ["queued"] * len(acked)
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
