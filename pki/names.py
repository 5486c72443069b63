"""Server names: parsing ``--common-name`` lists and matching a host against them.

Shared by ``sm_ssl_cert server`` (what goes into a certificate) and by the
client (does the certificate fit the host we connect to). Four forms exist:

- host names, RFC 1123 labels: ``myserver``, ``myserver.domain.com``;
- IPv4 and IPv6 addresses: ``192.168.1.10``, ``fd00::10``;
- DNS wildcards, the whole leftmost label only, with at least two labels after
  it: ``*.serverdomain.com`` matches ``a.serverdomain.com`` (one label, as in
  RFC 6125), not ``serverdomain.com`` or ``a.b.serverdomain.com``;
- IPv4 wildcards, ``*`` as the last component after one to three octets:
  ``192.168.1.*``; ``*`` stands for all remaining octets, so ``10.*`` matches
  every ``10.x.y.z``.

IPv4 wildcards have no standard subjectAltName form. They are recorded as a
dNSName with the literal text (``192.168.1.*``): our client honours it; generic
TLS clients (curl, browsers, openssl -verify_ip) never match an IP address
against a dNSName and ignore it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from pki.console import control_character
from pki.errors import PkiError

# ``--oid`` keys (SPEC.md) and the X.509 subject attributes they stand for:
# what sm_ssl_cert client takes, and what STPD_ALLOWED_CLIENTS matches.
NAME_OID = x509.ObjectIdentifier("2.5.4.41")  # id-at-name; cryptography has no constant
SUBJECT_KEYS: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "CN": NameOID.COMMON_NAME,
    "DQ": NameOID.DN_QUALIFIER,
    "GN": NameOID.GIVEN_NAME,
    "GQ": NameOID.GENERATION_QUALIFIER,
    "I": NameOID.INITIALS,
    "L": NameOID.LOCALITY_NAME,
    "N": NAME_OID,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "P": NameOID.PSEUDONYM,
    "PC": NameOID.POSTAL_CODE,
    "S": NameOID.SURNAME,
    "T": NameOID.TITLE,
}

# RFC 1123: letters, digits and inner hyphens, 1 to 63 characters.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)
_MAX_NAME_LENGTH = 253  # RFC 1035, without the trailing dot
_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")  # no leading zeros: 010 is octal to some tools

_WILDCARD_HINT = (
    "a wildcard is either the whole leftmost label of a domain with at least two "
    "labels after it (*.domain.tld) or the last part of an IPv4 address (192.168.1.*)"
)


def parse_server_names(text: str) -> list[str]:
    """Split and check a comma-separated ``--common-name`` list.

    Returns the names in order without duplicates (IP addresses in their
    canonical text form). Raises PkiError naming the first bad item.
    """
    if not text or not text.strip():
        raise PkiError(
            "--common-name is empty: give at least one host name or IP address, "
            "for example --common-name=myserver.domain.com,192.168.1.10"
        )
    items = text.split(",")
    for position, item in enumerate(items, start=1):
        if not item:
            raise PkiError(
                f"--common-name {text!r} has an empty item (position {position}): "
                "remove the extra comma"
            )
    return check_server_names(items)


def check_server_names(items: Iterable[str]) -> list[str]:
    """Check each name; return them normalised, in order, without duplicates
    (compared case-insensitively). Raises PkiError naming the first bad one."""
    names: list[str] = []
    seen: set[str] = set()
    for item in items:
        name = check_server_name(item)
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return names


def check_server_name(item: str) -> str:
    """Check one server name of any of the four forms and return it normalised."""
    kind, name = _classify(item)
    if kind is None:
        raise PkiError(f"invalid name {item!r} in --common-name: {name}")
    return name


def san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    """The subjectAltName entries for checked server names, in the same order."""
    entries: list[x509.GeneralName] = []
    for item in names:
        kind, name = _classify(item)
        if kind is None:
            raise PkiError(f"invalid name {item!r} in --common-name: {name}")
        if kind == "ip":
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        else:
            # Host names, DNS wildcards and (our own convention) IP wildcards.
            entries.append(x509.DNSName(name))
    return entries


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS and IP subjectAltNames of ``cert`` as text.

    The subject CN counts only when the certificate has no subjectAltName
    extension at all (RFC 6125 section 6.4.4, as browsers and curl do).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [
            str(attribute.value)
            for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    names: list[str] = []
    for entry in san:  # in certificate order: the first name is the main one
        if isinstance(entry, x509.DNSName):
            names.append(entry.value)
        # Networks only occur in name constraints, not in a leaf's names.
        elif isinstance(entry, x509.IPAddress) and isinstance(
            entry.value, ipaddress.IPv4Address | ipaddress.IPv6Address
        ):
            names.append(str(entry.value))
    return names


def host_matches(host: str, names: Iterable[str]) -> bool:
    """Whether ``host`` (a DNS name or an IP address text) fits one of ``names``.

    An IP host matches an equal IP address or an IPv4 wildcard prefix (whole
    octets); a DNS host matches an equal name (case-insensitive) or ``*.rest``
    when the host is exactly one label longer. IP hosts never match DNS
    wildcards and DNS hosts never match IP wildcards. Malformed names (from a
    foreign certificate) simply do not match.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):  # "[::1]" as in URLs
        host = host[1:-1]
    host = host.rstrip(".").lower()
    if not host:
        return False
    address = ip_or_none(host)
    for name in names:
        if address is not None:
            if _ip_name_matches(address, name):
                return True
        elif _dns_name_matches(host, name):
            return True
    return False


def _ip_name_matches(address: ipaddress.IPv4Address | ipaddress.IPv6Address, name: str) -> bool:
    if name.endswith(".*"):
        if not isinstance(address, ipaddress.IPv4Address):
            return False
        prefix = name[:-2].split(".")
        if not 1 <= len(prefix) <= 3 or not all(_OCTET.fullmatch(part) for part in prefix):
            return False
        octets = str(address).split(".")
        return octets[: len(prefix)] == prefix
    other = ip_or_none(name)
    return other is not None and other == address


def _dns_name_matches(host: str, name: str) -> bool:
    name = name.rstrip(".").lower()
    if ip_or_none(name) is not None or name.endswith(".*"):
        return False
    if name.startswith("*."):
        first, _, rest = host.partition(".")
        # Exactly one extra leftmost label, and it must be a real label.
        return bool(rest) and rest == name[2:] and _LABEL.fullmatch(first) is not None
    return "*" not in name and host == name


def ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _classify(item: str) -> tuple[str | None, str]:
    """Return (kind, normalised name) or (None, reason) for one item.

    kind is "dns", "dns-wildcard", "ip" or "ip-wildcard".
    """
    if not item:
        return None, "the name is empty"
    if control_character(item) is not None:
        return None, "names must not contain control characters"
    if any(character.isspace() for character in item):
        return None, "names must not contain spaces; separate names with commas only"
    if not item.isascii():
        return None, "write international domain names in their xn-- (punycode) form"
    if ":" in item:
        try:
            address = ipaddress.IPv6Address(item)
        except ValueError:
            return None, "not a valid IPv6 address"
        if address.scope_id:
            return None, "an IPv6 scope (%interface) cannot be part of a certificate"
        return "ip", str(address)
    if "*" in item:
        return _classify_wildcard(item)
    labels = item.split(".")
    if all(label.isdigit() for label in labels):
        # Looks like an IPv4 address: it must be a valid one.
        try:
            return "ip", str(ipaddress.IPv4Address(item))
        except ValueError:
            return None, "not a valid IPv4 address (four numbers 0-255, no leading zeros)"
    reason = _check_host_name(labels)
    if reason:
        return None, reason
    return "dns", item


def _classify_wildcard(item: str) -> tuple[str | None, str]:
    if item == "*":
        return None, "a bare * would match every host: " + _WILDCARD_HINT
    labels = item.split(".")
    if labels[-1] == "*" and all(label != "*" for label in labels[:-1]):
        prefix = labels[:-1]
        if not 1 <= len(prefix) <= 3:
            return None, _WILDCARD_HINT
        for part in prefix:
            if not _OCTET.fullmatch(part) or int(part) > 255:
                return None, f"{part!r} is not an IPv4 octet (0-255, no leading zeros)"
        return "ip-wildcard", item
    if labels[0] == "*" and "*" not in ".".join(labels[1:]):
        if len(labels) < 3:
            return None, f"{item} is too broad: " + _WILDCARD_HINT
        if all(label.isdigit() for label in labels[1:]):
            return None, _WILDCARD_HINT
        reason = _check_host_name(labels[1:])
        if reason:
            return None, reason
        return "dns-wildcard", item
    return None, _WILDCARD_HINT


def _check_host_name(labels: list[str]) -> str | None:
    if len(".".join(labels)) > _MAX_NAME_LENGTH:
        return f"a host name is at most {_MAX_NAME_LENGTH} characters long"
    for label in labels:
        if not label:
            return "empty label (two dots in a row, or a leading or trailing dot)"
        if not _LABEL.fullmatch(label):
            return (
                f"label {label!r} is not a valid host name label "
                "(letters, digits and inner hyphens, at most 63 characters)"
            )
    if labels[-1].isdigit():
        return "the last label of a host name cannot be all digits"
    return None


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """basicConstraints CA:TRUE."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` issued ``cert``: its name as issuer, and its signature."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
