"""stpd.tlsstream.TLSStream on a real socket pair, without the daemon:
end of stream, truncation, and trio's checkpoint rules."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from pki.layout import Layout
from pki.tls import ClientCertPolicy, client_context, server_context
from stpd.aio import run_transfer
from stpd.tlsstream import TLSStream
from tests.conftest import Pki, waiting_in_poll


async def tls_pair(pki: Pki, client: Layout) -> tuple[TLSStream, TLSStream]:
    left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = TLSStream(
        trio.SocketStream(left), server_context(pki.layout, ClientCertPolicy.REQUIRE)
    )
    ctx = client_context(client, present_cert=True, verify_server=True)
    sbc = TLSStream(trio.SocketStream(right), ctx, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(sbc.do_handshake)
    return server, sbc


async def test_data_then_close_notify_reads_as_end_of_stream(pki: Pki) -> None:
    server, sbc = await tls_pair(pki, pki.client_ini("a"))
    payload = bytes(range(256)) * 5000  # 1.28 MB: many records
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sbc.send_all, payload)
        got = bytearray()
        while len(got) < len(payload):
            got += await server.receive_some()
    assert bytes(got) == payload
    await sbc.aclose()
    assert await server.receive_some() == b""
    assert server.peer_certificate is not None
    await server.aclose()


async def test_a_close_without_close_notify_is_an_error(pki: Pki) -> None:
    server, sbc = await tls_pair(pki, pki.client_ini("a"))
    await sbc.send_all(b"half a backup")
    sbc.transport.socket.shutdown(socket.SHUT_WR)  # EOF without close_notify: a truncation
    assert await server.receive_some() == b"half a backup"
    with pytest.raises(trio.BrokenResourceError, match="without TLS close_notify"):
        await server.receive_some()
    for stream in (server, sbc):
        await stream.aclose()


async def test_receive_and_send_are_checkpoints_even_when_ready(pki: Pki) -> None:
    """Data already waiting must not let receive_into skip trio's
    cancellation check (timeouts would never fire on a busy transfer)."""
    server, sbc = await tls_pair(pki, pki.client_ini("a"))
    await sbc.send_all(b"x" * 100_000)
    await trio.testing.wait_all_tasks_blocked()
    with trio.CancelScope() as scope:
        scope.cancel()
        await server.receive_some()
    assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        await sbc.send_all(b"y")
    assert scope.cancelled_caught
    assert await server.receive_some(200_000) == b"x" * 100_000  # nothing was lost
    for stream in (server, sbc):
        await stream.aclose()


async def test_a_cancelled_send_stops_sending_but_not_receiving(pki: Pki) -> None:
    """sbc cancels its upload when stpd answers early (a refusal, a full
    disk); the answer must still be readable after the cut-off send."""
    server, sbc = await tls_pair(pki, pki.client_ini("a"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sbc.send_all, b"z" * 50_000_000)  # the server does not read
        await trio.testing.wait_all_tasks_blocked()  # the send is stuck mid-way
        nursery.cancel_scope.cancel()
    await server.send_all(b"HTTP/1.1 507 storage full")
    assert await sbc.receive_some() == b"HTTP/1.1 507 storage full"
    with pytest.raises(trio.BrokenResourceError, match="a send was interrupted"):
        await sbc.send_all(b"more")
    for stream in (server, sbc):
        await stream.aclose()


def a_thread_waits_in_poll() -> bool:
    """Whether a thread of this process is in poll(): the transfer thread
    waiting in C for data."""
    for task in Path("/proc/self/task").iterdir():
        try:
            if waiting_in_poll(int(task.name)):
                return True
        except OSError:  # the thread ended meanwhile
            continue
    return False


async def test_a_transfer_thread_times_out_and_is_interrupted_by_cancellation(pki: Pki) -> None:
    """The blocking side of the stream (a whole body in one thread, see
    stpd.transfer): a stall past the timeout raises TooSlowError, and
    cancelling the caller ends the thread's wait at once."""
    server, sbc = await tls_pair(pki, pki.client_ini("a"))
    buf = bytearray(1024)

    await sbc.send_all(b"first")
    assert await run_transfer(server, lambda: server.receive_into_blocking(buf, 5.0)) == 5
    with pytest.raises(trio.TooSlowError):  # nothing more comes
        await run_transfer(server, lambda: server.receive_into_blocking(buf, 0.2))
    with pytest.raises(trio.TooSlowError):  # the peer does not read
        await run_transfer(sbc, lambda: sbc.send_blocking([b"x" * 50_000_000], 0.2))
    for stream in (server, sbc):
        await stream.aclose()

    # A new pair: the server's buffers hold megabytes of the send above, which
    # a receive would return at once, before the cancellation it is to wait for.
    server, sbc = await tls_pair(pki, pki.client_ini("b"))
    started = trio.current_time()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                run_transfer, server, lambda: server.receive_into_blocking(buf, 60.0)
            )
            deadline = trio.current_time() + 10
            while not a_thread_waits_in_poll() and trio.current_time() < deadline:
                await trio.sleep(0.01)
            scope.cancel()
    assert scope.cancelled_caught
    assert trio.current_time() - started < 30  # not the 60 s wait: interrupted
    with pytest.raises(trio.BrokenResourceError, match="cancelled"):
        await server.receive_some()
    for stream in (server, sbc):
        await stream.aclose()
