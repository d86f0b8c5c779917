"""Standard Webhooks signatures, checked both ways against the independent reference package.

Our `sign` must satisfy `standardwebhooks.Webhook(secret).verify`, and headers that package
makes must satisfy our `verify`; then rotation, tampering, wrong secrets, timestamps out of
the tolerance, and secrets refused at start with the setting named.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
import standardwebhooks
import structlog

from sidecar.config import ConfigError, Settings
from sidecar.llm.callbacks import AllowList, CallbackSender, Verdict
from sidecar.llm.webhooks import (
    WebhookSecretError,
    WebhookSecrets,
    WebhookSigner,
    WebhookVerificationError,
    generate_secret,
    message_id,
    sign,
    verify,
)
from tests.support.llm_fakes import ROOT, Proc, free_port

# The test vector of the Standard Webhooks specification (and of every reference library).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

BODY = (
    b'{"queue_id": "q1", "status": "completed", "response": {"text": "h\xc3\xa9llo \xe2\x9c\x93"}}'
)

BODIES = [
    b"",
    b"{}",
    BODY,
    "réponse ✓ 日本語 🎉".encode(),
    bytes(range(256)),  # not UTF-8 at all: signed byte for byte
    b"x" * 100_000,
    b"line one\r\nline two\n\x00",
]


def reference(secret: str) -> standardwebhooks.Webhook:
    return standardwebhooks.Webhook(secret)


def test_the_specification_test_vector() -> None:
    headers = sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }
    verify(headers, SPEC_BODY, SPEC_SECRET, now=SPEC_TIMESTAMP + 10)


def test_our_signature_is_verified_by_the_reference_package() -> None:
    secret = generate_secret()
    headers = sign(secret, message_id("q1"), time.time(), BODY)
    assert reference(secret).verify(BODY, headers) == {
        "queue_id": "q1",
        "status": "completed",
        "response": {"text": "héllo ✓"},
    }


def test_the_reference_package_signature_is_verified_by_ours() -> None:
    secret = generate_secret()
    now = datetime.now(tz=UTC)
    signature = reference(secret).sign("msg_q2", now, BODY)
    headers = {
        "webhook-id": "msg_q2",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    verify(headers, BODY, secret)


@pytest.mark.parametrize("body", BODIES, ids=lambda b: f"{len(b)}-bytes")
def test_every_body_round_trips_both_ways(body: bytes) -> None:
    secret = generate_secret()
    now = time.time()
    ours = sign(secret, "msg_body", now, body)
    reference(secret).verify(body, ours, json_parse=False)
    verify(ours, body, secret, now=now)
    theirs = reference(secret).sign("msg_body", datetime.fromtimestamp(now, tz=UTC), body)
    assert theirs == ours["webhook-signature"]
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(ours, body + b" ", secret, now=now)


def test_a_str_body_is_signed_as_its_utf8_bytes() -> None:
    secret = generate_secret()
    text = "réponse ✓"
    assert sign(secret, "msg_s", 1_700_000_000, text) == sign(
        secret, "msg_s", 1_700_000_000, text.encode()
    )


def test_rotation_signs_with_every_secret_and_either_verifies() -> None:
    old, new = generate_secret(), generate_secret()
    headers = sign(f"{old} {new}", "msg_rot", time.time(), BODY)
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    # A receiver that knows only the old secret, or only the new one, verifies.
    reference(old).verify(BODY, headers)
    reference(new).verify(BODY, headers)
    verify(headers, BODY, old)
    verify(headers, BODY, [new])
    # A receiver configured with both accepts a sender that signs with either one alone.
    verify(sign(old, "msg_rot", time.time(), BODY), BODY, f"{old} {new}")
    verify(sign(new, "msg_rot", time.time(), BODY), BODY, f"{new}  {old}")


def test_a_tampered_body_is_refused_by_both() -> None:
    secret = generate_secret()
    headers = sign(secret, "msg_t", time.time(), BODY)
    tampered = BODY.replace(b"completed", b"failed")
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(headers, tampered, secret)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        reference(secret).verify(tampered, headers)


def test_a_changed_id_or_timestamp_is_refused() -> None:
    secret = generate_secret()
    now = time.time()
    headers = sign(secret, "msg_a", now, BODY)
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify({**headers, "webhook-id": "msg_b"}, BODY, secret, now=now)
    later = str(int(headers["webhook-timestamp"]) + 1)
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify({**headers, "webhook-timestamp": later}, BODY, secret, now=now)


def test_the_wrong_secret_is_refused() -> None:
    headers = sign(generate_secret(), "msg_w", time.time(), BODY)
    with pytest.raises(WebhookVerificationError, match=r"1 v1 signature.*1 secret"):
        verify(headers, BODY, generate_secret())


@pytest.mark.parametrize(
    ("offset", "message"),
    [(-301, "too old"), (-3600, "too old"), (301, "in the future"), (86400, "in the future")],
)
def test_a_timestamp_outside_the_tolerance_is_refused(offset: int, message: str) -> None:
    secret = generate_secret()
    now = 1_700_000_000.0
    headers = sign(secret, "msg_ts", now + offset, BODY)
    with pytest.raises(WebhookVerificationError, match=message):
        verify(headers, BODY, secret, now=now)
    # Within a wider tolerance the same headers pass; at the edge of the default, too.
    verify(headers, BODY, secret, now=now, tolerance_s=abs(offset))
    verify(sign(secret, "msg_ts", now - 300, BODY), BODY, secret, now=now)


def test_a_stale_delivery_is_refused_by_the_reference_package_too() -> None:
    secret = generate_secret()
    headers = sign(secret, "msg_old", time.time() - 3600, BODY)
    with pytest.raises(standardwebhooks.WebhookVerificationError, match="too old"):
        reference(secret).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(headers, BODY, secret)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_named(missing: str) -> None:
    secret = generate_secret()
    headers = sign(secret, "msg_m", time.time(), BODY)
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match=f"missing {missing} header"):
        verify(headers, BODY, secret)


@pytest.mark.parametrize("timestamp", ["soon", "1.5e9", "-5", "", "1700000000.5"])
def test_a_timestamp_that_is_not_whole_seconds_is_refused(timestamp: str) -> None:
    secret = generate_secret()
    headers = {**sign(secret, "msg_x", time.time(), BODY), "webhook-timestamp": timestamp}
    with pytest.raises(WebhookVerificationError):
        verify(headers, BODY, secret)


def test_header_names_are_case_insensitive_and_other_versions_are_skipped() -> None:
    secret = generate_secret()
    headers = sign(secret, "msg_c", time.time(), BODY)
    mixed = {
        "Webhook-Id": headers["webhook-id"],
        "WEBHOOK-TIMESTAMP": headers["webhook-timestamp"],
        # An asymmetric v1a entry and garbage beside ours: ignored, ours still matches.
        "Webhook-Signature": f"v1a,abcd v1,!!notbase64 {headers['webhook-signature']}",
    }
    verify(mixed, BODY, secret)
    with pytest.raises(WebhookVerificationError, match="no v1 signature"):
        verify({**headers, "webhook-signature": "v1a,abcd v2,xyz"}, BODY, secret)


def test_the_webhook_id_is_stable_per_request_and_the_timestamp_per_attempt() -> None:
    signer = WebhookSigner(generate_secret())
    first = signer.headers("q-42", BODY, now=1_700_000_000)
    retry = signer.headers("q-42", BODY, now=1_700_000_060)
    assert first["webhook-id"] == retry["webhook-id"] == "msg_q-42"
    assert (first["webhook-timestamp"], retry["webhook-timestamp"]) == ("1700000000", "1700000060")
    assert first["webhook-signature"] != retry["webhook-signature"]
    with pytest.raises(ValueError, match="printable ASCII"):
        message_id("has space")


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
        ("whsec_not*base64!", "not base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "this one is 5"),
        ("whsec_" + base64.b64encode(bytes(65)).decode(), "this one is 65"),
        (f"{SPEC_SECRET} whsec_", "secret 2 of 2"),
    ],
)
def test_a_bad_secret_is_a_clear_error_naming_the_setting(raw: str, why: str) -> None:
    with pytest.raises(WebhookSecretError, match="LLM_WEBHOOK_SECRET") as err:
        WebhookSecrets.parse(raw)
    assert why in str(err.value)
    # The message says what is wrong and where, never the secret itself.
    assert "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" not in str(err.value)
    with pytest.raises(WebhookSecretError):
        sign(raw, "msg_bad", time.time(), BODY)
    with pytest.raises(ConfigError, match="LLM_WEBHOOK_SECRET"):
        Settings.from_env({"LLM_WEBHOOK_SECRET": raw})


def test_no_secret_signs_nothing() -> None:
    with pytest.raises(WebhookSecretError, match="empty"):
        sign("", "msg_e", time.time(), BODY)
    with pytest.raises(WebhookSecretError, match="empty"):
        verify({}, BODY, "  ")


def test_secrets_are_redacted_wherever_they_are_shown() -> None:
    settings = Settings.from_env({"LLM_WEBHOOK_SECRET": f"{SPEC_SECRET} {generate_secret()}"})
    assert len(settings.llm_webhook_secret) == 2
    assert "MfKQ9r8G" not in repr(settings) and "MfKQ9r8G" not in str(settings.llm_webhook_secret)
    assert "MfKQ9r8G" not in repr(WebhookSecrets.parse(SPEC_SECRET))


def test_the_signer_follows_the_setting_and_warns_when_unsigned() -> None:
    signed = WebhookSigner.from_settings(Settings.from_env({"LLM_WEBHOOK_SECRET": SPEC_SECRET}))
    assert signed is not None
    headers = signed.headers("p5jXN8AQM9LWM0D4loKWxJek", SPEC_BODY, now=SPEC_TIMESTAMP)
    assert headers["webhook-signature"] == SPEC_SIGNATURE
    with structlog.testing.capture_logs() as logs:
        assert WebhookSigner.from_settings(Settings.from_env({})) is None
    assert [e["event"] for e in logs] == ["llm_webhook_unsigned"]
    assert logs[0]["log_level"] == "warning"


def test_generated_secrets_are_valid_and_distinct() -> None:
    made = {generate_secret() for _ in range(20)}
    assert len(made) == 20
    for secret in made:
        assert len(WebhookSecrets.parse(secret).keys[0]) == 32
    with pytest.raises(ValueError, match="24 to 64"):
        generate_secret(16)


# -- the example receiver -----------------------------------------------------------------------


@pytest.fixture
def receiver_secret() -> str:
    return generate_secret()


@pytest.fixture
def example_receiver(receiver_secret: str) -> Iterator[str]:
    """examples/webhook_receiver.py under uvicorn on loopback; yields its URL."""
    port = free_port()
    env = {**os.environ, "LLM_WEBHOOK_SECRET": f"{generate_secret()} {receiver_secret}",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    proc = Proc([sys.executable, "-m", "uvicorn", "examples.webhook_receiver:app",
                 "--host", "127.0.0.1", "--port", str(port)], env)  # fmt: skip
    try:
        proc.wait_for_line("Application startup complete")
        yield f"http://127.0.0.1:{port}/webhooks/llm"
    finally:
        proc.stop()


async def test_the_example_receiver_verifies_dedupes_and_acknowledges(
    example_receiver: str, receiver_secret: str
) -> None:
    url = example_receiver
    # The worker's side: the receiver knows the new secret beside an old one.
    signer = WebhookSigner(receiver_secret)
    body = json.dumps({"queue_id": "q-7", "status": "completed", "response": {"t": "é"}}).encode()
    async with CallbackSender(AllowList.parse("127.0.0.1")) as sender:
        first = await sender.deliver(url, body, signer.headers("q-7", body))
        assert first.verdict is Verdict.DELIVERED, first.reason
        # A retry of the same delivery (its 2xx lost, say): same id, a new timestamp.
        again = await sender.deliver(url, body, signer.headers("q-7", body, now=time.time() + 1))
        assert again.delivered
        # Not signed with a secret it knows, or tampered with: refused (and retried by us).
        stranger = WebhookSigner(generate_secret()).headers("q-8", body)
        assert (await sender.deliver(url, body, stranger)).http_status == 401
        tampered = body.replace(b"completed", b"failed")
        assert (await sender.deliver(url, tampered, signer.headers("q-7", body))).retry
    async with httpx.AsyncClient() as http:
        seen = (await http.get(url)).json()
    assert seen["results"] == {
        "q-7": {"queue_id": "q-7", "status": "completed", "response": {"t": "é"}}
    }
    assert seen["repeats"] == {"msg_q-7": 1}


async def test_the_example_receiver_refuses_to_start_without_a_good_secret() -> None:
    from examples.webhook_receiver import create_app

    for raw in ("", "whsec_tooshort"):
        app = create_app(raw)
        with pytest.raises(WebhookSecretError, match="LLM_WEBHOOK_SECRET"):
            async with app.router.lifespan_context(app):
                pass


def test_the_example_deduper_forgets_after_its_window() -> None:
    from examples.webhook_receiver import Deduper

    d = Deduper(keep_s=10, max_ids=2)
    assert not d.seen("a", now=0)
    d.remember("a", now=0)
    assert d.seen("a", now=5)
    assert not d.seen("a", now=11)  # out of the window
    for n, msg in enumerate("bcd"):
        d.remember(msg, now=20 + n)
    assert not d.seen("b", now=23) and d.seen("c", now=23) and d.seen("d", now=23)
