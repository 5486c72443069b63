"""Helpers shared by the benchmark (``python -m bench.run``): running commands
with a deadline while measuring their wall time and peak RSS, background
servers whose stderr is read by a thread, test data, checksums.

Synchronisation is by events (a process exit seen through a pidfd, a log
line seen by a reader thread), each awaited with a deadline; nothing sleeps.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.lines import StderrLines

HOST = "127.0.0.1"
CHUNK = 8 * 1024 * 1024  # bytes per read/write when generating and hashing data
STOP_TIMEOUT = 15.0  # seconds for a server to exit after SIGTERM


class BenchError(Exception):
    """The benchmark cannot go on: a tool is missing, a server did not start,
    or a transfer failed or produced wrong data. The message says which."""


def mib(nbytes: float) -> float:
    return nbytes / (1024 * 1024)


# -- commands: wall time, exit status and peak RSS of each ---------------------


@dataclass
class Proc:
    """One started command. Its stdout and stderr go to temporary files (read
    after it ended, so a chatty command can never block on a full pipe)."""

    argv: list[str]
    popen: subprocess.Popen[bytes]
    pidfd: int
    started: float
    out: IO[bytes] | None
    err: IO[bytes]
    ended: float = 0.0
    returncode: int | None = None
    rss_pipe: int | None = None  # where _RSS_LAUNCHER reports (see start)
    maxrss_kib: int | None = None  # the command's own peak RSS, when measured

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    @property
    def stdout(self) -> str:
        return _read_back(self.out)

    @property
    def stderr(self) -> str:
        return _read_back(self.err)

    def describe(self) -> str:
        tail = self.stderr.strip()[-600:]
        return f"`{shlex.join(self.argv)}` exit status {self.returncode}" + (
            f": {tail}" if tail else ""
        )


def _read_back(handle: IO[bytes] | None) -> str:
    if handle is None:
        return ""
    handle.seek(0)
    return handle.read().decode("utf-8", "replace")


# A child's ru_maxrss includes the peak RSS of the process it was forked
# from (Linux keeps the larger of the two across exec): a command started by
# this 40-100 MiB benchmark "peaks" at the benchmark's size. So a command
# whose RSS we measure is started by this small launcher (python -S, about
# 7 MiB, the floor of what it can report), which reports the command's
# ru_maxrss on a pipe and exits as the command did.
_RSS_LAUNCHER = """
import os, sys
report = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(report)
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
os.write(report, b"%d" % usage.ru_maxrss)
code = os.waitstatus_to_exitcode(status)
if code < 0:
    os.kill(os.getpid(), -code)
os._exit(code)
"""


def start(
    argv: Sequence[str],
    *,
    stdin: Any = subprocess.DEVNULL,
    pipe_out: bool = False,
    measure_rss: bool = False,
) -> Proc:
    """Start a command; ``pipe_out`` gives it a pipe as stdout (for ``a | b``);
    ``measure_rss`` takes its peak RSS (``maxrss_kib``), through a launcher
    that adds about 10 ms to its wall time."""
    # Closed when the Proc is garbage: they outlive this function by design.
    out = None if pipe_out else tempfile.TemporaryFile()  # noqa: SIM115
    err = tempfile.TemporaryFile()  # noqa: SIM115
    command, report, rss_pipe = list(argv), None, None
    if measure_rss:
        rss_pipe, report = os.pipe()
        command = [sys.executable, "-I", "-S", "-c", _RSS_LAUNCHER, str(report), *argv]
    started = time.monotonic()
    try:
        popen = subprocess.Popen(
            command,
            stdin=stdin,
            stdout=subprocess.PIPE if pipe_out else out,
            stderr=err,
            close_fds=True,
            pass_fds=(report,) if report is not None else (),
            process_group=0 if measure_rss else None,  # killed with its command
        )
    finally:
        if report is not None:
            os.close(report)
    proc = Proc(list(argv), popen, os.pidfd_open(popen.pid), started, out, err)
    proc.rss_pipe = rss_pipe
    return proc


def _kill(proc: Proc) -> None:
    try:
        if proc.rss_pipe is not None:
            os.killpg(proc.popen.pid, signal.SIGKILL)  # the launcher and its command
        else:
            proc.popen.kill()
    except OSError:
        pass


def _reap(proc: Proc) -> None:
    """Collect an ended child with wait4 (its own exit status), and the
    command's peak RSS when the launcher measured it."""
    _, status, _ = os.wait4(proc.popen.pid, 0)
    proc.ended = time.monotonic()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.popen.returncode = proc.returncode  # so Popen never reaps it again
    os.close(proc.pidfd)
    if proc.rss_pipe is not None:
        with os.fdopen(proc.rss_pipe, "rb") as pipe:
            text = pipe.read()
        proc.rss_pipe = None
        proc.maxrss_kib = int(text) if text.isdigit() else None


def wait_all(procs: Sequence[Proc], timeout: float) -> None:
    """Wait until every process has ended (each one's end time is taken when
    its pidfd becomes readable); past ``timeout`` seconds, or on any
    exception (Ctrl-C), kill the ones still running and raise."""
    deadline = time.monotonic() + timeout
    pending = {proc.pidfd: proc for proc in procs}
    try:
        while pending:  # each pass reaps at least one process, or raises
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = ", ".join(shlex.join(p.argv[:3]) for p in pending.values())
                raise BenchError(f"still running after {timeout:.0f}s: {names}")
            ready, _, _ = select.select(list(pending), [], [], remaining)
            for fd in ready:
                _reap(pending.pop(fd))
    finally:
        for proc in pending.values():
            _kill(proc)
            _reap(proc)


def run(argv: Sequence[str], timeout: float, *, measure_rss: bool = False) -> Proc:
    """Run one command to its end (or kill it at the deadline)."""
    proc = start(argv, measure_rss=measure_rss)
    wait_all([proc], timeout)
    return proc


def run_checked(argv: Sequence[str], timeout: float) -> Proc:
    proc = run(argv, timeout)
    if proc.returncode != 0:
        raise BenchError(proc.describe())
    return proc


def run_pipeline(first: Sequence[str], second: Sequence[str], timeout: float) -> list[Proc]:
    """``first | second``; the caller measures from the first start to the last end."""
    producer = start(first, pipe_out=True)
    assert producer.popen.stdout is not None
    try:
        consumer = start(second, stdin=producer.popen.stdout)
    except BaseException:
        producer.popen.kill()
        wait_all([producer], STOP_TIMEOUT)
        raise
    finally:
        producer.popen.stdout.close()  # only the consumer holds the read end now
    procs = [producer, consumer]
    wait_all(procs, timeout)
    return procs


def span(procs: Sequence[Proc]) -> float:
    """Wall time from the first start to the last end."""
    return max(p.ended for p in procs) - min(p.started for p in procs)


# -- servers -------------------------------------------------------------------


class Server:
    """A server in the foreground as our child, in its own session (a Ctrl-C
    reaches only us; the ``finally`` stops it); ``wait_for`` awaits a line
    of its stderr with a deadline."""

    def __init__(self, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = StderrLines.start(self.argv, name, new_session=True)
        self.process = self.log.process

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stderr line matching ``pattern``."""
        line = self.log.wait_for(pattern, timeout)
        if line is None:
            state = "it exited" if self.log.ended else f"nothing within {timeout:g}s"
            raise BenchError(
                f"{self.name}: no stderr line matching {pattern!r} ({state}); last lines:\n"
                + self.tail()
            )
        found = re.search(pattern, line)
        assert found is not None
        return found

    def tail(self, count: int = 15) -> str:
        return self.log.tail(count)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within STOP_TIMEOUT."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except OSError:
                self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except OSError:
                    self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self.log.join(STOP_TIMEOUT)


def tool(name: str) -> str:
    """The console script installed beside this interpreter (.venv/bin/NAME)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"console script {name!r} not found: run `make install` first")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size of a running process (VmHWM), KiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) if match else None


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``, Linux 4.0+)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU seconds used so far by the processes ``pids``
    (all their threads), from /proc; 0 for one that is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def children_cpu_seconds() -> float:
    """User and system CPU seconds of this process's children reaped so far
    (the commands the benchmark ran: sbc, curl, tar)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(word) for word in text.split()]


# -- data and checksums ---------------------------------------------------------


def write_random_file(path: Path, size: int) -> str:
    """``size`` random bytes (os.urandom in chunks); returns their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left > 0:
            block = os.urandom(min(CHUNK, left))
            digest.update(block)
            handle.write(block)
            left -= len(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class TarDigest:
    """One pass over a stored tar file: the sha256 of the whole file, and of
    each regular member's content (by member name)."""

    whole: str
    members: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)


def digest_tar(path: Path) -> TarDigest:
    """Hash a tar file and the contents of its members in a single read."""
    import tarfile

    ranges: list[tuple[int, int, str]] = []
    sizes: dict[str, int] = {}
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            if member.isreg():
                ranges.append((member.offset_data, member.size, member.name))
                sizes[member.name] = member.size
    whole = hashlib.sha256()
    members: dict[str, str] = {}
    position = 0
    spans = iter(sorted(ranges))
    current = next(spans, None)
    member_hash = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            whole.update(block)
            view = memoryview(block)
            block_start = position
            position += len(block)
            while current is not None:
                begin, size, name = current
                end = begin + size
                lo, hi = max(begin, block_start), min(end, position)
                if lo < hi:
                    member_hash.update(view[lo - block_start : hi - block_start])
                if end <= position:  # this member is complete
                    members[name] = member_hash.hexdigest()
                    member_hash = hashlib.sha256()
                    current = next(spans, None)
                else:
                    break
    return TarDigest(whole.hexdigest(), members, sizes)
