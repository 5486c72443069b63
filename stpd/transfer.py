"""The streaming transfer core shared by STPD and SBC.

Theory of operation
-------------------
The head of every request and answer goes through h11. The body of a
transfer (a backup, a restore: gigabytes) does not: one thread moves it
from end to end, reading, hashing, decrypting and writing in turn, and the
TLS connection waits for its socket with poll() in C
(``TLSConnection.*_blocking``). Per MiB that thread runs a few lines of
Python. In STPD it is a worker thread per transfer (``stpd.aio``), so that
the trio loop, which cost a scheduling round per wake-up and per hand-over
between threads (about a fifth of each side's CPU time), is not involved;
SBC, a command with one connection, is that thread itself and does not
import trio at all. This module does not import trio either.

Bulk data moves as *batches*: lists of views into one buffer of
``BATCH_BYTES`` (or two, see BodyReader), which is refilled when the next
batch is asked for, so memory is flat whatever the size of the data, and
back-pressure is plain: a thread that cannot write does not read. On two
cores the two ends of a transfer (or many transfers) run in parallel;
``hashlib``, file I/O and the TLS loop release the GIL. An upload that
runs alone in STPD also hands its writes to a second thread
(``WriteBehind``, two buffers), as writing into fresh page cache costs
about what receiving does; SBC's restore hands both its hashing and a
large file's writes to threads of their own (sbc.extract).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import h11

if TYPE_CHECKING:
    from stpd.body import ChunkedBody, LengthBody, Span
    from stpd.tlsconn import TLSConnection

BATCH_BYTES = 1024 * 1024  # a transfer's buffer (see BodyReader for uploads)
# A two-buffer BodyReader's batches, once the body is long, and a
# one-buffer BodyReader's (see there).
HANDED_OVER_BATCH_BYTES = 4 * BATCH_BYTES
LONG_BODY_BYTES = 128 * BATCH_BYTES
AMONG_OTHERS_BATCH_BYTES = BATCH_BYTES // 4
IOV_MAX = os.sysconf("SC_IOV_MAX")  # the most buffers one writev takes

Batch = list[memoryview]  # views into a buffer that is reused for the next batch
Put = Callable[[Batch], None]  # hands a batch on (returns when done with it)
Get = Callable[[], Batch]  # the next batch; [] at the end


class BodyReader:
    """An HTTP body read past h11, by the thread that moves it (``next_batch``).

    ``early`` is what h11 had already read past the head; the rest bypasses
    h11, which would copy every byte twice (see stpd.body): the stream
    decrypts straight into the one buffer, and a batch is the payload views
    in it. A stall longer than ``timeout`` raises the stream's ``TooSlow``;
    the end of the connection, its ``Broken``; bad framing,
    ``h11.RemoteProtocolError``. What arrived before a stall or a break is
    handed on first, and the next call raises: a restore writes the files
    that came whole. ``after`` is what followed the body.

    ``buffers`` take turns: with two, a batch stays valid while the next one
    is received, for a ``WriteBehind`` that writes it meanwhile. Each such
    batch is handed over to another thread, and every hand-over costs both,
    so past the first 128 MiB of a body they grow to 4 MiB. For 2 GiB,
    STPD's receiving thread took 2.30 instead of 2.56 CPU-s (2.48 instead
    of 2.79 s), and SBC's restore 2.81 instead of 3.12 (8 MiB ones no
    longer fit the caches and were slower). Not from the start: the last
    batch is written after all is received, so a short body gains nothing
    and waits longer at the end (20,000 small files, 82 MiB: 0.254 instead
    of 0.243 s).

    With one buffer (STPD's upload among others, whose writes are not
    behind) batches are 256 KiB: with many transfers taking turns on two
    cores, a smaller batch is still in the cache when it is hashed and
    written. 16 uploads of 128 MiB at once: STPD took 3.54 instead of 3.67
    CPU-s, and 3.41 instead of 3.50 s (with every reader's batches at 128
    KiB, 256 KiB or 512 KiB: 3.66, 3.49 and 3.54 against 3.73).
    """

    def __init__(
        self,
        stream: TLSConnection,
        body: ChunkedBody | LengthBody,
        early: bytes,
        timeout: float,
        buffers: int = 1,
    ) -> None:
        self._stream = stream
        self._body = body
        self._timeout = timeout
        size = BATCH_BYTES if buffers > 1 else AMONG_OTHERS_BATCH_BYTES
        self._buffers = [memoryview(bytearray(size)) for _ in range(buffers)]
        self._turn = 0  # the buffer the next batch goes into
        self._received = 0  # bytes of the body so far
        payload, used = body.feed(memoryview(early))
        self._early: Batch | None = payload
        self.after = early[used:] if body.done else b""
        self._failure: Exception | None = None  # raised once what came before it is handed on

    def next_batch(self) -> Batch:
        """The next payload (at most a buffer's worth); [] at the end. The
        views are valid until the next call."""
        if self._early:
            early, self._early = self._early, None
            return early
        if self._failure is not None:
            raise self._failure
        buffer, body = self._buffers[self._turn], self._body
        grown = len(self._buffers) > 1 and self._received >= LONG_BODY_BYTES
        if grown and len(buffer) < HANDED_OVER_BATCH_BYTES:  # its last batch is written by now
            buffer = self._buffers[self._turn] = memoryview(bytearray(HANDED_OVER_BATCH_BYTES))
        self._turn = (self._turn + 1) % len(self._buffers)
        spans: list[Span] = []  # of the payload in buffer, adjacent ones joined
        filled = 0
        while filled < len(buffer) and not body.done:
            try:
                received = self._stream.receive_into_blocking(buffer[filled:], self._timeout)
                if not received:
                    raise self._stream.Broken("connection closed in the middle of the body")
            except (self._stream.Broken, self._stream.TooSlow) as exc:
                if not spans:
                    raise
                self._failure = exc
                break
            found, used = body.feed_spans(buffer[filled : filled + received])
            for start, stop in found:
                start, stop = filled + start, filled + stop
                if spans and spans[-1][1] == start:  # continues the last piece
                    spans[-1] = (spans[-1][0], stop)
                else:
                    spans.append((start, stop))
            if body.done:
                self.after = bytes(buffer[filled + used : filled + received])
            filled += received
        self._received += filled
        # Few large pieces: a reader (BatchReader) passes large reads on as
        # views, and hashing and checking go piece by piece.
        return [buffer[start:stop] for start, stop in spans]


def write_all(fd: int, pieces: Sequence[bytes | memoryview]) -> None:
    """All of ``pieces`` written to the file ``fd``, in one ``writev`` per
    ``IOV_MAX`` pieces unless it writes short."""
    if len(pieces) == 1:  # most often (a small file): no list of views
        view = memoryview(pieces[0])
        while view:
            view = view[os.write(fd, view) :]
        return
    views = [memoryview(p) for p in pieces]
    first = 0  # views before it are written
    while first < len(views):
        # More views than IOV_MAX fail with EINVAL (an upload in small chunks
        # is one view per chunk).
        written = os.writev(fd, views[first : first + IOV_MAX])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:  # short write: the rest of this view next time
            views[first] = views[first][written:]


class WriteBehind:
    """Writes each batch in a thread of its own while the caller receives
    the next one (``with WriteBehind(write) as behind: ... behind.put(batch)``).

    Writing into newly allocated page cache can cost as much as receiving,
    decrypting and hashing the same bytes (on a virtual machine whose host
    takes freed memory back, every fresh page faults), so the two overlap
    on two cores. ``put`` first waits for the previous batch's write, so at
    most one is in flight and its views stay valid with a two-buffer
    ``BodyReader``. A write's error is raised by the next ``put`` or by
    ``finish``; leaving the block waits for the thread, so the file may be
    closed or removed after it.

    ``write`` may do other work on the batch: SBC's restore hashes behind
    this way too.

    Not ``threaded``, ``put`` writes at once: when other transfers keep
    both cores busy, the hand-overs would only cost (16 concurrent uploads
    lost 8 %).
    """

    def __init__(self, write: Put, threaded: bool = True) -> None:
        self._write = write
        self._pending = False  # a batch is handed over and not yet done
        # Hand-overs through two C queues, not a ThreadPoolExecutor: its
        # Future and Condition ran a few hundred lines of Python under the
        # GIL per batch, which the receiving thread then waited for.
        self._todo: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        todo, done, write = self._todo, self._done, self._write
        while (batch := todo.get()) is not None:
            try:
                write(batch)
            except BaseException as exc:  # raised in the caller's thread (finish)
                done.put(exc)
            else:
                done.put(None)

    def put(self, batch: Batch) -> None:
        if self._thread is None:
            self._write(batch)
            return
        self.finish()
        self._todo.put(batch)
        self._pending = True

    def finish(self) -> None:
        """Wait for the last batch's write (and raise its error)."""
        if self._pending:
            self._pending = False
            error = self._done.get()
            if error is not None:
                raise error

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            if self._pending:  # leaving on an error: the write ends before the file may go
                self._pending = False
                self._done.get()
            self._todo.put(None)
            self._thread.join()


def send_batch(
    stream: TLSConnection,
    conn: h11.Connection,
    batch: Batch,
    timeout: float,
    on_input: Callable[[], bool] | None = None,
) -> bool:
    """A batch as body data of the message h11 is sending, blocking (see
    ``TLSConnection.send_blocking``: False when ``on_input`` stopped it).
    h11 only adds the framing; the views are sent uncopied."""
    # h11 types ``data`` as bytes, but passes any bytes-like through.
    events = [h11.Data(data=piece) for piece in batch]  # type: ignore[arg-type]
    return send_events_blocking(stream, conn, events, timeout, on_input)


def send_events_blocking(
    stream: TLSConnection,
    conn: h11.Connection,
    events: Iterable[h11.Event],
    timeout: float,
    on_input: Callable[[], bool] | None = None,
) -> bool:
    """``events`` framed by h11 and sent in one go, blocking (see
    ``send_batch``). SBC sends every message this way."""
    return stream.send_blocking(framed(conn, events), timeout, on_input)


def framed(
    conn: h11.Connection, events: Iterable[h11.Event]
) -> list[bytes | bytearray | memoryview]:
    """The bytes h11 sends for ``events``; a Data event's bytes pass through
    uncopied (``send_with_data_passthrough``)."""
    pieces: list[bytes | bytearray | memoryview] = []
    for event in events:
        pieces.extend(conn.send_with_data_passthrough(event) or [])
    return pieces


class BatchWriter:
    """A write-only file object (for the tar stream) that fills one buffer
    and hands it to ``put`` as a batch of one view whenever it is full.

    ``write`` copies into the buffer, so tar headers and small files go out
    in large pieces; ``fill_from`` reads file contents straight into it (one
    copy, from the kernel, and no allocation per read). ``put`` must be done
    with the batch when it returns: the buffer is refilled after that."""

    def __init__(self, put: Put, batch_bytes: int = BATCH_BYTES) -> None:
        self._put = put
        self._buffer = memoryview(bytearray(batch_bytes))
        self._filled = 0
        self._offset = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = len(data)
        end = self._filled + size
        if end < len(self._buffer):  # the common case (tar headers): it fits
            self._buffer[self._filled : end] = data
            self._filled, self._offset = end, self._offset + size
            return size
        view = memoryview(data).cast("B")
        while view:
            take = min(len(view), len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            view = view[take:]
            self.advance(take)
        return size

    def fill_from(self, fd: int, size: int) -> int:
        """Up to ``size`` bytes read from the file ``fd`` into the stream;
        returns how many (fewer only at the end of the file)."""
        done = 0
        while done < size:
            room = min(size - done, len(self._buffer) - self._filled)
            read = os.readv(fd, [self._buffer[self._filled : self._filled + room]])
            if not read:
                break
            done += read
            self.advance(read)
        return done

    def free_view(self) -> tuple[memoryview, int]:
        """The buffer and how much of it is filled, for a writer of its own
        (``advance`` by what it wrote after that)."""
        return self._buffer, self._filled

    def advance(self, count: int) -> None:
        """``count`` more bytes of the buffer are filled (see free_view)."""
        self._filled += count
        self._offset += count
        if self._filled == len(self._buffer):
            self._hand_over()

    def tell(self) -> int:
        return self._offset

    def flush(self) -> None:
        """Python's notion of flush: nothing to do until ``finish``."""

    def finish(self) -> None:
        self._hand_over()

    def _hand_over(self) -> None:
        if self._filled:
            self._put([self._buffer[: self._filled]])
            self._filled = 0


class BatchReader:
    """A read-only file object (for ``tarfile``) over batches from ``get``.

    It reads exactly what is asked (short only at the end), and seeks
    forward by skipping, which is all ``tarfile`` in ``r:`` mode needs to
    extract member after member; that mode copies file contents in one step
    per read, where stream mode (``r|``) re-buffers every byte two or three
    times. ``observe`` sees every piece once, in order (for hashing).

    The pieces may be views into buffers that are reused once the next
    batch is asked for (see ``BodyReader``). ``read`` returns ``bytes``:
    tarfile parses what it reads (a PAX header's records, a GNU long name:
    a view there failed the restore of a member with a 64 KiB extended
    attribute). File contents go out through ``read_view``, without a copy.
    """

    READ_CHUNK = 1024 * 1024  # a read larger than this is joined from parts

    def __init__(
        self,
        get: Get,
        observe: Callable[[memoryview], None] | None = None,
    ) -> None:
        self._get = get
        self._observe = observe
        self._pieces: list[memoryview] = []
        self._current = memoryview(b"")
        self._pos = 0  # in _current
        self._offset = 0  # in the whole stream
        self.eof = False

    def _next_piece(self) -> bool:
        if not self._pieces:
            if self.eof:
                return False
            self._pieces = list(reversed(self._get()))
            if not self._pieces:
                self.eof = True
                return False
        self._current = self._pieces.pop()
        self._pos = 0
        if self._observe is not None:
            self._observe(self._current)
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = 1 << 62
        if size <= len(self._current) - self._pos:  # within the current piece: most reads
            view = self._current[self._pos : self._pos + size]
            self._pos += size
            self._offset += size
            return bytes(view)
        parts: list[bytes] = []
        while size > 0:
            part = bytearray(min(size, self.READ_CHUNK))
            got = self._take_into(memoryview(part))
            parts.append(bytes(part[:got]))
            if got < len(part):
                break
            size -= got
        return b"".join(parts)

    def in_piece(self) -> int:
        """How many bytes ``read_view`` can return from the current piece."""
        return len(self._current) - self._pos

    def piece_ahead(self, skip: int) -> tuple[memoryview, int]:
        """The current piece, and where in it the stream is ``skip`` bytes on
        (``skip`` < 0: back), which may lie outside it."""
        return self._current, self._pos + skip

    def read_view(self, size: int) -> memoryview:
        """At most ``size`` bytes, as they lie in the current piece (no copy):
        up to a whole received batch, valid until the next batch but one is
        asked for (with a two-buffer BodyReader). Empty only at the end."""
        if self._pos == len(self._current) and not self._next_piece():
            return memoryview(b"")
        view = self._current[self._pos : self._pos + size]
        self._pos += len(view)
        self._offset += len(view)
        return view

    def _take_into(self, out: memoryview) -> int:
        """Fill ``out`` from the stream (copying as it goes, so that the next
        batch may reuse the buffers); returns how much (short at the end)."""
        got = 0
        while got < len(out):
            available = len(self._current) - self._pos
            if not available:
                if not self._next_piece():
                    break
                continue
            take = min(len(out) - got, available)
            out[got : got + take] = self._current[self._pos : self._pos + take]
            self._pos += take
            got += take
        self._offset += got
        return got

    def tell(self) -> int:
        return self._offset

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._offset + offset
        if whence not in (0, 1) or target < self._offset:
            raise OSError(f"cannot seek back in a stream (from {self._offset} to {target})")
        while self._offset < target:
            available = len(self._current) - self._pos
            if not available:
                if not self._next_piece():
                    break
                continue
            take = min(available, target - self._offset)
            self._pos += take
            self._offset += take
        return self._offset

    def drain(self) -> None:
        """Consume (and observe) everything left, e.g. tar's end padding."""
        while self.read(1 << 20):
            pass
