"""`sm_ssl_cert revoke` and `sm_ssl_cert crl`: the inventory, the signed CRL
ca/crl.pem as cryptography and openssl read it, and the one-line errors."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki import crl as crl_module
from pki.authority import CertificateAuthority, IssuedCert, format_serial
from pki.cli import main
from pki.errors import PkiError
from pki.inventory import Inventory
from pki.layout import Layout
from tests.conftest import needs_openssl, openssl, tree


@pytest.fixture
def clients(ca: CertificateAuthority, layout: Layout) -> tuple[IssuedCert, IssuedCert]:
    """alice in x.509/, bob in a directory of its own."""
    return (
        ca.issue_client("CN:alice"),
        ca.issue_client("CN:bob", out_dir=layout.ini_dir.parent / "bob"),
    )


def run(capsys: pytest.CaptureFixture[str], layout: Layout, *argv: str) -> str:
    code = main(["--ini-dir", str(layout.ini_dir), *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""
    return out


def fails(capsys: pytest.CaptureFixture[str], layout: Layout, *argv: str) -> str:
    """Exit status 2, one error line, and no file changed."""
    before = tree(layout.ini_dir)
    assert main(["--ini-dir", str(layout.ini_dir), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sm_ssl_cert: error: ")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert tree(layout.ini_dir) == before
    return err


def load_crl(layout: Layout) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(layout.crl.read_bytes())


# -- revoke ------------------------------------------------------------------------


def test_revoke_by_serial_marks_it_and_writes_a_signed_crl(
    ca: CertificateAuthority,
    layout: Layout,
    clients: tuple[IssuedCert, IssuedCert],
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, bob = clients
    serial = format_serial(bob.serial)
    out = run(capsys, layout, "revoke", serial, "--reason", "keyCompromise")
    assert f"revoked serial {serial} (client CN=bob, {bob.cert_path}): keyCompromise" in out
    assert f"wrote CRL {layout.crl}: number 1, 1 revoked certificate, next update " in out
    # stpd reads a changed CRL at the next connection (see test_lifecycle_stpd).
    assert (
        "copy crl.pem into ca/ of every STPD (the backup server and each RDS), where it "
        "takes effect at the next connection;" in out
    )

    entry = Inventory.read(layout).find(bob.serial)
    assert entry is not None
    assert entry.status == "revoked"
    assert entry.revocation_reason == "keyCompromise"
    assert entry.revoked_at is not None
    assert Inventory.read(layout).find(alice.serial).status == "valid"  # type: ignore[union-attr]

    crl = load_crl(layout)
    assert stat.S_IMODE(layout.crl.stat().st_mode) == 0o644
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.cert.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    now = datetime.now(UTC)
    assert crl.last_update_utc <= now
    assert crl.next_update_utc is not None
    expected_next = now + timedelta(days=crl_module.CRL_VALIDITY_DAYS)
    assert abs(crl.next_update_utc - expected_next) < timedelta(minutes=1)
    [revoked] = list(crl)
    assert revoked.serial_number == bob.serial
    reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(alice.serial) is None


def test_revoke_by_file_reasons_and_crl_numbers(
    ca: CertificateAuthority,
    layout: Layout,
    clients: tuple[IssuedCert, IssuedCert],
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, bob = clients
    run(capsys, layout, "revoke", str(alice.cert_path))  # default reason: unspecified
    run(capsys, layout, "revoke", str(bob.cert_path), "--reason", "cessationofoperation")
    crl = load_crl(layout)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    entries = {item.serial_number: item for item in crl}
    assert set(entries) == {alice.serial, bob.serial}
    # RFC 5280 5.3.1: "unspecified" is expressed by leaving the reason code out.
    with pytest.raises(x509.ExtensionNotFound):
        entries[alice.serial].extensions.get_extension_for_class(x509.CRLReason)
    bob_reason = entries[bob.serial].extensions.get_extension_for_class(x509.CRLReason)
    assert bob_reason.value.reason == x509.ReasonFlags.cessation_of_operation
    inventory = Inventory.read(layout)
    assert inventory.find(bob.serial).revocation_reason == "cessationOfOperation"  # type: ignore[union-attr]
    assert inventory.crl_number == 2


def test_revoking_twice_keeps_the_first_date_and_reason(
    layout: Layout, clients: tuple[IssuedCert, IssuedCert], capsys: pytest.CaptureFixture[str]
) -> None:
    _alice, bob = clients
    run(capsys, layout, "revoke", format_serial(bob.serial), "--reason", "superseded")
    first = Inventory.read(layout).find(bob.serial)
    out = run(capsys, layout, "revoke", str(bob.cert_path), "--reason", "keyCompromise")
    assert "was already revoked on" in out and "(superseded)" in out
    again = Inventory.read(layout).find(bob.serial)
    assert again == first
    assert [item.serial_number for item in load_crl(layout)] == [bob.serial]


def test_a_certificate_from_before_the_inventory_is_revoked_by_file(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    old = ca.issue_client("CN:legacy", out_dir=layout.ini_dir.parent / "legacy")
    layout.inventory.unlink()  # as if issued by a version without the inventory
    err = fails(capsys, layout, "revoke", format_serial(old.serial))
    assert "for a certificate issued before the inventory existed, pass its file" in err
    run(capsys, layout, "revoke", str(old.cert_path))
    entry = Inventory.read(layout).find(old.serial)
    assert entry is not None and entry.status == "revoked" and entry.subject == "CN=legacy"
    assert [item.serial_number for item in load_crl(layout)] == [old.serial]


def test_crl_rewrites_on_demand_with_a_new_number_and_next_update(
    ca: CertificateAuthority,
    layout: Layout,
    clients: tuple[IssuedCert, IssuedCert],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run(capsys, layout, "crl")  # no revocation yet: an empty, valid CRL
    assert f"wrote CRL {layout.crl}: number 1, 0 revoked certificates" in out
    assert list(load_crl(layout)) == []
    _alice, bob = clients
    crl_module.revoke(ca, str(bob.cert_path))
    out = run(capsys, layout, "crl", "--days", "90")
    assert "number 3, 1 revoked certificate," in out
    crl = load_crl(layout)
    assert [item.serial_number for item in crl] == [bob.serial]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - datetime.now(UTC) > timedelta(days=89)


def test_revoke_and_crl_need_the_ca_key(
    layout: Layout, clients: tuple[IssuedCert, IssuedCert], capsys: pytest.CaptureFixture[str]
) -> None:
    layout.ca_key.unlink()
    for argv in (["revoke", str(clients[1].cert_path)], ["crl"]):
        err = fails(capsys, layout, *argv)
        assert f"no root CA key at {layout.ca_key}" in err


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("7A3F00", "no certificate with serial 7A3F00 in "),
        ("nonsense", "'nonsense' is neither a certificate file nor a serial number in hex"),
        ("{tmp}/missing.pem", "no such certificate file {tmp}/missing.pem"),
        ("{tmp}/notes.txt", "{tmp}/notes.txt is not a certificate (neither PEM nor DER)"),
        ("{tmp}/other/x.509/client.pem", "was not issued by this CA (its issuer is CN=Other CA;"),
        ("{ini}/ca/rootCA.pem", "is the root CA itself: a CA cannot revoke itself"),
        # Of the same name (the default) but another key: said so, not "CN=X; this CA is CN=X".
        (
            "{tmp}/twin/x.509/client.pem",
            "was not issued by this CA (its issuer is named CN=SEP sesam root CA as this CA is, "
            "but another key signed it: a CA made anew (ca --force) or on another machine, not "
            "the one in {ini}/ca/rootCA.pem)",
        ),
    ],
)
def test_revoke_errors_are_one_line_and_change_nothing(
    ca: CertificateAuthority,
    layout: Layout,
    clients: tuple[IssuedCert, IssuedCert],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    target: str,
    message: str,
) -> None:
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    other = CertificateAuthority.create(Layout(tmp_path / "other"), common_name="Other CA")
    other.issue_client("CN:alice")
    CertificateAuthority.create(Layout(tmp_path / "twin")).issue_client("CN:alice")
    crl_module.write_crl(ca)
    values = {"tmp": str(tmp_path), "ini": str(layout.ini_dir)}
    err = fails(capsys, layout, "revoke", target.format(**values))
    assert message.format(**values) in err


def test_a_relative_file_is_looked_for_in_the_current_directory_and_said_so(
    layout: Layout,
    clients: tuple[IssuedCert, IssuedCert],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's `revoke x.509/client.pem`, run outside the ini directory,
    said only "no such certificate file x.509/client.pem": it names where it
    looked, why there, and the file in the ini directory when it is there."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    where = (
        f"in {elsewhere} (a relative path is taken from the current directory, not from the "
        "ini directory)"
    )
    err = fails(capsys, layout, "revoke", "x.509/client.pem")
    assert err == (
        f"sm_ssl_cert: error: no such certificate file x.509/client.pem {where}: "
        f"{layout.client_cert} is there, pass that\n"
    )
    err = fails(capsys, layout, "revoke", "bob/client.pem")
    assert err == f"sm_ssl_cert: error: no such certificate file bob/client.pem {where}\n"


def test_the_ca_serial_and_unknown_reasons_are_refused(
    ca: CertificateAuthority,
    layout: Layout,
    clients: tuple[IssuedCert, IssuedCert],
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = fails(capsys, layout, "revoke", format_serial(ca.cert.serial_number))
    assert "is the root CA itself" in err
    err = fails(capsys, layout, "revoke", str(clients[1].cert_path), "--reason", "lost")
    assert "unknown revocation reason 'lost': use one of unspecified, keyCompromise," in err
    assert "certificateHold" not in err and "removeFromCRL" not in err
    with pytest.raises(PkiError, match="unknown revocation reason"):
        crl_module.revoke(ca, str(clients[1].cert_path), "removeFromCRL")


def test_crl_round_trips_through_our_own_reader(
    ca: CertificateAuthority, clients: tuple[IssuedCert, IssuedCert], layout: Layout
) -> None:
    crl_module.revoke(ca, str(clients[0].cert_path), "affiliationChanged")
    state = crl_module.read_crl(layout)
    assert state is not None
    assert state.number == 1
    assert state.revoked_serials == {clients[0].serial}
    layout.crl.write_text("garbage")
    with pytest.raises(PkiError, match=r"CRL .*crl\.pem is unreadable"):
        crl_module.read_crl(layout)


# -- openssl -------------------------------------------------------------------------


@needs_openssl
def test_openssl_accepts_the_crl_and_rejects_the_revoked_certificate(
    ca: CertificateAuthority,
    layout: Layout,
    clients: tuple[IssuedCert, IssuedCert],
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, bob = clients
    run(capsys, layout, "revoke", str(bob.cert_path), "--reason", "keyCompromise")

    done = openssl("crl", "-in", layout.crl, "-noout", "-verify", "-CAfile", layout.ca_cert)
    assert done.returncode == 0, done.stderr
    assert "verify OK" in done.stdout + done.stderr

    text = openssl("crl", "-in", layout.crl, "-noout", "-text").stdout
    assert "X509v3 CRL Number" in text
    assert "X509v3 Authority Key Identifier" in text
    assert f"Serial Number: {format_serial(bob.serial)}" in text
    assert "Key Compromise" in text

    check = ["verify", "-crl_check", "-CRLfile", layout.crl, "-CAfile", layout.ca_cert]
    rejected = openssl(*check, bob.cert_path)
    assert rejected.returncode != 0
    assert "certificate revoked" in rejected.stdout + rejected.stderr
    accepted = openssl(*check, alice.cert_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert accepted.stdout.strip() == f"{alice.cert_path}: OK"


@needs_openssl
def test_openssl_rejects_a_crl_of_another_ca(
    ca: CertificateAuthority, layout: Layout, tmp_path: Path
) -> None:
    crl_module.write_crl(ca)
    other = CertificateAuthority.create(Layout(tmp_path / "other"), common_name="Other CA")
    done = openssl("crl", "-in", layout.crl, "-noout", "-verify", "-CAfile", other.layout.ca_cert)
    assert "verify OK" not in done.stdout + done.stderr


def test_the_crl_pem_is_a_single_pem_block(ca: CertificateAuthority, layout: Layout) -> None:
    written = crl_module.write_crl(ca)
    data = layout.crl.read_bytes()
    assert data.startswith(b"-----BEGIN X509 CRL-----\n")
    assert data.count(b"-----BEGIN") == 1
    crl = x509.load_pem_x509_crl(data)
    assert crl.public_bytes(serialization.Encoding.PEM) == data
    assert written.path == layout.crl and written.number == 1 and written.revoked == 0


@needs_openssl
def test_an_inventory_begun_anew_does_not_bring_revoked_certificates_back(
    capsys: pytest.CaptureFixture[str],
    layout: Layout,
    clients: tuple[IssuedCert, IssuedCert],
) -> None:
    """A damaged inventory is to be moved aside (its error says so), and
    sm_ssl_cert begins a new one: the next CRL was written from that alone,
    empty and numbered 1, so a certificate revoked for keyCompromise
    passed again (openssl verify -crl_check said OK), and stpd took the
    lower number. What the previous CRL revoked stays revoked, and the
    numbers go on rising."""
    alice, bob = clients
    run(capsys, layout, "revoke", format_serial(bob.serial), "--reason", "keyCompromise")
    run(capsys, layout, "crl")  # number 2
    layout.inventory.rename(layout.inventory.with_name("inventory.json.damaged"))

    code = main(["--ini-dir", str(layout.ini_dir), "crl"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "wrote CRL " in out and ": number 3, 1 revoked certificate, " in out
    assert err == (
        "sm_ssl_cert: warning: 1 of them only the previous CRL listed, not the inventory "
        f"{layout.inventory} (it was begun anew?): they stay revoked\n"
    )
    crl = load_crl(layout)
    revoked = crl.get_revoked_certificate_by_serial_number(bob.serial)
    assert revoked is not None
    reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    check = ["verify", "-crl_check", "-CRLfile", layout.crl, "-CAfile", layout.ca_cert]
    assert openssl(*check, bob.cert_path).returncode != 0
    assert openssl(*check, alice.cert_path).returncode == 0
