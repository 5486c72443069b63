"""Upload bodies read past h11 (stpd.body) over real TLS on loopback: both
framings, a request pipelined right behind the body on the same connection,
and a body bigger than the receive ring, stored byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import re

import h11
import pytest

from stpd.transfer import BATCH_BYTES
from tests.conftest import Pki, running_stpd
from tests.test_hostile_common import (
    LOOPBACK,
    assert_no_partial,
    hpki,  # noqa: F401  (fixture)
    read_answer,
    tar_bytes,
    tls_connect,
    tls_context,
)


def framed(body: bytes, framing: str) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and wire bytes of ``body``; chunked in uneven chunks."""
    if framing == "length":
        return [("Content-Length", str(len(body)))], body
    wire = bytearray()
    for start in range(0, len(body), 300_001):
        chunk = body[start : start + 300_001]
        wire += f"{len(chunk):x};ext=1\r\n".encode() + chunk + b"\r\n"
    return [("Transfer-Encoding", "chunked")], bytes(wire + b"0\r\nX-Trailer: t\r\n\r\n")


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_upload_then_pipelined_request_on_the_same_connection(hpki: Pki, framing: str) -> None:  # noqa: F811
    client = hpki.client_ini("good")
    # Several buffers full, so that each receive buffer is reused (an
    # upload alone has two that take turns).
    content = os.urandom(3 * BATCH_BYTES + 12345)
    body = tar_bytes({"big.bin": content})
    headers, wire = framed(body, framing)
    head = f"PUT /savesets?source=/framing HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    pipelined = f"GET /status HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode()

    with running_stpd(hpki.layout, 2) as stpd:
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            sock.sendall(head.encode() + wire + pipelined)  # the GET rides behind the body
            conn = h11.Connection(h11.CLIENT)
            answers: list[tuple[int, bytes]] = []
            for target in ("/savesets", "/status"):
                conn.send(h11.Request(method="GET", target=target, headers=[("Host", "x")]))
                conn.send(h11.EndOfMessage())
                status, data = 0, bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(sock.recv(65536))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        data += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        raise AssertionError(f"connection ended early: {event}")
                answers.append((status, bytes(data)))
                conn.start_next_cycle()

        (stored_status, stored), (status_status, status_body) = answers
        assert stored_status == 201, stored
        meta = json.loads(stored)
        assert meta["bytes"] == len(body)
        assert meta["sha256"] == hashlib.sha256(body).hexdigest()
        saved = stpd.daemon.store.tar_path(meta["saveset"]).read_bytes()
        assert saved == body
        assert status_status == 200 and "version" in json.loads(status_body)
        assert_no_partial(stpd.daemon.store.root)


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"1" + b"0" * 16 + b"\r\n", "bad chunk size b'10000000000000000'"),  # 17 hex digits
        (b"5\r\nhelloXX", "chunk data not followed by CRLF"),
    ],
)
def test_bad_chunked_framing_is_answered_400(hpki: Pki, wire: bytes, error: str) -> None:  # noqa: F811
    """Not a closed connection without a word: the client reads why."""
    client = hpki.client_ini("good")
    head = f"PUT /savesets?source=/framing HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n"
    with running_stpd(hpki.layout, 2) as stpd:
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            sock.sendall(head.encode() + wire)
            answer = read_answer(sock, "PUT")
        assert answer is not None and answer.status == 400, answer
        assert answer.headers["connection"] == "close"
        assert answer.json() == {"error": f"bad request: {error}; nothing stored"}
        stpd.log.wait_for(rf"^WARNING upload from .* \(CN=good\) cut off: {re.escape(error)}")
        assert stpd.daemon.store.all() == []
        assert_no_partial(stpd.daemon.store.root)


def test_chunked_upload_in_small_chunks_is_stored(hpki: Pki) -> None:  # noqa: F811
    """More chunks in one receive buffer than one writev takes (IOV_MAX,
    1024 on Linux): http.client's encode_chunked sends its pieces as they
    come, a few hundred bytes each."""
    client = hpki.client_ini("good")
    body = tar_bytes({"small-chunks.bin": os.urandom(600_000)})
    wire = bytearray()
    for start in range(0, len(body), 256):
        chunk = body[start : start + 256]
        wire += f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    head = f"PUT /savesets?source=/small-chunks HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n"
    with running_stpd(hpki.layout, 2) as stpd:
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            sock.sendall(head.encode() + wire + b"0\r\n\r\n")
            answer = read_answer(sock, "PUT")
        assert answer is not None and answer.status == 201, answer
        meta = answer.json()
        assert isinstance(meta, dict)
        assert meta["sha256"] == hashlib.sha256(body).hexdigest()
        assert stpd.daemon.store.tar_path(meta["saveset"]).read_bytes() == body
