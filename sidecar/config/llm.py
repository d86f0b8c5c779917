"""The LLM side's settings (gateway, workers, recorder); the daemon never reads them."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import parse as p
from sidecar.config.spec import setting
from sidecar.models import MAX_TTL_S


@dataclass(frozen=True, kw_only=True)
class LLMSettings:
    """The LLM side's rows of the settings table."""

    record_llm_responses: bool = setting(
        False, "RECORD_LLM_RESPONSES", p.boolean, "true or false",
        "the development response recorder (`sidecar.llm`): only with "
        "`ENVIRONMENT=development`; refused with a warning in production",
    )  # fmt: skip
    # On by default: a provider outage queues requests (202) instead of failing them; off answers
    # 503, so a service can be deployed first and switched on per environment.
    llm_queue_enabled: bool = setting(
        True, "LLM_QUEUE_ENABLED", p.boolean, "true or false",
        "the gateway queues a request (202) when the provider is unavailable; `false`: "
        "answers 503",
    )  # fmt: skip
    # Deliveries of a queued LLM request whose outcome may be the request's own fault (a 4xx
    # other than 408/429, a lapsed lease): waiting for an unavailable provider counts none
    # (fail with counts=false), so only the TTL bounds an outage. At most the protocol's limit.
    llm_queue_max_attempts: int = setting(
        10, "LLM_QUEUE_MAX_ATTEMPTS", p.whole(1, 1000), "a whole number >= 1 and <= 1000",
        "deliveries of a queued LLM request that may fail it (waits for an unavailable provider "
        "count none: the request's TTL bounds them)",
    )  # fmt: skip
    # "": the mock in development, the OpenAI-compatible provider in production.
    llm_provider: str = setting(
        "", "LLM_PROVIDER", p.choice("mock", "openai"), "mock or openai",
        "`mock` or `openai` (any OpenAI-compatible chat-completions API)",
        shown="`mock` in development, `openai` in production",
    )  # fmt: skip
    llm_base_url: str = setting(
        "https://api.openai.com/v1", "LLM_BASE_URL", p.http_url, "an http:// or https:// URL",
        "the provider's API",
    )  # fmt: skip
    llm_model: str = setting(
        "gpt-4o-mini", "LLM_MODEL", p.text, "a model name",
        "the provider's default model",
    )  # fmt: skip
    # The API key comes from LLM_API_KEY or this file; it is never kept in Settings or logged.
    llm_api_key_file: str | None = setting(
        None, "LLM_API_KEY_FILE", p.text, "a file path",
        "a file holding the provider's API key (or set `LLM_API_KEY` itself); never logged "
        "or recorded",
    )  # fmt: skip
    # A refused or silent provider must send the request to the queue quickly; a completion
    # itself may take a while to stream back.
    llm_connect_timeout_s: float = setting(
        2.0, "LLM_CONNECT_TIMEOUT_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "provider connect timeout (a timeout counts as unavailable)",
    )  # fmt: skip
    llm_read_timeout_s: float = setting(
        60.0, "LLM_READ_TIMEOUT_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "provider read timeout (a timeout counts as unavailable)",
    )  # fmt: skip
    # Five failures in a row open the breaker; after 10 s one probe may close it again.
    llm_breaker_failures: int = setting(
        5, "LLM_BREAKER_FAILURES", p.whole(1), "a whole number >= 1",
        "failures in a row (across the fleet) that open the provider's shared breaker",
    )  # fmt: skip
    llm_breaker_reset_s: float = setting(
        10.0, "LLM_BREAKER_RESET_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "how long the open breaker waits before one probe, for the whole fleet, may close it",
    )  # fmt: skip
    # A failed provider call is retried after 1 s, then 2, 4, ... per delivery: quick for a
    # blip, and at most a minute apart during a long outage.
    llm_retry_backoff_base_s: float = setting(
        1.0, "LLM_RETRY_BACKOFF_BASE_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "`sidecar work`: the delay before a request whose provider call failed is handed out "
        "again, doubled per delivery (unless the provider sent `Retry-After`)",
    )  # fmt: skip
    llm_retry_backoff_max_s: float = setting(
        60.0, "LLM_RETRY_BACKOFF_MAX_SECONDS", p.number(0, lo_open=True),
        "a number of seconds > 0, at least LLM_RETRY_BACKOFF_BASE_SECONDS",
        "`sidecar work`: the longest such delay",
    )  # fmt: skip
    # Four requests at once per worker process: the provider call is the wait, not the CPU.
    llm_worker_concurrency: int = setting(
        4, "LLM_WORKER_CONCURRENCY", p.whole(1, 1000), "a whole number from 1 to 1000",
        "`sidecar work`: requests one worker process handles at once (`--concurrency` "
        "overrides it)",
    )  # fmt: skip
    # One long poll: a worker with free slots waits this long for a request, then asks again.
    llm_worker_poll_s: float = setting(
        5.0, "LLM_WORKER_POLL_SECONDS", p.number(0, 60), "a number of seconds from 0 to 60",
        "`sidecar work`: how long one dequeue waits for a request (a long poll)",
    )  # fmt: skip
    # A callback is the service's own handler: 5 s is far above a healthy answer.
    llm_callback_timeout_s: float = setting(
        5.0, "LLM_CALLBACK_TIMEOUT_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "`sidecar work`: how long one callback delivery may take",
    )  # fmt: skip
    llm_response_log_dir: str = setting(
        "llm_response_logs", "LLM_RESPONSE_LOG_DIR", p.text, "a folder path",
        "where the recorder writes",
    )  # fmt: skip
    # The recorder stops writing (with one log line) once its folder holds this much.
    llm_response_log_max_mb: float = setting(
        100.0, "LLM_RESPONSE_LOG_MAX_MB", p.number(0, lo_open=True), "a number of megabytes > 0",
        "the size at which the recorder stops (logging `llm_recorder_cap_reached`)",
    )  # fmt: skip
    # Unset by default: signing needs a secret shared with each receiver, which only the
    # operator can hand out. Empty means results are POSTed unsigned, and the worker says so
    # once at start (`llm_webhook_unsigned`) rather than refusing to run: a deployment that
    # upgrades keeps delivering, and a receiver that does not verify gains nothing from it.
    llm_webhook_secret: tuple[str, ...] = setting(
        (), "LLM_WEBHOOK_SECRET", p.webhook_secrets,
        "space-separated secrets, each whsec_ then 24 to 64 bytes in base64",
        "signs each result delivery (Standard Webhooks `webhook-signature`) with every secret "
        "listed, so a receiver verifies with the old or the new one while one is rotated",
        shown="unset: results are delivered unsigned (warned at worker start)", secret=True,
    )  # fmt: skip
    # Empty by default: a callback URL that is, or resolves to, a loopback, private,
    # link-local or other non-public address is refused (SSRF), until the operator names the
    # receivers on the internal network that may be called.
    llm_callback_allowed_hosts: tuple[str, ...] = setting(
        (), "LLM_CALLBACK_ALLOWED_HOSTS", p.host_list,
        "comma- or space-separated host names, IP addresses and CIDRs",
        "callback receivers allowed although they are, or resolve to, a loopback, private, "
        "link-local or other non-public address (refused otherwise)",
        shown="unset: only public addresses",
    )  # fmt: skip
    # At most an hour between two tries of a delivery: a receiver back from a long outage
    # gets its results within the hour, and one down for a day costs about 50 tries.
    llm_webhook_retry_max_s: float = setting(
        3600.0, "LLM_WEBHOOK_RETRY_MAX_SECONDS", p.number(0, lo_open=True),
        "a number of seconds > 0",
        "`sidecar work`: the longest wait between two tries of a result's delivery to its "
        "callback URL (about 1 s after the first failure, growing with jitter up to this; "
        "a receiver's `Retry-After` on 429/503 instead); `LLM_RESULT_TTL_HOURS` ends the tries",
    )  # fmt: skip
    # A day: a receiver down for a working day, or a caller that polls late, still gets it.
    # At most the protocol's TTL (MAX_TTL_S): a longer one would make every kept result fail.
    llm_result_ttl_hours: float = setting(
        24.0, "LLM_RESULT_TTL_HOURS", p.number(0, MAX_TTL_S / 3600, lo_open=True),
        f"a number of hours > 0 and <= {MAX_TTL_S / 3600:g}",
        "how long a result waits in the outbox (`deliveries` for its callback URL, `pickups` "
        "for `GET /v1/requests/{queue_id}`) before it expires; deleted once delivered",
    )  # fmt: skip
    # Off by default: only the operator knows the account's limits. Set them to the provider's
    # published rate limits so the fleet never needs a 429 to find them.
    llm_provider_rpm: int = setting(
        0, "LLM_PROVIDER_RPM", p.whole(0, 1_000_000), "a whole number from 0 to 1000000",
        "requests per minute the whole fleet sends to one provider, base URL, model and API "
        "key (the gateway's fresh calls and the workers' together); 0: no limit",
    )  # fmt: skip
    llm_provider_tpm: int = setting(
        0, "LLM_PROVIDER_TPM", p.whole(0, 1_000_000_000), "a whole number from 0 to 1000000000",
        "tokens per minute the whole fleet sends to one provider, base URL, model and API key "
        "(reserved before a call, settled with the `usage` it reports); 0: no limit",
    )  # fmt: skip
    # A typical chat answer fits in 1024 tokens; a request that names max_tokens reserves that.
    llm_default_max_tokens: int = setting(
        1024, "LLM_DEFAULT_MAX_TOKENS", p.whole(1, 10_000_000), "a whole number from 1 to 10000000",
        "tokens reserved for the answer of a request without `max_tokens` (with the prompt's "
        "estimate, about its JSON bytes / 4), until the call settles with its `usage`",
    )  # fmt: skip
    # Half: the backlog drains at half the budget while the live service asks for the rest.
    llm_drain_share: float = setting(
        0.5, "LLM_DRAIN_SHARE", p.number(0, 1, lo_open=True), "a number > 0 and at most 1",
        "the share of the provider's budget the workers' drain may use while fresh gateway "
        "calls are waiting for it (all of it when none are)",
    )  # fmt: skip
    # Half a minute from the probe's success to the full rate: a recovering provider is not
    # hit by the whole backlog at once.
    llm_ramp_s: float = setting(
        30.0, "LLM_RAMP_SECONDS", p.number(0, 3600), "a number of seconds from 0 to 3600",
        "after an outage (the shared breaker closed again), the admitted rate grows from a "
        "trickle to the full limit over this long; 0: at once",
    )  # fmt: skip
    # Four at once: a delivery is one short POST; a receiver down makes each wait its timeout.
    llm_delivery_concurrency: int = setting(
        4, "LLM_DELIVERY_CONCURRENCY", p.whole(0, 1000), "a whole number from 0 to 1000",
        "`sidecar work`: result deliveries to callback URLs one worker process makes at once; "
        "0: this process delivers none (another one must)",
    )  # fmt: skip
