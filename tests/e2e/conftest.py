"""The end-to-end scenarios' fixtures, and the `campaign` runs the normal suite skips.

A test marked `campaign` is a full-size run (minutes: the issue's 2,000 requests at 600 rpm);
it runs only when asked for by name in the marker expression: `pytest -m campaign tests/e2e`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.llm.webhooks import generate_secret
from tests.support.daemon import short_tmpdir
from tests.support.fake_receiver import FakeReceiver


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "campaign" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="a full-size campaign: run it with `pytest -m campaign`")
    for test in items:
        if "campaign" in test.keywords:
            test.add_marker(skip)


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short folder for sockets and journals (sun_path is about 100 bytes)."""
    with short_tmpdir() as path:
        yield path


@pytest.fixture
def secret() -> str:
    return generate_secret()


@pytest.fixture
def receiver(secret: str) -> Iterator[FakeReceiver]:
    with FakeReceiver(secret) as r:
        yield r
