"""stpd.tarcheck against archives written by tarfile and GNU tar, fed in
every kind of piece size (including one byte at a time)."""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.archive import _pax_record
from stpd.tarcheck import (
    _PLAIN_TYPES,
    MAX_EXTENSION_HEADER,
    MAX_EXTENSIONS_IN_A_ROW,
    MAX_PAX_RECORDS,
    STILL_LOOKING,
    InvalidTar,
    PlainTarInfo,
    Selection,
    TarStreamCheck,
    _plain_fields,
    block_sum,
    path_parts,
)

_PLAIN = sorted(_PLAIN_TYPES)


def archive(fmt: int, members: list[tuple[str, bytes]], *, extra: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000.5 if fmt == tarfile.PAX_FORMAT else 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
        if extra:
            link = tarfile.TarInfo("a-link")
            link.type, link.linkname = tarfile.SYMTYPE, "x" * 150
            tar.addfile(link)
            folder = tarfile.TarInfo("dir-" + "d" * 120)
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
    return buf.getvalue()


MEMBERS = [
    ("small", b"x"),
    ("empty", b""),
    ("ünï-" + "n" * 200, os.urandom(10_000)),
    ("exact", b"y" * 512),
]


def check(data: bytes, sizes: list[int] | None = None) -> TarStreamCheck:
    checker = TarStreamCheck()
    pos = 0
    rng = random.Random(len(data))
    while pos < len(data):
        size = sizes.pop(0) if sizes else rng.choice([1, 7, 511, 512, 513, 4096, 100_000])
        checker.feed(data[pos : pos + size])
        pos += size
    checker.finish()
    return checker


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_accepts_tarfile_archives_in_any_pieces(fmt: int) -> None:
    ustar = fmt == tarfile.USTAR_FORMAT  # ustar cannot hold the long names
    members = [(name[:90], data) for name, data in MEMBERS] if ustar else MEMBERS
    data = archive(fmt, members, extra=not ustar)
    expected = len(MEMBERS) + (0 if ustar else 2)
    assert check(data).members == expected
    assert check(data, [1] * len(data)).members == expected  # one byte at a time


def test_accepts_an_old_gnu_sparse_file_whose_map_goes_on_in_blocks_of_its_own(
    tmp_path: Path,
) -> None:
    """`tar -S` in GNU tar's default format writes a sparse file of more
    than 4 data regions as type S with extension blocks before its data;
    the check read the first of those as the next header and refused the
    upload ("not a tar header"). Framed as tarfile reads it, in any pieces."""
    image = tmp_path / "t" / "disk.img"
    image.parent.mkdir()
    with open(image, "wb") as out:
        for region in range(30):  # 30 regions: the header holds 4, each extension block 21
            out.seek(region * 65536)
            out.write(bytes([65 + region]) * 4096)  # no zeros: a misframed check sees no end
        out.truncate(30 * 65536)
    (tmp_path / "t" / "z.txt").write_text("after the sparse file\n")
    data = subprocess.run(
        ["tar", "--format=gnu", "--sort=name", "-S", "-C", str(tmp_path), "-cf", "-", "t"],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getmember("t/disk.img").type == tarfile.GNUTYPE_SPARSE
        names = tar.getnames()
    assert names == ["t", "t/disk.img", "t/z.txt"]
    assert check(data).members == len(names) == 3  # in pieces of assorted sizes
    assert check(data, [len(data)]).members == 3  # in one piece: the C scan first
    assert check(data, [512] * (len(data) // 512)).members == 3  # a block at a time


def test_an_old_gnu_sparse_map_over_the_limit_is_refused() -> None:
    """tarfile keeps every region of the map in a list (stpd's listings and
    selective restores read it): a chain of 50 MiB of extension blocks took
    stpd from 43 to 253 MB. Held to the limit of the other extensions."""
    header = tarfile.TarInfo("holes.img")
    header.type = tarfile.GNUTYPE_SPARSE
    block = bytearray(header.tobuf(tarfile.GNU_FORMAT))
    block[482] = 1  # isextended: the map goes on in the blocks that follow
    block[148:156] = b"%06o\0 " % (sum(block[:148]) + 8 * 32 + sum(block[156:]))
    more = bytearray(512)
    more[504] = 1  # and on
    chain = bytes(more) * (MAX_EXTENSION_HEADER // 512 + 1)
    with pytest.raises(InvalidTar, match=r"^old GNU sparse map at byte \d+ is too large$"):
        check(bytes(block) + chain + bytes(1024))


def test_accepts_gnu_tar_output(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / ("long" * 40)).write_bytes(os.urandom(3000))
    (tree / "link").symlink_to("sub")
    data = subprocess.run(
        ["tar", "-C", str(tmp_path), "-cf", "-", "t"], capture_output=True, check=True
    ).stdout
    assert check(data).members == 4


def test_pax_size_record_overrides_the_header_size() -> None:
    # A member whose real size is only in its PAX header, as tarfile writes
    # for files of 8 GiB and more; simulated with a small size record.
    payload = b"z" * 700
    pax = tarfile.TarInfo("././@PaxHeader")
    record = b"%d size=%d\n" % (len(b" size=700\n") + 2, len(payload))
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    member = tarfile.TarInfo("big")  # header says 0 bytes
    data = (
        pax.tobuf(tarfile.USTAR_FORMAT)
        + record
        + bytes(-len(record) % 512)
        + member.tobuf(tarfile.USTAR_FORMAT)
        + payload
        + bytes(-len(payload) % 512)
        + bytes(1024)
    )
    assert check(data).members == 1
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the same reading as tarfile's
        assert tar.getmember("big").size == 700


def extension(kind: bytes, data: bytes, size: int | None = None) -> bytes:
    """An extension header (PAX, GNU long name...) and its data, padded."""
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = kind, len(data) if size is None else size
    return header.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.XHDTYPE, "PAX header"),
        (tarfile.SOLARIS_XHDTYPE, "Solaris PAX header"),
        (tarfile.XGLTYPE, "PAX global header"),
        (tarfile.GNUTYPE_LONGNAME, "GNU long name header"),
        (tarfile.GNUTYPE_LONGLINK, "GNU long link header"),
    ],
)
def test_extension_headers_over_the_limit_are_refused_at_their_header(
    kind: bytes, what: str
) -> None:
    """tarfile reads these whole into memory (stpd's listings and selective
    restores): a 400 MiB GNU long name took stpd to 1.26 GB. Refused at the
    header, before its data is taken in; one at the limit passes."""
    with pytest.raises(
        InvalidTar, match=rf"^{what} of {MAX_EXTENSION_HEADER + 1} bytes at byte 0 is too large$"
    ):
        TarStreamCheck().feed(extension(kind, b"", MAX_EXTENSION_HEADER + 1)[:512])
    comment = _pax_record(
        b"comment", b"a" * (MAX_EXTENSION_HEADER - 17)
    )  # 17: "1048576 comment=\n"
    assert len(comment) == MAX_EXTENSION_HEADER  # a record, which a PAX header's data must be
    at_limit = extension(kind, comment) + archive(tarfile.USTAR_FORMAT, [("f", b"x")], extra=False)
    assert check(at_limit).members == 1


SIZE_700 = b"%d size=700\n" % (len(b" size=700\n") + 2)  # a PAX size record


def _sized_700_by_a_record(extensions: bytes, name: str) -> bytes:
    """``extensions`` (one with SIZE_700), then a member whose header says 0
    bytes with 700 bytes of data, and the end."""
    member = tarfile.TarInfo(name)
    return extensions + member.tobuf(tarfile.USTAR_FORMAT) + b"z" * 700 + bytes(324 + 1024)


def test_a_solaris_pax_header_sizes_the_member_after_it_as_tarfile_does() -> None:
    """tarfile reads type X as a PAX header: its size record applies to the
    member after it. The check counted X as a member of its own, and the
    member by its header's size: two framings of one stream."""
    data = _sized_700_by_a_record(extension(tarfile.SOLARIS_XHDTYPE, SIZE_700), "big")
    assert check(data).members == 1
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [(m.name, m.size) for m in tar.getmembers()] == [("big", 700)]


def test_a_pax_size_record_sizes_the_member_after_a_gnu_long_name_as_tarfile_does() -> None:
    """Not the long name's header: else its data could hide another
    framing from the check (and a long name of any size from the limit)."""
    long_name = "d/" + "n" * 200
    data = _sized_700_by_a_record(
        extension(tarfile.XHDTYPE, SIZE_700)
        + extension(tarfile.GNUTYPE_LONGNAME, long_name.encode() + b"\0"),
        "short",
    )
    assert check(data).members == 1
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [(m.name, m.size) for m in tar.getmembers()] == [(long_name, 700)]


FAKE_SIZE = "\n14 size=100000\n"  # a size record, as it may sit inside a record's value


def _pax_member(records: list[tuple[str, str]], data: bytes) -> bytes:
    """A PAX header of ``records``, as sbc writes them, then a member "m"
    holding ``data`` whose header says its size unless a record does (then
    0), then a plain member "after" and the end."""
    extended = b"".join(_pax_record(key.encode(), value.encode()) for key, value in records)
    member = tarfile.TarInfo("m")
    member.size = 0 if "size" in dict(records) else len(data)
    after = tarfile.TarInfo("after")
    after.size = 1
    return (
        extension(tarfile.XHDTYPE, extended)
        + member.tobuf(tarfile.USTAR_FORMAT)
        + data
        + bytes(-len(data) % 512)
        + after.tobuf(tarfile.USTAR_FORMAT)
        + b"y".ljust(512 + 1024, b"\0")
    )


@pytest.mark.parametrize(
    "records",
    [
        [("path", "\u00e9" + FAKE_SIZE)],  # no size record: the header's size
        [("SCHILY.xattr.user.note", "x" + FAKE_SIZE)],
        [("path", "\u00e9" + FAKE_SIZE), ("size", "700")],  # the fake one first
        [("SCHILY.xattr.user.note", "x" + FAKE_SIZE), ("size", "700")],
        [("size", "700"), ("SCHILY.xattr.user.note", FAKE_SIZE)],
        [("path", FAKE_SIZE + "14 size=100000\n"), ("comment", "\n\n= size=9\n")],
    ],
)
def test_a_size_record_inside_a_pax_value_is_part_of_the_value(
    records: list[tuple[str, str]],
) -> None:
    """A file name or extended attribute is a record's value and may hold
    anything. The check searched the whole header for "\n<n> size=" and
    took one inside a value for the member's size: the archive was cut off
    for it, and stpd stored nothing of a backup with such a file (which any
    user can make). Records are read by their length, as tarfile does."""
    data = _pax_member(records, b"z" * 700)
    assert check(data).members == 2
    assert check(data, [1] * len(data)).members == 2
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [(m.size, m.pax_headers) for m in members] == [(700, dict(records)), (1, {})]


@pytest.mark.parametrize(
    "extended",
    [
        b"5 size=700\n",  # its length is not the record's
        b"13 size=700\n",
        b"12 size=700 ",  # not ended by a newline
        b"x size=700\n",
        b" size=700\n",
        b"9 size700\n",  # no "="
        b"6 =700\n",  # no keyword
        b"100 size=700\n",  # longer than the header's data
        b"12 size=7a0\n",  # a size that is not a number
        b"12 size=-70\n",
        b"11 size=700\nrest",  # something after the last record
        b"1" * 30 + b" size=700\n",
    ],
)
def test_pax_records_that_do_not_frame_are_refused(extended: bytes) -> None:
    """tarfile would stop at such a record and list nothing after it."""
    with pytest.raises(InvalidTar, match=r"^PAX header at byte 0: "):
        check(
            extension(tarfile.XHDTYPE, extended)
            + archive(tarfile.USTAR_FORMAT, [("f", b"x")], extra=False)
        )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["path", "comment", "SCHILY.xattr.user.note", "size"]),
            st.text(alphabet="0123456789 =\nsize\u00e9", max_size=40),
        ),
        max_size=5,
    )
)
def test_the_check_reads_pax_records_as_tarfile_does(records: list[tuple[str, str]]) -> None:
    """Any values, a size record or not: the check frames the member by the
    size tarfile reads, or refuses a size that is not a number."""
    sizes = [value for key, value in records if key == "size"]
    if sizes and not sizes[-1].isdigit():
        with pytest.raises(InvalidTar, match="is not a number"):
            check(_pax_member(records, b""))
        return
    size = int(sizes[-1]) % 2000 if sizes else 700
    records = [(key, str(size) if key == "size" else value) for key, value in records]
    data = _pax_member(records, b"z" * size)
    assert check(data).members == 2
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert [m.size for m in tar.getmembers()] == [size, 1]


def _sizes_read(data: bytes) -> tuple[list[int], list[int]]:
    """The member sizes tarfile and GNU tar read in ``data``."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        by_tarfile = [member.size for member in tar.getmembers()]
    listing = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True).stdout
    return by_tarfile, [int(line.split()[2]) for line in listing.decode().splitlines()]


@pytest.mark.parametrize(
    ("first", "second", "accepted"),
    [
        (b"", SIZE_700, True),
        (SIZE_700, b"", False),  # tarfile: 700; GNU tar: the member header's 0
        (SIZE_700, b"12 size=100\n", False),  # tarfile: 700; GNU tar: 100
    ],
)
def test_a_size_record_in_a_pax_header_that_is_not_the_last_for_its_member_is_refused(
    first: bytes, second: bytes, accepted: bool
) -> None:
    """tarfile applies the first PAX header's size to the member, GNU tar
    only the last header's records: two framings of one stream, where the
    check took GNU tar's. Where the last one holds the only size record,
    both read it alike."""
    comment = b"10 a=note\n"
    data = _sized_700_by_a_record(
        extension(tarfile.XHDTYPE, comment + first) + extension(tarfile.XHDTYPE, comment + second),
        "big",
    )
    by_tarfile, by_gnu_tar = _sizes_read(data)
    assert (by_tarfile == by_gnu_tar) == accepted
    if accepted:
        assert check(data).members == 1
    else:
        with pytest.raises(
            InvalidTar, match=r"^PAX header at byte 1024: one before it for the same member "
        ):
            check(data)


@pytest.mark.parametrize("own", [b"", b"10 a=note\n"])
def test_a_size_record_in_a_pax_global_header_is_refused(own: bytes) -> None:
    """GNU tar frames the members after it by it, tarfile those with a PAX
    header of their own (and gives the others its size, not framed by it).
    The check skipped a global header's data: it took the 1024 bytes of
    "big" for two members of their own, a framing neither reader has."""
    empty = [tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT) for name in ("big", "in", "side")]
    data = (
        extension(tarfile.XGLTYPE, b"13 size=1024\n")
        + (extension(tarfile.XHDTYPE, own) if own else b"")
        + b"".join(empty)
        + bytes(1024)
    )
    by_tarfile, by_gnu_tar = _sizes_read(data)
    assert by_gnu_tar == [1024]
    assert by_tarfile == ([1024] if own else [1024] * 3)
    with pytest.raises(InvalidTar, match=r"^PAX global header at byte 0: a size record, "):
        check(data)


def test_a_pax_global_header_without_a_size_is_taken_in() -> None:
    """Records of other kinds, as stpd's STILL_LOOKING has; one for the
    member after it keeps its size record."""
    data = _sized_700_by_a_record(
        extension(tarfile.XHDTYPE, SIZE_700) + STILL_LOOKING,
        "big",
    )
    assert check(data).members == 1
    assert _sizes_read(data) == ([700], [700])
    with pytest.raises(InvalidTar, match=r"^PAX global header at byte 0: not a PAX record at "):
        check(
            extension(tarfile.XGLTYPE, b"note\n") + archive(tarfile.USTAR_FORMAT, [], extra=False)
        )


def _without_end_marker(data: bytes) -> bytes:
    body = data.rstrip(b"\0")  # the zeros of the end marker and of the last header
    return body + bytes(-len(body) % 512)  # give the last header its zeros back


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d[: len(d) // 2 + 7], "cut off"),
        (lambda d: d[: 512 * 3], "cut off"),
        (lambda d: _without_end_marker(d), "no end-of-archive marker"),
        (lambda d: b"GET / HTTP/1.1\r\n" + d, "not a tar header"),
        (lambda d: d[:100] + b"X" + d[101:], "not a tar header"),  # checksum no longer matches
        (lambda d: d + b"trailing garbage", "after the end-of-archive marker"),
        (lambda d: b"", "empty"),
    ],
)
def test_rejects_damaged_archives(damage, message: str) -> None:  # type: ignore[no-untyped-def]
    data = damage(archive(tarfile.PAX_FORMAT, MEMBERS))
    with pytest.raises(InvalidTar, match=message):
        check(data)


@pytest.mark.parametrize(
    "field", [(100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)]
)
def test_a_header_with_a_number_tarfile_cannot_read_is_refused(field: tuple[int, int]) -> None:
    """mode, uid, gid, mtime, devmajor or devminor of letters, checksum
    right: stored, such a saveset listed and restored as if it ended there
    (exit 0, the rest of it lost). In C runs and in Python alike."""
    data = bytearray(
        archive(tarfile.USTAR_FORMAT, [("a", b"1"), ("b", b"2"), ("c", b"3")], extra=False)
    )
    at = 1024  # the header of "b"
    start, end = field
    data[at + start : at + end] = b"z" * (end - start - 1) + b"\0"
    data[at + 148 : at + 156] = b" " * 8
    data[at + 148 : at + 155] = b"%06o\0" % sum(data[at : at + 512])
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        assert tar.getnames() == ["a"]  # tarfile ends there, silently
    for sizes in (None, [len(data)], [at, len(data)]):  # in C, and header by header
        with pytest.raises(InvalidTar, match=f"not a tar header at byte {at}"):
            check(bytes(data), list(sizes) if sizes else None)


def chained(count: int) -> bytes:
    """``count`` GNU long-name headers in a row, then the member they name
    (the last one counts), and the end."""
    names = b"".join(extension(tarfile.GNUTYPE_LONGNAME, b"n%d\0" % n) for n in range(count))
    return names + archive(tarfile.USTAR_FORMAT, [("m", b"1")], extra=False)


def test_more_extension_headers_in_a_row_than_a_writer_puts_are_refused() -> None:
    """Some 330 of them took tarfile past Python's recursion limit: stored,
    the saveset's listing logged a 3,000-line traceback per request, and
    its restore ended in one."""
    assert check(chained(MAX_EXTENSIONS_IN_A_ROW)).members == 1
    with tarfile.open(fileobj=io.BytesIO(chained(MAX_EXTENSIONS_IN_A_ROW))) as tar:
        assert len(tar.getnames()) == 1  # one member, as the check counts
    # Each member with a long name of its own: one in a row each (the plain
    # headers between them pass in C, which must count as a member too).
    long_names = archive(
        tarfile.GNU_FORMAT, [("n" * 150 + str(n), b"1") for n in range(40)], extra=False
    )
    assert check(long_names, [len(long_names)]).members == 40
    at = MAX_EXTENSIONS_IN_A_ROW * 1024
    with pytest.raises(InvalidTar, match=f"^more than 32 extension headers in a row at byte {at}$"):
        check(chained(MAX_EXTENSIONS_IN_A_ROW + 1))


def test_a_pax_header_of_more_records_than_a_member_has_is_refused() -> None:
    """A megabyte of five-byte records took 0.1 s to check, and longer to
    list each time: sixty times the cost of plain data of that size."""
    member = archive(tarfile.USTAR_FORMAT, [("m", b"1")], extra=False)
    enough = extension(tarfile.XHDTYPE, b"5 a=\n" * MAX_PAX_RECORDS)
    assert check(enough + member).members == 1
    with pytest.raises(InvalidTar, match=r"^PAX header at byte 0: more than 10000 records$"):
        check(extension(tarfile.XHDTYPE, b"5 a=\n" * (MAX_PAX_RECORDS + 1)) + member)


def test_random_bytes_are_not_a_tar() -> None:
    with pytest.raises(InvalidTar):
        check(os.urandom(10_240))


def test_fast_header_path_agrees_with_tarfile() -> None:
    """_type_and_size gives frombuf's type and size, or None (then frombuf
    decides); it never accepts a header frombuf rejects."""
    from stpd.tarcheck import _type_and_size

    rng = random.Random(3)
    kinds = [tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        for _ in range(2000):
            info = tarfile.TarInfo("n" * rng.randrange(1, 99))
            info.type = rng.choice(kinds)
            info.size = rng.choice([0, 1, 511, 512, 10**6, 8**11 - 1]) if info.isreg() else 0
            info.mtime = rng.randrange(2**33)
            block = info.tobuf(fmt, "utf-8", "strict")[-512:]
            if rng.random() < 0.3:  # damage one byte
                pos = rng.randrange(512)
                block = (
                    block[:pos] + bytes([block[pos] ^ (1 << rng.randrange(8))]) + block[pos + 1 :]
                )
            fast = _type_and_size(block)
            try:
                slow = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                assert fast is None
                continue
            if fast is not None:
                assert fast == (slow.type, slow.size)


@given(st.binary(min_size=512, max_size=512) | st.sampled_from([b"\xff" * 512, bytes(512)]))
def test_block_sum_is_the_byte_sum(block: bytes) -> None:
    assert block_sum(block) == sum(block)


_ATTRIBUTES = [
    "name",
    "mode",
    "uid",
    "gid",
    "size",
    "mtime",
    "chksum",
    "type",
    "linkname",
    "uname",
    "gname",
    "devmajor",
    "devminor",
    "pax_headers",
]


def _parsed(parse: Callable[[bytes], tarfile.TarInfo], block: bytes) -> object:
    """What a header parser makes of ``block``: the fields, or the error."""
    try:
        info = parse(block)
    except tarfile.HeaderError as exc:
        return type(exc)
    return type(info), [getattr(info, name) for name in _ATTRIBUTES]


_NAMES = st.text(st.sampled_from("ab/.é \x1c"), max_size=30) | st.sampled_from(
    ["d/", "d//", "x" * 99, "a/" + "b" * 98, "p" * 60 + "/" + "n" * 60]
)


@settings(max_examples=400, deadline=None)
@given(
    name=_NAMES,
    kind=st.sampled_from([*_PLAIN, tarfile.GNUTYPE_SPARSE, tarfile.XHDTYPE, b"Z"]),
    numbers=st.tuples(*[st.integers(0, 8**7 - 1)] * 3, st.integers(0, 8**11 - 1)),
    linkname=_NAMES,
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    damage=st.none() | st.tuples(st.integers(0, 511), st.integers(0, 255)),
)
def test_plain_tar_info_parses_as_tarfile_does(
    name: str,
    kind: bytes,
    numbers: tuple[int, int, int, int],
    linkname: str,
    fmt: int,
    damage: tuple[int, int] | None,
) -> None:
    """PlainTarInfo.frombuf gives what TarInfo.frombuf gives (fields, or the
    error) for every header block tarfile writes, damaged or not."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.mode, info.uid, info.gid, info.mtime = numbers
    info.size = numbers[3] if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    info.uname, info.gname = "user", "grüppe"
    try:
        written = info.tobuf(fmt, "utf-8", "surrogateescape")
    except ValueError:
        return  # a name tarfile cannot write in this format
    for start in range(0, len(written), tarfile.BLOCKSIZE):
        block = bytearray(written[start : start + tarfile.BLOCKSIZE])
        if damage is not None:
            block[damage[0]] = damage[1]
        plain = _parsed(lambda b: PlainTarInfo.frombuf(b, "utf-8", "surrogateescape"), bytes(block))
        stock = _parsed(
            lambda b: tarfile.TarInfo.frombuf(b, "utf-8", "surrogateescape"), bytes(block)
        )
        if isinstance(stock, tuple):
            stock = (PlainTarInfo, stock[1])  # the same fields, made by cls()
        assert plain == stock


def test_plain_tar_info_takes_sbcs_headers_in_one_step() -> None:
    """The common headers do not fall back to tarfile (else nothing is won)."""
    for kind in _PLAIN:
        info = tarfile.TarInfo("dir/name")
        info.type = kind
        block = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert len(block) == tarfile.BLOCKSIZE
        assert _plain_fields(block) is not None, kind


def test_plain_tar_info_lists_a_saveset_as_tarfile_does(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / ("long" * 30)).mkdir(parents=True)
    (tree / ("long" * 30) / "ünï.txt").write_text("x\n")
    (tree / "link").symlink_to("long" * 30)
    archive = tmp_path / "a.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(tmp_path), "tree"], check=True)
    with tarfile.open(archive) as stock, tarfile.open(archive, tarinfo=PlainTarInfo) as plain:
        assert [(m.name, m.type, m.size, m.offset, m.offset_data) for m in stock] == [
            (m.name, m.type, m.size, m.offset, m.offset_data) for m in plain
        ]


def _members(fmt: int, names: list[str]) -> bytes:
    """The headers and data tarfile writes for a directory, files, links and
    a FIFO under each of ``names``, without the end-of-archive blocks."""
    kinds = [
        (tarfile.REGTYPE, 700),
        (tarfile.REGTYPE, 0),
        (tarfile.SYMTYPE, 0),
        (tarfile.LNKTYPE, 0),
        (tarfile.FIFOTYPE, 0),
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name in names:
            directory = tarfile.TarInfo(name)
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            for kind, size in kinds:
                info = tarfile.TarInfo(f"{name}/{kind.decode()}{size}")
                info.type, info.size, info.uname = kind, size, "user"
                info.linkname = f"{name}/00" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                tar.addfile(info, io.BytesIO(os.urandom(size)) if size else None)
        return out.getvalue()[: tar.offset]  # type: ignore[attr-defined]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_plain_tar_info_reads_archives_member_by_member_as_tarfile_does(fmt: int) -> None:
    """PlainTarInfo.fromtarfile takes a plain member in one step: each member
    comes out as tarfile's own (fields, where its data starts, where the
    next header is), long names (GNU or PAX headers) too, and so do the
    members after a global PAX header, which applies to all that follow
    (stpd sends one while it scans a saveset)."""
    names = ["d", "sub/" + "n" * 90] if fmt == tarfile.USTAR_FORMAT else ["d", "l" * 150, "ü"]
    glob = tarfile.TarInfo.create_pax_global_header({"comment": "still looking", "uname": "glob"})
    stream = _members(fmt, names) + glob + _members(fmt, ["after"]) + bytes(2 * tarfile.BLOCKSIZE)

    def members(tarinfo: type[tarfile.TarInfo]) -> list[object]:
        with tarfile.open(fileobj=io.BytesIO(stream), tarinfo=tarinfo) as tar:
            return [
                (type(m) is tarinfo, [getattr(m, a) for a in _ATTRIBUTES], m.offset, m.offset_data)
                for m in tar
            ]

    stock, plain = members(tarfile.TarInfo), members(PlainTarInfo)
    assert plain == stock and len(plain) == 6 * (len(names) + 1)
    assert plain[-1][1][_ATTRIBUTES.index("uname")] == "glob"


def test_a_directory_named_by_its_prefix_alone_reads_as_tarfile_reads_it() -> None:
    """A ustar directory header with an empty name field and a prefix: the
    joined name ends in "/", which tarfile strips after frombuf, and so
    must PlainTarInfo.fromtarfile."""
    info = tarfile.TarInfo("x")
    info.type = tarfile.DIRTYPE
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[0:100] = bytes(100)  # no name
    block[345:348] = b"a/b"  # the prefix
    block[148:156] = b"%06o\0 " % (block_sum(block[:148] + b" " * 8 + block[156:]))
    stream = bytes(block) + bytes(2 * tarfile.BLOCKSIZE)
    for tarinfo in (tarfile.TarInfo, PlainTarInfo):
        with tarfile.open(fileobj=io.BytesIO(stream), tarinfo=tarinfo) as tar:
            assert [m.name for m in tar] == ["a/b"], tarinfo


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("small/d042/f123", ["small", "d042", "f123"]),
        ("./tree/a", ["tree", "a"]),
        ("tree//a/./b/", ["tree", "a", "b"]),
        ("/etc/", ["etc"]),
        (".", []),
        ("", []),
        ("..", [".."]),  # kept: SafeMembers refuses it
        ("a/../b", ["a", "..", "b"]),
    ],
)
def test_path_parts_drops_empty_components_and_dots_only(path: str, parts: list[str]) -> None:
    assert path_parts(path) == parts


def test_selection_takes_each_entry_and_what_is_under_it() -> None:
    """Names as path_parts ("/etc/" is "etc", "." is everything), and every
    entry that takes a member is named, so that nested entries are all
    found ("etc" and "etc/ssh")."""
    selection = Selection(["/etc/", "etc/ssh", "home/a b", "./etc"])
    assert selection.match(["etc"]) == ["/etc/", "./etc"]
    assert selection.match(["etc", "ssh", "sshd_config"]) == ["/etc/", "./etc", "etc/ssh"]
    assert selection.match(["home", "a b", "x"]) == ["home/a b"]
    assert selection.match(["home"]) == []  # above an entry: not taken
    assert selection.match(["etcetera"]) == []
    assert Selection(["."]).match(["any", "thing"]) == ["."]
    assert Selection([]).match(["x"]) == []
