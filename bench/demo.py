"""The main job end to end: ``make demo`` (``python -m bench.demo [--keep]``).

In a throw-away directory it creates a CA and certificates with the real
``sm_ssl_cert``, writes ``stpd.ini`` and ``sm.ini``, starts the real ``stpd``
at level 2 on 127.0.0.1, backs up a sample tree with ``sbc backup``, lists and
restores it, compares the restored tree with the original, lists its entries
and restores one file alone, shows a client without a certificate being
refused, and stops the server with SIGTERM.

Every step prints the command it ran and that command's output. The exit
status is 0 only if every step did what it should. Synchronisation with the
server is by its log lines (read by a thread, awaited with a deadline),
never by sleeping.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

from bench.common import HOST, BenchError, free_port, tool
from bench.lines import StderrLines

COMMAND_TIMEOUT = 60.0  # seconds for one sbc / sm_ssl_cert / curl run
START_TIMEOUT = 30.0  # seconds for stpd to log "listening on"
LOG_TIMEOUT = 15.0  # seconds for an expected stpd log line
STOP_TIMEOUT = 15.0  # seconds for stpd to exit after SIGTERM
SAMPLE_MTIME = 1_500_000_000  # 2017-07-14: restored files must keep it


class DemoFailed(BenchError):
    """A step did not do what it should; the message says what."""


# -- output ------------------------------------------------------------------


def heading(number: int, title: str) -> None:
    print(f"\n=== {number}. {title}", flush=True)


def show(text: str, prefix: str = "    ") -> None:
    text = text.rstrip("\n")
    if text:
        print(textwrap.indent(text, prefix), flush=True)


def ok(message: str) -> None:
    print(f"  ok: {message}", flush=True)


# -- running the real programs -------------------------------------------------


def run(argv: Sequence[str], *, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, print it and its output; fail unless its status is as expected."""
    print(f"  $ {shlex.join(argv)}", flush=True)
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DemoFailed(f"{argv[0]} did not finish within {COMMAND_TIMEOUT:g}s") from None
    show(result.stdout)
    show(result.stderr, "    (stderr) ")
    print(f"    [exit status {result.returncode}]", flush=True)
    if expect_ok and result.returncode != 0:
        raise DemoFailed(f"{shlex.join(argv)} failed with exit status {result.returncode}")
    return result


class ServerProcess:
    """``stpd`` as a subprocess whose stderr lines we await and show."""

    def __init__(self, argv: list[str]) -> None:
        print(f"  $ {shlex.join(argv)} &", flush=True)
        self.log = StderrLines.start(argv, "stpd")
        self.process = self.log.process
        self.shown = 0

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> str:
        """The first log line (from index ``after``) matching ``pattern``."""
        line = self.log.wait_for(pattern, timeout, after)
        if line is None:
            state = "stpd exited" if self.log.ended else f"nothing within {timeout:g}s"
            raise DemoFailed(f"no stpd log line matching {pattern!r} ({state})")
        return line

    def show_new_log(self) -> None:
        """Print the log lines not printed yet."""
        mark = self.log.mark()
        for line in self.log.lines[self.shown : mark]:
            print(f"    stpd| {line}", flush=True)
        self.shown = mark

    def stop(self) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise DemoFailed(f"stpd did not stop within {STOP_TIMEOUT:g}s of SIGTERM") from None
        finally:
            self.log.join(STOP_TIMEOUT)
        return status


# -- the sample tree and the comparison ---------------------------------------


def make_sample_tree(root: Path) -> None:
    """Nested directories, a symlink, an empty file, a unicode name, modes, mtimes."""
    (root / "docs" / "deep" / "nested").mkdir(parents=True)
    (root / "docs" / "report.txt").write_text("quarterly numbers\n" * 50, encoding="utf-8")
    (root / "docs" / "deep" / "nested" / "data.bin").write_bytes(os.urandom(256 * 1024))
    (root / "empty.log").write_bytes(b"")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho restored\n", encoding="utf-8")
    script.chmod(0o755)
    secret = root / "secret.key"
    secret.write_text("not really a key\n", encoding="utf-8")
    secret.chmod(0o600)
    unicode_dir = root / "Grüße"
    unicode_dir.mkdir()
    (unicode_dir / "naïve 文件.txt").write_text("héllo wörld\n", encoding="utf-8")
    (root / "latest").symlink_to("docs/report.txt")
    (root / "docs" / "deep").chmod(0o750)
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (SAMPLE_MTIME, SAMPLE_MTIME))


def describe_tree(root: Path) -> dict[str, tuple[str, int, str, int | None]]:
    """relative path -> (kind, permission bits, content digest or link target, file mtime)."""
    entries: dict[str, tuple[str, int, str, int | None]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        rel = path.relative_to(root).as_posix()
        if stat.S_ISLNK(info.st_mode):
            entries[rel] = ("symlink", 0, os.readlink(path), None)
        elif stat.S_ISDIR(info.st_mode):
            entries[rel] = ("dir", stat.S_IMODE(info.st_mode), "", None)
        elif stat.S_ISREG(info.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entries[rel] = ("file", stat.S_IMODE(info.st_mode), digest, int(info.st_mtime))
        else:
            entries[rel] = ("other", stat.S_IMODE(info.st_mode), "", None)
    return entries


def compare_trees(original: Path, restored: Path) -> list[str]:
    """Differences between two trees (empty: equal), printing what was compared."""
    want, got = describe_tree(original), describe_tree(restored)
    problems = [f"missing after restore: {p}" for p in sorted(want.keys() - got.keys())]
    problems += [f"unexpected after restore: {p}" for p in sorted(got.keys() - want.keys())]
    for rel in sorted(want.keys() & got.keys()):
        (kind, mode, content, mtime), restored_entry = want[rel], got[rel]
        if kind == "symlink":
            detail = f"-> {content}"
        elif kind == "file":
            detail = f"{mode:04o}  sha256 {content[:12]}…  mtime {mtime}"
        else:
            detail = f"{mode:04o}"
        verdict = "same" if restored_entry == want[rel] else "DIFFERENT"
        print(f"    {verdict:9} {kind:7} {rel}  {detail}", flush=True)
        if restored_entry != want[rel]:
            problems.append(f"{rel}: original {want[rel]}, restored {restored_entry}")
    return problems


# -- the demo --------------------------------------------------------------------


def write_file(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    print(f"  wrote {path}:", flush=True)
    show(text)


def demo(work: Path) -> None:
    sm_ssl_cert, stpd, sbc = tool("sm_ssl_cert"), tool("stpd"), tool("sbc")
    ini = work / "ini"
    data = work / "data"
    port = free_port()

    heading(1, "root CA, server and client certificates (sm_ssl_cert); the CA key off the server")
    run([sm_ssl_cert, "--ini-dir", str(ini), "ca"])
    run([sm_ssl_cert, "--ini-dir", str(ini), "server", f"--common-name=localhost,{HOST}"])
    run([sm_ssl_cert, "--ini-dir", str(ini), "client", "--oid=CN:demo-client,O:Demo,OU:Backup"])
    # What an administrator does next: the CA key goes where certificates are
    # issued, not on the server (stpd would warn about it).
    offline = work / "offline-ca"
    offline.mkdir(mode=0o700)
    run(["mv", str(ini / "ca" / "rootCA.key"), str(offline)])

    # The data directory is made beforehand (a file system mounted there, in
    # life): stpd warns when it has to make it.
    run(["mkdir", "-m", "700", str(data)])

    heading(2, "configuration: stpd.ini (level 2) and sm.ini")
    write_file(
        ini / "stpd.ini",
        "[STPD_Server]\n"
        "STPD_HTTPS_USE_CLIENT_CERT=2 #0: do not validate, 1: validate but warn, "
        "2: validate and reject\n"
        f"STPD_HTTPS_LISTEN={HOST}:{port}\n"
        f"STPD_DATA_DIR={data}\n"
        "STPD_SHUTDOWN_GRACE=5   #seconds running transfers may finish after SIGTERM\n",
    )
    write_file(
        ini / "sm.ini",
        "[SBC_SSL]\n"
        "SBC_CLIENT_SSL_AUTH=1   #For client-side verification\n"
        "SBC_SSL_SERVER_VERIFY=1 #For server-side verification\n"
        "[SBC]\n"
        f"SBC_SERVER={HOST}:{port}\n",
    )

    heading(3, "start stpd")
    server = ServerProcess([stpd, "--ini-dir", str(ini)])
    try:
        listening = server.wait_for(r"listening on ", START_TIMEOUT)
        server.show_new_log()
        if f"{HOST}:{port}" not in listening or "level 2" not in listening:
            raise DemoFailed(f"stpd is not listening at level 2 on {HOST}:{port}: {listening}")
        ok(f"stpd listens on {HOST}:{port} at level 2")
        run([stpd, "--ini-dir", str(ini), "status"])  # asks the daemon, with sm.ini's client
        server.show_new_log()
        run_clients(work, ini, data, sbc, server, port)
    finally:
        heading(10, "stop stpd (SIGTERM)")
        print(f"  $ kill -TERM {server.process.pid}", flush=True)
        status = server.stop()
        server.show_new_log()
        print(f"    [stpd exit status {status}]", flush=True)
    if status != 0:
        raise DemoFailed(f"stpd exited with status {status} after SIGTERM (expected 0)")
    ok("stpd stopped cleanly")


def run_clients(
    work: Path, ini: Path, data: Path, sbc: str, server: ServerProcess, port: int
) -> None:
    source = work / "sample"
    target = work / "restored"

    heading(4, "back up a sample tree (sbc backup)")
    make_sample_tree(source)
    print(
        f"  created {source}: nested directories, a symlink, an empty file, modes, a unicode name"
    )
    result = run([sbc, "--ini-dir", str(ini), "backup", str(source), "--json"])
    backup = json.loads(result.stdout)
    saveset = backup["saveset"]
    server.wait_for(rf"stored saveset {re.escape(saveset)} ", LOG_TIMEOUT)
    server.show_new_log()
    stored = data / f"{saveset}.tar"
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    if digest != backup["sha256"]:
        raise DemoFailed(f"{stored} has sha256 {digest}, sbc printed {backup['sha256']}")
    ok(f"saveset {saveset} stored as {stored} ({backup['bytes']} bytes, sha256 matches)")

    heading(5, "list this client's savesets (sbc list)")
    result = run([sbc, "--ini-dir", str(ini), "list"])
    if saveset not in result.stdout:
        raise DemoFailed(f"sbc list does not show {saveset}")
    server.show_new_log()
    ok(f"sbc list shows {saveset}")

    heading(6, "restore it into another directory (sbc restore)")
    run([sbc, "--ini-dir", str(ini), "restore", saveset, str(target)])
    server.show_new_log()

    heading(7, "compare the restored tree with the original")
    restored_root = target / source.name  # members are stored under the source's name
    problems = compare_trees(source, restored_root)
    if problems:
        raise DemoFailed("restored tree differs: " + "; ".join(problems))
    ok(f"{restored_root} equals {source}: contents, modes, mtimes and symlinks")

    heading(
        8,
        "one file back: the saveset's entries (sbc list ID), restore ID DIR ENTRY, and "
        "sbc verify ID (a selective restore does not check the saveset's checksum)",
    )
    entry = f"{source.name}/docs/report.txt"
    result = run([sbc, "--ini-dir", str(ini), "list", saveset])
    if not re.search(rf" {re.escape(entry)}$", result.stdout, re.MULTILINE):
        raise DemoFailed(f"sbc list {saveset} does not show {entry}")
    single = work / "one-file"
    run([sbc, "--ini-dir", str(ini), "restore", saveset, str(single), entry])
    got = sorted(p.relative_to(single).as_posix() for p in single.rglob("*") if p.is_file())
    if got != [entry] or (single / entry).read_bytes() != (source / "docs/report.txt").read_bytes():
        raise DemoFailed(f"restoring {entry} alone gave {got}")
    result = run([sbc, "--ini-dir", str(ini), "verify", saveset])
    if f"saveset {saveset} is intact" not in result.stdout:
        raise DemoFailed(f"sbc verify {saveset} did not find it intact")
    server.show_new_log()
    ok(f"only {entry} was restored, equal to the original; stpd found the saveset intact")

    heading(9, "a client without a certificate is refused (SBC_CLIENT_SSL_AUTH=0)")
    anonymous = work / "ini-no-cert"
    (anonymous / "ca").mkdir(parents=True)
    shutil.copy(ini / "ca" / "rootCA.pem", anonymous / "ca" / "rootCA.pem")
    write_file(
        anonymous / "sm.ini",
        "[SBC_SSL]\n"
        "SBC_CLIENT_SSL_AUTH=0   #present no client certificate\n"
        "SBC_SSL_SERVER_VERIFY=1 #still verify the server\n"
        "[SBC]\n"
        f"SBC_SERVER={HOST}:{port}\n",
    )
    mark = server.log.mark()
    result = run([sbc, "--ini-dir", str(anonymous), "list"], expect_ok=False)
    error_lines = result.stderr.strip().splitlines()
    if result.returncode == 0:
        raise DemoFailed("sbc without a certificate was served at level 2")
    if len(error_lines) != 1 or not error_lines[0].startswith("sbc: error: refused by stpd"):
        raise DemoFailed(f"sbc did not print one clear refusal line: {result.stderr!r}")
    refused = server.wait_for(r"ERROR stpd: refused client ", LOG_TIMEOUT, after=mark)
    server.show_new_log()
    level_and_message = refused.split(" ", 2)[-1]  # without the time stamp
    ok(f"sbc refused (exit status {result.returncode}); stpd logged {level_and_message}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.demo",
        description="Create a PKI, run stpd at level 2 and back up, list and restore with sbc, "
        "all in a temporary directory on 127.0.0.1.",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="stpd-demo-"))
    print(f"demo directory: {work}", flush=True)
    try:
        demo(work)
    except BenchError as exc:  # DemoFailed, or a console script not found
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if args.keep:
            print(f"\nkept {work} (--keep)", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        "\nDEMO OK: certificates, level 2, backup, list, restore, compare, one file back, "
        "verify, refusal, stop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
