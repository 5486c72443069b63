"""Shared fixtures: a PKI made with our own ``pki``, client ini directories
of every kind, and an STPD running on 127.0.0.1 in a background thread.

Synchronisation is by events (the daemon reports its port; log lines are
awaited on a condition), never by sleeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from bench.lines import StderrLines
from pki.authority import CertificateAuthority
from pki.layout import INI_DIR_ENV, Layout
from pki.tls import ClientCertPolicy
from sbc import extract
from sbc.archive import TreeStats, write_tree
from sbc.cli import main as sbc_main
from sbc.extract import RestoreResult, extract_stream
from stpd import _plaintar
from stpd.config import load_config
from stpd.server import Stpd
from stpd.store import INCOMING

LOOPBACK = "127.0.0.1"
WAIT_SECONDS = 20.0  # upper bound for an expected event; never a sleep
STPD = str(Path(sys.executable).parent / "stpd")  # the console script
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")


def openssl(*args: str | Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The openssl command (a peer nobody here wrote), its output as text."""
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        check=False,
    )


def plain_files_the_python_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restores make and backups store every file the Python way: the runs
    in C (stpd/_plaintar.c) take none. For tests that emulate a file system
    or a change by patching ``os`` or Python steps, which the C calls do not
    go through, and to compare the two ways."""
    monkeypatch.setattr(_plaintar, "make_files", lambda piece, start, *rest: (start, 0))
    monkeypatch.setattr(_plaintar, "pack_files", lambda buffer, filled, *rest: (0, filled))


def tar_stream(source: Path, stats: TreeStats) -> bytes:
    """The whole stream write_tree makes. Each batch is copied when it is
    handed over: its buffers are refilled later (a ring, see BatchWriter)."""
    out = bytearray()

    def put(batch: list[memoryview]) -> None:
        for view in batch:
            out.extend(view)

    write_tree(source, put, stats)
    return bytes(out)


def restore_bytes(
    stream: bytes, target: Path, *, seed: int | None = None, overwrite: bool = False
) -> RestoreResult:
    """extract_stream of ``stream``: in one piece, or with a ``seed`` in
    pieces of random sizes, so that members meet the ends of pieces anywhere."""
    pieces, at = [], 0
    rng = random.Random(seed)
    while at < len(stream):
        size = len(stream) if seed is None else rng.randint(1, 30_000)
        pieces.append(memoryview(stream)[at : at + size])
        at += size
    pieces.reverse()
    result = RestoreResult()
    extract_stream(lambda: [pieces.pop()] if pieces else [], target, result, overwrite=overwrite)
    return result


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its content (none when ``root`` does
    not exist): to prove that nothing changed."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# Binary, as the kernel keeps them: a capability (cap_net_raw+ep) and ACLs
# (u::rw-, u:1000:r--, g::r--, m::r--, o::---; the default one: u::rwx ...).
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")
ACCESS_ACL = bytes.fromhex(
    "0200000001000600ffffffff02000400e803000004000400ffffffff10000400ffffffff20000000ffffffff"
)
DEFAULT_ACL = bytes.fromhex("0200000001000700ffffffff04000500ffffffff20000500ffffffff")


def with_xattrs(root: Path) -> Path:
    """A tree whose entries carry extended attributes of every kind a backup
    stores: user ones (a value that is not UTF-8 among them), a file
    capability, ACLs, a trusted one on a symbolic link, and on a file whose
    name needs a PAX header of its own; and an SELinux label, not stored."""
    tree = root / "xattrs"
    (tree / "dir").mkdir(parents=True)
    os.setxattr(tree / "dir", "user.comment", b"a directory")
    os.setxattr(tree / "dir", "system.posix_acl_default", DEFAULT_ACL)
    ping = tree / "dir" / "ping"
    ping.write_bytes(b"\x7fELF")
    ping.chmod(0o755)
    os.setxattr(ping, "security.capability", CAPABILITY)
    os.setxattr(ping, "user.binary", b"\xff\x00\xfe")
    os.setxattr(ping, "security.selinux", b"system_u:object_r:ping_exec_t:s0\0")
    shared = tree / "shared.txt"
    shared.write_text("for one more user\n")
    os.setxattr(shared, "system.posix_acl_access", ACCESS_ACL)
    (tree / "link").symlink_to("shared.txt")
    os.setxattr(tree / "link", "trusted.origin", b"here", follow_symlinks=False)
    long = tree / ("ünïcödé " * 20)
    long.write_text("long name\n")
    os.setxattr(long, "user.long", b"v" * 300)
    for n in range(20):  # plain files around them, for runs in C
        (tree / f"plain{n:02}").write_text(f"{n}\n")
        (tree / "dir" / f"plain{n:02}").write_text(f"{n}\n")
    return tree


def with_holes(root: Path) -> Path:
    """A tree of files with holes (sparse files): 64 MiB with 12 KiB of data
    in two places and a hole at the end; 10 MiB of hole only; one that
    begins with a hole, has a name that needs a PAX header of its own and an
    extended attribute; and plain files around them."""
    tree = root / "holes"
    tree.mkdir()
    with open(tree / "disk.img", "wb") as image:
        image.truncate(64 << 20)
        image.write(b"A" * 4096)
        image.seek(32 << 20)
        image.write(os.urandom(8192))
    with open(tree / "empty.img", "wb") as empty:
        empty.truncate(10 << 20)
    late = tree / ("ünïcödé " * 20)
    with open(late, "wb") as tail:
        tail.seek(5 << 20)
        tail.write(b"the end")
    os.setxattr(late, "user.note", b"sparse")
    for n in range(10):
        (tree / f"plain{n}").write_text(f"{n}\n")
    return tree


def xattrs_of(root: Path, *, restored: bool = False) -> dict[str, dict[str, bytes]]:
    """The extended attributes below ``root`` (a link's own), by path: but
    SELinux labels, what a backup stores; with ``restored``, but all
    security ones (capabilities), what sbc restores of it."""
    found = {}
    for path in sorted([root, *root.rglob("*")]):
        names = os.listxattr(path, follow_symlinks=False)
        found[str(path.relative_to(root))] = {
            name: os.getxattr(path, name, follow_symlinks=False)
            for name in names
            if name != "security.selinux" and not (restored and name.startswith("security."))
        }
    return found


@dataclass
class Pki:
    """One CA in ``root/ini`` with a server certificate for 127.0.0.1 and
    localhost, plus helpers for client ini directories."""

    root: Path
    layout: Layout
    ca: CertificateAuthority

    def client_ini(
        self,
        name: str,
        *,
        cert: str = "valid",
        client_auth: int = 1,
        server_verify: int = 1,
        extra_ini: str = "",
    ) -> Layout:
        """A client ini directory. ``cert``: valid, none, other-ca, expired,
        not-yet-valid, server (a server certificate used as a client one)."""
        layout = Layout(self.root / f"client-{name}")
        layout.ca_dir.mkdir(parents=True)
        shutil.copy(self.layout.ca_cert, layout.ca_cert)
        now = datetime.now(UTC)
        out = layout.client_dir
        if cert == "valid":
            self.ca.issue_client(f"CN:{name}", out_dir=out)
        elif cert == "expired":
            self.ca.issue_client(
                f"CN:{name}", out_dir=out, not_before=now - timedelta(days=10), days=1
            )
        elif cert == "not-yet-valid":
            self.ca.issue_client(
                f"CN:{name}", out_dir=out, not_before=now + timedelta(days=10), days=5
            )
        elif cert == "other-ca":
            other = CertificateAuthority.create(
                Layout(self.root / f"other-ca-{name}"), common_name="Other CA"
            )
            other.issue_client(f"CN:{name}", out_dir=out)
        elif cert == "server":
            issued = self.ca.issue_server(name, out_dir=self.root / f"srv-as-client-{name}")
            out.mkdir(parents=True)
            shutil.copy(issued.cert_path, layout.client_cert)
            shutil.copy(issued.key_path, layout.client_key)
        elif cert != "none":
            raise ValueError(cert)
        layout.sm_ini.write_text(
            "[SBC_SSL]\n"
            f"SBC_CLIENT_SSL_AUTH={client_auth}   #For client-side verification\n"
            f"SBC_SSL_SERVER_VERIFY={server_verify} #For server-side verification\n" + extra_ini
        )
        return layout


def make_pki(root: Path, server_names: str = "localhost,127.0.0.1") -> Pki:
    layout = Layout(root / "ini")
    ca = CertificateAuthority.create(layout)
    ca.issue_server(server_names)
    return Pki(root, layout, ca)


def waiting_in_poll(thread_id: int) -> bool:
    """Whether the thread ``thread_id`` of this process is in poll() (system
    call 7 on x86-64; 271 is ppoll, which a C library may use for it): a
    wait in C that a test must catch while it lasts."""
    call = Path(f"/proc/self/task/{thread_id}/syscall").read_text().split(" ", 1)[0]
    return call in ("7", "271")


def run_sbc(*argv: str) -> tuple[int, str, str]:
    """``sbc`` in this process; returns (exit status, stdout, stderr).

    sbc's log handler is made on each call for the ``sys.stderr`` of that
    moment (``sbc.cli._log_to_stderr``), so its warnings land in ``stderr`` too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sbc_main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def no_ini_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test names its ini directory; one from the environment must not leak in."""
    monkeypatch.delenv(INI_DIR_ENV, raising=False)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """An empty ini directory."""
    return Layout(tmp_path / "ini")


@pytest.fixture
def ca(layout: Layout) -> CertificateAuthority:
    """A fresh root CA in ``layout``."""
    return CertificateAuthority.create(layout)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


class LogWatch(logging.Handler):
    """Collects ``LEVEL message`` lines of the ``stpd`` logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.lines.append(f"{record.levelname} {record.getMessage()}")
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = WAIT_SECONDS) -> str:
        regex = re.compile(pattern)
        with self.changed:
            found: list[str] = []

            def match() -> bool:
                found[:] = [line for line in self.lines if regex.search(line)]
                return bool(found)

            if not self.changed.wait_for(match, timeout):
                raise AssertionError(
                    f"no log line matching {pattern!r}; got:\n" + "\n".join(self.lines)
                )
            return found[0]

    def wait_for_count(self, pattern: str, count: int, timeout: float = WAIT_SECONDS) -> list[str]:
        """Wait until ``count`` lines match (e.g. one per connection); more
        than ``count`` is an error too."""
        regex = re.compile(pattern)
        with self.changed:
            found: list[str] = []

            def enough() -> bool:
                found[:] = [line for line in self.lines if regex.search(line)]
                return len(found) >= count

            if not self.changed.wait_for(enough, timeout) or len(found) != count:
                raise AssertionError(
                    f"{len(found)} log lines matching {pattern!r}, expected {count}; got:\n"
                    + "\n".join(self.lines)
                )
            return list(found)

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        with self.changed:
            return [line for line in self.lines if regex.search(line)]


@dataclass
class RunningStpd:
    daemon: Stpd
    port: int
    log: LogWatch
    host: str = LOOPBACK
    token: Any = None  # of its trio loop

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def reload(self) -> None:
        """What SIGHUP does, in the daemon's own trio thread."""
        trio.from_thread.run_sync(self.daemon.reload, trio_token=self.token)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


@contextmanager
def running_stpd(
    layout: Layout, level: int = 2, host: str = LOOPBACK, **overrides: Any
) -> Iterator[RunningStpd]:
    """STPD on ``host``, port 0, in a thread with its own trio loop."""
    config = load_config(layout, listen=(host, 0), client_cert_policy=ClientCertPolicy(level))
    if overrides:
        config = dataclasses.replace(config, **overrides)
    watch = LogWatch()
    logger = logging.getLogger("stpd")
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    try:
        daemon = Stpd(config)  # what it logs while starting is watched too, as stpd logs it
    except BaseException:
        logger.removeHandler(watch)
        raise
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            state["cancel"] = nursery.cancel_scope.cancel
            state["token"] = trio.lowlevel.current_trio_token()
            state["port"] = await nursery.start(daemon.serve)
            started.set()

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test below
            state["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=thread_main, name="stpd", daemon=True)
    thread.start()
    started.wait(WAIT_SECONDS)
    if "error" in state:
        raise state["error"]
    try:
        yield RunningStpd(daemon, state["port"], watch, host, state["token"])
    finally:
        trio.from_thread.run_sync(state["cancel"], trio_token=state["token"])
        thread.join(WAIT_SECONDS)
        logger.removeHandler(watch)
        assert not thread.is_alive(), "stpd thread did not stop"
        assert "error" not in state, f"stpd failed: {state.get('error')!r}"


def tar_bytes(members: Mapping[str, bytes] | Iterable[tuple[str, bytes]]) -> bytes:
    """An in-memory PAX tar of regular files, name to content (pairs keep
    repeated names, which a dict cannot)."""
    pairs = members.items() if isinstance(members, Mapping) else members
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in pairs:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def assert_no_partial(root: Path, *, require_incoming: bool = False) -> None:
    """Nothing half-stored in the data directory ``root``: .incoming is empty
    (and, with ``require_incoming``, exists) and every tar has its metadata."""
    incoming = root / INCOMING
    if require_incoming:
        assert incoming.is_dir(), f"no {incoming}"
    leftovers = sorted(p.name for p in incoming.iterdir()) if incoming.is_dir() else []
    assert leftovers == [], f"leftovers in {incoming}: {leftovers}"
    orphans = sorted(p.name for p in root.glob("SS-*.tar") if not p.with_suffix(".json").exists())
    assert orphans == [], f"savesets without metadata: {orphans}"


def write_stpd_ini(ini: Path, *lines: str) -> None:
    (ini / "stpd.ini").write_text(
        "[STPD_Server]\nSTPD_HTTPS_USE_CLIENT_CERT=2\n" + "".join(f"{line}\n" for line in lines)
    )


class StpdProcess:
    """The real ``stpd`` console script, its stderr lines awaited by events."""

    def __init__(
        self, ini: Path, data: Path, pid_file: Path | None = None, launcher: Sequence[str] = ()
    ) -> None:
        """``launcher``: a command that execs stpd (argv follows), to start it
        in a changed process (see ``with_open_files``)."""
        argv = [STPD, "--ini-dir", str(ini), "--listen", f"{LOOPBACK}:0", "--data-dir", str(data)]
        argv = [*launcher, *argv]
        if pid_file is not None:
            argv += ["--pid-file", str(pid_file)]
        self.log = StderrLines.start(argv, "stpd")
        self.process = self.log.process
        listening = self.wait_for(r"INFO stpd: stpd \S+ listening on ")
        found = re.search(r"listening on \S+:(\d+),", listening)
        assert found, listening
        self.port = int(found.group(1))

    def mark(self) -> int:
        return self.log.mark()

    def wait_for(self, pattern: str, after: int = 0, timeout: float = WAIT_SECONDS) -> str:
        """The first stderr line from index ``after`` matching ``pattern``."""
        line = self.log.wait_for(pattern, timeout, after)
        assert line is not None, f"no stpd line matching {pattern!r}; got:\n" + self.log.tail(50)
        return line

    def matching(self, pattern: str) -> list[str]:
        return self.log.matching(pattern)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = WAIT_SECONDS) -> int:
        code = self.process.wait(timeout)
        self.log.join(timeout)
        return code

    def stop(self, timeout: float = WAIT_SECONDS) -> None:
        """SIGTERM if it still runs, then wait for it to exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self.log.join(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.join(WAIT_SECONDS)


def with_open_files(soft: int, hard: int) -> list[str]:
    """A launcher: stpd (StpdProcess) or sbc started with these open files limits."""
    code = (
        "import os, resource, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    return [sys.executable, "-c", code, str(soft), str(hard)]


@contextmanager
def read_only_directory(path: Path, prepare: Any = None) -> Iterator[Path]:
    """``path`` as a read-only filesystem (a small tmpfs remounted ro), so
    that a write fails even for root, who ignores permission bits.
    ``prepare(path)`` fills it before it turns read-only."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} (tests run as root): {mounted.stderr.strip()}")
    try:
        if prepare is not None:
            prepare(path)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def mounted(kind: str, where: Path, options: str = "") -> Iterator[Path]:
    """A file system of type ``kind`` (tmpfs, proc, ...) mounted at ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    argv = ["mount", "-t", kind, *(["-o", options] if options else []), kind, str(where)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount {kind} at {where} (tests run as root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def swapped_during_restore(
    monkeypatch: pytest.MonkeyPatch, swaps: Mapping[str, Callable[[], None]]
) -> None:
    """Run ``swaps[name]`` once SafeMembers has let the member ``name``
    through, before it is extracted: what someone with write access to the
    target could do at that moment."""
    real = extract.SafeMembers.__call__

    def checked_then_swapped(self, info: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:  # type: ignore[no-untyped-def]
        allowed = real(self, info, dest)
        if info.name in swaps:
            swaps[info.name]()
        return allowed

    monkeypatch.setattr(extract.SafeMembers, "__call__", checked_then_swapped)
