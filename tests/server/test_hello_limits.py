"""hello reports every bound a client must keep (protocol.md 8.1), the protocol's fixed ones too."""

from __future__ import annotations

import msgspec

from sidecar.config import Settings
from sidecar.models import MAX_DELAY_S, MAX_WAIT_S
from sidecar.protocol import Hello, HelloResult, Limits
from sidecar.server.ops import Ops
from tests.conftest import make_local
from tests.support.helpers import FakeClock


async def test_hello_names_the_longest_delay_and_the_hard_cap_of_wait() -> None:
    clock = FakeClock()
    store = make_local(clock)
    await store.start()
    try:
        ops = Ops(Settings(max_wait_s=12.0), store, clock=clock)
        result = await ops.handle(Hello(id=1, protocol=1))
    finally:
        await store.close()
    assert isinstance(result, HelloResult)
    limits = result.limits
    assert limits.max_delay_s == MAX_DELAY_S  # a fail's delay_s above it is refused
    assert limits.max_request_wait_s == MAX_WAIT_S  # a dequeue's wait_s above it is refused
    assert limits.max_wait_s == 12.0  # one above this (and within the cap) is lowered to it


def test_the_new_limits_come_last_and_an_older_hello_still_decodes() -> None:
    fields = Limits.__struct_fields__
    assert fields[-2:] == ("max_delay_s", "max_request_wait_s")
    # A daemon of before these fields: a newer client still reads its hello.
    older = {
        "max_frame_bytes": 1024, "max_payload_bytes": 10, "max_batch": 1, "max_wait_s": 1.0,
        "default_ttl_s": 1.0, "default_lease_s": 1.0, "default_max_attempts": 1,
    }  # fmt: skip
    limits = msgspec.msgpack.decode(msgspec.msgpack.encode(older), type=Limits)
    assert limits.max_delay_s == MAX_DELAY_S and limits.max_request_wait_s == MAX_WAIT_S
