"""What ``openssl s_client`` can and cannot negotiate with stpd: nothing
below TLS 1.2, forward-secret AEAD suites only, no compression, no
renegotiation. After each attempt the daemon still serves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pki.layout import Layout
from tests.conftest import Pki, RunningStpd, running_stpd
from tests.test_hostile_common import (
    assert_serves,
    hpki,  # noqa: F401  (fixture)
)

PEER = r"127\.0\.0\.1:\d+"
STRONG = r"ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)"


def s_client(
    stpd: RunningStpd, client: Layout, *options: str, stdin: bytes = b""
) -> tuple[int, str]:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", stpd.address, "-CAfile", str(client.ca_cert),
         "-cert", str(client.client_cert), "-key", str(client.client_key), *options],
        input=stdin, capture_output=True, timeout=30,
    )  # fmt: skip
    return result.returncode, result.stdout.decode() + result.stderr.decode()


def negotiated(output: str) -> tuple[str, str]:
    """(protocol, cipher) from s_client's "New, TLSv1.2, Cipher is X" line;
    ("(NONE)", "(NONE)") when nothing was agreed."""
    found = re.search(r"^New, (\S+), Cipher is (\S+)$", output, re.M)
    assert found, output
    return found.group(1), found.group(2)


@pytest.fixture
def served(hpki: Pki, tmp_path: Path):  # type: ignore[no-untyped-def]  # noqa: F811
    client = hpki.client_ini("tls")
    with running_stpd(hpki.layout, 2) as stpd:
        yield stpd, client
        assert not stpd.log.matching(r"internal error")
        assert_serves(stpd, client, tmp_path)


@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_below_tls_1_2_is_refused(served, version: str) -> None:  # type: ignore[no-untyped-def]
    stpd, client = served
    # SECLEVEL=0: our s_client would otherwise refuse to offer the old version itself.
    code, out = s_client(stpd, client, version, "-cipher", "DEFAULT@SECLEVEL=0")
    assert code != 0
    assert "alert protocol version" in out, out
    assert negotiated(out) == ("(NONE)", "(NONE)")  # nothing agreed
    stpd.log.wait_for(rf"^WARNING TLS handshake with {PEER} failed: unsupported protocol$")


def test_tls_1_2_with_a_strong_suite_is_accepted(served) -> None:  # type: ignore[no-untyped-def]
    stpd, client = served
    code, out = s_client(stpd, client, "-tls1_2", "-cipher", "ECDHE+AESGCM")
    assert code == 0, out
    protocol, cipher = negotiated(out)
    assert protocol == "TLSv1.2" and re.fullmatch(STRONG, cipher), (protocol, cipher)
    assert "Compression: NONE" in out
    stpd.log.wait_for(rf"^INFO client {PEER} authenticated as CN=tls$")


def test_default_negotiation_is_tls_1_3_without_compression(served) -> None:  # type: ignore[no-untyped-def]
    stpd, client = served
    code, out = s_client(stpd, client)
    assert code == 0, out
    assert negotiated(out)[0] == "TLSv1.3"
    assert "Compression: NONE" in out


@pytest.mark.parametrize(
    "cipher",
    [
        "AES128-SHA",  # no forward secrecy, CBC
        "AES256-GCM-SHA384",  # AEAD, but no forward secrecy (RSA key exchange)
        "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA",  # forward secrecy, but CBC
        "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256",
        "DHE-RSA-AES128-GCM-SHA256",
    ],
)
def test_weak_tls_1_2_suites_are_refused(served, cipher: str) -> None:  # type: ignore[no-untyped-def]
    stpd, client = served
    code, out = s_client(stpd, client, "-tls1_2", "-cipher", cipher)
    assert code != 0
    assert "alert handshake failure" in out, out
    assert negotiated(out) == ("(NONE)", "(NONE)")
    stpd.log.wait_for(rf"^WARNING TLS handshake with {PEER} failed: no shared cipher$")


@pytest.mark.parametrize("legacy", [False, True])
def test_renegotiation_is_refused(served, legacy: bool) -> None:  # type: ignore[no-untyped-def]
    stpd, client = served
    options = ["-tls1_2", "-legacy_renegotiation"] if legacy else ["-tls1_2"]
    code, out = s_client(stpd, client, *options, stdin=b"R\n")
    assert "RENEGOTIATING" in out, out  # the client asked...
    assert code != 0
    assert "no renegotiation" in out, out  # ...and stpd said no
    stpd.log.wait_for(rf"^INFO connection with {PEER} ended: TLS error: ")


def test_plain_http_with_curl_gets_the_hint(served) -> None:  # type: ignore[no-untyped-def]
    stpd, _ = served
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", f"http://{stpd.address}/status"],
        capture_output=True,
        text=True,
    )
    assert "use https://" in result.stdout, (result.stdout, result.stderr)
