"""Certificates outside their validity period, and wrong clocks: what stpd,
sbc and sm_ssl_cert say, and what they keep in force. The certificates are
re-signed by the test CA with chosen dates (no faked clock)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pki import crl as crl_module
from pki.authority import CertificateAuthority
from pki.cli import main as sm_ssl_cert
from pki.crl import write_crl
from pki.layout import Layout
from stpd.cli import status as stpd_status
from stpd.config import load_config as load_stpd_config
from tests.conftest import LOOPBACK, Pki, run_sbc, running_stpd

NOW = datetime.now(UTC)
PAST = NOW - timedelta(days=10)
FUTURE = NOW + timedelta(days=10)


def redated(cert_path: Path, layout: Layout, not_before: datetime, not_after: datetime) -> None:
    """``cert_path`` re-signed by the CA of ``layout`` with these dates, all
    else kept (its key still matches): the CA itself, too."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    signed = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_path.write_bytes(signed.public_bytes(serialization.Encoding.PEM))


def stamp(moment: datetime) -> str:
    return re.escape(f"{moment:%Y-%m-%d %H:%M}")


def utc(moment: datetime) -> str:
    return f"{stamp(moment)} UTC"


def sbc_status(client: Layout, address: str) -> tuple[int, str, str]:
    return run_sbc("--ini-dir", str(client.ini_dir), "status", "--server", address)


def status_refused(pki: Pki, client: Layout, level: int) -> str:
    """`sbc status` of ``client`` against stpd at ``level``: it fails; what it said."""
    with running_stpd(pki.layout, level=level) as stpd:
        code, _, err = sbc_status(client, stpd.address)
    assert code == 1, err
    return err


# -- stpd: its own certificates ----------------------------------------------------


def test_a_reload_refuses_a_server_certificate_out_of_its_dates(pki: Pki) -> None:
    """A reload replaced a working server certificate by an expired one (or
    one not yet valid, said nothing at all), and every verifying client was
    refused; the log said only "expires in -2 days"."""
    client = pki.client_ini("client1")
    cert = pki.layout.server_cert
    in_force = cert.read_bytes()
    with running_stpd(pki.layout, level=2) as stpd:
        stpd.log.wait_for(r"listening on")
        for not_before, not_after, problem in (
            (PAST, NOW - timedelta(days=2), rf"expired on {utc(NOW - timedelta(days=2))}"),
            (
                FUTURE,
                FUTURE + timedelta(days=90),
                rf"not valid before {utc(FUTURE)} \(check this machine's clock and the clock "
                r"where it was issued\)",
            ),
        ):
            cert.write_bytes(in_force)
            redated(cert, pki.layout, not_before, not_after)
            mark = len(stpd.log.lines)
            stpd.reload()
            stpd.log.wait_for(
                r"^ERROR reload refused, the running configuration stays in force: "
                rf"{re.escape(str(cert))} {problem}: clients that verify the server would "
                r"refuse it; put a valid one in its place and send SIGHUP again \(a restart "
                r"would take this one\)$"
            )
            assert not [line for line in stpd.log.lines[mark:] if "reloaded" in line]
            code, _, err = sbc_status(client, stpd.address)  # the pair in force serves
            assert code == 0, err


def test_stpd_starts_with_an_expired_server_certificate_and_says_so(pki: Pki) -> None:
    """Level 0 clients may not verify the server: stpd serves them, with an
    ERROR (it logged a WARNING that it "expires in -9 days")."""
    redated(pki.layout.server_cert, pki.layout, PAST, NOW - timedelta(days=9))
    client = pki.client_ini("client0", client_auth=0, server_verify=0)
    with running_stpd(pki.layout, level=0) as stpd:
        stpd.log.wait_for(
            r"^ERROR server certificate CN=localhost expired on "
            rf"{utc(NOW - timedelta(days=9))}: clients that verify the server "
            r"\(SBC_SSL_SERVER_VERIFY=1\) refuse it; renew it with `sm_ssl_cert --ini-dir "
            rf"{re.escape(str(pki.layout.ini_dir))} renew server` and send stpd SIGHUP$"
        )
        assert not stpd.log.matching(r"expires in")
        code, _, err = sbc_status(client, stpd.address)
        assert code == 0, err


def test_a_root_ca_not_yet_valid_is_an_error_at_start(pki: Pki) -> None:
    redated(pki.layout.ca_cert, pki.layout, FUTURE, FUTURE + timedelta(days=3650))
    with running_stpd(pki.layout, level=1) as stpd:
        stpd.log.wait_for(
            rf"^ERROR root CA CN=SEP sesam root CA not valid before {utc(FUTURE)} \(check this "
            r"machine's clock and the clock where it was issued\): every certificate it signed "
            r"fails validation, this server's and the clients'; create a new one"
        )


# -- sbc: a level-1 stpd serves an out-of-date client certificate as anonymous -----

ANONYMOUS_WARNING = (
    r"sbc: WARNING: stpd at \S+ did not accept our client certificate: our client "
    r"certificate {what} \({detail}\); it serves this client as anonymous "
    r"\(STPD_HTTPS_USE_CLIENT_CERT=1\): it lists and restores the savesets of every client "
    r"without a valid certificate instead of this client's, and stores its backups where each "
    r"of them can restore them; "
)


def test_every_command_warns_when_level_1_takes_us_for_anonymous(pki: Pki, tmp_path: Path) -> None:
    """Only a backup warned: `sbc list` showed anonymous's savesets as ours,
    exit 0, and `sbc restore` of our own saveset said only that there was
    "no saveset ... for this client"."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "file").write_text("ours\n")
    client = pki.client_ini("client1")
    anonymous = pki.client_ini("nobody", cert="none", client_auth=0)
    ini = str(client.ini_dir)
    with running_stpd(pki.layout, level=1) as stpd:
        code, out, err = run_sbc(
            "--ini-dir", ini, "--server", stpd.address, "backup", "--json", str(tmp_path / "src")
        )
        assert code == 0, err
        ours = json.loads(out)["saveset"]
        code, _, err = run_sbc(
            "--ini-dir",
            str(anonymous.ini_dir),
            "--server",
            stpd.address,
            "backup",
            str(tmp_path / "src"),
        )
        assert code == 0, err
        for not_before, not_after, what, detail in (
            (
                PAST,
                NOW - timedelta(days=2),
                "has expired",
                f"expired on {utc(NOW - timedelta(days=2))}",
            ),
            (
                FUTURE,
                FUTURE + timedelta(days=90),
                "is not yet valid",
                f"is valid only from {utc(FUTURE)}",
            ),
        ):
            redated(client.client_cert, pki.layout, not_before, not_after)
            warning = ANONYMOUS_WARNING.format(
                what=what, detail=rf"{re.escape(str(client.client_cert))} {detail}"
            )
            for command in ("list", "status"):
                code, _, err = run_sbc("--ini-dir", ini, "--server", stpd.address, command)
                assert code == 0, err
                assert re.search(warning, err), err
            code, _, err = run_sbc(
                "--ini-dir", ini, "--server", stpd.address, "restore", ours, str(tmp_path / "to")
            )
            assert code == 1
            assert re.search(warning, err), err
            assert (
                f"sbc: error: restore of {ours} refused by stpd at {stpd.address}: no saveset "
                f"{ours} for this client (stpd did not accept our client certificate, so it took "
                "this client for anonymous: see the warning above)"
            ) in err, err
        # A backup says it once, not twice.
        code, _, err = run_sbc(
            "--ini-dir", ini, "--server", stpd.address, "backup", str(tmp_path / "src")
        )
        assert code == 0, err
        assert err.count("anonymous") == 1 and re.search(warning, err), err


def test_level_1_says_why_when_only_stpd_can_see_it(pki: Pki, tmp_path: Path) -> None:
    """A certificate in date, of our CA, but revoked in stpd's CRL or not in
    its STPD_ALLOWED_CLIENTS: sbc cannot see that here, and acted as
    anonymous without a word (`sbc list`: no savesets, exit 0). stpd says
    why in a header of every answer, and sbc warns with its words."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "file").write_text("ours\n")
    client = pki.client_ini("client1")
    ini = str(client.ini_dir)
    warning = (
        r"sbc: WARNING: stpd at \S+ did not accept our client certificate: {}; it serves this "
        r"client as anonymous \(STPD_HTTPS_USE_CLIENT_CERT=1\): .*; ask its administrator for "
        r"a new client certificate, or to allow this one$"
    )
    with running_stpd(pki.layout, level=1, allowed_clients=("CN:other",)) as stpd:
        for command in ("list", "status"):
            code, _, err = run_sbc("--ini-dir", ini, "--server", stpd.address, command)
            assert code == 0, err
            why = r"client identity CN=client1 is not in STPD_ALLOWED_CLIENTS"
            assert re.search(warning.format(why), err, re.MULTILINE), err
    with running_stpd(pki.layout, level=1) as stpd:
        code, out, err = run_sbc(
            "--ini-dir", ini, "--server", stpd.address, "backup", "--json", str(tmp_path / "src")
        )
        assert code == 0 and err == "", err  # accepted: no warning
        ours = json.loads(out)["saveset"]
        crl_module.revoke(pki.ca, str(client.client_cert))  # read at the next connection
        code, _, err = run_sbc(
            "--ini-dir", ini, "--server", stpd.address, "restore", ours, str(tmp_path / "to")
        )
        assert code == 1
        assert re.search(warning.format("certificate has been revoked"), err, re.MULTILINE), err
        assert "so it took this client for anonymous: see the warning above" in err, err
        # A backup says it once.
        code, _, err = run_sbc(
            "--ini-dir", ini, "--server", stpd.address, "backup", str(tmp_path / "src")
        )
        assert code == 0, err
        assert err.count("anonymous") == 1, err


def test_level_2_refuses_without_the_anonymous_warning(pki: Pki) -> None:
    client = pki.client_ini("client1", cert="expired")
    with running_stpd(pki.layout, level=2) as stpd:
        code, _, err = sbc_status(client, stpd.address)
    assert code == 1
    assert "our client certificate has expired" in err and "anonymous" not in err, err


# -- sbc: a server chain or CRL out of its dates, most often a wrong clock ---------


def future_crl(layout: Layout, crl_path: Path) -> None:
    """A CRL of the CA of ``layout`` written (by its lastUpdate) in the future."""
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), None)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(FUTURE)
        .next_update(FUTURE + timedelta(days=30))
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


CLOCKS = (
    r", and this machine's clock says \d{4}-\d\d-\d\d \d\d:\d\d UTC: check the clocks of this "
    r"machine and of the server; if both are right, "
)


def test_sbc_says_the_server_certificate_dates_and_its_clock(pki: Pki) -> None:
    """sbc told the administrator to re-issue a server certificate that was
    fine when its own clock was wrong, and to restart stpd."""
    redated(pki.layout.server_cert, pki.layout, PAST, NOW - timedelta(days=2))
    err = status_refused(pki, pki.client_ini("client1", client_auth=0), level=0)
    assert re.search(
        r"failed verification: certificate has expired; the server certificate CN=localhost is valid from "
        rf"{stamp(PAST)} to {utc(NOW - timedelta(days=2))}{CLOCKS}re-issue it on the backup "
        r"server with `sm_ssl_cert server --common-name=<names>` \(with --path=DIR for an "
        r"RDS\), install it and send stpd SIGHUP \(SBC_SSL_SERVER_VERIFY=0",
        err,
    ), err


def test_sbc_says_a_root_ca_is_not_yet_valid_rather_than_blame_the_server(pki: Pki) -> None:
    client = pki.client_ini("client1", client_auth=0)
    redated(client.ca_cert, pki.layout, FUTURE, FUTURE + timedelta(days=3650))
    err = status_refused(pki, client, level=0)
    assert re.search(
        r"failed verification: certificate is not yet valid \(chain depth 1: SEP sesam root "
        rf"CA\); the root CA CN=SEP sesam root CA is valid from {stamp(FUTURE)} to "
        rf"{utc(FUTURE + timedelta(days=3650))}{CLOCKS}the root CA must be made anew",
        err,
    ), err
    assert "re-issue it" not in err


def test_a_crl_from_the_future_is_called_so(pki: Pki) -> None:
    """sbc said such a CRL was "out of date (past its next update)", and
    stpd put it in force with "CRL ... changed: reloaded" only."""
    client = pki.client_ini("client1")
    future_crl(pki.layout, client.crl)
    with running_stpd(pki.layout, level=1) as stpd:
        code, _, err = sbc_status(client, stpd.address)
        assert code == 1
        assert re.search(
            rf"failed verification: CRL is not yet valid; {re.escape(str(client.crl))} here is "
            rf"not yet valid: its last update is {utc(FUTURE)}, its next "
            rf"{utc(FUTURE + timedelta(days=30))}, and this machine's clock says .* UTC: check "
            r"the clocks of this machine and of the CA machine, where `sm_ssl_cert crl` wrote it",
            err,
        ), err
        assert "out of date" not in err

        future_crl(pki.layout, pki.layout.crl)  # read at the next connection
        run_sbc("--ini-dir", str(client.ini_dir), "status", "--server", stpd.address)
        stpd.log.wait_for(
            rf"^ERROR CRL {re.escape(str(pki.layout.crl))} is not valid before {utc(FUTURE)} "
            r"\(check this machine's clock and the clock where `sm_ssl_cert crl` wrote it\): "
            r"every client certificate fails validation until then, so every client is served "
            r"as anonymous$"
        )


# -- sm_ssl_cert: issuing under a root CA not yet valid ------------------------------


def test_issuing_under_a_root_ca_not_yet_valid_is_warned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CA made while the clock ran ahead issued, without a word, what
    every peer refuses as "not yet valid"."""
    layout = Layout(tmp_path / "ini")
    CertificateAuthority.create(layout)
    redated(layout.ca_cert, layout, FUTURE, FUTURE + timedelta(days=3650))
    capsys.readouterr()
    argv = ["--ini-dir", str(layout.ini_dir), "client", "--oid", "CN:host1"]
    assert sm_ssl_cert([*argv, "--path", str(tmp_path / "host1")]) == 0
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"sm_ssl_cert: warning: the root CA {re.escape(str(layout.ca_cert))} is valid only "
        rf"from {utc(FUTURE)}, and this machine's clock says \d{{4}}-\d\d-\d\d \d\d:\d\d UTC "
        r"\(check this machine's clock and the clock where it was issued\): what it signs "
        r'fails verification \("certificate is not yet valid"\) until then\n',
        err,
    ), err


# -- stpd status: the server's own CRL out of date ------------------------------------


def test_stpd_status_reports_its_own_crl_out_of_date(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stpd status` pins the daemon's certificate, yet checked it against
    the same out-of-date CRL, and so failed with "server certificate ...
    failed verification: CRL has expired; ... copy the current ca/crl.pem
    from the backup server" (this is the backup server) instead of showing
    what stpd reports."""
    (pki.layout.ini_dir / "stpd.ini").write_text("[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT=1\n")
    written = write_crl(pki.ca, days=1, now=NOW - timedelta(days=2))
    with running_stpd(pki.layout, level=1) as stpd:
        config = load_stpd_config(pki.layout, listen=(LOOPBACK, stpd.port))
        capsys.readouterr()
        assert stpd_status(pki.layout, config, as_json=False) == 1
        out, err = capsys.readouterr()
    next_update = f"{written.next_update:%Y-%m-%dT%H:%M:%SZ}"
    assert f", CRL out of date since {next_update}, " in out, out
    assert err == (
        f"stpd: error: stpd at {stpd.address} has a CRL out of date since {next_update}: every "
        "client certificate fails validation there; write a new one with `sm_ssl_cert crl` "
        "where the CA key is and copy it into its ca/\n"
    )


# -- days counted in words -------------------------------------------------------------


def test_half_a_day_left_is_said_in_words_by_stpd_and_sbc(pki: Pki) -> None:
    """Counted with %d: "expires in 0 days" at start and in `sbc status`,
    "(0 days left)" at a reload."""
    redated(pki.layout.server_cert, pki.layout, PAST, NOW + timedelta(hours=12))
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        stpd.log.wait_for(r"^WARNING server certificate CN=localhost expires in less than a day \(")
        stpd.reload()
        stpd.log.wait_for(
            r"^INFO reloaded .* server certificate CN=localhost \(expires in less than a day\)"
        )
        code, out, err = sbc_status(client, stpd.address)
    assert code == 0, err
    assert "certificate CN=localhost expires in less than a day, " in out, out
    assert "0 days" not in out
