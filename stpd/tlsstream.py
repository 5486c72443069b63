"""A TLS stream over a trio TCP socket, with OpenSSL doing the socket I/O.

Theory of operation
-------------------
The socket is non-blocking and handed to OpenSSL (``SSL_set_fd``). Every
TLS operation is tried at once; when OpenSSL says "want read" or "want
write" we park in trio until the socket is readable or writable, then try
again. Nothing else moves bytes: OpenSSL reads records straight from the
kernel and decrypts into the caller's buffer, and encrypts straight into
the kernel's socket buffer.

Why not memory BIOs (as ``trio.SSLStream`` does): with BIOs every byte is
copied into the BIO, out of it, and through Python on each chunk; measured
here, that costs more CPU than the encryption itself, and a backup pair on
two cores is CPU-bound. The price is that the transport must be a real
socket (``trio.SocketStream``); handlers see only ``trio.abc.Stream``.

Why not the stdlib ``ssl`` module: it cannot accept an invalid client
certificate with a warning (level 1 of STPD_HTTPS_USE_CLIENT_CERT).

The loop over records is C (``stpd/_tlsio.c``): one call fills or drains a
whole buffer with the GIL released, where a Python loop paid the
interpreter once per 16 KiB record. Error translation stays here. The async
methods wait in trio; the ``*_blocking`` ones, for the one thread that
moves a whole body (``stpd.transfer.run_transfer``), wait in C with poll().

``send_all`` returns when OpenSSL has handed every byte to the kernel, so
back-pressure reaches the writer unchanged. ``receive_into`` returns the
plaintext of every record already readable (at least one byte). One task
may send while another receives; waits on the socket are serialised per
direction because trio allows one waiter per direction.

Errors are translated at this boundary: a failed handshake raises
:class:`TLSHandshakeError` (with OpenSSL's reason), a peer that vanishes
without ``close_notify`` raises :class:`trio.BrokenResourceError`, and a clean
``close_notify`` reads as end of stream. A cancelled send may leave a record
half-written, so nothing more can be sent after it; receiving goes on (a
client cut off mid-upload still reads why).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable

import trio
from cryptography import x509
from cryptography.hazmat.bindings._rust import _openssl
from OpenSSL import SSL

from pki.tls import PeerVerdict, new_connection, peer_verdict
from stpd import _tlsio

# The C loop calls the very SSL_read/SSL_write that pyOpenSSL uses.
_tlsio.bind(
    *(
        int(_openssl.ffi.cast("uintptr_t", _openssl.ffi.addressof(_openssl.lib, name)))
        for name in ("SSL_read", "SSL_write", "SSL_get_error")
    )
)

RECEIVE_BUFFER = 256 * 1024  # plaintext gathered per receive_borrowed call
CLOSE_NOTIFY_TIMEOUT = 1.0  # seconds we wait to say goodbye politely
UNWAITED_CALLS_PER_YIELD = 8  # see TLSStream._checkpoint_unless_waited


def _milliseconds(timeout: float) -> int:
    return max(0, min(int(timeout * 1000), 2**31 - 1))


class TLSHandshakeError(trio.BrokenResourceError):
    """The TLS handshake failed; ``str()`` is OpenSSL's reason in words."""


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, SSL.SysCallError):
        return "connection closed by peer"
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        parts = [str(item[2]) for item in exc.args[0] if len(item) >= 3]
        if parts:
            return "; ".join(parts)
        # OpenSSL queued no reason: the socket failed under it (a reset).
        return "connection reset by peer"
    return str(exc) or type(exc).__name__


class TLSStream(trio.abc.Stream):
    def __init__(
        self,
        transport: trio.SocketStream,
        ctx: SSL.Context,
        *,
        server_hostname: str | None = None,
    ) -> None:
        """``server_hostname`` makes this the client side (and sets SNI)."""
        self.transport = transport
        self._socket = transport.socket
        self.conn = new_connection(ctx, self._socket, server_hostname=server_hostname)
        self._ssl = self.conn._ssl  # for pyOpenSSL's error translation
        self._ssl_address = int(_openssl.ffi.cast("uintptr_t", self._ssl))  # for _tlsio
        self._read_lock = trio.Lock()  # one waiter per direction (trio's rule)
        self._write_lock = trio.Lock()
        self._plain_buffer = bytearray(RECEIVE_BUFFER)
        self._plain_view = memoryview(self._plain_buffer)
        self._handshook = False
        self._waits = 0  # socket waits so far: see _checkpoint_unless_waited
        self._unyielded = 0  # calls since we last let other tasks run
        self._eof = False
        self._broken: str | None = None
        # A send cut off mid-record breaks sending only: the peer's answer
        # (say, why it refused an upload) can still be read.
        self._send_broken: str | None = None
        self._closed = False

    # -- waiting on the socket -----------------------------------------------

    async def _wait_readable(self) -> None:
        self._waits += 1
        async with self._read_lock:
            await trio.lowlevel.wait_readable(self._socket)

    async def _wait_writable(self) -> None:
        self._waits += 1
        async with self._write_lock:
            await trio.lowlevel.wait_writable(self._socket)

    async def _checkpoint_unless_waited(self, waits_before: int) -> None:
        """Yield to the other tasks even when the socket was ready at once,
        else a busy transfer would starve the other connections. Every call
        is a cancellation point (checked on entry); yielding costs a trip
        through the scheduler, measured at 6% of an upload when done on
        every call, so a call that did not wait yields every
        ``UNWAITED_CALLS_PER_YIELD`` (at most ~2 MiB of work between)."""
        if self._waits != waits_before:
            self._unyielded = 0
            return
        self._unyielded += 1
        if self._unyielded >= UNWAITED_CALLS_PER_YIELD:
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _check_usable(self, sending: bool = False) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream is closed")
        broken = self._broken or (self._send_broken if sending else None)
        if broken is not None:
            raise trio.BrokenResourceError(broken)

    # -- handshake and peer ---------------------------------------------------

    async def do_handshake(self) -> None:
        self._check_usable()
        while True:
            try:
                self.conn.do_handshake()
                break
            except SSL.WantReadError:
                await self._wait_readable()
            except SSL.WantWriteError:
                await self._wait_writable()
            except SSL.SysCallError:
                self._broken = "connection closed by peer during TLS handshake"
                raise TLSHandshakeError(self._broken) from None
            except SSL.Error as exc:
                self._broken = _ssl_reason(exc)
                raise TLSHandshakeError(self._broken) from None
        self._handshook = True

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self.conn.get_peer_certificate(as_cryptography=True)

    @property
    def verdict(self) -> PeerVerdict:
        return peer_verdict(self.conn)

    # -- receiving ------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        buf = bytearray(max_bytes or RECEIVE_BUFFER)
        n = await self.receive_into(buf)
        del buf[n:]
        return bytes(buf)

    async def receive_borrowed(self) -> memoryview:
        """Like ``receive_some``, without a copy: the view points into our
        own buffer and is valid only until the next receive. For callers
        that copy anyway (h11's ``receive_data``)."""
        n = await self.receive_into(self._plain_buffer)
        return self._plain_view[:n]

    async def receive_into(self, buf: bytearray | memoryview) -> int:
        """Fill ``buf`` with the plaintext of every record readable now (at
        least one byte); 0 means the peer closed with close_notify."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waits_before = self._waits
        filled = await self._receive_into(buf)
        await self._checkpoint_unless_waited(waits_before)
        return filled

    async def _receive_into(self, buf: bytearray | memoryview) -> int:
        self._check_usable()
        if self._eof:
            return 0
        filled = 0
        while True:
            step = self._read(buf, filled)
            if step is SSL.WantReadError:
                await self._wait_readable()
            elif step is SSL.WantWriteError:  # a TLS 1.3 key update answering
                await self._wait_writable()
            else:
                return step  # type: ignore[return-value]

    def _read(
        self, buf: bytearray | memoryview, filled: int, fd: int = -1, timeout_ms: int = -1
    ) -> int | type[SSL.Error]:
        """One C read into ``buf[filled:]`` (waiting on ``fd`` if given): the
        new fill level to return, or the SSL.Want* class to wait for."""
        read, result, waited = _tlsio.read_into(self._ssl_address, buf, filled, fd, timeout_ms)
        filled += read
        if result > 0:
            return filled  # buf is full
        if waited == _tlsio.TIMED_OUT:
            raise trio.TooSlowError("no data within the timeout")
        try:
            self._raise_ssl_error(result)
        except (SSL.WantReadError, SSL.WantWriteError) as exc:
            return filled if filled else type(exc)
        except SSL.ZeroReturnError:
            self._eof = True
            return filled
        except SSL.SysCallError as exc:
            reason = (
                "connection closed without TLS close_notify"
                if exc.args and exc.args[0] in (-1, 0)
                else f"connection lost: {exc.args[1] if len(exc.args) > 1 else exc}"
            )
            return self._broke(reason, filled)
        except SSL.Error as exc:
            return self._broke(f"TLS error: {_ssl_reason(exc)}", filled)
        raise AssertionError("unreachable")  # pragma: no cover - _raise_ssl_error raises

    def _broke(self, reason: str, filled: int) -> int:
        """Hand over what was read before the break; the next call raises."""
        self._broken = reason
        if filled:
            return filled
        raise trio.BrokenResourceError(reason)

    def _raise_ssl_error(self, result: int) -> None:
        """Raise what an SSL_read/SSL_write result <= 0 means (pyOpenSSL's
        translation, which reads this thread's OpenSSL error queue)."""
        self.conn._raise_ssl_error(self._ssl, result)
        raise SSL.Error(f"TLS call failed with {result}")  # pragma: no cover - always raised above

    # -- sending ----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.send_many([data])

    async def send_many(self, pieces: list[bytes] | list[bytes | bytearray | memoryview]) -> None:
        """Send the pieces in order; returns when the kernel has them all."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waits_before = self._waits
        await self._send_many(pieces)
        await self._checkpoint_unless_waited(waits_before)

    async def _send_many(self, pieces: list[bytes] | list[bytes | bytearray | memoryview]) -> None:
        self._check_usable(sending=True)
        try:
            for piece in pieces:
                view = memoryview(piece).cast("B")
                while view:
                    view, want, _ = self._write(view)
                    if want is SSL.WantWriteError:
                        await self._wait_writable()
                    elif want is SSL.WantReadError:  # pragma: no cover - no renegotiation
                        await self._wait_readable()
        except BaseException:
            # Cancelled mid-record: nothing more can be sent, but what the
            # peer sends can still be read.
            self._send_broken = self._send_broken or "a send was interrupted"
            raise

    def _write(
        self, view: memoryview, fd: int = -1, timeout_ms: int = -1, watch_input: bool = False
    ) -> tuple[memoryview, type[SSL.Error] | None, bool]:
        """One C write of ``view`` (waiting on ``fd`` if given): what is left
        to send, the SSL.Want* class to wait for (if any), and whether it
        stopped because the peer sent something (``watch_input``)."""
        written, result, waited = _tlsio.write_from(
            self._ssl_address, view, fd, timeout_ms, watch_input
        )
        view = view[written:]
        if result > 0:
            return view, None, False
        if waited == _tlsio.TIMED_OUT:
            self._send_broken = "a send timed out"
            raise trio.TooSlowError("the peer stopped reading")
        if waited == _tlsio.READABLE:
            return view, None, True
        try:
            self._raise_ssl_error(result)
        except (SSL.WantReadError, SSL.WantWriteError) as exc:
            return view, type(exc), False
        except SSL.Error as exc:
            self._broken = f"connection lost: {_ssl_reason(exc)}"
            raise trio.BrokenResourceError(self._broken) from None
        raise AssertionError("unreachable")  # pragma: no cover - _raise_ssl_error raises

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait_writable()

    # -- a whole transfer in one thread ------------------------------------------
    # For stpd.transfer.run_transfer: the thread is the stream's only user
    # meanwhile, and OpenSSL waits with poll() in C, so the bytes of a body
    # never pass through the trio loop.

    def receive_into_blocking(self, buf: bytearray | memoryview, timeout: float) -> int:
        """Like ``receive_into``, in a transfer thread: waits up to
        ``timeout`` seconds for the first byte (``trio.TooSlowError``)."""
        self._check_usable()
        if self._eof:
            return 0
        while True:  # a Want* class here is a wake-up that brought no whole record
            step = self._read(buf, 0, self._socket.fileno(), _milliseconds(timeout))
            if isinstance(step, int):
                return step

    def read_available(self, buf: bytearray | memoryview) -> int:
        """What the peer has sent already, without waiting (0 if nothing, or
        at the end of the stream: see ``at_eof``)."""
        self._check_usable()
        if self._eof:
            return 0
        step = self._read(buf, 0)
        return step if isinstance(step, int) else 0

    @property
    def at_eof(self) -> bool:
        return self._eof

    def send_blocking(
        self,
        pieces: list[bytes | bytearray | memoryview],
        timeout: float,
        on_input: Callable[[], bool] | None = None,
    ) -> bool:
        """Send the pieces, in a transfer thread, waiting up to ``timeout``
        seconds each time the peer does not read (``trio.TooSlowError``).
        With ``on_input``, each time the peer sends something meanwhile
        (an early answer) ``on_input()`` decides: True goes on, False stops
        here and returns False (nothing more can be sent then)."""
        self._check_usable(sending=True)
        fd, timeout_ms = self._socket.fileno(), _milliseconds(timeout)
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view:  # a Want* class left here is a wake-up with the socket not ready
                view, _, peer_sent = self._write(view, fd, timeout_ms, on_input is not None)
                if peer_sent and on_input is not None and not on_input():
                    self._send_broken = "sending stopped: the peer answered"
                    return False
        return True

    def interrupt(self) -> None:
        """End a transfer thread's wait at once, because its transfer was
        cancelled: the socket is shut down and the stream is broken."""
        self._broken = self._broken or "the transfer was cancelled"
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)

    # -- closing ----------------------------------------------------------------

    async def linger(self, seconds: float, max_bytes: int = 1024 * 1024) -> None:
        """After a refusal: stop sending, and read and drop what the peer
        still sends for a moment. Closing a socket with unread data makes
        the kernel send a reset, which can overtake our TLS alert, and the
        peer would see "connection reset" instead of the reason."""
        try:
            self._socket.shutdown(socket.SHUT_WR)
        except OSError:
            return
        drained = 0
        with trio.move_on_after(seconds):
            while drained < max_bytes:
                try:
                    data = await self._socket.recv(64 * 1024)
                except OSError:
                    return
                if not data:
                    return
                drained += len(data)

    async def aclose(self) -> None:
        """Send close_notify when we can, and always close the socket."""
        if self._closed:
            return
        try:
            if self._handshook and self._broken is None and self._send_broken is None:
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT) as scope:
                    scope.shield = True
                    await self._send_close_notify()
        finally:
            self._closed = True
            await trio.aclose_forcefully(self.transport)

    async def _send_close_notify(self) -> None:
        while True:
            try:
                self.conn.shutdown()
                return
            except SSL.WantWriteError:
                await self._wait_writable()
            except (SSL.WantReadError, SSL.Error):
                return  # sent ours; not waiting for the peer's
