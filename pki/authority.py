"""The root certificate authority and the certificates it issues.

Shaped like trustme: one noun (``CertificateAuthority``) that is created or
loaded from an ini directory, one method per leaf profile (``issue_server``,
``issue_client``), and one helper (``_builder``) for the fields every
certificate shares; each profile adds its own extensions with every
``critical=`` flag spelt out.

Everything is built in memory first (key, certificate, encodings); files are
written only at the end, key first, and removed again if writing the
certificate fails, so an error never leaves a key without its certificate.
Existing files are moved aside (``files.move_aside``), never destroyed.
Every issued certificate passes through ``CertificateAuthority._issue``,
which records it in the inventory (``pki.inventory``, ``ca/inventory.json``)
under the inventory lock, in the same all-or-nothing step as the files: a
certificate that replaces an older one at the same path marks the older one
superseded there.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from pki.console import colon_hex, control_character
from pki.errors import PkiError
from pki.files import move_aside, present, write_private, write_public
from pki.inventory import Entry, Inventory, locked, serial_text, timestamp
from pki.inventory import lock as inventory_lock
from pki.layout import Layout
from pki.names import (
    SUBJECT_KEYS,
    certificate_names,
    check_server_names,
    is_ca_certificate,
    parse_server_names,
    san_entries,
    signed_by,
)

# Every certificate dies with the root CA (SPEC.md asks for at least 10 years).
CA_VALIDITY_DAYS = 3650 * 2
# Apple platforms reject TLS server certificates valid for more than 825 days,
# even from a private root; one limit for both leaf profiles keeps it simple.
LEAF_VALIDITY_DAYS = 825
# not_before is set this far in the past, so that a peer whose clock is a
# little behind does not see a brand-new certificate as "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)
# stpd (its certificate and the CA) and `sm_ssl_cert list` warn this long before an expiry.
EXPIRY_WARNING_DAYS = 30
# What to do about a root CA that ends: no certificate outlives it (see
# _builder), so renewing the server certificate does not help.
CA_REPLACEMENT = (
    "create a new one on the CA machine (`sm_ssl_cert ca --force`), re-issue every server "
    "and client certificate from it, and copy its rootCA.pem to every server and client"
)
CA_RENEWAL = f"a root CA is not renewed: before then, {CA_REPLACEMENT}"
# A certificate not yet valid is most often a clock that is wrong, here or
# where it was issued, rather than a certificate that is.
CLOCK_HINT = "check this machine's clock and the clock where it was issued"

KeyType = Literal["ec", "rsa"]
KEY_TYPES: tuple[KeyType, ...] = ("ec", "rsa")
DEFAULT_KEY_TYPE: KeyType = "ec"  # ECDSA P-256: small, fast, accepted everywhere today
RSA_KEY_SIZE = 3072  # for old peers; 3072 bits matches the strength of P-256
DEFAULT_CA_COMMON_NAME = "SEP sesam root CA"
# An encrypted root CA key is as safe as its passphrase: PBKDF2 with 2,048
# rounds (OpenSSL's default, which cryptography uses and cannot raise for
# PKCS#8; README says how to with openssl) slows guessing little.
MIN_PASSPHRASE_LENGTH = 12

Profile = Literal["server", "client"]
PROFILES: tuple[Profile, ...] = ("server", "client")
_PROFILE_USAGE = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
}

# A subject may hold several organisational units; any other key twice is a typo.
_REPEATABLE_KEYS = frozenset({"OU"})
_KEY_BY_OID = {oid: key for key, oid in SUBJECT_KEYS.items()}
# X.680 PrintableString (commas cannot occur: they separate --oid items).
_PRINTABLE_STRING = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]+")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and key that were written, and what was moved aside for them."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    profile: Profile
    moved_aside: tuple[Path, ...] = field(default=())
    # Serial of the certificate this one replaced at cert_path (now superseded),
    # and its revocation reason if it had been revoked (it stays so).
    superseded: str | None = None
    superseded_revoked: str | None = None
    key_written: bool = True  # False: renew --keep-key left the key file as it was

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def subject(self) -> str:
        return format_name(self.cert.subject)

    @property
    def names(self) -> list[str]:
        return certificate_names(self.cert) if self.profile == "server" else []


class CertificateAuthority:
    """The root CA of one ini directory (``ca/rootCA.pem`` and ``ca/rootCA.key``)."""

    def __init__(self, layout: Layout, key: PrivateKey, cert: x509.Certificate) -> None:
        self.layout = layout
        self._key = key
        self._cert = cert
        # Old CA files that create(force=True) moved aside, for the CLI to report.
        self.moved_aside: tuple[Path, ...] = ()

    @property
    def cert(self) -> x509.Certificate:
        return self._cert

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    # -- creating and loading ------------------------------------------------

    @classmethod
    def create(
        cls,
        layout: Layout,
        *,
        days: int = CA_VALIDITY_DAYS,
        key_type: str = DEFAULT_KEY_TYPE,
        force: bool = False,
        common_name: str = DEFAULT_CA_COMMON_NAME,
        passphrase: bytes | None = None,
    ) -> CertificateAuthority:
        """Create a new self-signed root CA and write its key (0600) and certificate.

        Refuses to replace an existing CA unless ``force``: every certificate
        it issued would stop working. With ``force`` the old files are moved
        aside (``ca.moved_aside`` lists them). With ``passphrase`` (at least
        MIN_PASSPHRASE_LENGTH bytes) the key is written encrypted with it,
        as PKCS#8 with PBES2 (PBKDF2-SHA256, AES-256-CBC), which OpenSSL reads.
        """
        existing = [path for path in (layout.ca_cert, layout.ca_key) if path.exists()]
        if existing and not force:
            raise PkiError(
                f"a root CA already exists at {existing[0]}: replacing it invalidates every "
                "certificate it issued; to replace it anyway (the old files are moved aside), "
                f"run {layout.command('ca --force')}"
            )
        _check_days(days)
        if passphrase is not None and len(passphrase) < MIN_PASSPHRASE_LENGTH:
            raise PkiError(
                f"a passphrase of {len(passphrase)} characters is too short to protect the root "
                f"CA key: use at least {MIN_PASSPHRASE_LENGTH} (e.g. `openssl rand -base64 24`)"
            )
        key = _generate_key(key_type)
        name = _name([_attribute(NameOID.COMMON_NAME, common_name, "CA common name")], "CA name")
        cert = (
            _builder(name, name, key.public_key(), days=days, not_before=None)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(layout, key, cert)
        files = [
            (layout.ca_key, _key_pem(key, passphrase), True),
            (layout.ca_cert, ca.cert_pem, False),
        ]
        # The inventory and the CRL belong to the CA that is being replaced.
        stale = [path for path in (layout.inventory, layout.crl) if path.exists()]
        if not stale:
            ca.moved_aside = _install(files)
            return ca
        with inventory_lock(layout):  # the old inventory is moved aside, not read
            moved = _install(files)
            ca.moved_aside = moved + tuple(
                aside for path in stale if (aside := move_aside(path)) is not None
            )
        return ca

    @classmethod
    def load(cls, layout: Layout, passphrase: bytes | None = None) -> CertificateAuthority:
        """Load the CA of ``layout``; both the certificate and the key must be
        there, and ``passphrase`` must be given exactly when the key is
        encrypted."""
        create_hint = f"create it with {layout.command('ca')}"
        if not present(layout.ca_cert, "root CA certificate"):
            raise PkiError(f"no root CA at {layout.ca_cert}: {create_hint}")
        if not present(layout.ca_key, "root CA key"):
            raise PkiError(
                f"no root CA key at {layout.ca_key} (the certificate {layout.ca_cert} is there): "
                "issuing needs the key; copy rootCA.key back from where you keep it, "
                "or run sm_ssl_cert on the machine that holds it"
            )
        try:
            cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
        except ValueError as exc:
            raise PkiError(
                f"{layout.ca_cert} is not a PEM certificate ({exc}): restore it, or "
                f"create a new CA with {layout.command('ca --force')}"
            ) from exc
        key = _load_ca_key(layout.ca_key, passphrase)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise PkiError(
                f"{layout.ca_key} holds a {type(key).__name__}: expected an EC or RSA key"
            )
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            raise PkiError(
                f"{layout.ca_key} does not belong to {layout.ca_cert}: put the matching "
                "pair back in place (moved-aside files end in .old-<date>)"
            )
        if not is_ca_certificate(cert):
            raise PkiError(
                f"{layout.ca_cert} is not a CA certificate: create a CA with "
                + layout.command("ca --force")
            )
        return cls(layout, key, cert)

    # -- the inventory and the CRL ----------------------------------------------

    @contextlib.contextmanager
    def inventory(self) -> Iterator[Inventory]:
        """The inventory under its lock (see ``pki.inventory.locked``), with
        this CA itself recorded in it."""
        with locked(self.layout) as inventory:
            if inventory.find(self._cert.serial_number) is None:
                inventory.add(inventory_entry(self._cert, "ca", self.layout.ca_cert))
            yield inventory

    def issued(self, cert: x509.Certificate) -> bool:
        """True when ``cert`` is a certificate this CA signed (the CA's own included)."""
        return signed_by(cert, self._cert)

    def whose(self, cert: x509.Certificate) -> str:
        """Why ``cert``, which this CA did not issue, is another CA's: in
        words that do not contradict themselves when both CAs have the same
        name, as every CA sm_ssl_cert makes does by default."""
        ours = format_name(self._cert.subject)
        if cert.issuer == self._cert.subject:
            return (
                f"its issuer is named {ours} as this CA is, but another key signed it: a CA "
                f"made anew (ca --force) or on another machine, not the one in {self.layout.ca_cert}"
            )
        return (
            f"its issuer is {format_name(cert.issuer)}; this CA is {ours} in {self.layout.ca_cert}"
        )

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return builder.sign(self._key, hashes.SHA256())

    # -- issuing -------------------------------------------------------------

    def issue_server(
        self,
        names: str | list[str],
        *,
        out_dir: Path | None = None,
        days: int = LEAF_VALIDITY_DAYS,
        key_type: str = DEFAULT_KEY_TYPE,
        not_before: datetime | None = None,
    ) -> IssuedCert:
        """Issue ``server.pem``/``server.key`` (into ``ssl/`` or ``out_dir``).

        ``names``: a ``--common-name`` list or a list of names; the first is
        the subject CN, all of them are subjectAltNames.
        """
        checked = parse_server_names(names) if isinstance(names, str) else check_server_names(names)
        if not checked:
            raise PkiError("no server names given: pass --common-name=NAME[,NAME...]")
        if len(checked[0]) > 64:  # the X.509 upper bound of a common name
            raise PkiError(
                f"{checked[0]!r} is too long to be the common name (at most 64 characters): "
                "put a shorter name first in --common-name; later names may be longer"
            )
        subject = _name([x509.NameAttribute(NameOID.COMMON_NAME, checked[0])], "server name")
        san = x509.SubjectAlternativeName(san_entries(checked))
        return self._issue(
            "server",
            subject,
            [(san, False)],
            *self._leaf_paths("server", out_dir),
            days=days,
            key_type=key_type,
            not_before=not_before,
        )

    def issue_client(
        self,
        subject: str | dict[str, str] | x509.Name | None = None,
        *,
        out_dir: Path | None = None,
        days: int = LEAF_VALIDITY_DAYS,
        key_type: str = DEFAULT_KEY_TYPE,
        not_before: datetime | None = None,
    ) -> IssuedCert:
        """Issue ``client.pem``/``client.key`` (into ``x.509/`` or ``out_dir``).

        ``subject``: ``--oid`` text (``CN:host,O:org``), a dict of the same
        keys, an ``x509.Name``, or None for ``CN=<this machine's host name>``.
        """
        if subject is None:
            name = default_client_subject()
        elif isinstance(subject, str):
            name = parse_subject_options(subject)
        elif isinstance(subject, dict):
            name = subject_from_fields(list(subject.items()))
        else:
            name = subject
        return self._issue(
            "client",
            name,
            [],
            *self._leaf_paths("client", out_dir),
            days=days,
            key_type=key_type,
            not_before=not_before,
        )

    def _leaf_paths(self, profile: Profile, out_dir: Path | None) -> tuple[Path, Path]:
        """Where a server or client certificate and key go: their ini
        subdirectory, or ``out_dir`` (--path)."""
        if profile == "server":
            cert, key = self.layout.server_cert, self.layout.server_key
        else:
            cert, key = self.layout.client_cert, self.layout.client_key
        directory = out_dir if out_dir is not None else cert.parent
        return directory / cert.name, directory / key.name

    def _issue(
        self,
        profile: Profile,
        subject: x509.Name,
        extensions: list[tuple[x509.ExtensionType, bool]],
        cert_path: Path,
        key_path: Path,
        *,
        days: int,
        key_type: str,
        not_before: datetime | None,
        key: PrivateKey | None = None,
    ) -> IssuedCert:
        """Sign, write and record one certificate; ``extensions`` are the
        profile's own (subject alternative names), its extended key usage is
        added here. ``key``: reuse this key (renew --keep-key: the key file is
        left as it is) instead of a new one."""
        extensions = [*extensions, (x509.ExtendedKeyUsage([_PROFILE_USAGE[profile]]), False)]
        _check_days(days)
        now = datetime.now(UTC)
        if self._cert.not_valid_after_utc <= now:
            raise PkiError(
                f"the root CA {self.layout.ca_cert} expired on "
                f"{self._cert.not_valid_after_utc:%Y-%m-%d}: create a new one with "
                f"{self.layout.command('ca --force')} and re-issue "
                "every certificate"
            )
        write_key = key is None
        if key is None:
            key = _generate_key(key_type)
        builder = _builder(
            subject,
            self._cert.subject,
            key.public_key(),
            days=days,
            not_before=not_before,
            ends_by=self._cert.not_valid_after_utc,  # it dies with the CA anyway
        )
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # TLS 1.2 RSA key exchange encrypts to the server's key.
                    key_encipherment=isinstance(key, rsa.RSAPrivateKey) and profile == "server",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        cert = builder.sign(self._key, hashes.SHA256())
        files = [(cert_path, cert.public_bytes(serialization.Encoding.PEM), False)]
        if write_key:
            files.insert(0, (key_path, _key_pem(key), True))
        superseded: list[Entry] = []
        with self.inventory() as inventory:
            previous = read_certificate(cert_path)

            def record(moved: dict[Path, Path]) -> None:
                inventory.add(inventory_entry(cert, profile, cert_path))
                if previous is not None and self.issued(previous):
                    old = inventory.add(inventory_entry(previous, profile, cert_path))
                    old.superseded_by = serial_text(cert.serial_number)
                    aside = moved.get(cert_path)
                    old.moved_to = str(aside.absolute()) if aside is not None else None
                    if old.status == "valid":
                        old.status = "superseded"
                    inventory.changed = True
                    superseded.append(old)
                inventory.save()  # inside _install: a failure here undoes the files

            moved = _install(files, record)
        return IssuedCert(
            cert_path,
            key_path,
            cert,
            profile,
            moved,
            superseded=superseded[0].serial if superseded else None,
            superseded_revoked=(
                superseded[0].revocation_reason or "unspecified"
                if superseded and superseded[0].status == "revoked"
                else None
            ),
            key_written=write_key,
        )

    # -- renewing ------------------------------------------------------------

    def renew(
        self,
        profile: Profile,
        *,
        out_dir: Path | None = None,
        keep_key: bool = False,
        days: int = LEAF_VALIDITY_DAYS,
        key_type: str | None = None,
    ) -> IssuedCert:
        """Re-issue the certificate in ``ssl/`` (server), ``x.509/`` (client) or
        ``out_dir``: same subject and names, a new validity period, and a new
        key unless ``keep_key``. The old files are moved aside and the old
        certificate is marked superseded in the inventory."""
        if profile not in PROFILES:
            raise PkiError(f"cannot renew {profile!r}: renew server or client")
        cert_path, key_path = self._leaf_paths(profile, out_dir)
        where = f" --path {cert_path.parent}" if out_dir is not None else ""
        if not cert_path.exists():
            make = "server --common-name=<names>" if profile == "server" else "client [--oid=...]"
            raise PkiError(
                f"no {profile} certificate at {cert_path} to renew: issue one with "
                + self.layout.command(f"{make}{where}")
            )
        old = read_certificate(cert_path)
        if old is None:
            raise PkiError(
                f"{cert_path} is not a PEM certificate: renewing copies its subject and names; "
                f"issue a new one with `sm_ssl_cert {profile}` instead"
            )
        if not self.issued(old):
            raise PkiError(
                f"{cert_path} was not issued by this CA ({self.whose(old)}): issue a new one "
                f"with `sm_ssl_cert {profile}`"
            )
        if _PROFILE_USAGE[profile] not in _extended_key_usages(old):
            raise PkiError(
                f"{cert_path} is not a {profile} certificate (no {profile}Auth extended key usage): "
                f"renew it as what it is, or issue a new one with `sm_ssl_cert {profile}`"
            )
        key: PrivateKey | None = None
        if keep_key:
            if key_type is not None:
                raise PkiError(
                    "--keep-key keeps the current key and its type: leave out --key-type"
                )
            entry = Inventory.read(self.layout).find(old.serial_number)
            if entry is not None and entry.revocation_reason in ("keyCompromise", "cACompromise"):
                raise PkiError(
                    f"{cert_path} was revoked for {entry.revocation_reason}: its key must not be "
                    "certified again; renew without --keep-key (a new key)"
                )
            key = _read_matching_key(key_path, old)
        elif key_type is None:
            key_type = "rsa" if isinstance(old.public_key(), rsa.RSAPublicKey) else "ec"
        extensions: list[tuple[x509.ExtensionType, bool]] = []
        with contextlib.suppress(x509.ExtensionNotFound):
            san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            extensions.append((san.value, san.critical))
        return self._issue(
            profile,
            old.subject,
            extensions,
            cert_path,
            key_path,
            days=days,
            key_type=key_type or DEFAULT_KEY_TYPE,
            not_before=None,
            key=key,
        )


# -- subjects ------------------------------------------------------------------


def days_left(moment: datetime, now: datetime | None = None) -> float:
    """Days from ``now`` until ``moment`` (an expiry, a CRL's next update);
    negative once it has passed."""
    return (moment - (now or datetime.now(UTC))).total_seconds() / 86400


def validity_problem(cert: x509.Certificate, now: datetime | None = None) -> str | None:
    """What is wrong with ``cert``'s validity period at ``now``, as OpenSSL
    judges it: "expired on DATE UTC", "not valid before DATE UTC (CLOCK_HINT)";
    None while it is valid."""
    now = now or datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > now:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC ({CLOCK_HINT})"
    return None


def parse_subject_options(text: str) -> x509.Name:
    """Parse ``--oid`` text (``KEY:VALUE,...`` with the keys of SUBJECT_KEYS) into a Name.

    Keys are case-insensitive; values keep their inner spaces. Unknown keys,
    empty values, items without a colon and empty items are PkiErrors.
    """
    keys_hint = "known keys: " + ", ".join(SUBJECT_KEYS)
    if not text or not text.strip():
        raise PkiError(
            f"--oid is empty: give KEY:VALUE pairs such as --oid=CN:host,O:org ({keys_hint})"
        )
    fields: list[tuple[str, str]] = []
    for position, item in enumerate(text.split(","), start=1):
        if not item.strip():
            raise PkiError(
                f"--oid {text!r} has an empty item (position {position}): remove the extra comma"
            )
        key, colon, value = item.partition(":")
        if not colon:
            # KEY=VALUE, as openssl writes subjects: say the same in our syntax.
            named, equals, rest = item.strip().partition("=")
            example = (
                f"here {named.upper()}:{rest}"
                if equals and named.upper() in SUBJECT_KEYS
                else f"for example CN:{item.strip()}"
            )
            raise PkiError(f"--oid item {item!r} has no colon: write KEY:VALUE, {example}")
        fields.append((key, value))
    return subject_from_fields(fields)


def subject_from_fields(fields: list[tuple[str, str]]) -> x509.Name:
    """Build a subject from (key, value) pairs in ``--oid`` key syntax, in order."""
    if not fields:
        raise PkiError("the client subject is empty: give at least CN:<name> with --oid")
    attributes: list[x509.NameAttribute] = []
    seen: set[str] = set()
    for raw_key, raw_value in fields:
        key, value = raw_key.strip().upper(), raw_value.strip()
        if key not in SUBJECT_KEYS:
            raise PkiError(
                f"unknown --oid key {raw_key.strip()!r}: use one of " + ", ".join(SUBJECT_KEYS)
            )
        if not value:
            raise PkiError(f"--oid key {key} has an empty value: write {key}:<value>")
        if key in seen and key not in _REPEATABLE_KEYS:
            raise PkiError(f"--oid key {key} is given twice: keep one {key}:<value>")
        seen.add(key)
        if key == "C":
            if len(value) != 2 or not value.isascii() or not value.isalpha():
                raise PkiError(
                    f"--oid C:{value} is not a country code: use two letters (ISO 3166), e.g. C:DE"
                )
            value = value.upper()
        attribute = _attribute(SUBJECT_KEYS[key], value, f"--oid {key}")
        attributes.append(attribute)
    return _name(attributes, "--oid")


def default_client_subject() -> x509.Name:
    """``CN=<host name of this machine>``: the subject when ``--oid`` is not given."""
    host = socket.gethostname()
    try:
        attribute = _attribute(NameOID.COMMON_NAME, host, "this machine's host name")
    except PkiError as exc:
        raise PkiError(f"{exc}: give the subject with --oid=CN:<name>") from exc
    return _name([attribute], "default subject")


def format_name(name: x509.Name) -> str:
    """A subject in certificate order with the ``--oid`` keys: ``C=DE, CN=host``.

    The operator's own vocabulary, rather than RFC 4514 (reversed order, and
    dotted OIDs for half of our keys).
    """
    return ", ".join(
        f"{_KEY_BY_OID.get(attribute.oid, attribute.oid.dotted_string)}={attribute.value!s}"
        for attribute in name
    )


def format_serial(serial: int) -> str:
    """Hex with an even number of digits, as ``openssl x509 -serial`` prints it."""
    return serial_text(serial)


def format_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as ``openssl x509 -fingerprint -sha256`` prints it."""
    return colon_hex(cert.fingerprint(hashes.SHA256()))


def key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bit"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256"}.get(key.curve.name, f"ECDSA {key.curve.name}")
    return type(key).__name__


def profile_of(cert: x509.Certificate) -> str:
    """ca, server or client, from basicConstraints and extended key usage."""
    if is_ca_certificate(cert):
        return "ca"
    usages = _extended_key_usages(cert)
    if ExtendedKeyUsageOID.SERVER_AUTH in usages:
        return "server"
    return "client"


def inventory_entry(cert: x509.Certificate, profile: str, path: Path) -> Entry:
    """The inventory record of ``cert`` written to ``path``."""
    return Entry(
        serial=serial_text(cert.serial_number),
        profile=profile,
        subject=format_name(cert.subject),
        names=certificate_names(cert) if profile == "server" else [],
        not_before=timestamp(cert.not_valid_before_utc),
        not_after=timestamp(cert.not_valid_after_utc),
        path=str(Path(path).absolute()),
        recorded_at=timestamp(datetime.now(UTC)),
        sha256=format_fingerprint(cert),
    )


def load_certificate_file(path: Path) -> x509.Certificate | None:
    """A PEM or DER certificate, or None when ``path`` holds none."""
    data = Path(path).read_bytes()
    for loader in (x509.load_pem_x509_certificate, x509.load_der_x509_certificate):
        try:
            return loader(data)
        except ValueError:
            continue
    return None


def read_certificate(path: Path) -> x509.Certificate | None:
    """The certificate at ``path``; None when there is none or it cannot be read."""
    try:
        return load_certificate_file(path)
    except OSError:
        return None


def _extended_key_usages(cert: x509.Certificate) -> list[ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _read_matching_key(key_path: Path, cert: x509.Certificate) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(
            f"--keep-key: no key at {key_path}; renew without --keep-key to make a new one"
        ) from None
    except (ValueError, TypeError) as exc:
        raise PkiError(
            f"--keep-key: cannot read {key_path} as an unencrypted PEM key ({exc}); "
            "renew without --keep-key to make a new one"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"--keep-key: {key_path} holds a {type(key).__name__}: expected EC or RSA")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise PkiError(
            f"--keep-key: {key_path} is not the key of the certificate beside it; "
            "renew without --keep-key to make a new one"
        )
    return key


def _attribute(oid: ObjectIdentifier, value: str, what: str) -> x509.NameAttribute:
    # A newline or an escape in a subject is a slip (of a script, of the
    # shell's quoting), and would go raw into every listing and log line.
    control = control_character(value)
    if control is not None:
        raise PkiError(
            f"{what}: value {value!r} holds the control character {control!r}: "
            "a subject is printable text on one line"
        )
    # cryptography encodes dnQualifier as a PrintableString but only notices a
    # character outside that set when signing, with a parser error: say it here.
    if oid == NameOID.DN_QUALIFIER and not _PRINTABLE_STRING.fullmatch(value):
        raise PkiError(
            f"{what}: value {value!r} has characters a dnQualifier cannot hold: "
            "use letters, digits, spaces and ' ( ) + - . / : = ?"
        )
    try:
        return x509.NameAttribute(oid, value)
    except ValueError as exc:  # e.g. a common name longer than 64 characters
        raise PkiError(f"{what}: value {value!r} is not allowed ({exc})") from exc


def _name(attributes: list[x509.NameAttribute], what: str) -> x509.Name:
    try:
        return x509.Name(attributes)
    except ValueError as exc:
        raise PkiError(f"{what}: {exc}") from exc


# -- building blocks -------------------------------------------------------------


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    *,
    days: int,
    not_before: datetime | None,
    ends_by: datetime | None = None,
) -> x509.CertificateBuilder:
    """The fields every certificate shares: names, key, serial, validity
    (``days``, but not past ``ends_by``), SKI."""
    if not_before is None:
        start = datetime.now(UTC)
        valid_from = start - CLOCK_SKEW
    else:
        if not_before.tzinfo is None:
            raise ValueError("not_before must be an aware datetime (UTC)")
        start = valid_from = not_before
    ends = start + timedelta(days=days)
    if ends_by is not None:
        ends = min(ends, ends_by)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(ends)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _generate_key(key_type: str) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)
    raise PkiError(f"unknown key type {key_type!r}: use one of " + ", ".join(KEY_TYPES))


def _check_days(days: int) -> None:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PkiError(f"invalid validity {days!r} days: --days must be a whole number >= 1")


def _key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if passphrase is None
        else serialization.BestAvailableEncryption(passphrase)
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _load_ca_key(path: Path, passphrase: bytes | None) -> object:
    """The private key in ``path``, decrypted with ``passphrase``. Whether
    it is encrypted is what cryptography says: TypeError when a passphrase
    is missing or needless, ValueError when it does not decrypt the key or
    the file is not a key."""
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    except TypeError:
        if passphrase is None:
            raise PkiError(
                f"the root CA key {path} is encrypted: pass --passphrase-file FILE, a file "
                "whose first line is its passphrase"
            ) from None
        raise PkiError(
            f"the root CA key {path} is not encrypted: leave out --passphrase-file"
        ) from None
    except ValueError as exc:
        if passphrase is not None:
            raise PkiError(
                f"the passphrase does not decrypt the root CA key {path}: check the file "
                "given to --passphrase-file"
            ) from None
        raise PkiError(
            f"cannot read the root CA key {path} ({exc}): sm_ssl_cert needs the PEM key "
            "written by `sm_ssl_cert ca`"
        ) from exc


def _public_der(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _install(
    files: list[tuple[Path, bytes, bool]],
    then: Callable[[dict[Path, Path]], None] | None = None,
) -> tuple[Path, ...]:
    """Write (path, data, private) files in order, moving existing ones aside first,
    then call ``then`` with {original: moved-aside path} (recording them).

    All or nothing: if a write or ``then`` fails, what was written is removed
    and what was moved aside is put back, then the error propagates.
    """
    moved: list[tuple[Path, Path]] = []
    written: list[Path] = []
    try:
        for path, _data, _private in files:
            aside = move_aside(path)
            if aside is not None:
                moved.append((path, aside))
        for path, data, private in files:
            (write_private if private else write_public)(path, data)
            written.append(path)
        if then is not None:
            then(dict(moved))
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        for original, aside in reversed(moved):
            with contextlib.suppress(OSError):
                os.replace(aside, original)
        raise
    return tuple(aside for _original, aside in moved)


def move_old_server_keys(layout: Layout) -> list[Path]:
    """Move every ``ssl/*.key`` and ``ssl/*.pem`` aside (the first clean-up step).

    Returns the new paths. Old self-generated server keys are renamed to
    ``<name>.old-<UTC timestamp>``, never deleted.
    """
    directory = layout.server_dir
    if not directory.is_dir():
        return []
    candidates = sorted(
        path
        for pattern in ("*.key", "*.pem")
        for path in directory.glob(pattern)
        if path.is_file() or path.is_symlink()
    )
    moved: list[Path] = []
    for path in candidates:
        aside = move_aside(path)
        if aside is not None:
            moved.append(aside)
    return moved
