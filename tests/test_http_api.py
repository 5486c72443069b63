"""The HTTP API as README.md documents it, seen by a client over TLS."""

from __future__ import annotations

import re
import ssl

import h11
import pytest

from stpd.protocol import with_reason
from tests.conftest import LOOPBACK, Pki, running_stpd
from tests.test_hostile_common import request, small_tar, tls_connect, tls_context


def stored_on(sock: ssl.SSLSocket, source: str) -> str:
    """A small tar stored on the connection ``sock``: its saveset id."""
    answer = request(sock, "PUT", f"/savesets?source={source}", small_tar())
    assert answer is not None and answer.status == 201, answer
    return str(answer.json()["saveset"])  # type: ignore[index]


def test_every_route_answers_400_to_an_unknown_query_parameter(pki: Pki) -> None:
    client = pki.client_ini("query")
    with running_stpd(pki.layout) as stpd:
        with tls_connect(stpd, tls_context(pki, client)) as sock:
            saveset = stored_on(sock, "/q")
        for target in (
            "/status?foo=1",
            "/savesets?foo=1",
            "/savesets?source=/x",
            f"/savesets/{saveset}/meta?x=1",
            f"/savesets/{saveset}/entries?x=1",
            f"/savesets/{saveset}/verify?x=1",
        ):
            with tls_connect(stpd, tls_context(pki, client)) as sock:
                answer = request(sock, "GET", target)
            assert answer is not None and answer.status == 400, (target, answer)
            name = target.rsplit("?", 1)[1].split("=")[0]
            assert answer.json() == {"error": f"unknown query parameter {name!r}"}, target


def test_head_is_answered_with_the_status_and_headers_of_get(pki: Pki) -> None:
    """Monitoring probes ask HEAD (curl -I). Each HEAD is followed by a GET
    on the same connection, whose answer reads right only if no body
    followed the HEAD's head."""
    client = pki.client_ini("head")
    with running_stpd(pki.layout) as stpd:
        with tls_connect(stpd, tls_context(pki, client)) as sock:
            saveset = stored_on(sock, "/h")
            for target in (
                "/status",
                "/savesets",
                f"/savesets/{saveset}",
                f"/savesets/{saveset}?entry=hello.txt",
                f"/savesets/{saveset}/meta",
                f"/savesets/{saveset}/entries",
                f"/savesets/{saveset}/verify",
            ):
                head = request(sock, "HEAD", target)
                get = request(sock, "GET", target)
                assert head is not None and get is not None, target
                assert (head.status, head.body) == (200, b""), target
                assert get.status == 200 and get.body, target
                if target == "/status":  # its uptime may have grown a digit
                    del head.headers["content-length"], get.headers["content-length"]
                assert head.headers == get.headers, target
            head = request(sock, "HEAD", "/nope")
        assert head is not None and head.status == 404 and head.body == b"", head
        assert head.headers["connection"] == "close"
        assert head.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("DELETE", "/status", "GET, HEAD"),
        ("PUT", "/savesets", None),  # not refused: its missing source is
        ("DELETE", "/savesets", "GET, HEAD, PUT, POST"),
        ("POST", "/savesets/SS-20250101T120000Z-1a2b3c4d/meta", "GET, HEAD"),
    ],
)
def test_a_405_says_which_methods_are_allowed(
    pki: Pki, method: str, target: str, allow: str | None
) -> None:
    client = pki.client_ini("allow")
    with running_stpd(pki.layout) as stpd, tls_connect(stpd, tls_context(pki, client)) as sock:
        answer = request(sock, method, target)
    assert answer is not None, target
    assert (answer.status == 405) == (allow is not None), answer
    assert answer.headers.get("allow") == allow


def test_a_plus_in_source_is_stored_as_a_plus(pki: Pki) -> None:
    """README: source is percent-encoded UTF-8, so "+" is a plus (as curl
    sends it in -T FILE "...?source=/a+b"), not a form's space."""
    client = pki.client_ini("plus")
    with running_stpd(pki.layout) as stpd, tls_connect(stpd, tls_context(pki, client)) as sock:
        answer = request(sock, "PUT", "/savesets?source=/a+b%2Bc%20d", small_tar())
    assert answer is not None and answer.status == 201, answer
    assert answer.json()["source"] == "/a+b+c d"  # type: ignore[index]
    assert [meta.source for meta in stpd.daemon.store.all()] == ["/a+b+c d"]


def test_paths_are_percent_decoded_segment_by_segment(pki: Pki) -> None:
    """/%73tatus was 404 while a saveset id was decoded, and //status was
    404 "no such resource ''" (urlsplit took "status" for a host)."""
    client = pki.client_ini("paths")
    with running_stpd(pki.layout) as stpd, tls_connect(stpd, tls_context(pki, client)) as sock:
        for target in ("/%73tatus", "//status", "/status/"):
            answer = request(sock, "GET", target)
            assert answer is not None and answer.status == 200, (target, answer)
            assert "version" in answer.json(), target  # type: ignore[operator]


def status_lines(sock: ssl.SSLSocket, count: int) -> list[bytes]:
    """The first ``count`` status lines that arrive (an interim 100 counts)."""
    got, lines = b"", []
    while len(lines) < count:
        data = sock.recv(65536)
        assert data, f"connection closed; got {got!r}"
        got += data
        lines = re.findall(rb"^(HTTP/1\.1 [^\r\n]*)\r\n", got, re.MULTILINE)
    return lines[:count]


def test_every_answer_has_its_standard_reason_phrase(pki: Pki) -> None:
    """h11 sends no reason phrase unless told: "HTTP/1.1 201 " in curl -v."""
    client = pki.client_ini("reason")
    tar = small_tar()
    upload = (
        f"PUT /savesets?source=/r HTTP/1.1\r\nHost: {LOOPBACK}\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(tar)}\r\n\r\n"
    ).encode()
    with running_stpd(pki.layout) as stpd:
        with tls_connect(stpd, tls_context(pki, client)) as sock:
            sock.sendall(upload)
            assert status_lines(sock, 1) == [b"HTTP/1.1 100 Continue"]
            sock.sendall(tar)
            assert status_lines(sock, 1) == [b"HTTP/1.1 201 Created"]
        for method, target, line in (
            ("GET", "/status", b"HTTP/1.1 200 OK"),
            ("GET", "/status?x=1", b"HTTP/1.1 400 Bad Request"),
            ("GET", "/nope", b"HTTP/1.1 404 Not Found"),
            ("DELETE", "/status", b"HTTP/1.1 405 Method Not Allowed"),
        ):
            with tls_connect(stpd, tls_context(pki, client)) as sock:
                sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
                assert status_lines(sock, 1) == [line], target


@pytest.mark.parametrize(
    ("event", "line"),
    [
        (h11.Response(status_code=200, headers=[]), b"HTTP/1.1 200 OK\r\n"),
        (h11.Response(status_code=507, headers=[]), b"HTTP/1.1 507 Insufficient Storage\r\n"),
        (h11.InformationalResponse(status_code=100, headers=[]), b"HTTP/1.1 100 Continue\r\n"),
        (h11.Response(status_code=200, headers=[], reason=b"Fine"), b"HTTP/1.1 200 Fine\r\n"),
        (h11.Response(status_code=599, headers=[]), b"HTTP/1.1 599 \r\n"),  # no standard one
    ],
)
def test_with_reason(event: h11.Event, line: bytes) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    sent = conn.send(with_reason(event))
    assert sent is not None and sent.startswith(line), sent


def test_with_reason_leaves_other_events_alone() -> None:
    data = h11.Data(data=b"x")
    assert with_reason(data) is data
