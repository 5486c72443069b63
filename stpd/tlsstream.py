"""A TLS stream over a trio TCP socket: ``stpd.tlsconn`` with trio waits.

Theory of operation
-------------------
:class:`TLSStream` is a :class:`~stpd.tlsconn.TLSConnection` (OpenSSL
reads and writes the socket itself; see there why) whose async methods
park in trio until the socket is ready, and whose failures are trio's
exceptions, which is what the rest of STPD handles: a peer that vanishes
raises :class:`trio.BrokenResourceError`, a stall past a timeout
:class:`trio.TooSlowError`. The blocking methods it inherits are for the
one thread that moves a whole body (``stpd.aio.run_transfer``).

``send_all`` returns when OpenSSL has handed every byte to the kernel, so
back-pressure reaches the writer unchanged. ``receive_into`` returns the
plaintext of every record already readable (at least one byte). One task
may send while another receives; waits on the socket are serialised per
direction because trio allows one waiter per direction. A cancelled send
may leave a record half-written, so nothing more can be sent after it;
receiving goes on.
"""

from __future__ import annotations

import socket

import trio
from OpenSSL import SSL

from stpd.tlsconn import (
    CLOSE_NOTIFY_TIMEOUT,
    RECEIVE_BUFFER,
    TLSBroken,
    TLSClosed,
    TLSConnection,
    TLSHandshakeError,
    TLSTimeout,
    Want,
)

UNWAITED_CALLS_PER_YIELD = 8  # see TLSStream._checkpoint_unless_waited


class _Broken(TLSBroken, trio.BrokenResourceError):
    pass


class _TooSlow(TLSTimeout, trio.TooSlowError):
    pass


class _Closed(TLSClosed, trio.ClosedResourceError):
    pass


class _HandshakeError(TLSHandshakeError, trio.BrokenResourceError):
    pass


class TLSStream(TLSConnection, trio.abc.Stream):
    Broken = _Broken
    TooSlow = _TooSlow
    Closed = _Closed
    HandshakeError = _HandshakeError

    def __init__(
        self,
        transport: trio.SocketStream,
        ctx: SSL.Context,
        *,
        server_hostname: str | None = None,
    ) -> None:
        """``server_hostname`` makes this the client side (and sets SNI)."""
        sock: socket.socket = transport.socket  # type: ignore[assignment]  # has fileno(), shutdown()
        super().__init__(sock, ctx, server_hostname=server_hostname)
        self.transport = transport
        self._read_lock = trio.Lock()  # one waiter per direction (trio's rule)
        self._write_lock = trio.Lock()
        self._waits = 0  # socket waits so far: see _checkpoint_unless_waited
        self._unyielded = 0  # calls since we last let other tasks run

    # -- waiting on the socket -----------------------------------------------

    async def _wait_for(self, want: Want) -> None:
        self._waits += 1
        if want is SSL.WantReadError:
            async with self._read_lock:
                await trio.lowlevel.wait_readable(self._socket)
        else:
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

    # -- handshake ------------------------------------------------------------

    async def do_handshake(self) -> None:
        while (want := self._handshake_step()) is not None:
            await self._wait_for(want)

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
        buffer = self._borrowable()
        return buffer[: await self.receive_into(buffer)]

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
        while True:
            step = self._read(buf, 0)
            if isinstance(step, int):
                return step
            await self._wait_for(step)  # WantWrite: a TLS 1.3 key update answering

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
                    if want is not None:
                        await self._wait_for(want)
        except BaseException:
            # Cancelled mid-record: nothing more can be sent, but what the
            # peer sends can still be read.
            self._send_broken = self._send_broken or "a send was interrupted"
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait_for(SSL.WantWriteError)

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
                    data = await self.transport.socket.recv(64 * 1024)
                except OSError:
                    return
                if not data:
                    return
                drained += len(data)

    async def send_close_notify(self) -> None:
        """Say that we send no more (for up to CLOSE_NOTIFY_TIMEOUT), once,
        when the connection still allows it."""
        if self._may_say_goodbye():
            with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT) as scope:
                scope.shield = True
                while (want := self._close_notify_step()) is not None:
                    await self._wait_for(want)

    async def aclose(self) -> None:
        """Send close_notify when we can, and always close the socket."""
        if self._closed:
            return
        try:
            await self.send_close_notify()
        finally:
            self._closed = True
            await trio.aclose_forcefully(self.transport)
