"""The daemon's settings: socket, Redis, the local queue, limits, journal, logs."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import parse as p
from sidecar.config.spec import setting
from sidecar.models import MAX_LEASE_S, MAX_RETENTION_S, MAX_TTL_S, MAX_WAIT_S


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """The daemon's rows of the settings table (Settings adds the LLM side's)."""

    socket_path: str = setting(
        "", "SIDECAR_SOCKET", p.text, "a filesystem path",
        "the Unix socket (mode 0660); its folder is created 0700, and the daemon refuses "
        "(exit 2) a folder another user owns or others can write",
        shown="`$XDG_RUNTIME_DIR/sidecar/sidecar.sock`, else `/tmp/sidecar-<uid>/sidecar.sock`",
    )  # fmt: skip
    # A group whose members may connect: the socket folder is then 0750 and setgid to it.
    socket_group: int | None = setting(
        None, "SIDECAR_SOCKET_GROUP", p.group, "a group name or numeric gid",
        "a group whose members may connect: the folder is created 0750, setgid to it",
    )  # fmt: skip
    # Peers allowed by SO_PEERCRED (uid or primary gid); both empty: anyone who can reach the
    # socket file.
    allowed_uids: tuple[int, ...] = setting(
        (), "SIDECAR_ALLOWED_UIDS", p.ids, "comma-separated numeric uids",
        "uids allowed to connect (checked with `SO_PEERCRED`); others get `permission_denied`. "
        "Do not combine with systemd's `PrivateUsers=yes` (peers read as 65534)",
        shown="unset: anyone who can open the socket",
    )  # fmt: skip
    allowed_gids: tuple[int, ...] = setting(
        (), "SIDECAR_ALLOWED_GIDS", p.ids, "comma-separated numeric gids",
        "primary gids allowed to connect, as `SIDECAR_ALLOWED_UIDS` (a peer passes if either "
        "list has it)",
        shown="unset: anyone who can open the socket",
    )  # fmt: skip
    redis_url: str | None = setting(
        None, "REDIS_URL", p.redis_url,
        "a redis://, rediss://, unix:// or redis+sentinel://host:port,.../master[/db] URL",
        "the primary store",
        shown="unset: local store only (journaled)", redact=p.url_without_password,
    )  # fmt: skip
    redis_password_file: str | None = setting(
        None, "REDIS_PASSWORD_FILE", p.text, "a file path",
        "read the Redis password from this file instead of the URL",
    )  # fmt: skip
    # TLS (a rediss:// REDIS_URL): the CA to verify the server with, and a client certificate
    # for a server that asks for one (tls-auth-clients). Read when the client is built.
    redis_tls_ca_file: str | None = setting(
        None, "REDIS_TLS_CA_FILE", p.text, "a file path (PEM CA certificates)",
        "`rediss://`: verify the server's certificate against these CA certificates instead "
        "of the system's",
        shown="unset: the system's CA certificates",
    )  # fmt: skip
    redis_tls_cert_file: str | None = setting(
        None, "REDIS_TLS_CERT_FILE", p.text, "a file path (PEM certificate)",
        "`rediss://`: the client certificate shown to a server that asks for one "
        "(`tls-auth-clients`); set `REDIS_TLS_KEY_FILE` with it",
        shown="unset: no client certificate",
    )  # fmt: skip
    redis_tls_key_file: str | None = setting(
        None, "REDIS_TLS_KEY_FILE", p.text, "a file path (PEM private key, not encrypted)",
        "`rediss://`: the private key of `REDIS_TLS_CERT_FILE`",
        shown="unset: no client certificate",
    )  # fmt: skip
    redis_key_prefix: str = setting(
        "sidecar", "REDIS_KEY_PREFIX", p.key_prefix, "a non-empty name without braces or spaces",
        "prefix of every key (inside a `{hash tag}`)",
    )  # fmt: skip
    # About a second: a frozen Redis must fail over quickly, not hold a caller for a minute.
    redis_connect_timeout_s: float = setting(
        1.0, "REDIS_CONNECT_TIMEOUT_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "fail fast on a Redis that does not accept the connection",
    )  # fmt: skip
    redis_timeout_s: float = setting(
        1.0, "REDIS_TIMEOUT_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "fail fast on a frozen Redis: a call waits this long for its reply, then fails over",
    )  # fmt: skip
    # Sentinel: the sentinels (host:port,...) and the name of the primary they watch. Set
    # both, or write REDIS_URL=redis+sentinel://host:port,host:port/master[/db].
    redis_sentinels: str | None = setting(
        None, "REDIS_SENTINELS", p.sentinels, "host:port[,host:port...]",
        "Sentinel: the sentinels (set `REDIS_SENTINEL_MASTER` too, and no `REDIS_URL`; or "
        "write `REDIS_URL=redis+sentinel://host:port,.../name[/db]`)",
    )  # fmt: skip
    redis_sentinel_master: str | None = setting(
        None, "REDIS_SENTINEL_MASTER", p.text, "the name the sentinels monitor the primary under",
        "Sentinel: the name the sentinels monitor the primary under",
    )  # fmt: skip
    # The sentinels' own password (requirepass in sentinel.conf) is often not the data nodes':
    # a setting of its own, and REDIS_PASSWORD_FILE is never sent to a sentinel (one without a
    # password refuses an AUTH).
    redis_sentinel_password_file: str | None = setting(
        None, "REDIS_SENTINEL_PASSWORD_FILE", p.text, "a file path",
        "Sentinel: read the sentinels' password (`requirepass` in `sentinel.conf`) from this "
        "file; `REDIS_PASSWORD_FILE` stays the data nodes' password",
        shown="unset: the sentinels are asked without a password",
    )  # fmt: skip
    # REDIS_URL names one node of a Redis Cluster; the client finds the others.
    redis_cluster: bool = setting(
        False, "REDIS_CLUSTER", p.boolean, "true or false",
        "`true`: `REDIS_URL` (a `redis://` URL) names one node of a Redis Cluster",
    )  # fmt: skip
    # 0: an enqueue is acknowledged once the primary has it (async replication may lose it in
    # a failover). N: only once N replicas confirm (WAIT); else it is answered locally.
    redis_min_replicas_ack: int = setting(
        0, "REDIS_MIN_REPLICAS_ACK", p.whole(0), "a whole number of replicas >= 0",
        "acknowledge an enqueue from Redis only once this many replicas confirm it (`WAIT`); "
        "else it is answered from the local queue",
    )  # fmt: skip
    # Half the default command timeout: a lagging replica fails the write over quickly.
    redis_replicas_ack_timeout_ms: int = setting(
        500, "REDIS_REPLICAS_ACK_TIMEOUT_MS", p.whole(1), "a whole number of milliseconds >= 1",
        "how long that `WAIT` waits (added to the socket timeout of those calls)",
    )  # fmt: skip
    # The first probe comes soon (most outages are a restart of seconds); each failure doubles
    # the wait up to the maximum, so a long outage costs one small write every 2 s.
    redis_probe_initial_s: float = setting(
        0.1, "REDIS_PROBE_INITIAL_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "during an outage, the first wait before probing Redis again; doubled after each "
        "failed probe",
    )  # fmt: skip
    redis_probe_max_s: float = setting(
        2.0, "REDIS_PROBE_MAX_SECONDS", p.number(0, lo_open=True),
        "a number of seconds > 0, at least REDIS_PROBE_INITIAL_SECONDS",
        "the longest wait between two probes: how late, at worst, the daemon notices that "
        "Redis is back",
    )  # fmt: skip
    # One small write can pass while a Redis at its memory limit refuses the next batch (the
    # store then flapped many times a second): two in a row before Redis serves again.
    redis_probe_successes: int = setting(
        2, "REDIS_PROBE_SUCCESSES", p.whole(1, 100), "a whole number from 1 to 100",
        "successful probe writes in a row before Redis serves again",
    )  # fmt: skip
    # Half a minute: a Redis at its memory limit refuses the next batch within seconds of a
    # recovery; a failure minutes later is a new outage, worth probing quickly again.
    redis_flap_window_s: float = setting(
        30.0, "REDIS_FLAP_WINDOW_SECONDS", p.number(0), "a number of seconds >= 0",
        "failing again this soon after a recovery is a flap: the probe keeps its backoff "
        "instead of starting again from `REDIS_PROBE_INITIAL_SECONDS`",
    )  # fmt: skip
    # A Redis that restarts quickly never fails a call, so only this check notices that it
    # came back empty (and an idle outage, and a changed maxmemory-policy).
    redis_watch_interval_s: float = setting(
        1.0, "REDIS_WATCH_INTERVAL_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "while Redis serves, how often its generation marker and eviction policy are checked "
        "(data loss and a wrong `maxmemory-policy` are noticed this soon)",
    )  # fmt: skip
    # A few hundred requests per script keeps each one short: Redis runs nothing else meanwhile.
    redis_handover_batch: int = setting(
        100, "REDIS_HANDOVER_BATCH", p.whole(1, 100_000), "a whole number from 1 to 100000",
        "requests moved from the local queue to Redis per script call after an outage",
    )  # fmt: skip
    # A second: lapsed leases and expiries are acted on about that soon, for one short script
    # per daemon per second.
    redis_sweep_interval_s: float = setting(
        1.0, "REDIS_SWEEP_INTERVAL_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "how often each daemon sweeps Redis: expires requests, takes back lapsed leases, "
        "forgets records past retention (a dequeue also sweeps before it takes)",
    )  # fmt: skip
    # 500 per step keeps one script run short; a backlog is swept in steps one after another.
    redis_sweep_batch: int = setting(
        500, "REDIS_SWEEP_BATCH", p.whole(1, 100_000), "a whole number from 1 to 100000",
        "most requests one sweep step moves of each kind; a sweep that fills it goes on at once",
    )  # fmt: skip
    # Another host's enqueue does not wake this daemon's long polls: one O(1) look per
    # interval while anyone waits, so a request from elsewhere waits at most this long.
    redis_poll_interval_s: float = setting(
        0.2, "REDIS_POLL_INTERVAL_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "while a dequeue long-polls, how often Redis is checked for requests other daemons "
        "enqueued",
    )  # fmt: skip
    # A minute: an outage shows in the log at once and then once a minute, not per failed call.
    redis_log_repeat_s: float = setting(
        60.0, "REDIS_LOG_REPEAT_SECONDS", p.number(0), "a number of seconds >= 0",
        "at most one `redis_down`, `redis_recovered` or `redis_probe_failed` line per this "
        "interval (the next says how many were skipped; skipped ones go out at debug level)",
    )  # fmt: skip
    # Local queue limits. 1000 items / 100 MB fit a host's spare memory during an outage of
    # tens of minutes at typical LLM request sizes (a few KB each).
    queue_max_size: int = setting(
        1000, "QUEUE_MAX_SIZE", p.whole(1), "a whole number >= 1",
        "local queue: most requests held (queued + processing)",
    )  # fmt: skip
    queue_max_memory_mb: float = setting(
        100.0, "QUEUE_MAX_MEMORY_MB", p.number(0, lo_open=True), "a number of megabytes > 0",
        "local queue: most heap memory held by queued and processing requests (finished "
        "records are bounded apart, by `QUEUE_MAX_RETAINED`)",
    )  # fmt: skip
    # Each outbox queue's local limits (`deliveries`, `pickups`: results waiting for their
    # caller). Results are a few KB each, like requests; 10000 rides out a receiver's outage
    # of hours at a few requests a second without taking much of a host's memory.
    outbox_max_size: int = setting(
        10_000, "OUTBOX_MAX_SIZE", p.whole(1), "a whole number >= 1",
        "local store of each outbox queue (`deliveries`, `pickups`): most results held",
    )  # fmt: skip
    outbox_max_memory_mb: float = setting(
        64.0, "OUTBOX_MAX_MEMORY_MB", p.number(0, lo_open=True), "a number of megabytes > 0",
        "local store of each outbox queue: most heap memory held by its results (the "
        "watermarks apply as to the request queue)",
    )  # fmt: skip
    # The breaker opens at the high watermark and closes at the low one; the gap stops it
    # flapping on every enqueue/dequeue pair near the limit.
    queue_high_watermark: float = setting(
        0.8, "QUEUE_HIGH_WATERMARK", p.number(0, 1, lo_open=True), "a fraction in (0, 1]",
        "local queue: refuse new requests from this share of either limit",
    )  # fmt: skip
    queue_low_watermark: float = setting(
        0.6, "QUEUE_LOW_WATERMARK", p.number(0, 1),
        "a fraction in [0, 1) below QUEUE_HIGH_WATERMARK",
        "... until usage falls back to this share",
    )  # fmt: skip
    # The limiter while Redis is down (or not configured) paces each scope in memory at this
    # share of every limit, so the hosts sharing a provider account stay within it together.
    limiter_local_share: float = setting(
        1.0, "LIMITER_LOCAL_SHARE", p.number(0, 1, lo_open=True), "a fraction in (0, 1]",
        "the limiter without Redis: this host's share of each provider limit (set it to 1 / "
        "the number of hosts sharing the provider account); with Redis the limits are shared",
    )  # fmt: skip
    # The duration maxima are the protocol's (sidecar.models): every store can represent them.
    queue_request_ttl_hours: float = setting(
        4.0, "QUEUE_REQUEST_TTL_HOURS", p.number(0, MAX_TTL_S / 3600, lo_open=True),
        f"a number of hours > 0 and <= {MAX_TTL_S / 3600:g}",
        "default time to live of a request",
    )  # fmt: skip
    # A lease long enough for one slow LLM call; the worker helper extends it while it runs.
    queue_lease_s: float = setting(
        60.0, "QUEUE_LEASE_SECONDS", p.number(0, MAX_LEASE_S, lo_open=True),
        f"a number of seconds > 0 and <= {MAX_LEASE_S:g}",
        "default lease of a dequeued request",
    )  # fmt: skip
    # Three deliveries ride out a worker crash or a transient provider error without looping.
    queue_max_attempts: int = setting(
        3, "QUEUE_MAX_ATTEMPTS", p.whole(1), "a whole number >= 1",
        "deliveries before a request fails for good",
    )  # fmt: skip
    # Terminal statuses stay readable for a day: long enough for a service to poll an outcome.
    queue_retention_hours: float = setting(
        24.0, "QUEUE_RETENTION_HOURS", p.number(0, MAX_RETENTION_S / 3600),
        f"a number of hours >= 0 and <= {MAX_RETENTION_S / 3600:g}",
        "how long a completed, failed or expired status stays readable",
    )  # fmt: skip
    # The local queue's cap on finished records kept for status reads (~330 B each): 100k is
    # about 33 MB, a day of retention at about one request a second.
    queue_max_retained: int = setting(
        100_000, "QUEUE_MAX_RETAINED", p.whole(0), "a whole number >= 0",
        "local queue: most finished records kept for status reads; past it the oldest go "
        "early, counted in `stats` as `retention_cut`. These records (about 440 bytes each: "
        "44 MB per 100k) are bounded by this count only, **not** counted in "
        "`QUEUE_MAX_MEMORY_MB`",
    )  # fmt: skip
    # A dead letter (failed for good, or expired unprocessed) waits for an operator to fix its
    # cause and requeue it: a week covers a long weekend's outage (Sidekiq keeps six months).
    queue_dead_retention_hours: float = setting(
        168.0, "QUEUE_DEAD_RETENTION_HOURS", p.number(0, MAX_RETENTION_S / 3600),
        f"a number of hours >= 0 and <= {MAX_RETENTION_S / 3600:g}",
        "how long a dead letter (failed for good, or expired before it was processed) stays, "
        "with its payload, for `sidecar list` and `sidecar requeue`",
    )  # fmt: skip
    # Dead letters keep their payloads, so a count bounds them (Sidekiq's dead set: 10,000).
    queue_max_dead: int = setting(
        10_000, "QUEUE_MAX_DEAD", p.whole(0), "a whole number >= 0",
        "most dead letters kept per store; past it the oldest go, counted "
        "(`sidecar_dead_letters_dropped_total`) and logged; 0 keeps none (metadata only, for "
        "`QUEUE_RETENTION_HOURS`)",
    )  # fmt: skip
    # A count alone lets 10,000 one-megabyte prompts hold 10 GB: a byte cap bounds their heap
    # (local) and memory (Redis). 64 MB keeps an outage's worth of typical 2-6 KB prompts.
    queue_max_dead_mb: float = setting(
        64.0, "QUEUE_MAX_DEAD_MB", p.number(0), "a number of megabytes >= 0",
        "most payload memory dead letters hold per store; past it the oldest go, counted and "
        "logged as past `QUEUE_MAX_DEAD`; 0 keeps none. Apart from `QUEUE_MAX_MEMORY_MB` and "
        "the journal's `SIDECAR_JOURNAL_MAX_MB`: dead letters never make a store refuse a "
        "request",
    )  # fmt: skip
    # Operators' ops may show payloads (prompts may hold personal data): off refuses them.
    ops_payloads: bool = setting(
        True, "SIDECAR_OPS_PAYLOADS", p.boolean, "true or false",
        "whether `list` and `status` may return a request's payload when asked; false "
        "answers such a request `forbidden`",
    )  # fmt: skip
    queue_retry_after_s: float = setting(
        5.0, "QUEUE_RETRY_AFTER_SECONDS", p.number(0), "a number of seconds >= 0",
        "the retry hint in `queue_full` replies",
    )  # fmt: skip
    # 8 MiB frames carry a batch of large prompts; 1 MiB per payload is far above a normal request.
    max_frame_bytes: int = setting(
        8 * 1024 * 1024, "SIDECAR_MAX_FRAME_BYTES", p.whole(1024),
        "a whole number of bytes >= 1024",
        "largest frame accepted",
    )  # fmt: skip
    max_payload_bytes: int = setting(
        1024 * 1024, "SIDECAR_MAX_PAYLOAD_BYTES", p.whole(1), "a whole number of bytes >= 1",
        "largest request payload",
    )  # fmt: skip
    max_batch: int = setting(
        1000, "SIDECAR_MAX_BATCH", p.whole(1), "a whole number >= 1",
        "most items in one enqueue or dequeue",
    )  # fmt: skip
    max_connections: int = setting(
        1024, "SIDECAR_MAX_CONNECTIONS", p.whole(1), "a whole number >= 1",
        "concurrent client connections",
    )  # fmt: skip
    # The longest a dequeue may wait for work before answering with nothing.
    max_wait_s: float = setting(
        30.0, "SIDECAR_MAX_WAIT_SECONDS", p.number(0, MAX_WAIT_S),
        f"a number of seconds >= 0 and <= {MAX_WAIT_S:g}",
        "longest long-poll of a dequeue",
    )  # fmt: skip
    # How long shutdown waits for in-flight requests before closing connections.
    drain_timeout_s: float = setting(
        5.0, "SIDECAR_DRAIN_TIMEOUT_SECONDS", p.number(0), "a number of seconds >= 0",
        "on SIGTERM, one deadline for in-flight requests to finish and the local backlog to "
        "move to Redis",
    )  # fmt: skip
    # A started frame must finish this soon, and replies may stay unread this long: a local
    # client moves a whole 8 MiB frame in milliseconds, so 10 s only cuts off a stalled one.
    frame_timeout_s: float = setting(
        10.0, "SIDECAR_FRAME_TIMEOUT_SECONDS", p.number(0, lo_open=True), "a number of seconds > 0",
        "a frame that has started must arrive whole this soon, else `bad_frame` and the "
        "connection closes; a client that leaves its replies unread this long is disconnected too",
    )  # fmt: skip
    # Close connections idle this long; 0 keeps them (a service's shared client idles for
    # hours between bursts, and reconnecting is its only cost).
    idle_timeout_s: float = setting(
        0.0, "SIDECAR_IDLE_TIMEOUT_SECONDS", p.number(0), "a number of seconds >= 0 (0: never)",
        "close connections with no traffic for this long (a waiting dequeue is not idle)",
        shown="`0` (never)",
    )  # fmt: skip
    # Bytes of partial frames and unanswered requests held across all connections: 64 MB is
    # eight maximal frames, far above what well-behaved clients hold at once.
    max_buffered_mb: float = setting(
        64.0, "SIDECAR_MAX_BUFFERED_MB", p.number(0, lo_open=True), "a number of megabytes > 0",
        "bytes of partial frames and unanswered requests held across all connections; past it "
        "the daemon stops reading (backpressure) until it drains. Each connection also pauses "
        "at `SIDECAR_MAX_FRAME_BYTES` of unanswered requests",
    )  # fmt: skip
    # The HTTP listener for Prometheus (GET /metrics): off unless set; a bare port or :port
    # binds loopback only, since the numbers describe this host's traffic.
    metrics_addr: tuple[str, int] | None = setting(
        None, "SIDECAR_METRICS_ADDR", p.listen_addr,
        "host:port, :port or a port (0-65535; loopback by default)",
        "serve Prometheus metrics over HTTP (`GET /metrics`) on this address",
        shown="unset: no HTTP listener",
    )  # fmt: skip
    # The local store's journal. systemd's StateDirectory=sidecar sets /var/lib/sidecar.
    state_dir: str = setting(
        "", "SIDECAR_STATE_DIR", p.text, "a folder path",
        "the local store's journal (created 0700); one daemon per folder",
        shown="`$XDG_STATE_HOME/sidecar`, else `~/.local/state/sidecar` (the unit sets "
        "`/var/lib/sidecar`)",
    )  # fmt: skip
    # always: an enqueue is acknowledged once its record is synced (one fsync per loop pass);
    # off: written but not synced, so kept on a crash of the daemon, lost on one of the machine.
    journal_fsync: str = setting(
        "always", "SIDECAR_JOURNAL_FSYNC", p.choice("always", "off"), "always or off",
        "`always`: a reply waits for its record's fsync (one per loop pass); `off`: written, "
        "not synced, so kept on a crash of the daemon and lost on a crash of the machine",
    )  # fmt: skip
    # Snapshot plus segments; about ten times the default memory limit, so the journal only
    # refuses work when the disk is much smaller than the queue it has to hold.
    journal_max_mb: float = setting(
        1024.0, "SIDECAR_JOURNAL_MAX_MB", p.number(1), "a number of megabytes >= 1",
        "most disk the journal (snapshot + segments) may take; beyond it `enqueue` answers "
        "`queue_full` (`max_journal`)",
    )  # fmt: skip
    # A snapshot writes the whole queue: 64 MB of segments between two keeps replay short
    # without rewriting a large queue often.
    journal_compact_mb: float = setting(
        64.0, "SIDECAR_JOURNAL_COMPACT_MB", p.number(0, lo_open=True), "a number of megabytes > 0",
        "the segments written since the last snapshot that trigger a new one (replay time "
        "grows with it); at most a quarter of `SIDECAR_JOURNAL_MAX_MB` is used",
    )  # fmt: skip
    # One snapshot attempt a second while the disk is full: a freed disk is noticed quickly,
    # and a still-full one is not hammered by every refused enqueue.
    journal_recover_interval_s: float = setting(
        1.0, "SIDECAR_JOURNAL_RECOVER_INTERVAL_SECONDS", p.number(0), "a number of seconds >= 0",
        "while the journal cannot write, an enqueue retries it (with a snapshot) at most this "
        "often; the refused ones answer `storage_unavailable`",
    )  # fmt: skip
    log_level: str = setting(
        "info", "SIDECAR_LOG_LEVEL", p.choice("debug", "info", "warning", "error"),
        "debug, info, warning or error",
        "the least severe log lines written",
    )  # fmt: skip
    environment: str = setting(
        "development", "ENVIRONMENT", p.choice("development", "production"),
        "development or production",
        "`production` logs JSON lines; `development` readable lines",
    )  # fmt: skip
