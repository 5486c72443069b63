"""WriteBehind (stpd.transfer): the writes of an upload (and of a large
restored file) overlap the receiving of the next batch, in order, with
errors raised where the caller can act. Over TLS, every upload test goes
through it (test_upload_framing checks the stored bytes across several
two-buffer batches), and every restore of a file of 1 MiB or more."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, cast

import pytest

from stpd import transfer
from stpd.body import LengthBody
from stpd.transfer import (
    AMONG_OTHERS_BATCH_BYTES,
    BATCH_BYTES,
    HANDED_OVER_BATCH_BYTES,
    Batch,
    BodyReader,
    WriteBehind,
)

if TYPE_CHECKING:
    from stpd.tlsconn import TLSConnection

WAIT = 30.0  # seconds: only a failure waits this long


def test_each_batch_is_written_in_order_while_the_next_one_is_filled() -> None:
    """The write of batch N is still running while batch N+1 is filled into
    the other buffer, and each write sees its own batch's bytes: the two
    buffers of a BodyReader(buffers=2) are enough."""
    buffers = [bytearray(4), bytearray(4)]
    filled = [threading.Event() for _ in range(6)]  # batch i+1 filled
    written: list[bytes] = []
    threads: set[int] = set()

    def write(batch: Batch) -> None:
        index = len(written)
        threads.add(threading.get_ident())
        # Blocks until the caller has filled the next batch: a write that
        # ran inside put() would wait for ever (and fail after WAIT).
        assert filled[index].wait(WAIT), f"batch {index + 1} was not filled during write {index}"
        written.append(b"".join(batch))

    with WriteBehind(write) as behind:
        for index in range(6):
            buffer = buffers[index % 2]
            buffer[:] = bytes([index]) * 4
            if index:
                filled[index - 1].set()
            behind.put([memoryview(buffer)[:2], memoryview(buffer)[2:]])
        filled[5].set()
        behind.finish()
    assert written == [bytes([i]) * 4 for i in range(6)]
    assert threading.get_ident() not in threads


def test_a_write_error_is_raised_by_the_next_put() -> None:
    calls: list[int] = []

    def write(batch: Batch) -> None:
        calls.append(len(batch))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    with WriteBehind(write) as behind:
        behind.put([memoryview(b"a")])
        behind.put([memoryview(b"b")])  # fails in the thread
        with pytest.raises(OSError, match="No space left"):
            behind.put([memoryview(b"c")])
    assert len(calls) == 2  # nothing written after the failure


def test_a_last_write_error_is_raised_by_finish() -> None:
    def write(batch: Batch) -> None:
        raise OSError(5, "Input/output error")

    with WriteBehind(write) as behind:
        behind.put([memoryview(b"a")])
        with pytest.raises(OSError, match="Input/output"):
            behind.finish()


def test_leaving_the_block_waits_for_the_write_in_flight() -> None:
    """After the with block no write runs any more: the caller may close or
    remove the file, even when it leaves because receiving failed."""
    started, release = threading.Event(), threading.Event()
    done: list[bool] = []

    def write(batch: Batch) -> None:
        started.set()
        assert release.wait(WAIT)
        done.append(True)

    with pytest.raises(ConnectionError), contextlib.ExitStack() as stack:
        behind = stack.enter_context(WriteBehind(write))
        behind.put([memoryview(b"a")])
        assert started.wait(WAIT)
        stack.callback(release.set)  # runs first on the way out: the write is still going
        raise ConnectionError("the client went away")
    assert done == [True]


def test_not_threaded_writes_within_put() -> None:
    threads: list[int] = []
    with WriteBehind(lambda batch: threads.append(threading.get_ident()), threaded=False) as w:
        w.put([memoryview(b"a")])
        assert threads == [threading.get_ident()]
        w.finish()


class _Received:
    """The bytes of a connection, as TLSConnection.receive_into_blocking
    hands them out (in pieces of at most 64 KiB)."""

    class Broken(Exception):
        pass

    class TooSlow(Exception):
        pass

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def receive_into_blocking(self, buffer: memoryview, timeout: float) -> int:
        take = min(len(buffer), len(self._data), 65536)
        buffer[:take] = self._data[:take]
        self._data = self._data[take:]
        return take


def test_a_two_buffer_body_reader_keeps_a_batch_while_the_next_is_received(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What WriteBehind needs from BodyReader(buffers=2): a batch's views
    still hold its bytes after the next batch was received, also where its
    batches grow, past the first LONG_BODY_BYTES (2 MiB here)."""
    monkeypatch.setattr(transfer, "LONG_BODY_BYTES", 2 * BATCH_BYTES)
    data = os.urandom(2 * BATCH_BYTES + 3 * HANDED_OVER_BATCH_BYTES + 100)
    stream = cast("TLSConnection", _Received(data))
    reader = BodyReader(stream, LengthBody(len(data)), b"", WAIT, buffers=2)
    previous: tuple[Batch, bytes] | None = None
    received = bytearray()
    sizes: list[int] = []
    while batch := reader.next_batch():
        if previous is not None:
            assert b"".join(previous[0]) == previous[1]
        previous = batch, b"".join(batch)
        received += previous[1]
        sizes.append(len(previous[1]))
    assert received == data
    grown = [HANDED_OVER_BATCH_BYTES] * 3
    assert sizes == [BATCH_BYTES, BATCH_BYTES, *grown, 100]


def test_a_one_buffer_body_reader_hands_out_256_kib_batches() -> None:
    """An upload among others (one buffer, written in the receiving thread)
    goes in batches that stay in the cache while they are hashed and
    written."""
    data = os.urandom(3 * AMONG_OTHERS_BATCH_BYTES + 100)
    stream = cast("TLSConnection", _Received(data))
    reader = BodyReader(stream, LengthBody(len(data)), b"", WAIT)
    received = bytearray()
    sizes: list[int] = []
    while batch := reader.next_batch():
        received += b"".join(batch)
        sizes.append(sum(len(piece) for piece in batch))
    assert received == data
    assert sizes == [AMONG_OTHERS_BATCH_BYTES] * 3 + [100]
