"""TLS material for the daemons: one place that turns an ini directory into
pyOpenSSL contexts for STPD (server) and SBC (client).

Why pyOpenSSL and not the stdlib ``ssl`` module: level 1 of
``STPD_HTTPS_USE_CLIENT_CERT`` asks for a client certificate, validates it,
and still serves a client whose certificate is invalid (with a warning).
The stdlib aborts the handshake on an invalid certificate; OpenSSL's verify
callback, which pyOpenSSL exposes, lets us record the verdict and go on.

Both contexts share the same hardening: TLS 1.2 minimum, forward-secret AEAD
suites only, no compression, no renegotiation. Host-name checking is done
by :func:`check_server_names` after the handshake because OpenSSL cannot match
our ``a.b.c.*`` IP wildcard form.
"""

from __future__ import annotations

import enum
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

from pki.errors import PkiError
from pki.files import unreadable
from pki.layout import Layout
from pki.names import (
    certificate_names,
    host_matches,
    ip_or_none,
    is_ca_certificate,
    signed_by,
)

# TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AEAD ciphers only.
# TLS 1.3 suites are all strong and keep OpenSSL's default order.
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS"
VERIFY_DEPTH = 2  # root CA + leaf: our CA issues leaves directly (pathlen 0)
# The reason for a connection closed before it sent a whole ClientHello: a
# port check (monitoring, a load balancer) rather than a failed handshake.
NO_HANDSHAKE_REASON = "connection closed before a TLS handshake began"
# OpenSSL's words for a peer whose first bytes are not TLS at all (plain
# HTTP, SSH, SMTP banners): another service, not a refusal.
NOT_TLS_REASONS = ("wrong version number", "packet length too long")

REVOKED = "certificate has been revoked"
EXPIRED = "certificate has expired"
NOT_OUR_CA = "not signed by our root CA"
# OpenSSL X509_V_ERR_* codes we explain in words; others use OpenSSL's text.
_VERIFY_REASONS = {
    2: "issuer certificate not found",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: EXPIRED,
    18: "self-signed certificate not from our CA",
    19: "self-signed certificate in chain not from our CA",
    20: NOT_OUR_CA,
    21: NOT_OUR_CA,
    23: REVOKED,
    # 26 (invalid purpose) depends on the side: see PeerVerdict.record.
}
# The identity of a peer without a valid certificate (levels 0 and 1): the
# owner of what it stores, shared by every such client.
ANONYMOUS = "anonymous"
# At level 1, the header of every answer to a client whose certificate stpd
# did not accept (and serves as ANONYMOUS): why, in stpd's words.
NOT_ACCEPTED_HEADER = "STPD-Certificate-Not-Accepted"

X509_V_ERR_UNABLE_TO_GET_CRL = 3
_NOT_OUR_CA_ERRORS = {
    18,
    19,
    20,
    21,
}  # the codes _VERIFY_REASONS words as NOT_OUR_CA or self-signed
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_CRL_NOT_YET_VALID = 11
X509_V_ERR_CRL_HAS_EXPIRED = 12
X509_V_ERR_CERT_REVOKED = 23
X509_V_ERR_INVALID_PURPOSE = 26


class ClientCertPolicy(enum.IntEnum):
    """``STPD_HTTPS_USE_CLIENT_CERT``: see SPEC.md, the level table."""

    IGNORE = 0  # not requested
    WARN = 1  # requested, validated, invalid ones served with a WARNING
    REQUIRE = 2  # required, validated, invalid ones refused with an ERROR


@dataclass(frozen=True)
class OutOfDate:
    """A certificate of the peer's chain that failed for its dates: most
    often a clock that is wrong, here or on the peer, so its dates are
    said beside this machine's time."""

    depth: int  # 0: the peer's own certificate; 1: the root CA
    name: str  # its CN
    not_before: datetime
    not_after: datetime


@dataclass
class PeerVerdict:
    """What the verify callback saw of one peer's certificate chain.
    ``peer_role`` is what the peer must be: "client" when STPD verifies a
    client, "server" when SBC verifies a server."""

    problems: list[str] = field(default_factory=list)
    errors: set[int] = field(default_factory=set)  # OpenSSL X509_V_ERR_* codes seen
    peer_role: str = "client"
    subject: str | None = None  # the peer certificate's subject (RFC 4514), once seen
    out_of_date: list[OutOfDate] = field(default_factory=list)  # expired or not yet valid

    def record(self, errnum: int, depth: int, subject: str) -> None:
        self.errors.add(errnum)
        if errnum == X509_V_ERR_UNABLE_TO_GET_CRL and self.errors & _NOT_OUR_CA_ERRORS:
            return  # of course no CRL of ours is for another CA's certificate
        if errnum == X509_V_ERR_INVALID_PURPOSE:
            role = self.peer_role
            reason = f"not a {role} certificate (no {role}Auth extended key usage)"
        else:
            reason = _VERIFY_REASONS.get(errnum) or verify_error_text(errnum)
        where = "" if depth == 0 else f" (chain depth {depth}: {subject})"
        text = reason + where
        if text not in self.problems:
            self.problems.append(text)

    @property
    def reason(self) -> str:
        return "; ".join(self.problems)


def verify_error_text(errnum: int) -> str:
    from OpenSSL._util import ffi, lib  # OpenSSL's own words for its codes

    try:
        return str(ffi.string(lib.X509_verify_cert_error_string(errnum)).decode())
    except Exception:  # pragma: no cover - binding without that symbol
        return f"verify error {errnum}"


def _common_name(cert: crypto.X509) -> str:
    """The CN for a log line, through cryptography (pyOpenSSL's X509Name
    API is deprecated); never raises, since an exception in the verify
    callback would abort the handshake with a Python error."""
    try:
        names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else "?"
    except Exception:  # pragma: no cover - a certificate cryptography cannot parse
        return "?"


def _subject(cert: crypto.X509) -> str | None:
    """The subject for a log line; never raises (see _common_name)."""
    try:
        return cert.to_cryptography().subject.rfc4514_string()
    except Exception:  # pragma: no cover - a certificate cryptography cannot parse
        return None


def _verify_callback(
    conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    verdict = conn.get_app_data()
    if depth == 0 and isinstance(verdict, PeerVerdict) and verdict.subject is None:
        verdict.subject = _subject(cert)  # a refusal's log line names whom it refused
    if not ok and isinstance(verdict, PeerVerdict):
        verdict.record(errnum, depth, _common_name(cert))
        if errnum in (X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED):
            dates = _out_of_date(cert, depth)
            if dates is not None and dates not in verdict.out_of_date:
                verdict.out_of_date.append(dates)
    policy = getattr(conn.get_context(), "client_cert_policy", ClientCertPolicy.REQUIRE)
    # Level 1 accepts whatever it was shown; the verdict decides the warning.
    return True if policy == ClientCertPolicy.WARN else bool(ok)


def _out_of_date(cert: crypto.X509, depth: int) -> OutOfDate | None:
    """``cert``'s dates; never raises (see _common_name)."""
    try:
        parsed = cert.to_cryptography()
        return OutOfDate(
            depth, _common_name(cert), parsed.not_valid_before_utc, parsed.not_valid_after_utc
        )
    except Exception:  # pragma: no cover - a certificate cryptography cannot parse
        return None


def _hardened_context(method: int) -> SSL.Context:
    ctx = SSL.Context(method)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(
        SSL.OP_NO_COMPRESSION  # CRIME
        | SSL.OP_NO_RENEGOTIATION  # renegotiation DoS and its old bugs
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_TICKET  # no resumption state kept for idle clients
    )
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.set_verify_depth(VERIFY_DEPTH)
    return ctx


def _require_file(path: Path, what: str, fix: str) -> None:
    """PkiError unless ``path`` is a file this user can read."""
    try:
        is_file = stat.S_ISREG(path.stat().st_mode)
        if is_file:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except FileNotFoundError:
        raise PkiError(f"{what} {path} not found: {fix}") from None
    except OSError as exc:
        raise PkiError(unreadable(path, what, exc)) from None
    if not is_file:
        raise PkiError(f"{what} {path} is not a file: {fix}")


def _load_cert_and_key(ctx: SSL.Context, cert: Path, key: Path, fix: str) -> None:
    _require_file(cert, "certificate", fix)
    _require_file(key, "private key", fix)
    try:
        ctx.use_certificate_chain_file(str(cert))
    except SSL.Error as exc:
        raise PkiError(f"certificate {cert} is not a PEM certificate ({exc}): {fix}") from None
    try:
        ctx.use_privatekey_file(str(key))
    except SSL.Error as exc:
        # OpenSSL checks the key against the certificate loaded above: a
        # valid key of another certificate fails here, not in check_privatekey.
        if "key values mismatch" in str(exc):
            raise PkiError(f"private key {key} does not match certificate {cert}: {fix}") from None
        raise PkiError(f"private key {key} cannot be read as a PEM key: {fix}") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise PkiError(f"private key {key} does not match certificate {cert}: {fix}") from None


def _load_ca(ctx: SSL.Context, layout: Layout) -> x509.Certificate:
    # Not "create it": a CA made on an RDS or a client signed nothing the
    # other side has (but on the backup server, before any certificate).
    fix = (
        "copy ca/rootCA.pem here from the backup server, where `sm_ssl_cert ca` created it "
        "(a CA created here would not be the one that signed the other side's certificates)"
    )
    _require_file(layout.ca_cert, "root CA certificate", fix)
    try:
        ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    except (ValueError, OSError) as exc:
        raise PkiError(
            f"root CA certificate {layout.ca_cert} is unreadable ({exc}): {fix}"
        ) from None
    if not is_ca_certificate(ca):
        raise PkiError(
            f"{layout.ca_cert} is not a CA certificate (no basicConstraints CA:TRUE): {fix}"
        )
    ctx.load_verify_locations(str(layout.ca_cert))
    return ca


def load_crl(layout: Layout, ca: x509.Certificate) -> x509.CertificateRevocationList | None:
    """The CRL beside the CA, if any; one that our CA did not sign is an error."""
    if not layout.crl.exists():
        return None
    try:
        crl = x509.load_pem_x509_crl(layout.crl.read_bytes())
    except (ValueError, OSError) as exc:
        raise PkiError(
            f"CRL {layout.crl} is unreadable ({exc}): re-create it with `sm_ssl_cert crl`"
        ) from None
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise PkiError(
            f"CRL {layout.crl} is not signed by {layout.ca_cert}: re-create it with `sm_ssl_cert crl`"
        )
    return crl


def _check_revocations(ctx: SSL.Context, layout: Layout, ca: x509.Certificate) -> None:
    """The peer's certificate is checked against ca/crl.pem, where there is one."""
    crl = load_crl(layout, ca)
    if crl is not None:
        store = ctx.get_cert_store()
        assert store is not None
        store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)


def server_context(
    layout: Layout,
    policy: ClientCertPolicy,
    *,
    cert: Path | None = None,
    key: Path | None = None,
) -> SSL.Context:
    """The STPD context: always presents the server certificate; asks for a
    client certificate at levels 1 and 2 and verifies it against our root CA
    (and its CRL when one exists)."""
    cert = cert or layout.server_cert
    key = key or layout.server_key
    ctx = _hardened_context(SSL.TLS_SERVER_METHOD)
    # Issued where the CA is: in place there, else with --path and copied here.
    if layout.has_ca_key():
        fix = f"create it with {layout.command('server --common-name=<names>')}"
    else:
        fix = (
            "issue it with `sm_ssl_cert server --common-name=<names>` where the CA is (for "
            "another machine with --path DIR, then copy server.pem and server.key into "
            f"{cert.parent})"
        )
    _load_cert_and_key(ctx, cert, key, fix)
    ctx.client_cert_policy = policy  # type: ignore[attr-defined]  # read by _verify_callback
    if policy == ClientCertPolicy.IGNORE:
        ctx.set_verify(SSL.VERIFY_NONE)
        return ctx
    _check_revocations(ctx, layout, _load_ca(ctx, layout))
    # Tell clients which CA we trust so that they pick the right certificate.
    ctx.load_client_ca(str(layout.ca_cert).encode())
    mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
    if policy == ClientCertPolicy.REQUIRE:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode, _verify_callback)
    return ctx


def client_context(
    layout: Layout, *, present_cert: bool, verify_server: bool, check_crl: bool = True
) -> SSL.Context:
    """The SBC context: ``SBC_CLIENT_SSL_AUTH`` decides whether we present
    ``x.509/client.pem``; ``SBC_SSL_SERVER_VERIFY`` whether we verify the
    server's chain (names are checked after the handshake), against
    ``ca/crl.pem`` too where there is one, unless not ``check_crl``."""
    ctx = _hardened_context(SSL.TLS_CLIENT_METHOD)
    if present_cert:
        fix = (
            "issue one for this client with `sm_ssl_cert client --oid CN:<its name> --path DIR` "
            f"where the CA is, and copy client.pem and client.key into {layout.client_dir}"
        )
        _load_cert_and_key(ctx, layout.client_cert, layout.client_key, fix)
    if verify_server:
        # A revoked server certificate (an RDS's stolen key) is refused only
        # where the CRL has been copied beside rootCA.pem.
        ca = _load_ca(ctx, layout)
        if check_crl:
            _check_revocations(ctx, layout, ca)
        # The callback records why a chain failed, for SBC's one-line error.
        ctx.set_verify(SSL.VERIFY_PEER, _verify_callback)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx


def new_connection(
    ctx: SSL.Context, sock: Any = None, *, server_hostname: str | None = None
) -> SSL.Connection:
    """A connection on ``sock`` (None: memory BIOs) with a fresh verdict;
    ``server_hostname`` makes it the client side and sets SNI for names."""
    conn = SSL.Connection(ctx, sock)
    conn.set_app_data(PeerVerdict(peer_role="client" if server_hostname is None else "server"))
    if server_hostname is None:
        conn.set_accept_state()
    else:
        if ip_or_none(server_hostname) is None:
            conn.set_tlsext_host_name(server_hostname.encode("idna"))
        conn.set_connect_state()
    return conn


def peer_verdict(conn: SSL.Connection) -> PeerVerdict:
    verdict = conn.get_app_data()
    assert isinstance(verdict, PeerVerdict)
    return verdict


def client_certificate_problem(
    layout: Layout, now: datetime | None = None
) -> tuple[str, str] | None:
    """Why an STPD would refuse our ``x.509/client.pem``, as far as the
    client can tell by itself: ``(kind, text)`` with kind ``expired``,
    ``not-yet-valid``, ``purpose`` or ``unknown-ca``; None when it looks
    valid (or cannot be read: loading it reports that). SBC uses this when
    the server closed the connection without an alert it could read."""
    path = layout.client_cert
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    now = now or datetime.now(UTC)
    if cert.not_valid_after_utc < now:
        return "expired", f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > now:
        return (
            "not-yet-valid",
            f"{path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None  # no extended key usage: any purpose
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return "purpose", f"{path} has no clientAuth extended key usage"
    try:
        ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    except (OSError, ValueError):
        return None
    if not signed_by(cert, ca):
        return "unknown-ca", f"{path} is not signed by {layout.ca_cert}"
    return None


def check_server_names(cert: x509.Certificate, host: str) -> None:
    """Raise PkiError unless ``host`` matches one of the certificate's names."""
    names = certificate_names(cert)
    if not host_matches(host, names):
        raise PkiError(
            f"server certificate names {', '.join(names) or '(none)'} do not match host {host}: "
            "connect by one of those names, or re-issue the server certificate with this "
            f"name added, where the CA is: `sm_ssl_cert server --common-name="
            f"{','.join([*names, host])}` (with --path=DIR for an RDS)"
        )


def fingerprint_sha256(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()
