"""`sm_ssl_cert renew server|client`: same subject and names, a new key unless
--keep-key, the old files moved aside, the old entry superseded."""

from __future__ import annotations

import re
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pki.authority import CertificateAuthority, format_fingerprint, format_name, format_serial
from pki.cli import main
from pki.inventory import Inventory
from pki.layout import Layout
from tests.conftest import needs_openssl, openssl, tree

SERVER_NAMES = "backup.example.test,127.0.0.1,*.example.test,192.168.1.*,::1"
CLIENT_SUBJECT = "C:DE,CN:host1,O:Acme AG,OU:Backup,OU:Ops,T:Dr"


def run(capsys: pytest.CaptureFixture[str], layout: Layout, *argv: str) -> str:
    code = main(["--ini-dir", str(layout.ini_dir), *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def fails(capsys: pytest.CaptureFixture[str], layout: Layout, *argv: str) -> str:
    before = tree(layout.ini_dir.parent)
    assert main(["--ini-dir", str(layout.ini_dir), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sm_ssl_cert: error: ") and err.count("\n") == 1, err
    assert tree(layout.ini_dir.parent) == before
    return err


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def public_der(path: Path) -> bytes:
    return (
        load(path)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def san(cert: x509.Certificate) -> x509.Extension[x509.SubjectAlternativeName]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def aside(directory: Path, name: str) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(name + ".old-"))


def test_renew_server_keeps_subject_and_names_with_a_new_key(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    old = ca.issue_server(SERVER_NAMES, days=10)
    old_pem, old_key = layout.server_cert.read_bytes(), layout.server_key.read_bytes()
    out = run(capsys, layout, "renew", "server")
    new = load(layout.server_cert)
    assert f"renewed server certificate: serial {format_serial(old.serial)} is superseded" in out
    assert f"SBC_SERVER_FINGERPRINT={format_fingerprint(new)}" in out
    # stpd takes a renewed certificate at SIGHUP: no restart (see test_daemon_signals).
    assert "next: send stpd SIGHUP (systemctl reload stpd) so that it presents" in out
    assert "  names:       backup.example.test, 127.0.0.1, *.example.test, 192.168.1.*, ::1" in out
    # Same subject and names (the IP wildcard included), byte for byte.
    assert new.subject == old.cert.subject
    assert san(new) == san(old.cert)
    assert new.serial_number != old.serial
    assert new.not_valid_after_utc - datetime.now(UTC) > timedelta(days=824)
    eku = new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    # A new key; the old pair moved aside, not destroyed.
    assert layout.server_key.read_bytes() != old_key
    assert [p.read_bytes() for p in aside(layout.server_dir, "server.pem")] == [old_pem]
    assert [p.read_bytes() for p in aside(layout.server_dir, "server.key")] == [old_key]
    # The inventory: old superseded (pointing at the new one and the moved file), new valid.
    inventory = Inventory.read(layout)
    before = inventory.find(old.serial)
    after = inventory.find(new.serial_number)
    assert before is not None and after is not None
    assert before.status == "superseded"
    assert before.superseded_by == format_serial(new.serial_number)
    assert before.moved_to == str(aside(layout.server_dir, "server.pem")[0])
    assert after.status == "valid" and after.names == before.names
    assert after.subject == before.subject == "CN=backup.example.test"


def test_renew_client_keep_key_leaves_the_key_file_alone(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    old = ca.issue_client(CLIENT_SUBJECT)
    key_before = layout.client_key.read_bytes()
    out = run(capsys, layout, "renew", "client", "--keep-key", "--days", "30")
    assert f"kept client key:          {layout.client_key} (--keep-key)" in out
    assert "(30 days; --days changes it)" in out
    hint = re.search(r"revoke it with `([^`]+)`", out)
    assert hint, out
    new = load(layout.client_cert)
    assert new.subject == old.cert.subject
    assert format_name(new.subject) == "C=DE, CN=host1, O=Acme AG, OU=Backup, OU=Ops, T=Dr"
    assert layout.client_key.read_bytes() == key_before
    assert aside(layout.client_dir, "client.key") == []
    assert len(aside(layout.client_dir, "client.pem")) == 1
    assert public_der(layout.client_cert) == old.cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert new.not_valid_after_utc - datetime.now(UTC) < timedelta(days=31)
    with pytest.raises(x509.ExtensionNotFound):
        san(new)
    assert Inventory.read(layout).find(old.serial).status == "superseded"  # type: ignore[union-attr]
    # The hint, pasted as printed, revokes the old one in this ini directory.
    command = shlex.split(hint.group(1))
    assert command == [
        "sm_ssl_cert", "--ini-dir", str(layout.ini_dir), "revoke", format_serial(old.serial)
    ]  # fmt: skip
    assert main(command[1:]) == 0, capsys.readouterr().err
    assert Inventory.read(layout).find(old.serial).status == "revoked"  # type: ignore[union-attr]


def test_renew_in_a_path_keeps_the_key_type(
    ca: CertificateAuthority, layout: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rds = tmp_path / "rds1"
    old = ca.issue_server("rds1.example.test", out_dir=rds, key_type="rsa")
    out = run(capsys, layout, "renew", "server", "--path", str(rds))
    assert "RSA 3072 bit" in out
    assert "copy server.pem and server.key into ssl/ of the RDS and send its stpd SIGHUP" in out
    new = load(rds / "server.pem")
    assert isinstance(new.public_key(), rsa.RSAPublicKey)
    assert new.subject == old.cert.subject and san(new) == san(old.cert)
    assert len(aside(rds, "server.pem")) == 1 and len(aside(rds, "server.key")) == 1
    assert not layout.server_dir.exists()  # ssl/ untouched
    run(capsys, layout, "renew", "server", "--path", str(rds), "--key-type", "ec")
    assert isinstance(load(rds / "server.pem").public_key(), ec.EllipticCurvePublicKey)
    statuses = [e.status for e in Inventory.read(layout).entries if e.profile == "server"]
    assert statuses == ["superseded", "superseded", "valid"]


def test_a_revoked_certificate_stays_revoked_when_renewed(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    old = ca.issue_client("CN:host1")
    run(capsys, layout, "revoke", str(layout.client_cert), "--reason", "keyCompromise")
    # Its key is compromised: certifying it again would undo the revocation.
    err = fails(capsys, layout, "renew", "client", "--keep-key")
    assert err == (
        f"sm_ssl_cert: error: {layout.client_cert} was revoked for keyCompromise: its key must "
        "not be certified again; renew without --keep-key (a new key)\n"
    )
    out = run(capsys, layout, "renew", "client")
    # Not "superseded", and not "stays valid until it expires".
    assert f"serial {format_serial(old.serial)} was revoked (keyCompromise)" in out
    assert "the old certificate stays revoked" in out and "stays valid" not in out
    entry = Inventory.read(layout).find(old.serial)
    assert entry is not None and entry.status == "revoked"
    assert entry.superseded_by == format_serial(load(layout.client_cert).serial_number)


@needs_openssl
def test_openssl_verifies_the_renewed_certificates(
    ca: CertificateAuthority, layout: Layout, capsys: pytest.CaptureFixture[str]
) -> None:
    ca.issue_server(SERVER_NAMES)
    ca.issue_client("CN:host1")
    run(capsys, layout, "renew", "server")
    run(capsys, layout, "renew", "client", "--keep-key")
    for path, purpose in [(layout.server_cert, "sslserver"), (layout.client_cert, "sslclient")]:
        done = openssl("verify", "-CAfile", layout.ca_cert, "-purpose", purpose, path)
        assert done.returncode == 0, done.stdout + done.stderr


def test_renew_errors(
    ca: CertificateAuthority, layout: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails(capsys, layout, "renew", "server")
    assert f"no server certificate at {layout.server_cert} to renew" in err
    assert "sm_ssl_cert --ini-dir" in err and "server --common-name=<names>" in err

    # A client certificate where a server one is expected.
    ca.issue_client("CN:host1", out_dir=tmp_path / "odd")
    (tmp_path / "odd" / "client.pem").rename(tmp_path / "odd" / "server.pem")
    (tmp_path / "odd" / "client.key").rename(tmp_path / "odd" / "server.key")
    err = fails(capsys, layout, "renew", "server", "--path", str(tmp_path / "odd"))
    assert "is not a server certificate (no serverAuth extended key usage)" in err

    # A certificate of another CA.
    other = CertificateAuthority.create(Layout(tmp_path / "other"), common_name="Other CA")
    other.issue_client("CN:host1", out_dir=tmp_path / "foreign")
    err = fails(capsys, layout, "renew", "client", "--path", str(tmp_path / "foreign"))
    assert "was not issued by this CA (its issuer is CN=Other CA; this CA is CN=SEP sesam " in err

    # Not a certificate at all.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "client.pem").write_text("junk")
    err = fails(capsys, layout, "renew", "client", "--path", str(tmp_path / "junk"))
    assert "is not a PEM certificate" in err

    ca.issue_client("CN:host1")
    err = fails(capsys, layout, "renew", "client", "--keep-key", "--key-type", "rsa")
    assert "--keep-key keeps the current key and its type: leave out --key-type" in err
    layout.client_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    err = fails(capsys, layout, "renew", "client", "--keep-key")
    assert "is not the key of the certificate beside it" in err
    layout.client_key.unlink()
    err = fails(capsys, layout, "renew", "client", "--keep-key")
    assert f"--keep-key: no key at {layout.client_key}" in err
