"""Scraping a real daemon's metrics listener and reading the exposition, for the metrics tests."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
INSTALL_PROMTOOL = (
    "promtool is missing: install Debian's prometheus package (apt-get install prometheus), "
    "or run the suite with `bash tests/run`, which installs it"
)


def promtool() -> str:
    """The promtool binary; the test fails (never skips) when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(INSTALL_PROMTOOL)
    return path


def metrics_url(daemon: Daemon) -> str:
    """The daemon's listener, from the port it logged (it binds port 0 in tests)."""
    event = daemon.events("metrics_listening")[-1]
    return f"http://{event['host']}:{event['port']}/metrics"


def scrape(daemon: Daemon) -> str:
    with urllib.request.urlopen(metrics_url(daemon), timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body: bytes = reply.read()
    return body.decode()


def http_status(url: str, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return err.code


def samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str | Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when none)."""
    found = samples(text) if isinstance(text, str) else text
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


def has(text: str, name: str, **labels: str) -> bool:
    want = set(labels.items())
    return any(n == name and want <= ls for n, ls in samples(text))


def wait_scrape(
    daemon: Daemon, check: Callable[[str], bool], what: str, deadline_s: float = 20.0
) -> str:
    """Scrape until `check` holds for the exposition; fail after deadline_s with the last one."""
    deadline = time.monotonic() + deadline_s
    while True:
        text = scrape(daemon)
        if check(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s}s: {what}\n{text}")
        time.sleep(0.05)  # a bounded pause between two real scrapes, not a wait for an outcome


def exported_names(text: str) -> set[str]:
    """The sample names an exposition can carry, histogram and counter suffixes included."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            names |= {f"{family.name}{s}" for s in ("_bucket", "_sum", "_count")}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        else:
            names.add(family.name)
    return names
