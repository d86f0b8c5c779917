"""Pick-up: a queued request without a callback is fetched by its queue_id, once.

The gateway (the example service) calls a provider that is down, so it queues the request
(202); the worker (`sidecar work`) calls a fake provider that is up. GET /v1/requests/{id}
shows the request's progress while it waits, then returns its result once (the result leaves
the `pickups` outbox), then answers 404 `not_found`.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import PICKUPS, Fleet, chat_body, wait_until
from tests.support.fake_provider import FakeProvider
from tests.support.llm_fakes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_a_result_is_picked_up_once_then_not_found(tmp: Path) -> None:
    provider = FakeProvider(completion_tokens=7).start()
    dead = f"http://127.0.0.1:{free_port()}/v1"  # the gateway's provider: nobody listens
    try:
        with Fleet(tmp, daemons=1, workers_per_daemon=1, concurrency=2) as fleet:
            fleet.start(provider, workers=False)
            base = fleet.start_gateway(LLM_BASE_URL=dead)
            with httpx.Client(base_url=base, timeout=15) as http:
                sent = http.post("/v1/chat/completions", json=chat_body("pick-1"),
                                 headers={"Idempotency-Key": "pick-1"})  # fmt: skip
                assert sent.status_code == 202, sent.text
                qid = sent.json()["queue_id"]
                # Scoped from the Idempotency-Key (caller, key and body), never the key itself.
                assert qid.startswith("idem-") and "pick-1" not in qid
                # Progress while it waits: queued, nothing to pick up yet.
                waiting = http.get(f"/v1/requests/{qid}")
                assert waiting.status_code == 200
                assert waiting.json()["status"] == "queued" and "response" not in waiting.json()
                assert fleet.count_status([qid], PICKUPS) == {"missing": 1}
                fleet.start_workers()
                picked: list[httpx.Response] = []

                def result_ready() -> bool:
                    resp = http.get(f"/v1/requests/{qid}")
                    assert resp.status_code == 200, resp.text
                    if "response" in resp.json():
                        picked.append(resp)
                        return True
                    assert resp.json()["status"] in ("queued", "processing"), resp.text
                    return False

                wait_until(result_ready, 30, "the result ready to pick up")
                again = http.get(f"/v1/requests/{qid}")
                third = http.get(f"/v1/requests/{qid}")
    finally:
        provider.stop()
    [result] = picked
    body = result.json()
    assert body["queue_id"] == qid and body["status"] == "completed"
    assert body["response"]["choices"][0]["message"]["content"] == " ".join(["tok"] * 7)
    assert body["response"]["usage"]["completion_tokens"] == 7
    assert again.status_code == 404 and again.json()["error"] == "not_found"
    assert third.status_code == 404
    # The one call the worker made was for this request; the gateway's went nowhere.
    assert [c.tag.split(" ")[0] for c in provider.snapshot() if c.ok] == ["pick-1"]
