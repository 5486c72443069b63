"""stpd.tarcheck against archives written by tarfile and GNU tar, fed in
every kind of piece size (including one byte at a time)."""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stpd.tarcheck import InvalidTar, TarStreamCheck, block_sum


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
