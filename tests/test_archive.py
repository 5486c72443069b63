"""sbc.archive: the headers we pack equal tarfile's, and the stream we write
is read back by tarfile and GNU tar."""

from __future__ import annotations

import copy
import grp
import hashlib
import io
import os
import pwd
import random
import stat
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sbc.archive as archive
import sbc.extract as extract
from sbc.archive import TreeStats, member_header
from sbc.extract import RestoreResult, extract_stream
from stpd.tarcheck import TarStreamCheck
from stpd.transfer import BatchReader, BatchWriter
from tests.conftest import (
    restore_bytes,
    swapped_during_restore,
    tar_stream,
    with_holes,
    with_xattrs,
    xattrs_of,
)

LONG_NAMES = [
    "d" * 60 + "/" + "n" * 60,  # ustar: prefix and name
    "d" * 155 + "/" + "n" * 100,  # the longest that fits
    "d" * 156 + "/" + "n" * 10,  # prefix too long: PAX
    "d" * 10 + "/" + "n" * 101,  # name too long: PAX
    "p" * 99 + "/" + "q" * 99 + "/",  # a directory split before its last part
    "p" * 40 + "/" + "ü" * 70,  # not ASCII: PAX
]


def test_member_headers_equal_tarfiles_for_every_shape() -> None:
    """tarfile's PAX format, but ustar's prefix field for a longer name that
    it takes (tarfile's PAX format would give that a PAX header)."""
    rng = random.Random(7)
    for _ in range(5000):
        info = tarfile.TarInfo(
            rng.choice(["a", "dir/b", "x" * 100, "y" * 101, "ü", "d/", *LONG_NAMES])
        )
        info.type = rng.choice(
            [
                tarfile.REGTYPE,
                tarfile.DIRTYPE,
                tarfile.SYMTYPE,
                tarfile.CHRTYPE,
                tarfile.BLKTYPE,
                tarfile.LNKTYPE,
                tarfile.FIFOTYPE,
            ]
        )
        info.mode = rng.randrange(0o10000)
        info.uid, info.gid = rng.choice([0, 1000, 8**7 - 1, 8**7]), rng.choice([0, 5, 8**7])
        info.size = (
            rng.choice([0, 1, 4096, 8**11 - 1, 8**11]) if info.type == tarfile.REGTYPE else 0
        )
        info.mtime = rng.choice([0, 1_500_000_000, 8**11 - 1, 8**11])
        info.linkname = rng.choice(["", "t", "ü", "l" * 100, "l" * 101])
        info.uname, info.gname = (
            rng.choice(["", "root", "u" * 32, "u" * 33, "é"]),
            rng.choice(["", "g"]),
        )
        info.devmajor, info.devminor = rng.randrange(300), rng.randrange(300)
        header = member_header(
            info.name,
            info.type,
            info.mode,
            info.uid,
            info.gid,
            info.size,
            info.mtime,
            info.linkname,
            info.uname,
            info.gname,
            info.devmajor,
            info.devminor,
        )
        pax = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        named_short = copy.copy(info)
        named_short.name = "n"
        try:  # ustar's split, where nothing but the name needs PAX
            if len(named_short.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")) > 512:
                raise ValueError("PAX for another field")
            ustar = info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
        except (ValueError, UnicodeError):
            ustar = b""
        path = info.name + "/" if info.isdir() and not info.name.endswith("/") else info.name
        assert header == (ustar if len(path) > 100 and ustar else pax)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="abcé-", min_size=1, max_size=70), min_size=1, max_size=60))
def test_the_ustar_split_is_tarfiles(parts: list[str]) -> None:
    """Where a long name is split into ustar's prefix and name fields: the
    first "/" that leaves both short enough, as tarfile finds it (a scan of
    the slashes now; joining the parts anew for each split point made a
    tree 1,000 directories deep take 6.6 s instead of 0.2)."""
    assert_split_as_tarfile("/".join(parts))


def test_the_ustar_split_is_tarfiles_at_the_field_sizes() -> None:
    for prefix in range(150, 160):
        for name in range(95, 106):
            assert_split_as_tarfile("a" * prefix + "/" + "b" * name)
            assert_split_as_tarfile("c/" + "a" * (prefix - 2) + "/" + "b" * name)


def assert_split_as_tarfile(path: str) -> None:
    try:
        prefix, name = tarfile.TarInfo()._posix_split_name(path, "utf-8", "strict")  # type: ignore[attr-defined]
        expected = (prefix.encode(), name.encode())
    except ValueError:  # no split fits: a PAX header takes the name
        expected = (b"", path.encode())
    assert archive._ustar_split(path.encode()) == expected


@settings(max_examples=400, deadline=None)
@given(
    name=st.text(st.sampled_from("ab/é."), max_size=3) | st.sampled_from(["x" * 100, "y" * 101]),
    mode=st.integers(0, 0o7777),
    uid=st.sampled_from([0, 1000, 8**7 - 1, 8**7]),
    gid=st.sampled_from([0, 5, 8**7]),
    size=st.sampled_from([0, 1, 4096, 8**11 - 1, 8**11]),
    mtime=st.sampled_from([-1, 0, 1_500_000_000, 8**11 - 1, 8**11]),
)
def test_file_headers_from_templates_equal_member_headers(
    name: str, mode: int, uid: int, gid: int, size: int, mtime: int
) -> None:
    """The fast path for regular files gives member_header's bytes (and so
    tarfile's, above), or declines."""
    fields = (0o100000 | mode, 1, 1, 1, uid, gid, size, 0, mtime, 0)
    stat_result = os.stat_result(fields, {"st_mtime_ns": mtime * 10**9})
    writer = archive.TreeWriter(BatchWriter(lambda batch: None), TreeStats(), "")
    header = writer._file_header(name, stat_result)
    owner, group = archive._known_name(pwd.getpwuid, uid), archive._known_name(grp.getgrgid, gid)
    expected = member_header(name, tarfile.REGTYPE, mode, uid, gid, size, mtime, "", owner, group)
    assert header is None or header == expected
    if len(expected) == tarfile.BLOCKSIZE and name.isascii():
        assert header == expected  # declined only where PAX is needed


def test_written_tree_reads_back(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "data").write_bytes(os.urandom(6_500_000))  # > the ring
    (tree / "ünï").write_text("x")
    (tree / ("n" * 130)).write_text("long")
    (tree / "hard1").write_text("same")
    os.link(tree / "hard1", tree / "hard2")
    (tree / "sym").symlink_to("a/b/data")
    os.mkfifo(tree / "fifo")
    stats = TreeStats()
    data = tar_stream(tree, stats)
    assert len(data) % tarfile.RECORDSIZE == 0
    checker = TarStreamCheck()
    checker.feed(data)
    checker.finish()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("tree/a/b/data").read() == (tree / "a" / "b" / "data").read_bytes()  # type: ignore[union-attr]
    assert members["tree/sym"].linkname == "a/b/data"
    assert members["tree/hard2"].islnk() and members["tree/hard2"].linkname == "tree/hard1"
    assert members["tree/fifo"].isfifo()
    assert "tree/" + "n" * 130 in members and "tree/ünï" in members
    assert stats.files == 4 and stats.links == 2
    listing = subprocess.run(
        ["tar", "-tvf", "-"], input=data, capture_output=True, check=True
    ).stdout.decode()
    assert "tree/ünï" in listing


def test_members_come_in_the_order_of_gnu_tar_which_then_restores_directory_times(
    tmp_path: Path,
) -> None:
    """Each directory's entries sorted, a subdirectory's contents before
    the next entry: what ``tar --sort=name`` stores. GNU tar, extracting,
    sets a directory's time when it leaves it; contents that came later
    (each directory's subdirectories after all its entries) stamped it anew."""
    tree = tmp_path / "tree"
    for path in ("a/b/c/file", "a/b/z", "a/m", "a/n/x", "k", "z/y"):
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(path)
    (tree / "a" / "link").symlink_to("m")
    directories = [tree, *(path for path in tree.rglob("*") if path.is_dir())]
    for n, directory in enumerate(directories):
        os.utime(directory, (0, 1_500_000_000 + n))
    data = tar_stream(tree, TreeStats())
    gnu = subprocess.run(
        ["tar", "--sort=name", "-C", str(tmp_path), "-cf", "-", "tree"],
        capture_output=True,
        check=True,
    ).stdout

    def names(archive: bytes) -> list[str]:
        listing = subprocess.run(
            ["tar", "-tf", "-"], input=archive, capture_output=True, check=True
        )
        return listing.stdout.decode().splitlines()

    assert names(data) == names(gnu)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(out)], input=data, check=True)
    for directory in directories:
        back = out / directory.relative_to(tmp_path)
        assert int(back.stat().st_mtime) == int(directory.stat().st_mtime), back


@pytest.mark.parametrize("change", ["shrinks", "grows", "rewritten"])
def test_a_file_that_changes_while_read_is_stored_at_its_size_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """Stored at the size its header announced, as GNU tar does: padded
    with zeros, or cut; and named. One that grew was cut without a word (a
    log being written to; GNU tar says "file changed as we read it"), and
    one rewritten in place at the same size (a database's pages) was not
    named at all: its modification time moved."""
    victim = tmp_path / change
    victim.write_bytes(b"a" * 5000)
    real_lstat = os.lstat

    def lstat_then_change(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        st = real_lstat(path, *args, **kwargs)
        with victim.open("r+b") as file:  # after its size was taken
            if change == "shrinks":
                file.truncate(100)
            elif change == "grows":
                file.seek(0, os.SEEK_END)
                file.write(b"b" * 100)
            else:
                file.write(b"c" * 5000)
        if change == "rewritten":  # a later second than the stat's (timestamps are coarse)
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_change)
    stats = TreeStats()
    data = tar_stream(victim, stats)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getmember(change).size == 5000
        stored = tar.extractfile(change).read()  # type: ignore[union-attr]
    assert (
        stored
        == {
            "shrinks": b"a" * 100 + bytes(4900),
            "grows": b"a" * 5000,
            "rewritten": b"c" * 5000,
        }[change]
    )
    assert stats.changed == [str(victim)]


def test_restore_from_batches_in_two_reused_buffers(tmp_path: Path) -> None:
    """The restore side gets views into two buffers that take turns, as
    BodyReader(buffers=2) gives them: each get() overwrites the batch before
    the previous one. A view kept past that point (by the file writes that
    overlap the next get, for files of WRITE_BEHIND_BYTES or more) would
    restore garbage."""
    tree = tmp_path / "tree"
    tree.mkdir()
    contents = {
        f"f{n}": os.urandom(size)
        for n, size in enumerate([0, 1, 511, 70_000, 1_500_000, 300_001, 3_000_000])
    }
    for name, content in contents.items():
        (tree / name).write_bytes(content)
    stream = tar_stream(tree, TreeStats())

    rng = random.Random(4)
    buffers = [bytearray(400_000), bytearray(400_000)]
    garbage = os.urandom(400_000)
    position = 0

    def get() -> list[memoryview]:
        nonlocal position
        shared = buffers.pop(0)
        buffers.append(shared)
        size = min(rng.randint(1, len(shared)), len(stream) - position)
        shared[:] = garbage  # at once: what a refill does to old views
        shared[:size] = stream[position : position + size]
        position += size
        cut = rng.randint(0, size)
        view = memoryview(shared)
        return [piece for piece in (view[:cut], view[cut:size]) if len(piece)]

    result = RestoreResult()
    extract_stream(get, tmp_path / "out", result)
    for name, content in contents.items():
        assert (tmp_path / "out" / "tree" / name).read_bytes() == content, name
    assert result.sha256 == hashlib.sha256(stream).hexdigest()
    assert result.bytes == len(stream)


def test_walk_holds_a_directory_as_its_names_only(tmp_path: Path) -> None:
    """About 75 bytes an entry (a name and its place in the list), not the
    145 of an os.DirEntry: a directory of ten million files is 0.7 GB."""
    big = tmp_path / "big"
    big.mkdir()
    for n in range(20_000):
        (big / f"file-{n:07}.dat").touch()
    tracemalloc.start()
    try:
        walked = archive.walk(tmp_path, lambda *args: None)
        next(walked), next(walked), next(walked)  # tmp_path, big, its first file
        held, _ = tracemalloc.get_traced_memory()
        walked.close()
    finally:
        tracemalloc.stop()
    assert held < 20_000 * 100


def test_walk_leaves_no_directory_open_when_done_or_stopped(tmp_path: Path) -> None:
    """walk keeps a directory open while its entries and what is under them
    are walked (each subdirectory is opened relative to it); all are closed
    at the end, and when the walk stops early (a failed backup)."""
    tree = tmp_path / "tree"
    for branch in ("a/b/c", "a/d", "e/f", "g"):
        (tree / branch).mkdir(parents=True)
        (tree / branch / "file").write_text(branch)
    before = len(os.listdir("/proc/self/fd"))
    found = [entry.arcname for entry in archive.walk(tree, lambda *_: None)]
    assert found[:5] == ["tree", "tree/a", "tree/a/b", "tree/a/b/c", "tree/a/b/c/file"]
    assert len(os.listdir("/proc/self/fd")) == before
    for stop_after in range(1, len(found)):
        walking = archive.walk(tree, lambda *_: None)
        for _ in range(stop_after):
            next(walking)
        walking.close()
        assert len(os.listdir("/proc/self/fd")) == before, f"stopped after {stop_after}"


def test_restore_memory_stays_flat_whatever_the_number_of_members(tmp_path: Path) -> None:
    """tarfile keeps every member it reads (about 900 bytes each); the
    restore forgets each once the next is read, so a saveset of ten million
    files does not take gigabytes of the client's memory."""
    members = 8000  # kept, they would take about 4 MB more than the 1 MiB drain buffer
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for number in range(members):
            info = tarfile.TarInfo(f"many/file{number:05}")
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    stream = out.getvalue()
    batches = [[memoryview(stream)]]
    result = RestoreResult()
    tracemalloc.start()
    try:
        extract_stream(lambda: batches.pop() if batches else [], tmp_path / "out", result)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.extracted == members
    assert len(list((tmp_path / "out" / "many").iterdir())) == members
    assert peak < 2_500_000, f"{peak} bytes at the peak of restoring {members} files"


def test_restore_keeps_a_file_where_the_archive_has_a_directory(tmp_path: Path) -> None:
    """Nothing is written under, onto or instead of a path that exists: a
    file or a link that now stands where the backup had a directory stays,
    the directory's contents are listed as kept, and the rest is restored."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "inner").write_text("inner\n")
    (tree / "z").write_text("z\n")
    stream = tar_stream(tree, TreeStats())
    out = tmp_path / "out"
    (out / "tree").mkdir(parents=True)
    (out / "tree" / "d").write_text("a file now\n")

    def extract(overwrite: bool) -> RestoreResult:
        return restore_bytes(stream, out, overwrite=overwrite)

    result = extract(overwrite=False)
    assert result.kept == ["tree/d", "tree/d/inner"]
    assert (out / "tree" / "d").read_text() == "a file now\n"
    assert (out / "tree" / "z").read_text() == "z\n"
    assert result.sha256 == hashlib.sha256(stream).hexdigest()
    # A symbolic link there now is not followed, wherever it points.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "tree" / "d").unlink()
    (out / "tree" / "d").symlink_to(elsewhere)
    assert extract(overwrite=False).kept == ["tree/d", "tree/d/inner", "tree/z"]
    assert list(elsewhere.iterdir()) == []
    # Asked to overwrite, the saveset's directory replaces the link, which
    # is removed, not followed; a directory in the way of a file is not: it
    # is named, and the rest restored.
    (out / "tree" / "z").unlink()
    (out / "tree" / "z").mkdir()
    result = extract(overwrite=True)
    assert result.unrestorable == [
        ("tree/z", "a directory stands there, which --overwrite does not remove")
    ]
    assert (result.kept, (out / "tree" / "z").is_dir()) == ([], True)
    assert (out / "tree" / "d").is_dir() and not (out / "tree" / "d").is_symlink()
    assert list(elsewhere.iterdir()) == []
    (out / "tree" / "z").rmdir()
    assert extract(overwrite=True).kept == []
    assert (out / "tree" / "d" / "inner").read_text() == "inner\n"
    assert (out / "tree" / "z").read_text() == "z\n"


def test_a_saveset_made_by_gnu_tar_of_dot_leaves_the_target_itself_alone(
    tmp_path: Path,
) -> None:
    """``tar -C DIR -cf - .`` (an upload with curl) starts with "./": its
    mode and owner are DIR's, not the target's, which keeps its own."""
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "x").write_text("x\n")
    source.chmod(0o700)
    stream = subprocess.run(
        ["tar", "-C", str(source), "-cf", "-", "."], capture_output=True, check=True
    ).stdout
    target = tmp_path / "target"
    target.mkdir(mode=0o750)
    target.chmod(0o750)
    result = restore_bytes(stream, target)
    assert (target / "sub" / "x").read_text() == "x\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert result.kept == []


def test_nothing_is_written_through_a_link_already_in_the_target(tmp_path: Path) -> None:
    """A saveset member under a path that is a link in the target (here
    without a directory member before it, as a hand-made saveset may be) is
    kept out, with or without --overwrite: the link is never followed."""
    saveset = io.BytesIO()
    with tarfile.open(fileobj=saveset, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("evil/x.txt")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"evil"))
    outside, target = tmp_path / "outside", tmp_path / "target"
    outside.mkdir()
    target.mkdir()
    (target / "evil").symlink_to(outside)
    for overwrite in (False, True):
        result = RestoreResult()
        extract_stream(
            iter([[memoryview(saveset.getvalue())], []]).__next__,
            target,
            result,
            overwrite=overwrite,
        )
        assert result.kept == ["evil/x.txt"]
        assert list(outside.iterdir()) == []


def test_what_appears_where_a_member_goes_after_the_check_is_kept_and_not_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link put where a file goes (to a file of someone else) or a file
    put where a link or a FIFO goes, after SafeMembers looked: kept as they
    are, listed as kept, their owner and mode untouched; the rest is
    restored."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("from the saveset\n")
    (tree / "l").symlink_to("f")
    os.mkfifo(tree / "p")
    (tree / "z").write_text("last\n")
    stream = tar_stream(tree, TreeStats())
    victim = tmp_path / "victim"
    victim.write_text("not to be overwritten\n")
    victim.chmod(0o600)
    out = tmp_path / "out" / "tree"
    planted = {
        "tree/f": lambda: (out / "f").symlink_to(victim),
        "tree/l": lambda: (out / "l").write_text("a file now\n"),
        "tree/p": lambda: (out / "p").write_text("a file now\n"),
    }
    swapped_during_restore(monkeypatch, planted)
    result = restore_bytes(stream, tmp_path / "out")
    assert result.kept == ["tree/f", "tree/l", "tree/p"]
    assert victim.read_text() == "not to be overwritten\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert (out / "f").is_symlink()
    assert (out / "l").read_text() == (out / "p").read_text() == "a file now\n"
    assert (out / "z").read_text() == "last\n"


def _mode_owner_time(st: os.stat_result) -> tuple[int, int, int, float]:
    """What a restore must not have set on something not its own."""
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime


def test_a_directory_replaced_by_a_link_during_the_restore_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its contents go into the directory that was checked (now moved), and
    its owner, mode and time, set at the end, go nowhere: not onto what the
    link points to (a root restore into a home could chmod /etc)."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("in sub\n")
    (tree / "sub").chmod(0o700)
    os.utime(tree / "sub", (1_000_000_000, 1_000_000_000))
    stream = tar_stream(tree, TreeStats())
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o755)
    os.utime(outside, (1_500_000_000, 1_500_000_000))
    before = outside.stat()
    out = tmp_path / "out"
    sub = out / "tree" / "sub"

    def swap() -> None:
        sub.rename(out / "tree" / "moved")
        sub.symlink_to(outside)

    swapped_during_restore(monkeypatch, {"tree/sub/f": swap})
    restore_bytes(stream, out)
    assert list(outside.iterdir()) == []
    assert _mode_owner_time(outside.stat()) == _mode_owner_time(before)
    assert (out / "tree" / "moved" / "f").read_text() == "in sub\n"


def test_what_goes_under_a_parent_replaced_by_a_link_is_kept_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent swapped before the next directory is made: it and what goes
    under it are kept out (as for a link that was there before), and
    nothing of theirs, attributes included, goes where the link points."""
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "f").write_text("in a\n")
    (tree / "b").mkdir()
    (tree / "b" / "g").write_text("in b\n")
    (tree / "b").chmod(0o700)
    stream = tar_stream(tree, TreeStats())
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    out = tmp_path / "out"

    def swap() -> None:
        (out / "tree").rename(out / "moved")
        (out / "tree").symlink_to(outside)

    (outside / "b").chmod(0o755)
    swapped_during_restore(monkeypatch, {"tree/a/f": swap})
    assert restore_bytes(stream, out).kept == ["tree/b", "tree/b/g"]
    assert list((outside / "b").iterdir()) == []
    assert stat.S_IMODE((outside / "b").stat().st_mode) == 0o755
    assert (out / "moved" / "a" / "f").read_text() == "in a\n"


def test_directories_an_archive_does_not_hold_are_made_without_following_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members whose directories the archive does not hold (a tar made by
    hand): tarfile made those with os.makedirs of a path, which followed a
    link put in place after SafeMembers looked, so a root restore made
    directories wherever the link pointed. They are made through the
    target's descriptors: the member under the link is not restored, and
    nothing appears where it points."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive_out:
        info = tarfile.TarInfo("a/s1/f")
        info.size = 2
        archive_out.addfile(info, io.BytesIO(b"ab"))
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    swapped_during_restore(monkeypatch, {"a/s1/f": lambda: (target / "a").symlink_to(outside)})
    result = restore_bytes(out.getvalue(), target)
    assert (result.extracted, result.unrestorable) == (0, [("a/s1/f", "Not a directory: a")])
    assert list(outside.iterdir()) == []
    # Without a link in the way, they are made (0777 less the umask, as tar).
    monkeypatch.undo()
    restore_bytes(out.getvalue(), tmp_path / "plain")
    assert (tmp_path / "plain" / "a" / "s1" / "f").read_bytes() == b"ab"


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_file_linked_where_a_fifo_or_link_was_made_gets_none_of_its_attributes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Someone who may write to the target puts a hard link to a file of
    someone else where the restore has just made a FIFO or a symbolic
    link, before their owner, mode and time are set. Set by name, they
    went to that file: a root restore gave it the member's owner and mode
    (0777 here). They are set on what was opened, if it is what was made."""
    tree = tmp_path / "tree"
    tree.mkdir()
    member = tree / "p"
    if kind == "fifo":
        os.mkfifo(member)
        member.chmod(0o777)
    else:
        member.symlink_to("elsewhere")
    os.lchown(member, 1234, 1234)
    os.utime(member, (1_000_000_000, 1_000_000_000), follow_symlinks=False)
    stream = tar_stream(tree, TreeStats())
    victim = tmp_path / "victim"
    victim.write_text("someone else's\n")
    victim.chmod(0o600)
    before = victim.stat()
    made = tmp_path / "out" / "tree" / "p"
    maker = "makefifo" if kind == "fifo" else "makelink"
    real = getattr(extract._Extraction, maker)

    def make_then_swap(self, tarinfo: tarfile.TarInfo, targetpath: str) -> None:  # type: ignore[no-untyped-def]
        real(self, tarinfo, targetpath)
        if tarinfo.name == "tree/p":
            made.unlink()
            os.link(victim, made)

    monkeypatch.setattr(extract._Extraction, maker, make_then_swap)
    restore_bytes(stream, tmp_path / "out")
    assert _mode_owner_time(victim.stat()) == _mode_owner_time(before)
    # Unhindered, they are set.
    monkeypatch.setattr(extract._Extraction, maker, real)
    restore_bytes(stream, tmp_path / "plain")
    back = (tmp_path / "plain" / "tree" / "p").lstat()
    assert (back.st_uid, back.st_mtime) == (1234, 1_000_000_000)
    if kind == "fifo":
        assert stat.S_IMODE(back.st_mode) == 0o777


def _interrupted_in_b(tmp_path: Path, *, overwrite: bool = False) -> tuple[bytes, RestoreResult]:
    """tree/ of a whole file "a" and a larger "b", restored into out/ until
    Ctrl-C comes part-way through b: its stream, and the result."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("whole\n")
    (tree / "b").write_bytes(os.urandom(200_000))
    stream = tar_stream(tree, TreeStats())
    pieces = [memoryview(stream[:150_000])]

    def get() -> list[memoryview]:
        if pieces:
            return [pieces.pop()]
        raise KeyboardInterrupt

    result = RestoreResult()
    with pytest.raises(KeyboardInterrupt):
        extract_stream(get, tmp_path / "out", result, overwrite=overwrite)
    return stream, result


def test_an_interrupted_restore_leaves_no_incomplete_file(tmp_path: Path) -> None:
    """Ctrl-C (or anything else) part-way through a file: the files before
    it stay, the one in progress goes, and the interruption goes on up."""
    _, result = _interrupted_in_b(tmp_path)
    assert result.removed == "tree/b"
    assert (tmp_path / "out" / "tree" / "a").read_text() == "whole\n"
    assert not (tmp_path / "out" / "tree" / "b").exists()


def test_an_interrupted_overwrite_leaves_the_old_file(tmp_path: Path) -> None:
    """--overwrite removed what stood there first: a restore stopped part-way
    through that file (Ctrl-C, a full disk) left neither the old one nor the
    new. The new one replaces the old once whole; until then it has a name
    of its own, which goes when the restore stops."""
    out = tmp_path / "out" / "tree"
    out.mkdir(parents=True)
    (out / "a").write_text("old a\n")
    (out / "b").write_text("old b\n")
    stream, result = _interrupted_in_b(tmp_path, overwrite=True)
    assert result.removed is None  # (the file under its name is the old one)
    assert (out / "a").read_text() == "whole\n"
    assert (out / "b").read_text() == "old b\n"
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    # Whole, it replaces the old one (a link is replaced, not written through).
    (out / "b").unlink()
    (out / "b").symlink_to(tmp_path / "victim")
    restore_bytes(stream, tmp_path / "out", overwrite=True)
    assert (out / "b").read_bytes() == (tmp_path / "tree" / "b").read_bytes()
    assert not (out / "b").is_symlink() and not (tmp_path / "victim").exists()
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]


def test_owners_come_back_by_name_where_known_else_by_number(tmp_path: Path) -> None:
    """As tar does when run as root (as the suite is)."""
    nobody = pwd.getpwnam("nobody")
    saveset = io.BytesIO()
    with tarfile.open(fileobj=saveset, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, uname, uid, gid in (
            ("known", "nobody", 1234, 2345),
            ("unknown", "no-such-user-x", 4321, 5432),
        ):
            info = tarfile.TarInfo(name)
            info.uname, info.uid, info.gname, info.gid = uname, uid, "no-such-group-x", gid
            archive.addfile(info, io.BytesIO(b""))
    restore_bytes(saveset.getvalue(), tmp_path)
    known, unknown = (tmp_path / "known").stat(), (tmp_path / "unknown").stat()
    assert (known.st_uid, known.st_gid) == (nobody.pw_uid, 2345)
    assert (unknown.st_uid, unknown.st_gid) == (4321, 5432)


READ_SIZES = st.sampled_from([0, 1, 512, 65_535, 65_536, 262_144, 1 << 20, (1 << 20) + 1, -1])


@settings(max_examples=80, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=300_000), max_size=10),
    sizes=st.lists(READ_SIZES | st.integers(0, 400_000), max_size=16),
)
def test_batch_reader_reads_exactly_what_is_asked(pieces: list[bytes], sizes: list[int]) -> None:
    """Every read gives the next bytes of the stream, whatever the piece
    boundaries; each batch (two pieces) lives in buffers that are scribbled
    over when the next batch is asked for, as BodyReader's buffer is."""
    stream = b"".join(pieces)
    batches = [pieces[i : i + 2] for i in range(0, len(pieces), 2)]
    live: list[bytearray] = []

    def get() -> list[memoryview]:
        for buffer in live:
            buffer[:] = bytes(len(buffer))
        live[:] = [bytearray(piece) for piece in (batches.pop(0) if batches else [])]
        return [memoryview(buffer) for buffer in live]

    reader = BatchReader(get)
    position = 0
    for size in sizes:
        got = reader.read(size)
        assert type(got) is bytes  # tarfile parses what it reads: a view failed it
        expected = stream[position:] if size < 0 else stream[position : position + size]
        assert got == expected
        position += len(got)
        assert reader.tell() == position


def test_read_view_gives_the_pieces_as_they_lie() -> None:
    """read_view (the write-behind copy of a large file) takes at most the
    rest of the current piece, uncopied, and is empty only at the end."""
    pieces = [bytearray(os.urandom(size)) for size in (1000, 3000)]
    batches = [[memoryview(piece) for piece in pieces]]
    reader = BatchReader(lambda: batches.pop(0) if batches else [])
    assert bytes(reader.read(10)) == pieces[0][:10]
    views = [reader.read_view(2500) for _ in range(4)]
    assert [len(v) for v in views] == [990, 2500, 500, 0]
    assert views[1].obj is pieces[1]  # a view into the received buffer: no copy
    assert b"".join(views) == pieces[0][10:] + pieces[1]
    assert reader.tell() == 4000


def test_restore_of_a_gnu_sparse_member(tmp_path: Path) -> None:
    """A saveset made by ``tar -S`` (uploaded with curl, say) holds sparse
    members: they come back whole, holes as zeros."""
    source = tmp_path / "src"
    source.mkdir()
    with open(source / "holes", "wb") as f:
        f.seek(5_000_000)
        f.write(os.urandom(10_000))
        f.seek(9_000_000)
        f.write(b"end")
    archive = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", "--format=gnu", "-S", "-cf", str(archive), "-C", str(source), "holes"], check=True
    )
    with tarfile.open(archive) as tar:
        assert tar.getmember("holes").type == tarfile.GNUTYPE_SPARSE
    restore_bytes(archive.read_bytes(), tmp_path / "out")
    assert (tmp_path / "out" / "holes").read_bytes() == (source / "holes").read_bytes()


# -- extended attributes ------------------------------------------------------------


def gnu_tar(*argv: str, stream: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["tar", *argv], input=stream, capture_output=True, check=False)


def test_extended_attributes_are_stored_as_gnu_tar_stores_them_and_come_back(
    tmp_path: Path,
) -> None:
    """ACLs, a file capability and user and trusted attributes: GNU tar
    lists and extracts them from our stream without a warning, and so does
    our restore, in one piece or in pieces of any size, but for the
    capability: privileges do not come from a saveset, as set-id bits do
    not. SELinux labels are not stored."""
    tree = with_xattrs(tmp_path)
    expected = xattrs_of(tree)
    assert expected["dir/ping"].keys() == {"security.capability", "user.binary"}
    stats = TreeStats()
    stream = tar_stream(tree, stats)
    assert stats.unreadable == []

    listed = gnu_tar("--xattrs", "--xattrs-include=*", "-tvvf", "-", stream=stream)
    assert (listed.returncode, listed.stderr) == (0, b"")
    assert b"  x: 20 security.capability\n" in listed.stdout
    assert b"security.selinux" not in listed.stdout
    (tmp_path / "gnu").mkdir()
    extracted = gnu_tar(
        "--xattrs", "--xattrs-include=*", "-xpf", "-", "-C", str(tmp_path / "gnu"), stream=stream
    )
    assert (extracted.returncode, extracted.stderr) == (0, b"")
    assert xattrs_of(tmp_path / "gnu" / "xattrs") == expected

    for seed in (None, 1, 2):
        target = tmp_path / f"ours-{seed}"
        result = restore_bytes(stream, target, seed=seed)
        assert result.unrestorable == []
        assert xattrs_of(target / "xattrs") == xattrs_of(tree, restored=True), seed
    assert os.listxattr(target / "xattrs" / "dir" / "ping") == ["user.binary"]
    # The ACL's mask is the group bits of the mode: both came back.
    assert stat.S_IMODE((target / "xattrs" / "shared.txt").stat().st_mode) == 0o640


def test_a_name_that_is_not_utf8_is_stored_as_its_bytes_without_a_warning_from_gnu_tar(
    tmp_path: Path,
) -> None:
    """An old file named in Latin-1: tarfile marks such a record
    hdrcharset=BINARY, which GNU tar 1.34 warns about at every member; we
    leave the mark out, and both read the bytes as they are."""
    tree = tmp_path / "old"
    tree.mkdir()
    latin1 = os.path.join(os.fsencode(tree), b"caf\xe9.txt")
    for name in (latin1, os.path.join(os.fsencode(tree), b"na\xefve.txt")):
        with open(name, "wb") as old:
            old.write(b"x")
    os.setxattr(latin1, "user.note", b"\xe9t\xe9")  # records of ours as well
    stream = tar_stream(tree, TreeStats())
    assert b"hdrcharset" not in stream
    listed = gnu_tar("-tf", "-", stream=stream)
    assert (listed.returncode, listed.stdout, listed.stderr) == (
        0,
        b"old/\nold/caf\\351.txt\nold/na\\357ve.txt\n",
        b"",
    )
    (tmp_path / "gnu").mkdir()
    assert gnu_tar("-xf", "-", "-C", str(tmp_path / "gnu"), stream=stream).returncode == 0
    for seed in (None, 1):
        restore_bytes(stream, tmp_path / f"ours-{seed}", seed=seed)
    for target in (tmp_path / "gnu", tmp_path / "ours-None", tmp_path / "ours-1"):
        assert sorted(os.listdir(os.fsencode(target / "old"))) == [b"caf\xe9.txt", b"na\xefve.txt"]
    assert (
        os.getxattr(
            os.path.join(os.fsencode(tmp_path / "ours-1" / "old"), b"caf\xe9.txt"), "user.note"
        )
        == b"\xe9t\xe9"
    )


def test_an_nfs4_acl_restored_off_nfs_is_left_out_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file backed up from NFS has one; a local file system has no
    such attribute (EOPNOTSUPP), and one warning a file would drown the
    rest. Other attributes of the file come back."""
    tree = tmp_path / "share"
    tree.mkdir()
    (tree / "report.txt").write_text("from the NAS\n")
    os.setxattr(tree / "report.txt", "user.origin", b"nas")
    real_read = archive.read_xattrs

    def as_over_nfs(target: int | str) -> dict[str, bytes]:
        return {**real_read(target), "system.nfs4_acl": b"\0\0\0\1" + bytes(36)}

    monkeypatch.setattr(archive, "read_xattrs", as_over_nfs)
    stream = tar_stream(tree, TreeStats())
    assert stream.count(b"SCHILY.xattr.system.nfs4_acl=") == 2  # the directory's and the file's
    result = restore_bytes(stream, tmp_path / "back")
    assert result.unrestorable == []
    assert xattrs_of(tmp_path / "back" / "share")["report.txt"] == {"user.origin": b"nas"}


def test_extended_attributes_of_a_gnu_tar_archive_are_restored(tmp_path: Path) -> None:
    tree = with_xattrs(tmp_path)
    made = gnu_tar("--xattrs", "--xattrs-include=*", "-cf", "-", "-C", str(tmp_path), "xattrs")
    assert made.returncode == 0, made.stderr
    result = restore_bytes(made.stdout, tmp_path / "back")
    assert result.unrestorable == []
    assert xattrs_of(tmp_path / "back" / "xattrs") == xattrs_of(tree, restored=True)


def test_extended_attributes_that_cannot_be_read_or_stored_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry is stored without them, and the backup goes on."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "odd").write_text("odd\n")
    os.setxattr(tree / "odd", "user.a=b", b"tar's records end a name at '='")
    os.setxattr(tree / "odd", "user.fine", b"kept")
    (tree / "locked").write_text("locked\n")
    real_listxattr = os.listxattr

    def listxattr(target: int | str, **kwargs: bool) -> list[str]:
        if isinstance(target, int) and os.readlink(f"/proc/self/fd/{target}").endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_listxattr(target, **kwargs)

    monkeypatch.setattr(os, "listxattr", listxattr)
    stats = TreeStats()
    stream = tar_stream(tree, stats)
    assert stats.unreadable == [
        (str(tree / "locked"), "extended attributes: Permission denied; stored without them"),
        (str(tree / "odd"), "extended attribute 'user.a=b': a name tar cannot hold; left out"),
    ]
    result = restore_bytes(stream, tmp_path / "back")
    assert (tmp_path / "back" / "tree" / "locked").read_text() == "locked\n"
    assert xattrs_of(tmp_path / "back" / "tree")["odd"] == {"user.fine": b"kept"}
    assert result.unrestorable == []


def test_an_extended_attribute_that_cannot_be_set_is_reported_and_the_rest_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a user, trusted attributes cannot be set; on some file systems
    none can. The restore goes on."""
    tree = with_xattrs(tmp_path)
    stream = tar_stream(tree, TreeStats())
    real_setxattr = os.setxattr

    def setxattr(target: int | str, name: str, value: bytes, **kwargs: bool) -> None:
        if name.startswith("trusted."):
            raise PermissionError(1, "Operation not permitted")
        real_setxattr(target, name, value, **kwargs)

    monkeypatch.setattr(os, "setxattr", setxattr)
    result = restore_bytes(stream, tmp_path / "back")
    why = "its extended attribute {} was not restored: Operation not permitted"
    assert result.unrestorable == [("xattrs/link", why.format("trusted.origin"))]
    restored = xattrs_of(tmp_path / "back" / "xattrs")
    assert restored["dir/ping"] == {"user.binary": b"\xff\x00\xfe"}
    assert restored["dir"] == xattrs_of(tree)["dir"]


# -- files with holes ----------------------------------------------------------------


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_files_with_holes_are_stored_as_gnu_tar_stores_them_and_restored_with_holes(
    tmp_path: Path,
) -> None:
    """The holes of 79 MiB of sparse files take no room in the saveset, GNU
    tar lists and extracts it as ours restores it: same names, sizes and
    contents, and holes again."""
    tree = with_holes(tmp_path)
    stats = TreeStats()
    stream = tar_stream(tree, stats)
    assert len(stream) < 100_000
    assert (stats.files, stats.changed, stats.unreadable) == (13, [], [])
    with tarfile.open(fileobj=io.BytesIO(stream)) as saved:
        image = saved.getmember("holes/disk.img")
        assert (image.size, image.sparse) == (
            64 << 20,
            [(0, 4096), (32 << 20, 8192), (64 << 20, 0)],
        )  # type: ignore[attr-defined]
        assert saved.getmember("holes/empty.img").sparse == [(10 << 20, 0)]  # type: ignore[attr-defined]

    listed = gnu_tar("-tvf", "-", stream=stream)
    assert (listed.returncode, listed.stderr) == (0, b"")
    sizes = {
        line.split(maxsplit=5)[5]: int(line.split()[2])
        for line in listed.stdout.decode().splitlines()
    }
    assert sizes["holes/disk.img"] == 64 << 20
    assert sizes["holes/" + "ünïcödé " * 20] == (5 << 20) + 7
    (tmp_path / "gnu").mkdir()
    extracted = gnu_tar("-xpf", "-", "-C", str(tmp_path / "gnu"), stream=stream)
    assert (extracted.returncode, extracted.stderr) == (0, b"")

    targets = [tmp_path / "gnu"]
    for seed in (None, 1, 2):
        targets.append(tmp_path / f"ours-{seed}")
        assert restore_bytes(stream, targets[-1], seed=seed).unrestorable == []
    for target in targets:
        back = target / "holes"
        assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in tree.iterdir())
        for path in tree.iterdir():
            assert (back / path.name).read_bytes() == path.read_bytes(), (target, path.name)
        assert allocated(back / "disk.img") <= 64 * 1024
        assert allocated(back / "empty.img") == 0
    assert xattrs_of(tmp_path / "ours-None" / "holes")["ünïcödé " * 20] == {"user.note": b"sparse"}


def test_a_sparse_member_past_8_gib_of_data_keeps_its_size_in_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 8 GiB of data a sparse member's size goes in base-256 into the
    header's field, not into a PAX record, after which tarfile would look
    for the next member in the wrong place. Both tars read such a field;
    here every size is written so, as 8 GiB of test data would take long."""
    assert archive.size_field(8**11 - 1) == b"77777777777\0"
    big = archive._with_size(tarfile.TarInfo("big").tobuf(tarfile.USTAR_FORMAT), 8**11 + 5)
    assert tarfile.TarInfo.frombuf(big, "utf-8", "strict").size == 8**11 + 5  # checksum too

    monkeypatch.setattr(archive, "size_field", lambda size: b"\x80" + size.to_bytes(11, "big"))
    tree = with_holes(tmp_path)
    stream = tar_stream(tree, TreeStats())
    with tarfile.open(fileobj=io.BytesIO(stream)) as saved:
        assert saved.getnames() == [
            "holes", "holes/disk.img", "holes/empty.img", *(f"holes/plain{n}" for n in range(10)),
            "holes/" + "ünïcödé " * 20,
        ]  # fmt: skip
    listed = gnu_tar("-tf", "-", stream=stream)
    assert (listed.returncode, listed.stderr) == (0, b"")
    (tmp_path / "gnu").mkdir()
    assert gnu_tar("-xf", "-", "-C", str(tmp_path / "gnu"), stream=stream).returncode == 0
    restore_bytes(stream, tmp_path / "ours", seed=5)
    for target in (tmp_path / "gnu", tmp_path / "ours"):
        for path in tree.iterdir():
            assert (target / "holes" / path.name).read_bytes() == path.read_bytes()


def test_a_file_with_holes_that_shrinks_while_read_is_padded_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a file without holes: stored at the size the walk saw."""
    victim = tmp_path / "shrinks.img"
    with open(victim, "wb") as image:
        image.truncate(8 << 20)
        image.write(b"a" * 5000)
        image.seek(4 << 20)
        image.write(b"b" * 5000)
    real_regions = archive.data_regions

    def regions_then_truncate(fd: int, st: os.stat_result) -> list[tuple[int, int]] | None:
        found = real_regions(fd, st)
        os.truncate(victim, 100)  # after its regions were found
        return found

    monkeypatch.setattr(archive, "data_regions", regions_then_truncate)
    stats = TreeStats()
    stream = tar_stream(victim, stats)
    assert stats.changed == [str(victim)]
    result = restore_bytes(stream, tmp_path / "back")
    assert result.unrestorable == []
    assert (tmp_path / "back" / "shrinks.img").read_bytes() == b"a" * 100 + bytes((8 << 20) - 100)


# Run with tarfile as Python 3.11.0 to 3.11.3 have it (Debian 12's python3 is
# 3.11.2): without the extraction filters of PEP 706, which came in 3.11.4.
WITHOUT_EXTRACTION_FILTERS = """
import io, sys, tarfile
from pathlib import Path

for name in ("FilterError", "AbsolutePathError", "OutsideDestinationError",
             "SpecialFileError", "AbsoluteLinkError", "LinkOutsideDestinationError",
             "fully_trusted_filter", "tar_filter", "data_filter"):
    if hasattr(tarfile, name):  # where they are not to begin with, as they are
        delattr(tarfile, name)
for owner, name in ((tarfile.TarInfo, "replace"), (tarfile.TarFile, "extraction_filter")):
    if hasattr(owner, name):
        delattr(owner, name)

from sbc.archive import ArchiveError
from sbc.extract import RestoreResult, extract_stream

def archive(*members):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
                continue
            info.linkname = value
            tar.addfile(info)
    return out.getvalue()

def restore(data, target):
    pieces = [memoryview(data)]
    extract_stream(lambda: [pieces.pop()] if pieces else [], target, RestoreResult())

target = Path(sys.argv[1])
restore(archive(("d", tarfile.DIRTYPE, ""), ("d/f", tarfile.REGTYPE, b"data"),
                ("s", tarfile.SYMTYPE, "d/f"), ("h", tarfile.LNKTYPE, "d/f")), target / "ok")
assert (target / "ok/s").read_bytes() == b"data" and (target / "ok/s").is_symlink()
assert (target / "ok/h").stat().st_ino == (target / "ok/d/f").stat().st_ino
for name, kind, value in [("../out", tarfile.REGTYPE, b"x"), ("h", tarfile.LNKTYPE, "/etc/passwd"),
                          ("h", tarfile.LNKTYPE, "../out")]:
    try:
        restore(archive((name, kind, value)), target / "bad")
    except ArchiveError as exc:
        print(exc)
    else:
        raise SystemExit(f"{name} -> {value} was restored")
"""


def test_restore_works_without_tarfiles_extraction_filters(tmp_path: Path) -> None:
    """sbc's checks of what a restore may write are its own (SafeMembers):
    it runs on Pythons before 3.11.4, as Debian 12's python3, and refuses
    there what it refuses here."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRACTION_FILTERS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "refused an unsafe archive member: member '../out' contains '..'; restore stopped "
        "there, nothing was written outside the target directory",
        "refused an unsafe archive member: hard link target '/etc/passwd' is an absolute "
        "path; restore stopped there, nothing was written outside the target directory",
        "refused an unsafe archive member: hard link target '../out' contains '..'; restore "
        "stopped there, nothing was written outside the target directory",
    ]
    assert not (tmp_path / "out").exists()


def test_mtimes_are_stored_in_whole_seconds_rounded_down(tmp_path: Path) -> None:
    """int() rounds toward zero: a time before 1970 with a fraction came
    back a second later (1969-12-31 23:59:59.5 as 1970-01-01 00:00:00, in
    another year). Whole seconds are the floor, as tar's are."""
    tree = tmp_path / "tree"
    tree.mkdir()
    times = {
        "before-1970": -500_000_000,  # -0.5 s
        "in-1950": -618_062_399_876_543_211,
        "after-1970": 1_500_000_000_700_000_000,
    }
    for name, ns in times.items():
        (tree / name).write_text(name)
        os.utime(tree / name, ns=(ns, ns))
    with tarfile.open(fileobj=io.BytesIO(tar_stream(tree, TreeStats()))) as tar:
        stored = {m.name: m.mtime for m in tar.getmembers()}
    for name, ns in times.items():
        assert stored[f"tree/{name}"] == ns // 10**9, name
