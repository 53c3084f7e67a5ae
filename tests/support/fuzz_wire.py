"""Hostile request bytes for the fuzz tests: random bytes, protobuf-shaped junk (bad wire
types, overlong varints, lengths past the end, invalid UTF-8 in strings), and mutated
encodings of real requests. Every real request here names budgets and reservations that
do not exist, so whatever decodes can only be refused: it must never charge anything.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

from budget_client._proto.budgetd.v1 import budget_pb2 as pb

GHOST_BUDGET = "fz-ghost/none"
GHOST_RESERVATION = "r_" + "0" * 32

TEMPLATES: tuple[bytes, ...] = tuple(
    message.SerializeToString()
    for message in (
        pb.ReserveRequest(
            budget_id=GHOST_BUDGET, amount=100, ttl_ms=5000, idempotency_key="k", labels={"a": "b"}
        ),
        pb.ReserveRequest(budget_id=GHOST_BUDGET, estimate=pb.Usage(input_tokens=5)),
        pb.CommitRequest(reservation_id=GHOST_RESERVATION, usage=pb.Usage(output_tokens=7)),
        pb.ExtendRequest(reservation_id=GHOST_RESERVATION, amount=3, ttl_ms=1000),
        pb.ChargeRequest(budget_id=GHOST_BUDGET, amount=9, idempotency_key="c"),
        pb.MeterRequest(open=pb.MeterOpen(budget_id=GHOST_BUDGET, prompt_tokens_estimate=10)),
        pb.MeterRequest(usage=pb.MeterUsage(usage=pb.Usage(input_tokens=1, output_tokens=2))),
        pb.MeterRequest(finish=pb.MeterFinish(usage=pb.Usage(output_tokens=2))),
    )
)


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes, overrun: int) -> bytes:
    tag = varint((number << 3) | wire_type)
    if wire_type == 0:
        # An overlong varint (more than 10 bytes) when the payload is long enough.
        return tag + bytes(b | 0x80 for b in payload[:-1]) + payload[-1:] if payload else tag
    if wire_type == 2:
        return tag + varint(len(payload) + overrun) + payload
    if wire_type == 1:
        return tag + payload[:8].ljust(8, b"\0")
    if wire_type == 5:
        return tag + payload[:4].ljust(4, b"\0")
    return tag + payload  # groups (3, 4) and the invalid wire types 6 and 7


_FIELDS = st.lists(
    st.tuples(
        st.integers(0, 40),
        st.integers(0, 7),
        st.one_of(
            st.binary(max_size=24),
            st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80"]),  # invalid UTF-8
        ),
        st.sampled_from([0, 0, 1, 5, 1000, -1]),
    ),
    min_size=1,
    max_size=6,
).map(lambda fields: b"".join(_field(n, w, p, max(-len(p), o)) for n, w, p, o in fields))


def _mutate(template: bytes, position: int, byte: int, how: str) -> bytes:
    at = position % (len(template) + 1)
    if how == "flip":
        if at == len(template):
            return template + bytes([byte])
        return template[:at] + bytes([template[at] ^ (byte or 1)]) + template[at + 1 :]
    if how == "truncate":
        return template[: max(1, at)]
    return template[:at] + bytes([byte]) + template[at:]


_MUTATED = st.builds(
    _mutate,
    st.sampled_from(TEMPLATES),
    st.integers(0, 200),
    st.integers(0, 255),
    st.sampled_from(["flip", "truncate", "insert"]),
)

GARBAGE = st.one_of(st.binary(min_size=1, max_size=96), _FIELDS, _MUTATED)
"""Bytes a hostile or broken client may send as a request message."""


def decodes_as(cls: type[Message], data: bytes) -> bool:
    """Whether `data` is a valid encoding of `cls` (the server decodes with the same code)."""
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


def undecodable(cls: type[Message], data: bytes) -> bytes | None:
    """`data` made certain not to decode as `cls` (a trailing invalid tag), or None."""
    for candidate in (data, data + b"\x07", data + b"\x00"):
        if not decodes_as(cls, candidate):
            return candidate
    return None
