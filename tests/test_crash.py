"""Crash tests through the real daemon: acknowledged requests survive its death (issue 8).

Each test counts what the daemon acknowledged against what it finds after a restart: lost
must be 0, and no completion it acknowledged may be handed out again.
"""

from __future__ import annotations

import signal

from tests.crash import check, load_then
from tests.daemon import running_daemon

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
