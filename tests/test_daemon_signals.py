"""stpd as a daemon: the real console script as a subprocess, driven by signals.

SIGTERM drains (a running upload finishes; one that cannot finish within
STPD_SHUTDOWN_GRACE is cut and leaves nothing partial), a second SIGTERM
stops at once, SIGHUP reloads stpd.ini and the certificates for new
connections while open ones keep working, and a broken reload is refused.

Synchronisation is by stpd's log lines and the process's exit, each awaited
with a deadline; the uploads that must be "in progress" at a signal are
made by a raw TLS client that sends part of a chunked body and then waits
for the test, so nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h11
import pytest
from cryptography import x509

from pki.authority import CertificateAuthority
from pki.cli import main as sm_ssl_cert
from pki.layout import Layout
from tests.conftest import (
    STPD,
    Pki,
    StpdProcess,
    assert_no_partial,
    make_pki,
    tar_bytes,
    with_open_files,
    write_stpd_ini,
)

HOST = "127.0.0.1"
WAIT_SECONDS = 20.0  # upper bound for an expected event; never a sleep


# -- a raw TLS client: Python's ssl module and h11 --------------------------------


def make_tar(size: int = 512 * 1024) -> bytes:
    """A valid tar stream with one file of ``size`` random bytes."""
    return tar_bytes({"payload/data.bin": os.urandom(size)})


class RawClient:
    """One TLS connection with a client certificate, speaking HTTP/1.1 by hand,
    so that a test decides when each piece of an upload is sent."""

    def __init__(self, client: Layout, port: int) -> None:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=client.ca_cert)
        if client.client_cert.exists():
            context.load_cert_chain(client.client_cert, client.client_key)
        raw = socket.create_connection((HOST, port), timeout=WAIT_SECONDS)
        self.sock = context.wrap_socket(raw, server_hostname=HOST)
        self.conn = h11.Connection(h11.CLIENT)

    @property
    def server_certificate(self) -> x509.Certificate:
        der = self.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                self.sock.sendall(data)

    def response(self) -> tuple[int, bytes]:
        """The status and body of the next response (raises if the connection ends)."""
        status, body = 0, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status, body
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("stpd closed the connection")

    def get(self, target: str) -> tuple[int, bytes]:
        self.send(
            h11.Request(method="GET", target=target, headers=[("Host", HOST)]),
            h11.EndOfMessage(),
        )
        return self.response()

    def start_upload(self, first_piece: bytes) -> None:
        self.send(
            h11.Request(
                method="PUT",
                target="/savesets?source=/raw/client",
                headers=[("Host", HOST), ("Transfer-Encoding", "chunked")],
            ),
            h11.Data(data=first_piece),
        )

    def finish_upload(self, rest: bytes) -> tuple[int, bytes]:
        self.send(h11.Data(data=rest), h11.EndOfMessage())
        return self.response()

    def close(self) -> None:
        self.sock.close()


def server_serial(port: int, client: Layout) -> int:
    """The serial of the certificate a NEW connection is shown; the
    connection also serves a request, so the daemon is fully working."""
    fresh = RawClient(client, port)
    try:
        status, _ = fresh.get("/status")
        assert status == 200
        return fresh.server_certificate.serial_number
    finally:
        fresh.close()


# -- fixtures ----------------------------------------------------------------------


def wait_active_transfers(port: int, client: Layout, wanted: int) -> None:
    """Poll the status endpoint (a new connection each time) with a deadline."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        probe = RawClient(client, port)
        try:
            status, body = probe.get("/status")
        finally:
            probe.close()
        assert status == 200
        if json.loads(body)["active_transfers"] == wanted:
            return
        assert time.monotonic() < deadline, f"active transfers never became {wanted}"
        time.sleep(0.02)  # polling a condition with a deadline, not a synchronising sleep


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Pki, Layout, Path]:
    pki = make_pki(tmp_path)
    return pki, pki.client_ini("signal-client"), tmp_path / "data"


@pytest.fixture
def start(setup: tuple[Pki, Layout, Path]) -> Iterator:
    started: list[StpdProcess] = []

    def start_stpd(pid_file: Path | None = None, umask: int | None = None) -> StpdProcess:
        pki, _, data = setup
        launcher = [] if umask is None else ["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh"]
        server = StpdProcess(pki.layout.ini_dir, data, pid_file, launcher)
        started.append(server)
        return server

    yield start_stpd
    for server in started:
        server.kill()


# -- the tests ---------------------------------------------------------------------


def test_pid_file_written_and_removed_sigterm_exits_0(
    setup: tuple[Pki, Layout, Path], start, tmp_path: Path
) -> None:
    pki, _, _ = setup
    write_stpd_ini(pki.layout.ini_dir)
    pid_file = tmp_path / "run" / "stpd.pid"
    pid_file.parent.mkdir()
    # /run/stpd is the service user's: a link it plants where the pid file
    # was written first (.stpd.pid.tmp) made a root stpd write through it.
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    (pid_file.parent / ".stpd.pid.tmp").symlink_to(victim)
    server = start(pid_file, umask=0)
    assert pid_file.read_text() == f"{server.process.pid}\n"
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o644  # not 0666: who may send SIGHUP
    assert victim.read_text() == "root's\n"
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not pid_file.exists()
    server.wait_for(r"INFO stpd: received SIGTERM")
    server.wait_for(r"INFO stpd: stopping: no new connections; 0 transfers may finish within 30s")
    server.wait_for(r"INFO stpd: stpd stopped")


@pytest.mark.parametrize("same_port", [True, False])
def test_a_second_stpd_with_the_same_pid_file_leaves_it_to_the_running_one(
    setup: tuple[Pki, Layout, Path], start, tmp_path: Path, same_port: bool
) -> None:
    """A second stpd started by mistake with the same --pid-file, refused
    the port (the pid file is written once stpd listens), or on another
    port and data directory (a second unit copied from the first): it
    replaced the pid file and then removed it, so `kill -HUP $(cat
    PIDFILE)` and systemd's PIDFile= lost the running daemon."""
    pki, _, _ = setup
    write_stpd_ini(pki.layout.ini_dir)
    pid_file = tmp_path / "stpd.pid"
    running = start(pid_file)
    second = subprocess.run(
        [STPD, "--ini-dir", str(pki.layout.ini_dir), "--data-dir", str(tmp_path / "other"),
         "--listen", f"{HOST}:{running.port if same_port else 0}", "--pid-file", str(pid_file)],
        capture_output=True, text=True, timeout=WAIT_SECONDS,
    )  # fmt: skip
    assert second.returncode == 2
    if same_port:
        assert f"cannot listen on {HOST}:{running.port}: Address already in use" in second.stderr
    else:
        assert second.stderr.splitlines()[-1] == (
            f"stpd: error: cannot write the pid file: it names stpd {running.process.pid}, still "
            f"running: stop that one first, or give this one another --pid-file ({pid_file})"
        )
    assert pid_file.read_text() == f"{running.process.pid}\n"
    running.signal(signal.SIGTERM)
    assert running.wait_exit() == 0
    assert not pid_file.exists()
    # A pid file left behind (a crash) names no running stpd: replaced.
    pid_file.write_text(f"{running.process.pid}\n")
    again = start(pid_file)
    assert pid_file.read_text() == f"{again.process.pid}\n"


@pytest.mark.parametrize(
    ("given", "error"),
    [("a-dir", "Is a directory"), ("missing/stpd.pid", "No such file or directory")],
)
def test_a_pid_file_that_cannot_be_written_is_named(
    setup: tuple[Pki, Layout, Path], tmp_path: Path, given: str, error: str
) -> None:
    """The error named the temporary file beside it ("Is a directory
    (.a-dir.tmp)"), and --pid-file DIR left that file behind. A start that
    failed logged "stpd stopped" before the error."""
    pki, _, _ = setup
    write_stpd_ini(pki.layout.ini_dir)
    run = tmp_path / "run"
    (run / "a-dir").mkdir(parents=True)
    refused = subprocess.run(
        [STPD, "--ini-dir", str(pki.layout.ini_dir), "--data-dir", str(tmp_path / "data"),
         "--listen", f"{HOST}:0", "--pid-file", str(run / given)],
        capture_output=True, text=True, timeout=WAIT_SECONDS,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        f"stpd: error: cannot write the pid file: {error} ({run / given})"
    )
    assert "stpd stopped" not in refused.stderr, refused.stderr
    assert sorted(path.name for path in run.rglob("*")) == ["a-dir"]


def test_sigterm_lets_a_running_upload_finish(setup: tuple[Pki, Layout, Path], start) -> None:
    pki, client, data = setup
    write_stpd_ini(pki.layout.ini_dir, "STPD_SHUTDOWN_GRACE=15")
    server = start()
    body = make_tar()
    uploader = RawClient(client, server.port)
    uploader.start_upload(body[: len(body) // 2])
    wait_active_transfers(server.port, client, 1)

    server.signal(signal.SIGTERM)
    server.wait_for(
        r"INFO stpd: stopping: no new connections; 1 transfer may finish within 15s: upload of "
        r"/raw/client from 127\.0\.0\.1:\d+ \(CN=signal-client\)$"
    )
    with pytest.raises(OSError):  # no new connections while draining
        RawClient(client, server.port)
    assert server.process.poll() is None  # still waiting for the upload

    status, answer = uploader.finish_upload(body[len(body) // 2 :])
    assert status == 201, answer
    uploader.close()
    assert server.wait_exit() == 0
    stored = server.wait_for(r"INFO stpd: stored saveset (SS-\S+) from 127\.0\.0\.1:\d+ ")
    saveset = re.search(r"stored saveset (SS-\S+) ", stored).group(1)  # type: ignore[union-attr]
    assert re.search(rf"\(CN=signal-client\): {len(body)} bytes in [\d.]+s \([\d.]+ MB/s\)", stored)
    assert (data / f"{saveset}.tar").read_bytes() == body
    assert (data / f"{saveset}.json").exists()
    assert_no_partial(data, require_incoming=True)
    assert not server.matching(r"grace period .* over")
    server.wait_for(r"INFO stpd: stpd stopped")


def test_sigterm_cuts_an_upload_that_outlasts_the_grace(
    setup: tuple[Pki, Layout, Path], start
) -> None:
    pki, client, data = setup
    write_stpd_ini(pki.layout.ini_dir, "STPD_SHUTDOWN_GRACE=1")
    server = start()
    uploader = RawClient(client, server.port)
    uploader.start_upload(make_tar()[:100_000])  # and then it stalls
    wait_active_transfers(server.port, client, 1)
    assert list((data / ".incoming").glob("*.tar.part"))

    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    server.wait_for(
        r"WARNING stpd: grace period of 1s over: cut off 1 transfer still running \(nothing "
        r"partial is kept\): upload of /raw/client from 127\.0\.0\.1:\d+ \(CN=signal-client\)$"
    )
    assert server.log.tail(1).endswith("INFO stpd: stpd stopped")
    with pytest.raises((ConnectionError, OSError)):
        uploader.finish_upload(b"\0" * 1024)
    uploader.close()
    assert_no_partial(data, require_incoming=True)
    assert list(data.glob("SS-*")) == []


def test_second_sigterm_stops_at_once(setup: tuple[Pki, Layout, Path], start) -> None:
    """It names what it cuts off (a restore whose client reads nothing, an
    upload that stalls), then says that stpd stopped."""
    pki, client, data = setup
    write_stpd_ini(pki.layout.ini_dir, "STPD_SHUTDOWN_GRACE=300")
    server = start()
    stored = RawClient(client, server.port)
    stored.start_upload(b"")
    status, answer = stored.finish_upload(make_tar(32 * 1024 * 1024))  # beyond socket buffers
    assert status == 201, answer
    saveset = json.loads(answer)["saveset"]
    restorer = stored  # asks for it, and reads none of it
    restorer.send(
        h11.Request(method="GET", target=f"/savesets/{saveset}", headers=[("Host", HOST)]),
        h11.EndOfMessage(),
    )
    wait_active_transfers(server.port, client, 1)
    uploader = RawClient(client, server.port)
    uploader.start_upload(make_tar()[:100_000])
    wait_active_transfers(server.port, client, 2)
    server.signal(signal.SIGTERM)
    server.wait_for(r"INFO stpd: stopping: no new connections; 2 transfers may finish within 300s")
    assert server.process.poll() is None
    server.signal(signal.SIGTERM)
    assert server.wait_exit(timeout=10) == 0  # far less than the 300 s grace
    peer = r"127\.0\.0\.1:\d+ \(CN=signal-client\)"
    server.wait_for(
        r"WARNING stpd: received SIGTERM again: stopping at once, cutting off 2 transfers "
        rf"\(nothing partial is kept\): restore of {saveset} to {peer}; upload of /raw/client "
        rf"from {peer}$"
    )
    assert server.log.tail(1).endswith("INFO stpd: stpd stopped")
    uploader.close()
    restorer.close()
    assert_no_partial(data, require_incoming=True)


def test_sighup_renewed_certificate_for_new_connections_only(
    setup: tuple[Pki, Layout, Path], start
) -> None:
    pki, client, data = setup
    write_stpd_ini(pki.layout.ini_dir)
    server = start()
    old_serial = server_serial(server.port, client)

    # A connection opened before the reload, with an upload half sent.
    early = RawClient(client, server.port)
    assert early.server_certificate.serial_number == old_serial
    body = make_tar()
    early.start_upload(body[:200_000])

    # The administrator's renewal: same names, new key, old files moved aside.
    argv = ["--ini-dir", str(pki.layout.ini_dir), "renew", "server", "--days", "90"]
    assert sm_ssl_cert(argv) == 0
    renewed = x509.load_pem_x509_certificate(pki.layout.server_cert.read_bytes())
    assert renewed.serial_number != old_serial
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"INFO stpd: received SIGHUP: reloading", after=mark)
    reloaded = server.wait_for(r"INFO stpd: reloaded .*stpd\.ini and certificates", after=mark)
    assert "server certificate CN=localhost (expires in 89 days)" in reloaded

    assert server_serial(server.port, client) == renewed.serial_number  # a NEW connection
    # The early connection is undisturbed: its upload completes, then it is
    # still served (keep-alive), still with the certificate it was shown.
    status, answer = early.finish_upload(body[200_000:])
    assert status == 201, answer
    assert early.get("/status")[0] == 200
    assert early.server_certificate.serial_number == old_serial
    early.close()

    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not server.matching(r"ERROR")
    assert_no_partial(data, require_incoming=True)


def test_a_ca_key_on_the_server_is_pointed_out_at_start_and_reload(
    setup: tuple[Pki, Layout, Path], start, tmp_path: Path
) -> None:
    """SPEC: rootCA.key is needed only to issue certificates, the
    administrator should move it off the server, and every daemon runs
    without it. stpd says so while it finds the key in its ini directory:
    at start and at each reload, and no more once it is gone."""
    pki, client, _ = setup
    write_stpd_ini(pki.layout.ini_dir)
    key = pki.layout.ca_key
    warning = rf"WARNING stpd: {re.escape(str(key))} is on this server: stpd does not need it"
    server = start()
    assert len(server.matching(warning)) == 1

    def reload() -> None:
        mark = server.mark()
        server.signal(signal.SIGHUP)
        server.wait_for(r"INFO stpd: reloaded .*stpd\.ini and certificates", after=mark)

    offline = tmp_path / "offline"
    offline.mkdir()
    os.replace(key, offline / "rootCA.key")
    reload()
    assert len(server.matching(warning)) == 1  # none at this reload
    assert server_serial(server.port, client) > 0  # served without the key

    os.replace(offline / "rootCA.key", key)  # copied back by mistake
    reload()
    assert len(server.matching(warning)) == 2
    # An old CA's key that `ca --force` moved aside stays just as readable.
    os.replace(key, key.with_name("rootCA.key.old-20261128T120000Z"))
    reload()
    assert len(server.matching(warning)) == 2
    assert server.matching(
        rf"WARNING stpd: {re.escape(str(key))}\.old-20261128T120000Z is on this server"
    )
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_a_retention_set_at_sighup_acts_at_once(
    setup: tuple[Pki, Layout, Path], start, tmp_path: Path
) -> None:
    """STPD_RETENTION_DAYS set and SIGHUP sent: the old savesets went only
    at the next hourly look (or a restart), and the reload line said
    nothing of it. A reload now looks at once."""
    pki, client, data = setup
    write_stpd_ini(pki.layout.ini_dir)
    server = start()
    body = make_tar()
    savesets = []
    for _ in range(2):
        uploader = RawClient(client, server.port)
        uploader.start_upload(body[:1000])
        status, answer = uploader.finish_upload(body[1000:])
        assert status == 201, answer
        savesets.append(json.loads(answer)["saveset"])
        uploader.close()
    old, new = savesets
    meta_path = data / f"{old}.json"
    long_ago = datetime.now(UTC) - timedelta(days=31)
    meta = {**json.loads(meta_path.read_text()), "finished": f"{long_ago:%Y-%m-%dT%H:%M:%SZ}"}
    meta_path.write_text(json.dumps(meta))

    write_stpd_ini(pki.layout.ini_dir, "STPD_RETENTION_DAYS=30")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(
        rf"INFO stpd: removed saveset {old} of .*older than STPD_RETENTION_DAYS=30$", after=mark
    )
    assert sorted(p.name for p in data.glob("SS-*")) == [f"{new}.json", f"{new}.tar"]
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_broken_reload_is_refused_and_the_old_configuration_stays(
    setup: tuple[Pki, Layout, Path], start, tmp_path: Path
) -> None:
    pki, client, _ = setup
    ini = pki.layout.ini_dir
    write_stpd_ini(ini)
    server = start()
    old_serial = server_serial(server.port, client)
    good_ini = (ini / "stpd.ini").read_text()

    # 1. A bad value in stpd.ini.
    (ini / "stpd.ini").write_text(good_ini.replace("USE_CLIENT_CERT=2", "USE_CLIENT_CERT=7"))
    mark = server.mark()
    server.signal(signal.SIGHUP)
    refused = server.wait_for(r"ERROR stpd: reload refused", after=mark)
    assert "STPD_HTTPS_USE_CLIENT_CERT" in refused and "stpd.ini" in refused
    assert "the running configuration stays in force" in refused
    assert server_serial(server.port, client) == old_serial
    stranger = pki.client_ini("stranger", cert="none", client_auth=0)
    with pytest.raises(OSError):  # still level 2: refused (ssl.SSLError or a reset)
        server_serial(server.port, stranger)
    server.wait_for(r"ERROR stpd: refused client .*no client certificate", after=mark)

    # 2. A new server certificate whose key does not match ssl/server.key.
    (ini / "stpd.ini").write_text(good_ini)
    old_key = pki.layout.server_key.read_bytes()
    CertificateAuthority.load(pki.layout).issue_server(
        "localhost,127.0.0.1", out_dir=tmp_path / "elsewhere"
    )
    os.replace(tmp_path / "elsewhere" / "server.pem", pki.layout.server_cert)
    assert pki.layout.server_key.read_bytes() == old_key
    mark = server.mark()
    server.signal(signal.SIGHUP)
    refused = server.wait_for(r"ERROR stpd: reload refused", after=mark)
    assert f"private key {pki.layout.server_key} does not match certificate" in refused
    assert server_serial(server.port, client) == old_serial  # the old pair is still in force

    # 3. stpd.ini gone (moved away, being rewritten): not all defaults (level 0 and
    # no allow-list), the running configuration.
    os.replace(tmp_path / "elsewhere" / "server.key", pki.layout.server_key)  # a pair again
    (ini / "stpd.ini").rename(tmp_path / "away.ini")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    refused = server.wait_for(r"ERROR stpd: reload refused", after=mark)
    assert f"{ini / 'stpd.ini'} not found; it held the running configuration" in refused
    with pytest.raises(OSError):  # still level 2
        server_serial(server.port, stranger)
    (tmp_path / "away.ini").rename(ini / "stpd.ini")
    mark = server.mark()
    server.signal(signal.SIGHUP)
    server.wait_for(r"INFO stpd: reloaded .*level 2", after=mark)
    assert server_serial(server.port, client) != old_serial  # the new pair now

    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_the_open_files_limit_is_raised_to_the_hard_one(
    setup: tuple[Pki, Layout, Path],
) -> None:
    """A soft limit of 1024 (the usual) can run out on a busy night, and then
    stpd accepts no connection: it raises it to the hard limit, and says so
    when even that is short of what STPD_MAX_CONNECTIONS may need."""
    pki, _, data = setup
    os.replace(pki.layout.ca_key, data.parent / "rootCA.key")  # off the server: no warning
    data.mkdir()  # there already: no warning either
    server = StpdProcess(pki.layout.ini_dir, data, launcher=with_open_files(256, 4096))
    try:
        server.wait_for(r"INFO stpd: open files limit raised from 256 to 4096$")
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        found = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.MULTILINE)
        assert found and found.groups() == ("4096", "4096"), limits
        assert not server.matching(r"WARNING")
    finally:
        server.stop()

    write_stpd_ini(pki.layout.ini_dir, "STPD_MAX_CONNECTIONS=200")
    server = StpdProcess(pki.layout.ini_dir, data, launcher=with_open_files(128, 128))
    try:
        server.wait_for(
            r"WARNING stpd: the open files limit \(128\) is below the 864 that "
            r"STPD_MAX_CONNECTIONS=200 may need: raise it \(LimitNOFILE="
        )
        assert not server.matching(r"open files limit raised")
    finally:
        server.stop()


def test_out_of_open_files_it_says_so_and_serves_again(
    setup: tuple[Pki, Layout, Path],
) -> None:
    """accept() failing for want of file descriptors does not end stpd's
    listening: it says why, tries again, and serves once connections close."""
    pki, client, data = setup
    server = StpdProcess(pki.layout.ini_dir, data, launcher=with_open_files(48, 48))
    silent: list[socket.socket] = []
    try:
        # More than 48 descriptors' worth: the kernel completes TCP's
        # handshake for each, and stpd runs out before it can accept them all.
        silent = [socket.create_connection((HOST, server.port)) for _ in range(60)]
        server.wait_for(
            r"ERROR stpd: cannot accept a connection: Too many open files; trying again in 0\.1s$"
        )
        for sock in silent:
            sock.close()
        probe = RawClient(client, server.port)
        try:
            status, body = probe.get("/status")
        finally:
            probe.close()
        assert status == 200 and json.loads(body)["active_transfers"] == 0
    finally:
        for sock in silent:
            sock.close()
        server.stop()
    assert server.process.returncode == 0
