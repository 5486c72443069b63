"""pki.names: --common-name parsing, SAN entries and host matching."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pki.errors import PkiError
from pki.names import certificate_names, host_matches, parse_server_names, san_entries


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("myserver", ["myserver"]),
        ("myserver.domain.com,192.168.1.10", ["myserver.domain.com", "192.168.1.10"]),
        ("*.serverdomain.com", ["*.serverdomain.com"]),
        ("192.168.1.*,10.*,172.16.*", ["192.168.1.*", "10.*", "172.16.*"]),
        ("::1,FD00:0:0::10", ["::1", "fd00::10"]),  # canonical IPv6 text
        ("a-b.example,A-B.example", ["a-b.example"]),  # duplicates dropped
        ("xn--bcher-kva.example", ["xn--bcher-kva.example"]),
    ],
)
def test_parse_accepts(text: str, expected: list[str]) -> None:
    assert parse_server_names(text) == expected


@pytest.mark.parametrize(
    ("text", "bad", "reason"),
    [
        ("foo.*.com", "foo.*.com", "leftmost label"),
        ("300.1.1.1", "300.1.1.1", "not a valid IPv4 address"),
        ("1.2.3", "1.2.3", "not a valid IPv4 address"),
        ("010.1.1.1", "010.1.1.1", "leading zeros"),
        ("my server", "my server", "spaces"),
        ("a, b", " b", "spaces"),
        ("*", "*", "every host"),
        ("*.com", "*.com", "too broad"),
        ("*.*.example.com", "*.*.example.com", "leftmost label"),
        ("x*.example.com", "x*.example.com", "leftmost label"),
        ("192.168.*.1", "192.168.*.1", "last part of an IPv4"),
        ("1.2.3.4.*", "1.2.3.4.*", "last part of an IPv4"),
        ("256.1.*", "256.1.*", "not an IPv4 octet"),
        ("*.1.2.3", "*.1.2.3", "leftmost label"),
        ("-bad.example", "-bad.example", "not a valid host name label"),
        ("under_score.example", "under_score.example", "not a valid host name label"),
        ("a..b", "a..b", "empty label"),
        ("host.", "host.", "empty label"),
        ("example.123", "example.123", "all digits"),
        ("fe80::1%eth0", "fe80::1%eth0", "scope"),
        ("fd00::zz", "fd00::zz", "IPv6"),
        ("bücher.example", "bücher.example", "punycode"),
        ("a" * 64 + ".example", "a" * 64 + ".example", "at most 63"),
    ],
)
def test_parse_rejects_and_names_the_item(text: str, bad: str, reason: str) -> None:
    with pytest.raises(PkiError) as info:
        parse_server_names(text)
    message = str(info.value)
    assert repr(bad) in message
    assert reason in message
    assert "\n" not in message


@pytest.mark.parametrize("text", ["a,,b", ",a", "a,"])
def test_parse_rejects_empty_items(text: str) -> None:
    with pytest.raises(PkiError, match="empty item"):
        parse_server_names(text)


@pytest.mark.parametrize("text", ["", "   "])
def test_parse_rejects_an_empty_list(text: str) -> None:
    with pytest.raises(PkiError, match="--common-name is empty"):
        parse_server_names(text)


def test_san_entries_use_the_fitting_form() -> None:
    entries = san_entries(["host.example", "*.example.test", "192.0.2.7", "::1", "192.0.2.*"])
    assert entries == [
        x509.DNSName("host.example"),
        x509.DNSName("*.example.test"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        # No standard form for IP wildcards: our own convention, see pki.names.
        x509.DNSName("192.0.2.*"),
    ]


def _cert(subject_cn: str, san: list[x509.GeneralName] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_certificate_names_reads_sans_in_order() -> None:
    cert = _cert("ignored", san_entries(["a.example", "10.0.0.1", "*.b.example", "10.1.*"]))
    assert certificate_names(cert) == ["a.example", "10.0.0.1", "*.b.example", "10.1.*"]


def test_certificate_names_falls_back_to_cn_only_without_san() -> None:
    assert certificate_names(_cert("legacy.example", None)) == ["legacy.example"]
    assert certificate_names(_cert("cn.example", [x509.DNSName("san.example")])) == ["san.example"]


NAMES = ["server.example.test", "*.example.test", "127.0.0.*", "192.0.2.10", "fd00::1", "10.*"]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("server.example.test", True),
        ("SERVER.Example.Test", True),  # DNS is case-insensitive
        ("server.example.test.", True),  # absolute form
        ("a.example.test", True),  # wildcard: one extra label
        ("a.b.example.test", False),  # ... not two
        ("example.test", False),  # ... not zero
        ("-x.example.test", False),  # ... and a real label
        ("127.0.0.1", True),
        ("127.0.0.255", True),
        ("127.0.1.1", False),
        ("10.200.3.4", True),  # "10.*": every remaining octet
        ("11.0.0.1", False),
        ("192.0.2.10", True),
        ("192.0.2.11", False),
        ("fd00::1", True),
        ("[fd00::1]", True),
        ("fd00:0::1", True),  # compared as addresses, not as text
        ("fd00::2", False),
        ("other.example", False),
        ("", False),
    ],
)
def test_host_matches(host: str, expected: bool) -> None:
    assert host_matches(host, NAMES) is expected


def test_ip_hosts_and_dns_wildcards_never_mix() -> None:
    # A DNS wildcard never covers an IP host, an IP wildcard never a DNS host.
    assert not host_matches("1.2.3.4", ["*.2.3.4"])
    assert not host_matches("127.0.0.example", ["127.0.0.*"])
    assert not host_matches("::1", ["*.example.test"])
    # Prefix matching is per octet, not per character.
    assert not host_matches("127.0.0.1", ["127.0.*0"])
    assert not host_matches("12.0.0.1", ["1.*"])


def test_malformed_names_from_foreign_certificates_do_not_match() -> None:
    assert not host_matches("a.example", ["*", "a.*", "*.*.example", ""])
    assert not host_matches("1.2.3.4", ["1.2.3.4.*", "01.2.3.*", "*"])


def test_a_list_of_names_is_deduplicated_like_the_text_form() -> None:
    from pki.names import check_server_names

    assert check_server_names(["a.b.c", "A.b.c", "10.0.0.1", "10.0.0.1"]) == ["a.b.c", "10.0.0.1"]
    assert check_server_names(["a.b.c", "A.b.c"]) == parse_server_names("a.b.c,A.b.c")
