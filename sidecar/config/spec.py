"""One row of the settings table: a setting's variable, parser, accepted values and doc."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting; the message names the variable, the value and what is accepted."""


@dataclass(frozen=True)
class Spec:
    """How one setting is read and shown: its variable, parser, accepted values and doc."""

    env: str
    parse: Callable[[str], Any]
    accepted: str
    doc: str
    # The default as docs/configuration.md and --help show it, when the value alone would
    # mislead (a default computed at start, or an empty string meaning "chosen elsewhere").
    shown: str | None = None
    # A secret's value never appears in an error or a log line, even when it is invalid.
    secret: bool = False
    # How an invalid value is shown when it may hold a secret in part (a URL's password).
    redact: Callable[[str], str] | None = None


def setting(
    default: T,
    env: str,
    parse: Callable[[str], T],
    accepted: str,
    doc: str,
    *,
    shown: str | None = None,
    secret: bool = False,
    redact: Callable[[str], str] | None = None,
) -> T:
    """A Settings field carrying its row of the settings table (see SPECS)."""
    spec = Spec(env, parse, accepted, doc, shown, secret, redact)
    return field(default=default, metadata={"setting": spec})


def shown_value(spec: Spec, raw: str) -> str:
    """How a value of this setting appears in an error: whole, redacted, or not at all."""
    if spec.secret:
        return "(the value is secret)"
    if spec.redact is not None:
        try:
            return repr(spec.redact(raw))
        except ValueError:  # too malformed to redact: show none of it
            return "(the value is hidden: it may hold a password)"
    return repr(raw)
