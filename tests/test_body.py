"""stpd.body: the upload-body decoders, checked against h11 as the oracle."""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stpd.body import MAX_LINE, ChunkedBody, LengthBody

HEAD = b"PUT /savesets HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def h11_payload(body: bytes) -> bytes:
    """What h11 makes of a chunked body (raises what h11 raises)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD + body)
    out = bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(out)
        elif event is h11.NEED_DATA:
            raise h11.RemoteProtocolError("h11 wants more data")


def feed_in_pieces(
    decoder: ChunkedBody | LengthBody, data: bytes, cuts: list[int]
) -> tuple[bytes, int]:
    """Feed ``data`` split at ``cuts``; returns the payload and the bytes consumed."""
    out = bytearray()
    consumed = 0
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, stop in itertools.pairwise(bounds):
        if decoder.done:
            break
        payload, used = decoder.feed(memoryview(data)[start:stop])
        for piece in payload:
            out += piece
        consumed += used
    return bytes(out), consumed


chunks = st.lists(st.binary(min_size=1, max_size=300), max_size=8)
extensions = st.sampled_from([b"", b";name=value", b';a="quoted"', b";x", b";long=" + b"v" * 200])
trailers = st.lists(st.sampled_from([b"X-Checksum: abc", b"Expires: never"]), max_size=2)


def encode(parts: list[bytes], ext: bytes, trailer: list[bytes], upper: bool) -> bytes:
    out = bytearray()
    for part in parts:
        size = f"{len(part):X}" if upper else f"{len(part):x}"
        out += size.encode() + ext + b"\r\n" + part + b"\r\n"
    out += b"0" + ext + b"\r\n"
    for line in trailer:
        out += line + b"\r\n"
    return bytes(out + b"\r\n")


@settings(max_examples=200, deadline=None)
@given(chunks, extensions, trailers, st.booleans(), st.lists(st.integers(0, 10_000), max_size=12))
def test_chunked_agrees_with_h11_however_it_is_split(
    parts: list[bytes], ext: bytes, trailer: list[bytes], upper: bool, cuts: list[int]
) -> None:
    body = encode(parts, ext, trailer, upper)
    pipelined = b"GET /status HTTP/1.1\r\n"
    decoder = ChunkedBody()
    payload, consumed = feed_in_pieces(decoder, body + pipelined, cuts)
    assert decoder.done
    assert payload == h11_payload(body) == b"".join(parts)
    assert consumed == len(body)  # the next request is left alone


def test_payload_slices_are_views_of_the_received_buffer() -> None:
    received = bytearray(b"5\r\nhello\r\n0\r\n\r\n")
    payload, _ = ChunkedBody().feed(memoryview(received))
    assert len(payload) == 1 and payload[0].obj is received  # no copy


def test_body_not_finished_is_not_done() -> None:
    decoder = ChunkedBody()
    payload, consumed = decoder.feed(memoryview(b"10\r\nonly part"))
    assert not decoder.done and bytes(payload[0]) == b"only part" and consumed == 13


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nab\r\n0\r\n\r\n",  # not hex
        b"\r\n",  # no size at all
        b"2\r\nabXY0\r\n\r\n",  # data not followed by CRLF
        b"2\nab\r\n0\r\n\r\n",  # bare LF
        b"1" * (MAX_LINE + 10) + b"\r\n",  # endless size line
        b"11111111111111111\r\n",  # size beyond 16 hex digits
    ],
)
def test_malformed_framing_is_refused_like_h11_does(body: bytes) -> None:
    with pytest.raises(h11.RemoteProtocolError):
        h11_payload(body + b"0\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        feed_in_pieces(ChunkedBody(), body, [3, 7])


def test_length_body_stops_at_its_length() -> None:
    decoder = LengthBody(5)
    payload, consumed = feed_in_pieces(decoder, b"helloGET /", [2])
    assert decoder.done and payload == b"hello" and consumed == 5
    assert LengthBody(0).done
