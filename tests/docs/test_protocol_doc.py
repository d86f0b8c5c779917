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
from sidecar.protocol import OPS, REGISTRY, Reply, StatsResult, decode_request

# Many real servers or daemons, one per test: left out of `tests/run --quick`.
pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "protocol.md"
HEX_LINE = re.compile(r"^ {3}[0-9a-f]{2}(?: (?:\| )?[0-9a-f]{2})*$")
BLOCK = re.compile(r"^```text\n(.*?)^```", re.M | re.S)

RESULT_TYPES: dict[str, type[Any]] = {spec.name: spec.result for spec in REGISTRY}


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


def _shape_mismatches(value: Any, info: msgspec.inspect.Type, where: str) -> list[str]:
    """Where an example's maps have other keys than the reply type's fields (recursively)."""
    if isinstance(info, msgspec.inspect.StructType):
        if not isinstance(value, dict):
            return [f"{where}: expected a map"]
        fields = {f.encode_name: f.type for f in info.fields}
        # A field whose default is UNSET is left out of a reply that has no value for it.
        optional = {
            f.encode_name
            for f in info.fields
            if not f.required and f.default is f.default_factory is msgspec.NODEFAULT
        }
        problems = []
        if not set(fields) - optional <= set(value) <= set(fields):
            missing = sorted(set(fields) - optional - set(value))
            extra = sorted(set(value) - set(fields))
            problems.append(f"{where}: missing {missing}, unknown {extra}")
        for key in set(value) & set(fields):
            problems += _shape_mismatches(value[key], fields[key], f"{where}.{key}")
        return problems
    if isinstance(info, msgspec.inspect.ListType) and isinstance(value, list):
        return [
            p
            for i, v in enumerate(value)
            for p in _shape_mismatches(v, info.item_type, f"{where}[{i}]")
        ]
    if isinstance(info, msgspec.inspect.DictType) and isinstance(value, dict):
        return [
            p
            for k, v in value.items()
            for p in _shape_mismatches(v, info.value_type, f"{where}.{k}")
        ]
    if isinstance(info, msgspec.inspect.UnionType):
        structs = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
        if structs and isinstance(value, dict):
            return _shape_mismatches(value, structs[0], where)
    return []


@pytest.mark.parametrize(
    "frame", [f for f in WHOLE if f.side == "S" and json.loads(f.text)["ok"]], ids=str
)
def test_success_example_has_exactly_the_fields_of_its_reply_type(frame: Frame) -> None:
    """An example cannot go stale: a field added to (or dropped from) a reply type fails here."""
    assert frame.request is not None
    op = json.loads(frame.request.text)["op"]
    result = json.loads(frame.text)["result"]
    assert _shape_mismatches(result, msgspec.inspect.type_info(RESULT_TYPES[op]), op) == []


def test_the_shape_check_sees_a_missing_field() -> None:
    """The check above is not vacuous: the stats example without one field is caught."""
    [stats] = [f for f in WHOLE if f.side == "S" and f.request and '"stats"' in f.request.text]
    result = json.loads(stats.text)["result"]
    del result["retention_cut"]
    info = msgspec.inspect.type_info(StatsResult)
    assert _shape_mismatches(result, info, "stats") == [
        "stats: missing ['retention_cut'], unknown []"
    ]


def test_payload_size_example_is_the_real_encoding() -> None:
    """The worked size in section 1 ("a 1,000-byte `bin` costs N bytes: an H-byte header")."""
    doc = DOC.read_text(encoding="utf-8")
    found = re.search(r"a 1,000-byte `bin`\s+costs ([\d,]+) bytes: a (\d+)-byte", doc)
    assert found is not None
    total, header = int(found.group(1).replace(",", "")), int(found.group(2))
    encoded = msgspec.msgpack.encode(b"x" * 1000)
    assert (total, header) == (len(encoded), len(encoded) - 1000)


def test_the_documented_limits_are_the_code_s() -> None:
    """Section 10 and hello's example carry the protocol's fixed maxima."""
    from sidecar.models import MAX_LEASE_S, MAX_TTL_S
    from sidecar.protocol import MAX_PAYLOAD_DEPTH

    doc = " ".join(DOC.read_text(encoding="utf-8").split())  # line breaks do not matter
    fixed = doc[doc.index("Fixed by the protocol:") :]
    assert f"`ttl_s` at most {int(MAX_TTL_S):,} s" in fixed
    assert f"`lease_s` at most {int(MAX_LEASE_S):,} s" in fixed
    assert f"nested at most {MAX_PAYLOAD_DEPTH} levels" in fixed


def test_hello_s_example_names_every_fixed_limit() -> None:
    """Issue 24: the longest delay_s and the hard cap of wait_s are in hello's table and example."""
    from sidecar.models import MAX_DELAY_S, MAX_WAIT_S

    doc = DOC.read_text(encoding="utf-8")
    hello = _section(doc, "### 8.1 hello", "### 8.2 enqueue")
    assert f"`max_delay_s` (float, {int(MAX_DELAY_S):,}" in hello
    assert f"`max_request_wait_s` (float, {int(MAX_WAIT_S):,}" in hello
    [reply] = [f for f in WHOLE if f.side == "S" and f.request and '"hello"' in f.request.text]
    limits = msgspec.msgpack.decode(reply.body)["result"]["limits"]
    assert (limits["max_delay_s"], limits["max_request_wait_s"]) == (MAX_DELAY_S, MAX_WAIT_S)


def test_an_empty_fail_reason_is_documented_as_recorded() -> None:
    """Item 10: the spec and handlers agree on what an empty `fail` reason records."""
    from sidecar.server.ops import REASON_UNSPECIFIED

    doc = DOC.read_text(encoding="utf-8")
    section = doc[doc.index("### 8.6 fail") : doc.index("### 8.7 cancel")]
    row = next(line for line in section.splitlines() if line.startswith("| `reason` |"))
    assert f'an empty one is recorded as `"{REASON_UNSPECIFIED}"`' in row


def test_every_backend_unavailable_kind_is_documented() -> None:
    """Item 13: the values of details.kind that the code can send are listed in section 9."""
    from sidecar.queue.redis import io as redis_store

    kinds = {kind for _, kind in redis_store._UNAVAILABLE}
    kinds |= set(redis_store._UNAVAILABLE_REPLIES.values())
    kinds |= {"down", "closed"}  # ResilientQueue (Redis known away) and RedisQueue.close
    doc = DOC.read_text(encoding="utf-8")
    listed = doc[doc.index("- `details.kind` of `backend_unavailable`") :]
    listed = listed[: listed.index("\n- ")]
    assert {k for k in kinds if f"`{k}`" not in listed} == set()


def _section(doc: str, start: str, end: str) -> str:
    return doc[doc.index(start) : doc.index(end)]


def test_the_op_list_of_section_4_is_the_registry() -> None:
    doc = DOC.read_text(encoding="utf-8")
    row = next(line for line in doc.splitlines() if line.startswith("| `op` | string |"))
    listed = re.findall(r"`([a-z_]+)`", row.split("one of", 1)[1])
    assert listed == [spec.name for spec in REGISTRY]


def test_the_op_table_of_section_8_is_the_registry() -> None:
    """Names, order, sections, resend-safety and the long-poll field, row by row."""
    doc = DOC.read_text(encoding="utf-8")
    table = _section(doc, "| op | section |", "The result of `extend`")
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in table.splitlines()[2:]
        if line.startswith("| `")
    ]
    expected = [
        [f"`{spec.name}`", f"8.{n}", "yes" if spec.retry_safe else "no",
         f"`{spec.long_poll}`" if spec.long_poll else ""]
        for n, spec in enumerate(REGISTRY, 1)
    ]  # fmt: skip
    assert [[r[0], r[1], r[3], r[4]] for r in rows] == expected
    for number, spec in enumerate(REGISTRY, 1):
        assert f"### 8.{number} {spec.name}\n" in doc


def test_the_resend_rule_of_section_9_names_the_registry_s_safe_ops() -> None:
    doc = " ".join(DOC.read_text(encoding="utf-8").split())
    sentence = doc[doc.index("and resends only") :]
    sentence = sentence[: sentence.index(")")]
    safe = [spec.name for spec in REGISTRY if spec.retry_safe]
    assert re.findall(r"`([a-z_]+)`", sentence) == safe

