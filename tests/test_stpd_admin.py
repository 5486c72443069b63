"""``stpd list`` and ``stpd delete``: the administrator's view of the data
directory, every client's savesets, beside a running stpd that clients
back up to and restore from over TLS."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pki.layout import Layout
from tests.conftest import Pki, StpdProcess, make_pki, run_sbc, write_stpd_ini

BIN = Path(sys.executable).parent


def stpd_command(pki: Pki, data: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "stpd"), "--ini-dir", str(pki.layout.ini_dir), "--data-dir", str(data), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def backup(client: Layout, server: StpdProcess, source: Path) -> str:
    code, out, err = run_sbc(
        "--ini-dir", str(client.ini_dir), "backup", str(source), "--json", "--quiet",
        "--server", f"127.0.0.1:{server.port}",
    )  # fmt: skip
    assert code == 0, err
    return str(json.loads(out)["saveset"])


def listed_by(client: Layout, server: StpdProcess) -> list[str]:
    code, out, err = run_sbc(
        "--ini-dir", str(client.ini_dir), "list", "--json", "--server", f"127.0.0.1:{server.port}"
    )
    assert code == 0, err
    return [item["saveset"] for item in json.loads(out)]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = make_pki(tmp_path)
    write_stpd_ini(pki.layout.ini_dir)
    return pki


def test_list_and_delete_every_clients_savesets_beside_a_running_stpd(
    pki: Pki, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    alice, bob = pki.client_ini("alice"), pki.client_ini("bob")
    source = tmp_path / "notes.txt"
    source.write_text("notes\n")
    server = StpdProcess(pki.layout.ini_dir, data)
    try:
        kept, doomed = backup(alice, server, source), backup(alice, server, source)
        bobs = backup(bob, server, source)

        listing = stpd_command(pki, data, "list")
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert [line.split()[0] for line in lines[:-1]] == sorted([kept, doomed, bobs])
        assert re.fullmatch(
            rf"{bobs}  \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ +10240  CN=bob  {re.escape(str(source))}",
            next(line for line in lines if line.startswith(bobs)),
        )
        assert lines[-1] == f"3 saveset(s), 30720 bytes, in {data}"
        as_json = json.loads(stpd_command(pki, data, "list", "--json").stdout)
        assert {item["saveset"]: item["owner"] for item in as_json} == {
            kept: "CN=alice",
            doomed: "CN=alice",
            bobs: "CN=bob",
        }

        # A typo among the ids: nothing is deleted.
        typo = doomed[:-1] + ("0" if doomed[-1] != "0" else "1")
        refused = stpd_command(pki, data, "delete", doomed, typo)
        assert refused.returncode == 2
        listing = f"stpd --ini-dir {pki.layout.ini_dir} --data-dir {data} list"
        assert refused.stderr == (
            f"stpd: error: no saveset {typo} in {data} (`{listing}` shows what is there); "
            "nothing was deleted\n"
        )
        assert (data / f"{doomed}.tar").exists()
        pasted = subprocess.run(
            [str(BIN / "stpd"), *shlex.split(listing)[1:]], capture_output=True, text=True
        )
        assert pasted.returncode == 0 and doomed in pasted.stdout, pasted.stderr

        deleted = stpd_command(pki, data, "delete", doomed)
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout == (
            f"deleted saveset {doomed} of CN=alice: 10240 bytes of {source}, stored "
            f"{next(item['created'] for item in as_json if item['saveset'] == doomed)}\n"
        )
        assert not (data / f"{doomed}.tar").exists()
        assert not (data / f"{doomed}.json").exists()

        # The running stpd serves what is left, and not the deleted one.
        assert listed_by(alice, server) == [kept]
        assert listed_by(bob, server) == [bobs]
        code, _, err = run_sbc(
            "--ini-dir", str(alice.ini_dir), "restore", doomed, str(tmp_path / "back"),
            "--server", f"127.0.0.1:{server.port}",
        )  # fmt: skip
        assert code == 1 and f"no saveset {doomed} for this client" in err, err
        code, _, err = run_sbc(
            "--ini-dir", str(alice.ini_dir), "restore", kept, str(tmp_path / "back"),
            "--server", f"127.0.0.1:{server.port}",
        )  # fmt: skip
        assert code == 0, err
        assert (tmp_path / "back" / "notes.txt").read_text() == "notes\n"
    finally:
        server.stop()


def test_list_writes_an_owner_the_locale_cannot_show_escaped(pki: Pki, tmp_path: Path) -> None:
    """`stpd list` under a latin-1 locale (its encoding, here as
    PYTHONIOENCODING sets it) ended with a UnicodeEncodeError traceback at
    a client CN=Łódź: what latin-1 lacks is written \\u0141."""
    data = tmp_path / "data"
    source = tmp_path / "notes.txt"
    source.write_text("notes\n")
    server = StpdProcess(pki.layout.ini_dir, data)
    try:
        saveset = backup(pki.client_ini("Łódź"), server, source)
    finally:
        server.stop()
    listing = subprocess.run(
        [str(BIN / "stpd"), "--ini-dir", str(pki.layout.ini_dir), "--data-dir", str(data), "list"],
        env={**os.environ, "PYTHONIOENCODING": "latin-1"},
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert (listing.returncode, listing.stderr) == (0, b"")
    first = listing.stdout.decode("latin-1").splitlines()[0]
    assert first.startswith(saveset) and " CN=\\u0141ód\\u017a " in first, first


def test_options_between_delete_and_its_savesets(pki: Pki, tmp_path: Path) -> None:
    """`stpd delete --data-dir D ID` and `stpd delete --json ID` failed with
    "unrecognized arguments: ID": the options may come anywhere."""
    data = tmp_path / "data"
    source = tmp_path / "notes.txt"
    source.write_text("notes\n")
    alice = pki.client_ini("alice")
    server = StpdProcess(pki.layout.ini_dir, data)
    try:
        first, second = backup(alice, server, source), backup(alice, server, source)
    finally:
        server.stop()
    stpd = [str(BIN / "stpd"), "--ini-dir", str(pki.layout.ini_dir)]
    for argv in (
        ["delete", "--data-dir", str(data), first],
        ["--data-dir", str(data), "delete", "--json", second],
    ):
        deleted = subprocess.run(
            [*stpd, *argv], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout.startswith(f"deleted saveset {argv[-1]} of CN=alice: ")
    assert sorted(path.name for path in data.glob("SS-*")) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["delete"], "stpd: error: delete: name the savesets to delete (`stpd --ini-dir "),
        (["delete", "../etc/passwd"], "stpd: error: no saveset ../etc/passwd in "),
        (["list", "SS-20260101T000000Z-00000000"], "stpd: error: unexpected arguments for list"),
    ],
)
def test_operator_mistakes_are_one_line(
    pki: Pki, tmp_path: Path, argv: list[str], message: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    result = stpd_command(pki, data, *argv)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_list_of_an_empty_or_missing_data_directory(pki: Pki, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    empty = stpd_command(pki, data, "list")
    assert (empty.returncode, empty.stdout) == (0, f"0 saveset(s), 0 bytes, in {data}\n")
    assert json.loads(stpd_command(pki, data, "list", "--json").stdout) == []

    for argv in (["list"], ["delete", "SS-20260101T000000Z-00000000"]):
        missing = stpd_command(pki, tmp_path / "nowhere", *argv)
        assert missing.returncode == 2
        assert missing.stderr == (
            f"stpd: error: no data directory {tmp_path / 'nowhere'}: check STPD_DATA_DIR in "
            f"{pki.layout.stpd_ini} (or --data-dir), and that its file system is mounted; stpd "
            "makes it when it starts\n"
        )
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"]])
def test_a_listing_into_a_closed_pipe_ends_quietly(
    pki: Pki, tmp_path: Path, argv: list[str]
) -> None:
    """``stpd list | head -1`` said "error: Broken pipe (listen address)"
    and exited 2; it ends as a process ended by SIGPIPE, silently."""
    data = tmp_path / "data"
    data.mkdir()
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first line
    try:
        listing = subprocess.run(
            [
                str(BIN / "stpd"),
                "--ini-dir",
                str(pki.layout.ini_dir),
                "--data-dir",
                str(data),
                *argv,
            ],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(writer)
    assert (listing.returncode, listing.stderr) == (128 + signal.SIGPIPE, "")


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"]])
def test_a_listing_that_cannot_be_written_says_so(
    pki: Pki, tmp_path: Path, argv: list[str]
) -> None:
    """`stpd list > /dev/full` said only "error: No space left on device"."""
    data = tmp_path / "data"
    data.mkdir()
    with open("/dev/full", "w") as full:
        listing = subprocess.run(
            [str(BIN / "stpd"), "--ini-dir", str(pki.layout.ini_dir), "--data-dir", str(data)]
            + argv,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    assert (listing.returncode, listing.stderr) == (
        2,
        "stpd: error: cannot write the output: No space left on device\n",
    )


def test_broken_savesets_are_reported_kept_at_start_and_deleted_by_id(
    pki: Pki, tmp_path: Path
) -> None:
    """Metadata that cannot be read hides its saveset, a tar without
    metadata (a crash in the middle of a removal) is never served, and
    metadata whose tar is gone is listed but cannot be restored: `stpd
    list` and stpd's start both name each with what to do, stpd removes
    none of them by itself, and `stpd delete ID` removes what is left."""
    data = tmp_path / "data"
    client = pki.client_ini("alice")
    source = tmp_path / "notes.txt"
    source.write_text("notes\n")
    server = StpdProcess(pki.layout.ini_dir, data)
    try:
        good, broken, orphan, lost = (backup(client, server, source) for _ in range(4))
    finally:
        server.stop()
    (data / f"{broken}.json").write_text("{not json")
    (data / f"{orphan}.json").unlink()
    (data / f"{lost}.tar").unlink()
    files = sorted(p.name for p in data.iterdir())
    warnings = [
        f"{data / broken}.json cannot be read as saveset metadata, so that saveset is neither "
        f"listed nor served: repair the file, or `stpd delete {broken}` removes it and its .tar",
        f"{data / orphan}.tar has no metadata (a removal or an upload cut short by a crash?), "
        "so it is neither listed nor served: it is a whole tar archive (`tar -tvf` reads it); "
        f"keep a copy elsewhere if it is needed, and `stpd delete {orphan}` removes it",
        f"saveset {lost} of CN=alice has lost its data ({lost}.tar is not there): it is listed, "
        f"but cannot be restored; put the .tar back from a copy, or `stpd delete {lost}` "
        "removes its metadata",
    ]

    listing = stpd_command(pki, data, "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == sorted([good, lost])
    assert lines[-1] == f"2 saveset(s), 10240 bytes, in {data}; 1 of them without data"
    assert listing.stderr.splitlines() == [f"stpd: warning: {w}" for w in warnings]

    server = StpdProcess(pki.layout.ini_dir, data)
    try:
        for warning in warnings:
            server.wait_for(f"^.* WARNING stpd: {re.escape(warning)}$")
        assert sorted(p.name for p in data.iterdir()) == files  # nothing removed
        assert sorted(listed_by(client, server)) == sorted([good, lost])
    finally:
        server.stop()

    deleted = stpd_command(pki, data, "delete", broken, orphan, lost)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.splitlines() == [
        f"deleted saveset {broken}, which had no readable metadata: {broken}.json and {broken}.tar",
        f"deleted saveset {orphan}, which had no readable metadata: {orphan}.tar",
        f"deleted saveset {lost} of CN=alice: 10240 bytes of {source}, stored "
        f"{next(line for line in lines if line.startswith(lost)).split()[1]} (its data was gone "
        "already)",
    ]
    assert sorted(p.name for p in data.iterdir()) == [".incoming", f"{good}.json", f"{good}.tar"]
    again = stpd_command(pki, data, "list")
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout.splitlines()[-1] == f"1 saveset(s), 10240 bytes, in {data}"


@pytest.mark.parametrize("what", ["a directory in .incoming", ".incoming a file"])
def test_what_is_in_the_way_of_the_start_is_named_with_the_fix(
    pki: Pki, tmp_path: Path, what: str
) -> None:
    """stpd removes the leftovers of its uploads from .incoming at start; a
    directory there (or a file where .incoming should be) is not its own, so
    it is left alone, and the error says what is in the way and what to do,
    instead of advice to choose another data directory."""
    data = tmp_path / "data"
    if what == ".incoming a file":
        data.mkdir()
        junk, kind = data / ".incoming", "a file"
        junk.write_text("notes\n")
        where = "where stpd keeps its uploads in progress, in a directory"
    else:
        junk, kind = data / ".incoming" / "junkdir", "a directory"
        junk.mkdir(parents=True)
        (junk.parent / "SS-20260101T000000Z-00000000.tar.part").write_bytes(b"left over")
        where = (
            f"where stpd keeps only its uploads in progress ({data / '.incoming'}), and removes "
            "what is left of them at start"
        )
    result = stpd_command(pki, data, "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"stpd: error: {junk} is in the way: {kind}, {where}; remove it or move it elsewhere"
    )
    assert junk.exists()


def test_directories_named_like_saveset_files_are_named_and_not_deleted(
    pki: Pki, tmp_path: Path
) -> None:
    """A directory called SS-....tar (or .json) is no saveset: `stpd list`
    and stpd's start name it as in the way instead of calling it a whole tar
    archive or metadata to repair, and `stpd delete` does not remove it. A
    FIFO so named is not read (which would wait for ever)."""
    data = tmp_path / "data"
    tar_dir = data / "SS-20260101T000000Z-0000000a.tar"
    json_dir = data / "SS-20260101T000000Z-0000000b.json"
    fifo = data / "SS-20260101T000000Z-0000000c.json"
    for path in (tar_dir, json_dir):
        (path / "inside").mkdir(parents=True)
    os.mkfifo(fifo)
    warnings = [
        f"{path} is in the way: {kind}, named like a file of a saveset, which stpd neither "
        "lists nor serves; remove it or move it elsewhere"
        for path, kind in (
            (tar_dir, "a directory"),
            (json_dir, "a directory"),
            (fifo, "a special file"),
        )
    ]
    listing = stpd_command(pki, data, "list")
    assert (listing.returncode, listing.stdout) == (0, f"0 saveset(s), 0 bytes, in {data}\n")
    assert listing.stderr.splitlines() == [f"stpd: warning: {w}" for w in warnings]

    deleted = stpd_command(pki, data, "delete", "SS-20260101T000000Z-0000000a")
    assert (deleted.returncode, deleted.stdout) == (2, "")
    assert deleted.stderr == f"stpd: error: {warnings[0]}; nothing was deleted\n"
    assert (tar_dir / "inside").is_dir()

    server = StpdProcess(pki.layout.ini_dir, data)
    try:
        for warning in warnings:
            server.wait_for(f"^.* WARNING stpd: {re.escape(warning)}$")
    finally:
        server.stop()
    assert (tar_dir / "inside").is_dir() and (json_dir / "inside").is_dir()
