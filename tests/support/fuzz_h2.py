"""Hand-made HTTP/2 bytes for the hostile-network test (no h2 library needed).

Only what a hostile client sends is built here: the connection preface, frames with any
header (lengths that lie included), and HPACK header blocks made of literal fields without
Huffman coding, which is enough to start real gRPC calls and then misbehave on them.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA = 0x0
HEADERS = 0x1
RST_STREAM = 0x3
SETTINGS = 0x4
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4

CANCEL = 0x8  # RST_STREAM error code


def frame(
    kind: int, flags: int, stream_id: int, payload: bytes = b"", *, length: int | None = None
) -> bytes:
    """One frame; `length` may lie about the payload that follows."""
    declared = len(payload) if length is None else length
    return (
        struct.pack(">I", declared)[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id & 0x7FFFFFFF)
        + payload
    )


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(text: bytes) -> bytes:
    return _hpack_int(len(text), 7, 0) + text  # no Huffman coding


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Literal header fields without indexing, new names (RFC 7541 6.2.2)."""
    return b"".join(b"\x00" + _hpack_string(n) + _hpack_string(v) for n, v in headers)


def grpc_headers(path: str, authority: str) -> bytes:
    return header_block(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", authority.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    )


def grpc_message(payload: bytes, *, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; `length` may promise more than follows."""
    return b"\x00" + struct.pack(">I", len(payload) if length is None else length) + payload
