"""The progress bar of ``sbc backup`` and ``sbc restore``: drawn on stderr
when it is a terminal (here a pseudo-terminal), never otherwise, nor with
``--quiet`` or ``--json``; the summary line is on stdout whenever ``--json``
is not given.

sbc runs as a real subprocess (the console script) so that it sees a real
terminal; stpd runs in a thread of the test process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pki.layout import Layout
from sbc.archive import EVERYTHING, TreeStats
from sbc.progress import TransferProgress, estimate_tar_bytes
from tests.conftest import Pki, RunningStpd, running_stpd, tar_stream, with_holes, with_xattrs

SBC = str(Path(sys.executable).parent / "sbc")
TIMEOUT = 60.0
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
BAR = "━"  # rich's bar character
PAYLOAD_BYTES = 6 * 1024 * 1024  # several 1 MiB batches: the rate has samples

SUMMARY_BACKUP = re.compile(
    r"^saveset (SS-\S+) stored on 127\.0\.0\.1:\d+: (\d+) bytes, \d+ files "
    r"in \d+\.\d\ds \(\d+\.\d MB/s\), sha256 [0-9a-f]{64}$"
)
SUMMARY_RESTORE = re.compile(
    r"^restored saveset SS-\S+ into .+: \d+ entries, (\d+) bytes "
    r"in \d+\.\d\ds \(\d+\.\d MB/s\), sha256 verified$"
)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str  # what reached stderr: the pipe, or the terminal (escapes removed)
    raw_terminal: bytes  # everything drawn on the terminal, as sent


def clean_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")
    }
    env["TERM"] = "xterm-256color"
    return env


def run_sbc(client: Layout, *argv: str, stderr_tty: bool = False, stdout_tty: bool = False) -> Run:
    """Run sbc with stderr (and/or stdout) on a pseudo-terminal of 120x40,
    reading what it draws while it runs."""
    command = [SBC, "--ini-dir", str(client.ini_dir), *argv]
    if not (stderr_tty or stdout_tty):
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            stdin=subprocess.DEVNULL,
            env=clean_env(),
        )
        return Run(done.returncode, done.stdout, done.stderr, b"")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    drawn = bytearray()

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError as exc:  # EIO: every slave side is closed
                assert exc.errno == errno.EIO
                return
            if not data:
                return
            drawn.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=slave if stdout_tty else subprocess.PIPE,
            stderr=slave if stderr_tty else subprocess.PIPE,
            env=clean_env(),
        )
    finally:
        os.close(slave)  # the child holds it now: its exit ends the reader
    try:
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(TIMEOUT)
        os.close(master)
    assert not reader.is_alive()
    terminal = ANSI.sub(b"", bytes(drawn)).decode("utf-8", "replace")
    return Run(
        process.returncode,
        terminal if stdout_tty else (out or b"").decode(),
        terminal if stderr_tty else (err or b"").decode(),
        bytes(drawn),
    )


@pytest.fixture
def setup(pki: Pki, tmp_path: Path) -> Iterator[tuple[Layout, RunningStpd, Path]]:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "big.bin").write_bytes(os.urandom(PAYLOAD_BYTES))
    (tree / "sub" / "small.txt").write_text("small\n")
    client = pki.client_ini("progress-client")
    with running_stpd(pki.layout) as server:
        yield client, server, tree


def assert_no_bar(run: Run) -> None:
    assert BAR not in run.stderr and BAR.encode() not in run.raw_terminal
    assert "files" not in run.stderr and "ETA" not in run.stderr
    assert b"\x1b[" not in run.raw_terminal  # not even a hidden cursor


def test_backup_and_restore_draw_a_bar_on_a_terminal(
    setup: tuple[Layout, RunningStpd, Path], tmp_path: Path
) -> None:
    client, server, tree = setup
    run = run_sbc(client, "backup", str(tree), "--server", server.address, stderr_tty=True)
    assert run.code == 0, run.stderr
    assert BAR in run.stderr
    assert "backup tree" in run.stderr  # the label
    assert re.search(r"\d+(\.\d+)?/\d+(\.\d+)? MB", run.stderr), run.stderr  # bytes of total
    assert re.search(r"\d+(\.\d+)? [kMG]B/s", run.stderr), run.stderr  # the rate
    assert re.search(r"\b\d+ files\b", run.stderr), run.stderr
    assert b"\x1b[" in run.raw_terminal  # drawn in place, with cursor control
    # The summary is on stdout, the bar is not.
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and SUMMARY_BACKUP.match(lines[0]), run.stdout
    assert BAR not in run.stdout
    saveset = SUMMARY_BACKUP.match(lines[0]).group(1)  # type: ignore[union-attr]

    target = tmp_path / "restored"
    run = run_sbc(
        client, "restore", saveset, str(target), "--server", server.address, stderr_tty=True
    )
    assert run.code == 0, run.stderr
    assert BAR in run.stderr
    assert f"restore {saveset}" in run.stderr
    assert re.search(r"\d+(\.\d+)? [kMG]B/s", run.stderr), run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and SUMMARY_RESTORE.match(lines[0]), run.stdout
    assert (target / "tree" / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()


def test_no_bar_when_stderr_is_not_a_terminal(setup: tuple[Layout, RunningStpd, Path]) -> None:
    client, server, tree = setup
    run = run_sbc(client, "backup", str(tree), "--server", server.address)
    assert run.code == 0, run.stderr
    assert run.stderr == ""
    assert SUMMARY_BACKUP.match(run.stdout.strip()), run.stdout

    # stdout on a terminal does not matter: the bar belongs to stderr.
    run = run_sbc(client, "backup", str(tree), "--server", server.address, stdout_tty=True)
    assert run.code == 0, run.stderr
    assert run.stderr == ""
    assert BAR not in run.stdout
    assert SUMMARY_BACKUP.match(run.stdout.strip()), run.stdout


@pytest.mark.parametrize("flag", ["--quiet", "-q", "--json"])
def test_no_bar_with_quiet_or_json_even_on_a_terminal(
    setup: tuple[Layout, RunningStpd, Path], tmp_path: Path, flag: str
) -> None:
    client, server, tree = setup
    run = run_sbc(client, "backup", str(tree), "--server", server.address, flag, stderr_tty=True)
    assert run.code == 0, run.stderr
    assert run.stderr == ""
    assert_no_bar(run)
    if flag == "--json":
        backup = json.loads(run.stdout)  # JSON only, no summary line
        assert backup["bytes"] > PAYLOAD_BYTES
    else:
        assert SUMMARY_BACKUP.match(run.stdout.strip()), run.stdout
        backup = {"saveset": SUMMARY_BACKUP.match(run.stdout.strip()).group(1)}  # type: ignore[union-attr]

    target = tmp_path / "restored"
    argv = ["restore", backup["saveset"], str(target), "--server", server.address, flag]
    run = run_sbc(client, *argv, stderr_tty=True)
    assert run.code == 0, run.stderr
    assert run.stderr == ""
    assert_no_bar(run)
    if flag == "--json":
        assert json.loads(run.stdout)["saveset"] == backup["saveset"]
    else:
        assert SUMMARY_RESTORE.match(run.stdout.strip()), run.stdout


@pytest.mark.parametrize("make", [with_holes, with_xattrs], ids=["holes", "plain"])
def test_the_estimated_total_is_near_the_stream_the_backup_sends(
    tmp_path: Path, make: Callable[[Path], Path]
) -> None:
    """Files with holes count by their data, as the backup sends them: 79
    MiB of sparse files are 40 KiB of stream, and the bar's total should
    say so rather than stop at a two-thousandth of it. What the estimate
    leaves out: PAX headers (sparse maps, extended attributes) and the
    stream's padding to 10 KiB."""
    tree = make(tmp_path)
    sent = len(tar_stream(tree, TreeStats()))
    estimate = estimate_tar_bytes(tree, EVERYTHING)
    assert estimate is not None
    assert abs(estimate - sent) <= 20 * 1024, (estimate, sent)


def test_the_total_is_estimated_while_the_transfer_goes_on() -> None:
    """The walk that estimates the total runs beside the transfer: bytes
    are counted before it ends, and the bar gets the total when it does;
    one that ends after the transfer changes nothing."""
    release = threading.Event()

    def estimate() -> int:
        assert release.wait(TIMEOUT)
        return 4096

    with TransferProgress(True, "backup t") as progress:
        thread = progress.estimate_total(estimate)
        assert thread is not None
        progress.advance(1024, 1)  # the transfer is not waiting for the walk
        task = progress._progress.tasks[0]  # type: ignore[union-attr]
        assert (task.completed, task.total) == (1024, None)
        release.set()
        thread.join(TIMEOUT)
        assert task.total == 4096

    late = threading.Event()
    with TransferProgress(True, "backup u") as progress:
        thread = progress.estimate_total(lambda: 1 if late.wait(TIMEOUT) else 0)
        task = progress._progress.tasks[0]  # type: ignore[union-attr]
    late.set()
    assert thread is not None
    thread.join(TIMEOUT)
    assert task.total is None
    assert TransferProgress(False, "quiet").estimate_total(lambda: 1) is None
