"""Many clients at once: valid and invalid mixed at level 2, and a
connection limit that answers politely instead of falling over."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography import x509

from tests.conftest import Pki, running_stpd
from tests.test_hostile_common import (
    DEADLINE,
    LOOPBACK,
    assert_no_partial,
    assert_serves,
    created_in,
    hpki,  # noqa: F401  (fixture)
    read_answer,
    request,
    run_sbc,
    small_tar,
    tcp_connect,
    tls_connect,
    tls_context,
    until,
    wait_closed,
    wait_count,
)

CLIENTS = 64
INVALID_KINDS = ["none", "other-ca", "expired", "server"]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_64_concurrent_valid_and_invalid_clients_at_level_2(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    valid = tls_context(hpki, hpki.client_ini("valid"))
    invalid = {
        kind: tls_context(hpki, hpki.client_ini(f"bad-{kind}", cert=kind)) for kind in INVALID_KINDS
    }
    plan = ["valid" if i % 2 == 0 else INVALID_KINDS[(i // 2) % 4] for i in range(CLIENTS)]
    body = small_tar("concurrent.txt", b"x" * 10_000)
    start = threading.Barrier(CLIENTS, timeout=DEADLINE)

    def one_client(kind: str) -> str:
        ctx = valid if kind == "valid" else invalid[kind]
        start.wait()
        try:
            with tls_connect(stpd, ctx) as sock:
                put = request(sock, "PUT", "/savesets?source=/concurrent", body)
                if put is None:
                    return "refused"
                status = request(sock, "GET", "/status")  # same connection: keep-alive
                return f"{put.status}+{status.status if status else 'closed'}"
        except (ssl.SSLError, ConnectionError):
            return "refused"

    with running_stpd(hpki.layout, 2) as stpd:
        assert_serves(stpd, hpki.client_ini("warm-up"), tmp_path)  # lazy imports, buffers
        before = rss_bytes()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(one_client, plan))
        grown = rss_bytes() - before
        outcome = Counter(zip(plan, results, strict=True))
        assert outcome == Counter(
            {("valid", "201+200"): 32, **{(k, "refused"): 8 for k in INVALID_KINDS}}
        )
        assert len(stpd.log.matching(r"^ERROR refused client 127\.0\.0\.1:\d+")) == 32
        assert not stpd.log.matching(r"internal error")
        stored = stpd.daemon.store.owned_by("CN=valid")
        assert len(stored) == 32
        assert {meta.bytes for meta in stored} == {len(body)}
        # Nothing about 64 small transfers should cost the daemon much memory.
        assert grown < 64 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
        assert_serves(stpd, hpki.client_ini("after"), tmp_path)
        assert_no_partial(stpd.daemon.store.root)


def listen_queue(port: int) -> int:
    """Connections the kernel holds for the listening socket on ``port``
    that were not accepted yet (/proc/net/tcp shows a listening socket's
    accept queue as its receive queue)."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return int(queues.split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


def test_connections_past_twice_the_limit_wait_in_the_backlog(
    hpki: Pki,  # noqa: F811
) -> None:
    """Silent connections need no certificate, so they cannot be allowed
    to take all memory: at most 2 x STPD_MAX_CONNECTIONS are open at once.
    The next one waits in the kernel's backlog, and is served as soon as
    one closes. (The silent ones come from two addresses: one alone may
    hold only half of the slots in handshakes.)"""
    ctx = tls_context(hpki, hpki.client_ini("good"))
    with running_stpd(hpki.layout, 2, max_connections=2, handshake_timeout=60) as stpd:
        silent = [tcp_connect(stpd, source=f"127.0.0.{2 + n % 2}") for n in range(4)]
        late = tcp_connect(stpd)  # the kernel completes TCP's handshake for it
        try:
            until(lambda: stpd.daemon.connections == 4, "4 connections accepted")
            until(lambda: listen_queue(stpd.port) == 1, "the fifth left in the backlog")
            wait_count(stpd, r"^WARNING 4 connections open, 2 x STPD_MAX_CONNECTIONS: new", 1)
            assert stpd.daemon.connections == 4
            silent.pop().close()
            with ctx.wrap_socket(late, server_hostname=LOOPBACK) as tls:
                answer = request(tls, "GET", "/status")
                assert answer is not None and answer.status == 200
            assert listen_queue(stpd.port) == 0
        finally:
            for sock in [*silent, late]:
                sock.close()


def test_silent_connections_from_one_host_do_not_lock_out_others(
    hpki: Pki,  # noqa: F811
) -> None:
    """40 silent connections from one host, at STPD_MAX_CONNECTIONS=8 (16
    open slots): 8 of them may sit in their TLS handshake, the others are
    closed at once, with one WARNING naming the host. Clients from other
    addresses are served meanwhile; the one host is not, until its
    handshakes end. A connection past its handshake no longer counts."""
    client = hpki.client_ini("good")
    ctx = tls_context(hpki, client)
    flood = "127.0.0.2"
    with running_stpd(hpki.layout, 2, max_connections=8, handshake_timeout=60) as stpd:
        silent = [tcp_connect(stpd, source=flood) for _ in range(40)]
        try:
            until(lambda: listen_queue(stpd.port) == 0, "every connection accepted")
            until(lambda: stpd.daemon.connections == 8, "8 of them kept in their handshake")
            stpd.log.wait_for(
                r"^WARNING 8 connections from 127\.0\.0\.2 are in their TLS handshake, half "
                r"of the 16 that may be open \(2 x STPD_MAX_CONNECTIONS\): further ones from it "
                r"are closed at once until those finish or time out \(STPD_HANDSHAKE_TIMEOUT=60s\)"
            )
            # Those beyond 8 were closed without a byte; one more is too.
            assert [wait_closed(sock) for sock in silent[8:]] == [b""] * 32
            with tcp_connect(stpd, source=flood) as again:
                assert wait_closed(again) == b""
            # sbc from 127.0.0.1, and a TLS client from 127.0.0.3, are served.
            code, out, err = run_sbc(
                "--ini-dir", str(client.ini_dir), "status", "--server", stpd.address, "--json"
            )
            assert code == 0, err
            assert json.loads(out)["connections"] == 9  # the 8 silent ones and this one
            with tls_connect(stpd, ctx, source="127.0.0.3") as sock:
                answer = request(sock, "GET", "/status")
                assert answer is not None and answer.status == 200, answer
            # The host itself waits until its handshakes end.
            for sock in silent[:8]:
                sock.close()
            until(lambda: stpd.daemon.connections == 0, "the silent ones gone")
            # Past their handshake, its connections no longer count: a ninth one
            # completes its handshake too (and is answered 503, being the ninth).
            with contextlib.ExitStack() as held:
                for _ in range(8):
                    sock = held.enter_context(tls_connect(stpd, ctx, source=flood))
                    answer = request(sock, "GET", "/savesets")
                    assert answer is not None and answer.status == 200, answer
                with tls_connect(stpd, ctx, source=flood) as sock:
                    answer = request(sock, "GET", "/savesets")
                    assert answer is not None and answer.status == 503, answer
            assert len(stpd.log.matching(r"^WARNING \d+ connections from")) == 1  # throttled
        finally:
            for sock in silent:
                sock.close()


def test_newer_idle_connections_do_not_turn_away_older_ones(hpki: Pki) -> None:  # noqa: F811
    """README: requests on connections beyond STPD_MAX_CONNECTIONS are
    answered 503, beyond in the order the connections were opened. Two
    that send nothing (idle, or a client's spare keep-alive connections)
    do not make the two served before them busy. GET /status is answered
    beyond the limit: a monitor (or `stpd status`) asks just then."""
    ctx = tls_context(hpki, hpki.client_ini("good"))
    with (
        running_stpd(hpki.layout, 2, max_connections=2, idle_timeout=60) as stpd,
        contextlib.ExitStack() as held,
    ):
        a, b = (held.enter_context(tls_connect(stpd, ctx)) for _ in range(2))
        for sock in (a, b):
            answer = request(sock, "GET", "/savesets")
            assert answer is not None and answer.status == 200, answer
        c, d = (held.enter_context(tls_connect(stpd, ctx)) for _ in range(2))
        # Each session is counted as its authentication is logged.
        wait_count(stpd, r"^INFO client .* authenticated as CN=good", 4)
        for sock in (a, b):  # keep-alive: their next requests
            answer = request(sock, "GET", "/savesets")
            assert answer is not None and answer.status == 200, answer
        answer = request(c, "GET", "/status")  # the third: beyond the limit, but a status
        assert answer is not None and answer.status == 200, answer
        assert json.loads(answer.body)["connections"] == 4
        # and then closed: polling it must not hold an open slot.
        assert answer.headers.get("connection") == "close"
        assert wait_closed(c) == b""
        answer = request(d, "GET", "/savesets")
        assert answer is not None and answer.status == 503, answer
        assert len(stpd.daemon.sessions) == 2  # a and b: d, refused, lingers uncounted
        a.close()
        until(lambda: len(stpd.daemon.sessions) == 1, "a, c and d gone")
        e = held.enter_context(tls_connect(stpd, ctx))
        answer = request(e, "GET", "/savesets")  # now the second open
        assert answer is not None and answer.status == 200, answer


def test_silent_connections_hold_little_memory(hpki: Pki) -> None:  # noqa: F811
    """A connection that never starts TLS costs the daemon its socket and
    OpenSSL's state, not a receive buffer (a quarter MiB each before)."""
    with running_stpd(hpki.layout, 2, max_connections=200, handshake_timeout=60) as stpd:
        before = rss_bytes()
        silent = [tcp_connect(stpd, source=f"127.0.0.{2 + n % 2}") for n in range(400)]
        try:
            until(lambda: stpd.daemon.connections == 400, "400 connections accepted")
            grown = rss_bytes() - before
            assert grown < 400 * 128 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
        finally:
            for sock in silent:
                sock.close()


def test_connection_limit_answers_503_and_recovers(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("good")
    ctx = tls_context(hpki, client)
    with running_stpd(hpki.layout, 2, max_connections=4, idle_timeout=60) as stpd:
        holders = [tls_connect(stpd, ctx) for _ in range(4)]
        try:
            for sock in holders:  # each is served: the server knows them all
                answer = request(sock, "GET", "/savesets")
                assert answer is not None and answer.status == 200
            # A fifth connection: a polite JSON 503, then closed.
            with tls_connect(stpd, ctx) as sock:
                answer = request(sock, "GET", "/savesets")
                assert answer is not None and answer.status == 503, answer
                assert answer.headers["content-type"] == "application/json"
                assert answer.headers.get("connection") == "close"
                assert "server busy" in answer.json()["error"]  # type: ignore[index]
            # sbc says so in one line.
            code, out, err = run_sbc(
                "--ini-dir", str(client.ini_dir), "list", "--server", stpd.address
            )
            assert code == 1 and out == ""
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert "server busy: too many connections, try again later" in err, err
            assert len(stpd.log.matching(r"^WARNING connection limit 4 reached; answered 503")) == 2
        finally:
            for sock in holders:  # closed without close_notify: logged as ended
                with contextlib.suppress(OSError):
                    sock.close()
        wait_count(stpd, r"^INFO connection with .* ended", len(holders))
        # Below the limit again: served.
        with tls_connect(stpd, ctx) as sock:
            answer = request(sock, "GET", "/savesets")
            assert answer is not None and answer.status == 200
            assert json.loads(answer.body) == []
        assert_serves(stpd, client, tmp_path)


def test_many_half_open_handshakes_do_not_block_valid_clients(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Connections that never start TLS (from two other hosts) hold no one
    up; they are dropped after the handshake timeout."""
    client = hpki.client_ini("good")
    with running_stpd(hpki.layout, 2, handshake_timeout=1.0) as stpd:
        silent = [tcp_connect(stpd, source=f"127.0.0.{2 + n % 2}") for n in range(100)]
        try:
            assert_serves(stpd, client, tmp_path)  # while 100 connections sit silent
            wait_count(stpd, r"TLS handshake with .* timed out after 1s", 100)
        finally:
            for sock in silent:
                sock.close()


def test_a_client_over_its_addresss_handshake_share_is_told_it_may_be_load(
    hpki: Pki,  # noqa: F811
) -> None:
    """Closed at once by the per-address cap, sbc blamed a refusal only
    ("e.g. a revoked certificate"), sending its administrator to the CA for
    what was load."""
    client = hpki.client_ini("good")
    with running_stpd(hpki.layout, 2, max_connections=1) as stpd:  # a share of 1 an address
        with tcp_connect(stpd):  # silent, in its handshake, from 127.0.0.1
            code, out, err = run_sbc(
                "--ini-dir", str(client.ini_dir), "status", "--server", stpd.address
            )
        wait_count(stpd, r"WARNING .*connections from 127\.0\.0\.1 are in their TLS handshake", 1)
    assert (code, out) == (1, "")
    assert err.startswith(f"sbc: error: stpd at {stpd.address} closed the connection before "), err
    assert err.endswith(
        "it refused this client (a revoked certificate, say), or had too many connections from "
        "this address in their TLS handshake to take one more; the stpd log says which\n"
    ), err


def test_more_transfers_than_trios_default_thread_pool_run_at_once(
    hpki: Pki,  # noqa: F811
) -> None:
    """A transfer holds a worker thread to its end (stpd.aio.run_transfer),
    from a pool as large as STPD_MAX_CONNECTIONS. 45 uploads in flight (trio's
    default pool has 40 threads) all begin, and a listing, which needs a
    thread of the default pool, is answered meanwhile."""
    uploads = 45
    client = hpki.client_ini("many")
    ctx = tls_context(hpki, client)
    body = small_tar("many.txt", b"y" * 100_000)
    head = (
        f"PUT /savesets?source=/many HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with running_stpd(hpki.layout, 2, io_timeout=60) as stpd:
        assert stpd.daemon.config.max_connections >= uploads
        with (
            created_in(stpd.daemon.store.incoming) as next_created,
            contextlib.ExitStack() as open_,
        ):
            socks = [open_.enter_context(tls_connect(stpd, ctx)) for _ in range(uploads)]
            for sock in socks:
                sock.sendall(head + body[:1000])  # and then nothing, for now
            for _ in range(uploads):  # every upload began: its .part file
                assert next_created().endswith(".tar.part")
            with tls_connect(stpd, ctx) as sock:
                listing = request(sock, "GET", "/savesets")
            assert listing is not None and listing.status == 200, listing
            for sock in socks:
                sock.sendall(body[1000:])
            for sock in socks:
                answer = read_answer(sock, "PUT")
                assert answer is not None and answer.status == 201, answer
        owner = x509.load_pem_x509_certificate(client.client_cert.read_bytes()).subject
        assert len(stpd.daemon.store.owned_by(owner.rfc4514_string())) == uploads
        assert_no_partial(stpd.daemon.store.root)


def test_an_upload_among_others_is_stored_whole(hpki: Pki) -> None:  # noqa: F811
    """An upload that starts while another runs is received and written in
    one thread, in 256 KiB batches (see BodyReader); the one that started
    alone keeps its two threads. Both are stored byte for byte."""
    ctx = tls_context(hpki, hpki.client_ini("among"))
    alone = small_tar("alone.bin", os.urandom(300_000))
    among = small_tar("among.bin", os.urandom(3 * 1024 * 1024 + 5))
    head = (
        f"PUT /savesets?source=/alone HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
        f"Content-Length: {len(alone)}\r\n\r\n"
    ).encode()
    with running_stpd(hpki.layout, 2) as stpd:
        store = stpd.daemon.store
        with created_in(store.incoming) as next_created, tls_connect(stpd, ctx) as first:
            first.sendall(head + alone[:1000])
            assert next_created().endswith(".tar.part")  # the first upload runs
            with tls_connect(stpd, ctx) as second:
                answer = request(second, "PUT", "/savesets?source=/among", among)
            assert answer is not None and answer.status == 201, answer
            assert stpd.daemon.active_transfers == 1  # the first one still runs
            first.sendall(alone[1000:])
            first_answer = read_answer(first, "PUT")
            assert first_answer is not None and first_answer.status == 201, first_answer
        for reply, body in ((first_answer, alone), (answer, among)):
            saveset = reply.json()["saveset"]  # type: ignore[index]
            assert store.tar_path(saveset).read_bytes() == body
