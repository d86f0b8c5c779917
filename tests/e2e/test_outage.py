"""An outage longer than the old retry budget: queued requests wait for the provider, for free.

300 requests queued (each allowed 3 attempts) while the fake provider is down: first its
port closed (connections refused), then answering 503, for longer than 20 of the workers'
longest retry delays. Before issue 22 each put-back cost an attempt and the requests failed
for good within a few delays; now waiting costs none. When the provider is back every request
completes, once, with `attempts` at most 2, and every result reaches the receiver, signed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.harness import Fleet, provider_calls_by_tag, wait_until
from tests.support.fake_provider import FakeProvider
from tests.support.fake_receiver import FakeReceiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

COUNT = 300
MAX_ATTEMPTS = 3
BACKOFF_MAX_S = 0.25  # LLM_RETRY_BACKOFF_MAX_SECONDS: the longest retry delay
OUTAGE_S = 20 * BACKOFF_MAX_S + 2  # longer than 20 retry delays


def test_an_outage_longer_than_the_old_budget_loses_and_fails_nothing(
    tmp: Path, receiver: FakeReceiver, secret: str
) -> None:
    provider = FakeProvider(completion_tokens=10)  # not started: its port refuses
    settings = {"LLM_RETRY_BACKOFF_BASE_SECONDS": "0.05",
                "LLM_RETRY_BACKOFF_MAX_SECONDS": str(BACKOFF_MAX_S),
                "LLM_BREAKER_FAILURES": "5", "LLM_BREAKER_RESET_SECONDS": "0.5",
                "LLM_WEBHOOK_SECRET": secret}  # fmt: skip
    with Fleet(tmp, daemons=2, workers_per_daemon=1, concurrency=8, llm=settings) as fleet:
        fleet.start(provider)
        down = time.monotonic()
        ids = fleet.enqueue(COUNT, prefix="out", callback_url=receiver.url(),
                            max_attempts=MAX_ATTEMPTS)  # fmt: skip
        assert len(ids) == COUNT
        # The workers meet the closed port, then a provider answering 503.
        wait_until(lambda: len(fleet.lines("llm_retried")) >= 1, 30, "a request put back")
        wait_until(lambda: time.monotonic() - down >= OUTAGE_S / 2, OUTAGE_S, "half the outage")
        provider.fail_with(503)
        wait_until(lambda: time.monotonic() - down >= OUTAGE_S, OUTAGE_S, "the whole outage")
        waiting = fleet.count_status(ids)
        assert set(waiting) <= {"queued", "processing"}, waiting  # none failed, none lost
        provider.come_up()
        up = time.monotonic()
        lost = receiver.wait_accepted(ids, 90)
        assert not lost, f"{len(lost)} results never delivered, e.g. {sorted(lost)[:5]}"
        wait_until(lambda: fleet.count_status(ids) == {"completed": COUNT}, 30,
                   "every request completed")  # fmt: skip
        infos = fleet.infos(ids)
        retried = fleet.lines("llm_retried")
    assert up - down >= OUTAGE_S
    # The outage cost no attempt: at most 2 (a lapsed lease may count one).
    attempts = {qid: info.attempts for qid, info in infos.items() if info is not None}
    assert max(attempts.values()) <= 2, {q: a for q, a in attempts.items() if a > 2}
    assert len(retried) >= 1 and all("counts=False" in line or '"counts": false' in line
                                     for line in retried), retried[:3]  # fmt: skip
    # Each completed once: one paid call per request, answered 200.
    paid = provider_calls_by_tag(provider)
    assert set(paid) == set(ids) and set(paid.values()) == {1}
    assert receiver.accepted_ids() == set(ids)
    assert receiver.check() == []
