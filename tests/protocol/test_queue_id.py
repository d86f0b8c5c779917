"""A queue_id is printable ASCII without spaces, all of it: no final newline slips through."""

from __future__ import annotations

import msgspec
import pytest

from sidecar.errors import InvalidMessage
from sidecar.protocol import Status, decode_request


@pytest.mark.parametrize("queue_id", ["abc\n", "abc\r\n", "a b", "é", ""])
def test_a_queue_id_with_a_control_character_or_space_is_refused(queue_id: str) -> None:
    frame = msgspec.msgpack.encode({"op": "status", "id": 1, "queue_id": queue_id})
    with pytest.raises(InvalidMessage, match=r"queue_id") as caught:
        decode_request(frame)
    assert caught.value.code == "invalid_message"
    assert caught.value.request_id == 1  # type: ignore[attr-defined]


def test_a_printable_queue_id_is_accepted() -> None:
    frame = msgspec.msgpack.encode({"op": "status", "id": 1, "queue_id": "req-1_~!"})
    req = decode_request(frame)
    assert isinstance(req, Status) and req.queue_id == "req-1_~!"
