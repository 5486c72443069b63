"""STPD_ALLOWED_CLIENTS matches every --oid field name, and a client it
refuses after the handshake is told so in one line, every time, by a 403
that stpd sends without reading the request (SPEC: at level 2 no byte of a
refused client's request is processed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pki.authority import CertificateAuthority
from pki.layout import Layout
from sbc.cli import main as sbc
from stpd.protocol import identity_allowed
from tests.conftest import LOOPBACK, Pki, running_stpd
from tests.test_hostile_common import read_answer, tcp_connect, tls_context


@pytest.mark.parametrize(
    "allowed, expected",
    [
        (("S:smi*",), True),
        (("T:ADMIN",), True),
        (("GN:Alice", "CN:nobody"), True),
        (("DQ:q1",), True),
        (("PC:12345",), True),
        (("GN:bob",), False),
        (("O:alice",), False),  # no O in the subject
        (("CN:alice*",), True),
    ],
)
def test_allow_list_uses_the_oid_key_names(
    tmp_path: Path, allowed: tuple[str, ...], expected: bool
) -> None:
    ca = CertificateAuthority.create(Layout(tmp_path))
    cert = ca.issue_client(
        "CN:alice,S:Smith,GN:Alice,T:Admin,DQ:q1,PC:12345", out_dir=tmp_path / "c"
    ).cert
    assert identity_allowed(cert, allowed) is expected


def test_unlisted_client_gets_one_clear_line(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "f"
    source.write_text("x")
    bob = pki.client_ini("bob")
    with running_stpd(pki.layout, level=2, allowed_clients=("CN:alice",)) as stpd:
        # The start line says that a list is in force, and which.
        stpd.log.wait_for(
            r"listening on .*, client certificate level 2 \(validated, invalid ones refused\), "
            r"only clients of STPD_ALLOWED_CLIENTS=CN:alice, data in "
        )
        for attempt in range(5):  # the refusal races the request: it must read the same each time
            code = sbc(
                ["--ini-dir", str(bob.ini_dir), "backup", str(source), "--server", stpd.address]
            )
            err = capsys.readouterr().err
            assert code == 1, attempt
            assert err == (
                f"sbc: error: backup of {source} refused by stpd at {stpd.address}: client "
                "identity CN=bob is not in STPD_ALLOWED_CLIENTS (STPD_HTTPS_USE_CLIENT_CERT=2)\n"
            )
        stpd.log.wait_for(r"ERROR refused client .*CN=bob.*not in STPD_ALLOWED_CLIENTS")
        assert not list(stpd.daemon.store.root.glob("SS-*"))


def test_a_list_at_level_0_is_said_not_to_apply(pki: Pki) -> None:
    """At level 0 no certificate is asked for, so the list cannot apply: the
    start line named none, and an administrator who set one took it for
    in force."""
    with running_stpd(pki.layout, level=0, allowed_clients=("CN:alice",)) as stpd:
        stpd.log.wait_for(
            r"listening on .*, client certificate level 0 \(client certificates not "
            r"requested\), STPD_ALLOWED_CLIENTS=CN:alice not applied \(it needs level 1 or "
            r"2\), data in "
        )


@pytest.mark.parametrize("sent", [b"", b"NOT HTTP AT ALL\r\n\r\n"])
def test_unlisted_client_is_answered_without_reading_its_request(pki: Pki, sent: bytes) -> None:
    """The 403 comes with nothing sent, and is the same for bytes that are
    not HTTP: stpd parsed none of them (it would have answered 400). Then
    it closes cleanly: close_notify, not a bare EOF."""
    bob = pki.client_ini("bob")
    with running_stpd(pki.layout, level=2, allowed_clients=("CN:alice",)) as stpd:
        ctx = tls_context(pki, bob)
        raw = tcp_connect(stpd)
        with ctx.wrap_socket(raw, server_hostname=LOOPBACK, suppress_ragged_eofs=False) as sock:
            sock.sendall(sent)
            answer = read_answer(sock)
            assert answer is not None and answer.status == 403, answer
            assert answer.headers["connection"] == "close"
            assert answer.json() == {
                "error": "client identity CN=bob is not in STPD_ALLOWED_CLIENTS "
                "(STPD_HTTPS_USE_CLIENT_CERT=2)"
            }
            assert sock.recv(1) == b""  # a bare EOF raises SSLEOFError here
        stpd.log.wait_for(r"ERROR refused client .*CN=bob.*not in STPD_ALLOWED_CLIENTS")
        assert not stpd.log.matching(r"bad request")
