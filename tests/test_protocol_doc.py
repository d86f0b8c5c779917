"""protocol.md cannot drift from the codec: every example frame in it is checked here.

Each example is a `C:` (client) or `S:` (daemon) line in a ```text block: the message as JSON-like
text, then its bytes in hex (the 4-byte length prefix, `|`, the MessagePack body). A `C:` line
whose text is hex instead of JSON shows raw bytes that are deliberately not a whole frame.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sidecar.errors import ERRORS_BY_CODE, InvalidMessage
from sidecar.models import QueueStats
from sidecar.protocol import (
    OPS,
    DequeueResult,
    EnqueueResult,
    HealthResult,
    HelloResult,
    Reply,
    RequestInfo,
    decode_request,
)

DOC = Path(__file__).resolve().parent.parent / "protocol.md"
HEX_LINE = re.compile(r"^ {3}[0-9a-f]{2}(?: (?:\| )?[0-9a-f]{2})*$")
BLOCK = re.compile(r"^```text\n(.*?)^```", re.M | re.S)

RESULT_TYPES: dict[str, type[Any]] = {
    "hello": HelloResult,
    "enqueue": EnqueueResult,
    "dequeue": DequeueResult,
    "extend": RequestInfo,
    "complete": RequestInfo,
    "fail": RequestInfo,
    "cancel": RequestInfo,
    "status": RequestInfo,
    "stats": QueueStats,
    "health": HealthResult,
}


@dataclass
class Frame:
    side: str  # "C" or "S"
    line: int  # where the example starts in protocol.md, for failure messages
    text: str  # the JSON-like rendering, or "" for raw bytes
    data: bytes  # prefix + body as written in hex
    request: Frame | None = None  # for an S: frame, the C: frame before it in the same block
    reply: Frame | None = None  # for a C: frame, the S: frame after it in the same block

    @property
    def body(self) -> bytes:
        return self.data[4:]

    def __str__(self) -> str:
        return f"{self.side}@{self.line}"


def _hex(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", " "))


def parse_frames(doc: str) -> list[Frame]:
    """Every C:/S: example in the ```text blocks of doc, in order."""
    frames: list[Frame] = []
    for block in BLOCK.finditer(doc):
        first_line = doc.count("\n", 0, block.start(1)) + 1
        last_c: Frame | None = None
        current: tuple[str, int, list[str], list[str]] | None = None

        def close() -> None:
            nonlocal last_c, current
            if current is None:
                return
            side, line, text, hexes = current
            frame = Frame(side, line, "\n".join(text), _hex(" ".join(hexes)))
            if side == "C":
                last_c = frame
            else:
                frame.request = last_c
                if last_c is not None and last_c.reply is None:
                    last_c.reply = frame
            frames.append(frame)
            current = None

        for offset, raw_line in enumerate(block.group(1).splitlines()):
            if raw_line.startswith(("C: ", "S: ")):
                close()
                side, rest = raw_line[0], raw_line[3:]
                if rest.startswith("{"):
                    current = (side, first_line + offset, [rest], [])
                else:  # raw bytes, then an explanation in parentheses
                    current = (side, first_line + offset, [], [rest.split("(")[0]])
            elif current is not None and HEX_LINE.match(raw_line):
                current[3].append(raw_line.strip())
            elif current is not None and raw_line.startswith("   "):
                current[2].append(raw_line.strip())
            else:
                close()
        close()
    return frames


FRAMES = parse_frames(DOC.read_text(encoding="utf-8"))
WHOLE = [f for f in FRAMES if f.text]
RAW = [f for f in FRAMES if not f.text]


def test_examples_found() -> None:
    assert len([f for f in WHOLE if f.side == "C"]) >= len(OPS)
    assert RAW, "the framing-error examples show raw bytes"


@pytest.mark.parametrize("frame", WHOLE, ids=str)
def test_length_prefix_matches_body(frame: Frame) -> None:
    assert int.from_bytes(frame.data[:4], "big") == len(frame.body)


@pytest.mark.parametrize("frame", WHOLE, ids=str)
def test_text_is_the_same_message_as_the_hex(frame: Frame) -> None:
    value = json.loads(frame.text)
    assert msgspec.msgpack.encode(value) == frame.body


@pytest.mark.parametrize("frame", [f for f in WHOLE if f.side == "C"], ids=str)
def test_client_frame_decodes_as_its_op(frame: Frame) -> None:
    message = json.loads(frame.text)
    reply = frame.reply
    assert reply is not None, "every request example shows its reply"
    if json.loads(reply.text).get("error", {}).get("code") == "invalid_message":
        # An example of a rejected request: the codec must reject it the same way.
        with pytest.raises(InvalidMessage):
            decode_request(frame.body)
        return
    request = decode_request(frame.body)
    assert type(request).__struct_config__.tag == message["op"]
    assert request.id == message["id"]


@pytest.mark.parametrize("frame", [f for f in WHOLE if f.side == "S"], ids=str)
def test_daemon_frame_is_a_reply_of_the_documented_shape(frame: Frame) -> None:
    reply = msgspec.msgpack.decode(frame.body, type=Reply)
    request = frame.request
    if reply.ok:
        assert request is not None, "a success example follows its request"
        op = json.loads(request.text)["op"]
        assert reply.id == json.loads(request.text)["id"]
        msgspec.msgpack.decode(reply.result, type=RESULT_TYPES[op])
    else:
        assert reply.error is not None
        assert reply.error.code in ERRORS_BY_CODE
        assert reply.error.code != "sidecar_unavailable"
        if reply.id is not None and request is not None and request.text:
            assert reply.id == json.loads(request.text)["id"]


@pytest.mark.parametrize("frame", RAW, ids=str)
def test_raw_bytes_are_an_unfinished_frame(frame: Frame) -> None:
    assert frame.side == "C"
    assert int.from_bytes(frame.data[:4], "big") > len(frame.body)


def test_every_op_has_an_example() -> None:
    shown = {json.loads(f.text)["op"] for f in WHOLE if f.side == "C"}
    assert shown == set(OPS)


def test_every_error_code_is_in_the_table() -> None:
    doc = DOC.read_text(encoding="utf-8")
    table = doc[doc.index("## 9. Errors") :]
    for code in ERRORS_BY_CODE:
        assert f"`{code}`" in table, code
