"""Checking that an upload is a complete tar archive, while it streams in.

Theory of operation
-------------------
A tar archive is a sequence of 512-byte blocks: a member header, then the
member's data rounded up to whole blocks, and so on, ended by zero blocks.
:class:`TarStreamCheck` is fed the upload piece by piece (any sizes) and
looks only at header blocks: ``tarfile.TarInfo.frombuf`` parses each one and
verifies its checksum, then the data blocks are skipped by counting. The
work is per member, not per byte, and runs in the writer thread alongside
the disk writes, so a finished upload is already checked (re-reading a
20,000-member archive with ``tarfile`` took over a second).

PAX extended headers may carry the real size of the next member (for files
of 8 GiB and more); for that one, their records are read one by one, by
their length, as tarfile reads them. A size record in a PAX global header is
refused: GNU tar frames every member after it by it, tarfile only those with
a PAX header of their own. The data of GNU long-name and long-link
headers is skipped. Every such extension header (PAX, PAX global, GNU long
name or link) is refused over MAX_EXTENSION_HEADER: tarfile reads each one
whole into memory when stpd lists a saveset or restores entries of it.

The archive is complete when an end-of-archive zero block has been seen at
a header position and nothing but zeros follows.

``path_parts`` and ``Selection`` say which members a selective restore
(``sbc restore ID DIR ENTRY...``) takes, the same in stpd and sbc.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from collections.abc import Iterable
from tarfile import ReadError  # by name: fromtarfile's argument hides the module
from typing import Self

from stpd import _plaintar

BLOCK = tarfile.BLOCKSIZE
# A header frombuf refuses, but not the end of the archive (typeshed lacks it)
_INVALID_HEADER: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]
END_OF_ARCHIVE = bytes(2 * BLOCK)
MAX_EXTENSION_HEADER = 1024 * 1024  # bytes of data of a header in _EXTENSIONS
# Extension headers one after another: tarfile reads each in a call of its
# own, and some 330 of them ran past Python's recursion limit (a traceback
# for each listing, and every restore). Writers put at most a few before a
# member (PAX, a GNU long name and long link, a global header).
MAX_EXTENSIONS_IN_A_ROW = 32
# Records in one PAX header: a megabyte of five-byte ones cost 0.1 s to
# check and more to list, each time (sixty times plain data's cost); a
# member's path, times, owners and extended attributes are a few dozen.
MAX_PAX_RECORDS = 10_000
# Headers that describe the member after them, and what to call each.
_EXTENSIONS = {
    tarfile.XHDTYPE: "PAX header",
    tarfile.SOLARIS_XHDTYPE: "Solaris PAX header",  # read by tarfile as a PAX header
    tarfile.XGLTYPE: "PAX global header",
    tarfile.GNUTYPE_LONGNAME: "GNU long name header",
    tarfile.GNUTYPE_LONGLINK: "GNU long link header",
}
# Those whose records (a size among them) apply to the member after them; the
# records of a PAX global header are read too, to refuse a size among them.
_PAX_HEADERS = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)


def _still_looking() -> bytes:
    archive = io.BytesIO()
    note = {"comment": "stpd is still looking for the entries"}
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT, pax_headers=note):
        pass
    return archive.getvalue()[: 2 * BLOCK]  # the header and its record, not the end


# A PAX global header with a comment: tar readers take it in and list or
# extract nothing for it (tarfile and GNU tar alike). stpd sends one now and
# then while it looks for a selective restore's entries in a large saveset,
# so that sbc, which gives up after SBC_IO_TIMEOUT without data, waits.
STILL_LOOKING = _still_looking()


def block_sum(block: bytes | bytearray | memoryview) -> int:
    """``sum(block)`` of a 512-byte tar block (the header checksum), in a
    sixth of the time: the low 16 bits of Adler-32 are 1 + the byte sum
    modulo 65521, and a 256-byte half sums to at most 65,280, below the
    modulus, so each half's sum is exact."""
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


class InvalidTar(ValueError):
    """Not a tar archive, or a damaged one; ``str()`` says where."""


# How compressed archives begin: an upload of one is told so in words,
# rather than as a header that is not one, or an archive cut off.
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
               (b"\x28\xb5\x2f\xfd", "zstd"))  # fmt: skip


def _compressed(start: bytes) -> InvalidTar | None:
    """The refusal of an upload that begins with ``start``, when that is how
    a compressed archive begins."""
    for magic, name in _COMPRESSED:
        if start.startswith(magic):
            return InvalidTar(f"it is a {name}-compressed archive: send a plain (uncompressed) tar")
    return None


class TarStreamCheck:
    def __init__(self) -> None:
        self.offset = 0  # bytes seen so far
        self.members = 0
        self._next_header = 0  # offset of the next header block
        self._header = bytearray()  # a header block split across pieces
        self._pax: bytearray | None = None  # collecting a PAX header's data
        self._pax_end = 0
        self._pax_at = 0  # its header's offset
        self._pax_kind = tarfile.XHDTYPE  # or another of _PAX_HEADERS, or XGLTYPE
        self._size_override: int | None = None
        # The data size of an old GNU sparse member whose extension blocks
        # (more of its map) come next, before its data (see _parse_header).
        self._sparse_data: int | None = None
        self._sparse_blocks = 0  # of that member's extension blocks so far
        self._extensions_in_a_row = 0  # headers in _EXTENSIONS since the last member
        self._ended = False  # an end-of-archive block was seen

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        view = memoryview(piece).cast("B")
        start = self.offset
        self.offset += len(view)
        if self._ended:
            if any(view):
                raise InvalidTar(f"data after the end-of-archive marker (near byte {start})")
            return
        pos = 0
        while pos < len(view):
            absolute = start + pos
            if self._pax is not None and absolute < self._pax_end:
                take = min(len(view) - pos, self._pax_end - absolute)
                self._pax += view[pos : pos + take]
                pos += take
                if start + pos == self._pax_end:
                    self._finish_pax()
                continue
            if absolute < self._next_header:  # member data: skip it
                pos += min(len(view) - pos, self._next_header - absolute)
                continue
            if not self._header and self._size_override is None and self._sparse_data is None:
                # Plain headers whole in the piece, in C: where the next one
                # starts, maybe in a later piece (stpd/_plaintar.c).
                end, members = _plaintar.scan_members(view, pos)
                if members:
                    self.members += members
                    self._extensions_in_a_row = 0
                    self._next_header = start + end
                    pos = min(end, len(view))
                    continue
            take = min(len(view) - pos, BLOCK - len(self._header))
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) == BLOCK:
                block, self._header = bytes(self._header), bytearray()
                self._parse_header(block, start + pos - BLOCK)
                if self._ended:
                    if any(view[pos:]):
                        raise InvalidTar(
                            f"data after the end-of-archive marker (near byte {start + pos})"
                        )
                    return

    def _parse_header(self, block: bytes, at: int) -> None:
        if self._sparse_data is not None:  # an extension block: its last byte but 7 says if more
            self._sparse_blocks += 1
            if self._sparse_blocks * BLOCK > MAX_EXTENSION_HEADER:  # tarfile lists the whole map
                raise InvalidTar(f"old GNU sparse map at byte {at} is too large")
            if not block[504]:
                self._next_header = at + BLOCK + -(-self._sparse_data // BLOCK) * BLOCK
                self._sparse_data = None
            else:
                self._next_header = at + BLOCK
            return
        if block.count(0) == BLOCK:
            self._ended = True
            return
        fast = _type_and_size(block)
        if fast is None:
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                compressed = _compressed(block) if at == 0 else None
                raise compressed or InvalidTar(f"not a tar header at byte {at}: {exc}") from None
            kind, size = info.type, info.size
        else:
            kind, size = fast
        self._extensions_in_a_row = self._extensions_in_a_row + 1 if kind in _EXTENSIONS else 0
        if kind in _EXTENSIONS:
            if size > MAX_EXTENSION_HEADER:
                raise InvalidTar(f"{_EXTENSIONS[kind]} of {size} bytes at byte {at} is too large")
            if self._extensions_in_a_row > MAX_EXTENSIONS_IN_A_ROW:
                raise InvalidTar(
                    f"more than {MAX_EXTENSIONS_IN_A_ROW} extension headers in a row at byte {at}"
                )
        elif self._size_override is not None:  # as tarfile: the member after the extensions
            size, self._size_override = self._size_override, None
        if kind == tarfile.GNUTYPE_SPARSE and block[482]:  # GNU tar -S, --format=gnu
            # More than 4 data regions: extension blocks follow, as tarfile reads them.
            self._sparse_data, self._next_header, self._sparse_blocks = size, at + BLOCK, 0
            self.members += 1
            return
        data_blocks = -(-size // BLOCK) if kind not in _NO_DATA else 0
        self._next_header = at + BLOCK + data_blocks * BLOCK
        if kind in _PAX_HEADERS or kind == tarfile.XGLTYPE:
            self._pax = bytearray()
            self._pax_end, self._pax_at, self._pax_kind = at + BLOCK + size, at, kind
            if size == 0:
                self._finish_pax()
        elif kind not in _EXTENSIONS:
            self.members += 1

    def _finish_pax(self) -> None:
        assert self._pax is not None
        where = f"{_EXTENSIONS[self._pax_kind]} at byte {self._pax_at}"
        size = _pax_size(bytes(self._pax), where)
        self._pax = None
        if self._pax_kind == tarfile.XGLTYPE:
            if size is not None:  # tarfile frames by it the members with a PAX header only
                raise InvalidTar(f"{where}: a size record, which tar readers apply differently")
            return
        if self._size_override is not None:
            # tarfile takes the first one's size, GNU tar the last one's records.
            raise InvalidTar(
                f"{where}: one before it for the same member gave it a size: tar readers "
                "frame the member differently"
            )
        self._size_override = size

    def finish(self) -> None:
        """Raise :class:`InvalidTar` unless the archive ended properly."""
        if self.offset == 0:
            raise InvalidTar("the upload is empty")
        if not self._ended:
            if self.offset < BLOCK and (refusal := _compressed(bytes(self._header))):
                raise refusal
            if self.offset < self._next_header or self._header:
                raise InvalidTar(f"the archive is cut off (at byte {self.offset}, inside a member)")
            raise InvalidTar(f"the archive has no end-of-archive marker (at byte {self.offset})")


def _pax_size(data: bytes, where: str) -> int | None:
    """The value of the size record in ``data``, the PAX header's ``where``
    says (for messages); None without one. Each record is "LENGTH KEYWORD=VALUE\n",
    LENGTH counting the whole record: they are taken one after another by
    it, as tarfile takes them, since a value (a file name, an extended
    attribute) may hold anything, "\n14 size=100000\n" too. A record that
    does not frame so is refused: tarfile reads it one way or another by
    version (since 3.11.10 and 3.12.6, as the end of the archive)."""
    size = None
    pos = records = 0
    while pos < len(data) and data[pos]:  # NULs after the last record: tarfile stops there too
        records += 1
        if records > MAX_PAX_RECORDS:
            raise InvalidTar(f"{where}: more than {MAX_PAX_RECORDS} records")
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        end = pos + int(digits) if digits.isdigit() else -1
        record = data[space + 1 : end - 1] if space < end <= len(data) else b""
        keyword, equals, value = record.partition(b"=")
        if not keyword or not equals or data[end - 1] != ord("\n"):
            raise InvalidTar(f"{where}: not a PAX record at its byte {pos}")
        if keyword == b"size":  # the last one, as tarfile reads them into a dict
            # 21 digits are no file's size (and int() refuses 4301).
            if not value.isdigit() or len(value) > 20:
                raise InvalidTar(f"{where}: its size record is not a number")
            size = int(value)
        pos = end
    return size


def _type_and_size(block: bytes) -> tuple[bytes, int] | None:
    """The type and size of a plain header whose checksum is right, at a
    few microseconds (``TarInfo.frombuf`` decodes every field: 16 us, as
    much as sbc spends writing the member). None for anything else (a bad
    checksum, a signed one, base-256 sizes, the old-style regular type):
    ``frombuf`` then decides, with its exact error."""
    kind = block[156:157]
    size_field = block[124:136]
    if kind == tarfile.AREGTYPE or size_field[0] & 0x80:
        return None
    try:
        stored, size = _octal(block[148:156]), _octal(size_field)
        for field in _OTHER_NUMBERS:  # frombuf reads them all: one it cannot, it refuses
            _octal(block[field])
    except ValueError:
        return None
    if not _checksum_matches(block, stored):
        return None
    return kind, size


# The number fields of a header besides size and checksum: mode, uid, gid,
# mtime, devmajor, devminor.
_OTHER_NUMBERS = (
    slice(100, 108), slice(108, 116), slice(116, 124), slice(136, 148),
    slice(329, 337), slice(337, 345),
)  # fmt: skip


def _octal(field: bytes) -> int:
    """A number field of octal digits, as tarfile's nti reads it; ValueError
    for anything else. bytes.strip() keeps what only str.strip() removes,
    which then fails here, as in nti."""
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checksum_matches(block: bytes | bytearray, stored: int) -> bool:
    """Whether ``stored`` is the header checksum of ``block`` (its own
    field counted as spaces)."""
    return stored == block_sum(block) - sum(block[148:156]) + 8 * ord(" ")


class PlainTarInfo(tarfile.TarInfo):
    """``tarfile.TarInfo`` that parses a plain ustar header (what sbc writes
    for most members) in one step. ``TarInfo.frombuf`` decodes field by
    field: 16 us a header, a fifth of restoring a small file, and most of
    listing a saveset. Anything else (PAX and GNU extensions, base-256
    numbers, a bad or signed checksum, an odd number field) goes to
    tarfile, which decides with its own results and errors; tests check
    that both give the same. Used as ``tarfile.open(..., tarinfo=...)``."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        fields = _plain_fields(buf)
        if fields is None:
            return super().frombuf(buf, encoding, errors)
        name, numbers, kind, linkname, uname, gname, prefix = fields
        obj = cls()
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.chksum, major, minor = numbers
        obj.devmajor, obj.devminor = major, minor
        obj.type = kind
        obj.name = name.decode(encoding, errors)
        obj.linkname = linkname.decode(encoding, errors)
        obj.uname = uname.decode(encoding, errors)
        obj.gname = gname.decode(encoding, errors)
        # As frombuf: an old-style directory, trailing slashes, the prefix.
        if kind == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE
        if obj.isdir():
            obj.name = obj.name.rstrip("/")
        if prefix:
            obj.name = prefix.decode(encoding, errors) + "/" + obj.name
        return obj

    @classmethod
    def fromtarfile(cls, tarfile: tarfile.TarFile) -> Self:
        """The next member of ``tarfile``: a member of a plain type in one
        step, as TarInfo's _proc_builtin would take it (where the data
        starts and ends, no PAX records to apply). Others, and every member
        while a global PAX header is in force, go through tarfile's steps;
        an extension header over MAX_EXTENSION_HEADER is a ReadError."""
        fileobj = tarfile.fileobj
        try:
            obj = cls.frombuf(fileobj.read(BLOCK), tarfile.encoding, tarfile.errors)  # type: ignore[attr-defined]
        except _INVALID_HEADER:
            # tarfile ends there as at the end of the archive: a damaged
            # saveset would list, and restore, as whole and cut short.
            at = fileobj.tell() - BLOCK
            raise ReadError(f"damaged: no valid tar header at byte {at}") from None
        obj.offset = fileobj.tell() - BLOCK
        if obj.type in _EXTENSIONS and obj.size > MAX_EXTENSION_HEADER:
            # tarfile would read it whole into memory: a saveset stored before
            # uploads were checked for it, or a hostile stream to sbc.
            raise ReadError(
                f"{_EXTENSIONS[obj.type]} of {obj.size} bytes at byte {obj.offset} is too large"
            )
        if obj.type not in _PLAIN_TYPES or tarfile.pax_headers:  # type: ignore[attr-defined]
            try:
                return obj._proc_member(tarfile)  # type: ignore[attr-defined, no-any-return]
            except RecursionError:  # (see MAX_EXTENSIONS_IN_A_ROW) stored before, or hostile
                raise ReadError(
                    f"damaged: too many extension headers in a row (at byte {obj.offset})"
                ) from None
        obj.offset_data = end = obj.offset + BLOCK
        if obj.isreg():
            end += -(-obj.size // BLOCK) * BLOCK  # the data, padded to whole blocks
        tarfile.offset = end  # type: ignore[attr-defined]
        obj.pax_headers = {}
        if obj.isdir():  # not redundant: a prefix joined to an empty name ends in "/"
            obj.name = obj.name.rstrip("/")
        return obj


_USTAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")


def _plain_fields(
    buf: bytes | bytearray,
) -> tuple[bytes, tuple[int, ...], bytes, bytes, bytes, bytes, bytes] | None:
    """(name, numbers, type, linkname, uname, gname, prefix) of a plain
    ustar header whose checksum is right, the strings cut at their NUL and
    the numbers in header order (mode ... chksum, devmajor, devminor);
    None for anything else."""
    if len(buf) != BLOCK:
        return None
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, magic, uname, gname,
     devmajor, devminor, prefix) = _USTAR_HEADER.unpack(buf)  # fmt: skip
    if magic != tarfile.POSIX_MAGIC or kind not in _PLAIN_TYPES:
        return None
    try:
        numbers = tuple(
            _octal(field)
            for field in (mode, uid, gid, size, mtime, chksum, devmajor, devminor)
            if not field[0] & 0x80  # base-256: left to tarfile
        )
    except ValueError:
        return None
    if len(numbers) != 8 or not _checksum_matches(buf, numbers[5]):
        return None
    return (
        name.split(b"\0", 1)[0],
        numbers,
        kind,
        linkname.split(b"\0", 1)[0],
        uname.split(b"\0", 1)[0],
        gname.split(b"\0", 1)[0],
        prefix.split(b"\0", 1)[0],
    )


# Types whose size field does not announce data blocks that follow.
_NO_DATA = (
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
)
# Types of members that tarfile parses from their header block alone.
_PLAIN_TYPES = frozenset([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, *_NO_DATA])


def path_parts(path: str) -> list[str]:
    """The components of a member's path, without empty ones and '.'."""
    parts = path.split("/")
    if "" in parts or "." in parts:  # "./a", "a//b", "d/": not the common case
        parts = [part for part in parts if part not in ("", ".")]
    return parts


class Selection:
    """What ``sbc restore ID DIR ENTRY...`` takes: each ENTRY and what is
    under it, names compared as path_parts (so "/etc/" is "etc"). A member
    is looked up by its leading parts, at the cost of its depth: stpd scans
    a saveset of millions of members for up to a thousand entries."""

    def __init__(self, entries: Iterable[str]) -> None:
        self._entries: dict[tuple[str, ...], list[str]] = {}
        for entry in entries:
            self._entries.setdefault(tuple(path_parts(entry)), []).append(entry)

    def match(self, parts: list[str]) -> list[str]:
        """The entries that take the member with path ``parts`` (it is one
        of them, or under it); [] for none."""
        found: list[str] = []
        for depth in range(len(parts) + 1):
            found += self._entries.get(tuple(parts[:depth]), [])
        return found
