"""Standard Webhooks signatures for result deliveries (the scheme OpenAI's webhooks and Svix use).

A signed delivery carries three headers:

- `webhook-id`: the message's id, the same on every retry of one delivery, so a receiver
  dedupes by it; for a queued request it is `message_id(queue_id)`, `msg_<queue_id>`;
- `webhook-timestamp`: when this attempt was sent, in whole seconds since the epoch;
- `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, once per
  secret, space-separated: while a secret is rotated both are configured, and a receiver that
  knows either one verifies.

Secrets are `whsec_<base64>` (24 to 64 random bytes; `generate_secret()` makes one), several
separated by spaces in `LLM_WEBHOOK_SECRET`. `sign` makes the headers, `verify` checks them
(constant-time, within a tolerance of the timestamp) and raises `WebhookVerificationError`.
The body signed is the exact bytes sent: serialise once, sign those bytes, send those bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets as _random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from sidecar.config import Settings
from sidecar.config.parse import WEBHOOK_SECRET_PREFIX, decode_webhook_secret

log = structlog.get_logger("sidecar.llm.webhooks")

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SETTING = "LLM_WEBHOOK_SECRET"
# The spec's default: a delivery older or newer than five minutes is refused (replays, clocks).
DEFAULT_TOLERANCE_S = 300

_HEADER_SAFE = re.compile(r"[!-~]{1,256}")  # printable ASCII, no spaces: safe in a header


class WebhookVerificationError(ValueError):
    """A delivery that must not be trusted: a header missing or malformed, a timestamp outside
    the tolerance, or no signature made with a configured secret."""


class WebhookSecretError(ValueError):
    """A secret that is not `whsec_<base64>` of 24 to 64 bytes; the message names the setting
    and the position of the secret, never the secret itself."""


@dataclass(frozen=True)
class WebhookSecrets:
    """The decoded keys of one or more `whsec_` secrets; shown redacted."""

    keys: tuple[bytes, ...]

    @classmethod
    def parse(cls, raw: str | Iterable[str], *, setting: str = SETTING) -> WebhookSecrets:
        """Space-separated secrets (or a list of them); WebhookSecretError naming `setting`."""
        parts = raw.split() if isinstance(raw, str) else [s for part in raw for s in part.split()]
        if not parts:
            raise WebhookSecretError(f"{setting} is empty: expected at least one whsec_ secret")
        keys: list[bytes] = []
        for n, part in enumerate(parts, 1):
            try:
                keys.append(decode_webhook_secret(part))
            except ValueError as exc:
                raise WebhookSecretError(
                    f"{setting}: secret {n} of {len(parts)} is invalid: {exc} "
                    f"(expected {WEBHOOK_SECRET_PREFIX} then 24 to 64 bytes in base64)"
                ) from None
        return cls(tuple(keys))

    def __repr__(self) -> str:
        return f"WebhookSecrets(<{len(self.keys)} key(s), redacted>)"


# A parsed WebhookSecrets, or the setting's text, or a list of `whsec_` secrets.
SecretsLike = WebhookSecrets | str | Iterable[str]


def _keys(secrets: SecretsLike) -> tuple[bytes, ...]:
    if isinstance(secrets, WebhookSecrets):
        if not secrets.keys:
            raise WebhookSecretError("no webhook secret: expected at least one whsec_ secret")
        return secrets.keys
    return WebhookSecrets.parse(secrets).keys


def generate_secret(nbytes: int = 32) -> str:
    """A fresh random secret in the `whsec_<base64>` form (32 bytes unless told)."""
    if not 24 <= nbytes <= 64:
        raise ValueError(f"a secret is 24 to 64 bytes, not {nbytes}")
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(_random.token_bytes(nbytes)).decode()


def message_id(queue_id: str) -> str:
    """The `webhook-id` of a request's result: stable across every retry of its delivery."""
    msg_id = f"msg_{queue_id}"
    if not _HEADER_SAFE.fullmatch(msg_id):
        raise ValueError(f"queue_id {queue_id!r} is not 1-128 printable ASCII characters")
    return msg_id


def _body_bytes(body: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, (bytes, bytearray)) or (
        isinstance(body, memoryview) and body.itemsize == 1
    ):
        return bytes(body)
    raise TypeError(f"the body must be bytes or str, not {type(body).__name__}")


def _digest(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(
    secrets: SecretsLike,
    msg_id: str,
    timestamp: float,
    body: bytes | bytearray | memoryview | str,
) -> dict[str, str]:
    """The three Standard Webhooks headers of one delivery attempt, signed with every secret.

    `timestamp` is this attempt's send time in seconds (floored to whole seconds); `body` the
    exact bytes sent (a str is signed as its UTF-8 encoding).
    """
    keys = _keys(secrets)
    if not _HEADER_SAFE.fullmatch(msg_id):
        raise ValueError(f"webhook id {msg_id!r} is not 1-256 printable ASCII characters")
    seconds = int(timestamp // 1)
    if seconds < 0:
        raise ValueError(f"timestamp {timestamp!r} is before the epoch")
    data = _body_bytes(body)
    signatures = " ".join(
        "v1," + base64.b64encode(_digest(key, msg_id, seconds, data)).decode() for key in keys
    )
    return {ID_HEADER: msg_id, TIMESTAMP_HEADER: str(seconds), SIGNATURE_HEADER: signatures}


def verify(
    headers: Mapping[str, str],
    body: bytes | bytearray | memoryview | str,
    secrets: SecretsLike,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a delivery's headers against its raw body; WebhookVerificationError if it fails.

    Header names are matched case-insensitively. The timestamp must be whole seconds within
    `tolerance_s` of `now` (default: the clock) either way; one `v1` signature must match one
    of the secrets (compared in constant time). Pass the body exactly as received.
    """
    keys = _keys(secrets)
    if tolerance_s < 0:
        raise ValueError(f"tolerance_s must be >= 0, not {tolerance_s!r}")
    lowered = {str(k).lower(): v for k, v in headers.items()}
    for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER):
        if not lowered.get(name):
            raise WebhookVerificationError(f"missing {name} header")
    msg_id = lowered[ID_HEADER]
    raw_ts = lowered[TIMESTAMP_HEADER].strip()
    if not re.fullmatch(r"[0-9]{1,15}", raw_ts):
        raise WebhookVerificationError(
            f"{TIMESTAMP_HEADER} {raw_ts[:32]!r} is not whole seconds since the epoch"
        )
    timestamp = int(raw_ts)
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError(
            f"{TIMESTAMP_HEADER} is too old: {current - timestamp:.0f} s ago, "
            f"more than the tolerance of {tolerance_s:g} s (a replay, or a clock out of step)"
        )
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError(
            f"{TIMESTAMP_HEADER} is in the future: {timestamp - current:.0f} s ahead, more "
            f"than the tolerance of {tolerance_s:g} s (a clock out of step)"
        )
    offered: list[bytes] = []
    for entry in lowered[SIGNATURE_HEADER].split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue  # another scheme (v1a, a later version): not ours to check
        try:
            offered.append(base64.b64decode(encoded, validate=True))
        except binascii.Error:
            continue
    if not offered:
        raise WebhookVerificationError(f"no v1 signature in the {SIGNATURE_HEADER} header")
    data = _body_bytes(body)
    matched = False
    for key in keys:
        expected = _digest(key, msg_id, timestamp, data)
        for sig in offered:
            matched |= hmac.compare_digest(expected, sig)
    if not matched:
        raise WebhookVerificationError(
            f"no signature matches: {len(offered)} v1 signature(s) checked against "
            f"{len(keys)} secret(s) (a wrong secret, or a body changed on the way)"
        )


class WebhookSigner:
    """Signs each delivery attempt of a result with the configured secrets."""

    def __init__(self, secrets: SecretsLike) -> None:
        self.secrets = (
            secrets if isinstance(secrets, WebhookSecrets) else WebhookSecrets.parse(secrets)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSigner | None:
        """The signer LLM_WEBHOOK_SECRET asks for; None (and one warning) when it is unset."""
        if not settings.llm_webhook_secret:
            log.warning("llm_webhook_unsigned", setting=SETTING,
                        detail="results are delivered without a webhook-signature")  # fmt: skip
            return None
        return cls(settings.llm_webhook_secret)

    def headers(
        self, queue_id: str, body: bytes | bytearray | memoryview | str, *, now: float | None = None
    ) -> dict[str, str]:
        """The headers of one attempt at delivering `queue_id`'s result: same id every time,
        this attempt's timestamp, a signature per secret."""
        when = time.time() if now is None else now
        return sign(self.secrets, message_id(queue_id), when, body)
