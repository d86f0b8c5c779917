"""The web dashboard's settings (`sidecar web`, sidecar.web); the daemon never reads them."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.config import parse as p
from sidecar.config.spec import setting

# A token shorter than this is refused: guessing 16 random characters over HTTP is hopeless,
# which lets the login form go without a rate limit.
WEB_TOKEN_MIN_CHARS = 16


class SecretText(str):
    """A secret string whose repr never shows it (Settings may be printed or logged)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<secret, redacted>"


def parse_token(raw: str) -> SecretText:
    """A token of at least WEB_TOKEN_MIN_CHARS printable characters, without spaces."""
    if len(raw) < WEB_TOKEN_MIN_CHARS or not raw.isprintable() or any(c.isspace() for c in raw):
        raise ValueError("a token of at least 16 printable characters, without spaces")
    return SecretText(raw)


@dataclass(frozen=True, kw_only=True)
class WebSettings:
    """The web dashboard's rows of the settings table."""

    # Loopback by default: the dashboard is for the host's operators; beyond it, only with a token.
    web_host: str = setting(
        "127.0.0.1", "SIDECAR_WEB_HOST", p.text, "an IP address or host name",
        "`sidecar web`: the address the dashboard listens on; beyond loopback only with "
        "`SIDECAR_WEB_TOKEN` set (refused otherwise, exit 2)",
    )  # fmt: skip
    # Unset: the bind address (when it names one host) and the loopback names and addresses.
    # Every other Host header is refused, so a page of another site whose name resolves to
    # this host (DNS rebinding) cannot read the dashboard through the browser.
    web_allowed_hosts: tuple[str, ...] = setting(
        (), "SIDECAR_WEB_ALLOWED_HOSTS", p.host_list,
        "host names, IP addresses or CIDRs, separated by commas or spaces",
        "`sidecar web`: the names the dashboard answers to in the `Host` header, besides "
        "loopback names and addresses (refused otherwise, 400); set it to the names operators "
        "type when `SIDECAR_WEB_HOST` is beyond loopback",
        shown="unset: the bind address and localhost",
    )  # fmt: skip
    web_port: int = setting(
        8089, "SIDECAR_WEB_PORT", p.whole(0, 65535), "a whole number from 0 to 65535",
        "`sidecar web`: the TCP port of the dashboard (0: any free port, logged at start)",
    )  # fmt: skip
    # Unset: the dashboard only shows; the actions (requeue, cancel, purge) answer 403.
    web_token: str | None = setting(  # a SecretText: its repr hides it
        None, "SIDECAR_WEB_TOKEN", parse_token,
        f"a token of at least {WEB_TOKEN_MIN_CHARS} printable characters, without spaces",
        "`sidecar web`: the token operators log in with to requeue, cancel and purge "
        "(or send as `Authorization: Bearer`); never shown in a page or a log",
        shown="unset: read-only dashboard", secret=True,
    )  # fmt: skip
    # Off by default: payloads are prompts, which may hold personal data.
    web_show_payloads: bool = setting(
        False, "SIDECAR_WEB_SHOW_PAYLOADS", p.boolean, "true or false",
        "`sidecar web`: show a request's payload on its page, to logged-in operators only: "
        "needs `SIDECAR_WEB_TOKEN` (refused at start without it, exit 2); the daemon must "
        "allow it too (`SIDECAR_OPS_PAYLOADS`)",
    )  # fmt: skip
    # Five seconds: six minutes of rates in 72 samples, one cheap stats call each.
    web_sample_s: float = setting(
        5.0, "SIDECAR_WEB_SAMPLE_SECONDS", p.number(0.1, 3600),
        "a number of seconds from 0.1 to 3600",
        "`sidecar web`: how often the dashboard samples the daemon's stats for its rates (it "
        "keeps the last 72 samples)",
    )  # fmt: skip
