"""TLS over a non-blocking socket, with OpenSSL doing the socket I/O; no trio.

Theory of operation
-------------------
The socket is non-blocking and handed to OpenSSL (``SSL_set_fd``). Every
TLS operation is tried at once; when OpenSSL says "want read" or "want
write", the caller waits until the socket is ready and tries again. Nothing
else moves bytes: OpenSSL reads records straight from the kernel and
decrypts into the caller's buffer, and encrypts straight into the kernel's
socket buffer.

Why not memory BIOs (as ``trio.SSLStream`` does): with BIOs every byte is
copied into the BIO, out of it, and through Python on each chunk; measured
here, that costs more CPU than the encryption itself, and a backup pair on
two cores is CPU-bound. The price is that the transport must be a real
socket.

Why not the stdlib ``ssl`` module: it cannot accept an invalid client
certificate with a warning (level 1 of STPD_HTTPS_USE_CLIENT_CERT).

The loop over records is C (``stpd/_tlsio.c``): one call fills or drains a
whole buffer with the GIL released, where a Python loop paid the
interpreter once per 16 KiB record. Error translation stays here.

:class:`TLSConnection` is the step of each operation and the *blocking*
methods, which wait with poll() (in C for data): SBC, a command with one
connection, uses them from its one thread, and STPD from the thread that
moves a whole body. ``stpd.tlsstream.TLSStream`` adds the async methods,
which wait in trio, and raises trio's exceptions; this module does not
import trio, because importing it costs a short ``sbc`` run a third of
its time.

Errors are translated at this boundary: a failed handshake raises
``HandshakeError`` (with OpenSSL's reason), a peer that vanishes without
``close_notify`` raises ``Broken``, a peer that stalls past the timeout
``TooSlow``, and a clean ``close_notify`` reads as end of stream. A send
cut off mid-record breaks sending only; receiving goes on (a client cut
off mid-upload still reads why).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

from cryptography import x509
from cryptography.hazmat.bindings._rust import _openssl
from OpenSSL import SSL

from pki.tls import NO_HANDSHAKE_REASON, PeerVerdict, new_connection, peer_verdict
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


@contextlib.contextmanager
def signals_end_waits() -> Iterator[None]:
    """Within this, a signal (Ctrl-C) ends a blocking wait in C at once: also
    one that arrives just before poll() begins, or in another thread, where
    poll() sees no EINTR and would wait out its timeout. Python's signal
    handler writes to a pipe (``signal.set_wakeup_fd``) that the waits watch.
    For sbc; in the main thread only (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    _tlsio.set_wake_fd(read_end)
    try:
        yield
    finally:
        _tlsio.set_wake_fd(-1)
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)


class TLSBroken(Exception):
    """The connection is gone (the peer vanished, a TLS error)."""


class TLSTimeout(Exception):
    """The peer did not send, or did not read, within the timeout."""


class TLSClosed(Exception):
    """This side already closed the connection."""


class TLSHandshakeError(TLSBroken):
    """The TLS handshake failed; ``str()`` is OpenSSL's reason in words."""


def _milliseconds(timeout: float) -> int:
    return max(0, min(int(timeout * 1000), 2**31 - 1))


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, SSL.SysCallError):
        return "connection closed by peer"
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        parts = [str(item[2]) for item in exc.args[0] if len(item) >= 3 and item[2]]
        if parts:
            return "; ".join(parts)
        # OpenSSL queued no reason: the socket failed under it (a reset).
        return "connection reset by peer"
    return str(exc) or type(exc).__name__


Want = type[SSL.WantReadError] | type[SSL.WantWriteError]


class TLSConnection:
    # What each failure raises; TLSStream raises trio's exceptions instead.
    Broken: type[TLSBroken] = TLSBroken
    TooSlow: type[TLSTimeout] = TLSTimeout
    Closed: type[TLSClosed] = TLSClosed
    HandshakeError: type[TLSHandshakeError] = TLSHandshakeError

    def __init__(
        self, sock: socket.socket, ctx: SSL.Context, *, server_hostname: str | None = None
    ) -> None:
        """``sock`` must be non-blocking (a trio socket is). ``server_hostname``
        makes this the client side (and sets SNI)."""
        self._socket = sock
        self.conn = new_connection(ctx, sock, server_hostname=server_hostname)
        self._ssl = self.conn._ssl  # for pyOpenSSL's error translation
        self._ssl_address = int(_openssl.ffi.cast("uintptr_t", self._ssl))  # for _tlsio
        self._plain_view: memoryview | None = None  # see _borrowable
        self._handshook = False
        self._eof = False
        self._broken: str | None = None
        # A send cut off mid-record breaks sending only: the peer's answer
        # (say, why it refused an upload) can still be read.
        self._send_broken: str | None = None
        self._closed = False

    def _check_usable(self, sending: bool = False) -> None:
        if self._closed:
            raise self.Closed("TLS stream is closed")
        broken = self._broken or (self._send_broken if sending else None)
        if broken is not None:
            raise self.Broken(broken)

    def _wait(self, want: Want, deadline: float) -> None:
        """Wait until the socket is ready for what OpenSSL wants (the
        blocking methods' wait outside C)."""
        events = select.POLLIN if want is SSL.WantReadError else select.POLLOUT
        poller = select.poll()
        poller.register(self._socket, events)
        if not poller.poll(_milliseconds(deadline - time.monotonic())):
            raise self.TooSlow("no answer within the timeout")

    # -- handshake and peer ---------------------------------------------------

    def _handshake_step(self) -> Want | None:
        """One try at the handshake: None when it is done, else what to wait for."""
        self._check_usable()
        try:
            self.conn.do_handshake()
        except (SSL.WantReadError, SSL.WantWriteError) as exc:
            return type(exc)
        except SSL.SysCallError:
            hello_seen = self.conn.client_random() is not None  # ours, or the client's
            self._broken = (
                "connection closed by peer during TLS handshake"
                if hello_seen
                else NO_HANDSHAKE_REASON
            )
            raise self.HandshakeError(self._broken) from None
        except SSL.Error as exc:
            self._broken = _ssl_reason(exc)
            raise self.HandshakeError(self._broken) from None
        self._handshook = True
        return None

    def handshake_blocking(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (want := self._handshake_step()) is not None:
            self._wait(want, deadline)

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self.conn.get_peer_certificate(as_cryptography=True)

    @property
    def verdict(self) -> PeerVerdict:
        return peer_verdict(self.conn)

    # -- one step each way ------------------------------------------------------

    def _read(
        self, buf: bytearray | memoryview, filled: int, fd: int = -1, timeout_ms: int = -1
    ) -> int | Want:
        """One C read into ``buf[filled:]`` (waiting on ``fd`` if given): the
        new fill level to return, or the SSL.Want* class to wait for."""
        read, result, waited = _tlsio.read_into(self._ssl_address, buf, filled, fd, timeout_ms)
        filled += read
        if result > 0:
            return filled  # buf is full
        if waited == _tlsio.TIMED_OUT:
            raise self.TooSlow("no data within the timeout")
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
        """Hand over what was read before the break; the next call raises.
        A reason set before (an interrupt) stays: the break follows from it."""
        self._broken = self._broken or reason
        if filled:
            return filled
        raise self.Broken(self._broken)

    def _raise_ssl_error(self, result: int) -> None:
        """Raise what an SSL_read/SSL_write result <= 0 means (pyOpenSSL's
        translation, which reads this thread's OpenSSL error queue)."""
        self.conn._raise_ssl_error(self._ssl, result)
        raise SSL.Error(f"TLS call failed with {result}")  # pragma: no cover - always raised above

    def _write(
        self, view: memoryview, fd: int = -1, timeout_ms: int = -1, watch_input: bool = False
    ) -> tuple[memoryview, Want | None, bool]:
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
            raise self.TooSlow("the peer stopped reading")
        if waited == _tlsio.READABLE:
            return view, None, True
        try:
            self._raise_ssl_error(result)
        except (SSL.WantReadError, SSL.WantWriteError) as exc:
            return view, type(exc), False
        except SSL.Error as exc:
            self._broken = f"connection lost: {_ssl_reason(exc)}"
            raise self.Broken(self._broken) from None
        raise AssertionError("unreachable")  # pragma: no cover - _raise_ssl_error raises

    # -- blocking I/O -------------------------------------------------------------
    # The waits for data are poll() in C; a signal ends them (the C call
    # returns, Python runs the handler, say KeyboardInterrupt, and else the
    # loop calls again).

    def receive_into_blocking(self, buf: bytearray | memoryview, timeout: float) -> int:
        """Fill ``buf`` with the plaintext of every record readable now,
        waiting up to ``timeout`` seconds for the first byte (``TooSlow``);
        0 means the peer closed with close_notify."""
        self._check_usable()
        if self._eof:
            return 0
        while True:  # a Want* class here is a wake-up that brought no whole record
            step = self._read(buf, 0, self._socket.fileno(), _milliseconds(timeout))
            if isinstance(step, int):
                return step

    def receive_borrowed_blocking(self, timeout: float) -> memoryview:
        """``receive_into_blocking`` into our own buffer: the view is valid
        only until the next receive. For callers that copy anyway (h11)."""
        buffer = self._borrowable()
        return buffer[: self.receive_into_blocking(buffer, timeout)]

    def _borrowable(self) -> memoryview:
        """Our own buffer for the receive_borrowed calls, made at the first:
        not for a connection that never gets past its handshake, or
        thousands of silent ones would take a quarter MiB each."""
        if self._plain_view is None:
            self._plain_view = memoryview(bytearray(RECEIVE_BUFFER))
        return self._plain_view

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
        """Send the pieces, waiting up to ``timeout`` seconds each time the
        peer does not read (``TooSlow``); returns when the kernel has them
        all. With ``on_input``, each time the peer sends something meanwhile
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

    def _may_say_goodbye(self) -> bool:
        """Handshake done, nothing broken, and close_notify not sent yet:
        a second SSL_shutdown would read (and drop) what the peer sent."""
        if not self._handshook or self._broken is not None or self._send_broken is not None:
            return False
        return not self.conn.get_shutdown() & SSL.SENT_SHUTDOWN

    def _close_notify_step(self) -> Want | None:
        """One try at sending close_notify: None when sent (or hopeless)."""
        try:
            self.conn.shutdown()
        except SSL.WantWriteError:
            return SSL.WantWriteError
        except (SSL.WantReadError, SSL.Error):
            pass  # sent ours; not waiting for the peer's
        return None

    def close_blocking(self) -> None:
        """Send close_notify when we can (for up to a second), and always
        close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._may_say_goodbye():
                deadline = time.monotonic() + CLOSE_NOTIFY_TIMEOUT
                with contextlib.suppress(TLSTimeout, OSError):
                    while (want := self._close_notify_step()) is not None:
                        self._wait(want, deadline)
        finally:
            self._socket.close()
