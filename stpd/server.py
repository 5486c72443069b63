"""The trio layer of STPD: accept, handshake, judge, then HTTP/1.1 (h11).

Decisions live in ``stpd.protocol`` (who the peer is, what a request means)
and ``stpd.store`` (savesets on disk); this module only moves bytes and
keeps every wait under a named timeout from ``StpdConfig``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import h11
import trio
from cryptography import x509

from pki.tls import days_left, server_context
from stpd import __version__
from stpd.config import StpdConfig
from stpd.protocol import (
    Download,
    ListSavesets,
    Metadata,
    Reject,
    Status,
    Upload,
    judge_peer,
    refused_handshake,
    route,
)
from stpd.store import SavesetStore, StoreError
from stpd.tlsstream import TLSHandshakeError, TLSStream
from stpd.transfer import BATCH_BYTES, READ_CHUNK, Batcher, Get, Put, sink_thread, source_thread

log = logging.getLogger("stpd")

LINGER_SECONDS = 1.0  # after an early error answer, read and drop for this long so the
LINGER_BYTES = 64 * 1024 * 1024  # client sees our answer instead of a connection reset


def format_peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "unknown peer"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Stpd:
    def __init__(self, config: StpdConfig) -> None:
        self.config = config
        self.ssl_context = server_context(config.layout, config.client_cert_policy)
        self.server_cert = x509.load_pem_x509_certificate(config.layout.server_cert.read_bytes())
        self.store = SavesetStore(config.saveset_dir)
        self.started = time.monotonic()
        self.connections = 0
        self.active_transfers = 0
        self.port: int | None = None

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        removed = await trio.to_thread.run_sync(self.store.prepare)
        for path in removed:
            log.warning("removed leftover of an interrupted upload: %s", path)
        host, port = self.config.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info(
            "stpd %s listening on %s:%d, client certificate level %s, data in %s",
            __version__,
            host,
            self.port,
            self.config.describe_level(),
            self.store.root,
        )
        task_status.started(self.port)
        await trio.serve_listeners(self.handle_connection, listeners)

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "level": int(self.config.client_cert_policy),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
            "connections": self.connections,
            "active_transfers": self.active_transfers,
            "server_certificate": {
                "subject": self.server_cert.subject.rfc4514_string(),
                "not_after": self.server_cert.not_valid_after_utc.isoformat(),
                "days_left": int(days_left(self.server_cert)),
            },
        }

    async def handle_connection(self, transport: trio.SocketStream) -> None:
        peer = format_peer(transport)
        tls = TLSStream(transport, self.ssl_context)
        self.connections += 1
        try:
            await self._serve_peer(tls, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("connection with %s ended: %s", peer, exc)
        except Exception:  # a bug must not take the daemon down
            log.exception("internal error while serving %s", peer)
        finally:
            self.connections -= 1
            await tls.aclose()

    async def _serve_peer(self, tls: TLSStream, peer: str) -> None:
        policy = self.config.client_cert_policy
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await tls.do_handshake()
        except trio.TooSlowError:
            log.warning(
                "TLS handshake with %s timed out after %gs", peer, self.config.handshake_timeout
            )
            return
        except TLSHandshakeError as exc:
            decision = refused_handshake(peer, policy, tls.verdict.reason or str(exc))
            log.log(decision.log_level, "%s", decision.message)
            return
        decision = judge_peer(
            peer, policy, tls.peer_certificate, tls.verdict.problems, self.config.allowed_clients
        )
        log.log(decision.log_level, "%s", decision.message)
        if not decision.serve:
            return
        session = HttpSession(self, tls, peer, decision.owner)
        await session.run()


class HttpSession:
    """One TLS connection's sequence of HTTP/1.1 requests (keep-alive)."""

    def __init__(self, daemon: Stpd, tls: TLSStream, peer: str, owner: str) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.tls = tls
        self.peer = peer
        self.owner = owner
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes
        )

    async def run(self) -> None:
        while True:
            try:
                request = await self._read_request()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                log.warning("bad request from %s: %s (answered %d)", self.peer, exc, status)
                await self._send_error(status, f"bad request: {exc}")
                return
            if request is None:
                return
            if self.daemon.connections > self.config.max_connections:
                log.warning(
                    "connection limit %d reached; answered 503 to %s",
                    self.config.max_connections,
                    self.peer,
                )
                await self._send_error(503, "server busy: too many connections, try again later")
                return
            await self._dispatch(request)
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

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
            data = b""
            with trio.move_on_at(deadline):
                data = await self.tls.receive_borrowed()
                if not data:
                    self.conn.receive_data(b"")
                    continue
            if not data:
                what = "header" if started else "idle"
                log.info("closing %s connection from %s after timeout", what, self.peer)
                if started:
                    await self._send_error(408, "request header timeout")
                return None
            if not started:
                started = True
                deadline = trio.current_time() + self.config.header_timeout
            self.conn.receive_data(data)

    async def _next_body_event(self) -> h11.Data | h11.EndOfMessage:
        while True:
            event = self.conn.next_event()
            if isinstance(event, (h11.Data, h11.EndOfMessage)):
                return event
            if event is h11.NEED_DATA:
                with trio.fail_after(self.config.io_timeout):
                    data = await self.tls.receive_borrowed()
                self.conn.receive_data(data)
                continue
            raise trio.BrokenResourceError("connection closed in the middle of the request body")

    # -- writing -------------------------------------------------------------

    async def _send(self, *events: h11.Event) -> None:
        pieces: list[bytes] = []
        for event in events:
            pieces.extend(self.conn.send_with_data_passthrough(event) or [])
        with trio.fail_after(self.config.io_timeout):
            await self.tls.send_all(b"".join(pieces))

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

    async def _send_error(self, status: int, message: str) -> None:
        """Answer an error and close; the client may still be sending, so
        linger briefly to let it read the answer instead of a reset."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            await self._send_json(status, {"error": message}, [("Connection", "close")])
        except (trio.BrokenResourceError, trio.TooSlowError, h11.LocalProtocolError):
            return
        if self.conn.their_state in (h11.SEND_BODY, h11.IDLE) and status not in (408,):
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

    async def _dispatch(self, request: h11.Request) -> None:
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        action = route(method, target)
        if isinstance(action, Reject):
            log.info(
                "%s %s from %s: %d %s",
                method,
                target[:200],
                self.peer,
                action.status,
                action.message,
            )
            await self._send_error(action.status, action.message)
        elif isinstance(action, Status):
            await self._send_json(200, self.daemon.status())
        elif isinstance(action, ListSavesets):
            found = await trio.to_thread.run_sync(self.daemon.store.owned_by, self.owner)
            await self._send_json(200, [meta.to_json() for meta in found])
        elif isinstance(action, Metadata):
            meta = await trio.to_thread.run_sync(self.daemon.store.find, self.owner, action.saveset)
            if meta is None:
                await self._send_error(404, f"no saveset {action.saveset} for this client")
            else:
                await self._send_json(200, meta.to_json())
        elif isinstance(action, Download):
            await self._download(action.saveset)
        elif isinstance(action, Upload):
            await self._upload(request, action.source)

    async def _upload(self, request: h11.Request, source: str) -> None:
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        store = self.daemon.store
        try:
            upload = await trio.to_thread.run_sync(store.begin, self.owner, source, self.peer)
        except StoreError as exc:
            log.error("upload from %s refused: %s", self.peer, exc)
            await self._send_error(exc.status, str(exc))
            return
        started = time.monotonic()
        self.daemon.active_transfers += 1
        try:

            def write_all(get: Get) -> None:
                while batch := get():
                    upload.write(batch)

            async with sink_thread(write_all) as put:
                batcher = Batcher(put)
                while True:
                    event = await self._next_body_event()
                    if isinstance(event, h11.EndOfMessage):
                        break
                    await batcher.add(event.data)
                await batcher.flush()
            meta = await trio.to_thread.run_sync(upload.commit)
        except StoreError as exc:
            log.error("upload from %s (%s) failed: %s", self.peer, self.owner, exc)
            await self._send_error(exc.status, str(exc))
            return
        except (trio.BrokenResourceError, trio.TooSlowError, h11.RemoteProtocolError) as exc:
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning(
                "upload from %s (%s) cut off: %s; nothing stored", self.peer, self.owner, reason
            )
            raise trio.BrokenResourceError(reason) from None
        finally:
            self.daemon.active_transfers -= 1
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
        await self._send_json(201, meta.to_json(), [("Location", f"/savesets/{meta.saveset}")])

    async def _download(self, saveset: str) -> None:
        store = self.daemon.store
        meta = await trio.to_thread.run_sync(store.find, self.owner, saveset)
        if meta is None:
            await self._send_error(404, f"no saveset {saveset} for this client")
            return
        try:
            f = await trio.to_thread.run_sync(open, store.tar_path(saveset), "rb")
        except OSError as exc:
            log.error("saveset %s cannot be read: %s", saveset, exc)
            await self._send_error(500, f"saveset {saveset} cannot be read on the server")
            return
        size = os.fstat(f.fileno()).st_size

        def read_all(put: Put) -> None:
            while True:
                batch, total = [], 0
                while total < BATCH_BYTES and (piece := f.read(READ_CHUNK)):
                    batch.append(piece)
                    total += len(piece)
                if not batch:
                    return
                put(batch)

        started = time.monotonic()
        self.daemon.active_transfers += 1
        try:
            await self._send(
                h11.Response(
                    status_code=200,
                    headers=[
                        ("Content-Type", "application/x-tar"),
                        ("Content-Length", str(size)),
                        ("X-Saveset", saveset),
                        ("X-Sha256", meta.sha256),
                    ],
                )
            )
            async with source_thread(read_all) as batches:
                async for batch in batches:
                    pieces = []
                    for piece in batch:
                        pieces.extend(
                            self.conn.send_with_data_passthrough(h11.Data(data=piece)) or []
                        )
                    with trio.fail_after(self.config.io_timeout):
                        await self.tls.send_many(pieces)
            await self._send(h11.EndOfMessage())
        except trio.TooSlowError:
            log.warning(
                "restore of %s to %s stalled (client not reading); closed", saveset, self.peer
            )
            raise trio.BrokenResourceError("send timeout") from None
        finally:
            self.daemon.active_transfers -= 1
            f.close()
        seconds = max(time.monotonic() - started, 1e-6)
        log.info(
            "sent saveset %s to %s (%s): %d bytes in %.2fs (%.1f MB/s)",
            saveset,
            self.peer,
            self.owner,
            size,
            seconds,
            size / seconds / 1e6,
        )
