"""SBC_SSL_SERVER_VERIFY: the server certificate's CA, purpose and names,
over loopback with real certificates, and the name forms (``*.domain`` and
``a.b.c.*``) through ``check_server_names`` on real certificates."""

from __future__ import annotations

import http.server
import re
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509

from pki.errors import PkiError
from pki.tls import check_server_names, fingerprint_sha256
from sbc.cli import main as sbc
from tests.conftest import Pki, RunningStpd, make_pki, run_sbc, running_stpd


def sbc_status(client: Pki | Path, server: str) -> tuple[int, str, str]:
    ini = client.layout.ini_dir if isinstance(client, Pki) else client
    return run_sbc("--ini-dir", str(ini), "status", "--server", server)


def one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    return err.rstrip("\n")


def no_request_served(stpd: RunningStpd) -> None:
    assert not stpd.log.matching(r"stored saveset|GET |PUT ")
    assert stpd.daemon.store.all() == []


def test_server_certificate_for_another_name_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = make_pki(tmp_path, server_names="other.example.test")
    client = pki.client_ini("c")
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = sbc_status(client.ini_dir, stpd.address)
        assert code == 1 and out == ""
        assert one_line(err) == (
            f"sbc: error: stpd at {stpd.address} not trusted: server certificate names "
            "other.example.test do not match host 127.0.0.1: connect by one of those names, "
            "or re-issue the server certificate with this name added, where the CA is: "
            "`sm_ssl_cert server --common-name=other.example.test,127.0.0.1` "
            "(with --path=DIR for an RDS)"
        )
        no_request_served(stpd)


def test_server_certificate_from_another_ca_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ours = make_pki(tmp_path / "ours")
    theirs = make_pki(tmp_path / "theirs")
    client = ours.client_ini("c")
    with running_stpd(theirs.layout, level=0) as stpd:
        code, out, err = sbc_status(client.ini_dir, stpd.address)
        line = one_line(err)
        assert code == 1 and out == ""
        assert line.startswith(
            f"sbc: error: server certificate of stpd at {stpd.address} failed verification: "
            "not signed by our root CA; "
        )
        assert f"check that {client.ca_cert} is the root CA" in line
        # stpd says that the client gave up on it, not that it refused the client.
        stpd.log.wait_for(
            r"^WARNING TLS handshake with 127\.0\.0\.1:\d+ failed: the client does not trust "
            r"our server certificate .*\(tlsv1 alert unknown ca\)$"
        )
        no_request_served(stpd)


def test_level_2_server_blames_the_client_not_itself_for_its_alert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A level-2 stpd whose certificate the client rejects must not log
    "refused client": the client refused the server."""
    ours = make_pki(tmp_path / "ours")
    theirs = make_pki(tmp_path / "theirs")
    with running_stpd(theirs.layout, level=2) as stpd:
        code, _, err = sbc_status(ours.client_ini("c").ini_dir, stpd.address)
        assert code == 1
        assert re.search(r"failed verification: .*not (signed by|from) our (root )?CA", err)
        stpd.log.wait_for(r"^WARNING TLS handshake with 127\.0\.0\.1:\d+ failed: the client")
        assert not stpd.log.matching(r"refused client")


def test_client_certificate_as_server_certificate_is_refused(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issued = pki.ca.issue_client("CN:127.0.0.1", out_dir=tmp_path / "not-a-server")
    shutil.copy(issued.cert_path, pki.layout.server_cert)
    shutil.copy(issued.key_path, pki.layout.server_key)
    with running_stpd(pki.layout, level=0) as stpd:
        code, _, err = sbc_status(pki.client_ini("c").ini_dir, stpd.address)
        line = one_line(err)
        assert code == 1
        assert "failed verification: not a server certificate (no serverAuth extended key" in line
        assert "re-issue it on the backup server with `sm_ssl_cert server" in line
        stpd.log.wait_for(r"failed: the client says our certificate is not a server certificate")


def test_expired_server_certificate_is_refused(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime, timedelta

    pki.ca.issue_server("127.0.0.1", not_before=datetime.now(UTC) - timedelta(days=10), days=1)
    with running_stpd(pki.layout, level=0) as stpd:
        code, _, err = sbc_status(pki.client_ini("c").ini_dir, stpd.address)
        line = one_line(err)
        assert code == 1
        assert "failed verification: certificate has expired; the server certificate CN=" in line


# -- not stpd at all ------------------------------------------------------------------


def test_a_port_where_nothing_listens(pki: Pki) -> None:
    with socket.socket() as placeholder:  # a port that was free a moment ago, now closed
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    code, out, err = sbc_status(pki.client_ini("c").ini_dir, f"127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert one_line(err) == (
        f"sbc: error: cannot connect to stpd at 127.0.0.1:{port}: Connection refused; is stpd "
        "running there? (the address comes from --server or SBC_SERVER in sm.ini)"
    )


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Not into the stderr that run_sbc captures."""


@contextmanager
def plain_service(kind: str) -> Iterator[int]:
    """A service on 127.0.0.1 that does not speak TLS: the standard
    library's HTTP server (it answers a ClientHello "400 Bad request"),
    or one that greets with a banner first, as SSH and SMTP servers do."""
    if kind == "http":
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()
        return
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def greet() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                conn.recv(4096)

        thread = threading.Thread(target=greet, daemon=True)
        thread.start()
        yield listener.getsockname()[1]
        thread.join(10)


@pytest.mark.parametrize("kind", ["http", "banner"])
def test_a_service_that_does_not_speak_tls(pki: Pki, kind: str) -> None:
    """Not "stpd refused this client": nothing there is stpd."""
    client = pki.client_ini("c")
    with plain_service(kind) as port:
        code, out, err = sbc_status(client.ini_dir, f"127.0.0.1:{port}")
    assert code == 1 and out == ""
    # OpenSSL's words for it differ between its versions (NOT_TLS_REASONS).
    assert re.fullmatch(
        rf"sbc: error: what answers at 127\.0\.0\.1:{port} does not speak TLS \((wrong version "
        r"number|packet length too long[^)]*)\): another service listens there, not stpd; check "
        r"the port in --server or SBC_SERVER in sm\.ini \(stpd's is STPD_HTTPS_LISTEN in "
        r"stpd\.ini, customarily 11443\)",
        one_line(err),
    ), err


@pytest.mark.parametrize("names", ["other.example.test", "other-ca"])
def test_server_verify_0_proceeds_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], names: str
) -> None:
    ours = make_pki(tmp_path / "ours")
    server = (
        make_pki(tmp_path / "theirs")
        if names == "other-ca"
        else make_pki(tmp_path / "theirs", server_names=names)
    )
    source = tmp_path / "f.txt"
    source.write_text("unverified\n")
    client = ours.client_ini("c", server_verify=0)
    with running_stpd(server.layout, level=0) as stpd:
        code = sbc(
            ["--ini-dir", str(client.ini_dir), "backup", str(source), "--server", stpd.address]
        )
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out.startswith("saveset SS-")
        assert one_line(err) == (
            f"sbc: WARNING: server certificate of {stpd.address} NOT verified "
            "(SBC_SSL_SERVER_VERIFY=0): anyone on the network path could impersonate the server"
        )
        assert len(stpd.daemon.store.all()) == 1


def test_verified_server_gives_no_warning(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = sbc_status(pki.client_ini("c").ini_dir, stpd.address)
    assert code == 0
    assert err == ""
    assert f"stpd 0.1.0 at {stpd.address}: level 2" in out


def test_pinned_fingerprint(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    cert = x509.load_pem_x509_certificate(pki.layout.server_cert.read_bytes())
    right = pki.client_ini(
        "right", extra_ini=f"SBC_SERVER_FINGERPRINT={fingerprint_sha256(cert)}\n"
    )
    wrong = pki.client_ini("wrong", extra_ini="SBC_SERVER_FINGERPRINT=" + "ab" * 32 + "\n")
    with running_stpd(pki.layout, level=2) as stpd:
        assert sbc_status(right.ini_dir, stpd.address)[0] == 0
        code, _, err = sbc_status(wrong.ini_dir, stpd.address)
    assert code == 1
    assert "not the pinned SBC_SERVER_FINGERPRINT " + ":".join(["AB"] * 32) in one_line(err)


# -- IP wildcards over loopback -------------------------------------------------


@pytest.mark.parametrize("names", ["127.0.0.*", "127.0.*", "127.*", "10.0.0.1,127.0.0.*"])
def test_ip_wildcard_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], names: str
) -> None:
    pki = make_pki(tmp_path, server_names=names)
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = sbc_status(pki.client_ini("c").ini_dir, stpd.address)
    assert code == 0, err
    assert err == ""
    assert "level 2" in out


@pytest.mark.parametrize("names", ["127.0.1.*", "127.1.*", "10.*", "128.0.0.*", "*.example.test"])
def test_ip_wildcard_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], names: str
) -> None:
    pki = make_pki(tmp_path, server_names=names)
    with running_stpd(pki.layout, level=2) as stpd:
        code, _, err = sbc_status(pki.client_ini("c").ini_dir, stpd.address)
        no_request_served(stpd)
    assert code == 1
    assert f"server certificate names {names} do not match host 127.0.0.1" in one_line(err)


# -- DNS wildcards ---------------------------------------------------------------


@pytest.fixture
def example_test_resolves_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """``*.example.test`` and ``example.test`` resolve to 127.0.0.1 in this
    process (trio resolves through socket.getaddrinfo), so that sbc really
    connects by a DNS name: SNI, then the name check against that name."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(host, bytes):
            host = host.decode()
        name = host.lower().rstrip(".") if isinstance(host, str) else host
        if isinstance(name, str) and (name == "example.test" or name.endswith(".example.test")):
            host = "127.0.0.1"
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


@pytest.mark.usefixtures("example_test_resolves_to_loopback")
@pytest.mark.parametrize(
    ("host", "accepted"),
    [
        ("stpd.example.test", True),
        ("STPD.Example.Test", True),
        ("backup-1.example.test", True),
        ("example.test", False),  # the wildcard needs one more label
        ("a.stpd.example.test", False),  # and only one
    ],
)
def test_dns_wildcard_over_a_real_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str, accepted: bool
) -> None:
    pki = make_pki(tmp_path, server_names="*.example.test")
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = sbc_status(pki.client_ini("c").ini_dir, f"{host}:{stpd.port}")
        if accepted:
            assert code == 0, err
            assert err == ""
            stpd.log.wait_for(r"^INFO client 127\.0\.0\.1:\d+ authenticated as CN=c$")
        else:
            assert code == 1
            assert one_line(err) == (
                f"sbc: error: stpd at {host}:{stpd.port} not trusted: server certificate names "
                f"*.example.test do not match host {host}: connect by one of those names, or "
                "re-issue the server certificate with this name added, where the CA is: "
                f"`sm_ssl_cert server --common-name=*.example.test,{host}` "
                "(with --path=DIR for an RDS)"
            )
            no_request_served(stpd)


def fetch_server_certificate(stpd: RunningStpd) -> x509.Certificate:
    """The certificate stpd presents in a real handshake (stock TLS client)."""
    pem = ssl.get_server_certificate((stpd.host, stpd.port))
    return x509.load_pem_x509_certificate(pem.encode())


def test_dns_wildcard_on_the_certificate_from_a_handshake(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, server_names="*.example.test,stpd.other.test,127.0.0.*")
    with running_stpd(pki.layout, level=0) as stpd:
        cert = fetch_server_certificate(stpd)
    assert cert == x509.load_pem_x509_certificate(pki.layout.server_cert.read_bytes())
    for host in ["a.example.test", "A.EXAMPLE.TEST", "a.example.test.", "stpd.other.test"]:
        check_server_names(cert, host)
    for host in ["127.0.0.1", "127.0.0.254"]:
        check_server_names(cert, host)
    for host in [
        "example.test",
        "a.b.example.test",
        "aexample.test",
        "a.example.test.evil",
        "other.test",
        "x.stpd.other.test",
        "127.0.1.1",
        "::1",
        "",
    ]:
        with pytest.raises(PkiError, match=r"do not match host"):
            check_server_names(cert, host)


# -- check_server_names on issued certificates, without sockets -----------------


def issued(pki: Pki, names: str) -> x509.Certificate:
    return pki.ca.issue_server(names, out_dir=pki.root / "srv").cert


@pytest.mark.parametrize(
    ("names", "host", "ok"),
    [
        ("*.example.test", "stpd.example.test", True),
        ("*.example.test", "xn--bcher-kva.example.test", True),
        ("*.example.test", "example.test", False),
        ("*.example.test", "a.b.example.test", False),
        ("*.example.test", "-bad.example.test", False),
        ("*.example.test", "127.0.0.1", False),
        ("127.0.0.*", "127.0.0.1", True),
        ("127.0.0.*", "127.0.0.255", True),
        ("127.0.0.*", "127.0.1.1", False),
        ("127.0.0.*", "127.0.0.1.example.test", False),
        ("127.0.0.*", "::ffff:127.0.0.1", False),
        ("10.*", "10.200.3.4", True),
        ("10.*", "100.0.0.1", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.000.000.001", False),
        ("fd00::10", "fd00:0:0::10", True),
        ("fd00::10", "[fd00::10]", True),
        ("fd00::10", "fd00::11", False),
        ("myserver", "MYSERVER", True),
        ("myserver", "myserver.example.test", False),
    ],
)
def test_check_server_names(pki: Pki, names: str, host: str, ok: bool) -> None:
    cert = issued(pki, names)
    if ok:
        check_server_names(cert, host)
    else:
        with pytest.raises(PkiError) as error:
            check_server_names(cert, host)
        assert str(error.value).startswith(f"server certificate names {names} do not match host")
