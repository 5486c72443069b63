"""Backup, list and restore over real TLS on loopback, with sbc and curl."""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

import sbc.archive as archive
import stpd.server as stpd_server
import stpd.store as stpd_store
from pki.layout import Layout
from sbc.cli import main as sbc
from stpd.tarcheck import STILL_LOOKING
from tests.conftest import (
    CAPABILITY,
    WAIT_SECONDS,
    Pki,
    RunningStpd,
    mounted,
    plain_files_the_python_way,
    run_sbc,
    running_stpd,
    swapped_during_restore,
    with_holes,
    with_xattrs,
    xattrs_of,
)
from tests.test_tarcheck import chained


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "nested" / "deeper").mkdir(parents=True)
    (tree / "empty-dir").mkdir()
    (tree / "empty-file").write_bytes(b"")
    (tree / "nested" / "data.bin").write_bytes(os.urandom(300_000))
    (tree / "nested" / "deeper" / "ünïcödé name ✓.txt").write_text("unicode\n")
    (tree / "odd name with spaces & $ymbols").write_text("odd\n")
    (tree / ("long-" + "x" * 150)).write_text("long name\n")
    (tree / "script.sh").write_text("#!/bin/sh\n")
    (tree / "script.sh").chmod(0o750)
    (tree / "private").write_text("secret\n")
    (tree / "private").chmod(0o600)
    (tree / "shared").write_text("everyone writes\n")
    (tree / "shared").chmod(0o666)  # more than the umask lets a new file have
    (tree / "read-only").write_text("frozen\n")
    (tree / "read-only").chmod(0o444)
    (tree / "link-to-file").symlink_to("nested/data.bin")
    (tree / "dangling-link").symlink_to("does/not/exist")
    for link in ("link-to-file", "dangling-link"):  # the link's own time, not its target's
        os.utime(tree / link, (1_300_000_000, 1_300_000_000), follow_symlinks=False)
    os.utime(tree / "nested" / "data.bin", (1_500_000_000, 1_500_000_000))
    os.utime(tree / "nested", (1_400_000_000, 1_400_000_000))
    return tree


def snapshot(root: Path) -> dict[str, tuple]:
    """What a restore must reproduce: type, mode, mtime, content or link
    (with the link's own mtime)."""
    result = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            result[rel] = ("link", os.readlink(path), int(st.st_mtime))
        elif path.is_dir():
            result[rel] = (
                "dir",
                st.st_mode & 0o7777,
                int(st.st_mtime) if rel == "nested" else None,
            )
        else:
            result[rel] = ("file", st.st_mode & 0o7777, int(st.st_mtime), path.read_bytes())
    return result


def backed_up(stpd: RunningStpd, ini: list[str], source: Path) -> str:
    """The saveset of ``sbc backup source`` (``ini``: its --ini-dir option)."""
    return str(sbc_json(*ini, "backup", str(source), "--server", stpd.address, "--json")["saveset"])  # type: ignore[index]


def sbc_json(*argv: str) -> object:
    code, out, err = run_sbc(*argv)
    assert code == 0, err
    return json.loads(out)


def test_round_trip_preserves_the_tree(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = make_tree(tmp_path)
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        ini = ["--ini-dir", str(client.ini_dir)]
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        assert isinstance(backup, dict)
        saveset = backup["saveset"]
        stored = stpd.daemon.store.tar_path(saveset)
        assert backup["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert backup["bytes"] == stored.stat().st_size

        listing = sbc_json(*ini, "list", "--server", stpd.address, "--json")
        assert [item["saveset"] for item in listing] == [saveset]  # type: ignore[union-attr]
        assert listing[0]["source"] == str(tree)  # type: ignore[index]
        assert {"saveset", "source", "bytes", "created"} <= set(listing[0])  # type: ignore[index]

        target = tmp_path / "restored"
        restored = sbc_json(
            *ini, "restore", saveset, str(target), "--server", stpd.address, "--json"
        )
        assert restored["sha256"] == backup["sha256"]  # type: ignore[index]
        stpd.log.wait_for(r"INFO sent saveset " + saveset)
    assert snapshot(target / "tree") == snapshot(tree)
    # A stock tool reads the stored saveset.
    names = subprocess.run(
        ["tar", "-tf", str(stored)], check=True, capture_output=True, text=True
    ).stdout
    assert "tree/nested/deeper/ünïcödé name ✓.txt" in names.splitlines()
    with tarfile.open(stored) as archive:
        assert archive.getmember("tree/link-to-file").linkname == "nested/data.bin"


def test_single_file_backup_and_restore(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "one.bin"
    source.write_bytes(os.urandom(5_000_000))
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        ini = ["--ini-dir", str(client.ini_dir)]
        backup = sbc_json(*ini, "backup", str(source), "--server", stpd.address, "--json")
        sbc_json(
            *ini,
            "restore",
            backup["saveset"],
            str(tmp_path / "out"),  # type: ignore[index]
            "--server",
            stpd.address,
            "--json",
        )
    assert (tmp_path / "out" / "one.bin").read_bytes() == source.read_bytes()


def test_restore_keeps_existing_files_unless_told_to_overwrite(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = make_tree(tmp_path)
    files = {"tree/" + rel for rel, kind in snapshot(tree).items() if kind[0] != "dir"}
    client = pki.client_ini("client1")
    target = tmp_path / "restored"
    with running_stpd(pki.layout, level=2) as stpd:
        ini = ["--ini-dir", str(client.ini_dir)]
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        saveset = backup["saveset"]  # type: ignore[index]
        restore = [*ini, "restore", saveset, str(target), "--server", stpd.address]
        assert sbc_json(*restore, "--json")["kept"] == []  # type: ignore[index]
        # Work done since the backup, and a file lost since.
        (target / "tree" / "private").write_text("newer than the backup\n")
        (target / "tree" / "nested" / "data.bin").unlink()

        again = sbc_json(*restore, "--json")
        assert set(again["kept"]) == files - {"tree/nested/data.bin"}  # type: ignore[index]
        # The directories merge; of the files, only the lost one is restored.
        assert again["extracted"] == again["members"] - len(files) + 1  # type: ignore[index]
        assert again["sha256"] == backup["sha256"]  # type: ignore[index]  # still all checked
        assert (target / "tree" / "private").read_text() == "newer than the backup\n"
        assert snapshot(target / "tree")["nested/data.bin"] == snapshot(tree)["nested/data.bin"]
        assert again["kept_different"] == ["tree/private"]  # type: ignore[index]  # the rest as restored

        # As a restore killed part-way (SIGKILL) leaves a file: cut short,
        # with its time of now. Kept again, but not silently.
        os.truncate(target / "tree" / "nested" / "data.bin", 1000)
        code, out, err = run_sbc(*restore)
        assert code == 0, err
        assert (
            f"sbc: warning: kept {len(files)} existing paths instead of restoring over them: "
            in err
        )
        assert f" and {len(files) - 5} more (--overwrite replaces them)" in err
        assert (
            "sbc: warning: 2 of the files kept differ from the saveset's in size or modification "
            "time: tree/nested/data.bin, tree/private (changed since the backup, or cut short by "
            "a restore that was killed; --overwrite replaces them)\n"
        ) in err
        assert "sha256 verified" in out
        # Not "N entries", as if it had restored them all.
        members = again["members"]  # type: ignore[index]
        extracted = members - len(files)  # type: ignore[operator]
        assert f" into {target}: {extracted} of {members} entries, " in out

        replaced = sbc_json(*restore, "--overwrite", "--json")
        assert replaced["kept"] == []  # type: ignore[index]
    assert snapshot(target / "tree") == snapshot(tree)


def test_entries_under_a_file_where_the_saveset_has_a_directory_are_not_called_existing(
    pki: Pki, tmp_path: Path
) -> None:
    """A file stands where the saveset has the directory ``tree``: it is
    the one existing path kept; the entries under it, which do not exist,
    are counted apart (--json lists them all under ``kept``, as before)."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (tree / name).write_text(f"{name}\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    back = tmp_path / "back"
    back.mkdir()
    (back / "tree").write_text("a file now\n")
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        restore = [*ini, "restore", backup["saveset"], str(back), "--server", stpd.address]  # type: ignore[index]
        code, out, err = run_sbc(*restore)
        assert code == 0, err
        assert err == (
            "sbc: warning: kept 1 existing path instead of restoring over it: tree, and left out "
            "the 4 entries of the saveset under it (--overwrite replaces them)\n"
        )
        assert sbc_json(*restore, "--json")["kept"] == [  # type: ignore[index]
            "tree", "tree/a", "tree/b", "tree/sub", "tree/sub/c",
        ]  # fmt: skip


def test_restore_of_a_file_next_to_itself_and_into_a_file(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "f.txt"
    source.write_text("data\n")
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        ini = ["--ini-dir", str(client.ini_dir)]
        backup = sbc_json(*ini, "backup", str(source), "--server", stpd.address, "--json")
        restore = [*ini, "restore", backup["saveset"]]  # type: ignore[index]
        source.write_text("edited\n")
        code, _, err = run_sbc(*restore, str(tmp_path), "--server", stpd.address)
        assert code == 0, err
        assert "kept 1 existing path instead of restoring over it: f.txt (" in err
        assert source.read_text() == "edited\n"

        code, _, err = run_sbc(*restore, str(source), "--server", stpd.address)
        assert code != 0
        assert f"sbc: error: cannot restore into {source}: it exists and is not a directory" in err
        code, _, beneath = run_sbc(*restore, str(source / "sub"), "--server", stpd.address)
    assert code != 0
    assert beneath == (
        f"sbc: error: cannot restore into {source / 'sub'}: Not a directory ({source / 'sub'})\n"
    )
    assert "Traceback" not in err
    assert source.read_text() == "edited\n"


def test_clients_see_only_their_own_savesets(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "f.txt"
    source.write_text("mine\n")
    alice, bob = pki.client_ini("alice"), pki.client_ini("bob")
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(
            "--ini-dir",
            str(alice.ini_dir),
            "backup",
            str(source),
            "--server",
            stpd.address,
            "--json",
        )
        saveset = backup["saveset"]  # type: ignore[index]
        assert (
            sbc_json("--ini-dir", str(bob.ini_dir), "list", "--server", stpd.address, "--json")
            == []
        )
        code = sbc(
            [
                "--ini-dir",
                str(bob.ini_dir),
                "restore",
                saveset,
                str(tmp_path / "x" / "y"),
                "--server",
                stpd.address,
            ]
        )
        err = capsys.readouterr().err
        assert code != 0
        assert f"no saveset {saveset} for this client" in err
        assert not (tmp_path / "x").exists()  # the directories made for it are gone too
        (tmp_path / "empty").mkdir()  # one that was there stays, empty or not
        ini = ["--ini-dir", str(bob.ini_dir)]
        code, _, err = run_sbc(
            *ini, "restore", saveset, str(tmp_path / "empty"), "--server", stpd.address
        )
        assert code == 1 and f"no saveset {saveset} for this client" in err
        assert (tmp_path / "empty").is_dir()


def curl_tls(client: Layout) -> list[str]:
    """curl's options for a TLS connection with the client certificate."""
    return [
        "--cacert",
        str(client.ca_cert),
        "--cert",
        str(client.client_cert),
        "--key",
        str(client.client_key),
    ]


def curl_stored(stpd: RunningStpd, client: Layout, archive: bytes, source: Path) -> str:
    """``archive`` uploaded by curl from its standard input (as `tar -cf - |
    curl -T -`): the saveset's id."""
    put = subprocess.run(
        ["curl", "-sS", "--fail-with-body", *curl_tls(client), "-T", "-",
         f"{stpd.url}/savesets?source={source}"],
        input=archive, capture_output=True, check=True,
    )  # fmt: skip
    return str(json.loads(put.stdout)["saveset"])


def test_a_gnu_tar_sparse_archive_uploaded_with_curl_restores_with_sbc(
    pki: Pki, tmp_path: Path
) -> None:
    """`tar -S | curl -T -`, GNU tar's default format: a file of more than 4
    data regions is type S with its map going on in blocks of its own,
    which stpd's check refused as "not a tar header"."""
    source = tmp_path / "t"
    source.mkdir()
    image = source / "disk.img"
    with open(image, "wb") as out:
        for region in range(30):
            out.seek(region * 65536)
            out.write(bytes([65 + region]) * 4096)
        out.truncate(30 * 65536)
    archive = subprocess.run(
        ["tar", "--format=gnu", "-S", "-C", str(tmp_path), "-cf", "-", "t"],
        capture_output=True,
        check=True,
    ).stdout
    client = pki.client_ini("curlclient")
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = curl_stored(stpd, client, archive, source)
        code, _, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", saveset, str(tmp_path / "back"),
            "--server", stpd.address,
        )  # fmt: skip
    assert code == 0, err
    back = tmp_path / "back" / "t" / "disk.img"
    assert back.read_bytes() == image.read_bytes()
    assert back.stat().st_blocks * 512 < 30 * 65536  # its holes came back as holes


def posix_acl(owner: int, nobody: int, group: int, mask: int, other: int) -> bytes:
    """The kernel's binary form of a POSIX ACL with one named user, nobody
    (65534): version 2, then (tag, permissions, id) entries in tag order."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, owner, undefined), (0x02, nobody, 65534), (0x04, group, undefined)]
    entries += [(0x10, mask, undefined), (0x20, other, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_acls_of_a_gnu_tar_archive_are_named_as_not_restored(pki: Pki, tmp_path: Path) -> None:
    """``tar --acls -cpf`` stores ACLs as text (SCHILY.acl.access, .default),
    which sbc does not apply: each entry with one that holds more than its
    mode is named, the rest restored, and sbc exits 3. GNU tar restores
    them from the saveset fetched with curl, as the warning says."""
    source = tmp_path / "t"
    (source / "inbox").mkdir(parents=True)
    (source / "plain").write_text("plain\n")
    (source / "shared").write_text("shared\n")
    # What `setfacl -m u:nobody:rw` and `setfacl -d -m u:nobody:rx` set, written
    # directly: the acl package is not on every machine.
    (source / "shared").chmod(0o644)
    (source / "inbox").chmod(0o755)
    os.setxattr(source / "shared", "system.posix_acl_access", posix_acl(6, 6, 4, 6, 4))
    os.setxattr(source / "inbox", "system.posix_acl_default", posix_acl(7, 5, 5, 5, 5))
    archive = subprocess.run(
        ["tar", "--acls", "-C", str(tmp_path), "-cpf", "-", "t"], capture_output=True, check=True
    ).stdout
    client = pki.client_ini("curlclient")
    tls = curl_tls(client)
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = curl_stored(stpd, client, archive, source)
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "restore", saveset, str(tmp_path / "back"),
            "--server", stpd.address, "--json",
        )  # fmt: skip
        got = tmp_path / "got.tar"
        url = f"{stpd.url}/savesets/{saveset}"
        subprocess.run(["curl", "-sS", "--fail", *tls, "-o", str(got), url], check=True)
    assert code == 3, err
    why = (
        "its ACL ({}, as tar --acls stores it) was not restored: sbc does not apply ACLs in "
        "that form; GNU tar --acls -xpf of the saveset does"
    )
    assert json.loads(out)["unrestorable"] == [
        {"path": "t/shared", "error": why.format("SCHILY.acl.access")},
        {"path": "t/inbox", "error": why.format("SCHILY.acl.default")},  # directories: last
    ]
    assert (tmp_path / "back" / "t" / "shared").read_text() == "shared\n"
    assert "system.posix_acl_access" not in os.listxattr(tmp_path / "back" / "t" / "shared")
    (tmp_path / "by-tar").mkdir()
    subprocess.run(["tar", "--acls", "-C", str(tmp_path / "by-tar"), "-xpf", str(got)], check=True)
    for path, name in (
        ("t/shared", "system.posix_acl_access"),
        ("t/inbox", "system.posix_acl_default"),
    ):
        assert os.getxattr(tmp_path / "by-tar" / path, name) == os.getxattr(tmp_path / path, name)


def test_curl_uploads_lists_and_downloads(pki: Pki, tmp_path: Path) -> None:
    client = pki.client_ini("curlclient")
    archive = tmp_path / "upload.tar"
    payload = tmp_path / "payload.txt"
    payload.write_text("from curl\n")
    with tarfile.open(archive, "w") as tar:
        tar.add(payload, "payload.txt")
    tls = curl_tls(client)
    with running_stpd(pki.layout, level=2) as stpd:
        put = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail-with-body",
                *tls,
                "-T",
                str(archive),
                f"{stpd.url}/savesets?source=/curl/test",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        meta = json.loads(put.stdout)
        assert meta["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
        assert meta["owner"] == "CN=curlclient"
        listing = json.loads(
            subprocess.run(
                ["curl", "-sS", *tls, f"{stpd.url}/savesets"], capture_output=True, check=True
            ).stdout
        )
        assert [m["saveset"] for m in listing] == [meta["saveset"]]
        got = tmp_path / "got.tar"
        subprocess.run(
            [
                "curl",
                "-sS",
                "--fail",
                *tls,
                "-o",
                str(got),
                f"{stpd.url}/savesets/{meta['saveset']}",
            ],
            check=True,
        )
        assert got.read_bytes() == archive.read_bytes()
        entries = subprocess.run(
            ["curl", "-sS", "--fail", *tls, f"{stpd.url}/savesets/{meta['saveset']}/entries"],
            capture_output=True,
            check=True,
        ).stdout
        assert [json.loads(line)["name"] for line in entries.splitlines()] == ["payload.txt"]
        status = json.loads(
            subprocess.run(
                ["curl", "-sS", *tls, f"{stpd.url}/status"], capture_output=True, check=True
            ).stdout
        )
        assert status["level"] == 2


def test_savesets_are_private_files(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data directory stpd creates is 0700; savesets and their metadata 0600."""
    source = tmp_path / "f.txt"
    source.write_text("private\n")
    client = pki.client_ini("client1")
    data = tmp_path / "new" / "data"
    with running_stpd(pki.layout, level=2, data_dir=data) as stpd:
        backup = sbc_json(
            "--ini-dir",
            str(client.ini_dir),
            "backup",
            str(source),
            "--server",
            stpd.address,
            "--json",
        )
    saveset = backup["saveset"]  # type: ignore[index]
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / ".incoming").stat().st_mode & 0o777 == 0o700
    assert (data / f"{saveset}.tar").stat().st_mode & 0o777 == 0o600
    assert (data / f"{saveset}.json").stat().st_mode & 0o777 == 0o600


def test_a_file_that_changes_during_the_backup_is_reported(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    victim = tree / "shrinking.log"
    victim.write_bytes(b"a" * 5000)
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        # The walk sizes the file, then it shrinks before it is read.
        real_copy = archive.TreeWriter._copy_contents

        def shrink_then_copy(self, fd: int, path: str, size: int, file_size: int) -> None:  # type: ignore[no-untyped-def]
            victim.write_bytes(b"a" * 100)  # truncates the open file too
            real_copy(self, fd, path, size, file_size)

        monkeypatch.setattr(archive.TreeWriter, "_copy_contents", shrink_then_copy)
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "backup", str(tree), "--server", stpd.address
        )
    assert code == 0, err
    assert err == (
        f"sbc: warning: {victim} changed while it was read: stored at the size it had "
        "when the backup reached it (cut, or padded with zeros), and its copy may mix "
        "old and new contents; back it up again\n"
    )
    assert "saveset SS-" in out


def test_paths_that_cannot_be_read_are_left_out_and_the_rest_is_stored(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file removed after the walk saw it, a directory removed before it
    was read, and a read error part-way: the backup goes on (as GNU tar
    does), names each, and exits 3 (stored, but incomplete)."""
    tree = tmp_path / "tree"
    (tree / "gonedir").mkdir(parents=True)
    (tree / "gonedir" / "inside").write_text("inside\n")
    (tree / "a.txt").write_text("first\n")
    (tree / "gone.txt").write_text("removed meanwhile\n")
    failing = os.urandom(300_000)
    (tree / "failing.bin").write_bytes(failing)
    (tree / "z.txt").write_text("last\n")
    real_add, real_copy = archive.TreeWriter.add, archive.TreeWriter._copy_contents

    def add(self, found: archive.Found) -> None:  # type: ignore[no-untyped-def]
        path = found.path
        if path.endswith("gone.txt"):
            os.unlink(path)
        if path.endswith("gonedir"):
            (tree / "gonedir" / "inside").unlink()
            os.rmdir(path)
        real_add(self, found)

    def copy(self, fd: int, path: str, size: int, file_size: int) -> None:  # type: ignore[no-untyped-def]
        if path.endswith("failing.bin"):
            real_fill = self.out.fill_from

            def fill_then_fail(fd: int, size: int) -> int:
                real_fill(fd, 1000)
                raise OSError(5, "Input/output error")

            self.out.fill_from = fill_then_fail
        try:
            real_copy(self, fd, path, size, file_size)
        finally:
            self.out.__dict__.pop("fill_from", None)

    monkeypatch.setattr(archive.TreeWriter, "add", add)
    monkeypatch.setattr(archive.TreeWriter, "_copy_contents", copy)
    # Runs in C would store the files without these steps. They leave a file
    # that is gone, or fails, to the Python way (tests/test_plaintar.py).
    plain_files_the_python_way(monkeypatch)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = run_sbc(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        assert code == 3, err
        assert err == ""
        result = json.loads(out)
        assert result["unreadable"] == [
            {
                "path": str(tree / "failing.bin"),
                "error": "Input/output error after 1000 of 300000 bytes; the rest is stored as zeros",
            },
            {"path": str(tree / "gone.txt"), "error": "No such file or directory; left out"},
            {
                "path": str(tree / "gonedir"),
                "error": "No such file or directory; its contents are left out",
            },
        ]
        assert result["files"] == 3  # a.txt, failing.bin, z.txt

        (tree / "gone.txt").write_text("again\n")  # and removed again by the hook
        code, out, err = run_sbc(*ini, "backup", str(tree), "--server", stpd.address)
        assert code == 3
        assert err.splitlines() == [
            f"sbc: warning: could not read {tree / 'failing.bin'}: Input/output error after 1000 "
            "of 300000 bytes; the rest is stored as zeros",
            f"sbc: warning: could not read {tree / 'gone.txt'}: No such file or directory; left out",
        ]
        assert "saveset SS-" in out

        back = tmp_path / "back"
        sbc_json(*ini, "restore", result["saveset"], str(back), "--server", stpd.address, "--json")
    restored = back / "tree"
    # gonedir was there when the walk passed it, its contents were not.
    assert sorted(p.name for p in restored.iterdir()) == [
        "a.txt",
        "failing.bin",
        "gonedir",
        "z.txt",
    ]
    assert list((restored / "gonedir").iterdir()) == []
    assert (restored / "failing.bin").read_bytes() == failing[:1000] + bytes(299_000)
    assert (restored / "z.txt").read_text() == "last\n"


def test_a_file_replaced_after_the_walk_is_not_followed_and_does_not_block(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between walk's lstat and the open, a regular file and a directory are
    replaced by symbolic links to files of someone else (which must not be
    stored), and another file by a FIFO (which must not block the backup
    until someone writes to it). Each is reported; the rest is stored."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "fifo").write_text("a file at first\n")
    (tree / "link").write_text("a file at first\n")
    (tree / "sub").mkdir()
    (tree / "sub" / "own.txt").write_text("own\n")
    (tree / "z.txt").write_text("last\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = elsewhere / "secret.txt"
    secret.write_text("SECRET of another user\n")
    rescued = threading.Event()

    def rescue(fifo: Path) -> None:
        """Without O_NONBLOCK, sbc's open waits for a writer: this one
        ends the wait, and the test fails below instead of hanging."""
        rescued.set()
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    real_add = archive.TreeWriter.add
    timers: list[threading.Timer] = []

    def add(self, found: archive.Found) -> None:  # type: ignore[no-untyped-def]
        path = found.path
        if path.endswith("link"):
            os.unlink(path)
            os.symlink(secret, path)
        if path.endswith("sub"):
            shutil.rmtree(path)
            os.symlink(elsewhere, path)
        if path.endswith("fifo"):
            os.unlink(path)
            os.mkfifo(path)
            timers.append(threading.Timer(WAIT_SECONDS, rescue, [Path(path)]))
            timers[-1].start()
        real_add(self, found)

    monkeypatch.setattr(archive.TreeWriter, "add", add)
    # A run in C would store these files without add. It opens each file with
    # the same flags, the moment after its own lstat.
    plain_files_the_python_way(monkeypatch)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        try:
            code, out, err = run_sbc(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        finally:
            for timer in timers:
                timer.cancel()
        assert not rescued.is_set(), "sbc blocked opening a FIFO"
        assert code == 3, err
        result = json.loads(out)
        assert result["unreadable"] == [
            {"path": str(tree / "link"), "error": "replaced by a symbolic link; left out"},
            {
                "path": str(tree / "sub"),
                "error": "no longer a directory; its contents are left out",
            },
        ]
        assert result["changed"] == [str(tree / "fifo")]  # read as empty: zeros stored
        stored = (stpd.daemon.store.root / f"{result['saveset']}.tar").read_bytes()
    assert b"SECRET" not in stored
    with tarfile.open(fileobj=io.BytesIO(stored)) as tar:
        assert tar.getnames() == ["tree", "tree/fifo", "tree/sub", "tree/z.txt"]
        member = tar.extractfile("tree/z.txt")
        assert member is not None and member.read() == b"last\n"


def test_a_parent_replaced_by_a_link_after_its_listing_is_not_followed(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory that someone moves away and replaces by a symbolic link
    after sbc listed it, or listed its parent, is not followed: what is
    stored under its names is what was listed there, never the files the
    link points to (another user's, read with sbc's rights). Opened by path,
    only the last component was safe from links (O_NOFOLLOW)."""
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "deep.txt").write_text("deep\n")
    (tree / "sub").mkdir()
    (tree / "sub" / "own.txt").write_text("own\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "b").mkdir(parents=True)
    (elsewhere / "b" / "deep.txt").write_text("SECRET of another user\n")
    (elsewhere / "own.txt").write_text("SECRET of another user\n")
    real_add = archive.TreeWriter.add

    def swap(directory: Path) -> None:
        directory.rename(tmp_path / f"{directory.name}.moved")
        directory.symlink_to(elsewhere)

    def add(self, found: archive.Found) -> None:  # type: ignore[no-untyped-def]
        if found.path == str(tree / "a" / "b"):  # a is listed, b is not yet
            swap(tree / "a")
        if found.path == str(tree / "sub" / "own.txt"):  # listed, not yet read
            swap(tree / "sub")
        real_add(self, found)

    monkeypatch.setattr(archive.TreeWriter, "add", add)
    ini = ["--ini-dir", str(pki.client_ini("client1").ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        result = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        stored = (stpd.daemon.store.root / f"{result['saveset']}.tar").read_bytes()  # type: ignore[index]
    assert b"SECRET" not in stored
    with tarfile.open(fileobj=io.BytesIO(stored)) as tar:
        contents = {
            member.name: extracted.read()
            for member in tar.getmembers()
            if (extracted := tar.extractfile(member)) is not None
        }
    assert contents == {"tree/a/b/deep.txt": b"deep\n", "tree/sub/own.txt": b"own\n"}


def test_a_backed_up_path_that_cannot_be_read_stores_nothing(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    real_add = archive.TreeWriter.add

    def add(self, found: archive.Found) -> None:  # type: ignore[no-untyped-def]
        path = found.path
        real_add(self, found)
        if path == str(tree):
            tree.rmdir()  # after its own member, before its entries are read

    monkeypatch.setattr(archive.TreeWriter, "add", add)
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = run_sbc(
            "--ini-dir", str(client.ini_dir), "backup", str(tree), "--server", stpd.address
        )
        assert code == 1 and out == ""
        assert err == f"sbc: error: cannot read {tree}: No such file or directory\n"
        assert stpd.daemon.store.all() == []


def test_a_link_given_as_path_is_stored_as_a_link_with_a_warning_unless_followed_by_a_slash(
    pki: Pki, tmp_path: Path
) -> None:
    """The warning is on stderr with --json too: nothing in the JSON says so."""
    data = tmp_path / "real"
    data.mkdir()
    (data / "f.txt").write_text("contents\n")
    link = tmp_path / "link"
    link.symlink_to(data)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        code, out, err = run_sbc(*ini, "backup", str(link), "--server", stpd.address)
        assert code == 0, err
        assert err == (
            f"sbc: warning: {link} is a symbolic link (to {data}): only the link is stored; "
            f"give {link}/ to back up the directory it points to\n"
        )
        assert ", 0 files in " in out
        # With --json too: the JSON alone on stdout, which shows only "links": 1.
        code, out, json_err = run_sbc(*ini, "backup", str(link), "--server", stpd.address, "--json")
        assert (code, json_err) == (0, err)
        assert (json.loads(out)["files"], json.loads(out)["links"]) == (0, 1)

        followed = sbc_json(*ini, "backup", f"{link}/", "--server", stpd.address, "--json")
        assert followed["source"] == str(data)  # type: ignore[index]
        assert followed["files"] == 1  # type: ignore[index]
        sbc_json(
            *ini, "restore", followed["saveset"], str(tmp_path / "back"),  # type: ignore[index]
            "--server", stpd.address, "--json",
        )  # fmt: skip
    assert (tmp_path / "back" / "real" / "f.txt").read_text() == "contents\n"


def test_restore_brings_back_owners_and_overwrite_replaces_a_link_without_following_it(
    pki: Pki, tmp_path: Path
) -> None:
    """sbc runs as root here (as the suite does): owners come back, by number
    when the names are unknown on this machine, as tar does."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f.txt").write_text("saved\n")
    os.chown(tree / "f.txt", 4321, 5432)
    client = pki.client_ini("client1")
    target = tmp_path / "back"
    outside = tmp_path / "outside.txt"
    outside.write_text("not to be touched\n")
    with running_stpd(pki.layout, level=2) as stpd:
        ini = ["--ini-dir", str(client.ini_dir)]
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        restore = [*ini, "restore", backup["saveset"], str(target), "--server", stpd.address]  # type: ignore[index]
        sbc_json(*restore, "--json")
        st = (target / "tree" / "f.txt").stat()
        assert (st.st_uid, st.st_gid) == (4321, 5432)

        (target / "tree" / "f.txt").unlink()
        (target / "tree" / "f.txt").symlink_to(outside)
        assert sbc_json(*restore, "--json")["kept"] == ["tree/f.txt"]  # type: ignore[index]
        assert sbc_json(*restore, "--overwrite", "--json")["kept"] == []  # type: ignore[index]
    restored = target / "tree" / "f.txt"
    assert not restored.is_symlink() and restored.read_text() == "saved\n"
    assert outside.read_text() == "not to be touched\n"


def test_a_root_restore_into_a_home_cannot_be_made_to_chown_what_a_link_points_to(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack on an in-place restore as root: while the restore runs,
    the owner of the home replaces one of its directories (theirs in the
    saveset) with a link to a directory of root's. tarfile set owners and
    modes by path, at the end: root's directory became the user's."""
    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "projects" / "notes.txt").write_text("notes\n")
    (home / "projects").chmod(0o777)
    for path in (home, home / "projects", home / "projects" / "notes.txt"):
        os.chown(path, 4321, 4321)
    roots = tmp_path / "etc"
    roots.mkdir(mode=0o755)
    before = roots.stat()
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(home), "--server", stpd.address, "--json")
        shutil.rmtree(home / "projects")  # lost: the user asks for the restore

        def swap() -> None:
            (home / "projects").rename(home / "moved")
            (home / "projects").symlink_to(roots)

        swapped_during_restore(monkeypatch, {"home/projects/notes.txt": swap})
        restored = sbc_json(
            *ini,
            "restore",
            backup["saveset"],
            str(tmp_path),
            "--server",
            stpd.address,
            "--json",  # type: ignore[index]
        )
    assert restored["kept"] == []  # type: ignore[index]
    after = roots.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert list(roots.iterdir()) == []
    assert (home / "moved" / "notes.txt").read_text() == "notes\n"


def test_kernel_file_systems_are_not_backed_up_and_one_file_system_stays_on_one(
    pki: Pki, tmp_path: Path
) -> None:
    """``sbc backup /`` must not read /proc (its kcore claims 128 TiB) or
    /sys: where a kernel file system is mounted, the directory is stored
    without its contents. Other file systems are entered, unless
    --one-file-system. A kernel file system as PATH stores nothing."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]

    def members(*extra: str) -> list[str]:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json", *extra)
        stored = stpd.daemon.store.root / f"{backup['saveset']}.tar"  # type: ignore[index]
        with tarfile.open(stored) as tar:
            return tar.getnames()

    with (
        mounted("proc", tree / "proc"),
        mounted("sysfs", tree / "sys"),
        mounted("tmpfs", tree / "data", "size=1m") as data,
        running_stpd(pki.layout, level=2) as stpd,
    ):
        (data / "work.txt").write_text("on another file system\n")
        assert members() == [
            "tree", "tree/data", "tree/data/work.txt", "tree/etc", "tree/etc/hosts",
            "tree/proc", "tree/sys",
        ]  # fmt: skip
        assert members("--one-file-system") == [
            "tree", "tree/data", "tree/etc", "tree/etc/hosts", "tree/proc", "tree/sys",
        ]  # fmt: skip
        code, out, err = run_sbc(*ini, "backup", str(tree / "proc"), "--server", stpd.address)
        assert (code, out) == (1, "")
        assert err == (
            f"sbc: error: nothing to back up: {tree / 'proc'} is on a proc file system, "
            "the kernel's state, not data\n"
        )
        assert len(stpd.daemon.store.all()) == 2


def test_links_and_fifos_a_file_system_cannot_hold_are_reported_and_the_rest_restored(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore onto FAT, exFAT or an SMB share, which answer EPERM to a
    symbolic link, a hard link or a FIFO: each is named, the restore goes
    on, and sbc exits 3 (done, but incomplete)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("first\n")
    (tree / "link").symlink_to("a.txt")
    os.link(tree / "a.txt", tree / "hard")
    os.mkfifo(tree / "pipe")
    (tree / "z.txt").write_text("last\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")

        def like_fat(*args: object, **kwargs: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        for name in ("symlink", "link", "mkfifo"):
            monkeypatch.setattr(os, name, like_fat)
        back = tmp_path / "back"
        restore = [*ini, "restore", backup["saveset"], str(back), "--server", stpd.address]  # type: ignore[index]
        code, out, err = run_sbc(*restore, "--json")
        assert code == 3, err
        why = "Operation not permitted (can the target's file system hold links and FIFOs?)"
        assert json.loads(out)["unrestorable"] == [
            {"path": f"tree/{name}", "error": why} for name in ("hard", "link", "pipe")
        ]
        shutil.rmtree(back)
        code, out, err = run_sbc(*restore)
    assert code == 3
    assert err.splitlines() == [
        f"sbc: warning: could not restore tree/{name}: {why}" for name in ("hard", "link", "pipe")
    ]
    assert sorted(p.name for p in (back / "tree").iterdir()) == ["a.txt", "z.txt"]
    assert (back / "tree" / "z.txt").read_text() == "last\n"


def test_hard_links_are_made_only_to_a_file_this_restore_made(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The later names of a file are not given to what stands at its first
    name when the restore kept that (the user's newer work, or a symbolic
    link that whoever may write there planted), nor to what was put there
    after the restore made it (a link, a file of someone else): each is
    named, not made, and sbc exits 3."""
    tree = tmp_path / "src"
    (tree / "a").mkdir(parents=True)
    (tree / "b").mkdir()
    (tree / "a" / "h1").write_text("hello\n")
    os.link(tree / "a" / "h1", tree / "b" / "h2")
    os.link(tree / "a" / "h1", tree / "a" / "h3")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]

    def kept_work(first: Path) -> None:
        first.write_text("user's newer work\n")

    def planted_link(first: Path) -> None:
        first.symlink_to("/etc/passwd")

    def someone_elses(first: Path) -> None:
        first.write_text("someone else's\n")
        os.chown(first, 12345, 12345)

    def swapped(plant: Callable[[Path], None]) -> Callable[[Path], None]:
        def replace(first: Path) -> None:
            first.unlink()
            plant(first)

        return replace

    cases = [
        ("kept, not restored", kept_work, None),
        ("kept, not restored", planted_link, None),
        ("not made by this restore, or replaced since", None, swapped(planted_link)),
        ("not made by this restore, or replaced since", None, swapped(someone_elses)),
    ]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        restore = [*ini, "restore", backup["saveset"], "--server", stpd.address, "--json"]  # type: ignore[index]
        for n, (why, before, during) in enumerate(cases):
            back = tmp_path / f"back{n}"
            first = back / "src" / "a" / "h1"
            if before is not None:
                first.parent.mkdir(parents=True)
                before(first)
            with monkeypatch.context() as patch:
                if during is not None:
                    swapped_during_restore(patch, {"src/a/h3": functools.partial(during, first)})
                code, out, err = run_sbc(*restore, str(back))
            assert code == 3, (why, err)
            assert json.loads(out)["unrestorable"] == [
                {"path": name, "error": f"a hard link to src/a/h1, which was {why}"}
                for name in ("src/a/h3", "src/b/h2")
            ]
            assert sorted(p.name for p in (back / "src").rglob("*")) == ["a", "b", "h1"]
        # b/h2 alone: a/h1 is not asked for, so what stands there is not the saveset's.
        code, out, err = run_sbc(*restore, str(tmp_path / "back0"), "src/b")
        assert code == 3, err
        assert json.loads(out)["unrestorable"] == [
            {"path": "src/b/h2", "error": "a hard link to src/a/h1, which was not restored"}
        ]
        back = tmp_path / "whole"
        sbc_json(*restore, str(back))
    assert (back / "src" / "b" / "h2").read_text() == "hello\n"
    assert (back / "src" / "b" / "h2").stat().st_ino == (back / "src" / "a" / "h1").stat().st_ino
    assert (back / "src" / "a" / "h1").stat().st_nlink == 3


def test_overwrite_replaces_a_file_by_a_hard_link_only_once_the_link_is_made(
    pki: Pki, tmp_path: Path
) -> None:
    """--overwrite removed what stood at a hard link's name, then found that
    the link could not be made (its first name not asked for, or kept): the
    user's file was gone and nothing stood in its place."""
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "a").write_text("saveset's\n")
    os.link(tree / "a", tree / "b")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    back = tmp_path / "back"
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")["saveset"]  # type: ignore[index]
        restore = [*ini, "restore", saveset, str(back), "--server", stpd.address, "--json"]
        sbc_json(*restore)
        (back / "src" / "b").unlink()
        (back / "src" / "b").write_text("mine\n")
        code, out, err = run_sbc(*restore, "src/b", "--overwrite")  # src/a not asked for
        assert code == 3, err
        assert json.loads(out)["unrestorable"] == [
            {"path": "src/b", "error": "a hard link to src/a, which was not restored"}
        ]
        assert (back / "src" / "b").read_text() == "mine\n"
        code, out, err = run_sbc(*restore, "--overwrite")  # both: b becomes a's other name
        assert code == 0, err
    assert (back / "src" / "b").stat().st_ino == (back / "src" / "a").stat().st_ino
    assert (back / "src" / "b").read_text() == "saveset's\n"
    assert not [p for p in (back / "src").iterdir() if p.name.startswith(".sbc-restore-")]


def test_with_overwrite_what_cannot_be_replaced_is_named_and_the_rest_restored(
    pki: Pki, tmp_path: Path
) -> None:
    """``--overwrite`` over an immutable file, a directory where the saveset
    has a FIFO, an immutable file where it has a symbolic link: each is
    named, left as it is, the rest restored, and sbc exits 3, run after
    run. A target directory that takes no writes at all stops the restore."""
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "a.txt").write_text("first\n")
    os.mkfifo(tree / "fifo")
    (tree / "immut").write_text("saveset's\n")
    (tree / "link").symlink_to("a.txt")
    (tree / "z.txt").write_text("last\n")
    back, locked = tmp_path / "back", tmp_path / "locked"
    (back / "src" / "fifo" / "inner").mkdir(parents=True)
    for name in ("immut", "link"):
        (back / "src" / name).write_text("immutable\n")
    frozen = [back / "src" / "immut", back / "src" / "link", locked]
    locked.mkdir()
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    subprocess.run(["chattr", "+i", *map(str, frozen)], check=True)
    try:
        with running_stpd(pki.layout, level=2) as stpd:
            backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
            restore = [*ini, "restore", backup["saveset"], "--server", stpd.address]  # type: ignore[index]
            runs = [run_sbc(*restore, str(back), "--overwrite", "--json") for _ in range(2)]
            stopped = run_sbc(*restore, str(locked), "--overwrite")
    finally:
        subprocess.run(["chattr", "-i", *map(str, frozen)], check=True)
    for code, out, err in runs:
        assert code == 3, err
        result = json.loads(out)
        assert result["unrestorable"] == [
            {
                "path": "src/fifo",
                "error": "a directory stands there, which --overwrite does not remove",
            },
            {"path": "src/immut", "error": "Operation not permitted"},
            {
                "path": "src/link",
                "error": "what stands there could not be removed: Operation not permitted",
            },
        ]
        assert (result["members"], result["extracted"]) == (6, 3)
    assert (back / "src" / "z.txt").read_text() == "last\n"
    assert [(back / "src" / name).read_text() for name in ("immut", "link")] == ["immutable\n"] * 2
    assert sorted(p.name for p in back.rglob("*")) == [
        "a.txt", "fifo", "immut", "inner", "link", "src", "z.txt",
    ]  # fmt: skip
    assert stopped == (
        1,
        "",
        f"sbc: error: cannot restore into {locked}: Operation not permitted (src); the restore "
        "stopped there (what came before it in the saveset is restored)\n",
    )


def test_times_are_stored_as_their_whole_second_and_unchanged_files_kept_quietly(
    pki: Pki, tmp_path: Path
) -> None:
    """A modification time is stored as the whole second it falls in, as
    tar stores it: 00:00:00.999999999 as 00:00:00 (a float st_mtime rounds it
    up to 00:00:01), 1969-12-31 23:59:59.5 as 23:59:59; by Python (the first
    file of a directory) and in C (the next). Restored in place, over the
    unchanged files, they are kept and not named as different."""
    tree = tmp_path / "tree"
    tree.mkdir()
    second = 1_577_836_800  # 2020-01-01 00:00:00 UTC
    for name in ("a", "b"):
        (tree / name).write_text(f"{name}\n")
        os.utime(tree / name, ns=(0, second * 10**9 + 999_999_999))
    (tree / "old").write_text("old\n")
    os.utime(tree / "old", ns=(0, -500_000_000))
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        restore = [*ini, "restore", backup["saveset"], "--server", stpd.address, "--json"]  # type: ignore[index]
        sbc_json(*restore, str(tmp_path / "back"))
        in_place = sbc_json(*restore, str(tmp_path))
    back = tmp_path / "back" / "tree"
    assert [(back / name).stat().st_mtime_ns for name in ("a", "b", "old")] == [
        second * 10**9,
        second * 10**9,
        -(10**9),
    ]
    assert (in_place["kept"], in_place["kept_different"]) == (  # type: ignore[index]
        ["tree/a", "tree/b", "tree/old"],
        [],
    )


def test_extended_attributes_and_acls_come_back_but_no_capability(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backed up and restored over TLS (a file capability is stored, and
    not restored: no privilege comes from a saveset); each one that cannot
    be set (as a user, or on a file system without them) is named, and sbc
    exits 3."""
    tree = with_xattrs(tmp_path)
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        ini, server = ["--ini-dir", str(client.ini_dir)], ["--server", stpd.address]
        backup = sbc_json(*ini, "backup", str(tree), *server, "--json")
        saveset = backup["saveset"]  # type: ignore[index]
        sbc_json(*ini, "restore", saveset, str(tmp_path / "back"), *server, "--json")
        assert xattrs_of(tmp_path / "back" / "xattrs") == xattrs_of(tree, restored=True)
        # stpd sends a selected entry with its extended header
        sbc_json(
            *ini, "restore", saveset, str(tmp_path / "one"), "xattrs/dir/ping", *server, "--json"
        )
        assert xattrs_of(tmp_path / "one" / "xattrs")["dir/ping"] == {"user.binary": b"\xff\0\xfe"}

        def like_fat(target: int | str, name: str, *args: object, **kwargs: object) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "setxattr", like_fat)
        code, out, err = run_sbc(*ini, "restore", saveset, str(tmp_path / "again"), *server)
    assert code == 3, err
    unprivileged = (
        "sbc: warning: restored 1 file without set-user-id or set-group-id bits or file "
        "capabilities, as no privilege comes from a saveset: xattrs/dir/ping (give them back "
        "by hand where you trust the saveset: chmod u+s or g+s, setcap)"
    )
    assert sorted(err.splitlines()) == sorted(
        [
            *(
                f"sbc: warning: could not restore xattrs/{path}: its extended attribute {name} "
                "was not restored: Operation not supported"
                for path, names in xattrs_of(tree, restored=True).items()
                for name in names
            ),
            unprivileged,
        ]
    )
    assert len(err.splitlines()) == 7
    assert "restored saveset" in out
    assert (tmp_path / "again" / "xattrs" / "dir" / "ping").read_bytes() == b"\x7fELF"


@pytest.mark.parametrize("where", ["name", "xattr"])
def test_a_size_record_in_a_name_or_extended_attribute_is_backed_up_as_it_is(
    pki: Pki, tmp_path: Path, where: str
) -> None:
    """A file name or user extended attribute holding what reads as a PAX
    size record ("\n14 size=100000\n"), which any user can give their own
    files: stpd took it for the member's size, refused the upload as cut
    off, and stored nothing of the whole backup (of /home, every night)."""
    fake = "\n14 size=100000\n"
    home = tmp_path / "home"
    (home / "u").mkdir(parents=True)
    (home / "u" / "real").write_text("data\n")
    odd = "u/" + ("\u00e9" + fake if where == "name" else "real")
    if where == "name":
        (home / odd).write_text("x")
    else:
        try:
            os.setxattr(home / odd, "user.note", b"x" + fake.encode())
        except OSError as exc:
            pytest.skip(f"{tmp_path} takes no user extended attributes: {exc.strerror}")
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        ini, server = ["--ini-dir", str(client.ini_dir)], ["--server", stpd.address]
        saveset = backed_up(stpd, ini, home)
        listing = subprocess.run(
            ["tar", "--quoting-style=literal", "-tf", str(stpd.daemon.store.tar_path(saveset))],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        sbc_json(*ini, "restore", saveset, str(tmp_path / "back"), *server, "--json")
    names = sorted({"home/", "home/u/", "home/u/real", f"home/{odd}"})  # sbc stores them so
    assert listing == "".join(f"{name}\n" for name in names)
    assert snapshot(tmp_path / "back" / "home") == snapshot(home)
    assert xattrs_of(tmp_path / "back" / "home") == xattrs_of(home)


@pytest.mark.parametrize("sizes", ["octal", "base-256"])
def test_files_with_holes_move_and_come_back_without_them(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sizes: str
) -> None:
    """79 MiB of sparse files: a saveset of a few KiB over TLS, listed with
    their real names and sizes, and restored with their holes. Also with
    their size fields in base-256, as past 8 GiB of data: stpd checks, lists
    and selects such members too."""
    if sizes == "base-256":
        monkeypatch.setattr(archive, "size_field", lambda n: b"\x80" + n.to_bytes(11, "big"))
    tree = with_holes(tmp_path)
    client = pki.client_ini("client1")
    with running_stpd(pki.layout, level=2) as stpd:
        ini, server = ["--ini-dir", str(client.ini_dir)], ["--server", stpd.address]
        backup = sbc_json(*ini, "backup", str(tree), *server, "--json")
        assert backup["bytes"] < 100_000  # type: ignore[index]
        saveset = backup["saveset"]  # type: ignore[index]
        listing = sbc_json(*ini, "list", saveset, *server, "--json")
        sizes = {entry["name"]: entry["size"] for entry in listing}  # type: ignore[union-attr, index]
        assert sizes["holes/disk.img"] == 64 << 20
        assert sizes["holes/" + "ünïcödé " * 20] == (5 << 20) + 7
        sbc_json(*ini, "restore", saveset, str(tmp_path / "back"), *server, "--json")
        one = [*ini, "restore", saveset, str(tmp_path / "one"), "holes/disk.img", *server]
        sbc_json(*one, "--json")  # selected by its name, not the stand-in's
    assert [p.name for p in (tmp_path / "one" / "holes").iterdir()] == ["disk.img"]
    assert (tmp_path / "one" / "holes" / "disk.img").read_bytes() == (
        tree / "disk.img"
    ).read_bytes()
    back = tmp_path / "back" / "holes"
    for path in tree.iterdir():
        assert (back / path.name).read_bytes() == path.read_bytes(), path.name
    assert (back / "disk.img").stat().st_blocks * 512 <= 64 * 1024
    assert (back / "empty.img").stat().st_blocks == 0


def test_names_a_file_system_cannot_hold_are_reported_and_the_rest_restored(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore onto FAT or exFAT (a USB stick), which answer EINVAL to a
    name with ':' or '?': the file is named, a directory is named with
    nothing under it restored, a hard link to the file too, the restore goes
    on, and sbc exits 3."""
    tree = tmp_path / "tree"
    (tree / "notes: 2026").mkdir(parents=True)
    (tree / "notes: 2026" / "inner.txt").write_text("inner\n")
    (tree / "a.txt").write_text("first\n")
    (tree / "meeting 10:30.txt").write_text("agenda\n")
    os.link(tree / "meeting 10:30.txt", tree / "zz-agenda")
    (tree / "z.txt").write_text("last\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        real_open, real_mkdir = os.open, os.mkdir

        def like_exfat(real: Callable[..., Any]) -> Callable[..., Any]:
            def call(path: str, *args: Any, dir_fd: int | None = None, **kwargs: Any) -> Any:
                if dir_fd is not None and ":" in str(path):  # the restore's calls
                    raise OSError(errno.EINVAL, "Invalid argument")
                return real(path, *args, dir_fd=dir_fd, **kwargs)

            return call

        monkeypatch.setattr(os, "open", like_exfat(real_open))
        monkeypatch.setattr(os, "mkdir", like_exfat(real_mkdir))
        # The C calls do not go through os. On exFAT itself they fail alike
        # and leave the file to the Python way (tests/test_plaintar.py).
        plain_files_the_python_way(monkeypatch)
        back = tmp_path / "back"
        restore = [*ini, "restore", backup["saveset"], str(back), "--server", stpd.address]  # type: ignore[index]
        code, out, err = run_sbc(*restore, "--json")
    assert code == 3, err
    why = "Invalid argument (the target's file system cannot hold this name)"
    assert json.loads(out)["unrestorable"] == [
        {"path": "tree/meeting 10:30.txt", "error": why},
        {"path": "tree/notes: 2026", "error": why + "; nothing under it was restored"},
        {
            "path": "tree/zz-agenda",
            "error": "a hard link to tree/meeting 10:30.txt, which was not restored",
        },
    ]
    assert sorted(p.name for p in (back / "tree").iterdir()) == ["a.txt", "z.txt"]
    assert (back / "tree" / "z.txt").read_text() == "last\n"


def test_restore_of_some_entries_only(pki: Pki, tmp_path: Path) -> None:
    """``sbc restore SAVESET DIR etc/ssh etc/hosts``: those entries and what
    is under them, named as stored (a leading / is forgiven). stpd sends
    only them, so the saveset's checksum (of all of it) is not claimed. An
    entry not in the saveset is named and sbc exits 3; a hard link whose
    first name was not asked for cannot be made, and is named too."""
    etc = tmp_path / "etc"
    (etc / "ssh").mkdir(parents=True)
    (etc / "ssh" / "sshd_config").write_text("PermitRootLogin no\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    os.link(etc / "passwd", etc / "zz-passwd-copy")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(etc), "--server", stpd.address, "--json")
        restore = [*ini, "restore", backup["saveset"], "--server", stpd.address, "--json"]  # type: ignore[index]
        some = tmp_path / "some"
        # An ENTRY may follow options as well as come before them.
        result = sbc_json(*restore, str(some), "etc/ssh", "--quiet", "/etc/hosts")
        assert sorted(p.relative_to(some).as_posix() for p in some.rglob("*")) == [
            "etc",
            "etc/hosts",
            "etc/ssh",
            "etc/ssh/sshd_config",
        ]
        assert (some / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"
        assert result["sha256"] is None  # type: ignore[index]
        assert (result["extracted"], result["members"]) == (3, 3)  # type: ignore[index]

        code, out, err = run_sbc(*restore, str(tmp_path / "more"), "etc/zz-passwd-copy", "etc/nope")
        assert code == 3, err
        assert json.loads(out)["not_found"] == ["etc/nope"]
        assert (json.loads(out)["extracted"], json.loads(out)["members"]) == (0, 1)
        assert json.loads(out)["unrestorable"] == [
            {
                "path": "etc/zz-passwd-copy",
                "error": "a hard link to etc/passwd, which was not restored",
            }
        ]
        # None of them there: an error, and the target it made is gone again.
        code, out, err = run_sbc(*restore[:-1], str(tmp_path / "again"), "etc/nope", "nope")
        assert (code, out) == (1, "")
        assert err == (
            f"sbc: error: none of the entries asked for is in saveset {backup['saveset']}: "  # type: ignore[index]
            f"etc/nope, nope; `sbc list {backup['saveset']}` shows its entries, named as stored "  # type: ignore[index]
            "(etc/hosts for a file of `sbc backup /etc`)\n"
        )
        assert not (tmp_path / "again").exists()

        # Nested entries: each is found, nothing comes twice.
        nested = sbc_json(*restore, str(tmp_path / "nested"), "etc", "etc/ssh/sshd_config")
        assert "not_found" not in nested
        assert (nested["extracted"], nested["members"]) == (6, 6)  # type: ignore[index]

        # A name as `sbc list` shows it (escaped, as tar -tv does) is not its
        # bytes: the error says how to give it; given as its bytes, it is found.
        (etc / "d\udce9j").write_text("not UTF-8\n")  # b"d\xe9j"
        backup = sbc_json(*ini, "backup", str(etc), "--server", stpd.address, "--json")
        restore[3] = backup["saveset"]  # type: ignore[index]
        code, out, err = run_sbc(*ini, "list", backup["saveset"], "--server", stpd.address)  # type: ignore[index]
        assert code == 0 and "etc/d\\351j" in out, err
        code, out, err = run_sbc(*restore[:-1], str(tmp_path / "escaped"), "etc/d\\351j")
        assert code == 1
        assert err.endswith(
            "(a name `sbc list` shows with escapes such as \\351 or \\n is matched by its own "
            "bytes: in bash give it as $'NAME', which reads the same escapes)\n"
        ), err
        bytes_given = sbc_json(*restore, str(tmp_path / "escaped"), "etc/d\udce9j")
        assert bytes_given["extracted"] == 1  # type: ignore[index]
        assert (tmp_path / "escaped" / "etc" / "d\udce9j").read_text() == "not UTF-8\n"


def test_links_to_a_file_not_asked_for_are_named_in_one_line(pki: Pki, tmp_path: Path) -> None:
    """A selective restore of a directory whose files are hard links to one
    outside it: each link was a warning line of its own (5,000 for 5,000).
    More than three with one reason are one line; --json lists them all."""
    (tmp_path / "tree" / "x").mkdir(parents=True)
    (tmp_path / "tree" / "y").mkdir()
    (tmp_path / "tree" / "x" / "orig").write_text("shared\n")
    for index in range(5):
        os.link(tmp_path / "tree" / "x" / "orig", tmp_path / "tree" / "y" / f"l{index}")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(
            *ini, "backup", str(tmp_path / "tree"), "--server", stpd.address, "--json"
        )
        restore = [*ini, "restore", backup["saveset"], "--server", stpd.address]  # type: ignore[index]
        code, out, err = run_sbc(*restore, str(tmp_path / "back"), "tree/y")
        assert code == 3
        assert err.splitlines()[-1] == (
            "sbc: warning: could not restore 5 entries, each a hard link to tree/x/orig, which "
            "was not restored: tree/y/l0, tree/y/l1, tree/y/l2, tree/y/l3, tree/y/l4"
        ), err
        assert "could not restore tree/y/l0" not in err
        code, out, err = run_sbc(*restore, str(tmp_path / "again"), "tree/y", "--json")
        assert code == 3 and len(json.loads(out)["unrestorable"]) == 5, err


def test_a_selective_restore_fetches_only_the_entries(pki: Pki, tmp_path: Path) -> None:
    """stpd sends a tar archive of just the entries asked for and what is
    under them, headers as stored (a long unicode name keeps its PAX
    header): one small file of a saveset with a big one moves kilobytes.
    GNU tar reads what curl fetches the same way."""
    tree = tmp_path / "tree"
    long_name = "d" * 120
    (tree / long_name / "ünïcödé").mkdir(parents=True)
    (tree / long_name / "ünïcödé" / "note.txt").write_text("deep\n")
    big = os.urandom(3_000_000)
    (tree / "big.bin").write_bytes(big)
    (tree / "small.txt").write_text("small\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    tls = curl_tls(client)
    got = tmp_path / "got.tar"
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        saveset = backup["saveset"]  # type: ignore[index]
        back = tmp_path / "back"
        restore = [*ini, "restore", saveset, "--server", stpd.address, "--json", str(back)]
        result = sbc_json(*restore, "tree/small.txt", f"tree/{long_name}")
        assert (result["members"], result["extracted"]) == (4, 4)  # type: ignore[index]
        assert result["bytes"] < 20_000  # type: ignore[index]
        stpd.log.wait_for(
            rf"INFO sent saveset {saveset} \(entries asked for: 2\) .*: {result['bytes']} bytes"  # type: ignore[index]
        )
        query = urlencode([("entry", "tree/small.txt"), ("entry", "/tree/big.bin")])
        url = f"{stpd.url}/savesets/{saveset}?{query}"
        subprocess.run(["curl", "-sS", "--fail", *tls, "-o", str(got), url], check=True)
    assert (back / "tree" / "small.txt").read_text() == "small\n"
    assert (back / "tree" / long_name / "ünïcödé" / "note.txt").read_text() == "deep\n"
    assert not (back / "tree" / "big.bin").exists()
    listing = subprocess.run(["tar", "-tf", str(got)], capture_output=True, text=True, check=True)
    assert (listing.stdout.splitlines(), listing.stderr) == (["tree/big.bin", "tree/small.txt"], "")
    content = subprocess.run(["tar", "-xOf", str(got), "tree/big.bin"], capture_output=True)
    assert content.stdout == big


def test_entries_with_a_space_or_a_plus_are_asked_for_as_they_are_named(
    pki: Pki, tmp_path: Path
) -> None:
    """entry= read "+" as a space (a form's encoding) while source= did not:
    curl's "?entry=tree/c+d" got an empty archive. Both read "+" as a plus,
    and sbc sends a space as %20."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("a b", "c+d", "other"):
        (tree / name).write_text(name)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    got = tmp_path / "got.tar"
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")["saveset"]  # type: ignore[index]
        back = tmp_path / "back"
        restore = [*ini, "restore", saveset, "--server", stpd.address, "--json", str(back)]
        result = sbc_json(*restore, "tree/a b", "tree/c+d")
        assert "not_found" not in result and result["extracted"] == 2  # type: ignore[operator, index]
        url = f"{stpd.url}/savesets/{saveset}?entry=tree/c+d"
        subprocess.run(
            ["curl", "-sS", "--fail", *curl_tls(client), "-o", str(got), url], check=True
        )
    assert sorted(p.name for p in (back / "tree").iterdir()) == ["a b", "c+d"]
    with tarfile.open(got) as tar:
        assert tar.getnames() == ["tree/c+d"]


def test_a_long_search_for_the_entries_keeps_sbc_waiting(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While stpd scans a large saveset for a selective restore's entries,
    it sends a PAX global header now and then (here after every member it
    passes over), which tar readers take in without a trace: sbc restores
    just the entry, and GNU tar lists just it from what curl fetches."""
    monkeypatch.setattr(stpd_server, "STILL_LOOKING_EVERY", 0.0)
    monkeypatch.setattr(stpd_store, "SCAN_STEP", 1)
    tree = tmp_path / "tree"
    tree.mkdir()
    for n in range(30):
        (tree / f"f{n:02}").write_text(f"{n}\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    tls = curl_tls(client)
    got = tmp_path / "got.tar"
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")["saveset"]  # type: ignore[index]
        back = tmp_path / "back"
        restore = [*ini, "restore", saveset, "--server", stpd.address, "--json", str(back)]
        result = sbc_json(*restore, "tree/f29")
        url = f"{stpd.url}/savesets/{saveset}?entry=tree/f29"
        subprocess.run(["curl", "-sS", "--fail", *tls, "-o", str(got), url], check=True)
    assert (result["members"], result["extracted"]) == (1, 1)  # type: ignore[index]
    assert sorted(p.name for p in (back / "tree").iterdir()) == ["f29"]
    assert got.read_bytes().count(STILL_LOOKING) >= 30  # the tree and f00-f28 passed over
    listing = subprocess.run(["tar", "-tf", str(got)], capture_output=True, text=True, check=True)
    assert (listing.stdout, listing.stderr) == ("tree/f29\n", "")


def test_a_saveset_with_a_damaged_header_midway_is_not_listed_as_whole(
    pki: Pki, tmp_path: Path
) -> None:
    """A header overwritten on the server's disk (its length kept): tarfile
    ends there as at the end of the archive, so `sbc list ID` showed half
    the entries with exit 0, and a restore of an entry after it said the
    operator's name was not in the saveset. Both fail now, and say why."""
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(200):
        (tree / f"file_{i:03}").write_bytes(b"x" * 100)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")["saveset"]  # type: ignore[index]
        stored = stpd.daemon.store.tar_path(saveset)
        data = bytearray(stored.read_bytes())
        header = data.index(b"many/file_100")  # its header block: name first
        data[header : header + 100] = b"\xff" * 100
        stored.write_bytes(data)
        code, out, err = run_sbc(*ini, "list", saveset, "--server", stpd.address)
        assert code == 1, (code, err)
        assert out.count("\n") <= 101 and "file_150" not in out
        assert err.endswith(f"saveset {saveset} cannot be read on the server\n"), err
        code, _, err = run_sbc(
            *ini, "restore", saveset, str(tmp_path / "back"), "many/file_150",
            "--server", stpd.address,
        )  # fmt: skip
        assert code == 1 and "lost mid-restore" in err, err  # stpd's log says why
        # A whole restore: sbc's own reading of the stream stops there, and says so
        # (it restored the first half and said all was well).
        code, _, err = run_sbc(
            *ini, "restore", saveset, str(tmp_path / "whole"), "--server", stpd.address
        )
        assert code == 1, err
        assert "damaged: no valid tar header at byte " in err, err
        line = stpd.log.wait_for(rf"saveset {saveset} cannot be read: damaged: no valid tar header")
        assert line.startswith("ERROR ")


def test_a_saveset_with_hundreds_of_extension_headers_in_a_row_is_one_error_line(
    pki: Pki, tmp_path: Path
) -> None:
    """Some 330 extension headers in a row (refused at upload now; stored
    before, or sent by a hostile server) took tarfile past the recursion
    limit: each listing logged a traceback of 3,000 lines, and sbc's
    restore ended in one."""
    source = tmp_path / "f.txt"
    source.write_text("x\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = sbc_json(*ini, "backup", str(source), "--server", stpd.address, "--json")[
            "saveset"
        ]  # type: ignore[index]
        stored = stpd.daemon.store.tar_path(saveset)
        stored.write_bytes(chained(400))
        meta = stpd.daemon.store.root / f"{saveset}.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "bytes": len(chained(400))}))
        code, _, err = run_sbc(*ini, "list", saveset, "--server", stpd.address)
        assert code == 1 and err.endswith("cannot be read on the server\n"), err
        line = stpd.log.wait_for(rf"saveset {saveset} cannot be read: ")
        assert line.startswith("ERROR ") and "too many extension headers in a row" in line
        assert not stpd.log.matching(r"Traceback|RecursionError|internal error")
        code, _, err = run_sbc(
            *ini, "restore", saveset, str(tmp_path / "back"), "--server", stpd.address
        )
    assert code == 1 and "too many extension headers in a row" in err, err
    assert "Traceback" not in err


def test_verify_tells_an_intact_saveset_from_a_damaged_one(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sbc verify ID``: stpd hashes the stored saveset anew against the
    checksum taken when it was stored. One bit changed on the server's disk
    is found: one error line, exit status 1, an ERROR in stpd's log. While
    it hashes, stpd says how far it got (here after every MiB), so that a
    long check keeps sbc waiting; curl gets the same lines. Another
    client's saveset is refused as if it did not exist."""
    monkeypatch.setattr(stpd_server, "VERIFY_LINE_EVERY", 0.0)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(3_000_000))
    client, other = pki.client_ini("client1"), pki.client_ini("client2")
    ini = ["--ini-dir", str(client.ini_dir)]
    tls = curl_tls(client)
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        saveset, size, sha = backup["saveset"], backup["bytes"], backup["sha256"]  # type: ignore[index]
        counted: list[int] = []  # stpd's active transfers while it hashes
        real_step = stpd_server.SavesetCheck.step

        def step(self: stpd_server.SavesetCheck, seconds: float) -> None:
            counted.append(stpd.daemon.active_transfers)
            real_step(self, seconds)

        monkeypatch.setattr(stpd_server.SavesetCheck, "step", step)
        verdict = sbc_json(*ini, "verify", saveset, "--server", stpd.address, "--json")
        assert counted and set(counted) == {1}, counted  # shown by status, waited for at stop
        assert stpd.daemon.active_transfers == 0
        assert verdict == {
            "saveset": saveset,
            "intact": True,
            "bytes": size,
            "sha256": sha,
            "recorded_bytes": size,
            "recorded_sha256": sha,
        }
        code, out, err = run_sbc(
            "--ini-dir", str(other.ini_dir), "verify", saveset, "--server", stpd.address
        )
        assert code == 1 and f"no saveset {saveset}" in err, err

        stored = stpd.daemon.store.tar_path(saveset)
        damaged = bytearray(stored.read_bytes())
        damaged[2_000_000] ^= 0x01
        stored.write_bytes(damaged)
        code, out, err = run_sbc(*ini, "verify", saveset, "--server", stpd.address)
        assert (code, out) == (1, "")
        assert err.count("\n") == 1, err
        assert err.startswith(f"sbc: error: saveset {saveset} is damaged: its stored data is "), err
        code, out, err = run_sbc(*ini, "verify", saveset, "--server", stpd.address, "--json")
        assert code == 1 and err.startswith(f"sbc: error: saveset {saveset} is damaged: ")
        assert json.loads(out) == {
            "saveset": saveset,
            "intact": False,
            "bytes": size,
            "sha256": hashlib.sha256(damaged).hexdigest(),
            "recorded_bytes": size,
            "recorded_sha256": sha,
        }
        stpd.log.wait_for(rf"ERROR saveset {saveset} is damaged: {size} bytes with sha256 ")
        url = f"{stpd.url}/savesets/{saveset}/verify"
        answer = subprocess.run(
            ["curl", "-sS", "--fail", *tls, url], capture_output=True, check=True
        )
    *progress, last = [json.loads(line) for line in answer.stdout.splitlines()]
    assert len(progress) >= 2 and all(list(p) == ["checked"] for p in progress), progress
    assert [p["checked"] for p in progress] == sorted({p["checked"] for p in progress})
    assert (last["intact"], last["bytes"], last["recorded_sha256"]) == (False, size, sha)
    assert last["sha256"] == hashlib.sha256(damaged).hexdigest()


def test_list_shows_a_source_with_control_characters_on_one_line(pki: Pki, tmp_path: Path) -> None:
    """A saveset's source is what its client sent (at levels 0 and 1 every
    client without a certificate shares one owner): a newline in it made
    two lines of one in `sbc list`, and an ESC reached the terminal."""
    tree = tmp_path / "two\nlines\x1b[2J"
    tree.mkdir()
    (tree / "f").write_text("x\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = backed_up(stpd, ini, tree)
        code, out, err = run_sbc(*ini, "list", "--server", stpd.address)
    assert code == 0, err
    [line] = out.splitlines()
    assert line.startswith(saveset) and line.endswith(f"{tmp_path}/two\\nlines\\x1b[2J")


def test_restore_warnings_show_names_with_control_characters_on_one_line(
    pki: Pki, tmp_path: Path
) -> None:
    """The names in a restore's warnings come from the saveset: an ESC in
    one reached the terminal as it was (the kept and set-id warnings here)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    odd = tree / "a\x1b[2J\x1b[31mRED"
    odd.write_text("#!/bin/sh\n")
    odd.chmod(0o4755)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = backed_up(stpd, ini, tree)
        restore = [*ini, "restore", saveset, str(tmp_path / "back"), "--server", stpd.address]
        first = run_sbc(*restore)
        again = run_sbc(*restore)
    for code, _, err in (first, again):
        assert code == 0, err
        assert "\x1b" not in err and "tree/a\\x1b[2J\\x1b[31mRED" in err, err
    assert "without set-user-id" in first[2] and "kept 1 existing path" in again[2]


def test_list_of_a_savesets_entries_agrees_with_gnu_tar(pki: Pki, tmp_path: Path) -> None:
    """``sbc list SAVESET`` names what ``tar -tvf`` of the stored saveset
    names, with the same types, sizes and links; as JSON too. Another
    client's saveset is refused as if it did not exist. A device shows c
    or b and major,minor, and a name with a newline or a backslash is
    escaped as tar escapes it (they showed "?" and no numbers, and a name
    across two lines; an ESC went to the terminal as it was)."""
    tree = tmp_path / "etc"
    (tree / "ssh").mkdir(parents=True)
    (tree / "ssh" / "sshd_config").write_text("PermitRootLogin no\n")
    (tree / "hosts").write_text("127.0.0.1 localhost\n")
    os.link(tree / "hosts", tree / "hosts.hard")
    (tree / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    os.mkfifo(tree / "fifo")
    os.mknod(tree / "null", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    (tree / "new\nline\\x").write_text("odd\n")
    (tree / "esc\x1b[31mred\x7f").write_text("colours the terminal\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = backed_up(stpd, ini, tree)
        listing = [*ini, "list", saveset, "--server", stpd.address]
        code, out, err = run_sbc(*listing)
        assert code == 0, err
        stored = stpd.daemon.store.root / f"{saveset}.tar"
        gnu = subprocess.run(
            ["tar", "-tvf", str(stored)], capture_output=True, text=True, check=True
        )
        ours, theirs = out.splitlines(), gnu.stdout.splitlines()
        assert len(ours) == len(theirs) == 10
        assert "etc/esc\\033[31mred\\177" in out
        for line, tar_line in zip(ours, theirs, strict=True):
            mode, owner, size, _, name = line.split()[:5]
            tar_mode, tar_owner, tar_size, _, _, tar_name = tar_line.split()[:6]
            assert (mode, owner, size, name) == (
                tar_mode,
                tar_owner,
                tar_size,
                tar_name.rstrip("/"),
            )
            assert line.partition(name)[2] == tar_line.partition(tar_name)[2]  # the link part
        as_json = sbc_json(*listing, "--json")
        assert [(e["name"], e["type"]) for e in as_json] == [  # type: ignore[union-attr, index]
            ("etc", "directory"),
            ("etc/esc\x1b[31mred\x7f", "file"),
            ("etc/fifo", "fifo"),
            ("etc/hosts", "file"),
            ("etc/hosts.hard", "hardlink"),
            ("etc/localtime", "symlink"),
            ("etc/new\nline\\x", "file"),
            ("etc/null", "device"),
            ("etc/ssh", "directory"),
            ("etc/ssh/sshd_config", "file"),
        ]
        [null] = [e for e in as_json if e["name"] == "etc/null"]  # type: ignore[union-attr, index]
        assert null["device"] == {"kind": "char", "major": 1, "minor": 3}  # type: ignore[index]
        other = pki.client_ini("client2")
        code, out, err = run_sbc(
            "--ini-dir", str(other.ini_dir), "list", saveset, "--server", stpd.address
        )
        assert (code, out) == (1, "")
        assert f"no saveset {saveset} for this client" in err


def test_exclude_patterns_leave_out_names_and_paths(pki: Pki, tmp_path: Path) -> None:
    """``--exclude`` as tar's: a pattern without "/" against every entry's
    name, one with "/" against the whole path, or its end when it does not
    begin with "/" ("work/old" left out nothing: it was matched against the
    absolute path alone); an excluded directory is left out with
    everything under it."""
    home = tmp_path / "home"
    for path in ("alice/.cache/big", "alice/notes.txt", "alice/a.tmp", "bob/Downloads/x.iso",
                 "bob/work/report.txt", "bob/work/.cache/c", "bob/work/old/o.txt",
                 "bob/awork/old/kept.txt"):  # fmt: skip
        (home / path).parent.mkdir(parents=True, exist_ok=True)
        (home / path).write_text(path)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(
            *ini, "backup", str(home), "--server", stpd.address, "--json",
            "--exclude", ".cache", "--exclude", "*.tmp", "--exclude", f"{home}/*/Downloads",
            "--exclude", "work/old",
        )  # fmt: skip
        stored = stpd.daemon.store.root / f"{backup['saveset']}.tar"  # type: ignore[index]
        with tarfile.open(stored) as tar:
            names = tar.getnames()
    assert names == [
        "home",
        "home/alice",
        "home/alice/notes.txt",
        "home/bob",
        "home/bob/awork",
        "home/bob/awork/old",
        "home/bob/awork/old/kept.txt",
        "home/bob/work",
        "home/bob/work/report.txt",
    ]
    assert backup["files"] == 3  # type: ignore[index]


def test_savesets_past_the_retention_are_removed_at_start(pki: Pki, tmp_path: Path) -> None:
    """STPD_RETENTION_DAYS=30: a saveset that finished 31 days ago is gone
    (INFO line), one of today is listed and restores."""
    data = tmp_path / "data"
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    source = tmp_path / "f.txt"
    source.write_text("kept\n")
    with running_stpd(pki.layout, level=2, data_dir=data) as stpd:
        old, new = (
            sbc_json(*ini, "backup", str(source), "--server", stpd.address, "--json")["saveset"]  # type: ignore[index]
            for _ in "12"
        )
    meta_path = data / f"{old}.json"
    long_ago = datetime.now(UTC) - timedelta(days=31)
    meta_path.write_text(
        json.dumps(
            {**json.loads(meta_path.read_text()), "finished": f"{long_ago:%Y-%m-%dT%H:%M:%SZ}"}
        )
    )
    with running_stpd(pki.layout, level=2, data_dir=data, retention_days=30) as stpd:
        line = stpd.log.wait_for(rf"removed saveset {old} ")
        assert line.startswith("INFO ") and "older than STPD_RETENTION_DAYS=30" in line
        listed = sbc_json(*ini, "list", "--server", stpd.address, "--json")
        assert [item["saveset"] for item in listed] == [new]  # type: ignore[index, union-attr]
        sbc_json(*ini, "restore", new, str(tmp_path / "back"), "--server", stpd.address, "--json")
    assert sorted(p.name for p in data.glob("SS-*")) == [f"{new}.json", f"{new}.tar"]
    assert (tmp_path / "back" / "f.txt").read_text() == "kept\n"


def test_names_that_are_not_utf_8_back_up_list_and_restore_one_by_one(
    pki: Pki, tmp_path: Path
) -> None:
    """Latin-1 names from an old disk, in the path backed up itself and in
    an entry restored alone: sbc sent the path as UTF-8 and died with a
    UnicodeEncodeError traceback. The source is recorded with \\xNN for
    the bytes UTF-8 lacks; an entry goes by its bytes."""
    source = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    (source / "sub").mkdir(parents=True)
    latin = os.fsdecode(b"r\xe9sum\xe9.txt")
    (source / "sub" / latin).write_text("latin-1 name\n")
    (source / "plain.txt").write_text("plain\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = backed_up(stpd, ini, source)
        [listed] = sbc_json(*ini, "list", "--server", stpd.address, "--json")  # type: ignore[misc]
        assert listed["source"] == f"{tmp_path}/caf\\xe9"
        entry = os.fsdecode(b"caf\xe9/sub/") + latin
        result = sbc_json(
            *ini, "restore", saveset, str(tmp_path / "out"), entry,
            "--server", stpd.address, "--json",
        )  # fmt: skip
    assert (result["extracted"], result.get("not_found")) == (1, None)  # type: ignore[union-attr]
    restored = tmp_path / "out" / os.fsdecode(b"caf\xe9") / "sub" / latin
    assert restored.read_text() == "latin-1 name\n"
    assert not (tmp_path / "out" / os.fsdecode(b"caf\xe9") / "plain.txt").exists()


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_listing_of_names_that_are_not_utf_8_is_whole_under_any_locale(
    pki: Pki, tmp_path: Path, encoding: str
) -> None:
    """`sbc list ID` of a saveset with a latin-1 name stopped there with a
    UnicodeEncodeError traceback and exit status 1 under every locale but
    C (en_US.UTF-8, de_DE.ISO-8859-1: their encodings, here as
    PYTHONIOENCODING sets them). The name's bytes are written in octal as
    `tar -tv` writes them, and a character the locale lacks as \\uNNNN."""
    tree = tmp_path / "old"
    (tree / os.fsdecode(b"d\xe9j\xe0")).mkdir(parents=True)
    (tree / "Łódź").write_text("polish\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        saveset = backed_up(stpd, ini, tree)
        listing = subprocess.run(
            [
                str(Path(sys.executable).parent / "sbc"),
                *ini,
                "list",
                saveset,
                "--server",
                stpd.address,
            ],
            env={**os.environ, "PYTHONIOENCODING": encoding},
            capture_output=True,
            timeout=WAIT_SECONDS,
        )
    assert (listing.returncode, listing.stderr) == (0, b"")
    names = {line.split()[-1] for line in listing.stdout.decode(encoding).splitlines()}
    polish = "Łódź" if encoding == "utf-8" else "\\u0141ód\\u017a"
    assert names == {"old", "old/d\\351j\\340", f"old/{polish}"}


def test_a_directorys_sticky_and_setgid_bits_come_back_a_files_set_id_bits_do_not(
    pki: Pki, tmp_path: Path
) -> None:
    """Every mode was cut to 0o777, so a restored /tmp lost its sticky bit
    and anyone could delete anyone's files there; a team directory lost
    the setgid that gives its files the group. Neither is a privilege. A
    file's set-user-id and set-group-id bits and its capabilities still
    never come back: no privilege comes from a saveset. They were dropped
    without a word, so a restored /usr/bin had a sudo that no longer worked
    and nothing said why: those files are named."""
    tree = tmp_path / "modes"
    modes = {"drop": 0o1777, "team": 0o2775, "both": 0o3770}
    for name, mode in modes.items():
        (tree / name).mkdir(parents=True)
        (tree / name).chmod(mode)
    # Among plain files that the restore makes in C, as the set-id ones.
    for n in range(6):
        (tree / "team" / f"plain{n}").write_text("x\n")
    for name, mode in (("suid", 0o4755), ("sgid", 0o2755), ("team/plain3", 0o6755)):
        (tree / name).write_text("#!/bin/sh\n")
        (tree / name).chmod(mode)
    (tree / "ping").write_bytes(b"\x7fELF")
    os.setxattr(tree / "ping", "security.capability", CAPABILITY)
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        backup = sbc_json(*ini, "backup", str(tree), "--server", stpd.address, "--json")
        saveset = backup["saveset"]  # type: ignore[index]
        restored = sbc_json(
            *ini, "restore", saveset, str(tmp_path / "back"), "--server", stpd.address, "--json"
        )
        code, out, err = run_sbc(
            *ini, "restore", saveset, str(tmp_path / "again"), "--server", stpd.address
        )
    back = tmp_path / "back" / "modes"
    for name, mode in modes.items():
        assert stat.S_IMODE((back / name).stat().st_mode) == mode, name
    for name in ("suid", "sgid", "team/plain3"):
        assert stat.S_IMODE((back / name).stat().st_mode) == 0o755, name
    assert "security.capability" not in os.listxattr(back / "ping")
    unprivileged = ["modes/ping", "modes/sgid", "modes/suid", "modes/team/plain3"]
    assert sorted(restored["unprivileged"]) == unprivileged  # type: ignore[index]
    assert code == 0, err
    assert err == (
        "sbc: warning: restored 4 files without set-user-id or set-group-id bits or file "
        f"capabilities, as no privilege comes from a saveset: {', '.join(restored['unprivileged'])} "  # type: ignore[index]
        "(give them back by hand where you trust the saveset: chmod u+s or g+s, setcap)\n"
    )
    assert "restored saveset" in out


def test_a_backup_of_slash_or_dot_dot_is_named_as_tar_names_it(pki: Pki, tmp_path: Path) -> None:
    """`sbc backup /` stored every member under "root/", so a restore of a
    whole system into / wrote /root/etc; `sbc backup ..` stored "root/"
    too, with ".." in its source. / is stored as "." (as `tar -C / -cf -
    .`), and "dir/.." as the directory it names."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "file.txt").write_text("x\n")
    client = pki.client_ini("client1")
    ini = ["--ini-dir", str(client.ini_dir)]
    with running_stpd(pki.layout, level=2) as stpd:
        server = ["--server", stpd.address]
        up = sbc_json(*ini, "backup", str(tree / "sub" / ".."), *server, "--json")
        assert up["source"] == str(tree)  # type: ignore[index]
        names = [e["name"] for e in sbc_json(*ini, "list", up["saveset"], *server, "--json")]  # type: ignore[index, union-attr]
        assert sorted(names) == ["tree", "tree/file.txt", "tree/sub"]
        # All of / but its top-level entries: the root itself alone.
        whole = sbc_json(*ini, "backup", "/", "--exclude", "/*", *server, "--json")
        [root] = sbc_json(*ini, "list", whole["saveset"], *server, "--json")  # type: ignore[index, misc]
        assert (root["name"], root["type"]) == (".", "directory")  # type: ignore[index]


def test_a_socket_alone_is_nothing_to_back_up(pki: Pki, tmp_path: Path) -> None:
    """A socket cannot be archived: as PATH it gave a warning, an empty
    saveset and exit status 0. It is refused as a PATH on proc is."""
    path = tmp_path / "daemon.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    client = pki.client_ini("client1")
    try:
        with running_stpd(pki.layout, level=2) as stpd:
            code, out, err = run_sbc(
                "--ini-dir", str(client.ini_dir), "backup", str(path), "--server", stpd.address
            )
            assert (code, out) == (1, "")
            assert err == (
                f"sbc: error: nothing to back up: {path} is a socket, which cannot be archived\n"
            )
            assert stpd.daemon.store.all() == []
    finally:
        listener.close()
