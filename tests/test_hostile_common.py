"""Helpers shared by the hostile-input tests (tests/test_hostile_*.py).

Hostile peers are written with raw sockets and the stdlib ``ssl`` module, so
that they can do what our own client never does (stop half-way, send
garbage, close without close_notify). Every wait has a deadline: a socket
timeout or a log line awaited on a condition, never a sleep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest

from pki.layout import Layout
from tests.conftest import (
    LOOPBACK,
    Pki,
    RunningStpd,
    assert_no_partial,
    make_pki,
    run_sbc,
    tar_bytes,
)

DEADLINE = 10.0  # upper bound for any expected event on a socket


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE}s"
        time.sleep(0.01)  # polling a condition with a deadline, not a synchronising sleep


@pytest.fixture
def hpki(tmp_path: Path) -> Pki:
    """A PKI whose server runs WITHOUT ca/rootCA.key (SPEC: keep it off the
    server): the CA object keeps its key in memory to issue client
    certificates, but the file is gone before any daemon starts."""
    made = make_pki(tmp_path)
    made.layout.ca_key.unlink()
    return made


def tls_context(pki: Pki, client: Layout | None = None) -> ssl.SSLContext:
    """A stdlib client context that verifies stpd against our root CA and,
    when ``client`` has one, presents its x.509/client.pem."""
    ctx = ssl.create_default_context(cafile=str(pki.layout.ca_cert))
    if client is not None and client.client_cert.exists():
        ctx.load_cert_chain(str(client.client_cert), str(client.client_key))
    return ctx


def tcp_connect(
    stpd: RunningStpd, timeout: float = DEADLINE, source: str = LOOPBACK
) -> socket.socket:
    """A TCP connection to ``stpd`` from the loopback address ``source``
    (127.x.y.z: all of them are this machine's), as from another host."""
    return socket.create_connection((LOOPBACK, stpd.port), timeout, source_address=(source, 0))


def tls_connect(
    stpd: RunningStpd, ctx: ssl.SSLContext, timeout: float = DEADLINE, source: str = LOOPBACK
) -> ssl.SSLSocket:
    raw = tcp_connect(stpd, timeout, source)
    try:
        return ctx.wrap_socket(raw, server_hostname=LOOPBACK)
    except BaseException:
        raw.close()
        raise


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def read_answer(sock: socket.socket, method: str = "GET", prefix: bytes = b"") -> Answer | None:
    """One HTTP response, or None when the connection ends (EOF, reset or a
    TLS error) before a complete one arrived."""
    conn = h11.Connection(h11.CLIENT)
    # h11 needs to know what the response answers (HEAD has no body).
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    if prefix:
        conn.receive_data(prefix)
    status, headers, body = 0, {}, bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return None
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Answer(status, headers, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            return None


def request(
    sock: socket.socket,
    method: str,
    target: str,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
) -> Answer | None:
    head = f"{method} {target} HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    if body or method in ("PUT", "POST"):
        head += f"Content-Length: {len(body)}\r\n"
    sock.sendall(head.encode("latin-1") + b"\r\n" + body)
    return read_answer(sock, method)


def wait_closed(sock: socket.socket, timeout: float = DEADLINE) -> bytes:
    """Read until the peer closes; returns what arrived. Fails the test if
    the connection is still open after ``timeout`` seconds."""
    sock.settimeout(timeout)
    got = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"connection still open after {timeout}s; got {bytes(got[:200])!r}")
        except (ssl.SSLError, ConnectionError):
            return bytes(got)
        if not data:
            return bytes(got)
        got += data


def wait_count(stpd: RunningStpd, pattern: str, count: int, timeout: float = 20.0) -> list[str]:
    """Wait until at least ``count`` log lines match ``pattern``."""
    regex = re.compile(pattern)
    log = stpd.log
    with log.changed:
        if not log.changed.wait_for(
            lambda: sum(1 for line in log.lines if regex.search(line)) >= count, timeout
        ):
            found = [line for line in log.lines if regex.search(line)]
            raise AssertionError(f"{len(found)} of {count} lines match {pattern!r}: {found}")
        return [line for line in log.lines if regex.search(line)]


def small_tar(name: str = "hello.txt", content: bytes = b"hello\n") -> bytes:
    return tar_bytes({name: content})


def assert_serves(stpd: RunningStpd, client: Layout, workdir: Path) -> str:
    """A real ``sbc backup`` succeeds: the daemon still serves. Returns the saveset."""
    source = workdir / "still-serving.txt"
    source.write_bytes(os.urandom(1000))
    code, out, err = run_sbc(
        "--ini-dir",
        str(client.ini_dir),
        "backup",
        str(source),
        "--server",
        stpd.address,
        "--json",
        "--quiet",
    )
    assert code == 0, f"the daemon no longer serves a valid client: {err}"
    saveset = json.loads(out)["saveset"]
    assert stpd.daemon.store.find(_owner(client), saveset) is not None
    assert_no_partial(stpd.daemon.store.root)
    return saveset


def _owner(client: Layout) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(client.client_cert.read_bytes())
    return cert.subject.rfc4514_string()


@contextmanager
def created_in(directory: Path) -> Iterator[Callable[[], str]]:
    """inotify on ``directory``: the returned function waits (with a
    deadline) for the next file created there and returns its name. One
    read can bring several events; each name is returned in turn."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0 or libc.inotify_add_watch(fd, bytes(directory), 0x100) < 0:  # IN_CREATE
        pytest.skip(f"inotify unavailable: {os.strerror(ctypes.get_errno())}")
    names: list[str] = []

    def next_created() -> str:
        if not names:
            ready, _, _ = select.select([fd], [], [], DEADLINE)
            assert ready, f"nothing created in {directory} within {DEADLINE}s"
            events = os.read(fd, 64 * 1024)
            offset = 0
            while offset < len(events):  # struct inotify_event, then its name
                _wd, _mask, _cookie, size = struct.unpack_from("iIII", events, offset)
                names.append(events[offset + 16 : offset + 16 + size].rstrip(b"\0").decode())
                offset += 16 + size
        return names.pop(0)

    try:
        yield next_created
    finally:
        os.close(fd)
