"""What we issue, judged by a real peer: the openssl command line tool.

``openssl verify`` checks the chains, ``openssl x509 -text`` shows what is in
them, and ``openssl s_server``/``s_client`` shake hands with mutual TLS.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pki.authority import CertificateAuthority, IssuedCert
from pki.layout import Layout
from tests.conftest import OPENSSL, needs_openssl, openssl

pytestmark = needs_openssl

# Generous: only reached when openssl misbehaves; never a synchronisation sleep.
PROCESS_TIMEOUT = 20.0
SERVER_NAMES = "localhost,127.0.0.1,*.example.test,192.168.1.*,::1"
HTTP_REQUEST = "GET / HTTP/1.0\r\n\r\n"  # s_server -www answers it, then closes
CLIENT_SUBJECT = "C:DE,CN:client1,O:Acme AG,OU:Backup,L:Berlin,N:Ada,T:Dr,S:Lovelace"


@dataclass(frozen=True)
class Pki:
    layout: Layout
    server: IssuedCert
    client: IssuedCert
    rsa_server: IssuedCert
    rsa_client: IssuedCert
    expired_client: IssuedCert
    foreign_client: IssuedCert  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("openssl")
    layout = Layout(root / "ini")
    ca = CertificateAuthority.create(layout)
    other = CertificateAuthority.create(Layout(root / "other"))
    now = datetime.now(UTC)
    return Pki(
        layout=layout,
        server=ca.issue_server(SERVER_NAMES),
        client=ca.issue_client(CLIENT_SUBJECT),
        rsa_server=ca.issue_server("localhost", out_dir=root / "rsa", key_type="rsa"),
        rsa_client=ca.issue_client("CN:rsa", out_dir=root / "rsa", key_type="rsa"),
        expired_client=ca.issue_client(
            "CN:expired", out_dir=root / "expired", not_before=now - timedelta(days=10), days=1
        ),
        foreign_client=other.issue_client("CN:client1"),
    )


# -- openssl verify ------------------------------------------------------------------


def test_openssl_verify_accepts_what_we_issue(pki: Pki) -> None:
    ca = pki.layout.ca_cert
    for issued, purpose in [
        (pki.server, "sslserver"),
        (pki.rsa_server, "sslserver"),
        (pki.client, "sslclient"),
        (pki.rsa_client, "sslclient"),
    ]:
        done = openssl("verify", "-CAfile", ca, "-purpose", purpose, issued.cert_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == f"{issued.cert_path}: OK"


def test_openssl_verify_rejects_the_wrong_ca_purpose_or_time(pki: Pki) -> None:
    ca = pki.layout.ca_cert
    for cert, args, reason in [
        (pki.foreign_client.cert_path, [], "unable to get local issuer certificate"),
        (pki.server.cert_path, ["-purpose", "sslclient"], "certificate purpose"),
        (pki.client.cert_path, ["-purpose", "sslserver"], "certificate purpose"),
        (pki.expired_client.cert_path, [], "certificate has expired"),
    ]:
        done = openssl("verify", "-CAfile", ca, *args, cert)
        assert done.returncode != 0
        assert reason in done.stdout + done.stderr


# -- openssl x509 -text --------------------------------------------------------------


def test_openssl_shows_the_server_names(pki: Pki) -> None:
    text = openssl("x509", "-text", "-noout", "-in", pki.server.cert_path).stdout
    assert "Subject: CN = localhost" in text
    assert (
        "DNS:localhost, IP Address:127.0.0.1, DNS:*.example.test, DNS:192.168.1.*, "
        "IP Address:0:0:0:0:0:0:0:1"
    ) in text
    assert "TLS Web Server Authentication" in text
    assert "CA:FALSE" in text
    assert "Issuer: CN = SEP sesam root CA" in text


def test_openssl_shows_the_client_subject(pki: Pki) -> None:
    text = openssl("x509", "-text", "-noout", "-in", pki.client.cert_path).stdout
    assert (
        "Subject: C = DE, CN = client1, O = Acme AG, OU = Backup, L = Berlin, "
        "name = Ada, title = Dr, SN = Lovelace"
    ) in text
    assert "TLS Web Client Authentication" in text


def test_openssl_shows_the_ca_extensions(pki: Pki) -> None:
    text = openssl("x509", "-text", "-noout", "-in", pki.layout.ca_cert).stdout
    assert "CA:TRUE, pathlen:0" in text
    assert "Certificate Sign, CRL Sign" in text
    assert "X509v3 Subject Key Identifier" in text


# -- a handshake between s_server and s_client ------------------------------------------


@contextlib.contextmanager
def s_server(ca: Path, cert: Path, key: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """openssl s_server requiring a valid client certificate; yields (process, port).

    -www answers one HTTP request, so a client that got "200 ok" was accepted
    by the server; -naccept 1 ends it after that connection.
    """
    assert OPENSSL is not None
    process = subprocess.Popen(
        [OPENSSL, "s_server", "-www", "-accept", "127.0.0.1:0", "-naccept", "1"]
        + ["-Verify", "1", "-verify_return_error", "-CAfile", str(ca)]
        + ["-cert", str(cert), "-key", str(key)],
        # An open stdin: s_server stops at end of input.
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process, _accept_port(process)
    finally:
        process.kill()
        process.communicate()


def _accept_port(process: subprocess.Popen[str]) -> int:
    """Wait for the "ACCEPT 127.0.0.1:PORT" line (the socket is listening then)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in iter(process.stdout.readline, ""):
            lines.put(line)
            if line.startswith("ACCEPT"):
                return
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while True:
        line = lines.get(timeout=PROCESS_TIMEOUT)
        if line is None:
            raise AssertionError("openssl s_server ended before it listened")
        if line.startswith("ACCEPT"):
            return int(line.rsplit(":", 1)[1])


def handshake(
    pki: Pki, client: IssuedCert, server: IssuedCert | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    server = server or pki.server
    ca = pki.layout.ca_cert
    with s_server(ca, server.cert_path, server.key_path) as (_process, port):
        return openssl(
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-quiet",
            "-ign_eof",  # wait for the server's answer (or its alert)
            "-verify_return_error",
            "-CAfile",
            ca,
            "-cert",
            client.cert_path,
            "-key",
            client.key_path,
            *extra,
            stdin=HTTP_REQUEST,
        )


def test_handshake_with_our_certificates(pki: Pki) -> None:
    done = handshake(pki, pki.client, None, "-verify_ip", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    assert "HTTP/1.0 200 ok" in done.stdout


def test_handshake_checks_our_dns_name(pki: Pki) -> None:
    done = handshake(pki, pki.client, None, "-verify_hostname", "localhost")
    assert "HTTP/1.0 200 ok" in done.stdout
    wrong = handshake(pki, pki.client, None, "-verify_hostname", "elsewhere.test")
    assert wrong.returncode != 0
    assert "hostname mismatch" in wrong.stderr


def test_handshake_with_rsa_keys(pki: Pki) -> None:
    done = handshake(pki, pki.rsa_client, pki.rsa_server)
    assert done.returncode == 0, done.stderr
    assert "HTTP/1.0 200 ok" in done.stdout


@pytest.mark.parametrize(
    ("which", "alert"),
    [
        ("foreign_client", "alert unknown ca"),
        ("expired_client", "alert certificate expired"),
        ("server", "alert unsupported certificate"),  # serverAuth only: not a client
    ],
)
def test_handshake_refuses_a_client_certificate(pki: Pki, which: str, alert: str) -> None:
    done = handshake(pki, getattr(pki, which))
    assert done.returncode != 0
    assert "200 ok" not in done.stdout
    assert alert in done.stderr


def test_handshake_needs_a_client_certificate(pki: Pki) -> None:
    ca = pki.layout.ca_cert
    with s_server(ca, pki.server.cert_path, pki.server.key_path) as (_process, port):
        done = openssl(
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-quiet",
            "-ign_eof",
            "-verify_return_error",
            "-CAfile",
            ca,
            stdin=HTTP_REQUEST,
        )
    assert "200 ok" not in done.stdout
    assert done.returncode != 0
