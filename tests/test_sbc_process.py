"""``sbc`` as a process: it starts without trio, Ctrl-C ends it at once,
also while it waits for a silent server, it backs up to a server that
does not answer ``Expect: 100-continue``, and a restore cut off part-way
leaves no incomplete file.

sbc waits for its socket in C (poll() in stpd/_tlsio.c, with the GIL
released); a signal must end that wait so that Python can raise
KeyboardInterrupt, instead of poll() being restarted until SBC_IO_TIMEOUT.
The silent server is ``openssl s_server``: it completes the handshake,
prints the request it got, and never answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import queue
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sbc.client import CONTINUE_WAIT
from tests.conftest import (
    OPENSSL,
    WAIT_SECONDS,
    Pki,
    needs_openssl,
    run_sbc,
    running_stpd,
    tar_bytes,
    waiting_in_poll,
    with_open_files,
)

SBC = str(Path(sys.executable).parent / "sbc")
pytestmark = needs_openssl


@pytest.fixture(autouse=True)
def ctrl_c_as_a_terminal_sends_it() -> Iterator[None]:
    """A test run started in the background (``make test &``) inherits SIGINT
    ignored, and so would sbc: Python then installs no handler for it. These
    tests are about the Ctrl-C of a foreground sbc."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _lines(stream: object) -> queue.Queue[str]:
    """The lines of ``stream`` as they come, read by a thread."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        # The test closes the stream when it is done with the server: so is this.
        with contextlib.suppress(ValueError):
            for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
                lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for_line(lines: queue.Queue[str], prefix: str) -> str:
    while not (line := lines.get(timeout=WAIT_SECONDS)).startswith(prefix):
        pass
    return line


@contextmanager
def _silent_server(pki: Pki) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str], str]]:
    """``openssl s_server`` that completes the handshake, prints the request
    it gets, and never answers: (the process, its output lines, its port)."""
    assert OPENSSL is not None
    server = subprocess.Popen(
        [OPENSSL, "s_server", "-accept", "127.0.0.1:0", "-naccept", "1"]
        + ["-cert", str(pki.layout.server_cert), "-key", str(pki.layout.server_key)],
        stdin=subprocess.PIPE,  # kept open and empty: s_server sends nothing
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = _lines(server.stdout)
        port = _wait_for_line(lines, "ACCEPT").rsplit(":", 1)[1].strip()
        yield server, lines, port
    finally:
        server.kill()
        server.communicate()


def test_ctrl_c_ends_sbc_waiting_for_an_answer(pki: Pki) -> None:
    client = pki.client_ini("waiter", extra_ini="[SBC]\nSBC_IO_TIMEOUT=600\n")
    with _silent_server(pki) as (_, lines, port):
        sbc = subprocess.Popen(
            [SBC, "--ini-dir", str(client.ini_dir), "status", "--server", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for_line(lines, "GET /status HTTP/1.1")  # sbc now waits for the answer
            sbc.send_signal(signal.SIGINT)
            _, err = sbc.communicate(timeout=WAIT_SECONDS)  # not the 600 s of SBC_IO_TIMEOUT
        finally:
            sbc.kill()
            sbc.wait()
    assert sbc.returncode == 130, err
    assert err.strip() == "sbc: interrupted"


def test_a_signal_that_poll_does_not_see_still_ends_the_wait(pki: Pki) -> None:
    """SIGINT delivered to another thread while sbc's main thread waits in
    poll() (as one arriving just before poll() begins): poll() sees no EINTR.
    Python's wake-up pipe, which poll() watches too, ends the wait."""
    client = pki.client_ini("waiter", extra_ini="[SBC]\nSBC_IO_TIMEOUT=600\n")
    assert threading.current_thread() is threading.main_thread()
    main = threading.main_thread().native_id
    rescued = threading.Event()

    def interrupt_the_wait(server: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
        _wait_for_line(lines, "GET /status HTTP/1.1")  # sent: sbc waits for the answer
        deadline = time.monotonic() + WAIT_SECONDS
        while not waiting_in_poll(main) and time.monotonic() < deadline:
            pass
        signal.raise_signal(signal.SIGINT)  # to this thread, not the one in poll()
        while waiting_in_poll(main) and time.monotonic() < deadline:
            pass
        if waiting_in_poll(main):
            rescued.set()
            server.kill()  # ends sbc's wait, so that the test fails instead of hanging

    with _silent_server(pki) as (server, lines, port):
        interrupter = threading.Thread(target=interrupt_the_wait, args=(server, lines))
        interrupter.start()
        code, _, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "status", "--server", f"127.0.0.1:{port}"
        )
        interrupter.join(WAIT_SECONDS)
    assert not rescued.is_set(), "the signal did not end sbc's wait"
    assert code == 130, err
    assert err == "sbc: interrupted\n"


def test_sbc_does_not_import_trio() -> None:
    """Importing trio is about 0.1 s of CPU, half of a short sbc run's
    start-up (16 concurrent backups pay it 16 times): sbc is blocking."""
    check = "import sys, sbc.cli, sbc.client; print(sorted(m for m in sys.modules if m.split('.')[0] == 'trio'))"
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_backup_to_a_server_that_never_answers_100_continue(pki: Pki, tmp_path: Path) -> None:
    """sbc waits for a 100 Continue for CONTINUE_WAIT seconds only, then
    sends the body anyway, as curl does. The server is Python's ssl module
    with a hand-written HTTP exchange: it reads the head and the chunked
    body, and answers 201 with the hash of the body it got."""
    source = tmp_path / "data.bin"
    source.write_bytes(bytes(range(256)) * 4096)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.layout.server_cert, pki.layout.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    got: dict[str, bytes] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"0\r\n\r\n" not in data:  # the end of the chunked body
                chunk = tls.recv(1 << 20)
                assert chunk, data[:200]
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            payload, rest = b"", body
            while (size := int(rest.split(b"\r\n", 1)[0], 16)) > 0:
                start = rest.index(b"\r\n") + 2
                payload, rest = payload + rest[start : start + size], rest[start + size + 2 :]
            got["head"], got["payload"] = head, payload
            answer = json.dumps(
                {
                    "saveset": "SS-20260101T000000Z-00000001",
                    "bytes": len(payload),
                    "sha256": hashlib.sha256(payload).hexdigest(),
                    "source": str(source),
                    "created": "2026-01-01T00:00:00Z",
                }
            ).encode()
            tls.sendall(
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
            )

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = pki.client_ini("no-continue")
    port = listener.getsockname()[1]
    started = time.monotonic()
    code, out, err = run_sbc(
        "--ini-dir",
        str(client.ini_dir),
        "backup",
        str(source),
        "--json",
        "--server",
        f"127.0.0.1:{port}",
    )
    elapsed = time.monotonic() - started
    server.join(WAIT_SECONDS)
    listener.close()
    assert code == 0, err
    assert b"expect: 100-continue" in got["head"].lower()
    with tarfile.open(fileobj=io.BytesIO(got["payload"])) as archive:
        member = archive.extractfile("data.bin")
        assert member is not None and member.read() == source.read_bytes()
    assert json.loads(out)["sha256"] == hashlib.sha256(got["payload"]).hexdigest()
    assert elapsed >= CONTINUE_WAIT  # it waited for the 100 Continue that never came


@contextmanager
def _one_connection_server(pki: Pki, serve: Callable[[ssl.SSLSocket], None]) -> Iterator[str]:
    """A server (Python's ssl module, with stpd's certificate) that takes one
    connection and hands it to ``serve``: its address, HOST:PORT. ``serve``
    may leave the connection open (a server that stops sending)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.layout.server_cert, pki.layout.server_key)
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        conn, _ = listener.accept()
        serve(context.wrap_socket(conn, server_side=True))

    server = threading.Thread(target=accept, daemon=True)
    server.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.join(WAIT_SECONDS)
        listener.close()


def _request_head(tls: ssl.SSLSocket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(65536)
    return head


def _saveset_head(stream: bytes, checksum: bytes | None = None) -> bytes:
    """The head of stpd's answer to a whole restore of ``stream`` (with its
    X-Sha256, or ``checksum``; b"" for none)."""
    checksum = hashlib.sha256(stream).hexdigest().encode() if checksum is None else checksum
    sha = b"X-Sha256: %s\r\n" % checksum if checksum else b""
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\nContent-Length: %d\r\n%s\r\n" % (
        len(stream),
        sha,
    )


def _restore_cut_off(
    pki: Pki,
    target: Path,
    members: list[tuple[str, bytes]] | bytes,
    cut_into: bytes,
    fraction: float,
) -> tuple[int, str, str]:
    """``sbc restore`` from a server (Python's ssl module) that announces a
    whole saveset of ``members`` (or this tar stream), sends it up to
    ``fraction`` of the member whose contents are ``cut_into``, and closes
    the connection."""
    stream = members if isinstance(members, bytes) else tar_bytes(members)
    cut = stream.index(cut_into) + int(len(cut_into) * fraction)

    def serve(tls: ssl.SSLSocket) -> None:
        _request_head(tls)
        tls.sendall(_saveset_head(stream) + stream[:cut])
        tls.close()  # no close_notify: the connection breaks off

    client = pki.client_ini("cut-off")
    with _one_connection_server(pki, serve) as where:
        return run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", "SS-20260101T000000Z-00000001",
            str(target), "--server", where,
        )  # fmt: skip


def test_a_restore_cut_off_mid_file_removes_the_incomplete_file(pki: Pki, tmp_path: Path) -> None:
    """The first file and part of the second arrive, then the connection
    breaks: sbc says so in one line, and the second file, which would pass
    for the whole one, is not left behind."""
    # More than a batch (1 MiB) arrives before the break, so that sbc has
    # begun the second file whenever the break reaches it.
    first, second = b"complete\n", bytes(range(256)) * 12288
    target = tmp_path / "back"
    code, out, err = _restore_cut_off(
        pki, target, [("tree/first.txt", first), ("tree/second.bin", second)], second, 2 / 3
    )
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "lost mid-restore" in err, err
    assert err.rstrip().endswith("; the incomplete tree/second.bin was removed"), err
    assert (target / "tree" / "first.txt").read_bytes() == first
    assert not (target / "tree" / "second.bin").exists()


def test_directories_of_a_restore_cut_off_get_their_modes(pki: Pki, tmp_path: Path) -> None:
    """tarfile makes each directory 0700 and gives it its mode, owner and
    time once the restore is done: a restore that broke off left them at
    0700 until it was run again."""
    big = bytes(range(256)) * 12288
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in (("tree", 0o755), ("tree/shared", 0o775)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 1_500_000_000
            tar.addfile(info)
        info = tarfile.TarInfo("tree/shared/big.bin")
        info.size = len(big)
        tar.addfile(info, io.BytesIO(big))
    target = tmp_path / "back"
    code, _, err = _restore_cut_off(pki, target, buffer.getvalue(), big, 0.5)
    assert code == 1 and "lost mid-restore" in err, err
    for name, mode in (("tree", 0o755), ("tree/shared", 0o775)):
        st = (target / name).stat()
        assert (stat.S_IMODE(st.st_mode), int(st.st_mtime)) == (mode, 1_500_000_000), name
    assert not (target / "tree" / "shared" / "big.bin").exists()


def test_files_received_whole_before_a_break_are_restored(pki: Pki, tmp_path: Path) -> None:
    """All of it within the first batch (less than 1 MiB): the files that
    arrived whole before the break are written, not thrown away with the
    batch; the one cut off is removed."""
    small = [(f"tree/f{i:02}.txt", b"%02d\n" % i * 500) for i in range(40)]
    last = bytes(range(256)) * 100
    target = tmp_path / "back"
    code, _, err = _restore_cut_off(pki, target, [*small, ("tree/last.bin", last)], last, 0.5)
    assert code == 1
    assert err.rstrip().endswith("; the incomplete tree/last.bin was removed"), err
    assert sorted(p.name for p in (target / "tree").iterdir()) == [
        name.split("/")[1] for name, _ in small
    ]
    for name, data in small:
        assert (target / name).read_bytes() == data


def test_a_listing_piped_into_head_ends_quietly(pki: Pki, tmp_path: Path) -> None:
    """``sbc list ID | head -1``: once the reader is gone, sbc stops with
    the status of a process ended by SIGPIPE and says nothing."""
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(2000):  # more than a pipe's 64 KiB of listing
        (tree / f"file-{i:04}").touch()
    client = pki.client_ini("lister")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = run_sbc(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        assert code == 0, err
        saveset = json.loads(out)["saveset"]
        sbc = subprocess.Popen(
            [SBC, *ini, "list", saveset, "--server", stpd.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert sbc.stdout is not None and sbc.stderr is not None
        first = sbc.stdout.readline()
        sbc.stdout.close()  # as head does after its line
        err_bytes = sbc.stderr.read()
        sbc.wait(WAIT_SECONDS)
    assert first.endswith(b" many\n"), first
    assert sbc.returncode == 128 + signal.SIGPIPE, err_bytes
    assert err_bytes == b""


def test_a_listing_that_cannot_be_written_says_so(pki: Pki, tmp_path: Path) -> None:
    """`sbc list ID > /dev/full`, the listing larger than stdout's buffer,
    so that a write fails while entries still come: one line that says
    the output could not be written, exit status 1 (the status's JSON,
    written at the end, is in test_daemon_status)."""
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(500):  # about 40 kB of listing
        (tree / f"file-{i:04}").touch()
    ini = ["--ini-dir", str(pki.client_ini("lister").ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = run_sbc(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        assert code == 0, err
        with open("/dev/full", "w") as full:
            listing = subprocess.run(
                [SBC, *ini, "list", json.loads(out)["saveset"], "--server", stpd.address],
                stdout=full,
                stderr=subprocess.PIPE,
                timeout=WAIT_SECONDS,
            )
    assert (listing.returncode, listing.stderr) == (
        1,
        b"sbc: error: cannot write the output: No space left on device\n",
    )


def closed(redirection: str, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """``argv`` run with a standard stream closed as a shell does it (">&-")."""
    return subprocess.run(
        ["sh", "-c", f'exec "$@" {redirection}', "sh", *argv],
        capture_output=True,
        timeout=WAIT_SECONDS,
    )


def test_a_closed_stdout_or_stderr_is_no_failure(pki: Pki, tmp_path: Path) -> None:
    """`sbc backup src >&-` (from cron) stored the saveset, then ended with
    an AttributeError traceback and exit status 1, so that the job backed
    up again; `sbc list 2>&-` the same. A stream the caller closed is
    /dev/null: the work is done, exit status 0."""
    source = tmp_path / "notes.txt"
    source.write_text("notes\n")
    ini = ["--ini-dir", str(pki.client_ini("cron").ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        server = ["--server", stpd.address]
        backup = closed(">&-", [SBC, *ini, "backup", str(source), *server])
        assert (backup.returncode, backup.stderr) == (0, b"")
        code, out, err = run_sbc(*ini, "list", "--json", *server)
        assert code == 0, err
        [stored] = json.loads(out)
        assert stored["source"] == str(source)
        listing = closed("2>&-", [SBC, *ini, "list", *server])
    assert listing.returncode == 0
    assert listing.stdout.startswith(stored["saveset"].encode())


def test_a_tree_deeper_than_the_soft_open_files_limit_is_backed_up_whole(
    pki: Pki, tmp_path: Path
) -> None:
    """sbc's walk holds a directory open while what is under it is walked:
    in a tree 300 deep with a sibling at every level, 300 at once, past a
    soft limit of 256 (1024 on many systems, and trees deeper than that
    exist). sbc raises it to the hard limit, as stpd does,
    and stores all of it. (Not deeper: pytest's later clean-up of its
    temporary directories recurses once per level.)"""
    tree = tmp_path / "deep"
    directory = tree
    for _ in range(300):
        (directory / "b").mkdir(parents=True)  # waits while "a" is walked
        directory = directory / "a"
    directory.mkdir()
    (directory / "bottom.txt").write_text("bottom\n")
    ini = ["--ini-dir", str(pki.client_ini("deep").ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = [*ini, "backup", str(tree), "--server", stpd.address, "--json"]
        done = subprocess.run(
            [*with_open_files(256, 4096), SBC, *backup],
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert (result["files"], result["directories"]) == (1, 601)
        stored = stpd.daemon.store.root / f"{result['saveset']}.tar"
        with tarfile.open(stored) as tar:
            bottom = tar.extractfile("deep/" + "a/" * 300 + "bottom.txt")
            assert bottom is not None and bottom.read() == b"bottom\n"


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_mid_restore_removes_the_incomplete_file(
    pki: Pki, tmp_path: Path, number: signal.Signals
) -> None:
    """A scheduler's time limit (SIGTERM) or a closed ssh session (SIGHUP)
    ended sbc at once: the file it was writing stayed, cut short, under its
    name, and the same restore run again kept it and said "sha256
    verified". They now end it as Ctrl-C does."""
    first, second = b"complete\n", bytes(range(256)) * 12288  # 3 MiB
    stream = tar_bytes([("tree/first.txt", first), ("tree/second.bin", second)])
    cut = stream.index(second) + len(second) // 2
    done = threading.Event()

    def serve(tls: ssl.SSLSocket) -> None:  # half of the second file, then the connection held
        with tls:
            _request_head(tls)
            tls.sendall(_saveset_head(stream) + stream[:cut])
            done.wait(WAIT_SECONDS)

    client = pki.client_ini("stopped")
    target = tmp_path / "back"
    incomplete = target / "tree" / "second.bin"
    with _one_connection_server(pki, serve) as where:
        sbc = subprocess.Popen(
            [SBC, "--ini-dir", str(client.ini_dir), "restore", "SS-20260101T000000Z-00000001",
             str(target), "--server", where],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + WAIT_SECONDS
            while not (incomplete.exists() and incomplete.stat().st_size > 0):
                assert time.monotonic() < deadline and sbc.poll() is None, "sbc did not begin it"
            sbc.send_signal(number)
            _, err = sbc.communicate(timeout=WAIT_SECONDS)
        finally:
            done.set()
            sbc.kill()
            sbc.wait()
    assert sbc.returncode == 128 + number, err
    assert err == (
        f"sbc: stopped by {number.name}: a file it was writing part-way was removed, what came "
        "before it stays; the same restore run again finishes it\n"
    )
    assert (target / "tree" / "first.txt").read_bytes() == first
    assert not incomplete.exists()


def test_a_whole_saveset_sent_without_its_checksum_is_refused(pki: Pki, tmp_path: Path) -> None:
    """A server that leaves X-Sha256 out of a whole restore: sbc restored it
    unchecked, and said "selected entries only" although none were asked
    for. Refused before anything is written."""
    stream = tar_bytes([("tree/file.txt", b"unverified\n")])

    def serve(tls: ssl.SSLSocket) -> None:
        with tls:
            _request_head(tls)
            tls.sendall(_saveset_head(stream, checksum=b"") + stream)

    client = pki.client_ini("unchecked")
    target = tmp_path / "back"
    with _one_connection_server(pki, serve) as where:
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", "SS-20260101T000000Z-00000001",
            str(target), "--server", where,
        )  # fmt: skip
    assert (code, out) == (1, "")
    assert err == (
        f"sbc: error: stpd at {where} sent saveset SS-20260101T000000Z-00000001 without its "
        "checksum (X-Sha256): refused, as it could not be verified; nothing was restored\n"
    )
    assert not target.exists()


@pytest.mark.parametrize("server_does", ["closes", "stays-silent"])
def test_a_backup_sent_whole_but_not_answered_is_not_called_lost(
    pki: Pki, tmp_path: Path, server_does: str
) -> None:
    """stpd stores a saveset after the last byte arrives (fsync, rename): a
    connection that breaks then, or an answer that takes longer than
    SBC_IO_TIMEOUT, may follow a stored backup. sbc said "stpd keeps
    nothing of an interrupted backup, run it again"; it now says that the
    outcome is not known and where to look."""
    source = tmp_path / "data.bin"
    source.write_bytes(bytes(range(256)) * 8192)
    done = threading.Event()

    def serve(tls: ssl.SSLSocket) -> None:  # takes the whole body, then no answer
        with tls:
            data = _request_head(tls)
            tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            while not data.endswith(b"0\r\n\r\n"):  # the end of the chunked body
                chunk = tls.recv(1 << 20)
                assert chunk
                data += chunk
            if server_does == "stays-silent":
                done.wait(WAIT_SECONDS)

    client = pki.client_ini("unanswered", extra_ini="[SBC]\nSBC_IO_TIMEOUT=1\n")
    with _one_connection_server(pki, serve) as where:
        try:
            code, out, err = run_sbc(
                "--ini-dir", str(client.ini_dir), "backup", str(source), "--server", where
            )
        finally:
            done.set()
    assert (code, out) == (1, "")
    cause = (
        f"stpd at {where} stopped answering (1s); raise SBC_IO_TIMEOUT in sm.ini"
        if server_does == "stays-silent"
        else f"connection to stpd at {where} lost ("
    )
    assert err.startswith(f"sbc: error: {cause}"), err
    assert err.endswith(
        " after the whole backup (2.1 MB) was sent: stpd may have stored it (storing a large "
        "saveset on a slow disk takes time); `sbc list` shows it if it was, else run the backup "
        "again\n"
    ), err


def test_a_restore_that_does_not_match_its_checksum_says_the_files_are_suspect(
    pki: Pki, tmp_path: Path
) -> None:
    """It said only "the saveset may be damaged", and exited after writing
    the files: a reader took the files for good. It names the target."""
    stream = tar_bytes([("tree/file.txt", b"changed on the way\n")])

    def serve(tls: ssl.SSLSocket) -> None:
        with tls:
            _request_head(tls)
            tls.sendall(_saveset_head(stream, checksum=b"0" * 64) + stream)

    client = pki.client_ini("suspect")
    target, saveset = tmp_path / "back", "SS-20260101T000000Z-00000001"
    with _one_connection_server(pki, serve) as where:
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", saveset, str(target), "--server", where
        )
    assert (code, out) == (1, "")
    assert err == (
        f"sbc: error: restored data of {saveset} does not match its checksum (got "
        f"{hashlib.sha256(stream).hexdigest()}, expected {'0' * 64}): what was restored into "
        f"{target} may be damaged, do not rely on it; `sbc verify {saveset}` says whether the "
        "server's copy is; if it is intact, restore again\n"
    )
    assert (target / "tree" / "file.txt").exists()  # left for the administrator to judge
