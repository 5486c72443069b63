"""The trio layer of STPD: accept, handshake, judge, then HTTP/1.1 (h11).

Decisions live in ``stpd.protocol`` (who the peer is, what a request means)
and ``stpd.store`` (savesets on disk); this module only moves bytes and
keeps every wait under a named timeout from ``StpdConfig``.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import itertools
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Any

import h11
import trio
from cryptography import x509
from OpenSSL import SSL

from pki.authority import (
    CA_RENEWAL,
    CA_REPLACEMENT,
    EXPIRY_WARNING_DAYS,
    days_left,
    read_certificate,
    validity_problem,
)
from pki.console import expiry_in_words, in_days, one_line, share_of
from pki.crl import CRL_WARNING_DAYS, crl_number
from pki.errors import PkiError
from pki.files import open_to_others
from pki.inifile import ConfigError, format_host_port
from pki.inventory import timestamp
from pki.names import signed_by
from pki.tls import (
    EXPIRED,
    NOT_ACCEPTED_HEADER,
    NOT_OUR_CA,
    REVOKED,
    ClientCertPolicy,
    load_crl,
    server_context,
)
from stpd import __version__
from stpd.aio import run_transfer, send_events
from stpd.body import request_body
from stpd.config import StpdConfig, load_config
from stpd.protocol import (
    PLAIN_HTTP_ANSWER,
    Action,
    Download,
    Entries,
    ListSavesets,
    Metadata,
    PeerDecision,
    Reject,
    Status,
    Upload,
    Verify,
    is_plain_http,
    judge_peer,
    refusal_answer,
    refused_handshake,
    route,
)
from stpd.store import (
    Prepared,
    SavesetCheck,
    SavesetMeta,
    SavesetStore,
    StoreError,
    saveset_entries,
    saveset_selection,
    utc_now,
)
from stpd.tarcheck import END_OF_ARCHIVE, STILL_LOOKING
from stpd.tlsstream import TLSHandshakeError, TLSStream
from stpd.transfer import Batch, BatchWriter, BodyReader, WriteBehind, send_batch

log = logging.getLogger("stpd")

# A selective restore's scan of a large saveset sends STILL_LOOKING when it
# has sent nothing for this long: well within any SBC_IO_TIMEOUT (default 60).
STILL_LOOKING_EVERY = 5.0

VERIFY_LINE_EVERY = 5.0  # seconds of hashing between the lines of a verification
# An answer of one JSON object a line, sent as the lines are made.
JSON_LINES_HEAD = [("Content-Type", "application/x-ndjson"), ("Transfer-Encoding", "chunked")]
ENTRIES_PER_CHUNK = 1000  # saveset entries read per worker-thread call and sent as one chunk
LINGER_SECONDS = 1.0  # after an early error answer, read and drop for this long so the
LINGER_BYTES = 64 * 1024 * 1024  # client sees our answer instead of a connection reset
# Connections open at once, handshakes included, are at most this many times
# STPD_MAX_CONNECTIONS: those served, and as many more in their handshake or
# being told 503. Further ones wait in the kernel's listen backlog until one
# closes (as with nginx's worker_connections). Unbounded, silent or idle
# connections, which need no certificate, could take all memory: about 60
# KiB each in a handshake, and 320 KiB once past it.
OPEN_PER_SERVED = 2
FULL_WARNING_EVERY = 60.0  # seconds between warnings that the limit holds connections back
# Of those open slots, connections from one address that are still in their
# TLS handshake (no certificate shown yet: anyone can open them) may hold at
# most this share; further ones from it are closed at once, so that one host
# cannot take every slot and lock out the others.
HANDSHAKE_SHARE_PER_ADDRESS = 0.5
# accept() failing for want of resources: wait and try again (as trio's
# serve_listeners does), instead of giving up listening.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_SECONDS = 0.1


def transfers_named(what: list[str], after: str = "") -> str:
    """``what`` counted, then named: "1 transfer{after}: upload of /etc from
    10.0.0.5:40000 (CN=host1)", or "0 transfers{after}"."""
    text = f"{len(what)} transfer{'' if len(what) == 1 else 's'}{after}"
    return f"{text}: {'; '.join(what)}" if what else text


def _header_text(text: str) -> str:
    """``text`` as an HTTP header value: printable ASCII (a foreign
    certificate's subject may hold any character), escaped as one_line
    does, the rest of what is not ASCII as Python does."""
    return one_line(text).encode("ascii", "backslashreplace").decode().strip()


def peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "unknown peer"


def format_peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return format_host_port(host, port)


EXPIRY_CHECK_INTERVAL = 24 * 3600.0  # seconds between expiry checks: daily
# Below this share of its file system free, the data directory is warned
# about (at start and after a stored saveset), at most once an hour: before
# uploads are refused with 507, while there is time to act.
LOW_SPACE_SHARE = 0.10
LOW_SPACE_WARNING_EVERY = 3600.0
RETENTION_CHECK_INTERVAL = 3600.0  # seconds between looks for savesets past their retention


class Throttle:
    """At most one of something (a warning that would repeat) every
    ``every`` seconds; the first is never held back."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.last: float | None = None  # time.monotonic() of the last one let through

    def held(self) -> bool:
        """Whether one now would be held back."""
        return self.last is not None and time.monotonic() - self.last < self.every

    def ready(self) -> bool:
        if self.held():
            return False
        self.last = time.monotonic()
        return True


class HandshakesByAddress:
    """Connections still in their TLS handshake, counted by source address
    and held to ``cap`` an address: one that completes (or fails) its
    handshake no longer counts."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.pending: dict[str, int] = {}  # only addresses with a handshake under way
        self._warned: dict[str, Throttle] = {}  # of the WARNING about each

    def admit(self, host: str) -> bool:
        if self.pending.get(host, 0) >= self.cap:
            return False
        self.pending[host] = self.pending.get(host, 0) + 1
        return True

    def done(self, host: str) -> None:
        self.pending[host] -= 1
        if not self.pending[host]:
            del self.pending[host]

    def warn_now(self, host: str) -> bool:
        """Whether a warning about ``host`` at its cap is due: once a
        minute an address (those of the last minute are kept, no more)."""
        self._warned = {h: throttle for h, throttle in self._warned.items() if throttle.held()}
        return self._warned.setdefault(host, Throttle(FULL_WARNING_EVERY)).ready()


def handshake_cap(max_connections: int) -> int:
    return max(1, int(HANDSHAKE_SHARE_PER_ADDRESS * OPEN_PER_SERVED * max_connections))


class Stpd:
    """The daemon: listeners, the TLS material in force, and its life-cycle.

    ``shutdown()`` (SIGTERM) stops accepting and lets running transfers
    finish within ``STPD_SHUTDOWN_GRACE``; idle keep-alive connections are
    closed at once. ``reload()`` (SIGHUP) re-reads stpd.ini and the
    certificates for new connections; a broken new configuration is
    refused and the running one stays. A changed CRL file is picked up by
    the next connection.
    """

    def __init__(self, config: StpdConfig) -> None:
        self.config = config
        self.store = SavesetStore(config.saveset_dir)
        self.ssl_context, self.server_cert, self.ca_cert = self._tls_material(config)
        other_ca = self._other_ca(config, self.server_cert, self.ca_cert)
        if other_ca is not None:  # started all the same: at a reload, the old pair stays
            log.error("%s", other_ca)
        self._crl_stamp = self._stamp(config.layout.crl)
        self._crl_in_force = self._crl_file(config, self.ca_cert)
        # Counts reloads and new CRLs: a connection judged before the last
        # one has its client judged again at its next request.
        self.trust_generation = 0
        self._retention_due: trio.Event | None = None  # set: look for old savesets now
        in_file = load_config(config.layout)
        self._restart_only = (in_file.listen, in_file.data_dir)  # what SIGHUP cannot change
        # Read from stpd.ini (not all defaults): a reload needs the file too.
        self._config_from_file = config.layout.stpd_ini.exists()
        self.started = time.monotonic()
        self.connections = 0  # every open connection, handshakes included
        # Connections past the TLS handshake, by serial (in the order they
        # opened): what STPD_MAX_CONNECTIONS limits (see beyond_limit).
        # Handshakes in progress take open_slots too (see OPEN_PER_SERVED), each
        # for at most STPD_HANDSHAKE_TIMEOUT; those of one address are held to a
        # share of them (see HandshakesByAddress), so that silent connections
        # from one host alone cannot lock out the others.
        self.sessions: set[int] = set()
        self._serials = itertools.count()
        # Backups, restores and verifications running, each as the log names it
        # (for status and for the lines of a shutdown, which says what it cuts off).
        self.transfers: dict[object, str] = {}
        self.cut_off: list[str] = []  # those the end of the grace period stopped
        # A transfer holds a worker thread from start to end (run_transfer):
        # its own pool, as large as the connection limit, so that trio's
        # default pool of 40 neither caps the transfers nor is used up by
        # them (the short jobs, like opening a saveset, need it too).
        self.transfer_threads = trio.CapacityLimiter(config.max_connections)
        self.open_slots = trio.CapacityLimiter(OPEN_PER_SERVED * config.max_connections)
        self.handshakes = HandshakesByAddress(handshake_cap(config.max_connections))
        self._full_warning = Throttle(FULL_WARNING_EVERY)
        self._low_space_warning = Throttle(LOW_SPACE_WARNING_EVERY)
        self.port: int | None = None
        self.draining = False
        self._idle: set[trio.CancelScope] = set()  # connections waiting for a request
        self._stop_accepting: trio.CancelScope | None = None

    @staticmethod
    def _tls_material(
        config: StpdConfig,
    ) -> tuple[SSL.Context, x509.Certificate, x509.Certificate | None]:
        ctx = server_context(config.layout, config.client_cert_policy)
        loose = open_to_others(config.layout.server_key, "private key")
        if loose is not None:
            log.warning("%s", loose)
        # SPEC: needed only to issue, never by a daemon; an old CA's key that
        # `ca --force` moved aside (rootCA.key.old-...) no less.
        ca_key = config.layout.ca_key
        for key in sorted(ca_key.parent.glob(f"{ca_key.name}*")):
            log.warning(
                "%s is on this server: stpd does not need it, and whoever reads it can issue "
                "certificates in its CA's name; once certificates are issued, move it "
                "to the machine (or medium) you issue them from",
                key,
            )
        server_cert = x509.load_pem_x509_certificate(config.layout.server_cert.read_bytes())
        ca = config.layout.ca_cert
        # (os.path: a ca/ this user cannot enter is "no CA here" at level 0;
        # at levels 1 and 2 server_context has said it cannot be read.)
        ca_cert = x509.load_pem_x509_certificate(ca.read_bytes()) if os.path.isfile(ca) else None
        return ctx, server_cert, ca_cert

    @staticmethod
    def _other_ca(
        config: StpdConfig, server_cert: x509.Certificate, ca_cert: x509.Certificate | None
    ) -> str | None:
        """What is wrong when the root CA did not sign the server certificate:
        one of the two comes from another CA (the wrong rootCA.pem copied to
        an RDS, a CA made anew without re-issuing). Clients are then
        refused, or refuse us, with reasons that point at them."""
        if (
            config.client_cert_policy == ClientCertPolicy.IGNORE
            or ca_cert is None
            or signed_by(server_cert, ca_cert)
        ):
            return None
        issuer, ours = server_cert.issuer.rfc4514_string(), ca_cert.subject.rfc4514_string()
        why = (
            f"{ours}, a CA of that name made anew?"
            if issuer == ours
            else f"{ours}; the server certificate's issuer is {issuer}"
        )
        return (
            f"{config.layout.server_cert} is not signed by {config.layout.ca_cert} ({why}): this "
            'stpd and its clients do not share one CA, so clients are refused as "not signed by '
            "our root CA\" or refuse this server; copy the backup server's ca/rootCA.pem here, or "
            "re-issue the server certificate with `sm_ssl_cert server` from the CA that signs "
            "the clients' certificates"
        )

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def serve(
        self,
        *,
        on_listening: Callable[[], object] | None = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until shutdown() and the transfers' end. ``on_listening``
        runs once the port is ours, before the "listening on" line that
        says stpd is ready (the CLI writes its pid file there)."""
        prepared = await trio.to_thread.run_sync(self.store.prepare)
        try:
            await self._serve(prepared, on_listening, task_status)
        finally:
            self.store.close()
            if self.port is not None:  # it did listen: the end of it, however it came
                log.info("stpd stopped")

    async def _serve(
        self, prepared: Prepared, on_listening: Callable[[], object] | None, task_status: Any
    ) -> None:
        if prepared.created:
            # An unmounted file system would otherwise be replaced, silently, by
            # an empty directory on the one beneath: clients would see no savesets.
            log.warning(
                "data directory %s did not exist: created it, empty; if savesets should be "
                "there (its file system not mounted?), stop stpd, mount it and start stpd again",
                self.store.root,
            )
        for path in prepared.removed:
            log.warning("removed leftover of an interrupted upload: %s", path)
        for saveset in prepared.published:
            log.warning(
                "finished storing saveset %s: a crash had cut it short after its tar, whole, "
                "was in place (its metadata was still in %s)",
                saveset,
                self.store.incoming,
            )
        # What `stpd list` warns about, said where an administrator looks:
        # nothing of it is removed without being asked to.
        scan = await trio.to_thread.run_sync(self.store.scan)
        for warning in scan.warnings():
            log.warning("%s", warning)
        host, port = self.config.listen
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            why = (
                "another process (another stpd?) holds that port: stop it, or"
                if exc.errno == errno.EADDRINUSE
                else f"is {host} an address of this machine?"
            )
            raise ConfigError(
                f"cannot listen on {format_host_port(host, port)}: {exc.strerror or exc}; {why} set "
                "STPD_HTTPS_LISTEN in stpd.ini (or --listen)"
            ) from None
        port = listeners[0].socket.getsockname()[1]
        if on_listening is not None:
            on_listening()  # may fail (the pid file): then stpd never started, nor "stopped"
        self.port = port
        log.info(
            "stpd %s listening on %s, client certificate level %s, data in %s%s",
            __version__,
            format_host_port(host, self.port),
            self.config.describe_level(),
            self.store.root,
            self._revocations(),
        )
        self.warn_if_space_is_low()
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as acceptors:
                self._stop_accepting = acceptors.cancel_scope
                acceptors.start_soon(self._warn_about_expiry)
                acceptors.start_soon(self._remove_expired_savesets)
                for listener in listeners:
                    acceptors.start_soon(self._accept, listener, handlers)
                task_status.started(self.port)
            # Draining: no new connections; running transfers get the grace period.
            handlers.cancel_scope.deadline = trio.current_time() + self.config.shutdown_grace
        if handlers.cancel_scope.cancelled_caught:
            log.warning(
                "grace period of %gs over: %s",
                self.config.shutdown_grace,
                "cut off "
                + transfers_named(self.cut_off, " still running (nothing partial is kept)")
                if self.cut_off
                else "closed the connections still open (no transfer was running)",
            )

    async def _accept(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        """Accept connections while fewer than the limit are open (see
        OPEN_PER_SERVED); each is handled in ``handlers``."""
        async with listener:
            while True:
                slot = object()  # held by the connection until it closes
                if self.open_slots.available_tokens <= 0:  # below 0 after a SIGHUP lowered it
                    self._warn_full()
                await self.open_slots.acquire_on_behalf_of(slot)
                try:
                    transport = await listener.accept()
                except BaseException as exc:
                    self.open_slots.release_on_behalf_of(slot)
                    if not isinstance(exc, OSError) or exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error(
                        "cannot accept a connection: %s; trying again in %gs",
                        exc.strerror,
                        ACCEPT_RETRY_SECONDS,
                    )
                    await trio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                host = peer_host(transport)
                if not self.handshakes.admit(host):
                    self._warn_handshakes(host)
                    self.open_slots.release_on_behalf_of(slot)
                    await transport.aclose()
                    continue
                handlers.start_soon(self._hold_slot, transport, slot, host)

    async def _hold_slot(self, transport: trio.SocketStream, slot: object, host: str) -> None:
        counted = True

        def handshake_over() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.handshakes.done(host)

        try:
            await self.handle_connection(transport, handshake_over)
        finally:
            handshake_over()  # (a connection that ended before its handshake did)
            self.open_slots.release_on_behalf_of(slot)

    def _warn_handshakes(self, host: str) -> None:
        if self.handshakes.warn_now(host):
            log.warning(
                "%d connections from %s are in their TLS handshake, half of the %d that may be "
                "open (2 x STPD_MAX_CONNECTIONS): further ones from it are closed at once until "
                "those finish or time out (STPD_HANDSHAKE_TIMEOUT=%gs); said once a minute",
                self.handshakes.cap,
                host,
                self.open_slots.total_tokens,
                self.config.handshake_timeout,
            )

    def _warn_full(self) -> None:
        if self._full_warning.ready():
            log.warning(
                "%d connections open, %d x STPD_MAX_CONNECTIONS: new ones wait until one closes",
                self.open_slots.total_tokens,
                OPEN_PER_SERVED,
            )

    def warn_if_space_is_low(self) -> None:
        space = self.store.space()
        if not space or space["free_bytes"] >= LOW_SPACE_SHARE * space["total_bytes"]:
            return
        if not self._low_space_warning.ready():
            return
        log.warning(
            "data directory %s: %s free (%.0f %%); uploads are refused once it is full: free "
            "space there (stpd list, stpd delete), or set STPD_RETENTION_DAYS",
            self.store.root,
            share_of(space["free_bytes"], space["total_bytes"]),
            100 * space["free_bytes"] / max(space["total_bytes"], 1),
        )

    @property
    def active_transfers(self) -> int:
        return len(self.transfers)

    @contextmanager
    def transfer_running(self, what: str) -> Iterator[None]:
        """A backup, restore or verification under way (``what``, as the log
        names it): counted for status and for an upload's write-behind rule,
        and named by shutdown's lines."""
        key = object()
        self.transfers[key] = what
        try:
            yield
        except trio.Cancelled:
            if self.draining:  # the grace period is over (or a second signal came)
                self.cut_off.append(what)
            raise
        finally:
            del self.transfers[key]

    def shutdown(self) -> None:
        """Stop accepting; finish running transfers (SIGTERM)."""
        if self.draining or self._stop_accepting is None:
            return
        self.draining = True
        log.info(
            "stopping: no new connections; %s",
            transfers_named(
                list(self.transfers.values()), f" may finish within {self.config.shutdown_grace:g}s"
            ),
        )
        self._stop_accepting.cancel()
        for scope in list(self._idle):
            scope.cancel()

    def reload(self) -> bool:
        """Re-read stpd.ini and the certificates for new connections (SIGHUP);
        False when refused (the running configuration stays)."""
        try:
            from_file = self.config.layout.stpd_ini.exists()
            if self._config_from_file and not from_file:
                # Else every default would go into force: no allow-list, no
                # retention, level as the code says (a file being rewritten).
                raise ConfigError(
                    f"{self.config.layout.stpd_ini} not found; it held the running "
                    "configuration: put it back, then send SIGHUP again"
                )
            in_file = load_config(self.config.layout)  # the file alone, read once
            # What only a restart changes stays as it runs.
            config = dataclasses.replace(
                in_file, listen=self.config.listen, data_dir=self.config.data_dir
            )
            material = self._tls_material(config)
            other_ca = self._other_ca(config, material[1], material[2])
            if other_ca is not None:
                raise PkiError(other_ca)
            self._refuse_out_of_date(config, material[1], material[2])
            crl = self._crl_file(config, material[2])
            # A new CA (ca --force, its certificates re-issued) starts its
            # CRLs anew: only the same CA's may not go back.
            if config.client_cert_policy != ClientCertPolicy.IGNORE and material[2] == self.ca_cert:
                self._refuse_an_older_crl(crl)
        except (ConfigError, PkiError, OSError, ValueError) as exc:
            log.error("reload refused, the running configuration stays in force: %s", exc)
            return False
        if (in_file.listen, in_file.data_dir) != self._restart_only:
            log.warning(
                "STPD_HTTPS_LISTEN or STPD_DATA_DIR changed in %s: that takes effect at the "
                "next restart; still listening on %s with data in %s",
                config.layout.stpd_ini,
                format_host_port(*self.config.listen),
                self.store.root,
            )
        self.config = config
        self._config_from_file = from_file
        self.ssl_context, self.server_cert, self.ca_cert = material
        self._crl_stamp = self._stamp(config.layout.crl)
        self._crl_in_force = crl
        self.trust_generation += 1
        if self._retention_due is not None:
            self._retention_due.set()
        self.transfer_threads.total_tokens = config.max_connections
        self.open_slots.total_tokens = OPEN_PER_SERVED * config.max_connections
        self.handshakes.cap = handshake_cap(config.max_connections)
        log.info(
            "reloaded %s and certificates: level %s, server certificate %s (%s)%s",
            config.layout.stpd_ini,
            config.describe_level(),
            self.server_cert.subject.rfc4514_string(),
            expiry_in_words(days_left(self.server_cert.not_valid_after_utc)),
            self._revocations(),
        )
        self._check_expiry()
        return True

    def _refuse_out_of_date(
        self, config: StpdConfig, server_cert: x509.Certificate, ca_cert: x509.Certificate | None
    ) -> None:
        """PkiError for a new server certificate or root CA (one checks
        clients' certificates at levels 1 and 2) that is expired or not yet
        valid: put in force, it would replace a working one and have every
        verifying peer refused. The one in force is left to _check_expiry."""
        new: list[tuple[Path, x509.Certificate, x509.Certificate | None, str]] = [
            (
                config.layout.server_cert,
                server_cert,
                self.server_cert,
                "clients that verify the server would refuse it",
            )
        ]
        if config.client_cert_policy != ClientCertPolicy.IGNORE and ca_cert is not None:
            new.append(
                (
                    config.layout.ca_cert,
                    ca_cert,
                    self.ca_cert,
                    "every client certificate would fail validation",
                )
            )
        for path, cert, in_force, outcome in new:
            problem = validity_problem(cert)
            if problem is not None and cert != in_force:
                raise PkiError(
                    f"{path} {problem}: {outcome}; put a valid one in its place and send SIGHUP "
                    "again (a restart would take this one)"
                )

    def _revocations(self) -> str:
        """For the start and reload lines: which CRL is in force. A server
        restarted without its crl.pem (or an RDS never sent one) served
        revoked clients again, and nothing in its log said so."""
        if self.config.client_cert_policy == ClientCertPolicy.IGNORE:
            return ""
        if self._crl_in_force is None:
            return f"; no CRL ({self.config.layout.crl}): no certificate is checked for revocation"
        return f"; CRL number {crl_number(self._crl_in_force)} in force"

    def refresh_crl(self) -> None:
        """A revocation takes effect without a restart: rebuild the context
        when ca/crl.pem changed since we read it."""
        stamp = self._stamp(self.config.layout.crl)
        if stamp == self._crl_stamp:
            return
        self._crl_stamp = stamp
        layout = self.config.layout
        if read_certificate(layout.server_cert) != self.server_cert or (
            self.ca_cert is not None and read_certificate(layout.ca_cert) != self.ca_cert
        ):
            # A new context reads them too: copied in without SIGHUP, they
            # would be put in force without a reload's checks.
            log.warning(
                "CRL %s changed, and %s or %s with it since they were loaded: reloading",
                layout.crl,
                layout.server_cert,
                layout.ca_cert,
            )
            if not self.reload():
                log.error(
                    "the new CRL is not in force either (a revocation in it is not applied): "
                    "mend what the reload refused, and send stpd SIGHUP"
                )
            return
        try:
            crl = self._crl_file(self.config, self.ca_cert)
            self._refuse_an_older_crl(crl)
            self.ssl_context = server_context(layout, self.config.client_cert_policy)
        except PkiError as exc:
            log.error("new CRL refused, the previous one stays in force: %s", exc)
            return
        self._crl_in_force = crl
        self.trust_generation += 1
        log.info("CRL %s changed: reloaded", self.config.layout.crl)
        self._check_crl()  # a copy of an old one, for example

    def problems_now(self, cert: x509.Certificate | None, problems: list[str]) -> list[str]:
        """What is wrong with a client's ``cert`` (the ``problems`` its
        handshake found) under the CA and CRL in force now."""
        if cert is None:
            return problems
        now = list(problems)
        crl = self._crl_in_force
        if crl is not None and crl.get_revoked_certificate_by_serial_number(cert.serial_number):
            now.append(REVOKED)
        if cert.not_valid_after_utc <= utc_now():
            now.append(EXPIRED)
        if self.ca_cert is not None and not signed_by(cert, self.ca_cert):
            now.append(NOT_OUR_CA)  # a reload to another CA
        return list(dict.fromkeys(now))

    def _refuse_an_older_crl(self, crl: x509.CertificateRevocationList | None) -> None:
        """PkiError for a CRL that would let certificates revoked since pass
        again: none where one is in force, or one with a lower number (an
        older copy). A restart takes what is there."""
        in_force, path = self._crl_in_force, self.config.layout.crl
        if in_force is None:
            return
        if crl is None:
            raise PkiError(
                f"{path} is gone, and without it the certificates it revokes would be served: "
                "copy crl.pem back from the CA machine (stpd restarted without it checks no "
                "revocations)"
            )
        new, old = crl_number(crl), crl_number(in_force)
        if new is not None and old is not None and new < old:
            raise PkiError(
                f"{path} has CRL number {new}, lower than the {old} in force: an older copy, "
                "which would let certificates revoked since pass again; copy the current "
                "crl.pem from the CA machine"
            )

    def _check_expiry(self) -> None:
        self._check_crl()
        for what, cert in (("server certificate", self.server_cert), ("root CA", self.ca_cert)):
            if cert is None:
                continue
            problem = validity_problem(cert)
            left = days_left(cert.not_valid_after_utc)
            if problem is not None:
                # Served all the same: level-0 sites, whose clients may not
                # verify the server, can still back up.
                log.error(
                    "%s %s %s: %s",
                    what,
                    cert.subject.rfc4514_string(),
                    problem,
                    "every certificate it signed fails validation, this server's and the "
                    f"clients'; {CA_REPLACEMENT}"
                    if cert is self.ca_cert
                    else "clients that verify the server (SBC_SSL_SERVER_VERIFY=1) refuse it; "
                    + self._renewal(),
                )
            elif left < EXPIRY_WARNING_DAYS:
                log.warning(
                    "%s %s %s (%s): %s",
                    what,
                    cert.subject.rfc4514_string(),
                    expiry_in_words(left),
                    cert.not_valid_after_utc.date(),
                    CA_RENEWAL if cert is self.ca_cert else self._renewal(),
                )

    def _renewal(self) -> str:
        """How to renew this server's certificate: here where the CA key is
        (the backup server), else there, for an RDS."""
        layout = self.config.layout
        if layout.has_ca_key():
            return f"renew it with {layout.command('renew server')} and send stpd SIGHUP"
        return (
            "renew it where the CA key is (`sm_ssl_cert renew server --path DIR` there), copy "
            f"server.pem and server.key into {layout.server_dir} and send stpd SIGHUP"
        )

    def _check_crl(self) -> None:
        """Past its next update, OpenSSL fails every check against the CRL,
        so every client certificate is invalid: said here before it happens
        and when it has, with the fix (the refusals name only the symptom)."""
        next_update = self._crl_next_update()
        if next_update is None or self._crl_in_force is None:
            return
        crl, left = self.config.layout.crl, days_left(next_update)
        last_update = self._crl_in_force.last_update_utc
        refused = (
            "refused"
            if self.config.client_cert_policy == ClientCertPolicy.REQUIRE
            else "served as anonymous"
        )
        if last_update > utc_now():  # OpenSSL fails every check against it, as when out of date
            log.error(
                "CRL %s is not valid before %s UTC (%s): every client certificate fails "
                "validation until then, so every client is %s",
                crl,
                f"{last_update:%Y-%m-%d %H:%M}",
                "check this machine's clock and the clock where `sm_ssl_cert crl` wrote it",
                refused,
            )
        elif left <= 0:
            log.error(
                "CRL %s is out of date since %s UTC: every client certificate now fails "
                "validation, so every client is %s; write a new one with `sm_ssl_cert crl` "
                "where the CA key is and copy it here (stpd reads it at the next connection)",
                crl,
                f"{next_update:%Y-%m-%d %H:%M}",
                refused,
            )
        elif left < CRL_WARNING_DAYS:
            log.warning(
                "CRL %s must be written again before its next update %s (%s UTC), or every "
                "client certificate fails validation: run `sm_ssl_cert crl` where the CA key is "
                "(e.g. weekly from cron) and copy it here",
                crl,
                in_days(left),  # as `sbc status` counts them
                f"{next_update:%Y-%m-%d %H:%M}",
            )

    def _crl_next_update(self) -> datetime.datetime | None:
        """When the CRL in force must be replaced; None without one, or at
        level 0, where none is checked."""
        return self._crl_in_force.next_update_utc if self._crl_in_force is not None else None

    @staticmethod
    def _crl_file(
        config: StpdConfig, ca_cert: x509.Certificate | None
    ) -> x509.CertificateRevocationList | None:
        """ca/crl.pem as it is now, checked against ``ca_cert``; None without
        one, or at level 0, where none is checked."""
        if config.client_cert_policy == ClientCertPolicy.IGNORE or ca_cert is None:
            return None
        return load_crl(config.layout, ca_cert)

    async def _remove_expired_savesets(self) -> None:
        """STPD_RETENTION_DAYS: at start, at each SIGHUP (a new value acts at
        once), and every hour."""
        while True:
            days = self.config.retention_days
            if days:
                cutoff = utc_now() - datetime.timedelta(days=days)
                try:
                    removed, failed = await trio.to_thread.run_sync(
                        self.store.remove_finished_before, cutoff
                    )
                except OSError as exc:  # the data directory cannot be listed
                    log.error("cannot remove savesets past STPD_RETENTION_DAYS=%d: %s", days, exc)
                    removed, failed = [], []
                for meta, why in failed:
                    log.error(
                        "cannot remove saveset %s, older than STPD_RETENTION_DAYS=%d: %s",
                        meta.saveset,
                        days,
                        why,
                    )
                for meta in removed:
                    log.info(
                        "removed saveset %s of %s (finished %s): older than STPD_RETENTION_DAYS=%d",
                        meta.saveset,
                        meta.owner,
                        meta.finished,
                        days,
                    )
            self._retention_due = trio.Event()
            with trio.move_on_after(RETENTION_CHECK_INTERVAL):
                await self._retention_due.wait()

    async def _warn_about_expiry(self) -> None:
        while True:
            self._check_expiry()
            await trio.sleep(EXPIRY_CHECK_INTERVAL)

    @contextmanager
    def idle(self) -> Iterator[trio.CancelScope]:
        """A wait for the next request, which shutdown() may cut short."""
        scope = trio.CancelScope()
        if self.draining:
            scope.cancel()
        self._idle.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._idle.discard(scope)

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "level": int(self.config.client_cert_policy),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "connections": self.connections,
            "active_transfers": self.active_transfers,
            "server_certificate": {
                "subject": self.server_cert.subject.rfc4514_string(),
                "not_after": timestamp(self.server_cert.not_valid_after_utc),
                "days_left": int(days_left(self.server_cert.not_valid_after_utc)),
            },
            "storage": self.store.space(),
            # Explicit, for monitoring: storage is null for other reasons too.
            "data_directory": "ok" if self.store.in_place() else "missing",
            "crl": self._crl_status(),
        }

    def _crl_status(self) -> dict[str, Any] | None:
        next_update = self._crl_next_update()
        if next_update is None:
            return None
        # The number tells which CRL a server has in force (has the last one reached it?).
        number = crl_number(self._crl_in_force) if self._crl_in_force is not None else None
        return {
            "next_update": timestamp(next_update),
            "days_left": int(days_left(next_update)),
            "number": number,
        }

    def beyond_limit(self, session: int) -> bool:
        """Whether the requests of ``session`` are answered 503: as many
        sessions as STPD_MAX_CONNECTIONS opened before it are still open.
        Counting in order means that newer connections, idle ones too,
        cannot turn away the older ones that were served."""
        older = sum(1 for other in self.sessions if other < session)
        return older >= self.config.max_connections

    async def handle_connection(
        self, transport: trio.SocketStream, handshake_over: Callable[[], None] = lambda: None
    ) -> None:
        """``handshake_over`` is called once the TLS handshake is done or failed."""
        peer = format_peer(transport)
        self.refresh_crl()
        # The trust the handshake is judged by: a reload or CRL during it
        # has the client judged again at its first request (_still_trusted).
        trusted_as = (self.trust_generation, self.config)
        tls = TLSStream(transport, self.ssl_context)
        self.connections += 1
        try:
            await self._serve_peer(tls, peer, handshake_over, trusted_as)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("connection with %s ended: %s", peer, exc)
        except Exception:  # a bug must not take the daemon down
            log.exception("internal error while serving %s", peer)
        finally:
            self.connections -= 1
            await tls.aclose()

    async def _serve_peer(
        self,
        tls: TLSStream,
        peer: str,
        handshake_over: Callable[[], None],
        trusted_as: tuple[int, StpdConfig],
    ) -> None:
        generation, config = trusted_as
        policy = config.client_cert_policy
        try:
            try:
                with trio.fail_after(self.config.handshake_timeout):
                    await tls.do_handshake()
            finally:
                handshake_over()
        except trio.TooSlowError:
            log.warning(
                "TLS handshake with %s timed out after %gs", peer, self.config.handshake_timeout
            )
            return
        except TLSHandshakeError as exc:
            reason = tls.verdict.reason or str(exc)
            decision = refused_handshake(peer, policy, reason, tls.verdict.subject)
            log.log(decision.log_level, "%s", decision.message)
            if is_plain_http(reason):  # say so in words the client can read
                with trio.move_on_after(LINGER_SECONDS):
                    try:
                        await tls.transport.send_all(PLAIN_HTTP_ANSWER)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            await tls.linger(LINGER_SECONDS)
            return
        decision = judge_peer(
            peer, policy, tls.peer_certificate, tls.verdict.problems, config.allowed_clients
        )
        log.log(decision.log_level, "%s", decision.message)
        if not decision.serve:
            await self._answer_refusal(tls, decision.refusal)
            return
        judged = (tls.peer_certificate, tls.verdict.problems, generation)
        session = HttpSession(self, tls, peer, decision, next(self._serials), judged)
        self.sessions.add(session.serial)
        try:
            await session.run()
        except trio.TooSlowError:  # a send (HttpSession._send) made no progress: not our fault
            log.warning(
                "client %s stopped reading the answer to %s; closed after %gs (STPD_IO_TIMEOUT)",
                peer,
                session.answering,
                self.config.io_timeout,
            )
        finally:
            self.sessions.discard(session.serial)

    async def _answer_refusal(self, tls: TLSStream, refusal: str) -> None:
        """Tell a client refused after the handshake why, in a 403 sent
        before any byte of its request is read (SPEC: none is processed),
        then linger so that it reads the answer instead of a reset."""
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await tls.send_all(refusal_answer(refusal))
                await tls.send_close_notify()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        await tls.linger(LINGER_SECONDS)


class HttpSession:
    """One TLS connection's sequence of HTTP/1.1 requests (keep-alive)."""

    def __init__(
        self,
        daemon: Stpd,
        tls: TLSStream,
        peer: str,
        decision: PeerDecision,
        serial: int,
        judged: tuple[x509.Certificate | None, list[str], int],
    ) -> None:
        self.daemon = daemon
        self.serial = serial  # its place in the order of sessions (Stpd.beyond_limit)
        self.config = daemon.config
        self.tls = tls
        self.peer = peer
        self.owner = decision.owner
        # Level 1 serves a client whose certificate it does not accept as
        # anonymous: every answer says why, for sbc to warn (a revocation or
        # the allow-list is not something the client can see for itself).
        self.not_accepted = _header_text(decision.not_accepted)
        self.conn = self._new_http()
        self.answering = ""  # the request line being answered, for the log
        self.head_only = False  # it is a HEAD: GET's answer without its body
        # Set when a request body was read past h11 (see _upload): what
        # arrived after it, for the h11 connection of the next request.
        self.after_body: bytes | None = None
        # The client's certificate, what its handshake found wrong with it,
        # and the daemon's trust_generation then (see _still_trusted).
        self.judged = judged

    def _new_http(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)

    async def run(self) -> None:
        while True:
            self.head_only = False
            try:
                request = await self._read_request()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                log.warning("bad request from %s: %s (answered %d)", self.peer, exc, status)
                await self._send_error(status, f"bad request: {exc}")
                return
            if request is None:
                return
            self.head_only = request.method == b"HEAD"
            # h11 limits only a head that arrives in pieces; one that came in a
            # single read is measured here, so that the limit means what it says.
            head = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
            if head > self.config.max_header_bytes:
                log.warning(
                    "bad request from %s: request head of %d bytes is over "
                    "STPD_MAX_HEADER_BYTES=%d (answered 431)",
                    self.peer,
                    head,
                    self.config.max_header_bytes,
                )
                await self._send_error(431, "request line and headers too large")
                return
            if not await self._still_trusted():
                return
            method = request.method.decode("ascii", "replace")
            target = request.target.decode("ascii", "replace")
            self.answering = f"{method} {target[:200]}"
            action = route(method, target)
            # GET /status is cheap, and what a monitor (and `stpd status`)
            # asks just when the server is busy: answered beyond the limit,
            # and the connection closed after it, so that polling it does
            # not hold one of the open slots.
            beyond = self.daemon.beyond_limit(self.serial)
            if isinstance(action, Status) and beyond:
                await self._send_json(200, self.daemon.status(), [("Connection", "close")])
                return
            if beyond:
                log.warning(
                    "connection limit %d reached; answered 503 to %s",
                    self.config.max_connections,
                    self.peer,
                )
                # Refused, it no longer counts (it lingers about a second).
                self.daemon.sessions.discard(self.serial)
                await self._send_error(503, "server busy: too many connections, try again later")
                return
            await self._dispatch(request, action)
            if self.after_body is not None:
                # h11 saw the head but not the body: a new h11 connection
                # continues after it, unless this one must close.
                if self.conn.our_state is not h11.DONE:
                    return
                self.conn, after_body, self.after_body = self._new_http(), self.after_body, None
                if after_body:  # (b"" would tell h11 the peer closed)
                    self.conn.receive_data(after_body)
                continue
            if self.conn.their_state is h11.SEND_BODY:
                # A request without a body (GET) ends with an EndOfMessage that
                # h11 yields only when asked; an unread body means we close.
                try:
                    self.conn.next_event()
                except h11.RemoteProtocolError:
                    return
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _still_trusted(self) -> bool:
        """Judge the client again when a reload or a new CRL came since it
        was judged: a certificate revoked (a stolen key) or taken off
        STPD_ALLOWED_CLIENTS kept every connection it held open, for as
        long as it sent a request within STPD_IDLE_TIMEOUT. A transfer
        under way finishes; its next request is refused as a new
        connection would be, or served under its new identity (level 1)."""
        daemon = self.daemon
        daemon.refresh_crl()
        cert, problems, generation = self.judged
        expired = cert is not None and cert.not_valid_after_utc <= utc_now()
        if generation == daemon.trust_generation and not (expired and EXPIRED not in problems):
            return True
        self.judged = (cert, daemon.problems_now(cert, problems), daemon.trust_generation)
        self.config = daemon.config
        decision = judge_peer(
            self.peer,
            self.config.client_cert_policy,
            cert,
            self.judged[1],
            self.config.allowed_clients,
        )
        self.not_accepted = _header_text(decision.not_accepted)
        if decision.serve and decision.owner == self.owner:
            return True
        log.log(decision.log_level, "%s (judged again: reload or new CRL)", decision.message)
        if decision.serve:
            self.owner = decision.owner
            return True
        await self._send_error(403, decision.refusal)
        return False

    # -- reading -------------------------------------------------------------

    async def _read_request(self) -> h11.Request | None:
        """The next request, or None when the peer is gone or idle too long.
        The idle timeout runs until the first byte; then the whole header
        must arrive within the header timeout (trickling does not extend it)."""
        deadline = trio.current_time() + self.config.idle_timeout
        started = False
        while True:
            event = self.conn.next_event()
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            if event is not h11.NEED_DATA:  # pragma: no cover - h11 gives nothing else here
                return None
            data: bytes | memoryview = b""
            with self.daemon.idle() if not started else nullcontext() as idle:
                with trio.move_on_at(deadline):
                    data = await self.tls.receive_borrowed()
                    if not data:
                        self.conn.receive_data(b"")
                        continue
            if idle is not None and idle.cancelled_caught:
                return None  # shutting down: an idle connection just closes
            if not data:
                if started:
                    log.info(
                        "request header from %s incomplete after %gs: answered 408, closed",
                        self.peer,
                        self.config.header_timeout,
                    )
                    await self._send_error(408, "request header timeout")
                else:
                    log.info(
                        "closing idle connection from %s after %gs",
                        self.peer,
                        self.config.idle_timeout,
                    )
                return None
            if not started:
                started = True
                deadline = trio.current_time() + self.config.header_timeout
            self.conn.receive_data(data)  # type: ignore[arg-type]  # h11 copies any bytes-like

    # -- writing -------------------------------------------------------------

    async def _send(self, *events: h11.Event) -> None:
        if self.head_only:  # h11 refuses a body after HEAD
            events = tuple(e for e in events if not isinstance(e, h11.Data))
        if self.not_accepted:
            events = tuple(
                h11.Response(
                    status_code=e.status_code,
                    headers=[*e.headers, (NOT_ACCEPTED_HEADER, self.not_accepted)],
                    reason=e.reason,
                )
                if isinstance(e, h11.Response)
                else e
                for e in events
            )
        await send_events(self.tls, self.conn, events, self.config.io_timeout)

    async def _send_json(self, status: int, body: Any, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        data = json.dumps(body, indent=1).encode() + b"\n"
        response = h11.Response(
            status_code=status,
            headers=[
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                *headers,
            ],
        )
        await self._send(response, h11.Data(data=data), h11.EndOfMessage())

    async def _send_error(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Answer an error and close; the client may still be sending, so
        linger briefly to let it read the answer instead of a reset."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send_json(status, {"error": message}, [("Connection", "close"), *headers])
        except (trio.BrokenResourceError, trio.TooSlowError, h11.LocalProtocolError):
            return
        # ERROR: a head we refused may still be arriving (an endless header line).
        if self.conn.their_state in (h11.SEND_BODY, h11.IDLE, h11.ERROR) and status != 408:
            with trio.move_on_after(LINGER_SECONDS):
                drained = 0
                while drained < LINGER_BYTES:
                    try:
                        data = await self.tls.receive_borrowed()
                    except trio.BrokenResourceError:
                        break
                    if not data:
                        break
                    drained += len(data)

    # -- actions -------------------------------------------------------------

    async def _dispatch(self, request: h11.Request, action: Action) -> None:
        if isinstance(action, Reject):
            log.info(
                "%s from %s: %d %s",
                self.answering,
                self.peer,
                action.status,
                action.message,
            )
            allow = (("Allow", action.allow),) if action.allow else ()
            await self._send_error(action.status, action.message, allow)
        elif isinstance(action, Status):
            await self._send_json(200, self.daemon.status())
        elif isinstance(action, ListSavesets):
            try:
                found = await trio.to_thread.run_sync(self.daemon.store.owned_by, self.owner)
            except StoreError as exc:
                await self._storage_failed(f"listing from {self.peer} failed", exc)
                return
            await self._send_json(200, [meta.to_json() for meta in found])
        elif isinstance(action, Metadata):
            meta = await self._owned_saveset(action.saveset)
            if meta is not None:
                await self._send_json(200, meta.to_json())
        elif isinstance(action, Download):
            await self._download(action.saveset, action.entries)
        elif isinstance(action, Entries):
            await self._entries(action.saveset)
        elif isinstance(action, Verify):
            await self._verify(action.saveset)
        elif isinstance(action, Upload):
            await self._upload(request, action.source)

    async def _upload(self, request: h11.Request, source: str) -> None:
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        store = self.daemon.store
        try:
            upload = await trio.to_thread.run_sync(store.begin, self.owner, source, self.peer)
        except StoreError as exc:
            await self._storage_failed(f"upload from {self.peer} refused", exc)
            return
        started = time.monotonic()
        with self.daemon.transfer_running(f"upload of {source} from {self.peer} ({self.owner})"):
            try:
                # h11 parsed the head; the body bypasses it (see BodyReader), and
                # run() starts a new h11 connection after it.
                early, _ = self.conn.trailing_data
                body = request_body(list(request.headers))

                # Writing overlaps receiving only for an upload that starts on its
                # own: with other transfers the cores are busy already (see
                # WriteBehind). One that others join later keeps its two threads.
                alone = self.daemon.active_transfers == 1

                def store_body() -> bytes:
                    buffers = 2 if alone else 1
                    reader = BodyReader(self.tls, body, early, self.config.io_timeout, buffers)
                    with WriteBehind(upload.write_out, threaded=alone) as behind:
                        while batch := reader.next_batch():
                            upload.absorb(batch)  # hashed while it is in this core's cache
                            behind.put(batch)
                        behind.finish()
                    return reader.after

                after_body = await run_transfer(self.tls, store_body, self.daemon.transfer_threads)
                meta = await trio.to_thread.run_sync(upload.commit)
            except StoreError as exc:
                # Remove the partial file before answering: the answer lingers
                # while the client is still sending, and a full disk should be
                # free again by the time the client reads why it failed.
                await trio.to_thread.run_sync(upload.abort)
                await self._storage_failed(f"upload from {self.peer} ({self.owner}) failed", exc)
                return
            except (trio.BrokenResourceError, trio.TooSlowError, h11.RemoteProtocolError) as exc:
                reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                log.warning(
                    "upload from %s (%s) cut off: %s; nothing stored", self.peer, self.owner, reason
                )
                if isinstance(exc, trio.TooSlowError):  # the client may still be there: say why
                    await trio.to_thread.run_sync(upload.abort)  # gone before it can read that
                    await self._send_error(
                        408,
                        f"no data for {self.config.io_timeout:g}s (STPD_IO_TIMEOUT): the upload "
                        "was cut off and nothing was stored",
                    )
                elif isinstance(exc, h11.RemoteProtocolError):  # framing; TLS still works
                    await trio.to_thread.run_sync(upload.abort)
                    await self._send_error(400, f"bad request: {exc}; nothing stored")
                raise trio.BrokenResourceError(reason) from None
            finally:
                # Shielded: when the grace period (or a second SIGTERM) cancels this
                # upload, run_sync would raise Cancelled before calling abort and
                # leave the .part file behind.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(upload.abort)  # no-op after a commit
        seconds = max(time.monotonic() - started, 1e-6)
        log.info(
            "stored saveset %s from %s (%s): %d bytes in %.2fs (%.1f MB/s), source %s",
            meta.saveset,
            self.peer,
            self.owner,
            meta.bytes,
            seconds,
            meta.bytes / seconds / 1e6,
            meta.source,
        )
        self.daemon.warn_if_space_is_low()
        await self._send_json(201, meta.to_json(), [("Location", f"/savesets/{meta.saveset}")])
        self.after_body = after_body

    async def _owned_saveset(self, saveset: str) -> SavesetMeta | None:
        """The metadata of the caller's ``saveset``; else a 404 is sent (others'
        savesets answer exactly like missing ones) and None returned."""
        try:
            meta = await trio.to_thread.run_sync(self.daemon.store.find, self.owner, saveset)
        except StoreError as exc:
            await self._storage_failed(f"request for {saveset} from {self.peer} failed", exc)
            return None
        if meta is None:
            await self._send_error(404, f"no saveset {saveset} for this client")
        return meta

    async def _storage_failed(self, what: str, exc: StoreError) -> None:
        """The data directory failed a request: logged with where it is (the
        client is not told that), and answered with the error's status. A
        4xx one (a bad archive) is the client's doing: a warning."""
        if exc.status < 500:
            log.warning("%s: %s", what, exc)
        else:
            log.error("%s: %s (data directory %s)", what, exc, self.daemon.store.root)
        await self._send_error(exc.status, str(exc))

    async def _unreadable_saveset(self, saveset: str, exc: Exception) -> None:
        """Before the answer's head: a 500 says so."""
        log.error("saveset %s cannot be read: %s", saveset, exc)
        await self._send_error(500, f"saveset {saveset} cannot be read on the server")

    async def _as_recorded(self, meta: SavesetMeta, size: int, what: str) -> bool:
        """Whether the stored saveset (``size`` bytes now) is as long as
        recorded. A file cut short (or grown) on the server's disk would be
        sent as if whole: a restore that ends early, entries "not in the
        saveset". Else a 500 says that it is damaged, before the answer's
        head, and ``sbc verify`` tells more."""
        if size == meta.bytes:
            return True
        log.error(
            "saveset %s is damaged: %d bytes, recorded %d bytes; %s for %s (%s) refused",
            meta.saveset,
            size,
            meta.bytes,
            what,
            self.peer,
            self.owner,
        )
        await self._send_error(
            500,
            f"the server's copy of saveset {meta.saveset} is damaged: its stored data is {size} "
            f"bytes, but was {meta.bytes} bytes when stored; `sbc verify {meta.saveset}` checks "
            "it; restore from another saveset",
        )
        return False

    def _unreadable_mid_answer(self, saveset: str, exc: Exception) -> trio.BrokenResourceError:
        """After the answer's head only closing the connection tells: logged,
        and the error to raise for that returned."""
        log.error("saveset %s cannot be read: %s", saveset, exc)
        return trio.BrokenResourceError(f"saveset {saveset} unreadable")

    async def _entries(self, saveset: str) -> None:
        """The saveset's entries, one JSON object a line, sent as they are
        read (chunked): a listing of millions takes no more memory than one
        of ten."""
        meta = await self._owned_saveset(saveset)
        if meta is None:
            return
        path = self.daemon.store.tar_path(saveset)
        try:
            size = (await trio.to_thread.run_sync(path.stat)).st_size
        except OSError as exc:
            await self._unreadable_saveset(saveset, exc)
            return
        if not await self._as_recorded(meta, size, "listing of its entries"):
            return
        entries = saveset_entries(path)

        def next_lines() -> bytes:
            lines = (json.dumps(entry) + "\n" for entry in islice(entries, ENTRIES_PER_CHUNK))
            return "".join(lines).encode()

        try:
            chunk = await trio.to_thread.run_sync(next_lines)
        except (OSError, tarfile.TarError) as exc:
            await self._unreadable_saveset(saveset, exc)
            return
        await self._send(h11.Response(status_code=200, headers=JSON_LINES_HEAD))
        try:
            while chunk and not self.head_only:
                await self._send(h11.Data(data=chunk))
                chunk = await trio.to_thread.run_sync(next_lines)
        except (OSError, tarfile.TarError) as exc:
            raise self._unreadable_mid_answer(saveset, exc) from None
        finally:
            entries.close()
        await self._send(h11.EndOfMessage())

    async def _verify(self, saveset: str) -> None:
        """The stored saveset hashed anew and compared with the checksum
        recorded when it was stored, as JSON lines (chunked): how far it got
        every VERIFY_LINE_EVERY seconds, so that the client keeps waiting
        through a large saveset, then the verdict."""
        meta = await self._owned_saveset(saveset)
        if meta is None:
            return
        path = self.daemon.store.tar_path(saveset)
        try:
            check = await trio.to_thread.run_sync(SavesetCheck, path)
        except OSError as exc:
            await self._unreadable_saveset(saveset, exc)
            return
        head = h11.Response(status_code=200, headers=JSON_LINES_HEAD)
        if self.head_only:  # 200 whatever the verdict: nothing to hash
            check.close()
            await self._send(head, h11.EndOfMessage())
            return
        # It reads and hashes a whole saveset, as a restore does: counted,
        # and run in the transfer threads.
        with self.daemon.transfer_running(
            f"verification of {saveset} for {self.peer} ({self.owner})"
        ):
            try:
                await self._send(head)
                while not check.done:
                    await trio.to_thread.run_sync(
                        check.step, VERIFY_LINE_EVERY, limiter=self.daemon.transfer_threads
                    )
                    if not check.done:
                        await self._send(h11.Data(data=b'{"checked": %d}\n' % check.bytes))
            except OSError as exc:
                raise self._unreadable_mid_answer(saveset, exc) from None
            finally:
                check.close()
        intact = check.sha256 == meta.sha256 and check.bytes == meta.bytes
        verdict = {
            "saveset": saveset,
            "intact": intact,
            "bytes": check.bytes,
            "sha256": check.sha256,
            "recorded_bytes": meta.bytes,
            "recorded_sha256": meta.sha256,
        }
        if intact:
            log.info("verified saveset %s for %s (%s): intact", saveset, self.peer, self.owner)
        else:
            log.error(
                "saveset %s is damaged: %d bytes with sha256 %s, recorded %d bytes with sha256 %s",
                saveset,
                check.bytes,
                check.sha256,
                meta.bytes,
                meta.sha256,
            )
        await self._send(h11.Data(data=json.dumps(verdict).encode() + b"\n"))
        await self._send(h11.EndOfMessage())

    async def _download(self, saveset: str, entries: tuple[str, ...]) -> None:
        """The stored saveset; with ``entries``, a tar archive of just those
        members (and what is under them), found as it is sent, so chunked
        and without the checksum, which covers the whole saveset."""
        meta = await self._owned_saveset(saveset)
        if meta is None:
            return
        path = self.daemon.store.tar_path(saveset)
        try:
            f = await trio.to_thread.run_sync(open, path, "rb")
        except OSError as exc:
            await self._unreadable_saveset(saveset, exc)
            return
        size = os.fstat(f.fileno()).st_size
        if not await self._as_recorded(meta, size, "selective restore" if entries else "restore"):
            f.close()
            return
        if entries:
            framing = [("Transfer-Encoding", "chunked")]
        else:
            framing = [("Content-Length", str(size)), ("X-Sha256", meta.sha256)]
        head = h11.Response(
            status_code=200,
            headers=[("Content-Type", "application/x-tar"), *framing, ("X-Saveset", saveset)],
        )
        if self.head_only:
            f.close()
            await self._send(head, h11.EndOfMessage())
            return

        def send_saveset() -> int:
            last_sent = time.monotonic()

            def put(batch: Batch) -> None:
                nonlocal last_sent
                send_batch(self.tls, self.conn, batch, self.config.io_timeout)
                last_sent = time.monotonic()

            out = BatchWriter(put)
            for found in saveset_selection(path, entries) if entries else [(0, size)]:
                if found is None:  # still scanning: sbc hears from us now and then
                    if time.monotonic() - last_sent >= STILL_LOOKING_EVERY:
                        out.write(STILL_LOOKING)
                        out.finish()  # what is gathered goes now
                    continue
                start, end = found
                os.lseek(f.fileno(), start, os.SEEK_SET)
                out.fill_from(f.fileno(), end - start)
            if entries:
                out.write(END_OF_ARCHIVE)
            out.finish()
            return out.tell()

        started = time.monotonic()
        selected = f" (entries asked for: {len(entries)})" if entries else ""
        with self.daemon.transfer_running(
            f"restore of {saveset}{selected} to {self.peer} ({self.owner})"
        ):
            try:
                await self._send(head)
                sent = await run_transfer(self.tls, send_saveset, self.daemon.transfer_threads)
                await self._send(h11.EndOfMessage())
            except trio.TooSlowError:
                log.warning(
                    "restore of %s to %s stalled (client not reading); closed", saveset, self.peer
                )
                raise trio.BrokenResourceError("send timeout") from None
            except trio.BrokenResourceError as exc:  # the client went away mid-restore
                log.warning(
                    "restore of %s to %s (%s) cut off: %s", saveset, self.peer, self.owner, exc
                )
                raise
            except (OSError, tarfile.TarError) as exc:
                raise self._unreadable_mid_answer(saveset, exc) from None
            finally:
                f.close()
        seconds = max(time.monotonic() - started, 1e-6)
        log.info(
            "sent saveset %s%s to %s (%s): %d bytes in %.2fs (%.1f MB/s)",
            saveset,
            selected,
            self.peer,
            self.owner,
            sent,
            seconds,
            sent / seconds / 1e6,
        )
