"""The streaming transfer core shared by STPD and SBC.

Theory of operation
-------------------
Bulk data moves as *batches*: lists of ``bytes`` pieces adding up to about
``BATCH_BYTES``. The trio side (TLS, HTTP framing) and the blocking side
(file reads and writes, hashing, tar) run at the same time: blocking work
happens in one worker thread per transfer, with at most ``PIPELINE_DEPTH``
batches waiting between the two. ``hashlib`` and file I/O release the GIL on
large buffers, so on two cores the network and the disk overlap for real.

The hand-over is bounded, so a slow disk stops us reading the network and a
slow network stops us reading the disk: memory stays at a few batches
whatever the size of the data. Handing whole batches (not single pieces) to
the thread keeps the per-call cost of crossing threads out of the per-byte
path, and on the receiving side (``sink_thread``, the hot one: TLS, hashing
and disk all at once) the worker takes batches from a plain queue without a
round trip through the trio loop: measured, 410 -> 495 MB/s for an upload.
"""

from __future__ import annotations

import io
import itertools
import queue
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import h11
import trio

if TYPE_CHECKING:
    from stpd.body import ChunkedBody, LengthBody
    from stpd.tlsstream import TLSStream

BATCH_BYTES = 1024 * 1024  # one hand-over between threads; a transfer has a ring of 3 or 4
PIPELINE_DEPTH = 2  # batches waiting in each direction

Batch = list[memoryview]  # views into a ring of buffers that is reused
Put = Callable[[Batch], None]  # blocking hand-over from a worker thread
Get = Callable[[], Batch]  # blocking fetch in a worker thread; [] at the end


@asynccontextmanager
async def source_thread(
    produce_all: Callable[[Put], None], depth: int = PIPELINE_DEPTH
) -> AsyncIterator[trio.MemoryReceiveChannel[Batch]]:
    """Runs ``produce_all(put)`` in a worker thread and yields the channel of
    the batches it puts; ``put`` blocks while ``depth`` batches wait. Leaving
    the block early stops the producer (its next ``put`` raises)."""
    send, receive = trio.open_memory_channel[Batch](depth)

    def put(batch: Batch) -> None:
        trio.from_thread.run(send.send, batch)

    async def worker() -> None:
        async with send:
            try:
                await trio.to_thread.run_sync(produce_all, put)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the consumer left early; it knows why

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            async with receive:
                yield receive
    except BaseExceptionGroup as group:
        raise single_error(group) from None


@asynccontextmanager
async def sink_thread(
    consume_all: Callable[[Get], None], depth: int = PIPELINE_DEPTH
) -> AsyncIterator[Callable[[Batch], Awaitable[None]]]:
    """Runs ``consume_all(get)`` in a worker thread and yields an async
    ``put(batch)`` that feeds it; ``get`` returns ``[]`` once the block is
    left. Leaving the block waits for the consumer to finish; an exception
    from it cancels the block and propagates.

    Batches travel through a plain thread-safe queue: the worker never waits
    for the trio loop to hand it one (a round trip per batch otherwise). A
    trio semaphore of ``depth`` slots gives the back-pressure; the worker
    frees a slot (without waiting) when it asks for the next batch, that is
    when it is done with the previous one. So once ``put`` of batch
    ``k + depth`` returns, batch ``k`` is no longer used: a caller may
    refill a ring of ``depth + 1`` buffers."""
    batches: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
    slots = trio.Semaphore(depth)
    token = trio.lowlevel.current_trio_token()
    holding = False  # the worker has a batch it has not finished

    def get() -> Batch:
        nonlocal holding
        if holding:
            token.run_sync_soon(slots.release)
        batch = batches.get()
        if batch is None:
            batches.put(None)  # stays at the end for any later get()
            holding = False
            return []
        holding = True
        return batch

    async def put(batch: Batch) -> None:
        await slots.acquire()
        batches.put(batch)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, consume_all, get))
            try:
                yield put
            finally:
                batches.put(None)  # the end, also when the block failed
    except BaseExceptionGroup as group:
        raise single_error(group) from None


async def receive_body(
    stream: TLSStream,
    body: ChunkedBody | LengthBody,
    early: bytes,
    put: Callable[[Batch], Awaitable[None]],
    timeout: float,
) -> bytes:
    """Hand an HTTP body to ``put`` (a ``sink_thread``'s) as batches of
    views into a ring of buffers, and return what arrived after it.

    ``early`` is what h11 had already read past the head; the rest bypasses
    h11, which would copy every byte twice (see stpd.body). The stream
    decrypts straight into the ring: no buffer is allocated per read, and
    a ring of ``PIPELINE_DEPTH + 1`` is never overwritten while the worker
    still uses it (see ``sink_thread``). A stall longer than ``timeout``
    raises ``trio.TooSlowError``; the end of the connection,
    ``trio.BrokenResourceError``; bad framing, ``h11.RemoteProtocolError``."""
    payload, used = body.feed(memoryview(early))
    if payload:
        await put(payload)
    if body.done:
        return early[used:]
    ring = [memoryview(bytearray(BATCH_BYTES)) for _ in range(PIPELINE_DEPTH + 1)]
    for turn in itertools.count():
        buffer = ring[turn % len(ring)]
        batch: Batch = []
        filled = 0
        while filled < len(buffer):
            with trio.fail_after(timeout):
                received = await stream.receive_into(buffer[filled:])
            if not received:
                raise trio.BrokenResourceError("connection closed in the middle of the body")
            payload, used = body.feed(buffer[filled : filled + received])
            batch += payload
            if body.done:
                await put(batch)
                return bytes(buffer[filled + used : filled + received])
            filled += received
        await put(batch)
    raise AssertionError("unreachable")  # pragma: no cover


async def send_events(
    stream: TLSStream, conn: h11.Connection, events: Iterable[h11.Event], timeout: float
) -> None:
    """``events`` framed by h11 and sent in one go; a Data event's bytes pass
    through uncopied. Used by both sides for every HTTP message."""
    pieces: list[bytes] = []
    for event in events:
        pieces.extend(conn.send_with_data_passthrough(event) or [])
    with trio.fail_after(timeout):
        await stream.send_many(pieces)


def data_events(batch: Batch) -> list[h11.Data]:
    """A batch as h11 body events. h11 types ``data`` as bytes, but
    ``send_with_data_passthrough`` hands any bytes-like through untouched,
    and ``send_events`` sends it from there: the views are not copied."""
    return [h11.Data(data=piece) for piece in batch]  # type: ignore[arg-type]


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The one meaningful exception in a nursery's group: the first that is
    not a cancellation (which only echoes it), else the first."""
    flat: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            flat.append(exc)

    walk(group)
    for exc in flat:
        if not isinstance(exc, trio.Cancelled):
            return exc
    return flat[0]


class BatchWriter:
    """A write-only file object (for the tar stream) that fills a ring of
    buffers and hands each full one to ``put`` as a batch of one view.

    ``write`` copies into the current buffer, so tar headers and small
    files go out in large pieces; ``fill_from`` reads file contents straight
    into it (one copy, from the kernel, and no allocation per read). The
    ring has ``PIPELINE_DEPTH + 2`` buffers: a ``source_thread`` holds at most
    ``depth`` batches waiting and one being sent while the next is filled,
    so a buffer is refilled only after its batch was sent."""

    def __init__(self, put: Put, batch_bytes: int = BATCH_BYTES) -> None:
        self._put = put
        self._ring = [memoryview(bytearray(batch_bytes)) for _ in range(PIPELINE_DEPTH + 2)]
        self._turn = 0
        self._buffer = self._ring[0]
        self._filled = 0
        self._offset = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            take = min(len(view), len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            view = view[take:]
            self._advance(take)
        return size

    def fill_from(self, f: io.RawIOBase | io.BufferedIOBase, size: int) -> int:
        """Up to ``size`` bytes read from ``f`` into the stream; returns how
        many (fewer only at the end of the file)."""
        done = 0
        while done < size:
            room = min(size - done, len(self._buffer) - self._filled)
            read = f.readinto(self._buffer[self._filled : self._filled + room])
            if not read:
                break
            done += read
            self._advance(read)
        return done

    def _advance(self, count: int) -> None:
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
            self._turn += 1
            self._buffer = self._ring[self._turn % len(self._ring)]
            self._filled = 0


class BatchReader:
    """A read-only file object (for ``tarfile``) over batches from ``get``.

    It reads exactly what is asked (short only at the end), and seeks
    forward by skipping, which is all ``tarfile`` in ``r:`` mode needs to
    extract member after member; that mode copies file contents in one step
    per read, where stream mode (``r|``) re-buffers every byte two or three
    times. ``observe`` sees every piece once, in order (for hashing).

    The pieces may be views into buffers that are reused once the next
    batch is asked for (see ``receive_body``): a read of ``VIEW_READ`` bytes
    or more that lies in one piece returns a view without copying (tarfile
    writes file contents straight out); smaller reads (headers, which
    tarfile parses and keeps) and reads across pieces return ``bytes``.
    """

    VIEW_READ = 64 * 1024

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

    def read(self, size: int = -1) -> bytes | memoryview:
        if size < 0:
            size = 1 << 62
        parts: list[bytes | memoryview] = []
        wanted = size
        while wanted:
            available = len(self._current) - self._pos
            if not available:
                if parts and not self._pieces:
                    # Asking for the next batch frees this one's buffers.
                    parts = [b"".join(parts)]
                if not self._next_piece():
                    break
                continue
            take = min(wanted, available)
            parts.append(self._current[self._pos : self._pos + take])
            self._pos += take
            wanted -= take
        self._offset += size - wanted
        if len(parts) == 1 and len(parts[0]) >= self.VIEW_READ:
            return parts[0]
        return b"".join(parts)  # also makes a single small view a bytes

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
