"""STPD's decisions, without I/O: who the peer is, and what a request means.

``judge_peer`` applies the ``STPD_HTTPS_USE_CLIENT_CERT`` table of SPEC.md to
what the TLS handshake saw. ``route`` turns a request line into one of a few
plain actions that the trio layer (``stpd.server``) carries out. Both are
tested without sockets.

HTTP API (stable; documented in README.md):

=======  ==========================  ===========================================
GET      /status                     JSON: version, level, uptime, transfers...
GET      /savesets                   JSON array of the caller's savesets
PUT/POST /savesets?source=PATH       body: a tar stream; 201 + JSON metadata
GET      /savesets/ID                the saveset's tar (header X-Sha256)
GET      /savesets/ID/meta           JSON metadata of one saveset
=======  ==========================  ===========================================

HEAD on a GET route is answered with GET's status and headers, no body.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
from cryptography import x509

from pki.names import SUBJECT_KEYS
from pki.tls import ANONYMOUS, NO_HANDSHAKE_REASON, NOT_TLS_REASONS, ClientCertPolicy
from stpd.config import MAX_REQUEST_TARGET
from stpd.store import SAVESET_ID

KEY_BY_OID = {oid: key for key, oid in SUBJECT_KEYS.items()}
MAX_SOURCE_CHARS = 4096  # a path longer than PATH_MAX is not a path
MAX_ENTRIES = 1000  # ?entry= parameters of one selective restore
NO_CERTIFICATE = "no client certificate presented"


# -- the peer ------------------------------------------------------------------


@dataclass(frozen=True)
class PeerDecision:
    """Serve or refuse, as whom, and the log line that says why."""

    serve: bool
    owner: str
    log_level: int  # logging.INFO / WARNING / ERROR
    message: str
    refusal: str = ""  # a refused client's answer: why, without its address
    # Level 1, a certificate presented and not accepted: why, for the client
    # (the STPD-Certificate-Not-Accepted header of every answer).
    not_accepted: str = ""


def identity_allowed(cert: x509.Certificate, allowed: tuple[str, ...]) -> bool:
    """``allowed`` items are ``FIELD:PATTERN`` (``CN:host1``, ``O:Example*``),
    matched against the subject's attributes with shell wildcards. FIELD is
    one of sm_ssl_cert's ``--oid`` keys (C, CN, DQ, GN, ... T), so that an
    administrator names fields the same way when issuing and allowing."""
    if not allowed:
        return True
    fields: dict[str, list[str]] = {}
    for attr in cert.subject:
        short = KEY_BY_OID.get(attr.oid, attr.rfc4514_attribute_name).upper()
        fields.setdefault(short, []).append(str(attr.value))
    for item in allowed:
        field, _, pattern = item.partition(":")
        for value in fields.get(field.strip().upper(), []):
            if fnmatch.fnmatchcase(value.lower(), pattern.strip().lower()):
                return True
    return False


def judge_peer(
    peer: str,
    policy: ClientCertPolicy,
    cert: x509.Certificate | None,
    problems: list[str],
    allowed: tuple[str, ...] = (),
) -> PeerDecision:
    """Apply the level table to a completed handshake."""
    if policy == ClientCertPolicy.IGNORE:
        return PeerDecision(True, ANONYMOUS, logging.INFO, f"client {peer} connected (level 0)")
    if cert is None:
        reason = NO_CERTIFICATE
    elif problems:
        reason = "; ".join(problems)
    elif not identity_allowed(cert, allowed):
        reason = f"client identity {cert.subject.rfc4514_string()} is not in STPD_ALLOWED_CLIENTS"
    else:
        owner = cert.subject.rfc4514_string()
        return PeerDecision(True, owner, logging.INFO, f"client {peer} authenticated as {owner}")
    subject = f" ({cert.subject.rfc4514_string()})" if cert is not None else ""
    if policy == ClientCertPolicy.WARN:
        return PeerDecision(
            True,
            ANONYMOUS,
            logging.WARNING,
            f"client {peer}{subject}: invalid client certificate: {reason}; "
            f"served as {ANONYMOUS} (STPD_HTTPS_USE_CLIENT_CERT=1)",
            not_accepted=reason if cert is not None else "",
        )
    refusal = f"{reason} (STPD_HTTPS_USE_CLIENT_CERT=2)"
    return PeerDecision(
        False, ANONYMOUS, logging.ERROR, f"refused client {peer}{subject}: {refusal}", refusal
    )


# OpenSSL's words for a failed handshake, in the words judge_peer uses.
_HANDSHAKE_REASONS = {
    "peer did not return a certificate": NO_CERTIFICATE,
}


# Alerts a client sends when it gives up on us (OpenSSL reports a received
# alert as "tlsv1 alert unknown ca" and the like), with what they mean.
_CLIENT_ALERTS = [
    ("unknown ca", "does not trust our server certificate (its rootCA.pem did not sign ours)"),
    ("certificate expired", "says our server certificate has expired"),
    ("unsupported certificate", "says our certificate is not a server certificate"),
    ("bad certificate", "rejected our server certificate"),
    ("certificate unknown", "rejected our server certificate"),
]


# OpenSSL's reasons for a handshake that failed before any certificate was
# looked at: the peer does not speak TLS, or not as we do. Not a refusal of
# a client certificate, at any level.
_NOT_A_CERTIFICATE_MATTER = (
    "http request",
    "https proxy request",
    *NOT_TLS_REASONS,
    "record layer failure",
    "unsupported protocol",
    "version too low",
    "no shared cipher",
    "no suitable signature algorithm",
    "unexpected message",
    "unexpected eof",
    "connection closed by peer",
)


def unread_request_answer(status: bytes, content_type: bytes, body: bytes) -> bytes:
    """A whole answer that closes the connection, for a request stpd does
    not read (h11 answers only one it has read)."""
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nConnection: close\r\n" % (status, content_type)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def with_reason(event: h11.Event) -> h11.Event:
    """``event`` with the standard reason phrase if it is a response without
    one: h11 sends none unless told (``HTTP/1.1 201 ``), which reads as a
    broken server in ``curl -v`` and in some clients' errors."""
    if not isinstance(event, h11.Response | h11.InformationalResponse) or event.reason:
        return event
    try:
        phrase = HTTPStatus(event.status_code).phrase
    except ValueError:  # a code http does not name: nothing standard to say
        return event
    return type(event)(
        status_code=event.status_code,
        headers=event.headers,
        http_version=event.http_version,
        reason=phrase,
    )


PLAIN_HTTP_REASON = "http request"  # OpenSSL's words for "GET / HTTP/1.1" on a TLS port
# The answer in clear to a plain HTTP request on the TLS port (as nginx does).
PLAIN_HTTP_ANSWER = unread_request_answer(
    b"400 Bad Request",
    b"text/plain",
    b"This is the TLS port of stpd: use https:// (plain HTTP is not served).\n",
)


def refusal_answer(refusal: str) -> bytes:
    """The 403 for a client refused after the handshake (one outside
    STPD_ALLOWED_CLIENTS), sent before anything of its request is read."""
    body = json.dumps({"error": refusal}, indent=1).encode() + b"\n"
    return unread_request_answer(b"403 Forbidden", b"application/json", body)


def is_plain_http(reason: str) -> bool:
    return reason.strip().lower() == PLAIN_HTTP_REASON


def refused_handshake(
    peer: str, policy: ClientCertPolicy, reason: str, subject: str | None = None
) -> PeerDecision:
    """A handshake OpenSSL failed. At level 2 that is our refusal of the
    client's certificate, unless the client sent an alert: then it gave up
    on us (e.g. it does not trust our server certificate), at any level;
    or unless it did not speak TLS as we do (plain HTTP, old protocol
    versions, weak ciphers only): a warning, at any level. A connection
    closed before its ClientHello is no handshake at all: an info line."""
    if reason == NO_HANDSHAKE_REASON:  # not worth a warning every time a monitor looks
        return PeerDecision(
            False,
            ANONYMOUS,
            logging.INFO,
            f"connection from {peer} closed without a TLS handshake (a port check?)",
        )
    reason = _HANDSHAKE_REASONS.get(reason.strip().lower(), reason)
    lowered = reason.lower()
    if is_plain_http(reason):
        return PeerDecision(
            False,
            ANONYMOUS,
            logging.WARNING,
            f"TLS handshake with {peer} failed: plain HTTP sent to the TLS port, "
            f"answered 400 in clear ({reason})",
        )
    if any(needle in lowered for needle in _NOT_A_CERTIFICATE_MATTER):
        return PeerDecision(
            False, ANONYMOUS, logging.WARNING, f"TLS handshake with {peer} failed: {reason}"
        )
    if " alert " in f" {lowered} ":
        what = next(
            (text for needle, text in _CLIENT_ALERTS if needle in lowered),
            "aborted the handshake",
        )
        return PeerDecision(
            False,
            ANONYMOUS,
            logging.WARNING,
            f"TLS handshake with {peer} failed: the client {what} ({reason})",
        )
    if policy == ClientCertPolicy.REQUIRE:
        whom = f" ({subject})" if subject else ""
        return PeerDecision(
            False,
            ANONYMOUS,
            logging.ERROR,
            f"refused client {peer}{whom}: {reason} (STPD_HTTPS_USE_CLIENT_CERT=2)",
        )
    return PeerDecision(
        False, ANONYMOUS, logging.WARNING, f"TLS handshake with {peer} failed: {reason}"
    )


# -- requests ----------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class ListSavesets:
    pass


@dataclass(frozen=True)
class Upload:
    source: str


@dataclass(frozen=True)
class Download:
    saveset: str
    # ?entry=NAME&entry=...: only these entries and what is under them
    entries: tuple[str, ...] = ()


@dataclass(frozen=True)
class Metadata:
    saveset: str


@dataclass(frozen=True)
class Entries:
    saveset: str


@dataclass(frozen=True)
class Verify:
    saveset: str


@dataclass(frozen=True)
class Reject:
    status: int
    message: str
    allow: str = ""  # a 405's Allow header: the methods the resource takes


Action = Status | ListSavesets | Upload | Download | Metadata | Entries | Verify | Reject
# GET /savesets/ID/NAME
_SAVESET_VIEWS: dict[str, Callable[[str], Action]] = {
    "meta": Metadata,
    "entries": Entries,
    "verify": Verify,
}


def _query_pairs(query: str, most: int, errors: str = "strict") -> list[tuple[str, str]] | Reject:
    """The parameters of ``query``, plainly percent-encoded (README), not a
    form's: "+" is a plus, not a space (curl -T FILE "...?source=/a+b",
    "?entry=a+b"; sbc sends %2B and %20)."""
    try:
        return parse_qsl(
            query.replace("+", "%2B"),
            keep_blank_values=True,
            strict_parsing=bool(query),
            errors=errors,
            max_num_fields=most,
        )
    except (ValueError, UnicodeDecodeError):
        return Reject(400, "malformed query string")


def _no_query(query: str) -> Reject | None:
    """A route without parameters refuses any (README: 400 for an unknown
    one), so that a client's typo is not served as if it had been heard."""
    pairs = _query_pairs(query, 8)
    if isinstance(pairs, Reject):
        return pairs
    if pairs:
        return Reject(400, f"unknown query parameter {sorted(k for k, _ in pairs)[0]!r}")
    return None


def _entries_value(query: str) -> tuple[str, ...] | Reject:
    """The ``entry`` parameters of a download (a selective restore). Names
    that are not UTF-8 are kept as tarfile reads them (surrogateescape),
    so that they match."""
    pairs = _query_pairs(query, MAX_ENTRIES, errors="surrogateescape")
    if isinstance(pairs, Reject):
        return pairs
    unknown = {key for key, _ in pairs} - {"entry"}
    if unknown:
        return Reject(400, f"unknown query parameter {sorted(unknown)[0]!r}")
    entries = tuple(value for _, value in pairs)
    if any(not e or "\x00" in e or len(e) > MAX_SOURCE_CHARS for e in entries):
        return Reject(400, "invalid entry name (empty, a NUL byte or longer than 4096 characters)")
    return entries


def _source_value(query: str) -> str | Reject:
    pairs = _query_pairs(query, 8)
    if isinstance(pairs, Reject):
        return pairs
    values = dict(pairs)
    if len(values) < len(pairs):  # "source=/a&source=/b": which one was backed up?
        repeated = sorted({k for k, _ in pairs if [n for n, _ in pairs].count(k) > 1})[0]
        return Reject(400, f"query parameter {repeated!r} given more than once")
    unknown = set(values) - {"source"}
    if unknown:
        return Reject(400, f"unknown query parameter {sorted(unknown)[0]!r}")
    source = values.get("source", "")
    if not source:
        return Reject(400, "missing query parameter source=PATH (the path that was backed up)")
    if "\x00" in source or len(source) > MAX_SOURCE_CHARS:
        return Reject(400, "invalid source path (NUL byte or longer than 4096 characters)")
    return source


_READING = ("GET", "HEAD")  # HEAD: GET's answer without the body (monitoring probes)
_ALLOW_READING = ", ".join(_READING)


def route(method: str, target: str) -> Action:
    if target.startswith("//"):  # a path with an empty segment, not "//host/..." (urlsplit)
        target = "/" + target.lstrip("/")
    try:
        parts = urlsplit(target)
    except ValueError:  # "http://[x/status": an unclosed IPv6 bracket in the host
        return Reject(400, "invalid request target")
    path = parts.path
    if "\x00" in unquote(path) or len(target) > MAX_REQUEST_TARGET:
        return Reject(400, "invalid request target")
    # Each segment percent-decoded, all alike ("/%73tatus" is "/status"); an
    # encoded "/" stays within its segment. Empty segments do not count.
    segments = [unquote(s) for s in path.split("/") if s]
    if segments == ["status"]:
        if method not in _READING:
            return Reject(405, "use GET /status", _ALLOW_READING)
        return _no_query(parts.query) or Status()
    if segments == ["savesets"]:
        if method in _READING:
            return _no_query(parts.query) or ListSavesets()
        if method in ("PUT", "POST"):
            source = _source_value(parts.query)
            return source if isinstance(source, Reject) else Upload(source)
        return Reject(405, "use GET, PUT or POST on /savesets", f"{_ALLOW_READING}, PUT, POST")
    if len(segments) in (2, 3) and segments[0] == "savesets":
        saveset = segments[1]
        if not SAVESET_ID.match(saveset):
            return Reject(400, "invalid saveset name (expected SS-YYYYMMDDTHHMMSSZ-xxxxxxxx)")
        if method not in _READING:
            return Reject(405, "use GET on a saveset", _ALLOW_READING)
        if len(segments) == 2:
            entries = _entries_value(parts.query)
            return entries if isinstance(entries, Reject) else Download(saveset, entries)
        view = _SAVESET_VIEWS.get(segments[2])
        if view is not None:
            return _no_query(parts.query) or view(saveset)
    return Reject(404, f"no such resource {path!r}")
