"""Hostile peers at the network and protocol level, over loopback.

Each case checks what the peer sees, the line stpd logs, that a real
``sbc backup`` still works afterwards, and that nothing partial is stored.
Timeouts are set small for each case, so that waiting for them is quick.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct
import tarfile
import time
from pathlib import Path

import pytest

from pki.layout import Layout
from tests.conftest import Pki, RunningStpd, running_stpd
from tests.test_hostile_common import (
    DEADLINE,
    assert_no_partial,
    assert_serves,
    hpki,  # noqa: F401  (fixture)
    read_answer,
    request,
    run_sbc,
    tcp_connect,
    tls_connect,
    tls_context,
    wait_closed,
)

PEER = r"127\.0\.0\.1:\d+"


def client_hello() -> bytes:
    """The first flight of a real TLS client (a complete ClientHello record)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# -- not TLS at all ------------------------------------------------------------


def test_plain_bytes_to_the_tls_port(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("good")
    with running_stpd(hpki.layout, 2) as stpd:
        with tcp_connect(stpd) as sock:
            sock.sendall(b"\x00\x01\x02 this is not TLS \xff\xfe\r\n\r\n" * 20)
            seen = wait_closed(sock)
        assert b"HTTP" not in seen  # no answer in clear: just the end of the connection
        line = stpd.log.wait_for(rf"TLS handshake with {PEER} failed")
        assert line.startswith("WARNING "), line
        assert re.search(r"wrong version number|packet length too long|record layer", line), line
        assert not stpd.log.matching(r"^ERROR refused client"), "garbage is not a client refusal"
        assert_serves(stpd, client, tmp_path)


def test_plain_http_to_the_tls_port_gets_a_plain_answer(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("good")
    with running_stpd(hpki.layout, 2) as stpd:
        with tcp_connect(stpd) as sock:
            sock.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            seen = wait_closed(sock)
        assert seen.startswith(b"HTTP/1.1 400 "), seen
        assert b"https://" in seen, seen
        line = stpd.log.wait_for(rf"TLS handshake with {PEER} failed")
        assert line.startswith("WARNING ") and "plain HTTP" in line, line
        assert_serves(stpd, client, tmp_path)


# -- handshakes that do not complete ---------------------------------------------


@pytest.mark.parametrize("cut", ["partial", "whole"])
def test_client_hello_that_never_completes(hpki: Pki, tmp_path: Path, cut: str) -> None:  # noqa: F811
    """``partial``: the first bytes of a ClientHello, then silence.
    ``whole``: a complete ClientHello, then no answer to the server's flight."""
    client = hpki.client_ini("good")
    hello = client_hello()
    with running_stpd(hpki.layout, 2, handshake_timeout=0.5) as stpd:
        with tcp_connect(stpd) as sock:
            started = time.monotonic()
            sock.sendall(hello[:20] if cut == "partial" else hello)
            wait_closed(sock, timeout=DEADLINE)
            waited = time.monotonic() - started
        assert 0.4 <= waited < 5, waited
        stpd.log.wait_for(rf"^WARNING TLS handshake with {PEER} timed out after 0\.5s$")
        assert_serves(stpd, client, tmp_path)


def test_a_port_check_is_an_info_line_and_a_cut_handshake_a_warning(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A monitor that connects and closes (nothing sent, or not even a
    whole ClientHello) is no failed handshake; a client that goes away
    after its ClientHello, mid-handshake, is."""
    client = hpki.client_ini("good")
    with running_stpd(hpki.layout, 2) as stpd:
        for first_bytes in (b"", client_hello()[:20]):
            with tcp_connect(stpd) as sock:
                sock.sendall(first_bytes)
            line = stpd.log.wait_for(rf"connection from {PEER} closed without a TLS handshake")
            assert line.startswith("INFO "), line
        with tcp_connect(stpd) as sock:
            sock.sendall(client_hello())
            sock.recv(1)  # the server's flight has begun: the handshake is under way
        line = stpd.log.wait_for(rf"TLS handshake with {PEER} failed")
        assert line.startswith("WARNING ") and "during TLS handshake" in line, line
        assert not stpd.log.matching(r"^(WARNING|ERROR) .*without a TLS handshake")
        assert_serves(stpd, client, tmp_path)


# -- a TLS client that speaks nonsense ---------------------------------------------


def test_handshake_then_garbage(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("good")
    with running_stpd(hpki.layout, 2) as stpd:
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            sock.sendall(b"\x00\xff\x13 garbage garbage\r\n\r\n")
            answer = read_answer(sock)
            assert answer is not None and answer.status == 400, answer
            assert "bad request" in answer.json()["error"]  # type: ignore[index]
            assert answer.headers.get("connection") == "close"
            wait_closed(sock)
        stpd.log.wait_for(rf"^WARNING bad request from {PEER}: .*\(answered 400\)$")
        assert_serves(stpd, client, tmp_path)


@pytest.mark.parametrize("where", ["request-line", "many-headers", "endless-header"])
def test_request_head_over_the_limit(hpki: Pki, tmp_path: Path, where: str) -> None:  # noqa: F811
    client = hpki.client_ini("good")
    limit = 4096
    if where == "request-line":
        head = b"GET /status?" + b"a" * (4 * limit) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    elif where == "many-headers":
        head = b"GET /status HTTP/1.1\r\n" + b"X-Filler: 0123456789abcdef\r\n" * 1000 + b"\r\n"
    else:  # one header line that never ends: must not be buffered without bound
        head = b"GET /status HTTP/1.1\r\nX-Endless: " + b"z" * (8 * 1024 * 1024)
    with running_stpd(hpki.layout, 2, max_header_bytes=limit) as stpd:
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            sock.sendall(head)
            answer = read_answer(sock)
            assert answer is not None and answer.status in (400, 431), answer
            wait_closed(sock)
        line = stpd.log.wait_for(rf"^WARNING bad request from {PEER}: ")
        assert "(answered 431)" in line or "(answered 400)" in line, line
        assert_serves(stpd, client, tmp_path)


def test_headers_trickled_one_byte_at_a_time(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """Each byte arrives well within any per-read timeout, but the whole
    head does not arrive within STPD_HEADER_TIMEOUT: answered 408, closed."""
    client = hpki.client_ini("good")
    head = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 1000 + b"\r\n\r\n"
    with running_stpd(hpki.layout, 2, header_timeout=0.5, idle_timeout=30) as stpd:
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            started = time.monotonic()
            sent, first = 0, b""
            # Pace the bytes by waiting up to 20 ms for an answer each time.
            sock.settimeout(0.02)
            while sent < len(head) and not first:
                sock.sendall(head[sent : sent + 1])
                sent += 1
                try:
                    first = sock.recv(1)
                except TimeoutError:
                    continue
                if not first:
                    break  # closed without an answer
            assert sent < len(head), "the whole trickled head was accepted"
            sock.settimeout(DEADLINE)
            answer = read_answer(sock, prefix=first)
            waited = time.monotonic() - started
            assert answer is None or answer.status == 408, answer
            wait_closed(sock)
        assert 0.4 <= waited < 5, waited
        stpd.log.wait_for(rf"^INFO request header from {PEER} incomplete after 0\.5s")
        assert_serves(stpd, client, tmp_path)


def test_idle_keep_alive_connection_is_closed(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("good")
    with running_stpd(hpki.layout, 2, idle_timeout=0.5) as stpd:
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            answer = request(sock, "GET", "/status")
            assert answer is not None and answer.status == 200
            started = time.monotonic()
            assert wait_closed(sock) == b""  # a clean close (close_notify), no answer
            waited = time.monotonic() - started
        assert 0.4 <= waited < 5, waited
        stpd.log.wait_for(rf"^INFO closing idle connection from {PEER} after 0\.5s")
        # A connection that never sends a request at all goes the same way.
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            assert wait_closed(sock) == b""
        assert len(stpd.log.matching(r"closing idle connection")) == 2
        assert_serves(stpd, client, tmp_path)


# -- a restore that is not read ----------------------------------------------------


def backed_up(stpd: RunningStpd, client: Layout, source: Path) -> str:
    """The saveset of a real ``sbc backup`` of ``source``."""
    code, out, err = run_sbc(
        "--ini-dir", str(client.ini_dir), "backup", str(source), "--server", stpd.address,
        "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    return str(json.loads(out)["saveset"])


def test_client_that_stops_reading_during_restore(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("good")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))  # more than every socket buffer on the way
    with running_stpd(hpki.layout, 2, io_timeout=0.5) as stpd:
        saveset = backed_up(stpd, client, big)
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw.settimeout(DEADLINE)
        raw.connect(("127.0.0.1", stpd.port))
        with tls_context(hpki, client).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(f"GET /savesets/{saveset} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
            # ...and read nothing more: the server's sends stall.
            stpd.log.wait_for(
                rf"^WARNING restore of {saveset} to {PEER} stalled \(client not reading\); closed$"
            )
            received = len(wait_closed(sock))
        assert received < big.stat().st_size
        assert_serves(stpd, client, tmp_path)
        assert_no_partial(stpd.daemon.store.root)


def test_a_restore_the_client_abandons_is_logged_with_its_saveset(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A client that goes away mid-restore (a reset after 64 KiB of 32 MiB)
    was logged as "connection with PEER ended: connection lost: " with no
    reason and no saveset: now as the upload's cut-offs are, and the
    daemon serves on."""
    client = hpki.client_ini("leaver")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(32 << 20))  # more than the socket buffers hold
    with running_stpd(hpki.layout, level=2) as stpd:
        saveset = backed_up(stpd, client, source)
        sock = tls_connect(stpd, tls_context(hpki, client))
        sock.sendall(f"GET /savesets/{saveset} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = 0
        while received < 65536:
            received += len(sock.recv(65536))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, as when the client machine goes down
        line = stpd.log.wait_for(
            rf"^WARNING restore of {saveset} to {PEER} \(CN=leaver\) cut off: connection "
            r"lost: \S"
        )
        assert not line.endswith(": "), line
        assert_serves(stpd, client, tmp_path)


def many_entries(path: Path, count: int) -> None:
    """A saveset tar of ``count`` empty files with long names: a listing of
    tens of megabytes, more than every socket buffer on the way holds."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n in range(count):
            tar.addfile(tarfile.TarInfo(f"{'d' * 150}/{n:08}-{'f' * 80}"))


@pytest.mark.parametrize("answer", ["entries", "pipelined-json"])
def test_a_client_that_stops_reading_an_answer_is_a_warning(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    answer: str,
) -> None:
    """Not "internal error" with a TooSlowError traceback: a listing of
    100,000 entries never read, or JSON answers to requests sent one after
    another without reading any."""
    client = hpki.client_ini("nonreader")
    saveset = "SS-20240101T000000Z-0123abcd"
    with running_stpd(hpki.layout, 2, io_timeout=0.5) as stpd:
        if answer == "entries":
            root = stpd.daemon.store.root
            many_entries(root / f"{saveset}.tar", 100_000)
            size = (root / f"{saveset}.tar").stat().st_size  # (another is refused as damaged)
            meta = dict(saveset=saveset, owner="CN=nonreader", source="/many", bytes=size)
            meta |= dict(sha256="0" * 64, started="", finished="", peer="")
            (root / f"{saveset}.json").write_text(json.dumps(meta))
            sent, target = f"GET /savesets/{saveset}/entries HTTP/1.1\r\nHost: x\r\n\r\n", "GET /s"
        else:
            sent, target = "GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * 20_000, "GET /status"
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw.settimeout(DEADLINE)
        raw.connect(("127.0.0.1", stpd.port))
        with tls_context(hpki, client).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            try:
                sock.sendall(sent.encode())  # while stpd answers, and stops reading in turn
            except OSError:
                pass  # stpd closed the connection first
            stpd.log.wait_for(
                rf"^WARNING client {PEER} stopped reading the answer to {re.escape(target)}\S*; "
                r"closed after 0\.5s \(STPD_IO_TIMEOUT\)$"
            )
            wait_closed(sock)
        assert not stpd.log.matching(r"internal error|TooSlowError")
        assert_serves(stpd, client, tmp_path)
