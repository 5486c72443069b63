"""Names a peer chooses (a certificate's subject, an upload's source) in
stpd's log and in ``stpd list``: a newline in them must not forge a line
of its own, nor an escape sequence reach the administrator's terminal."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.console import as_tar_lists, one_line
from stpd.cli import LOG_FORMAT, OneLineFormatter
from tests.conftest import LOOPBACK, Pki, StpdProcess, write_stpd_ini
from tests.test_hostile_common import hpki, read_answer, small_tar, tls_context  # noqa: F401

# As stpd logs a line
FORGED = "2026-11-28T12:00:00.000Z INFO stpd: client 192.0.2.1:1 authenticated as CN=admin"
SHOWN = re.escape(FORGED)


def forged_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed client certificate (no credential at all) whose subject
    carries a log line of its own (in O: cryptography keeps a CN to 64
    characters, where OpenSSL lets any length pass)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"x\n{FORGED}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "forged.pem", directory / "forged.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize("level", [1, 2])
def test_a_certificate_subject_cannot_forge_a_log_line(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    level: int,
) -> None:
    (hpki.layout.ini_dir / "stpd.ini").write_text(
        f"[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT={level}\n"
    )
    ctx = ssl.create_default_context(cafile=str(hpki.layout.ca_cert))
    ctx.load_cert_chain(*forged_certificate(tmp_path))
    server = StpdProcess(hpki.layout.ini_dir, tmp_path / "data")
    try:
        with ctx.wrap_socket(
            socket.create_connection((LOOPBACK, server.port), timeout=10),
            server_hostname=LOOPBACK,
        ) as sock:
            try:
                sock.recv(1)  # level 2: the refusal arrives here (TLS 1.3)
            except (ssl.SSLError, ConnectionError, TimeoutError):
                pass
        what = "refused client" if level == 2 else "WARNING stpd: client"
        line = server.wait_for(r"not signed by our root CA|self-signed")
        assert re.search(rf"{what} 127\.0\.0\.1:\d+ \(O=x\\n{SHOWN}\): ", line), line
        assert not server.matching(r"^2026-11-28T12:00:00.000Z "), server.log.tail()
    finally:
        server.stop()


def test_an_upload_source_cannot_forge_a_line_of_the_log_or_of_stpd_list(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    write_stpd_ini(hpki.layout.ini_dir)
    data = tmp_path / "data"
    source = f"/a\n{FORGED}\x1b[31mred"
    shown = re.escape(one_line(source))
    assert "\\x1b[31mred" in one_line(source)
    server = StpdProcess(hpki.layout.ini_dir, data)
    try:
        client = hpki.client_ini("sourcer")
        body = small_tar()
        with tls_context(hpki, client).wrap_socket(
            socket.create_connection((LOOPBACK, server.port), timeout=10),
            server_hostname=LOOPBACK,
        ) as sock:
            head = f"PUT /savesets?source={quote(source)} HTTP/1.1\r\nHost: x\r\n"
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            answer = read_answer(sock, "PUT")
        assert answer is not None and answer.status == 201, answer
        assert answer.json()["source"] == source  # type: ignore[index]  # stored as it was given
        line = server.wait_for(r"INFO stpd: stored saveset ")
        assert re.search(rf"\(CN=sourcer\): .*, source {shown}$", line), line
        assert not server.matching(r"^2026-11-28T12:00:00.000Z "), server.log.tail()
    finally:
        server.stop()
    stpd = [str(Path(sys.executable).parent / "stpd"), "--ini-dir", str(hpki.layout.ini_dir)]
    stpd += ["--data-dir", str(data)]
    listing = subprocess.run([*stpd, "list"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert len(lines) == 2, lines  # the saveset, the total
    assert re.fullmatch(rf"SS-\S+  \S+ +\d+  CN=sourcer  {shown}", lines[0]), lines[0]
    assert "\x1b" not in listing.stdout
    deleted = subprocess.run(
        [*stpd, "delete", lines[0].split()[0]], capture_output=True, text=True, timeout=60
    )
    assert deleted.returncode == 0, deleted.stderr
    assert re.fullmatch(rf"deleted saveset .* bytes of {shown}, stored \S+\n", deleted.stdout)


def test_bytes_that_are_not_utf_8_are_escaped_too() -> None:
    """A name's bytes that are not UTF-8 (as Python decodes them: lone
    surrogates) went out raw under the C locale, where 0x9B is a C1
    control to some terminals, and ended the output with a traceback
    under any other."""
    name = os.fsdecode(b"caf\xe9\x9b[31m")
    assert one_line(name) == "caf\\xe9\\x9b[31m"
    assert as_tar_lists(name) == "caf\\351\\233[31m"  # as tar -tv writes it


def test_the_log_format_keeps_a_record_on_one_line_and_its_traceback_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    formatter = OneLineFormatter(LOG_FORMAT)
    try:
        raise ValueError("inside\nthe traceback")
    except ValueError:
        record = logging.LogRecord(
            "stpd", logging.ERROR, __file__, 1, "bad %s", (f"x\n{FORGED}",), sys.exc_info()
        )
    record.created, record.msecs = 1764331200.25, 250  # 12:00:00.25 UTC
    monkeypatch.setenv("TZ", "Europe/Berlin")  # where the local time is 13:00
    time.tzset()
    try:
        text = formatter.format(record)
    finally:
        monkeypatch.undo()
        time.tzset()
    first, *traceback = text.split("\n")
    assert first == f"2025-11-28T12:00:00.250Z ERROR stpd: bad x\\n{FORGED}", first
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-2:] == ["ValueError: inside", "the traceback"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain ünïcode\\x41", "plain ünïcode\\x41"),  # backslashes are left alone
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x00\x1b[2J\x7f", "\\x00\\x1b[2J\\x7f"),
        ("nel\x85csi\x9b", "nel\\x85csi\\x9b"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
    ],
)
def test_one_line_escapes_control_characters(text: str, shown: str) -> None:
    assert one_line(text) == shown
    assert len(one_line(text).splitlines()) == 1
