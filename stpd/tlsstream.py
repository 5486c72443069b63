"""A TLS stream over any trio byte stream, driven through memory BIOs.

Theory of operation
-------------------
OpenSSL never touches the socket. Ciphertext that arrives from the transport
is pushed into the connection's incoming BIO (``bio_write``); plaintext comes
out of ``recv_into``. Plaintext we send goes in through ``send`` and the
ciphertext it produces is pulled from the outgoing BIO (``bio_read``) and
written to the transport. Whenever OpenSSL says "want read" we first flush
whatever it queued for the peer (a handshake message, a key update), then
wait for more ciphertext.

Throughput comes from doing few, large operations: the transport is read in
``TRANSPORT_CHUNK`` pieces, every plaintext record already buffered is
drained before we wait again, and ciphertext is flushed with one
``send_all`` per call rather than one per record. ``send_all`` never buffers
more than it was given, so back-pressure reaches the writer unchanged.

Errors are translated at this boundary: a failed handshake raises
:class:`TLSHandshakeError` (with OpenSSL's reason), a peer that vanishes
without ``close_notify`` raises :class:`trio.BrokenResourceError`, and a clean
``close_notify`` reads as end of stream (``b""``).

Why our own stream instead of ``trio.SSLStream``: the stdlib ``ssl`` module
cannot accept an invalid client certificate with a warning (level 1), and
this loop moves bulk data at about twice its speed.
"""

from __future__ import annotations

import trio
from cryptography import x509
from OpenSSL import SSL

from pki.tls import PeerVerdict, peer_verdict

TRANSPORT_CHUNK = 256 * 1024  # ciphertext read per transport receive
TLS_RECORD = 16 * 1024  # largest plaintext record; one recv_into per record
CLOSE_NOTIFY_TIMEOUT = 1.0  # seconds we wait to say goodbye politely


class TLSHandshakeError(trio.BrokenResourceError):
    """The TLS handshake failed; ``str()`` is OpenSSL's reason in words."""


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, SSL.SysCallError):
        return "connection closed by peer during TLS handshake"
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        parts = [str(item[2]) for item in exc.args[0] if len(item) >= 3]
        if parts:
            return "; ".join(parts)
    return str(exc) or type(exc).__name__


class TLSStream(trio.abc.Stream):
    def __init__(self, transport: trio.abc.Stream, conn: SSL.Connection) -> None:
        self.transport = transport
        self.conn = conn
        self._send_lock = trio.Lock()  # transport writes from send and receive paths
        self._handshook = False
        self._eof = False
        self._closed = False

    # -- handshake and peer ---------------------------------------------------

    async def do_handshake(self) -> None:
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush()
                if not await self._pull():
                    raise TLSHandshakeError("connection closed by peer during TLS handshake") from None
            except SSL.Error as exc:
                # Send the alert OpenSSL queued (e.g. "unknown ca") before failing.
                await self._flush_quietly()
                raise TLSHandshakeError(_ssl_reason(exc)) from None
        await self._flush()
        self._handshook = True

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self.conn.get_peer_certificate(as_cryptography=True)

    @property
    def verdict(self) -> PeerVerdict:
        return peer_verdict(self.conn)

    @property
    def cipher(self) -> str:
        return f"{self.conn.get_protocol_version_name()} {self.conn.get_cipher_name()}"

    # -- trio.abc.Stream ------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        buf = bytearray(max_bytes or TRANSPORT_CHUNK)
        n = await self.receive_into(buf)
        del buf[n:]
        return bytes(buf)

    async def receive_into(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` with as much plaintext as is already decryptable
        (at least one byte); 0 means the peer closed cleanly."""
        if self._closed:
            raise trio.ClosedResourceError("TLS stream is closed")
        if self._eof:
            return 0
        view = memoryview(buf)
        filled = 0
        while True:
            try:
                while filled < len(view):
                    filled += self.conn.recv_into(
                        view[filled:], min(TLS_RECORD, len(view) - filled)
                    )
            except SSL.WantReadError:
                if filled:
                    return filled
                await self._flush()  # a key update or session ticket may be waiting
                if not await self._pull():
                    raise trio.BrokenResourceError(
                        "connection closed without TLS close_notify"
                    ) from None
                continue
            except SSL.ZeroReturnError:
                self._eof = True
                return filled
            except SSL.SysCallError:
                raise trio.BrokenResourceError(
                    "connection closed without TLS close_notify"
                ) from None
            except SSL.Error as exc:
                raise trio.BrokenResourceError(f"TLS error: {_ssl_reason(exc)}") from None
            return filled

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_many([data])

    async def send_many(self, pieces: list[bytes] | list[bytes | bytearray | memoryview]) -> None:
        """Encrypt all pieces, then flush the ciphertext at once."""
        if self._closed:
            raise trio.ClosedResourceError("TLS stream is closed")
        for piece in pieces:
            self._encrypt(memoryview(piece))
        await self._flush()

    def _encrypt(self, view: memoryview) -> None:
        while view:
            try:
                sent = self.conn.send(view)
            except SSL.Error as exc:  # memory BIOs never block; renegotiation is off
                raise trio.BrokenResourceError(f"TLS error: {_ssl_reason(exc)}") from None
            view = view[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send close_notify when we can, and always close the transport."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._handshook:
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT) as scope:
                    scope.shield = True
                    try:
                        self.conn.shutdown()
                    except SSL.Error:
                        pass
                    await self._flush_quietly()
        finally:
            await trio.aclose_forcefully(self.transport)

    # -- moving ciphertext ----------------------------------------------------

    async def _pull(self) -> bool:
        """Feed one chunk of ciphertext into OpenSSL; False at transport EOF."""
        try:
            data = await self.transport.receive_some(TRANSPORT_CHUNK)
        except (trio.BrokenResourceError, OSError) as exc:
            raise trio.BrokenResourceError(f"connection lost: {exc}") from None
        if not data:
            return False
        self.conn.bio_write(data)
        return True

    async def _flush(self) -> None:
        # Read and send under one lock so that two tasks never reorder records.
        async with self._send_lock:
            while True:
                try:
                    pending = self.conn.bio_read(4 * TRANSPORT_CHUNK)
                except SSL.WantReadError:
                    return
                try:
                    await self.transport.send_all(pending)
                except (trio.BrokenResourceError, OSError) as exc:
                    raise trio.BrokenResourceError(f"connection lost: {exc}") from None

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
