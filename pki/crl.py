"""Revocation: marking certificates revoked and writing the signed CRL ``ca/crl.pem``.

The CRL is built from the inventory's revoked entries (``pki.inventory``),
signed by the root CA key, and carries a cRLNumber (one higher on every
write; the last one is kept in the inventory) and the CA's authority key
identifier. Revoking and writing the CRL happen under the inventory lock, so
two administrators revoking at once both end up on the CRL.

A CRL has a next-update time: once it has passed, OpenSSL treats the CRL as
expired and refuses every certificate checked against it. ``sm_ssl_cert crl``
re-signs it (for example weekly from cron), and ``sm_ssl_cert list`` warns
when the next update is near or past.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.authority import (
    CLOCK_SKEW,
    CertificateAuthority,
    inventory_entry,
    load_certificate_file,
    profile_of,
)
from pki.errors import PkiError
from pki.files import write_public
from pki.inventory import Entry, Inventory, parse_serial, parse_timestamp, serial_text, timestamp
from pki.layout import Layout

CRL_VALIDITY_DAYS = 30  # next update of a CRL written by revoke or crl (crl --days changes it)
CRL_WARNING_DAYS = 7  # `list` warns when the next update is this close, or past

# RFC 5280 CRLReason names. removeFromCRL (delta CRLs only) and certificateHold
# (a suspension we offer no way to lift) are left out.
REASONS: dict[str, x509.ReasonFlags] = {
    flag.value: flag
    for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.remove_from_crl, x509.ReasonFlags.certificate_hold)
}
DEFAULT_REASON = x509.ReasonFlags.unspecified.value


def parse_reason(text: str) -> str:
    """The RFC 5280 name of a reason, given in any case (``keycompromise``)."""
    by_lower = {name.lower(): name for name in REASONS}
    name = by_lower.get(text.strip().lower())
    if name is None:
        raise PkiError(f"unknown revocation reason {text!r}: use one of " + ", ".join(REASONS))
    return name


@dataclass(frozen=True)
class CrlWritten:
    path: Path
    number: int
    revoked: int  # certificates on it
    next_update: datetime
    carried: int = 0  # of them, taken over from the previous CRL: not in the inventory


@dataclass(frozen=True)
class Revocation:
    entry: Entry
    already: bool  # it was revoked before; the CRL was written again
    crl: CrlWritten


def revoke(
    ca: CertificateAuthority,
    target: str,
    reason: str = DEFAULT_REASON,
    *,
    now: datetime | None = None,
) -> Revocation:
    """Revoke the certificate named by ``target`` (a serial in hex, or a
    certificate file) and write the CRL. Revoking again keeps the first
    date and reason."""
    reason = parse_reason(reason)
    now = now or datetime.now(UTC)
    with ca.inventory() as inventory:
        entry = _find_target(ca, inventory, target)
        already = entry.status == "revoked"
        if not already:
            entry.status = "revoked"
            entry.revoked_at = timestamp(now)
            entry.revocation_reason = reason
            inventory.changed = True
        # The CRL first: if writing the inventory then fails, the certificate
        # is still refused, and running revoke again repairs the inventory.
        written = _write(ca, inventory, days=CRL_VALIDITY_DAYS, now=now)
    return Revocation(entry, already, written)


def write_crl(
    ca: CertificateAuthority, *, days: int = CRL_VALIDITY_DAYS, now: datetime | None = None
) -> CrlWritten:
    """Write ``ca/crl.pem`` again from the inventory (a new number and next update)."""
    if days < 1:
        raise PkiError(f"invalid CRL validity {days} days: --days must be a whole number >= 1")
    with ca.inventory() as inventory:
        return _write(ca, inventory, days=days, now=now or datetime.now(UTC))


def build_crl(
    ca: CertificateAuthority,
    revoked: list[Entry],
    *,
    number: int,
    now: datetime,
    days: int,
    carried: Sequence[x509.RevokedCertificate] = (),
) -> x509.CertificateRevocationList:
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key())  # type: ignore[arg-type]
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        # Like certificates: a peer whose clock is a little behind must not
        # see a brand-new CRL as "not yet valid".
        .last_update(now - CLOCK_SKEW)
        .next_update(now + timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(aki, critical=False)
    )
    for entry in revoked:
        item = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial_number)
            .revocation_date(parse_timestamp(entry.revoked_at or timestamp(now)))
        )
        reason = REASONS.get(entry.revocation_reason or DEFAULT_REASON)
        # RFC 5280 5.3.1: "unspecified" SHOULD be expressed by leaving the reason out.
        if reason is not None and reason != x509.ReasonFlags.unspecified:
            item = item.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(item.build())
    for revoked_certificate in carried:
        builder = builder.add_revoked_certificate(revoked_certificate)
    return ca.sign_crl(builder)


@dataclass(frozen=True)
class CrlState:
    """What ``list`` reports about ``ca/crl.pem``."""

    path: Path
    number: int | None
    last_update: datetime
    next_update: datetime | None
    revoked_serials: frozenset[int]


def read_crl(layout: Layout) -> CrlState | None:
    """The CRL beside the CA, or None when there is none. Signature checks are
    stpd's and openssl's business; this only reads what ``list`` shows."""
    try:
        data = layout.crl.read_bytes()
    except FileNotFoundError:
        return None
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PkiError(
            f"CRL {layout.crl} is unreadable ({exc}): write it again with " + layout.command("crl")
        ) from None
    return CrlState(
        layout.crl,
        crl_number(crl),
        crl.last_update_utc,
        crl.next_update_utc,
        frozenset(item.serial_number for item in crl),
    )


def _write(
    ca: CertificateAuthority, inventory: Inventory, *, days: int, now: datetime
) -> CrlWritten:
    revoked = inventory.revoked()
    # What the CRL this one replaces says counts too: an inventory moved
    # aside (damaged) and begun anew must not bring revoked certificates
    # back to life, nor CRL numbers back to 1 (stpd refuses a lower one).
    previous = _previous_crl(ca)
    listed = {entry.serial_number for entry in revoked}
    carried = [item for item in previous or () if item.serial_number not in listed]
    previous_number = crl_number(previous) if previous is not None else None
    inventory.crl_number = max(inventory.crl_number, previous_number or 0) + 1
    inventory.changed = True
    crl = build_crl(ca, revoked, number=inventory.crl_number, now=now, days=days, carried=carried)
    write_public(ca.layout.crl, crl.public_bytes(serialization.Encoding.PEM))
    inventory.save()
    assert crl.next_update_utc is not None
    return CrlWritten(
        ca.layout.crl,
        inventory.crl_number,
        len(revoked) + len(carried),
        crl.next_update_utc,
        len(carried),
    )


def _previous_crl(ca: CertificateAuthority) -> x509.CertificateRevocationList | None:
    """The CRL in ca/crl.pem if this CA signed it (one of an earlier CA,
    which ``ca --force`` moves aside anyway, says nothing about ours)."""
    try:
        crl = x509.load_pem_x509_crl(ca.layout.crl.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PkiError(
            f"CRL {ca.layout.crl} cannot be read ({exc}), so the revocations on it would be "
            "lost: restore it, or move it aside to write a new one from the inventory alone"
        ) from None
    return crl if crl.is_signature_valid(ca.cert.public_key()) else None  # type: ignore[arg-type]


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """Its cRLNumber (RFC 5280), which rises with each CRL of a CA."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return None


def _find_target(ca: CertificateAuthority, inventory: Inventory, target: str) -> Entry:
    """The inventory entry for a serial or a certificate file."""
    list_hint = f"{ca.layout.command('list')} shows the serials"
    path = Path(target)
    if os.sep in target or path.exists():
        return _entry_for_file(ca, inventory, path)
    try:
        serial = parse_serial(target)
    except ValueError:
        raise PkiError(
            f"{target!r} is neither a certificate file nor a serial number in hex: {list_hint}"
        ) from None
    entry = inventory.find(serial)
    if entry is None:
        raise PkiError(
            f"no certificate with serial {serial_text(serial)} in {inventory.path}: {list_hint}; "
            "for a certificate issued before the inventory existed, pass its file instead"
        )
    _refuse_ca(ca, entry)
    return entry


def _no_such_file(ca: CertificateAuthority, path: Path) -> str:
    """A relative path is taken from the current directory, not from the
    ini directory: `revoke x.509/client.pem` run elsewhere found nothing,
    and the error did not say where it had looked."""
    if path.is_absolute():
        return f"no such certificate file {path}"
    in_ini_dir = ca.layout.ini_dir / path
    hint = f": {in_ini_dir} is there, pass that" if in_ini_dir.is_file() else ""
    return (
        f"no such certificate file {path} in {Path.cwd()} (a relative path is taken from the "
        f"current directory, not from the ini directory){hint}"
    )


def _entry_for_file(ca: CertificateAuthority, inventory: Inventory, path: Path) -> Entry:
    try:
        cert = load_certificate_file(path)
    except FileNotFoundError:
        raise PkiError(_no_such_file(ca, path)) from None
    except IsADirectoryError:
        raise PkiError(f"{path} is a directory: pass a certificate file or a serial") from None
    if cert is None:
        raise PkiError(
            f"{path} is not a certificate (neither PEM nor DER): pass a certificate file "
            "such as x.509/client.pem, or a serial from `sm_ssl_cert list`"
        )
    if not ca.issued(cert):
        raise PkiError(
            f"{path} was not issued by this CA ({ca.whose(cert)}): revoke it with the CA "
            "that issued it"
        )
    # Known, or issued before the inventory existed: record it now.
    entry = inventory.add(inventory_entry(cert, profile_of(cert), path))
    _refuse_ca(ca, entry)
    return entry


def _refuse_ca(ca: CertificateAuthority, entry: Entry) -> None:
    if entry.profile == "ca" or entry.serial_number == ca.cert.serial_number:
        raise PkiError(
            f"serial {entry.serial} is the root CA itself: a CA cannot revoke itself; to stop "
            f"trusting it, create a new one with {ca.layout.command('ca --force')} and re-issue "
            "every certificate"
        )
