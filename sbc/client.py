"""The SBC side of the wire: connect, verify, and speak STPD's HTTP API.

Every failure an operator can cause or fix becomes one :class:`SbcError`
line saying what was refused, by whom, why, and what to do.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import h11
from cryptography import x509

from pki.console import colon_hex, one_line
from pki.errors import PkiError
from pki.files import open_to_others
from pki.tls import (
    NOT_ACCEPTED_HEADER,
    NOT_TLS_REASONS,
    X509_V_ERR_CERT_HAS_EXPIRED,
    X509_V_ERR_CERT_NOT_YET_VALID,
    X509_V_ERR_CERT_REVOKED,
    X509_V_ERR_CRL_HAS_EXPIRED,
    X509_V_ERR_CRL_NOT_YET_VALID,
    X509_V_ERR_INVALID_PURPOSE,
    OutOfDate,
    PeerVerdict,
    check_server_names,
    client_certificate_problem,
    client_context,
    fingerprint_sha256,
)
from sbc.archive import EVERYTHING, TreeStats, WalkOptions, write_tree
from sbc.config import SbcConfig
from sbc.extract import RestoreResult, extract_stream
from sbc.progress import TransferProgress
from stpd.body import ChunkedBody, LengthBody
from stpd.config import MAX_REQUEST_TARGET
from stpd.tlsconn import TLSBroken, TLSConnection, TLSHandshakeError, TLSTimeout
from stpd.transfer import Batch, BodyReader, send_batch, send_events_blocking

MAX_JSON_BYTES = 64 * 1024 * 1024  # a listing larger than this is not a listing
# Socket buffers on both sides hold a few MiB; once more than this was sent,
# stpd was reading our data (it refuses a client before reading any).
READ_BY_SERVER_BYTES = 64 * 1024 * 1024
# How long a backup waits for stpd's 100 Continue before it sends anyway (as curl does).
CONTINUE_WAIT = 1.0
# What a backup cut off before its end leaves: stpd removes what it received.
INTERRUPTED = "stpd keeps nothing of an interrupted backup, run it again"

# What sbc reads of stpd's answers (README, HTTP API), checked where they
# arrive: another HTTPS server's answer is then one line saying so, not a
# traceback where a field is used. NoneType: the field may be missing or null.
NoneType = type(None)
Fields = Mapping[str, type | tuple[type, ...]]
SAVESET_FIELDS: Fields = {
    "saveset": str,
    "bytes": int,
    "sha256": str,
    "source": str,
    "created": str,
    "owner": (str, NoneType),
}
ENTRY_FIELDS: Fields = {
    "name": str,
    "type": str,
    "size": int,
    "mode": str,
    "owner": str,
    "mtime": str,
    "link": (str, NoneType),
    "device": (dict, NoneType),
}
DEVICE_FIELDS: Fields = {"kind": str, "major": int, "minor": int}
DEVICES = ("char", "block")
LINK_TYPES = ("symlink", "hardlink")  # entries whose "link" says where to
VERDICT_FIELDS: Fields = {
    "intact": bool,
    "bytes": int,
    "sha256": str,
    "recorded_bytes": int,
    "recorded_sha256": str,
}
# An older stpd leaves some out.
STATUS_FIELDS: Fields = {
    "version": str,
    "server_certificate": (dict, NoneType),
    "storage": (dict, NoneType),
    "crl": (dict, NoneType),
}
STORAGE_FIELDS: Fields = {"free_bytes": int, "total_bytes": int}
CRL_FIELDS: Fields = {"next_update": str, "days_left": int}
OCTAL_MODE = re.compile(r"[0-7]{1,7}")


def _fits(value: Any, kind: type | tuple[type, ...]) -> bool:
    """Whether ``value`` is of ``kind``; a number (int) is a JSON integer as
    stpd writes them, not true or false, nor one past 64 bits (the free
    bytes of 1 followed by 400 zeros failed sbc status as a traceback)."""
    if kind is int:
        return type(value) is int and -(2**63) <= value < 2**63
    return isinstance(value, kind)


def misfit(value: Any, fields: Fields) -> str | None:
    """How the JSON ``value`` is not an object with ``fields`` (the first
    one missing or of another type); None when it is."""
    if not isinstance(value, dict):
        return "is not a JSON object"
    wrong = next((name for name, kind in fields.items() if not _fits(value.get(name), kind)), None)
    return None if wrong is None else f"has no valid {wrong!r}"


def entry_misfit(entry: Any) -> str | None:
    wrong = misfit(entry, ENTRY_FIELDS)
    if wrong is None and entry.get("device") is not None:
        wrong = misfit(entry["device"], DEVICE_FIELDS)
    if wrong is None and not OCTAL_MODE.fullmatch(entry["mode"]):
        wrong = "has no valid 'mode'"
    if wrong is None and entry["type"] in LINK_TYPES and not isinstance(entry.get("link"), str):
        wrong = "has no valid 'link'"
    if wrong is None and entry.get("device") is not None and entry["device"]["kind"] not in DEVICES:
        wrong = "has no valid 'kind' of device"
    return wrong


def status_misfit(status: Any) -> str | None:
    wrong = misfit(status, STATUS_FIELDS)
    for part, fields in (("storage", STORAGE_FIELDS), ("crl", CRL_FIELDS)):
        if wrong is None and status.get(part) is not None:
            wrong = misfit(status[part], fields)
    return wrong


class _AnsweredEarly(Exception):
    """stpd answered before the end of a backup: stop sending."""


class _Silent(Exception):
    """stpd sent nothing within a short wait (see Session._await_continue)."""


class SbcError(Exception):
    """One line for the operator: what, by whom, why, what to do."""


# Why an STPD refuses a client: what to tell the operator, and what to do.
_REFUSALS = {
    "no-cert": (
        "this client presented no certificate",
        "set SBC_CLIENT_SSL_AUTH=1 in sm.ini and install x.509/client.pem and client.key "
        "(made with `sm_ssl_cert client` on the backup server)",
    ),
    "unknown-ca": (
        "our client certificate is not signed by the server's root CA",
        "issue a new one with `sm_ssl_cert client` on the backup server and copy it to x.509/",
    ),
    "expired": (
        "our client certificate has expired",
        "issue a new one with `sm_ssl_cert client` on the backup server and copy it to x.509/",
    ),
    # OpenSSL sends the "certificate expired" alert for a CRL past its next
    # update too: with our certificate in date, that is the likelier cause.
    "crl-expired": (
        "stpd says a certificate has expired, but our client certificate is in date here",
        "its CRL (ca/crl.pem) is probably past its next update, or its clock is wrong; "
        "ask the administrator to write a new CRL with `sm_ssl_cert crl` and copy it there "
        "(stpd's log names the reason)",
    ),
    "not-yet-valid": (
        "our client certificate is not yet valid",
        "check the clocks of this machine and of the backup server, or issue a new one "
        "with `sm_ssl_cert client`",
    ),
    "revoked": (
        "our client certificate has been revoked",
        "ask the administrator for a new client certificate",
    ),
    # Level 1: stpd's own words (STPD-Certificate-Not-Accepted), for what only
    # it can see: its CRL, its STPD_ALLOWED_CLIENTS.
    "told": (
        "",
        "ask its administrator for a new client certificate, or to allow this one",
    ),
    "purpose": (
        "our certificate is not a client certificate (no clientAuth usage)",
        "use the certificate made by `sm_ssl_cert client`, not a server certificate",
    ),
    "bad": (
        "the server rejected our client certificate",
        "check the stpd log for the reason; re-issue it with `sm_ssl_cert client`",
    ),
}

# OpenSSL alert texts a refusing STPD sends.
_ALERTS = [
    ("certificate required", "no-cert"),
    ("unknown ca", "unknown-ca"),
    ("certificate expired", "expired"),
    ("certificate revoked", "revoked"),
    ("unsupported certificate", "purpose"),
    ("bad certificate", "bad"),
]


def _refusal_kind(reason: str, local: tuple[str, str] | None) -> tuple[str | None, str]:
    """Which of _REFUSALS a broken-off connection is (None: not a refusal we
    can name), and the reason with our local finding added."""
    lowered = reason.lower()
    kind = next((kind for needle, kind in _ALERTS if needle in lowered), None)
    if kind == "expired" and local is None:
        return "crl-expired", reason
    if local is not None and kind in (None, "bad"):
        kind, detail = local
        reason = f"{reason}; {detail}"
    return kind, reason


def explain_refusal(
    where: str, reason: str, local: tuple[str, str] | None = None, unnamed: str = ""
) -> SbcError:
    """One line for a connection STPD broke off. ``reason`` is what TLS
    said; ``local`` is what we found wrong with our own certificate (see
    :func:`pki.tls.client_certificate_problem`), used when the alert was
    lost or says no more than "bad certificate". ``unnamed`` is the line
    for a break that names no refusal (default: the connection failed)."""
    kind, detailed = _refusal_kind(reason, local)
    if kind is None:
        return SbcError(unnamed or f"connection to stpd at {where} failed: {detailed}")
    what, fix = _REFUSALS[kind]
    return SbcError(f"refused by stpd at {where}: {what} ({detailed}); {fix}")


@dataclass
class Response:
    status: int
    headers: dict[str, str]


class Session:
    """One verified TLS connection to an STPD, used for one or more requests.

    Blocking: sbc is a command with one connection and one thing to do at
    a time, so it needs no event loop (and does not pay for importing
    trio); the bulk of a body moves in C with poll() (``stpd.tlsconn``)."""

    def __init__(
        self, config: SbcConfig, server: tuple[str, int], warn: Callable[[str], None]
    ) -> None:
        """``warn`` tells the user something that does not stop the command
        (an unverified server)."""
        self.config = config
        self.warn = warn
        self.host, self.port = server
        self.where = f"{self.host}:{self.port}"
        self.tls: TLSConnection | None = None
        self.conn = h11.Connection(h11.CLIENT)
        self.answers = 0  # responses received on this connection
        self.sent = 0  # body bytes the kernel took on this connection
        self.accepted = False  # stpd answered 100 Continue: it reads our request
        # A backup's whole body is sent and its answer awaited: stpd may have
        # stored it by now, so a break is not "nothing kept" (see _outcome_unknown).
        self.sent_whole_backup = False
        self._early_answer: h11.Event | None = None  # read while sending a backup
        # What is wrong with our client certificate, as far as we can tell,
        # when stpd asked for it and served us all the same: level 1 serves
        # a certificate it refuses as anonymous (see _check_served_as).
        self.served_as_anonymous: tuple[str, str] | None = None

    def __enter__(self) -> Session:
        try:
            self.connect()
        except BaseException:
            self.__exit__()  # a refused or failed connection is closed too
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tls is not None:
            self.tls.close_blocking()

    def connect(self) -> None:
        try:
            ctx = client_context(
                self.config.layout,
                present_cert=self.config.client_ssl_auth,
                verify_server=self.config.server_verify,
                check_crl=self.config.check_server_crl,
            )
        except PkiError as exc:
            raise SbcError(str(exc)) from None
        if self.config.client_ssl_auth:
            loose = open_to_others(self.config.layout.client_key, "private key")
            if loose is not None:
                self.warn(loose)
        try:
            tcp = socket.create_connection((self.host, self.port), self.config.connect_timeout)
        except TimeoutError:
            raise SbcError(
                f"no answer from stpd at {self.where} within {self.config.connect_timeout:g}s: "
                "check the address and any firewall"
            ) from None
        except OSError as exc:
            raise SbcError(
                f"cannot connect to stpd at {self.where}: {exc.strerror or exc}; is stpd running "
                f"there? (the address comes from {self.config.server_from})"
            ) from None
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # heads go out at once
        tcp.setblocking(False)  # OpenSSL returns "want read/write"; we wait with poll()
        self.tls = TLSConnection(tcp, ctx, server_hostname=self.host)
        try:
            self.tls.handshake_blocking(self.config.connect_timeout)
        except TLSTimeout:
            raise SbcError(f"TLS handshake with stpd at {self.where} timed out") from None
        except TLSHandshakeError as exc:
            verdict = self.tls.verdict
            if verdict.problems:
                raise SbcError(
                    f"server certificate of stpd at {self.where} failed verification: "
                    f"{verdict.reason}; {self._server_fix(verdict)} "
                    "(SBC_SSL_SERVER_VERIFY=0 skips this check, unsafe)"
                ) from None
            raise self._broken_off(exc) from None
        except TLSBroken as exc:
            raise self._broken_off(exc) from None
        self._check_server()

    def _server_fix(self, verdict: PeerVerdict) -> str:
        """What to do about a server certificate that failed verification."""
        errors = verdict.errors
        reissue = (
            "re-issue it on the backup server with `sm_ssl_cert server --common-name=<names>` "
            "(with --path=DIR for an RDS), install it and send stpd SIGHUP"
        )
        if X509_V_ERR_INVALID_PURPOSE in errors:
            return f"stpd presents a certificate without serverAuth usage: {reissue}"
        crl = self.config.layout.crl
        if X509_V_ERR_CERT_REVOKED in errors:
            return (
                f"{crl} here revokes it: if that server is to be trusted again, {reissue}; "
                "else back up elsewhere"
            )
        # Before the CRL: a clock that is wrong makes it fail too.
        if errors & {X509_V_ERR_CERT_HAS_EXPIRED, X509_V_ERR_CERT_NOT_YET_VALID}:
            return self._dates_fix(verdict.out_of_date, reissue)
        if X509_V_ERR_CRL_NOT_YET_VALID in errors:
            return (
                f"{crl} here is not yet valid{self._crl_dates()}: check the clocks of this "
                "machine and of the CA machine, where `sm_ssl_cert crl` wrote it"
            )
        if X509_V_ERR_CRL_HAS_EXPIRED in errors:
            return (
                f"{crl} here is out of date (past its next update{self._crl_dates()}), so no "
                "certificate passes the check against it: copy the current ca/crl.pem from "
                "the backup server"
            )
        return (
            f"check that {self.config.layout.ca_cert} is the root CA that signed the "
            "server's certificate"
        )

    @staticmethod
    def _dates_fix(out_of_date: list[OutOfDate], reissue: str) -> str:
        """A certificate of the server's chain out of its dates: said with
        them and this machine's time, since a wrong clock here or there is
        the likelier cause (a certificate is issued for years)."""
        said = [
            f"{'the server certificate' if cert.depth == 0 else 'the root CA'} CN={cert.name} "
            f"is valid from {cert.not_before:%Y-%m-%d %H:%M} to {cert.not_after:%Y-%m-%d %H:%M} UTC"
            for cert in out_of_date
        ]
        dates = "; ".join(said) or "its dates could not be read"  # (cryptography cannot parse it)
        fix = (
            reissue
            if not out_of_date or any(cert.depth == 0 for cert in out_of_date)
            else "the root CA must be made anew with `sm_ssl_cert ca --force` on the CA "
            "machine, and every certificate re-issued from it"
        )
        return (
            f"{dates}, and this machine's clock says {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: "
            f"check the clocks of this machine and of the server; if both are right, {fix}"
        )

    def _crl_dates(self) -> str:
        """The local CRL's dates beside this machine's time, for a CRL that
        failed for them ("" when it cannot be read)."""
        try:
            crl = x509.load_pem_x509_crl(self.config.layout.crl.read_bytes())
        except (OSError, ValueError):
            return ""
        next_update = crl.next_update_utc
        until = f", its next {next_update:%Y-%m-%d %H:%M} UTC" if next_update is not None else ""
        return (
            f": its last update is {crl.last_update_utc:%Y-%m-%d %H:%M} UTC{until}, and this "
            f"machine's clock says {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        )

    def _broken_off(self, exc: BaseException) -> SbcError:
        """The connection broke before STPD answered anything: in TLS 1.3 a
        level-2 STPD refuses a client certificate after the client's side of
        the handshake is done, so this is most likely a refusal. Its alert
        says why when we could read it; else we look at our own certificate."""
        reason = str(exc).rstrip(": ") or "connection reset"
        if self.answers:
            return SbcError(f"connection to stpd at {self.where} lost: {reason}")
        if any(words in reason.lower() for words in NOT_TLS_REASONS):
            return SbcError(
                f"what answers at {self.where} does not speak TLS ({reason}): another service "
                "listens there, not stpd; check the port in --server or SBC_SERVER in sm.ini "
                "(stpd's is STPD_HTTPS_LISTEN in stpd.ini, customarily 11443)"
            )
        if self._was_accepted():
            return self._lost_mid_backup(reason)
        if not self.config.client_ssl_auth:
            local: tuple[str, str] | None = (
                "no-cert",
                "SBC_CLIENT_SSL_AUTH=0 in sm.ini: no certificate presented",
            )
        else:
            local = client_certificate_problem(self.config.layout)
        return explain_refusal(
            self.where,
            reason,
            local,
            unnamed=f"stpd at {self.where} closed the connection before answering ({reason}): "
            "it refused this client (a revoked certificate, say), or had too many connections "
            "from this address in their TLS handshake to take one more; the stpd log says which",
        )

    @property
    def certificate_asked(self) -> bool:
        """Whether stpd asked for a client certificate (levels 1 and 2 name
        our root CA in the request; level 0 asks for none)."""
        return self.tls is not None and bool(self.tls.conn.get_client_ca_list())

    def _was_accepted(self) -> bool:
        """stpd read our request: it answered 100 Continue, or took more
        data than the socket buffers on the way can hold. It refuses a
        certificate before reading anything (and one outside its allow-list
        with an answer), so a break now is not a refusal."""
        return self.accepted or self.sent > READ_BY_SERVER_BYTES

    def _outcome_unknown(self, what: str) -> SbcError:
        return SbcError(
            f"{what} after the whole backup ({self.sent / 1e6:.1f} MB) was sent: stpd may have "
            "stored it (storing a large saveset on a slow disk takes time); `sbc list` shows "
            "it if it was, else run the backup again"
        )

    def _lost_mid_backup(self, reason: str) -> SbcError:
        if self.sent_whole_backup:
            return self._outcome_unknown(f"connection to stpd at {self.where} lost ({reason})")
        return SbcError(
            f"connection to stpd at {self.where} lost during the backup after "
            f"{self.sent / 1e6:.1f} MB ({reason}): stpd stopped or the network failed; "
            f"{INTERRUPTED}"
        )

    def _check_server(self) -> None:
        assert self.tls is not None
        cert = self.tls.peer_certificate
        if self.config.server_verify:
            assert cert is not None  # VERIFY_PEER guarantees one
            try:
                if self.config.check_names:
                    check_server_names(cert, self.host)
            except PkiError as exc:
                raise SbcError(f"stpd at {self.where} not trusted: {exc}") from None
        else:
            self.warn(
                f"server certificate of {self.where} NOT verified (SBC_SSL_SERVER_VERIFY=0): "
                "anyone on the network path could impersonate the server"
            )
        pin = self.config.server_fingerprint
        if pin is not None and (cert is None or fingerprint_sha256(cert) != pin):
            actual = colon_hex(bytes.fromhex(fingerprint_sha256(cert))) if cert else "none"
            raise SbcError(
                f"stpd at {self.where} presented certificate {actual}, not {self.config.pinned} "
                f"{colon_hex(bytes.fromhex(pin))}: {self.config.pin_mismatch}"
            )

    # -- HTTP ------------------------------------------------------------------

    def _headers(self, extra: list[tuple[str, str]] = ()) -> list[tuple[str, str]]:  # type: ignore[assignment]
        return [("Host", self.where), ("User-Agent", "sbc"), *extra]

    def _send_raw(self, *events: h11.Event) -> None:
        """Send; TLS errors propagate (the backup sender handles them)."""
        assert self.tls is not None
        send_events_blocking(self.tls, self.conn, events, self.config.io_timeout)

    def _send(self, *events: h11.Event) -> None:
        """Send; a broken or stalled connection becomes an SbcError line."""
        try:
            self._send_raw(*events)
        except TLSTimeout:
            raise SbcError(
                f"stpd at {self.where} stopped reading our request ({self.config.io_timeout:g}s)"
            ) from None
        except TLSBroken as exc:
            raise self._broken_off(exc) from None

    def _next_event(self, timeout: float | None = None) -> h11.Event:
        """The next event from stpd, waiting up to SBC_IO_TIMEOUT; with
        ``timeout``, up to that, and silence raises ``_Silent``."""
        assert self.tls is not None
        if self._early_answer is not None:  # read while sending a backup
            early, self._early_answer = self._early_answer, None
            return early
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise SbcError(f"stpd at {self.where} sent a malformed answer: {exc}") from None
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = self.tls.receive_borrowed_blocking(timeout or self.config.io_timeout)
            except TLSTimeout:
                if timeout is not None:
                    raise _Silent from None
                silent = f"stpd at {self.where} stopped answering ({self.config.io_timeout:g}s)"
                if self.sent_whole_backup:
                    raise self._outcome_unknown(
                        f"{silent}; raise SBC_IO_TIMEOUT in sm.ini"
                    ) from None
                raise SbcError(silent) from None
            except TLSBroken as exc:
                raise self._broken_off(exc) from None
            if not data and not self.answers:
                # A clean close before any answer: stpd refused us after the handshake.
                raise self._broken_off(EOFError("closed by stpd"))
            self.conn.receive_data(data)  # type: ignore[arg-type]  # h11 copies any bytes-like

    def _response(self) -> Response:
        while True:
            event = self._next_event()
            if isinstance(event, h11.Response):
                self.answers += 1
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                if self.answers == 1:
                    self._check_served_as(headers.get(NOT_ACCEPTED_HEADER.lower()))
                return Response(event.status_code, headers)
            if isinstance(event, h11.InformationalResponse):
                self.accepted = True  # 100 Continue
                continue
            if isinstance(event, h11.ConnectionClosed):  # not reached: _next_event raises first
                raise self._broken_off(EOFError("closed by stpd"))

    def _check_served_as(self, told: str | None) -> None:
        """At stpd's first answer: it asked for our certificate and served
        us, though the certificate is out of date (or otherwise one it
        cannot accept): level 1 then takes us for anonymous, and every
        command acts on the savesets of anonymous without a word. What
        this machine cannot see (a revocation in stpd's CRL, its
        STPD_ALLOWED_CLIENTS), stpd ``told`` in its answer's header."""
        if not (self.config.client_ssl_auth and self.certificate_asked):
            return
        self.served_as_anonymous = client_certificate_problem(self.config.layout)
        if self.served_as_anonymous is None and told:
            self.served_as_anonymous = ("told", one_line(told))  # a server's words: no escapes
        if self.served_as_anonymous is None:
            return
        kind, detail = self.served_as_anonymous
        what, fix = _REFUSALS[kind]
        reason = detail if kind == "told" else f"{what} ({detail})"
        self.warn(
            f"stpd at {self.where} did not accept our client certificate: {reason}; "
            "it serves this client as anonymous (STPD_HTTPS_USE_CLIENT_CERT=1): it lists and "
            "restores the savesets of every client without a valid certificate instead of this "
            f"client's, and stores its backups where each of them can restore them; {fix}"
        )

    def _await_continue(self) -> bool:
        """After a request head with ``Expect: 100-continue``: True when
        stpd answered 100 Continue (it reads our body, see _was_accepted)
        or said nothing for CONTINUE_WAIT seconds; False when it gave its
        final answer instead (a refusal), which _response returns next."""
        try:
            event = self._next_event(CONTINUE_WAIT)
        except _Silent:
            return True
        if isinstance(event, h11.InformationalResponse):
            self.accepted = True
            return True
        self._early_answer = event
        return False

    def _json_body(self) -> Any:
        chunks, size = [], 0
        while True:
            event = self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_JSON_BYTES:
                    raise SbcError(f"answer from stpd at {self.where} is too large")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise SbcError(f"stpd at {self.where} closed the connection mid-answer")
        try:
            return json.loads(b"".join(chunks))
        except ValueError:
            raise self._not_stpd("its answer is not JSON") from None

    def _not_stpd(self, why: str) -> SbcError:
        return SbcError(
            f"what answers at {self.where} does not look like stpd: {why}; check the address "
            "in --server or SBC_SERVER in sm.ini"
        )

    def _expect(self, wrong: str | None, answer_to: str) -> None:
        """``wrong``: how an answer is not what stpd sends (see misfit)."""
        if wrong is not None:
            raise self._not_stpd(f"its answer to {answer_to} {wrong}")

    def _next_cycle(self) -> None:
        """Ready for another request, unless the answer closes the connection
        (Connection: close, valid HTTP; stpd does not, other servers may)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()

    def _failure(self, response: Response, body: Any, what: str) -> SbcError:
        """stpd's error answer in one line: it refused the request (4xx), or
        could not complete it (408: our data stopped coming; 5xx: a full
        disk), which an operator fixes elsewhere than a refusal."""
        message = body.get("error") if isinstance(body, dict) else None
        message = message or f"HTTP {response.status}"
        if response.status == 404 and self.served_as_anonymous is not None:
            message += (
                " (stpd did not accept our client certificate, so it took this client for "
                "anonymous: see the warning above)"
            )
        if response.status == 408 or response.status >= 500:
            return SbcError(f"{what} failed on stpd at {self.where}: {message}")
        return SbcError(f"{what} refused by stpd at {self.where}: {message}")

    def get_json(self, target: str) -> Any:
        self._send(
            h11.Request(method="GET", target=target, headers=self._headers()), h11.EndOfMessage()
        )
        response = self._response()
        body = self._json_body()
        if response.status != 200:
            raise self._failure(response, body, f"GET {target}")
        self._next_cycle()
        return body

    def savesets(self) -> list[dict[str, Any]]:
        """The metadata of our savesets on stpd."""
        found = self.get_json("/savesets")
        if not isinstance(found, list):
            raise self._not_stpd("its answer to GET /savesets is not a JSON array")
        for meta in found:
            self._expect(misfit(meta, SAVESET_FIELDS), "GET /savesets")
        return found

    def status(self) -> dict[str, Any]:
        status = self.get_json("/status")
        self._expect(status_misfit(status), "GET /status")
        return dict(status)

    def entries(self, saveset: str) -> Iterator[dict[str, Any]]:
        """The entries of ``saveset`` as stpd reads them from its tar: handed
        on as they come, none kept."""
        target = f"/savesets/{quote(saveset, safe='')}/entries"
        for entry in self._json_lines(target, f"listing of {saveset}"):
            self._expect(entry_misfit(entry), f"GET {target}")
            yield entry

    def verify(self, saveset: str) -> dict[str, Any]:
        """stpd's verdict on ``saveset``: its stored data hashed anew against
        the checksum recorded at backup (``intact``, ``sha256``, ...)."""
        verdict: dict[str, Any] = {}
        target = f"/savesets/{quote(saveset, safe='')}/verify"
        for line in self._json_lines(target, f"verification of {saveset}"):
            verdict = line  # {"checked": N} while stpd hashes, then the verdict
        if "intact" not in verdict:
            raise SbcError(f"stpd at {self.where} ended the verification without a verdict")
        self._expect(misfit(verdict, VERDICT_FIELDS), f"GET {target}")
        return verdict

    def _json_lines(self, target: str, what: str) -> Iterator[dict[str, Any]]:
        """GET ``target``: an answer of one JSON object a line (chunked)."""
        self._send(
            h11.Request(method="GET", target=target, headers=self._headers()), h11.EndOfMessage()
        )
        response = self._response()
        if response.status != 200:
            raise self._failure(response, self._json_body(), what)
        pending = b""
        while not isinstance(event := self._next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise SbcError(f"stpd at {self.where} closed the connection mid-answer")
            *lines, pending = (pending + event.data).split(b"\n")
            if len(pending) > MAX_JSON_BYTES:
                raise SbcError(f"answer from stpd at {self.where} is too large")
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    entry = None
                if not isinstance(entry, dict):
                    raise self._not_stpd(
                        f"a line of its answer to GET {target} is not a JSON object"
                    )
                yield entry
        if pending.strip():
            raise SbcError(f"stpd at {self.where} ended the {what} mid-line")
        self._next_cycle()

    def backup(
        self,
        source: Path,
        progress: TransferProgress | None = None,
        options: WalkOptions = EVERYTHING,
    ) -> tuple[dict[str, Any], TreeStats]:
        """Stream ``source`` as a tar archive (see ``write_tree``); returns
        the server's metadata."""
        stats = TreeStats()
        # source is what listings show: a name that is not UTF-8 (an old
        # Latin-1 disk) is recorded with \xNN for the bytes UTF-8 lacks.
        shown = os.fsencode(source).decode("utf-8", "backslashreplace")
        target = "/savesets?source=" + quote(shown, safe="/")
        self._send(
            h11.Request(
                method="PUT",
                target=target,
                headers=self._headers(
                    [
                        ("Transfer-Encoding", "chunked"),
                        ("Content-Type", "application/x-tar"),
                        # Its arrival tells a broken connection later from a
                        # refusal (see _was_accepted), and a refusal comes
                        # before we send any data.
                        ("Expect", "100-continue"),
                    ]
                ),
            )
        )
        assert self.tls is not None
        tls, conn, timeout = self.tls, self.conn, self.config.io_timeout
        scratch = bytearray(64 * 1024)

        def on_input() -> bool:
            """stpd sent something while we send: go on after a 100
            Continue, stop at its final answer (a refusal, a full disk)."""
            received = tls.read_available(scratch)
            if received:
                conn.receive_data(memoryview(scratch)[:received])  # type: ignore[arg-type]  # h11 copies any bytes-like
            elif tls.at_eof:
                return False
            try:
                while (event := conn.next_event()) is not h11.NEED_DATA:
                    if isinstance(event, h11.InformationalResponse):
                        self.accepted = True  # 100 Continue
                        continue
                    if isinstance(event, h11.Event):
                        self._early_answer = event  # for _next_event
                    return False
            except h11.RemoteProtocolError:
                return False  # _next_event reads it again and says so
            return True

        def send_tree() -> bool:
            """The whole tar stream; False when stpd answered before the end."""

            def put(batch: Batch) -> None:
                if not send_batch(tls, conn, batch, timeout, on_input):
                    raise _AnsweredEarly
                size = sum(len(p) for p in batch)
                self.sent += size
                if progress is not None:
                    progress.advance(size, stats.files)

            try:
                write_tree(source, put, stats, options)
            except _AnsweredEarly:
                return False
            return True

        sent_all = False
        try:
            if self._await_continue():
                sent_all = send_tree()
            if sent_all:
                self._send_raw(h11.EndOfMessage())
                self.sent_whole_backup = True
        except TLSTimeout:
            raise SbcError(
                f"stpd at {self.where} stopped reading our data during the backup after "
                f"{self.sent / 1e6:.1f} MB (no progress for {self.config.io_timeout:g}s, "
                f"SBC_IO_TIMEOUT): stpd or the network stalled; {INTERRUPTED}"
            ) from None
        except TLSBroken:
            pass  # the server stopped reading: its answer says why
        response = self._response()
        body = self._json_body()
        if response.status != 201:
            raise self._failure(response, body, f"backup of {source}")
        self._expect(misfit(body, SAVESET_FIELDS), f"PUT {target}")
        if not sent_all:  # pragma: no cover - a 201 only follows the whole body
            raise SbcError(f"stpd at {self.where} answered before the backup was complete")
        return body, stats

    def restore(
        self,
        saveset: str,
        target: Path,
        progress: TransferProgress | None = None,
        *,
        overwrite: bool = False,
        only: Sequence[str] = (),
    ) -> RestoreResult:
        """Extract ``saveset`` (or ``only`` those entries of it) into
        ``target``; existing files are kept (listed in the result) unless
        ``overwrite``. stpd sends only the entries asked for, where they fit
        in a request (else all of it, and they are picked out here)."""
        path = f"/savesets/{quote(saveset, safe='')}"
        # Names as stored: bytes that are not UTF-8 go as they are (%XX).
        selection = urlencode(  # %20 for a space: stpd reads "+" as a plus
            [("entry", name) for name in only],
            encoding="utf-8",
            errors="surrogateescape",
            quote_via=quote,
        )
        if selection and len(path) + len(selection) < MAX_REQUEST_TARGET:
            path += "?" + selection
        self._send(
            h11.Request(method="GET", target=path, headers=self._headers()), h11.EndOfMessage()
        )
        response = self._response()
        if response.status != 200:
            raise self._failure(response, self._json_body(), f"restore of {saveset}")
        result = RestoreResult()
        # The whole saveset comes with its checksum and length; selected
        # entries (found by stpd as it sends them) chunked, without either.
        expected = response.headers.get("x-sha256", "")
        if not only and not expected:  # would be restored unverified, and said "selected entries"
            raise SbcError(
                f"stpd at {self.where} sent saveset {saveset} without its checksum (X-Sha256): "
                "refused, as it could not be verified; nothing was restored"
            )
        length_text = response.headers.get("content-length", "")
        body: LengthBody | ChunkedBody
        if length_text.isdigit():
            body = LengthBody(int(length_text))
            if progress is not None:
                progress.set_total(int(length_text))
        elif response.headers.get("transfer-encoding", "").lower() == "chunked":
            body = ChunkedBody()
        else:
            raise SbcError(f"stpd at {self.where} sent a saveset without a Content-Length")

        # The body bypasses h11 (the connection is closed after a restore):
        # it is extracted as it comes.
        early, _ = self.conn.trailing_data
        assert self.tls is not None
        # Two buffers: a large file's writes overlap receiving (WriteBehind).
        reader = BodyReader(self.tls, body, early, self.config.io_timeout, 2)

        def next_batch() -> Batch:
            batch = reader.next_batch()
            if progress is not None:  # once a batch, not once a piece
                progress.advance(sum(len(p) for p in batch), result.members)
            return batch

        try:
            extract_stream(next_batch, target, result, overwrite=overwrite, only=only)
        except (TLSTimeout, TLSBroken) as exc:
            why = (
                f"stpd at {self.where} stopped sending ({self.config.io_timeout:g}s)"
                if isinstance(exc, TLSTimeout)
                else f"connection to stpd at {self.where} lost mid-restore: {exc}"
            )
            removed = f"; the incomplete {result.removed} was removed" if result.removed else ""
            raise SbcError(why + removed) from None
        if expected and result.sha256 != expected:
            raise SbcError(
                f"restored data of {saveset} does not match its checksum "
                f"(got {result.sha256}, expected {expected}): what was restored into {target} "
                f"may be damaged, do not rely on it; `sbc verify {saveset}` says whether the "
                "server's copy is; if it is intact, restore again"
            )
        result.checked = bool(expected)
        return result
