"""The life-cycle against a real stpd on 127.0.0.1: a client revoked with
`sm_ssl_cert revoke` (the CRL is read when stpd starts), the
STPD_ALLOWED_CLIENTS allow-list, SBC_SERVER_FINGERPRINT pinning, and a
renewed server certificate, with sbc and with curl."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import stpd.server as stpd_server
from pki import crl as crl_module
from pki.authority import CertificateAuthority
from pki.cli import main as sm_ssl_cert
from pki.layout import Layout
from tests.conftest import (
    OPENSSL,
    Pki,
    RunningStpd,
    needs_openssl,
    openssl,
    run_sbc,
    running_stpd,
    write_stpd_ini,
)
from tests.test_hostile_common import tls_context

PEER = r"client 127\.0\.0\.1:\d+"
REVOKED = "certificate has been revoked"
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="needs the curl command")
PROCESS_TIMEOUT = 20.0


def sbc_as(client: Layout, *argv: str) -> tuple[int, str, str]:
    return run_sbc("--ini-dir", str(client.ini_dir), *argv)


def one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    return err.rstrip("\n")


def revoke(pki: Pki, client: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    """The administrator's one command, on the backup server's ini directory."""
    argv = ["--ini-dir", str(pki.layout.ini_dir), "revoke", str(client.client_cert)]
    assert sm_ssl_cert([*argv, "--reason", "keyCompromise"]) == 0
    capsys.readouterr()
    assert pki.layout.crl.exists()


def backup(client: Layout, stpd: RunningStpd, source: Path) -> tuple[int, str, str]:
    return sbc_as(client, "backup", str(source), "--server", stpd.address, "--json")


def owner_of(stpd: RunningStpd, saveset: str) -> str:
    [meta] = [meta for meta in stpd.daemon.store.all() if meta.saveset == saveset]
    return meta.owner


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "payload.txt"
    path.write_text("life-cycle\n")
    return path


# -- revocation ------------------------------------------------------------------------


def test_revoked_client_is_refused_at_level_2_while_others_keep_working(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lost, other = pki.client_ini("lost-laptop"), pki.client_ini("desktop")
    revoke(pki, lost, capsys)
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = backup(lost, stpd, source)
        refused = stpd.log.wait_for(rf"^ERROR refused {PEER} \(CN=lost-laptop\): ")
        assert refused.endswith(f": {REVOKED} (STPD_HTTPS_USE_CLIENT_CERT=2)"), refused
        assert code == 1 and out == ""
        assert re.match(
            rf"sbc: error: refused by stpd at {re.escape(stpd.address)}: our client certificate "
            r"has been revoked \(.*certificate revoked\); ask the administrator",
            one_line(err),
        ), err
        assert stpd.daemon.store.all() == []

        code, out, err = backup(other, stpd, source)
        assert code == 0, err
        saveset = json.loads(out)["saveset"]
        stpd.log.wait_for(rf"^INFO {PEER} authenticated as CN=desktop$")
        assert owner_of(stpd, saveset) == "CN=desktop"


def test_a_revocation_takes_effect_without_a_restart(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The laptop is lost while stpd runs: one command, and its next
    connection is refused; the running daemon re-reads ca/crl.pem when the
    file changes. Other clients keep working."""
    lost, other = pki.client_ini("lost-laptop"), pki.client_ini("desktop")
    with running_stpd(pki.layout, level=2) as stpd:
        code, _, err = backup(lost, stpd, source)
        assert code == 0, err
        revoke(pki, lost, capsys)
        code, out, err = backup(lost, stpd, source)
        assert code == 1 and out == ""
        assert "revoked" in one_line(err)
        stpd.log.wait_for(r"^INFO CRL .*crl\.pem changed: reloaded$")
        refused = stpd.log.wait_for(rf"^ERROR refused {PEER} \(CN=lost-laptop\): {REVOKED} ")
        assert "STPD_HTTPS_USE_CLIENT_CERT=2" in refused
        code, _, err = backup(other, stpd, source)
        assert code == 0, err
        # A CRL that our CA did not sign is refused; the one in force stays.
        good = pki.layout.crl.read_bytes()
        pki.layout.crl.write_bytes(good.replace(b"MI", b"Mi", 1))
        code, _, err = backup(other, stpd, source)
        assert code == 0, err
        stpd.log.wait_for(r"^ERROR new CRL refused, the previous one stays in force: ")
        code, _, err = backup(lost, stpd, source)
        assert code == 1 and "revoked" in err


def keep_alive(pki: Pki, client: Layout, stpd: RunningStpd) -> http.client.HTTPSConnection:
    """One TLS connection that stays open between requests, as curl's or a
    script's keep-alive."""
    conn = http.client.HTTPSConnection(
        stpd.host, stpd.port, context=tls_context(pki, client), timeout=PROCESS_TIMEOUT
    )
    conn.request("GET", "/savesets")
    answer = conn.getresponse()
    assert answer.status == 200 and answer.getheader("Connection") != "close"
    answer.read()
    return conn


def on_the_same_connection(conn: http.client.HTTPSConnection) -> tuple[int, str]:
    sock = conn.sock
    assert sock is not None  # (http.client would open a new one)
    conn.request("GET", "/savesets")
    assert conn.sock is sock or conn.sock is None
    answer = conn.getresponse()
    return answer.status, answer.read().decode()


def test_a_connection_held_open_is_judged_again_after_a_revocation_or_a_reload(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A revoked client (a stolen key) kept every connection it held open:
    its next requests were served, backups and restores, for as long as it
    sent one within STPD_IDLE_TIMEOUT. So did a client taken off
    STPD_ALLOWED_CLIENTS. Its next request is refused as a new connection
    would be; others go on being served on theirs."""
    lost, other, dropped = (pki.client_ini(n) for n in ("lost-laptop", "desktop", "old-host"))
    with running_stpd(pki.layout, level=2) as stpd:
        held, kept, listed = (keep_alive(pki, c, stpd) for c in (lost, other, dropped))
        revoke(pki, lost, capsys)
        status, body = on_the_same_connection(held)
        assert status == 403 and f"{REVOKED} (STPD_HTTPS_USE_CLIENT_CERT=2)" in body, body
        line = stpd.log.wait_for(rf"^ERROR refused {PEER} \(CN=lost-laptop\): {REVOKED} ")
        assert line.endswith("(judged again: reload or new CRL)"), line
        assert on_the_same_connection(kept)[0] == 200
        assert on_the_same_connection(listed)[0] == 200  # judged again: still allowed

        write_stpd_ini(pki.layout.ini_dir, "STPD_ALLOWED_CLIENTS=CN:desktop")
        stpd.reload()
        status, body = on_the_same_connection(listed)
        assert status == 403 and "CN=old-host is not in STPD_ALLOWED_CLIENTS" in body, body
        assert on_the_same_connection(kept)[0] == 200
        for conn in (held, kept, listed):
            conn.close()


def test_a_certificate_that_expires_on_a_connection_held_open_ends_its_service(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked at the handshake only, an expiring certificate went on
    being served on a keep-alive connection."""
    client = pki.client_ini("ending")
    with running_stpd(pki.layout, level=2) as stpd:
        held = keep_alive(pki, client, stpd)
        after_its_end = stpd_server.utc_now() + timedelta(days=900)  # it has 825
        monkeypatch.setattr(stpd_server, "utc_now", lambda: after_its_end)
        status, body = on_the_same_connection(held)
        assert status == 403 and "certificate has expired" in body, body
        held.close()


def test_certificates_copied_in_without_sighup_are_not_put_in_force_by_a_new_crl(
    pki: Pki, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new CRL rebuilt the TLS context from the files: a server
    certificate copied into ssl/ without SIGHUP went in force unchecked
    (one of another CA too) while stpd still reported the old one. Now it
    is a reload, with its checks; refused, the new CRL is said not to be
    in force either."""
    first, second = pki.client_ini("first"), pki.client_ini("second")
    with running_stpd(pki.layout, level=2) as stpd:
        renewed = pki.ca.issue_server("localhost,127.0.0.1", out_dir=tmp_path / "renewed")
        for name in ("server.pem", "server.key"):
            shutil.copy(renewed.cert_path.parent / name, pki.layout.server_dir / name)
        revoke(pki, first, capsys)
        assert backup(first, stpd, source)[0] == 1
        stpd.log.wait_for(
            r"^WARNING CRL .* changed, and .* with it since they were loaded: reloading"
        )
        stpd.log.wait_for(r"^INFO reloaded ")
        assert stpd.daemon.server_cert == renewed.cert

        other = CertificateAuthority.create(Layout(tmp_path / "other-ca" / "ini"))
        foreign = other.issue_server("localhost,127.0.0.1", out_dir=tmp_path / "foreign")
        for name in ("server.pem", "server.key"):
            shutil.copy(foreign.cert_path.parent / name, pki.layout.server_dir / name)
        revoke(pki, second, capsys)
        assert backup(pki.client_ini("third"), stpd, source)[0] == 0  # the pair in force
        stpd.log.wait_for(r"^ERROR reload refused, the running configuration stays in force: ")
        stpd.log.wait_for(r"^ERROR the new CRL is not in force either ")
        assert stpd.daemon.server_cert == renewed.cert


def test_a_handshake_under_way_across_a_revocation_is_judged_again(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """The handshake is verified with the CRL in force when it began; a
    revocation picked up meanwhile (by another connection) was stamped on
    the new session as already applied, so the revoked client was served
    for as long as it kept the connection: a stolen key holds handshakes
    open to be in just that window."""
    lost, other = pki.client_ini("lost-laptop"), pki.client_ini("desktop")
    with running_stpd(pki.layout, level=2) as stpd:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = tls_context(pki, lost).wrap_bio(incoming, outgoing, server_hostname=stpd.host)
        with socket.create_connection((stpd.host, stpd.port), timeout=PROCESS_TIMEOUT) as sock:

            def pump() -> None:
                data = sock.recv(65536)
                assert data, "stpd closed the connection"
                incoming.write(data)

            while True:  # all of the handshake but the client's last flight
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    pump()
            last_flight = outgoing.read()  # its certificate and Finished (TLS 1.3)
            revoke(pki, lost, capsys)
            before = stpd.daemon.trust_generation
            on_the_same_connection(keep_alive(pki, other, stpd))  # stpd reads the new CRL
            assert stpd.daemon.trust_generation == before + 1
            sock.sendall(last_flight)
            tls.write(b"GET /savesets HTTP/1.1\r\nHost: stpd\r\n\r\n")
            sock.sendall(outgoing.read())
            answer = b""
            while b"\r\n\r\n" not in answer:
                try:
                    answer += tls.read(65536)
                except ssl.SSLWantReadError:
                    pump()
        assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
        stpd.log.wait_for(rf"^ERROR refused {PEER} \(CN=lost-laptop\): {REVOKED} .*judged again")


def test_a_client_of_another_ca_is_judged_for_that_alone_where_a_crl_is(
    pki: Pki, source: Path
) -> None:
    """With ca/crl.pem in place, a client certificate of another CA was
    "not signed by our root CA; unable to get certificate CRL" at level 1
    (where verification goes on past the first error): no CRL of ours
    could be for it, so the second reason only misled."""
    assert sm_ssl_cert(["--ini-dir", str(pki.layout.ini_dir), "crl"]) == 0
    stranger = pki.client_ini("stranger", cert="other-ca")
    with running_stpd(pki.layout, level=1) as stpd:
        code, _, err = backup(stranger, stpd, source)
        assert code == 0, err
        line = stpd.log.wait_for(rf"^WARNING {PEER} \(CN=stranger\): invalid client certificate: ")
        assert ": not signed by our root CA; served as anonymous " in line, line


def test_revoked_client_is_served_as_anonymous_with_a_warning_at_level_1(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lost, other = pki.client_ini("lost-laptop"), pki.client_ini("desktop")
    # Before the revocation the client owns its savesets...
    with running_stpd(pki.layout, level=1) as stpd:
        code, out, err = backup(lost, stpd, source)
        assert code == 0, err
        before = json.loads(out)["saveset"]
        assert owner_of(stpd, before) == "CN=lost-laptop"
    revoke(pki, lost, capsys)
    # ...after it, a new stpd serves it as anonymous: it no longer sees them.
    with running_stpd(pki.layout, level=1) as stpd:
        code, out, err = backup(lost, stpd, source)
        assert code == 0, err
        # stpd says why in its answer (STPD-Certificate-Not-Accepted): sbc cannot see it.
        assert err.startswith(
            f"sbc: WARNING: stpd at {stpd.address} did not accept our client certificate: "
            "certificate has been revoked; it serves this client as anonymous"
        ), err
        saveset = json.loads(out)["saveset"]
        warning = stpd.log.wait_for(rf"^WARNING {PEER} \(CN=lost-laptop\): ")
        assert warning.endswith(
            f"invalid client certificate: {REVOKED}; served as anonymous "
            "(STPD_HTTPS_USE_CLIENT_CERT=1)"
        ), warning
        assert owner_of(stpd, saveset) == "anonymous"
        code, out, err = sbc_as(lost, "list", "--server", stpd.address, "--json")
        assert code == 0, err
        assert [item["saveset"] for item in json.loads(out)] == [saveset]

        code, out, err = backup(other, stpd, source)
        assert code == 0, err
        assert owner_of(stpd, json.loads(out)["saveset"]) == "CN=desktop"
        stpd.log.wait_for(rf"^INFO {PEER} authenticated as CN=desktop$")
        assert not stpd.log.matching(r"CN=desktop.*invalid")


def test_a_crl_written_before_any_revocation_changes_nothing(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = pki.client_ini("host1")
    assert sm_ssl_cert(["--ini-dir", str(pki.layout.ini_dir), "crl"]) == 0
    capsys.readouterr()
    with running_stpd(pki.layout, level=2) as stpd:
        code, _out, err = backup(client, stpd, source)
        assert code == 0, err
        stpd.log.wait_for(rf"^INFO {PEER} authenticated as CN=host1$")


def test_an_out_of_date_crl_refuses_every_client_at_level_2(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Why `sm_ssl_cert list` warns about the CRL's next update: once it has
    passed, OpenSSL fails every CRL check, valid clients included."""
    client = pki.client_ini("host1")
    crl_module.write_crl(pki.ca, days=30, now=datetime.now(UTC) - timedelta(days=31))
    with running_stpd(pki.layout, level=2) as stpd:
        # Said at start, with the fix: the refusals name only the symptom.
        stpd.log.wait_for(
            rf"^ERROR CRL {re.escape(str(pki.layout.crl))} is out of date since "
            r"\d{4}-\d\d-\d\d \d\d:\d\d UTC: every client certificate now fails validation, "
            r"so every client is refused; write a new one with `sm_ssl_cert crl` where the CA "
            r"key is and copy it here \(stpd reads it at the next connection\)$"
        )
        code, _out, err = backup(client, stpd, source)
        assert code == 1
        stpd.log.wait_for(rf"^ERROR refused {PEER} \([^)]+\): CRL has expired")
        # The alert is "certificate expired", but sbc does not blame its own.
        assert re.match(
            rf"sbc: error: refused by stpd at {re.escape(stpd.address)}: stpd says a certificate "
            r"has expired, but our client certificate is in date here \(.*certificate expired\); "
            r"its CRL \(ca/crl\.pem\) is probably past its next update, or its clock is wrong; "
            r"ask the administrator to write a new CRL with `sm_ssl_cert crl`",
            one_line(err),
        ), err
    with running_stpd(pki.layout, level=1) as stpd:
        stpd.log.wait_for(r"^ERROR CRL .* so every client is served as anonymous; write a new one")
    assert sm_ssl_cert(["--ini-dir", str(pki.layout.ini_dir), "crl"]) == 0
    capsys.readouterr()
    with running_stpd(pki.layout, level=2) as stpd:
        code, _out, err = backup(client, stpd, source)
        assert code == 0, err


def test_the_start_and_reload_lines_say_which_crl_is_in_force(pki: Pki) -> None:
    """A server restarted without its crl.pem (or an RDS never sent one)
    served revoked clients again, and its log said nothing of it."""
    with running_stpd(pki.layout, level=2) as stpd:
        stpd.log.wait_for(
            rf"listening on .*; no CRL \({re.escape(str(pki.layout.crl))}\): no certificate is "
            r"checked for revocation$"
        )
        crl_module.write_crl(pki.ca)
        crl_module.write_crl(pki.ca)
        stpd.reload()
        stpd.log.wait_for(r"^INFO reloaded .* \(expires in \d+ days\); CRL number 2 in force$")
    with running_stpd(pki.layout, level=0) as stpd:  # nothing is checked at level 0
        assert stpd.log.wait_for(r"listening on ").endswith(f"data in {stpd.daemon.store.root}")


@needs_openssl
def test_a_client_with_the_crl_refuses_a_revoked_server_certificate(pki: Pki) -> None:
    """An RDS's key stolen: revoking its certificate changed nothing, for sbc
    never read a CRL. Where ca/crl.pem is copied beside rootCA.pem, sbc
    refuses it as openssl s_client -crl_check does; elsewhere it still
    passes (README says so). An out-of-date copy refuses every server."""
    client = pki.client_ini("host1")
    with running_stpd(pki.layout, level=2) as stpd:
        status = ["--ini-dir", str(client.ini_dir), "status", "--server", stpd.address]
        crl_module.revoke(pki.ca, str(pki.layout.server_cert), "keyCompromise")
        code, _, err = run_sbc(*status)
        assert code == 0, err  # no CRL beside this client's rootCA.pem
        shutil.copy(pki.layout.crl, client.crl)
        code, out, err = run_sbc(*status)
        assert (code, out) == (1, "")
        assert err == (
            f"sbc: error: server certificate of stpd at {stpd.address} failed verification: "
            f"certificate has been revoked; {client.crl} here revokes it: if that server is to "
            "be trusted again, re-issue it on the backup server with `sm_ssl_cert server "
            "--common-name=<names>` (with --path=DIR for an RDS), install it and send stpd SIGHUP; "
            "else back up elsewhere (SBC_SSL_SERVER_VERIFY=0 skips this check, unsafe)\n"
        )
        assert OPENSSL is not None
        peer = subprocess.run(
            [OPENSSL, "s_client", "-connect", stpd.address, "-CAfile", str(client.ca_cert),
             "-CRL", str(client.crl), "-crl_check", "-verify_return_error",
             "-cert", str(client.client_cert), "-key", str(client.client_key)],
            input="", capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False,
        )  # fmt: skip
        assert peer.returncode != 0 and "certificate revoked" in peer.stdout + peer.stderr

        # A copy past its next update: no certificate passes the check.
        stale = CertificateAuthority.load(pki.layout)
        crl_module.write_crl(stale, days=1, now=datetime.now(UTC) - timedelta(days=2))
        shutil.copy(pki.layout.crl, client.crl)
        code, _, err = run_sbc(*status)
        assert code == 1
        assert (
            f"{client.crl} here is out of date (past its next update: its last update is " in err
        ), err


# -- the same with curl ---------------------------------------------------------------


def curl(client: Layout, *args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    tls = ["--cacert", str(client.ca_cert)]
    tls += ["--cert", str(client.client_cert), "--key", str(client.client_key)]
    return subprocess.run(
        [CURL, "-sS", "--fail-with-body", "--max-time", "20", *tls, *args],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


@pytest.fixture
def small_tar(tmp_path: Path) -> Path:
    archive = tmp_path / "small.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(Path(__file__), "payload.py")
    return archive


@needs_curl
@pytest.mark.parametrize("level", [1, 2])
def test_curl_with_a_revoked_client_certificate(
    pki: Pki, small_tar: Path, capsys: pytest.CaptureFixture[str], level: int
) -> None:
    lost, other = pki.client_ini("curl-lost"), pki.client_ini("curl-other")
    revoke(pki, lost, capsys)
    with running_stpd(pki.layout, level=level) as stpd:
        put = curl(lost, "-T", str(small_tar), f"{stpd.url}/savesets?source=/curl/lost")
        if level == 2:
            assert put.returncode != 0
            assert "alert certificate revoked" in put.stderr, put.stderr
            assert put.stdout == ""
            stpd.log.wait_for(
                rf"^ERROR refused {PEER} \(CN=[^)]+\): {REVOKED} \(STPD_HTTPS_USE_CLIENT_CERT=2\)$"
            )
            assert stpd.daemon.store.all() == []
        else:
            assert put.returncode == 0, put.stderr
            assert json.loads(put.stdout)["owner"] == "anonymous"
            stpd.log.wait_for(
                rf"^WARNING {PEER} \(CN=curl-lost\): invalid client certificate: {REVOKED}; "
            )
        put = curl(other, "-T", str(small_tar), f"{stpd.url}/savesets?source=/curl/other")
        assert put.returncode == 0, put.stderr
        assert json.loads(put.stdout)["owner"] == "CN=curl-other"


# -- the allow-list -------------------------------------------------------------------

ALLOW_LIST = "CN:alice,CN:*.example.test"


def allow_list(pki: Pki) -> None:
    pki.layout.stpd_ini.write_text(
        f"[STPD_Server]\nSTPD_ALLOWED_CLIENTS={ALLOW_LIST}   #who may connect\n"
    )


def test_allow_list_at_level_2(pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]) -> None:
    allow_list(pki)
    alice, host, bob = (
        pki.client_ini("alice"),
        pki.client_ini("host1.example.test"),
        pki.client_ini("bob"),
    )
    with running_stpd(pki.layout, level=2) as stpd:
        assert stpd.daemon.config.allowed_clients == ("CN:alice", "CN:*.example.test")
        for client, name in [(alice, "alice"), (host, "host1.example.test")]:
            code, out, err = backup(client, stpd, source)
            assert code == 0, err
            assert owner_of(stpd, json.loads(out)["saveset"]) == f"CN={name}"
            stpd.log.wait_for(rf"^INFO {PEER} authenticated as CN={re.escape(name)}$")

        code, out, err = backup(bob, stpd, source)
        line = stpd.log.wait_for(rf"^ERROR refused {PEER} \(CN=bob\): ")
        assert line.endswith(
            "client identity CN=bob is not in STPD_ALLOWED_CLIENTS (STPD_HTTPS_USE_CLIENT_CERT=2)"
        ), line
        assert code == 1 and out == ""
        assert one_line(err) == (
            f"sbc: error: backup of {source} refused by stpd at {stpd.address}: client "
            "identity CN=bob is not in STPD_ALLOWED_CLIENTS (STPD_HTTPS_USE_CLIENT_CERT=2)"
        )
        # Nothing of bob's request was stored.
        assert len(stpd.daemon.store.all()) == 2


def test_allow_list_at_level_1_serves_unlisted_clients_as_anonymous(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    allow_list(pki)
    alice, bob = pki.client_ini("alice"), pki.client_ini("bob")
    with running_stpd(pki.layout, level=1) as stpd:
        code, out, err = backup(bob, stpd, source)
        assert code == 0, err
        assert owner_of(stpd, json.loads(out)["saveset"]) == "anonymous"
        line = stpd.log.wait_for(rf"^WARNING {PEER} \(CN=bob\): invalid client certificate: ")
        assert "client identity CN=bob is not in STPD_ALLOWED_CLIENTS; served as anonymous" in line
        code, out, err = backup(alice, stpd, source)
        assert code == 0, err
        assert owner_of(stpd, json.loads(out)["saveset"]) == "CN=alice"


@needs_curl
def test_allow_list_with_curl(pki: Pki, small_tar: Path) -> None:
    allow_list(pki)
    alice, bob = pki.client_ini("alice"), pki.client_ini("bob")
    with running_stpd(pki.layout, level=2) as stpd:
        ok = curl(alice, f"{stpd.url}/savesets")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == []
        refused = curl(bob, f"{stpd.url}/savesets")  # --fail-with-body: exit 22 for an HTTP error
        assert refused.returncode == 22, refused.stderr
        assert "403" in refused.stderr
        assert json.loads(refused.stdout) == {
            "error": "client identity CN=bob is not in STPD_ALLOWED_CLIENTS "
            "(STPD_HTTPS_USE_CLIENT_CERT=2)"
        }
        stpd.log.wait_for(rf"^ERROR refused {PEER} \(CN=bob\): client identity CN=bob is not")


# -- pinning the server ---------------------------------------------------------------


def openssl_fingerprint(cert: Path) -> str:
    """``AB:CD:...`` as the administrator gets it from openssl."""
    done = openssl("x509", "-noout", "-fingerprint", "-sha256", "-in", cert)
    assert done.returncode == 0, done.stderr
    match = re.fullmatch(r"(?i)sha256 Fingerprint=([0-9A-F:]{95})\s*", done.stdout)
    assert match, done.stdout
    return match.group(1)


def pinned_client(pki: Pki, name: str, fingerprint: str) -> Layout:
    return pki.client_ini(name, extra_ini=f"SBC_SERVER_FINGERPRINT={fingerprint}  #pin\n")


@needs_openssl
def test_pinned_server_fingerprint_accepted_and_refused(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    right = openssl_fingerprint(pki.layout.server_cert)
    wrong = openssl_fingerprint(pki.layout.ca_cert)  # signed by the CA, but not the server's
    good = pinned_client(pki, "pin-good", right)
    lower = pinned_client(pki, "pin-lower", right.replace(":", "").lower())
    bad = pinned_client(pki, "pin-bad", wrong)
    with running_stpd(pki.layout, level=2) as stpd:
        for client in (good, lower):
            code, _out, err = backup(client, stpd, source)
            assert code == 0, err
        code, out, err = backup(bad, stpd, source)
        assert code != 0 and out == ""
        line = one_line(err)
        assert line.startswith(f"sbc: error: stpd at {stpd.address} presented certificate ")
        # Both in the form openssl prints, the one the pin is given in.
        assert (
            f"presented certificate {right}, not the pinned SBC_SERVER_FINGERPRINT {wrong}:" in line
        )
        assert line.endswith(
            "the pin applies to every server sbc talks to, one given with --server too (an RDS "
            "has its own certificate: use an sm.ini without the pin for it, with --ini-dir)"
        )
        assert not stpd.log.matching(r"stored saveset .*CN=pin-bad")
        assert len(stpd.daemon.store.all()) == 2


@needs_openssl
def test_renewed_server_certificate_is_served_by_a_new_stpd(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`renew server` keeps the names, so unpinned clients go on verifying; a
    pin of the old certificate now refuses it, the new fingerprint works."""
    old_pin = openssl_fingerprint(pki.layout.server_cert)
    plain, pinned = pki.client_ini("plain"), pinned_client(pki, "pinned", old_pin)
    assert sm_ssl_cert(["--ini-dir", str(pki.layout.ini_dir), "renew", "server"]) == 0
    out = capsys.readouterr().out
    new_pin = openssl_fingerprint(pki.layout.server_cert)
    assert new_pin != old_pin
    assert f"SBC_SERVER_FINGERPRINT={new_pin}" in out
    with running_stpd(pki.layout, level=2) as stpd:
        code, _out, err = backup(plain, stpd, source)
        assert code == 0, err
        code, _out, err = backup(pinned, stpd, source)
        assert code != 0
        assert f"presented certificate {new_pin}, not the pinned" in one_line(err)
        repinned = pinned_client(pki, "repinned", new_pin)
        code, _out, err = backup(repinned, stpd, source)
        assert code == 0, err


def test_an_older_crl_or_none_does_not_let_a_revoked_client_back_in(
    pki: Pki, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A changed ca/crl.pem is read at the next connection. An older copy
    (a lower CRL number) put back by mistake, or the file removed, used to
    be taken as it was: a client revoked since was served again."""
    first, second = pki.client_ini("first-lost"), pki.client_ini("second-lost")
    revoke(pki, first, capsys)
    older = pki.layout.crl.read_bytes()  # number 1: first only
    with running_stpd(pki.layout, level=2) as stpd:
        revoke(pki, second, capsys)  # number 2: both
        assert backup(second, stpd, source)[0] == 1

        pki.layout.crl.write_bytes(older)
        assert backup(second, stpd, source)[0] == 1
        stpd.log.wait_for(
            rf"^ERROR new CRL refused, the previous one stays in force: "
            rf"{re.escape(str(pki.layout.crl))} has CRL number 1, lower than the 2 in force: "
            r"an older copy, "
        )

        pki.layout.crl.unlink()
        assert backup(second, stpd, source)[0] == 1
        stpd.log.wait_for(
            rf"^ERROR new CRL refused, the previous one stays in force: "
            rf"{re.escape(str(pki.layout.crl))} is gone, and without it the certificates it "
            r"revokes would be served: copy crl\.pem back"
        )
        stpd.log.wait_for_count(rf"^ERROR refused {PEER} \(CN=second-lost\): {REVOKED}", 3)

        # SIGHUP's reload reads the CRL too.
        pki.layout.crl.write_bytes(older)
        stpd.reload()
        stpd.log.wait_for(
            r"^ERROR reload refused, the running configuration stays in force: .* has CRL "
            r"number 1, lower than the 2 in force"
        )
        assert backup(second, stpd, source)[0] == 1

        # A new CA (ca --force, everything re-issued) starts its CRLs at 1: that
        # reload is no older copy of the same CA's.
        fresh = CertificateAuthority.create(pki.layout, force=True)
        fresh.issue_server("localhost,127.0.0.1")
        crl_module.write_crl(fresh)
        mark = len(stpd.log.lines)
        stpd.reload()
        stpd.log.wait_for(r"^INFO reloaded .*stpd\.ini and certificates")
        assert not [line for line in stpd.log.lines[mark:] if "reload refused" in line]
        assert stpd.daemon._crl_in_force is not None
        assert crl_module.crl_number(stpd.daemon._crl_in_force) == 1
