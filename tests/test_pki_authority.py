"""pki.authority: what the CA and its profiles put into certificates, and its files."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from pki import authority
from pki.authority import (
    CA_VALIDITY_DAYS,
    LEAF_VALIDITY_DAYS,
    RSA_KEY_SIZE,
    CertificateAuthority,
    move_old_server_keys,
    parse_subject_options,
)
from pki.errors import PkiError
from pki.layout import Layout
from tests.conftest import tree


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


# -- the root CA -------------------------------------------------------------------


def test_ca_profile(ca: CertificateAuthority, layout: Layout) -> None:
    cert = ca.cert
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == "CN=SEP sesam root CA"
    cert.verify_directly_issued_by(cert)
    assert cert.serial_number > 0
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca and constraints.value.path_length == 0
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = extension(cert, x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    now = datetime.now(UTC)
    # Backdated for clock skew, valid for at least ten years.
    assert now - timedelta(hours=1) < cert.not_valid_before_utc < now - timedelta(minutes=1)
    assert cert.not_valid_after_utc - now > timedelta(days=3650)
    assert CA_VALIDITY_DAYS >= 3650
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca.cert_pem == layout.ca_cert.read_bytes()


def test_ca_files_and_modes(ca: CertificateAuthority, layout: Layout) -> None:
    assert mode(layout.ini_dir) == 0o700
    assert mode(layout.ca_dir) == 0o700
    assert mode(layout.ca_key) == 0o600
    assert mode(layout.ca_cert) == 0o644
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    assert key.public_key() == ca.cert.public_key()
    assert sorted(tree(layout.ini_dir)) == ["ca/rootCA.key", "ca/rootCA.pem"]


def test_ca_is_never_replaced_silently(ca: CertificateAuthority, layout: Layout) -> None:
    before = tree(layout.ini_dir)
    with pytest.raises(PkiError) as info:
        CertificateAuthority.create(layout)
    assert "already exists" in str(info.value)
    assert "ca --force" in str(info.value)
    assert tree(layout.ini_dir) == before


def test_a_lone_ca_key_also_blocks_create(layout: Layout) -> None:
    layout.ca_dir.mkdir(parents=True)
    layout.ca_key.write_bytes(b"precious")
    with pytest.raises(PkiError, match="already exists"):
        CertificateAuthority.create(layout)
    assert tree(layout.ini_dir) == {"ca/rootCA.key": b"precious"}


def test_force_moves_the_old_ca_aside(ca: CertificateAuthority, layout: Layout) -> None:
    old = tree(layout.ini_dir)
    new = CertificateAuthority.create(layout, force=True)
    assert new.cert != ca.cert
    assert len(new.moved_aside) == 2
    for path in new.moved_aside:
        assert ".old-" in path.name
        assert path.read_bytes() == old[str(path.relative_to(layout.ini_dir)).split(".old-")[0]]
    assert mode(next(p for p in new.moved_aside if p.name.startswith("rootCA.key"))) == 0o600


def test_rsa_ca_and_custom_validity(layout: Layout) -> None:
    ca = CertificateAuthority.create(layout, key_type="rsa", days=4000, common_name="Test CA")
    public = ca.cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == RSA_KEY_SIZE
    lifetime = ca.cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=3999) < lifetime <= timedelta(days=4000)
    assert ca.cert.subject.rfc4514_string() == "CN=Test CA"


def test_load_round_trip(ca: CertificateAuthority, layout: Layout) -> None:
    loaded = CertificateAuthority.load(layout)
    assert loaded.cert == ca.cert


def test_load_without_ca_names_file_and_command(layout: Layout) -> None:
    with pytest.raises(PkiError) as info:
        CertificateAuthority.load(layout)
    assert str(info.value) == (
        f"no root CA at {layout.ca_cert}: create it with "
        f"`sm_ssl_cert --ini-dir {layout.ini_dir} ca`"
    )
    assert not layout.ini_dir.exists()


def test_load_without_key_explains_where_it_went(ca: CertificateAuthority, layout: Layout) -> None:
    layout.ca_key.unlink()
    with pytest.raises(PkiError, match=r"no root CA key at .*rootCA\.key.*copy rootCA\.key back"):
        CertificateAuthority.load(layout)


def test_load_rejects_a_key_of_another_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.create(Layout(tmp_path / "other"))
    other.layout.ca_key.write_bytes(ca.layout.ca_key.read_bytes())
    with pytest.raises(PkiError, match="does not belong to"):
        CertificateAuthority.load(other.layout)


def test_load_rejects_garbage_and_non_ca(ca: CertificateAuthority, layout: Layout) -> None:
    issued = ca.issue_server("myserver")
    layout.ca_cert.write_bytes(b"not a certificate")
    with pytest.raises(PkiError, match="is not a PEM certificate"):
        CertificateAuthority.load(layout)
    layout.ca_cert.write_bytes(issued.cert_path.read_bytes())
    layout.ca_key.write_bytes(issued.key_path.read_bytes())
    with pytest.raises(PkiError, match="is not a CA certificate"):
        CertificateAuthority.load(layout)
    layout.ca_key.write_bytes(b"garbage")
    with pytest.raises(PkiError, match="cannot read the root CA key"):
        CertificateAuthority.load(layout)


# -- server certificates -----------------------------------------------------------


def check_leaf(cert: x509.Certificate, ca: CertificateAuthority, usage: ObjectIdentifier) -> None:
    cert.verify_directly_issued_by(ca.cert)
    assert cert.serial_number > 0
    constraints = extension(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert extension(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([usage])
    key_usage = extension(cert, x509.KeyUsage)
    assert key_usage.critical and key_usage.value.digital_signature
    assert not key_usage.value.key_cert_sign
    aki = extension(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == extension(ca.cert, x509.SubjectKeyIdentifier).value.digest
    ski = extension(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def test_server_profile(ca: CertificateAuthority, layout: Layout) -> None:
    issued = ca.issue_server("myserver,myserver.domain.com,192.168.1.10,*.d.example,192.168.1.*")
    cert = issued.cert
    check_leaf(cert, ca, ExtendedKeyUsageOID.SERVER_AUTH)
    assert cert.subject.rfc4514_string() == "CN=myserver"
    assert issued.names == [
        "myserver",
        "myserver.domain.com",
        "192.168.1.10",
        "*.d.example",
        "192.168.1.*",
    ]
    assert not extension(cert, x509.KeyUsage).value.key_encipherment  # not for EC keys
    assert issued.cert_path == layout.server_cert
    assert issued.key_path == layout.server_key
    assert mode(layout.server_dir) == 0o700
    assert mode(layout.server_key) == 0o600
    assert mode(layout.server_cert) == 0o644
    assert cert == x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    key = serialization.load_pem_private_key(layout.server_key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert issued.serial == cert.serial_number
    assert issued.not_after == cert.not_valid_after_utc
    lifetime = issued.not_after - datetime.now(UTC)
    assert timedelta(days=LEAF_VALIDITY_DAYS - 1) < lifetime <= timedelta(days=LEAF_VALIDITY_DAYS)


def test_server_for_an_rds_with_rsa(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue_server(["rds1", "10.0.0.5"], out_dir=tmp_path / "rds", key_type="rsa")
    assert issued.cert_path == tmp_path / "rds" / "server.pem"
    assert issued.key_path == tmp_path / "rds" / "server.key"
    public = issued.cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == RSA_KEY_SIZE
    # TLS 1.2 RSA key exchange needs it on an RSA server key.
    assert extension(issued.cert, x509.KeyUsage).value.key_encipherment
    assert not ca.layout.server_dir.exists()


def test_reissuing_moves_the_old_pair_aside(ca: CertificateAuthority, layout: Layout) -> None:
    first = ca.issue_server("one")
    old = tree(layout.server_dir)
    second = ca.issue_server("two")
    assert sorted(p.name.split(".old-")[0] for p in second.moved_aside) == [
        "server.key",
        "server.pem",
    ]
    for path in second.moved_aside:
        assert path.read_bytes() == old[path.name.split(".old-")[0]]
    assert first.cert != second.cert


@pytest.mark.parametrize("names", ["foo.*.com", "300.1.1.1", "a,,b", "a b", ""])
def test_bad_server_names_leave_no_files(
    ca: CertificateAuthority, layout: Layout, names: str
) -> None:
    before = tree(layout.ini_dir)
    with pytest.raises(PkiError):
        ca.issue_server(names)
    assert tree(layout.ini_dir) == before
    assert not layout.server_dir.exists()


def test_a_first_name_too_long_for_the_cn(ca: CertificateAuthority) -> None:
    long_name = ("a" * 60 + ".") * 2 + "example"
    with pytest.raises(PkiError, match="too long to be the common name"):
        ca.issue_server(long_name)
    assert long_name in ca.issue_server(["short", long_name]).names


def test_failed_certificate_write_removes_the_key_and_restores_the_old_pair(
    ca: CertificateAuthority, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca.issue_server("old")
    before = tree(layout.ini_dir)

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(authority, "write_public", disk_full)
    with pytest.raises(OSError, match="No space"):
        ca.issue_server("new")
    assert tree(layout.ini_dir) == before


def test_invalid_days_and_key_type_leave_no_files(ca: CertificateAuthority, layout: Layout) -> None:
    before = tree(layout.ini_dir)
    with pytest.raises(PkiError, match="--days must be a whole number >= 1"):
        ca.issue_server("a", days=0)
    with pytest.raises(PkiError, match="unknown key type 'dsa': use one of ec, rsa"):
        ca.issue_client("CN:a", key_type="dsa")
    assert tree(layout.ini_dir) == before


def test_not_before_makes_expired_and_future_certificates(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    expired = ca.issue_client("CN:old", not_before=now - timedelta(days=10), days=1)
    assert expired.not_after == (now - timedelta(days=9)).replace(microsecond=0)
    future = ca.issue_server("later", not_before=now + timedelta(days=2), days=1)
    assert future.cert.not_valid_before_utc > now


def test_an_expired_ca_issues_nothing(ca: CertificateAuthority, layout: Layout) -> None:
    past = datetime.now(UTC) - timedelta(days=30)
    expired_cert = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(ca.cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past)
        .not_valid_after(past + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca._key, hashes.SHA256())
    )
    layout.ca_cert.write_bytes(expired_cert.public_bytes(serialization.Encoding.PEM))
    expired_ca = CertificateAuthority.load(layout)
    with pytest.raises(PkiError, match=r"expired on .*ca --force"):
        expired_ca.issue_server("a")
    assert not layout.server_dir.exists()


# -- client certificates -----------------------------------------------------------


def test_client_profile_with_all_fourteen_subject_keys(ca: CertificateAuthority) -> None:
    issued = ca.issue_client(
        "C:de,CN:host1,DQ:q1,GN:Ada,GQ:III,I:AL,L:Berlin,N:Ada L,O:Acme AG,"
        "OU:Backup,OU:Ops,P:ada,PC:10115,S:Lovelace,T:Dr"
    )
    check_leaf(issued.cert, ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    assert [(a.oid, a.value) for a in issued.cert.subject] == [
        (NameOID.COUNTRY_NAME, "DE"),
        (NameOID.COMMON_NAME, "host1"),
        (NameOID.DN_QUALIFIER, "q1"),
        (NameOID.GIVEN_NAME, "Ada"),
        (NameOID.GENERATION_QUALIFIER, "III"),
        (NameOID.INITIALS, "AL"),
        (NameOID.LOCALITY_NAME, "Berlin"),
        (ObjectIdentifier("2.5.4.41"), "Ada L"),
        (NameOID.ORGANIZATION_NAME, "Acme AG"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Backup"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"),
        (NameOID.PSEUDONYM, "ada"),
        (NameOID.POSTAL_CODE, "10115"),
        (NameOID.SURNAME, "Lovelace"),
        (NameOID.TITLE, "Dr"),
    ]
    assert issued.cert_path == ca.layout.client_cert
    assert mode(ca.layout.client_dir) == 0o700
    assert mode(ca.layout.client_key) == 0o600
    assert issued.names == []


def test_client_default_subject_is_the_host_name(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(authority.socket, "gethostname", lambda: "backup-client-7")
    issued = ca.issue_client()
    assert issued.subject == "CN=backup-client-7"


def test_a_host_name_too_long_for_the_cn_asks_for_oid(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(authority.socket, "gethostname", lambda: "h" * 70)
    with pytest.raises(PkiError, match="give the subject with --oid=CN:<name>"):
        ca.issue_client()
    assert not ca.layout.client_dir.exists()


def test_client_subject_as_dict_and_rsa(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue_client({"CN": "c", "o": "Org"}, out_dir=tmp_path / "c", key_type="rsa")
    assert issued.subject == "CN=c, O=Org"
    assert issued.key_path == tmp_path / "c" / "client.key"
    assert not extension(issued.cert, x509.KeyUsage).value.key_encipherment


def test_parse_subject_options_is_lenient_about_case_and_outer_spaces() -> None:
    name = parse_subject_options("cn: my host ,o:Acme")
    assert name.rfc4514_string() == "O=Acme,CN=my host"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("X:1", "unknown --oid key 'X': use one of C, CN, DQ, GN, GQ, I, L, N, O, OU, P, PC, S, T"),
        ("CN:a,E:mail@x", "unknown --oid key 'E'"),
        ("CN:", "--oid key CN has an empty value: write CN:<value>"),
        ("CN:  ", "--oid key CN has an empty value"),
        ("CN", "--oid item 'CN' has no colon: write KEY:VALUE"),
        ("CN:a,,O:b", "has an empty item (position 2)"),
        ("CN:a,", "has an empty item (position 2)"),
        (",CN:a", "has an empty item (position 1)"),
        ("", "--oid is empty"),
        ("C:DEU", "--oid C:DEU is not a country code: use two letters"),
        ("C:1", "is not a country code"),
        ("C:d1", "is not a country code"),
        ("CN:a,CN:b", "--oid key CN is given twice"),
        ("DQ:a_b", "--oid DQ: value 'a_b' has characters a dnQualifier cannot hold"),
        ("CN:" + "x" * 65, "--oid CN: value 'xxx"),
    ],
)
def test_parse_subject_options_rejects(text: str, message: str) -> None:
    with pytest.raises(PkiError) as info:
        parse_subject_options(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# -- cleaning up ssl/ --------------------------------------------------------------


def test_move_old_server_keys(layout: Layout) -> None:
    assert move_old_server_keys(layout) == []
    layout.server_dir.mkdir(parents=True)
    for name in ("server.key", "server.pem", "selfsigned.key", "notes.txt"):
        (layout.server_dir / name).write_text(name)
    moved = move_old_server_keys(layout)
    assert sorted(p.name.split(".old-")[0] for p in moved) == [
        "selfsigned.key",
        "server.key",
        "server.pem",
    ]
    assert all(p.read_text() == p.name.split(".old-")[0] for p in moved)
    assert sorted(p.name for p in layout.server_dir.iterdir() if ".old-" not in p.name) == [
        "notes.txt"
    ]
    assert move_old_server_keys(layout) == []  # what was moved aside stays aside
