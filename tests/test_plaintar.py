"""The runs of plain tar members in C (stpd/_plaintar.c), that a restore
makes, a backup stores and stpd checks: the same files, owners, modes and
times, the same tar stream, the same verdicts and results as the Python
way, and every case they do not take left to that way (sbc backup and
restore over TLS run them all in tests/test_transfer_roundtrip.py)."""

from __future__ import annotations

import errno
import functools
import io
import os
import random
import resource
import tarfile
from pathlib import Path

import pytest

from sbc import archive
from sbc.archive import ArchiveError, TreeStats
from sbc.extract import RestoreResult
from stpd import _plaintar
from stpd.tarcheck import InvalidTar, TarStreamCheck, block_sum
from stpd.transfer import BatchWriter
from tests.conftest import plain_files_the_python_way, restore_bytes, tar_stream

# -- restores: make_files ------------------------------------------------------

# (uname, uid, gname, gid): by name where this machine knows it, else by number
OWNERS = [
    ("root", 0, "root", 0),
    ("nobody", 1234, "no-such-group-x", 2345),
    ("no-such-user-x", 4321, "no-such-group-x", 5432),
]
SIZES = [0, 1, 511, 512, 513, 4096, 10_000, 70_000]
MODES = [0o644, 0o600, 0o755, 0o777, 0o400, 0o711]


def member(
    name: str, size: int = 0, *, n: int = 0, kind: bytes = tarfile.REGTYPE
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    info.mode = MODES[n % len(MODES)] if kind == tarfile.REGTYPE else 0o755
    info.mtime = 1_600_000_000 + 7919 * n
    info.uname, info.uid, info.gname, info.gid = OWNERS[(n // 10) % len(OWNERS)]
    return info


def saveset(format: int) -> bytes:
    """Directories of files of every size, mode and owner above, with what a
    run stops at between them: links, a directory, a PAX header, names
    spelled with "./", and (ustar) a name split into prefix and name."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format) as archive:
        archive.addfile(member("t", kind=tarfile.DIRTYPE))
        deep = "t/" + "d" * 120  # ustar: stored as prefix "t/ddd..." and name
        for directory in ("t/a", "./t/b", deep):
            archive.addfile(member(directory, kind=tarfile.DIRTYPE))
            for n in range(30):
                size = SIZES[n % len(SIZES)]
                data = random.Random(n).randbytes(size)
                archive.addfile(member(f"{directory}/f{n}", size, n=n), io.BytesIO(data))
                if n == 10:
                    link = member(f"{directory}/link", kind=tarfile.SYMTYPE)
                    link.linkname = "f0"
                    archive.addfile(link)
                if n == 20:
                    hard = member(f"{directory}/hard", kind=tarfile.LNKTYPE)
                    hard.linkname = "t/a/f3"
                    archive.addfile(hard)
                if n == 25:  # a run ends at it: Python restores it without them, and names it
                    setid = member(f"{directory}/set-id", 2, n=n)
                    setid.mode = 0o4755 if directory == "t/a" else 0o2711
                    archive.addfile(setid, io.BytesIO(b"id"))
        # Files of two directories in a row, named alike but for the directory.
        archive.addfile(member("t/a/x1", 1), io.BytesIO(b"a"))
        archive.addfile(member("t/b/x2", 1), io.BytesIO(b"b"))
        if format == tarfile.PAX_FORMAT:  # PAX headers of their own, then plain members
            info = member("t/a/jörg", 3)  # an owner name not in ASCII
            info.uname = "jörg"
            archive.addfile(info, io.BytesIO(b"abc"))
            archive.addfile(member("t/a/after-pax", 2, n=1), io.BytesIO(b"ok"))
            # A uid too large for its field (a PAX record; 0 in the field), then
            # a file whose owner fields are those of the PAX header's own header.
            for name, uid in (("large-uid", 70_000_000), ("zero-uid", 0)):
                info = member(f"t/a/{name}", 1)
                info.uname, info.uid, info.gname, info.gid = "", uid, "", 0
                archive.addfile(info, io.BytesIO(b"1"))
    return out.getvalue()


def state(root: Path) -> dict[str, tuple[object, ...]]:
    """Type, mode, owner, time and content (or link) of everything below root."""
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        what: object = os.readlink(path) if path.is_symlink() else None
        if path.is_file() and not path.is_symlink():
            what = path.read_bytes()
        found[str(path.relative_to(root))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            int(st.st_mtime) if not path.is_dir() else None,
            what,
        )
    return found


def counting_runs(monkeypatch: pytest.MonkeyPatch, function: str = "make_files") -> list[int]:
    """The number of files (members) each call of make_files (pack_files,
    scan_members) took."""
    made: list[int] = []
    real = getattr(_plaintar, function)

    def run(*args: object) -> tuple[int, int]:
        first, second = real(*args)
        made.append(first if function == "pack_files" else second)
        return first, second

    monkeypatch.setattr(_plaintar, function, run)
    return made


def restore_both_ways(
    stream: bytes, root: Path, monkeypatch: pytest.MonkeyPatch, seed: int | None = None
) -> tuple[RestoreResult, list[int]]:
    """``stream`` restored the Python way into root/python, then with runs
    in C into root/c: the trees and the results must be the same. The
    result, and the files each run made."""
    with monkeypatch.context() as python_only:
        plain_files_the_python_way(python_only)
        expected = restore_bytes(stream, root / "python", seed=seed)
    made = counting_runs(monkeypatch)
    result = restore_bytes(stream, root / "c", seed=seed)
    assert state(root / "c") == state(root / "python")
    assert result == expected
    return result, made


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("seed", [None, 1, 2])
def test_runs_in_c_restore_what_the_python_way_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, format: int, seed: int | None
) -> None:
    stream = saveset(format)
    result, made = restore_both_ways(stream, tmp_path, monkeypatch, seed)
    with tarfile.open(fileobj=io.BytesIO(stream)) as archive:
        assert result.members == result.extracted == len(archive.getmembers())
    assert result.unprivileged == [f"{d}/set-id" for d in ("t/a", "t/b", "t/" + "d" * 120)]
    if format == tarfile.GNU_FORMAT:  # not ustar: all left to tarfile, as _plain_fields does
        assert sum(made) == 0
    else:  # of the 90 files (those of the deep directory have PAX headers in PAX format)
        assert sum(made) >= (45 if seed is None else 25)
    # As the suite runs as root: owners by name where known, else by number.
    c = tmp_path / "c" / "t" / "a"
    assert [(c / f"f{n}").stat().st_uid for n in (0, 10, 20)] == [0, 65534, 4321]
    if format == tarfile.PAX_FORMAT:
        assert [(c / name).stat().st_uid for name in ("large-uid", "zero-uid")] == [70_000_000, 0]


def test_runs_of_a_restore_not_as_root_leave_owners_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not as root (as tar), owners are not set: the files are the user's."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    _, made = restore_both_ways(saveset(tarfile.USTAR_FORMAT), tmp_path, monkeypatch)
    assert {path.stat().st_uid for path in (tmp_path / "c").rglob("f*")} == {os.getuid()}
    assert sum(made) >= 80  # of the 90 files: owners no longer end runs


def test_a_run_keeps_what_stands_in_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = saveset(tarfile.USTAR_FORMAT)
    for place in ("python", "c"):
        (tmp_path / place / "t" / "a").mkdir(parents=True)
        for n in (3, 7):
            (tmp_path / place / "t" / "a" / f"f{n}").write_text("mine\n")
    result, made = restore_both_ways(stream, tmp_path, monkeypatch)
    assert result.kept == ["t/a/f3", "t/a/f7"]
    assert (tmp_path / "c" / "t" / "a" / "f3").read_text() == "mine\n"
    assert sum(made) >= 60


def test_a_run_writes_nothing_through_a_link_in_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member a level deeper than the run's directory is not the run's:
    its parent in the target (here a link put there) is for the Python
    way, which reaches it with O_NOFOLLOW and keeps the member out."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        archive.addfile(member("t", kind=tarfile.DIRTYPE))
        for name in ("t/f0", "t/f1", "t/sub/y", "t/f2"):
            archive.addfile(member(name, 2), io.BytesIO(b"hi"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "back" / "t").mkdir(parents=True)
    (tmp_path / "back" / "t" / "sub").symlink_to(elsewhere)
    made = counting_runs(monkeypatch)
    result = restore_bytes(out.getvalue(), tmp_path / "back")
    assert result.kept == ["t/sub/y"]
    assert list(elsewhere.iterdir()) == []
    assert made == [1, 0]  # f1; then f2, after the Python way kept t/sub/y, starts none


def test_a_damaged_header_stops_the_restore_both_ways_where_tarfile_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        archive.addfile(member("t", kind=tarfile.DIRTYPE))
        for n in range(6):
            archive.addfile(member(f"t/f{n}", 2), io.BytesIO(b"hi"))
    stream = bytearray(out.getvalue())
    f3 = 512 * (1 + 2 * 3)  # t, then a header and a data block per file
    assert stream[f3 : f3 + 4] == b"t/f3"
    stream[f3 + 148 : f3 + 154] = b"000001"  # its checksum
    # tarfile ends at such a header as at the end of the archive: the
    # restore said all was well with three files of six. Both ways stop
    # there now, and say so, with the same files made.
    for way in ("python", "c"):
        with monkeypatch.context() as patch:
            if way == "python":
                plain_files_the_python_way(patch)
            with pytest.raises(ArchiveError, match=f"damaged: no valid tar header at byte {f3}$"):
                restore_bytes(bytes(stream), tmp_path / way)
    assert state(tmp_path / "c") == state(tmp_path / "python")
    assert sorted(p.name for p in (tmp_path / "c" / "t").iterdir()) == ["f0", "f1", "f2"]


def test_a_stream_that_ends_in_the_padding_of_a_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As tarfile refuses it: a run does not take a file whose padding is
    not all there."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        archive.addfile(member("t", kind=tarfile.DIRTYPE))
        for n in range(4):
            archive.addfile(member(f"t/f{n}", 2), io.BytesIO(b"hi"))
    cut = out.getvalue()[: 512 * (1 + 2 * 3) + 512 + 10]  # in the padding of f3
    made = counting_runs(monkeypatch)
    with pytest.raises(ArchiveError, match="not a valid tar archive: unexpected end of data"):
        restore_bytes(cut, tmp_path / "back")
    assert made == [2]  # f1 and f2
    assert sorted(p.name for p in (tmp_path / "back" / "t").iterdir()) == ["f0", "f1", "f2", "f3"]


def test_a_file_named_as_a_link_that_could_not_be_made_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on FAT, where no link can be made: SafeMembers refuses a later
    file of the link's name, which a run in C, knowing no names, would make."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        archive.addfile(member("t/x", kind=tarfile.SYMTYPE))
        for name in ("t/a", "t/b", "t/x", "t/z"):
            archive.addfile(member(name, 2), io.BytesIO(b"hi"))

    def like_fat(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "symlink", like_fat)
    with pytest.raises(ArchiveError, match="refused an unsafe archive member: member 't/x'"):
        restore_bytes(out.getvalue(), tmp_path / "back")
    assert sorted(p.name for p in (tmp_path / "back" / "t").iterdir()) == ["a", "b"]


def test_a_file_that_cannot_be_written_whole_stops_the_restore_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails in a run (here: past the file size limit, as a
    full disk would) removes the file and leaves it to the Python way, which
    meets the same error, removes the file again, and stops the restore."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        archive.addfile(member("t", kind=tarfile.DIRTYPE))
        for n in range(5):
            archive.addfile(member(f"t/f{n}", 100), io.BytesIO(bytes(100)))
        archive.addfile(member("t/big", 50_000), io.BytesIO(bytes(50_000)))
        archive.addfile(member("t/after", 1), io.BytesIO(b"!"))
    made = counting_runs(monkeypatch)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # SIGXFSZ: Python ignores it
    try:
        with pytest.raises(
            ArchiveError, match=r"File too large \(t/big\).*incomplete t/big was removed"
        ):
            restore_bytes(out.getvalue(), tmp_path / "back")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert made == [4]  # f1 to f4; f0 by the Python way, which starts the run
    assert sorted(p.name for p in (tmp_path / "back" / "t").iterdir()) == [
        f"f{n}" for n in range(5)
    ]


@pytest.mark.parametrize("seed", range(12))
def test_runs_in_c_restore_damaged_savesets_as_the_python_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Bytes of a header changed (its checksum made right again or not):
    the same files, and the same result or the same error."""
    rng = random.Random(seed)
    stream = bytearray(saveset(tarfile.USTAR_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(stream))) as saved:
        header = rng.choice([info.offset for info in saved.getmembers()][4:])
    for _ in range(rng.randint(1, 3)):
        where = header + rng.choice([0, 1, 98, 100, 108, 124, 134, 136, 156, 257, 345])
        stream[where] = rng.choice([0, ord("/"), ord("."), ord("0"), ord("7"), ord("x"), 0x80])
    if seed % 2:
        block = stream[header : header + 512]
        right = block_sum(block) - sum(block[148:156]) + 8 * ord(" ")
        stream[header + 148 : header + 156] = b"%06o\0 " % right

    def outcome(way: str) -> object:
        try:
            return restore_bytes(bytes(stream), tmp_path / way, seed=seed)
        except ArchiveError as exc:
            return str(exc).replace(str(tmp_path / way), "TARGET")

    with monkeypatch.context() as python_only:
        plain_files_the_python_way(python_only)
        expected = outcome("python")
    assert outcome("c") == expected
    assert state(tmp_path / "c") == state(tmp_path / "python")


def test_make_files_refuses_a_start_outside_the_piece() -> None:
    with pytest.raises(ValueError, match="outside the piece"):
        _plaintar.make_files(b"", 1, 0, b"", b"", 0, 0)
    with pytest.raises(ValueError, match="80 bytes"):
        _plaintar.make_files(b"", 0, 0, b"", b"x", 0, 0)


# -- backups: pack_files --------------------------------------------------------


def backup_tree(root: Path) -> Path:
    """Directories of files of every size, mode, owner and time above, and
    between them what a run in C stops at: a hard link, a symbolic link, a
    FIFO, names not in ASCII, names too long for the header, a directory,
    extended attributes."""
    tree = root / "tree"
    for directory in ("a", "bé", "c" * 90):
        for n in range(30):
            path = tree / directory / f"f{n:02}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(random.Random(n).randbytes(SIZES[n % len(SIZES)]))
            # Runs end where the mode, the owner or the group changes: at
            # different files (n = 5, 10, ...; 7, 17, 27; 3, 13, 23).
            os.chown(path, (0, 1234, 4321)[(n + 3) // 10 % 3], (0, 2345, 5432)[(n + 7) // 10 % 3])
            path.chmod(MODES[(n // 5) % len(MODES)])  # a run ends where mode or owner changes
            # f29: a time that Python's st_mtime rounds up to the next second
            nanoseconds = 999_999_999 if n == 29 else 500_000_000
            os.utime(path, ns=(0, (1_600_000_000 + 7919 * n) * 10**9 + nanoseconds))
    # Extended attributes end a run (a PAX header for them: Python), but an
    # SELinux label, which is not stored, does not.
    os.setxattr(tree / "a" / "f08", "user.note", b"\xff not UTF-8")
    os.setxattr(tree / "a" / "f09", "security.selinux", b"system_u:object_r:user_home_t:s0\0")
    os.link(tree / "a" / "f12", tree / "a" / "f12-again")
    (tree / "a" / "f13-link").symlink_to("f13")
    os.mkfifo(tree / "a" / "f14-fifo")
    for made_now in ("f13-link", "f14-fifo"):  # the same in trees made seconds apart
        os.utime(tree / "a" / made_now, (0, 1_500_000_000), follow_symlinks=False)
    # Each like the file before it, so that only its name or time ends a
    # run: not in ASCII; not UTF-8 (it reads as "f15-\udce9"), the bytes of
    # "f15-é" in Latin-1; too long for the header with its directory's name;
    # a time before 1970.
    for before, name in (
        (tree / "a" / "f15", "f15-é"),
        (tree / "a" / "f15", b"f15-\xe9"),
        (tree / ("c" * 90) / "f05", "f05-longer"),
        (tree / "a" / "f20", "f20-old"),
    ):
        path = os.path.join(os.fsencode(before.parent), os.fsencode(name))
        with open(path, "wb") as new:
            new.write(b"named in a way of its own\n")
        st = before.stat()
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, st.st_mode)
        os.utime(path, (0, -100 if name == "f20-old" else st.st_mtime))
    (tree / "a" / "f16-sub").mkdir()
    for directory in [tree, *tree.rglob("*")]:
        if directory.is_dir() and not directory.is_symlink():
            os.utime(directory, (0, 1_500_000_000))
    return tree


def stream_of(source: Path) -> tuple[bytes, TreeStats]:
    stats = TreeStats()
    return tar_stream(source, stats), stats


@pytest.mark.parametrize("batch_bytes", [1 << 20, 10_000, 4608])
def test_runs_in_c_store_what_the_python_way_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_bytes: int
) -> None:
    """Byte for byte, in batches of any size (a file that does not fit in
    what is left of one goes the Python way)."""
    tree = backup_tree(tmp_path)
    monkeypatch.setattr(
        archive, "BatchWriter", functools.partial(BatchWriter, batch_bytes=batch_bytes)
    )
    with monkeypatch.context() as python_only:
        plain_files_the_python_way(python_only)
        expected, expected_stats = stream_of(tree)
    taken = counting_runs(monkeypatch, "pack_files")
    stream, stats = stream_of(tree)

    assert stream == expected
    assert stats == expected_stats
    assert (stats.files, stats.links) == (94, 2)  # 94 files; f12-again and f13-link
    with tarfile.open(fileobj=io.BytesIO(stream)) as saved:
        assert saved.getmember("tree/a/f12-again").islnk()
    assert sum(taken) >= (25 if batch_bytes > 10_000 else 15)  # of the 94 files


def test_a_file_gone_before_its_run_is_reported_as_by_the_python_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = backup_tree(tmp_path)
    gone = tree / "a" / "f02"

    def removing_f02(real: object) -> object:
        def pack_files(buffer: memoryview, filled: int, *rest: object) -> tuple[int, int]:
            gone.unlink(missing_ok=True)
            return real(buffer, filled, *rest)  # type: ignore[operator, no-any-return]

        return pack_files

    with monkeypatch.context() as python_only:
        python_only.setattr(
            _plaintar, "pack_files", removing_f02(lambda buffer, filled, *rest: (0, filled))
        )
        expected, expected_stats = stream_of(tree)
    (tmp_path / "again").mkdir()
    tree = backup_tree(tmp_path / "again")
    gone = tree / "a" / "f02"
    monkeypatch.setattr(_plaintar, "pack_files", removing_f02(_plaintar.pack_files))
    stream, stats = stream_of(tree)

    assert stats.unreadable == [(str(gone), "No such file or directory; left out")]
    assert [path.replace(str(tmp_path / "again"), "") for path, _ in stats.unreadable] == [
        path.replace(str(tmp_path), "") for path, _ in expected_stats.unreadable
    ]
    assert stream == expected


def taken_by_pack_files(directory: Path, names: list[str], first: int) -> int:
    """How many of ``names[first:]``, in ``directory``, pack_files takes
    after its file "a" was stored from a header template (as "t/a")."""
    template = archive.TreeWriter(BatchWriter(lambda batch: None), TreeStats(), "")
    assert template._file_header("t/a", (directory / "a").stat()) is not None
    assert template._last is not None
    (mode, uid, gid), (middle, tail, checksum) = template._last
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        taken, _ = _plaintar.pack_files(
            bytearray(1 << 20), 0, fd, b"t/", names, first,
            mode, uid, gid, middle, tail, checksum,
        )  # fmt: skip
    finally:
        os.close(fd)
    return int(taken)


def test_pack_files_takes_names_of_the_directory_only(tmp_path: Path) -> None:
    """Not a path through another directory, nor a name cut short by a NUL:
    a listing holds neither, and either could reach another file."""
    (tmp_path / "sub").mkdir()
    for path in (tmp_path / "a", tmp_path / "sub" / "b", tmp_path / "c"):
        path.write_bytes(b"x")
    for names in (["a", "sub/b", "c"], ["a", "c\0x", "c"]):
        assert taken_by_pack_files(tmp_path, names, 0) == 1, names


def test_pack_files_leaves_files_with_extended_attributes_or_holes_to_python(
    tmp_path: Path,
) -> None:
    """Whose headers need PAX records for them; but not for an SELinux
    label, which is not stored."""
    names = ["a", "b", "c", "d", "e", "f"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    os.setxattr(tmp_path / "b", "user.note", b"note")
    os.setxattr(tmp_path / "c", "security.selinux", b"system_u:object_r:user_home_t:s0\0")
    with open(tmp_path / "e", "r+b") as holes:
        holes.truncate(1 << 16)  # x, then a hole (it would fit in the buffer)
    for first, taken in ((0, 1), (2, 2), (5, 1)):  # a (not b); c and d (not e); f
        assert taken_by_pack_files(tmp_path, names, first) == taken, first


def test_pack_files_refuses_what_is_not_a_template() -> None:
    with pytest.raises(ValueError, match="not a template"):
        _plaintar.pack_files(bytearray(512), 0, 0, b"", [], 0, 0, 0, 0, b"", b"", 0)


# -- stpd's check of uploads: scan_members ---------------------------------------


def check_outcome(data: bytes, seed: int) -> tuple[object, ...]:
    """What TarStreamCheck makes of ``data`` fed in random pieces: its
    counts, or its error."""
    checker = TarStreamCheck()
    rng = random.Random(seed)
    try:
        at = 0
        while at < len(data):
            size = rng.choice([1, 7, 511, 512, 513, 4096, 100_000])
            checker.feed(data[at : at + size])
            at += size
        checker.finish()
    except InvalidTar as exc:
        return ("refused", str(exc))
    return (checker.members, checker.offset)


def upload_like(seed: int) -> bytes:
    """Members of every kind and format tarfile writes, PAX size records
    and GNU long names among them."""
    rng = random.Random(seed)
    out = io.BytesIO()
    fmt = rng.choice([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
    with tarfile.open(fileobj=out, mode="w", format=fmt) as saved:
        for n in range(rng.randrange(1, 40)):
            info = member(
                f"t/{'n' * rng.choice([1, 90, 150 if fmt != tarfile.USTAR_FORMAT else 9])}{n}"
            )
            info.type = rng.choice([tarfile.REGTYPE] * 4 + [tarfile.DIRTYPE, tarfile.SYMTYPE])
            size = rng.choice(SIZES) if info.isreg() else 0
            info.size = size
            saved.addfile(info, io.BytesIO(bytes(size)) if info.isreg() else None)
    return out.getvalue()


@pytest.mark.parametrize("seed", range(40))
def test_scans_in_c_check_uploads_as_the_python_way(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Whole, cut short, with bytes changed (headers, checksums, sizes) or
    added: the same members, or the same refusal."""
    rng = random.Random(seed)
    data = bytearray(upload_like(seed))
    cases = [bytes(data), bytes(data[: rng.randrange(len(data))]), bytes(data) + b"x"]
    with tarfile.open(fileobj=io.BytesIO(data)) as saved:
        headers = [info.offset for info in saved.getmembers()]
    for n in range(40):
        damaged = bytearray(data)
        header = rng.choice(headers) if n % 2 else 512 * rng.randrange(len(damaged) // 512)
        for _ in range(rng.randint(1, 3)):
            where = header + rng.choice(
                [156, 124, 130, 135, 148, 150, 154, 155, rng.randrange(512)]
            )
            damaged[where] = rng.choice(
                [0, 32, ord("0"), ord("7"), ord("8"), 0x80, rng.randrange(256)]
            )
        if n % 2:  # another type and size, under a right checksum
            damaged[header + 156] = rng.choice(bytes(3) + b"0123456xgLKSV")
            damaged[header + 124 : header + 136] = b"%011o\0" % rng.choice([0, 1, 600, 5000])
            block = damaged[header : header + 512]
            right = block_sum(block) - sum(block[148:156]) + 8 * ord(" ")
            damaged[header + 148 : header + 156] = b"%06o\0 " % right
        cases.append(bytes(damaged))
    in_c = [check_outcome(case, seed) for case in cases]
    monkeypatch.setattr(_plaintar, "scan_members", lambda piece, at: (at, 0))
    assert [check_outcome(case, seed) for case in cases] == in_c


def test_scan_members_passes_the_plain_headers_of_a_saveset() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as saved:
        for n in range(50):
            saved.addfile(member(f"t/f{n}", SIZES[n % len(SIZES)]), io.BytesIO(bytes(70_000)))
        link = member("t/link", kind=tarfile.SYMTYPE)
        link.linkname = "f0"
        saved.addfile(link)
        saved.addfile(member("t/" + "long" * 30, 1), io.BytesIO(b"x"))  # a PAX header first
    data = out.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as saved:
        names = ("t/f49", "t/link", "t/" + "long" * 30)
        last, link, pax = (saved.getmember(name).offset for name in names)
    assert _plaintar.scan_members(data, 0) == (pax, 51)
    # The last header whole, its data in the next piece: where the next one starts.
    assert _plaintar.scan_members(data[: last + 513], 0) == (link, 50)


def test_scan_members_refuses_a_start_before_the_piece() -> None:
    with pytest.raises(ValueError, match="before the piece"):
        _plaintar.scan_members(b"", -1)
