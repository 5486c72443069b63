"""The trio side of the transfer core (``stpd.transfer``): STPD runs each
body in a worker thread while its trio loop serves everything else."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import h11
import trio

from stpd.protocol import with_reason
from stpd.tlsstream import TLSStream
from stpd.transfer import framed

T = TypeVar("T")


async def run_transfer(
    stream: TLSStream, transfer: Callable[[], T], threads: trio.CapacityLimiter | None = None
) -> T:
    """Run ``transfer`` (a body moved with the stream's ``*_blocking``
    methods) in a worker thread (from ``threads``, else trio's default
    pool) and return its result. No trio task may use
    the stream meanwhile. Cancelling the caller interrupts the stream, so
    the thread's wait ends at once (the stream is broken after that), waits
    for the thread (it never outlives the stream), and raises Cancelled."""
    finished = interrupted = False

    async def interrupt_when_cancelled() -> None:
        nonlocal interrupted
        try:
            await trio.sleep_forever()
        finally:
            if not finished:
                interrupted = True
                stream.interrupt()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_when_cancelled)
            try:
                return await trio.to_thread.run_sync(transfer, limiter=threads)
            except BaseException:
                if interrupted:  # the thread failed because we cut it off
                    await trio.lowlevel.checkpoint()  # raises Cancelled
                raise
            finally:
                finished = True
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single_error(group) from None


async def send_events(
    stream: TLSStream, conn: h11.Connection, events: Iterable[h11.Event], timeout: float
) -> None:
    """``events`` framed by h11 and sent in one go, responses with their
    reason phrase. STPD sends every HTTP message this way but the bulk of
    a body (``send_batch``)."""
    with trio.fail_after(timeout):
        await stream.send_many(framed(conn, map(with_reason, events)))


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
