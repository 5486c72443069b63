"""Hostile and unlucky data: uploads cut off, archives that are not tar,
names that try to leave the data directory, savesets that try to escape the
restore target, a full disk, and stpd killed in the middle of an upload."""

from __future__ import annotations

import bz2
import errno
import fcntl
import gzip
import io
import json
import lzma
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout, suppress
from pathlib import Path

import pytest

import sbc.extract
import stpd.cli
import stpd.server
import stpd.store
from pki.layout import Layout
from sbc.archive import ArchiveError
from stpd import __version__
from stpd.tarcheck import MAX_EXTENSION_HEADER
from tests.conftest import Pki, RunningStpd, StpdProcess, restore_bytes, running_stpd
from tests.test_hostile_common import (
    DEADLINE,
    assert_no_partial,
    assert_serves,
    created_in,
    hpki,  # noqa: F401  (fixture)
    read_answer,
    request,
    run_sbc,
    small_tar,
    tls_connect,
    tls_context,
    until,
    wait_closed,
)

PEER = r"127\.0\.0\.1:\d+"
VENV_BIN = Path(sys.executable).parent


def curl_put(stpd: RunningStpd, client: Layout, body: Path, source: str = "/hostile"):  # type: ignore[no-untyped-def]
    """PUT ``body`` with curl as ``client``; returns (HTTP status, JSON answer)."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "30", "--cacert", str(client.ca_cert),
         "--cert", str(client.client_cert), "--key", str(client.client_key),
         "-T", str(body), "-w", "\n%{http_code}", f"{stpd.url}/savesets?source={source}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(text)


@contextmanager
def upload_started(stpd: RunningStpd) -> Iterator[threading.Event]:
    """An event set when stpd has begun storing an upload (its .part exists)."""
    began = threading.Event()
    store = stpd.daemon.store
    original = store.begin

    def begin(*args: str):  # type: ignore[no-untyped-def]
        upload = original(*args)
        began.set()
        return upload

    store.begin = begin  # type: ignore[method-assign]
    try:
        yield began
    finally:
        del store.begin


# -- uploads cut off -------------------------------------------------------------------


def stored_so_far(stpd: RunningStpd) -> int:
    """Bytes in stpd's partial saveset files (0 when there are none)."""
    sizes = []
    for part in stpd.daemon.store.incoming.glob("*.part"):
        with suppress(FileNotFoundError):
            sizes.append(part.stat().st_size)
    return sum(sizes)


def long_upload(directory: Path) -> Path:
    """2 GiB of zeros that sbc sends byte by byte, written in no time: space
    allocated without writing (fallocate), not a file with holes, which
    sbc now sends as a few bytes."""
    path = directory / "zeros.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, 2 << 30)
    finally:
        os.close(fd)
    return path


def partial_upload_head(size: int = 1 << 30) -> bytes:
    """A chunked PUT whose tar announces a ``size``-byte member: whatever
    part of it we send is a valid beginning of an archive."""
    info = tarfile.TarInfo("big.bin")
    info.size = size
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return (
        b"PUT /savesets?source=/cut HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % (len(header) + size)
        + header
    )


@pytest.mark.parametrize(
    "how", ["no-close-notify", "tcp-reset", "close-notify", "sbc-killed", "stalled"]
)
def test_upload_cut_off_mid_stream_stores_nothing(hpki: Pki, tmp_path: Path, how: str) -> None:  # noqa: F811
    """``stalled``: the client stops sending and keeps the connection open;
    STPD_IO_TIMEOUT ends the upload."""
    client = hpki.client_ini("cutter")
    with running_stpd(hpki.layout, 2, io_timeout=0.5) as stpd, upload_started(stpd) as began:
        if how == "sbc-killed":
            zeros = long_upload(tmp_path)
            sbc = subprocess.Popen(
                [str(VENV_BIN / "sbc"), "--ini-dir", str(client.ini_dir), "backup", str(zeros),
                 "--server", stpd.address, "--quiet"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                assert began.wait(DEADLINE), "the upload never started"
            finally:
                sbc.kill()
                sbc.wait(DEADLINE)
        else:
            raw = socket.create_connection(("127.0.0.1", stpd.port), timeout=DEADLINE)
            sock = tls_context(hpki, client).wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(partial_upload_head() + bytes(300_000))
            assert began.wait(DEADLINE), "the upload never started"
            if how == "tcp-reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            elif how == "stalled":
                stpd.log.wait_for(rf"^WARNING upload from {PEER} \(CN=cutter\) cut off: timed out")
                answer = read_answer(sock, "PUT")  # why, then closed
                assert answer is not None and answer.status == 408, answer
                assert answer.headers.get("connection") == "close"
                assert answer.json() == {
                    "error": "no data for 0.5s (STPD_IO_TIMEOUT): the upload was cut off and "
                    "nothing was stored"
                }
                assert wait_closed(sock) == b""
                sock.close()
            elif how == "close-notify":
                with suppress(ssl.SSLError, OSError):
                    sock.unwrap().close()
                sock.close()
            else:
                sock.close()  # the stdlib sends no close_notify on close()
        line = stpd.log.wait_for(rf"^WARNING upload from {PEER} \(CN=cutter\) cut off: ")
        assert line.endswith("; nothing stored"), line
        stpd.log.wait_for(rf"^INFO connection with {PEER} ended: ")  # after the clean-up
        assert stpd.daemon.store.all() == []
        assert_no_partial(stpd.daemon.store.root)
        assert_serves(stpd, client, tmp_path)


def test_sbc_that_stops_sending_is_told_stpd_cut_the_upload_off(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """An sbc that cannot go on for STPD_IO_TIMEOUT (here: stopped with
    SIGSTOP, as a hung source or a suspended machine would) learns from the
    408 that stpd gave up and stored nothing, not that it was refused."""
    client = hpki.client_ini("sleeper")
    zeros = long_upload(tmp_path)
    with running_stpd(hpki.layout, 2, io_timeout=0.5) as stpd, upload_started(stpd) as began:
        sbc = subprocess.Popen(
            [str(VENV_BIN / "sbc"), "--ini-dir", str(client.ini_dir), "backup", str(zeros),
             "--server", stpd.address, "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert began.wait(DEADLINE), "the upload never started"
            until(lambda: stored_so_far(stpd) > 16 << 20, "16 MiB stored")  # sbc is sending
            sbc.send_signal(signal.SIGSTOP)
            stpd.log.wait_for(rf"^WARNING upload from {PEER} \(CN=sleeper\) cut off: timed out")
            stpd.log.wait_for(rf"^INFO connection with {PEER} ended: ")  # answered, closed
        finally:
            sbc.send_signal(signal.SIGCONT)
        out, err = sbc.communicate(timeout=DEADLINE)
        assert sbc.returncode == 1 and out == ""
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert re.fullmatch(
            rf"sbc: error: backup of {re.escape(str(zeros))} failed on stpd at {PEER}: no data "
            r"for 0\.5s \(STPD_IO_TIMEOUT\): the upload was cut off and nothing was stored\n",
            err,
        ), err
        assert stpd.daemon.store.all() == []
        assert_no_partial(stpd.daemon.store.root)


def test_sbc_whose_stpd_stops_reading_says_nothing_is_kept(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """stpd that stops reading during a backup (SIGSTOP, as a hung disk or a
    suspended machine would): sbc said only "stopped reading our data (1s)";
    it says, as for a lost connection, that nothing is kept and to run the
    backup again, and stpd, let go on, keeps nothing indeed."""
    client = hpki.client_ini("stalled", extra_ini="[SBC]\nSBC_IO_TIMEOUT=1\n")
    data = tmp_path / "data"
    zeros = long_upload(tmp_path)
    server = StpdProcess(hpki.layout.ini_dir, data)
    try:
        with created_in(data / ".incoming") as next_created:
            sbc = subprocess.Popen(
                [str(VENV_BIN / "sbc"), "--ini-dir", str(client.ini_dir), "backup", str(zeros),
                 "--server", f"127.0.0.1:{server.port}", "--quiet"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                assert next_created().endswith(".tar.part")
                server.signal(signal.SIGSTOP)
                out, err = sbc.communicate(timeout=DEADLINE)
            finally:
                server.signal(signal.SIGCONT)
                sbc.kill()
        assert sbc.returncode == 1 and out == "", (out, err)
        assert re.fullmatch(
            rf"sbc: error: stpd at 127\.0\.0\.1:{server.port} stopped reading our data during "
            r"the backup after [\d.]+ MB \(no progress for 1s, SBC_IO_TIMEOUT\): stpd or the "
            r"network stalled; stpd keeps nothing of an interrupted backup, run it again\n",
            err,
        ), err
        server.wait_for(
            rf"WARNING stpd: upload from {PEER} \(CN=stalled\) cut off: .*; nothing stored$"
        )
        server.wait_for(rf"INFO stpd: connection with {PEER} ended: ")  # after the clean-up
        assert_no_partial(data)
    finally:
        server.stop()


# -- archives that are not tar ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "garbage-stream", "no-end-marker", "empty"])
def test_upload_that_is_not_a_tar_stream_is_refused(hpki: Pki, tmp_path: Path, kind: str) -> None:  # noqa: F811
    client = hpki.client_ini("tarless")
    body = tmp_path / "body"
    if kind == "text":
        body.write_text("this is not a tar archive\n" * 100)
    elif kind == "garbage-stream":  # refused while curl is still sending
        body.write_bytes(os.urandom(8 * 1024 * 1024))
    elif kind == "no-end-marker":
        body.write_bytes(small_tar()[:1024])  # header and data, no end blocks
    else:
        body.write_bytes(b"")
    with running_stpd(hpki.layout, 2) as stpd:
        status, answer = curl_put(stpd, client, body)
        assert status == 400, answer
        assert "not a valid tar stream" in answer["error"] and "nothing stored" in answer["error"]
        # The client's doing: a warning, which blames no data directory.
        line = stpd.log.wait_for(
            rf"^WARNING upload from {PEER} \(CN=tarless\) failed: upload is not a valid tar stream"
        )
        assert "data directory" not in line, line
        assert stpd.daemon.store.all() == []
        assert_no_partial(stpd.daemon.store.root)
        assert_serves(stpd, client, tmp_path)


def stored_then_restored(
    pki: Pki, client: Layout, body: Path, target: Path, *options: str
) -> tuple[int, str, str]:
    """``body`` uploaded with curl (201) to a level-2 stpd, then restored
    whole by sbc into ``target``: sbc's exit status, stdout and stderr."""
    with running_stpd(pki.layout, 2) as stpd:
        status, answer = curl_put(stpd, client, body)
        assert status == 201, answer
        return run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", answer["saveset"], str(target),
            "--server", stpd.address, *options,
        )  # fmt: skip


def test_a_member_with_a_pax_header_of_more_than_64_kib_is_restored(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """sbc stores an extended attribute of up to 64 KiB (tmpfs, XFS) in a
    PAX header of that size: tarfile was handed a view of it, and the
    restore of the whole saveset ended in a traceback, nothing restored."""
    client = hpki.client_ini("bigpax")
    member = tarfile.TarInfo("big/f")
    member.size = 3
    member.pax_headers = {"comment": "v" * 100_000, "SCHILY.xattr.user.big": "w" * 65_000}
    body = tmp_path / "body.tar"
    with tarfile.open(body, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(b"hi\n"))
    target = tmp_path / "target"
    code, out, err = stored_then_restored(hpki, client, body, target, "--json")
    assert "Traceback" not in err and code in (0, 3), err
    assert (target / "big" / "f").read_bytes() == b"hi\n"


def test_a_hard_link_to_a_symbolic_link_is_restored(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """GNU tar stores hard-linked symbolic links (cp -al, rsnapshot trees) as
    a hard link to the link: the restore stopped there as "points through
    the symbolic link", and what followed was never restored. A hard link
    to a link is made without following it; one through a link stays refused."""
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_text("x\n")
    (tree / "s").symlink_to("f")
    os.link(tree / "s", tree / "s2", follow_symlinks=False)
    (tree / "z").write_text("after\n")
    body = tmp_path / "body.tar"
    subprocess.run(["tar", "-cf", str(body), "-C", str(tmp_path), "t"], check=True)
    client = hpki.client_ini("linker")
    target = tmp_path / "target"
    code, _, err = stored_then_restored(hpki, client, body, target)
    assert code == 0, err
    back = target / "t"
    assert os.readlink(back / "s2") == "f"
    assert (back / "s2").lstat().st_ino == (back / "s").lstat().st_ino
    assert (back / "z").read_text() == "after\n"


@pytest.mark.parametrize("mtime", ["1e20", "inf", "nan"])
def test_a_modification_time_that_cannot_be_set_is_named_and_the_rest_restored(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    mtime: str,
) -> None:
    """A PAX mtime of 1e20, inf or nan (stpd stores what tar can read):
    os.utime ended the restore in a traceback, the file being written
    removed and the rest not restored."""
    client = hpki.client_ini("timer")
    odd, after = tarfile.TarInfo("d/odd"), tarfile.TarInfo("d/after")
    odd.size = after.size = 3
    odd.pax_headers = {"mtime": mtime}
    body = tmp_path / "body.tar"
    with tarfile.open(body, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(odd, io.BytesIO(b"odd"))
        tar.addfile(after, io.BytesIO(b"aft"))
    target = tmp_path / "target"
    code, out, err = stored_then_restored(hpki, client, body, target, "--json")
    assert code == 3 and "Traceback" not in err, err
    [(path, why)] = [(u["path"], u["error"]) for u in json.loads(out)["unrestorable"]]
    assert path == "d/odd" and why.endswith("cannot be set, so it has the time of the restore")
    assert (target / "d" / "odd").read_bytes() == b"odd"
    assert (target / "d" / "after").read_bytes() == b"aft"


def test_a_hard_link_to_a_name_the_saveset_does_not_hold_is_not_made(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A saveset (a hostile server, a tar uploaded with curl) whose hard link
    names a file that is in the target already, not in the saveset: a root
    restore gave that file (etc/shadow) another name where others may read
    it. Only a file this restore made gets more names."""
    client = hpki.client_ini("linker")
    link = tarfile.TarInfo("tmp/x")
    link.type, link.linkname = tarfile.LNKTYPE, "etc/shadow"
    body = tmp_path / "body.tar"
    with tarfile.open(body, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(link)
    target = tmp_path / "target"
    (target / "etc").mkdir(parents=True)
    (target / "etc" / "shadow").write_text("root:secret\n")
    (target / "etc" / "shadow").chmod(0o600)
    # The file is older than the restore by less than the margin for the
    # file system's clock: here, by its ctime alone, it was not made by it.
    monkeypatch.setattr(sbc.extract, "CTIME_MARGIN_NS", 0)
    code, out, err = stored_then_restored(hpki, client, body, target, "--json")
    assert code == 3, err
    assert json.loads(out)["unrestorable"] == [
        {"path": "tmp/x", "error": "a hard link to etc/shadow, which was not made by this "
         "restore, or replaced since"}
    ]  # fmt: skip
    assert not (target / "tmp" / "x").exists()
    assert (target / "etc" / "shadow").stat().st_nlink == 1


@pytest.mark.parametrize(
    ("compress", "name"),
    [(gzip.compress, "gzip"), (bz2.compress, "bzip2"), (lzma.compress, "xz")],
)
@pytest.mark.parametrize("size", ["small", "large"])
def test_a_compressed_archive_is_refused_in_words(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    compress: Callable[[bytes], bytes],
    name: str,
    size: str,
) -> None:
    """`tar -czf - | curl -T -`: a small one was "cut off (at byte 138,
    inside a member)", a large one "not a tar header at byte 0"."""
    client = hpki.client_ini("zipper")
    body = tmp_path / "body"
    tar = small_tar() if size == "small" else small_tar() + os.urandom(100_000)
    body.write_bytes(compress(tar))
    with running_stpd(hpki.layout, 2) as stpd:
        status, answer = curl_put(stpd, client, body)
        assert status == 400, answer
        assert answer["error"].startswith(
            f"upload is not a valid tar stream: it is a {name}-compressed archive: send a plain "
            "(uncompressed) tar"
        ), answer
        assert stpd.daemon.store.all() == []


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE])
def test_an_oversized_extension_header_is_refused_at_upload(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    kind: bytes,
) -> None:
    """tarfile reads a GNU long name or a PAX global header whole when stpd
    lists the saveset (a 400 MiB one took it to 1.26 GB): refused, as an
    oversized PAX header is."""
    client = hpki.client_ini("longname")
    size = 2 * MAX_EXTENSION_HEADER
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = kind, size
    body = tmp_path / "body"
    body.write_bytes(header.tobuf(tarfile.GNU_FORMAT) + b"n" * size + small_tar())
    what = "GNU long name header" if kind == tarfile.GNUTYPE_LONGNAME else "PAX global header"
    with running_stpd(hpki.layout, 2) as stpd:
        status, answer = curl_put(stpd, client, body)
        assert status == 400, answer
        assert answer["error"] == (
            f"upload is not a valid tar stream: {what} of {size} bytes at byte 0 is too large; "
            "nothing stored"
        )
        stpd.log.wait_for(rf"upload from {PEER} \(CN=longname\) failed: .* too large")
        assert stpd.daemon.store.all() == []
        assert_no_partial(stpd.daemon.store.root)


def test_a_stored_saveset_with_an_oversized_extension_header_is_not_read_whole(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """One stored before uploads were checked for them: listing it, or a
    selective restore, says it cannot be read instead of taking its GNU
    long name into memory; and sbc refuses such a stream the same way."""
    client = hpki.client_ini("old")
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGNAME, 2 * MAX_EXTENSION_HEADER
    hostile = small_tar()[:1024] + header.tobuf(tarfile.GNU_FORMAT) + bytes(header.size + 1024)
    saveset = "SS-20240101T000000Z-0123abcd"
    with running_stpd(hpki.layout, 2) as stpd:
        root = stpd.daemon.store.root
        (root / f"{saveset}.tar").write_bytes(hostile)
        meta = dict(saveset=saveset, owner="CN=old", source="/old", bytes=len(hostile))
        meta |= dict(sha256="0" * 64, started="", finished="", peer="")
        (root / f"{saveset}.json").write_text(json.dumps(meta))
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            answer = request(sock, "GET", f"/savesets/{saveset}/entries")
        assert answer is not None and answer.status == 500, answer
        stpd.log.wait_for(
            rf"^ERROR saveset {saveset} cannot be read: GNU long name header of "
            rf"{header.size} bytes at byte 1024 is too large$"
        )
    with pytest.raises(ArchiveError, match=r"not a valid tar archive: GNU long name header of"):
        restore_bytes(hostile, tmp_path / "restored")


# -- names that try to leave the data directory ------------------------------------------

SOME_ID = "SS-20240101T000000Z-0123abcd"
HOSTILE_TARGETS = [
    ("GET", "/savesets/..%2F..%2Fetc%2Fpasswd", {400}),
    ("GET", "/savesets/../../etc/passwd", {400, 404}),
    ("GET", "/savesets/%2Fetc%2Fpasswd", {400}),
    ("GET", "/savesets/%2e%2e/meta", {400}),
    ("GET", f"/savesets/{SOME_ID}%00", {400}),
    ("GET", f"/savesets/{SOME_ID}%00.json", {400}),
    ("GET", f"/savesets/{SOME_ID}%0A", {400}),
    ("GET", f"/savesets/{SOME_ID}/..%2F..%2Fcanary", {404}),
    ("GET", "/savesets/" + "A" * 9000, {400, 431}),
    ("GET", "/" + "../" * 20 + "etc/passwd", {404}),
    ("PUT", "/savesets?source=%00", {400}),
    ("PUT", "/savesets?source=/a%00b", {400}),
    ("PUT", "/savesets?source=" + "x" * 5000, {400}),
    ("PUT", "/savesets?source=/a&source=/b", {400}),
    ("PUT", "/savesets?source=/a&path=../../x", {400}),
]


def test_hostile_names_and_query_values_are_refused(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("namer")
    other = hpki.client_ini("other")
    canary = b"CANARY-outside-the-data-dir"
    (tmp_path / "canary").write_bytes(canary)  # beside the data directory
    body = small_tar()
    with running_stpd(hpki.layout, 2) as stpd:
        beside = sorted(os.listdir(tmp_path))
        ctx = tls_context(hpki, client)
        for method, target, expected in HOSTILE_TARGETS:
            with tls_connect(stpd, ctx) as sock:
                answer = request(sock, method, target, body if method == "PUT" else b"")
                assert answer is not None, target
                assert answer.status in expected, (target, answer)
                assert canary not in answer.body and b"root:" not in answer.body
        # A source path with '..' is only a label: stored under the saveset's id.
        with tls_connect(stpd, ctx) as sock:
            answer = request(
                sock, "PUT", "/savesets?source=../../../../tmp/hostile-source-label", body
            )
            assert answer is not None and answer.status == 201, answer
            stored = answer.json()
        assert stored["source"] == "../../../../tmp/hostile-source-label"  # type: ignore[index]
        assert sorted(os.listdir(tmp_path)) == beside  # nothing written beside the data dir
        assert not Path("/tmp/hostile-source-label").exists()
        # Another client's saveset reads exactly like a missing one.
        with tls_connect(stpd, tls_context(hpki, other)) as sock:
            answer = request(sock, "GET", f"/savesets/{stored['saveset']}")  # type: ignore[index]
            assert answer is not None and answer.status == 404
        assert not stpd.log.matching(r"internal error")
        assert_serves(stpd, client, tmp_path)


# -- savesets that try to escape the restore target --------------------------------------


def _member(archive: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, **attrs) -> None:  # type: ignore[no-untyped-def]
    info = tarfile.TarInfo(name)
    info.type = kind
    content = attrs.pop("content", b"x\n" if kind == tarfile.REGTYPE else b"")
    for key, value in attrs.items():
        setattr(info, key, value)
    info.size = len(content)
    archive.addfile(info, io.BytesIO(content) if content else None)


def hostile_archive(kind: str, outside: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _member(archive, "before.txt")
        if kind == "absolute":
            _member(archive, str(outside / "absolute.txt"))
        elif kind == "dotdot":
            _member(archive, "../outside/dotdot.txt")
        elif kind == "dotdot-inside":  # lexically inside, still has '..'
            _member(archive, "sub/../../outside/dotdot.txt")
        elif kind == "symlink-then-file":
            _member(archive, "link", tarfile.SYMTYPE, linkname="../outside")
            _member(archive, "link/through.txt")
        elif kind == "absolute-symlink-then-file":
            _member(archive, "alink", tarfile.SYMTYPE, linkname=str(outside))
            _member(archive, "alink/through.txt")
        elif kind == "hardlink-out":
            _member(archive, "hard", tarfile.LNKTYPE, linkname="../outside/secret.txt")
        elif kind == "device":
            _member(archive, "null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        elif kind == "fifo":
            _member(archive, "pipe", tarfile.FIFOTYPE)
        elif kind == "symlink-chain-past-path-max":
            # CVE-2025-4517: realpath() gives up on a chain of links longer
            # than PATH_MAX and tarfile's data filter sees a path inside.
            comp, steps, path = "d" * 247, "abcdefghijklmnop", ""
            for step in steps:
                _member(archive, os.path.join(path, comp), tarfile.DIRTYPE)
                _member(archive, os.path.join(path, step), tarfile.SYMTYPE, linkname=comp)
                path = os.path.join(path, comp)
            chain = os.path.join(*steps, "l" * 254)
            _member(archive, chain, tarfile.SYMTYPE, linkname="../" * len(steps))
            _member(archive, "escape", tarfile.SYMTYPE, linkname=chain + "/../../outside")
            _member(archive, "escape/pwned.txt")
        elif kind == "file-over-symlink":
            _member(archive, "sub", tarfile.DIRTYPE)
            _member(archive, "inner", tarfile.SYMTYPE, linkname="sub")
            _member(archive, "inner", content=b"replaces the link or writes through it\n")
        else:
            raise ValueError(kind)
        _member(archive, "after.txt")
    return out.getvalue()


RESTORE_CASES = [
    "absolute",
    "dotdot",
    "dotdot-inside",
    "symlink-then-file",
    "absolute-symlink-then-file",
    "hardlink-out",
    "symlink-chain-past-path-max",
    "file-over-symlink",
]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("kind", RESTORE_CASES)
def test_restore_of_a_hostile_saveset_writes_nothing_outside(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    kind: str,
) -> None:
    client = hpki.client_ini("restorer")
    work = tmp_path / "work"  # TARGET_DIR and its neighbours live here
    outside, target = work / "outside", work / "target" / "sub"
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_text("secret\n")
    before = files_under(work)
    archive = tmp_path / f"{kind}.tar"
    archive.write_bytes(hostile_archive(kind, outside))
    with running_stpd(hpki.layout, 2) as stpd:
        status, meta = curl_put(stpd, client, archive)  # stpd checks only the tar structure
        assert status == 201, meta
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", meta["saveset"], str(target),
            "--server", stpd.address, "--quiet",
        )  # fmt: skip
        assert code == 1, (out, err)
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert re.match(r"sbc: error: refused an unsafe archive member: ", err), err
        assert_serves(stpd, client, tmp_path)
    # Nothing new beside the target, nothing changed outside it.
    after = [p for p in files_under(work) if not p.startswith("target")]
    assert after == [p for p in before if not p.startswith("target")], after
    assert (outside / "secret.txt").read_text() == "secret\n"
    assert (target / "before.txt").exists()  # restored up to the refused member
    assert not (target / "after.txt").exists()  # and not one member further


def test_special_files_fifo_restored_device_node_skipped_with_a_warning(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A device node is not restored (a backup client does not create them)
    but the rest is: one warning line, exit 0. A FIFO is restored."""
    client = hpki.client_ini("special")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        _member(archive, "before.txt")
        _member(archive, "null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        _member(archive, "pipe", tarfile.FIFOTYPE)
        _member(archive, "after.txt")
    archive_file = tmp_path / "special.tar"
    archive_file.write_bytes(out.getvalue())
    target = tmp_path / "target"
    with running_stpd(hpki.layout, 2) as stpd:
        status, meta = curl_put(stpd, client, archive_file)
        assert status == 201, meta
        code, out_text, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", meta["saveset"], str(target),
            "--server", stpd.address, "--quiet",
        )  # fmt: skip
    assert code == 0, err
    assert err == "sbc: warning: not restored: device node null\n"
    assert (target / "before.txt").exists() and (target / "after.txt").exists()
    assert stat.S_ISFIFO((target / "pipe").lstat().st_mode)
    assert not (target / "null").exists()


def test_links_of_a_tree_restore_as_they_were(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    """The checks refuse nothing our own archives hold: relative links with
    '..' that stay inside, hard links, dangling links, and links to absolute
    paths or out of the tree (as /etc has: localtime, alternatives), which
    are restored as they were, without anything written through them."""
    client = hpki.client_ini("linker")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "file").write_text("data\n")
    os.link(tree / "a" / "file", tree / "a" / "b" / "hard")
    (tree / "a" / "b" / "up").symlink_to("../file")
    (tree / "a" / "b" / "dir-link").symlink_to("..")
    (tree / "dangling").symlink_to("no/such/file")
    (tree / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    (tree / "outward").symlink_to("../../elsewhere")
    with running_stpd(hpki.layout, 2) as stpd:
        ini, opts = ["--ini-dir", str(client.ini_dir)], ["--server", stpd.address, "--quiet"]
        code, out, err = run_sbc(*ini, "backup", str(tree), "--json", *opts)
        assert code == 0, err
        saveset = json.loads(out)["saveset"]
        code, out, err = run_sbc(*ini, "restore", saveset, str(tmp_path / "back"), *opts)
        assert code == 0, err
    back = tmp_path / "back" / "tree"
    assert (back / "a" / "b" / "up").read_text() == "data\n"
    assert os.readlink(back / "a" / "b" / "dir-link") == ".."
    assert (back / "a" / "b" / "hard").stat().st_ino == (back / "a" / "file").stat().st_ino
    assert os.readlink(back / "dangling") == "no/such/file"
    assert os.readlink(back / "localtime") == "/usr/share/zoneinfo/UTC"
    assert os.readlink(back / "outward") == "../../elsewhere"


# -- a full disk on the server -------------------------------------------------------------


@contextmanager
def small_tmpfs(where: Path, size: str, *options: str) -> Iterator[Path]:
    where.mkdir()
    opts = ",".join([f"size={size}", *options])
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({opts}) here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_answers_storage_full_and_keeps_nothing(hpki: Pki, tmp_path: Path) -> None:  # noqa: F811
    client = hpki.client_ini("filler")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))
    with (
        small_tmpfs(tmp_path / "small", "2m") as data,
        running_stpd(hpki.layout, 2, data_dir=data) as stpd,
    ):
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "backup", str(big), "--server", stpd.address,
            "--quiet",
        )  # fmt: skip
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"sbc: error: backup of {big} failed on stpd at {stpd.address}: storage full" in err
        stpd.log.wait_for(rf"^ERROR upload from {PEER} \(CN=filler\) failed: storage full")
        assert stpd.daemon.store.all() == []
        assert_no_partial(data)
        assert_serves(stpd, client, tmp_path)  # the space came back with the clean-up
        storage = stpd.daemon.status()["storage"]  # what sbc status shows of it
        assert storage["total_bytes"] == 2 << 20 and 0 < storage["free_bytes"] < 2 << 20
        # A raw client sees a plain 507 with the reason.
        with tls_connect(stpd, tls_context(hpki, client)) as sock:
            head = partial_upload_head(4 * 1024 * 1024)
            sock.sendall(head + bytes(4 * 1024 * 1024) + b"\r\n0\r\n\r\n")
            answer = read_answer(sock)
        assert answer is not None and answer.status == 507, answer
        assert "storage full" in answer.json()["error"]  # type: ignore[index]
        assert_no_partial(data)


def run_stpd(*argv: str) -> tuple[int, str, str]:
    """``stpd`` in this process (its status command); (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = stpd.cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_a_data_directory_unmounted_under_stpd_is_not_made_again(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The data directory's file system unmounted while stpd runs (a disk
    pulled, a share gone): backups, listings and restores fail with the
    reason, instead of "no savesets" from the bare mount point beneath, and
    nothing is written there: it is on another file system (often the root
    one), which the backups would fill."""
    client = hpki.client_ini("orphan")
    source = tmp_path / "f.txt"
    source.write_text("data\n")
    ini = ["--ini-dir", str(client.ini_dir)]
    backup = [*ini, "backup", str(source), "--quiet"]
    with (
        small_tmpfs(tmp_path / "disk", "4m") as data,
        running_stpd(hpki.layout, 2, data_dir=data) as stpd,
    ):
        server = ["--server", stpd.address]
        code, out, err = run_sbc(*backup, *server, "--json")
        assert code == 0, err
        saveset = json.loads(out)["saveset"]
        subprocess.run(["umount", "-l", str(data)], check=True)
        gone = (
            "the data directory is gone (its file system unmounted?); stpd makes it again "
            "only when it starts"
        )
        for argv, what in [
            (backup, f"backup of {source} failed on"),
            ([*ini, "list"], "GET /savesets failed on"),
            ([*ini, "restore", saveset, str(tmp_path / "back")], f"restore of {saveset} failed on"),
        ]:
            code, out, err = run_sbc(*argv, *server)
            assert (code, out) == (1, ""), err
            assert err == f"sbc: error: {what} stpd at {stpd.address}: {gone}\n"
        stpd.log.wait_for(
            rf"^ERROR upload from {PEER} refused: {re.escape(gone)} "
            rf"\(data directory {re.escape(str(data))}\)$"
        )
        assert list(data.iterdir()) == []  # the mount point beneath
        assert not (tmp_path / "back").exists()
        status = stpd.daemon.status()
        assert status["storage"] is None  # not the space beneath
        assert status["data_directory"] == "missing"
        # stpd still serves, and its status says what is wrong, with exit status 1
        # (what a monitoring check looks at), from a client and on the server.
        lost = (
            f"stpd at {stpd.address} has lost its data directory (its file system unmounted?): "
            "backups, listings and restores fail until it is there again and stpd restarted\n"
        )
        code, out, err = run_sbc(*ini, "status", *server)
        assert (code, err) == (1, f"sbc: error: {lost}")
        assert out.startswith(f"stpd {__version__} at {stpd.address}: level 2, ")
        assert out.endswith(" days, data directory missing\n"), out
        hpki.ca.issue_client("CN:backup-server-admin")  # for `stpd status` on the server
        code, out, err = run_stpd(
            "--ini-dir", str(hpki.layout.ini_dir), "--listen", stpd.address, "status", "--json"
        )
        assert (code, err) == (1, f"stpd: error: {lost}")
        assert json.loads(out)["data_directory"] == "missing"


@pytest.mark.parametrize("failure", ["tar rename", "directory fsync", "data directory removed"])
def test_a_saveset_that_cannot_be_put_in_place_is_one_error_and_not_listed(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """The last steps of storing an upload fail (a disk's EIO, or the data
    directory removed under stpd): the client is told why in one line, stpd
    logs one ERROR and no traceback, and nothing of the saveset is listed."""
    client = hpki.client_ini("unlucky")
    source = tmp_path / "f.txt"
    source.write_text("data\n")
    data = tmp_path / "data"
    eio = OSError(errno.EIO, os.strerror(errno.EIO))
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == data and str(dst).endswith(".tar"):
            if failure == "tar rename":
                raise eio
            if failure == "data directory removed":
                shutil.rmtree(data)
        real_replace(src, dst)

    def fsync_dir(path: Path) -> None:
        raise eio

    monkeypatch.setattr(os, "replace", replace)
    if failure == "directory fsync":
        monkeypatch.setattr(stpd.store, "_fsync_dir", fsync_dir)
    why = (
        "the data directory is gone (its file system unmounted?); stpd makes it again only "
        "when it starts"
        if failure == "data directory removed"
        else "cannot store the saveset: Input/output error"
    )
    with running_stpd(hpki.layout, 2, data_dir=data) as stpd_:
        server = ["--ini-dir", str(client.ini_dir), "--server", stpd_.address]
        code, out, err = run_sbc(*server, "backup", str(source), "--quiet")
        assert (code, out) == (1, ""), err
        assert err == f"sbc: error: backup of {source} failed on stpd at {stpd_.address}: {why}\n"
        errors = stpd_.log.matching("^ERROR")
        assert len(errors) == 1, errors
        assert re.fullmatch(
            rf"ERROR upload from {PEER} \(CN=unlucky\) failed: {re.escape(why)} "
            rf"\(data directory {re.escape(str(data))}\)",
            errors[0],
        ), errors
        if failure != "data directory removed":
            code, out, err = run_sbc(*server, "list", "--json")
            assert (code, json.loads(out)) == (0, []), err
            assert_no_partial(data)


def test_a_saveset_cut_short_on_the_servers_disk_is_not_served_as_if_whole(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A stored tar shorter than recorded (a damaged disk, a copy cut short)
    was sent as if whole: restores ended early, and selective ones said the
    entries were not in the saveset. Restores and listings of it are refused
    with the reason and the command that checks it; stpd logs an ERROR."""
    client = hpki.client_ini("unlucky")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "first.bin").write_bytes(os.urandom(50_000))
    (tree / "last.bin").write_bytes(os.urandom(50_000))
    with running_stpd(hpki.layout, 2) as stpd_:
        server = ["--ini-dir", str(client.ini_dir), "--server", stpd_.address]
        code, out, err = run_sbc(*server, "backup", str(tree), "--json", "--quiet")
        assert code == 0, err
        saveset, recorded = json.loads(out)["saveset"], json.loads(out)["bytes"]
        stored = stpd_.daemon.store.tar_path(saveset)
        os.truncate(stored, recorded // 2)
        damaged = (
            f"the server's copy of saveset {saveset} is damaged: its stored data is "
            f"{recorded // 2} bytes, but was {recorded} bytes when stored; `sbc verify "
            f"{saveset}` checks it; restore from another saveset"
        )
        back = tmp_path / "back"
        for argv, what in [
            (["restore", saveset, str(back)], f"restore of {saveset}"),
            (["restore", saveset, str(back), "tree/last.bin"], f"restore of {saveset}"),
            (["list", saveset], f"listing of {saveset}"),
        ]:
            code, out, err = run_sbc(*server, *argv)
            assert (code, out) == (1, ""), err
            assert err == f"sbc: error: {what} failed on stpd at {stpd_.address}: {damaged}\n"
        assert not back.exists()
        errors = stpd_.log.matching("^ERROR")
        assert len(errors) == 3, errors
        for line, what in zip(
            errors, ["restore", "selective restore", "listing of its entries"], strict=True
        ):
            assert re.fullmatch(
                rf"ERROR saveset {saveset} is damaged: {recorded // 2} bytes, recorded "
                rf"{recorded} bytes; {what} for {PEER} \(CN=unlucky\) refused",
                line,
            ), errors
        assert not stpd_.log.matching(r"^INFO sent saveset")
        code, _, err = run_sbc(*server, "verify", saveset)  # what the message points to
        assert code == 1 and err.startswith(f"sbc: error: saveset {saveset} is damaged: "), err


def test_a_data_directory_that_stpd_creates_is_warned_about(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A data directory missing at start may be an unmounted file system:
    stpd makes it (on the file system beneath), and says so, since clients
    would otherwise just see no savesets. One that is there is not."""
    data = tmp_path / "mnt" / "data"
    created = (
        f"WARNING data directory {data} did not exist: created it, empty; if savesets should "
        "be there (its file system not mounted?), stop stpd, mount it and start stpd again"
    )
    with running_stpd(hpki.layout, 2, data_dir=data) as stpd_:
        assert stpd_.log.matching("^WARNING") == [created]
    assert data.is_dir() and stat.S_IMODE(data.stat().st_mode) == 0o700
    with running_stpd(hpki.layout, 2, data_dir=data) as stpd_:
        assert stpd_.log.matching("^WARNING") == []


def test_a_data_directory_running_out_of_space_is_warned_about_once_an_hour(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Below 10 % free, stpd warns at start and after a stored saveset,
    before uploads are refused, but not again within the hour."""
    client = hpki.client_ini("filler")
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(100 * 1024))
    with small_tmpfs(tmp_path / "data", "4m") as data:
        with running_stpd(hpki.layout, 2, data_dir=data) as stpd:
            assert_serves(stpd, client, tmp_path)  # plenty of room: no warning
            assert not [line for line in stpd.log.lines if " free (" in line]
        (data / "someone-elses.bin").write_bytes(bytes(3800 * 1024))
        with running_stpd(hpki.layout, 2, data_dir=data) as stpd:
            # In the unit that suits a 4 MiB file system (it read "0.0 of 0.0 GB").
            warning = rf"^WARNING data directory {re.escape(str(data))}: 0\.\d of 4\.2 MB free "
            stpd.log.wait_for(warning + r"\(\d %\); uploads are refused once it is full: free "
                              r"space there \(stpd list, stpd delete\), or set "
                              r"STPD_RETENTION_DAYS$")  # fmt: skip
            code, out, err = run_sbc(
                "--ini-dir", str(client.ini_dir), "backup", str(small), "--server",
                stpd.address, "--quiet",
            )  # fmt: skip
            assert code == 0, err  # stpd looked at the space before it answered
            assert len([line for line in stpd.log.lines if re.search(warning, line)]) == 1
            stpd.daemon._low_space_warning.last = None  # as if the hour had passed
            assert_serves(stpd, client, tmp_path)
            assert len([line for line in stpd.log.lines if re.search(warning, line)]) == 2


def test_client_disk_full_during_a_restore_stops_with_one_line_and_no_partial_file(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    client = hpki.client_ini("restorer")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("first\n")
    (tree / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    (tree / "z").write_text("last\n")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(hpki.layout, 2) as stpd, small_tmpfs(tmp_path / "small", "1m") as small:
        code, out, err = run_sbc(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        assert code == 0, err
        saveset = json.loads(out)["saveset"]
        code, out, err = run_sbc(*ini, "restore", saveset, str(small), "--server", stpd.address)
        assert code == 1 and out == ""
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert (
            f"sbc: error: cannot restore into {small}: No space left on device (tree/big); the "
            "restore stopped there, and the incomplete tree/big was removed" in err
        ), err
        assert (small / "tree" / "a").read_text() == "first\n"
        assert not (small / "tree" / "big").exists()  # a partial file would pass for the whole
        assert not (small / "tree" / "z").exists()
        # Space freed, the same restore again: what is there is kept, the rest comes.
        subprocess.run(["mount", "-o", "remount,size=8m", str(small)], check=True)
        code, out, err = run_sbc(
            *ini, "restore", saveset, str(small), "--server", stpd.address, "--json"
        )
        assert code == 0, err
        assert json.loads(out)["kept"] == ["tree/a"]
        for name in ("a", "big", "z"):
            assert (small / "tree" / name).read_bytes() == (tree / name).read_bytes()


# -- stpd killed during an upload ----------------------------------------------------------


def stpd_list(pki: Pki, data: Path) -> str:
    """What `stpd list` prints (nothing on stderr)."""
    listing = subprocess.run(
        [str(VENV_BIN / "stpd"), "--ini-dir", str(pki.layout.ini_dir), "--data-dir", str(data),
         "list"],
        capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert (listing.returncode, listing.stderr) == (0, ""), listing.stderr
    return listing.stdout


@pytest.mark.parametrize("uploader", ["raw", "sbc"])
def test_stpd_killed_during_an_upload_cleans_up_at_restart(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
    uploader: str,
) -> None:
    client = hpki.client_ini("survivor")
    data = tmp_path / "data"
    assert not hpki.layout.ca_key.exists()  # the daemon runs without the CA key
    first = StpdProcess(hpki.layout.ini_dir, data)
    try:
        if uploader == "raw":
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            raw.settimeout(DEADLINE)
            raw.connect(("127.0.0.1", first.port))
            sock = tls_context(hpki, client).wrap_socket(raw, server_hostname="127.0.0.1")
            # More than the kernel can buffer between us (tcp_rmem's maximum):
            # once it is sent, stpd has read past the head and created its .part.
            rmem_max = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
            sock.sendall(partial_upload_head())
            zeros = bytes(1024 * 1024)
            for _ in range(rmem_max // len(zeros) + 8):
                sock.sendall(zeros)
            first.process.send_signal(signal.SIGKILL)
            assert first.process.wait(DEADLINE) == -signal.SIGKILL
            sock.close()
        else:  # sbc streams 2 GiB of zeros; stpd dies once its .part exists
            zeros = long_upload(tmp_path)
            with created_in(data / ".incoming") as next_created:
                sbc = subprocess.Popen(
                    [str(VENV_BIN / "sbc"), "--ini-dir", str(client.ini_dir), "backup",
                     str(zeros), "--server", f"127.0.0.1:{first.port}", "--quiet"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                try:
                    assert next_created().endswith(".tar.part")
                    running = stpd_list(hpki, data).splitlines()[-1]  # the upload in progress
                    assert re.fullmatch(
                        r"1 file\(s\), \d+ bytes in .*\.incoming: uploads .*", running
                    )
                    first.process.send_signal(signal.SIGKILL)
                    assert first.process.wait(DEADLINE) == -signal.SIGKILL
                    out, err = sbc.communicate(timeout=DEADLINE)
                finally:
                    sbc.kill()
            assert sbc.returncode == 1 and out == "", (out, err)
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert re.match(
                r"sbc: error: connection to stpd at 127\.0\.0\.1:\d+ lost during the backup "
                r"after [\d.]+ MB \(.*\): stpd stopped or the network failed; stpd keeps "
                r"nothing of an interrupted backup, run it again$",
                err,
            ), err
        parts = list((data / ".incoming").iterdir())
        assert len(parts) == 1 and parts[0].name.endswith(".tar.part"), parts
    finally:
        first.stop()
    # `stpd list` names what the upload left: it takes room, and is no saveset.
    left = f"1 file(s), {parts[0].stat().st_size} bytes in {data / '.incoming'}: uploads in "
    left += "progress, or leftovers of interrupted ones, which stpd clears up when it starts"
    assert stpd_list(hpki, data).splitlines()[-2:] == [f"0 saveset(s), 0 bytes, in {data}", left]
    # A crash between the rename and the metadata leaves a tar without
    # metadata: whole, so it is kept and reported, never removed by itself.
    orphan = data / "SS-20240101T000000Z-0badf00d.tar"
    orphan.write_bytes(small_tar())
    second = StpdProcess(hpki.layout.ini_dir, data)
    try:
        second.wait_for(
            rf"WARNING stpd: removed leftover of an interrupted upload: .*{parts[0].name}$"
        )
        second.wait_for(rf"WARNING stpd: {re.escape(str(orphan))} has no metadata ")
        assert not second.matching(rf"removed leftover .*{orphan.name}")
        assert orphan.read_bytes() == small_tar()
        orphan.unlink()
        assert_no_partial(data)
        assert stpd_list(hpki, data) == f"0 saveset(s), 0 bytes, in {data}\n"
        address = f"127.0.0.1:{second.port}"
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "list", "--server", address, "--json"
        )
        assert code == 0 and json.loads(out) == [], err
        source = tmp_path / "after-crash.txt"
        source.write_text("after the crash\n")
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "backup", str(source), "--server", address, "--quiet"
        )
        assert code == 0, err
    finally:
        second.stop()
    assert second.process.returncode == 0


def test_a_publish_cut_short_by_a_crash_is_finished_at_restart(
    hpki: Pki,  # noqa: F811
    tmp_path: Path,
) -> None:
    """stpd killed between the two renames of a publish (its tar in place,
    its metadata still in .incoming): the next start puts the metadata in
    place, and the saveset is listed and restored. It removed the metadata
    as a leftover, and the saveset was never served again."""
    client = hpki.client_ini("survivor")
    data = tmp_path / "data"
    source = tmp_path / "src"
    source.mkdir()
    (source / "kept.txt").write_text("stored before the crash\n")
    first = StpdProcess(hpki.layout.ini_dir, data)
    try:
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "backup", str(source),
            "--server", f"127.0.0.1:{first.port}", "--json",
        )  # fmt: skip
        assert code == 0, err
    finally:
        first.stop()
    saveset = json.loads(out)["saveset"]
    os.replace(data / f"{saveset}.json", data / ".incoming" / f"{saveset}.json.part")
    second = StpdProcess(hpki.layout.ini_dir, data)
    try:
        second.wait_for(rf"WARNING stpd: finished storing saveset {saveset}: a crash had cut it ")
        address = f"127.0.0.1:{second.port}"
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "list", "--server", address, "--json"
        )
        assert code == 0 and [s["saveset"] for s in json.loads(out)] == [saveset], err
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", saveset, str(tmp_path / "back"),
            "--server", address, "--quiet",
        )  # fmt: skip
        assert code == 0, err
        assert (tmp_path / "back" / "src" / "kept.txt").read_text() == "stored before the crash\n"
    finally:
        second.stop()


# -- sbc killed during a restore: its temporary files --------------------------------------

TEMPORARY = re.compile(r"\.sbc-restore-[0-9a-f]{12}")


@contextmanager
def first_restore_held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """stpd sends the first restore's first batch (1 MiB), then waits for
    the event yielded; other restores, and sends once it is set, go on."""
    real = stpd.server.send_batch
    release = threading.Event()
    first: list[int] = []

    def held(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not first:
            first.append(threading.get_ident())
        elif first == [threading.get_ident()]:
            release.wait(DEADLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(stpd.server, "send_batch", held)
    try:
        yield release
    finally:
        release.set()


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TEMPORARY.fullmatch(p.name))


@contextmanager
def restore_writing(
    client: Layout, saveset: str, back: Path, address: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``sbc restore --overwrite`` in a process of its own, once it has made
    its temporary file for tree/big: (the process, that file's name)."""
    with created_in(back / "tree") as next_created:
        process = subprocess.Popen(
            [str(VENV_BIN / "sbc"), "--ini-dir", str(client.ini_dir), "restore", saveset,
             str(back), "--overwrite", "--server", address, "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            name = next_created()
            assert TEMPORARY.fullmatch(name), name
            yield process, name
        finally:
            process.kill()
            process.wait(DEADLINE)


@pytest.fixture
def big_tree(hpki: Pki, tmp_path: Path) -> tuple[Layout, Path, Path]:  # noqa: F811
    """(a client, tree/big of 8 MiB, a target holding the tree restored once)"""
    client = hpki.client_ini("restorer")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "big").write_bytes(os.urandom(8 << 20))  # more than a batch
    back = tmp_path / "back"
    (back / "tree").mkdir(parents=True)
    (back / "tree" / "big").write_text("older\n")
    return client, tmp_path / "tree", back


def backed_up(client: Layout, source: Path, server: str) -> str:
    """The saveset of an `sbc backup` of ``source`` that succeeded."""
    code, out, err = run_sbc(
        "--ini-dir", str(client.ini_dir), "backup", str(source), "--server", server, "--json"
    )
    assert code == 0, err
    return str(json.loads(out)["saveset"])


def test_a_restore_killed_mid_file_leaves_a_temporary_that_the_next_one_removes(
    hpki: Pki,  # noqa: F811
    big_tree: tuple[Layout, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sbc killed outright (SIGKILL) while writing the replacement of a file
    (--overwrite) leaves it, `.sbc-restore-...`: up to a whole copy. The
    next restore into that directory removes it, and says so. What is not
    certainly a stale temporary of this user is left: one a restore holds
    (flock), one of another owner, a symbolic link (named), and names that
    are not exactly sbc's (not named)."""
    client, tree, back = big_tree
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(hpki.layout, 2) as server:
        saveset = backed_up(client, tree, server.address)
        with (
            first_restore_held(monkeypatch),
            restore_writing(client, saveset, back, server.address) as (process, stale),
        ):
            process.send_signal(signal.SIGKILL)
            assert process.wait(DEADLINE) == -signal.SIGKILL
        assert temporaries(back / "tree") == [stale]
        planted = back / "tree"
        held = os.open(planted / ".sbc-restore-00000000000a", os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(held, fcntl.LOCK_EX)
        (planted / ".sbc-restore-00000000000b").write_text("someone else's\n")
        os.chown(planted / ".sbc-restore-00000000000b", 65534, 65534)
        (planted / ".sbc-restore-00000000000c").symlink_to("big")
        for name in (".sbc-restore-00000000000d.keep", ".sbc-restore-0000000000", ".sbc-restore"):
            (planted / name).write_text("not sbc's\n")
        before = sorted(p.name for p in planted.iterdir())

        restore = [*ini, "restore", saveset, str(back), "--overwrite", "--server", server.address]
        code, out, err = run_sbc(*restore)
        assert code == 0, err
        assert err == (
            "sbc: warning: removed 1 temporary file that an earlier sbc restore left when it was "
            f"killed: tree/{stale}\n"
            "sbc: warning: left 2 paths named like sbc's temporary files that may not be stale "
            "ones of this user: tree/.sbc-restore-00000000000b, tree/.sbc-restore-00000000000c "
            "(another owner, another name of a file, not a plain file, or unreadable; remove "
            "them by hand once no sbc restore into this target is running)\n"
        )
        assert sorted(p.name for p in planted.iterdir()) == sorted(set(before) - {stale})
        os.close(held)
        (planted / ".sbc-restore-0123456789ab").write_text("as a killed restore leaves it\n")
        code, out, err = run_sbc(*restore, "--json")
        assert code == 0, err
    answer = json.loads(out)
    assert answer["stale_removed"] == [
        "tree/.sbc-restore-00000000000a",
        "tree/.sbc-restore-0123456789ab",
    ]
    assert answer["stale_left"] == [
        "tree/.sbc-restore-00000000000b",
        "tree/.sbc-restore-00000000000c",
    ]
    assert (back / "tree" / "big").read_bytes() == (tree / "big").read_bytes()


def test_a_restore_leaves_the_temporary_of_one_running_at_the_same_time(
    hpki: Pki,  # noqa: F811
    big_tree: tuple[Layout, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two restores into one target: the second must not take the first's
    temporary for a stale one (the first holds it locked until it is renamed
    into place), and both end well."""
    client, tree, back = big_tree
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(hpki.layout, 2) as server:
        saveset = backed_up(client, tree, server.address)
        with (
            first_restore_held(monkeypatch) as release,
            restore_writing(client, saveset, back, server.address) as (first, writing),
        ):
            code, out, err = run_sbc(
                *ini, "restore", saveset, str(back), "--overwrite", "--server", server.address,
                "--json",
            )  # fmt: skip
            assert code == 0, err
            assert json.loads(out)["stale_removed"] == []
            assert writing in temporaries(back / "tree")
            release.set()
            assert first.wait(DEADLINE) == 0
    assert temporaries(back / "tree") == []
    assert (back / "tree" / "big").read_bytes() == (tree / "big").read_bytes()


@pytest.mark.parametrize("when", ["before its lock", "before its rename"])
def test_a_sweep_at_any_moment_of_a_restore_leaves_it_whole(
    hpki: Pki,  # noqa: F811
    big_tree: tuple[Layout, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    when: str,
) -> None:
    """Another restore's sweep of the directory, between the open of the
    writer's temporary and its lock (it may remove it: the writer sees that
    once it holds the lock, and makes another, rather than fill a file no
    name leads to), or once the file is whole, before it is renamed into
    place (still locked: left alone)."""
    client, tree, back = big_tree
    ini = ["--ini-dir", str(client.ini_dir)]
    swept: list[bool | None] = []

    def sweep() -> None:
        if swept:
            return
        directory = os.open(back / "tree", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in temporaries(back / "tree"):
                swept.append(sbc.extract._remove_if_stale(name, directory))
        finally:
            os.close(directory)

    if when == "before its lock":
        real_flock = fcntl.flock

        def swept_first(fd: int, operation: int) -> None:
            if operation == fcntl.LOCK_EX:  # the writer's, not the sweep's (LOCK_NB)
                sweep()
            real_flock(fd, operation)

        monkeypatch.setattr(fcntl, "flock", swept_first)
    else:
        real_rename = sbc.extract._rename_over

        def swept_then_renamed(made: str, name: str, parent: int) -> None:
            sweep()
            real_rename(made, name, parent)

        monkeypatch.setattr(sbc.extract, "_rename_over", swept_then_renamed)
    with running_stpd(hpki.layout, 2) as server:
        code, out, err = run_sbc(*ini, "backup", str(tree), "--server", server.address, "--json")
        assert code == 0, err
        code, out, err = run_sbc(
            *ini, "restore", json.loads(out)["saveset"], str(back), "--overwrite",
            "--server", server.address,
        )  # fmt: skip
        assert code == 0, err
    assert swept == [True if when == "before its lock" else None]
    assert temporaries(back / "tree") == []
    assert (back / "tree" / "big").read_bytes() == (tree / "big").read_bytes()
