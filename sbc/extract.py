"""Tar on the client, restore side: a tar stream extracted safely
(``extract_stream``), in a worker thread of the transfer core
(``stpd.transfer``), which pulls the batches through a :class:`BatchReader`.

Extraction goes through ``SafeMembers``: nothing written outside the target
or through a symbolic link (not even one put there while the restore runs:
see ``TargetDir``), nothing already there replaced unasked, and every member
as it was stored (see there).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import grp
import hashlib
import math
import os
import pwd
import re
import stat
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sbc.archive import (
    DIRECTORY_NOFOLLOW,
    NO_XATTRS,
    XATTR_RECORD,
    ArchiveError,
    whole_seconds,
)
from stpd import _plaintar
from stpd.tarcheck import PlainTarInfo, Selection, path_parts
from stpd.transfer import Batch, BatchReader, Get, WriteBehind, write_all

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath

# Extended attributes a restore leaves out: file capabilities and security
# labels (SELinux, Smack, IMA) grant privileges, and privileges do not come
# from a saveset, as set-id bits do not (see SafeMembers): savesets of
# clients without a certificate are shared. The saveset keeps them.
NOT_RESTORED_XATTRS = ("security.",)
# An NFSv4 ACL (every file read over NFS has one, most of them the mode in
# another form) is set where the target is on NFS too; elsewhere the file
# system has no such thing, and saying so for every file would drown the rest.
NFS_ACL = "system.nfs4_acl"
# GNU tar --acls stores a POSIX ACL as text (SCHILY.acl.access, .default);
# sbc stores it as the extended attribute it is (system.posix_acl_*). The
# text is not turned into that here: such a member is named, for tar.
GNU_TAR_ACL = "SCHILY.acl."

# tarfile's copy size for a sparse member (its default: 16 KiB); other files
# go out as the pieces lie in the received batches (_copy_out).
RESTORE_COPY_BUFFER = 256 * 1024

# A file this large is written by a second thread while the next piece is
# received and hashed (see WriteBehind); for smaller ones the hand-over
# would cost more than it saves.
WRITE_BEHIND_BYTES = 1024 * 1024


def _copy_out(source: BatchReader, fd: int, size: int) -> None:
    """``size`` bytes of ``source`` written to the file ``fd`` as they lie in
    the received batches (no copy, no file object). A file of
    WRITE_BEHIND_BYTES or more is written by a second thread, each piece
    while the next one is read (the reader's views stay valid for that)."""
    if size <= source.in_piece():  # a small file: one write, as it lies
        if size:
            write_all(fd, [source.read_view(size)])
        return
    write = functools.partial(write_all, fd)
    with WriteBehind(write, threaded=size >= WRITE_BEHIND_BYTES) as behind:
        while size:
            piece = source.read_view(size)  # up to a received batch: one hand-over a MiB
            if not piece:
                raise tarfile.ReadError("unexpected end of data")
            behind.put([piece])
            size -= len(piece)
        behind.finish()


def _first_prefix_in(names: set[str], parts: list[str], *, itself: bool) -> str | None:
    """The shortest leading part of the path ``parts`` (the whole path too
    if ``itself``) that is in ``names``."""
    if not names:  # most archives hold no links: no need to build the prefixes
        return None
    for end in range(1, len(parts) + (1 if itself else 0)):
        prefix = "/".join(parts[:end])
        if prefix in names:
            return prefix
    return None


# Errors of the target as a whole: a full disk or quota, a read-only or
# failing file system, no memory or descriptors left. Every later member
# would meet them too, so they stop the restore; so does a target directory
# that no longer takes writes. Any other refusal is the member's own (a name
# the file system cannot hold, an immutable file, a directory in the way, a
# directory without write permission): it is reported, the restore goes on.
_STOPS_THE_RESTORE = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)


def _stop_if_target_wide(exc: OSError, target: Path) -> None:
    """Raise ``exc`` if it stops the restore (see _STOPS_THE_RESTORE)."""
    if exc.errno in _STOPS_THE_RESTORE or not os.access(target, os.W_OK | os.X_OK):
        raise exc


def _replacement_name() -> str:
    """A new name beside what --overwrite replaces, for its replacement until
    that is whole: then renamed over it (_rename_over), so that either
    stands, not neither."""
    return f".sbc-restore-{os.urandom(6).hex()}"


# Exactly the names _replacement_name makes: a sweep looks at nothing else.
_TEMPORARY = re.compile(r"\.sbc-restore-[0-9a-f]{12}")


def _new_temporary(parent: int) -> tuple[str, int]:
    """A _replacement_name made in ``parent``: (name, descriptor open for
    writing). It is locked (flock) for as long as it is open, so that the
    sweep of a restore running at the same time leaves it alone
    (_remove_if_stale); the writer keeps it open until it is renamed."""
    while True:
        name = _replacement_name()
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return name, fd
        except OSError:  # a file system without locks: no sweep removes it there
            return name, fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # a sweep took it between the open and the lock: another one


def _remove_if_stale(name: str, directory: int) -> bool | None:
    """Remove ``name`` (a _TEMPORARY) from ``directory`` if it is certainly
    one a restore left when it was killed (SIGKILL, a power cut): a regular
    file of this user with no other name, that no restore holds locked
    (_new_temporary). True if removed; None if a running restore holds it
    or it is gone; False if it is not certainly stale (another owner,
    another type, a link, unreadable, no locks there): left as it is."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory
        )
    except FileNotFoundError:
        return None  # renamed into place meanwhile
    except OSError:
        return False  # a symbolic link (not followed), or not ours to read
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1):
            return False  # (a hard link's temporary has other names: nothing to free)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a restore running now is writing it
        except OSError:
            return False
        try:
            named = os.stat(name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(name, dir_fd=directory)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _rename_over(made: str, name: str, parent: int) -> None:
    """Put ``made`` (a _replacement_name) in the place of ``name``, in the
    directory ``parent``; if that fails (an immutable file, a directory in
    the way), ``made`` goes and what stands there stays."""
    try:
        os.rename(made, name, src_dir_fd=parent, dst_dir_fd=parent)
    except OSError:
        os.unlink(made, dir_fd=parent)
        raise


class UnsafeMember(tarfile.TarError):
    """A member SafeMembers refuses. Our own checks, not tarfile's filters:
    those came in Python 3.11.4, and Debian 12's python3 is 3.11.2."""

    def __init__(self, tarinfo: tarfile.TarInfo, message: str) -> None:
        self.tarinfo = tarinfo
        super().__init__(message)


MAX_TIME = 2.0**62  # seconds, within time_t: past it os.utime raises OverflowError
# A file system's timestamps come from a coarser clock than time_ns(): a
# file made just after a restore began may look a little older.
CTIME_MARGIN_NS = 1_000_000_000
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# A name opened as what it is, a symbolic link too (not followed), to fstat
_NO_FOLLOW_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Where a ustar header holds the owner: uid and gid, then uname and gname.
_IDS, _OWNER_NAMES = slice(108, 124), slice(265, 329)


class TargetDir:
    """The restore target, reached through descriptors.

    The parent directory of each member is opened from the target down, one
    component at a time with O_NOFOLLOW, and what is looked at, created or
    removed is named relative to it. So a symbolic link that someone with
    write access to the target puts in place *during* the restore (after
    ``SafeMembers`` looked) is never followed: tarfile works on paths, and a
    root restore into a user's home could have been made to write, chown or
    chmod anything through such a link. Members come in directory order,
    so the last parent opened is kept for the next member.

    Each directory a member goes into is swept once of sbc's own temporaries
    that a killed restore left there (_remove_if_stale); those this restore
    made are not: nothing stale is in them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._parent_parts: tuple[str, ...] = ()
        self._parent = self.fd
        self._swept: set[tuple[str, ...]] = set()  # or made by this restore
        self.stale_removed: list[str] = []  # paths in the target
        self.stale_left: list[str] = []  # named as they are, not certainly stale

    def made(self, parts: tuple[str, ...] | list[str]) -> None:
        """The directory ``parts`` was made by this restore: no sweep."""
        self._swept.add(tuple(parts))

    def _sweep(self, parts: tuple[str, ...], fd: int) -> None:
        self._swept.add(parts)
        try:
            with os.scandir(fd) as entries:
                names = sorted(e.name for e in entries if _TEMPORARY.fullmatch(e.name))
        except OSError:
            return  # not listable: nothing of ours to find
        for name in names:
            removed = _remove_if_stale(name, fd)
            if removed is not None:
                (self.stale_removed if removed else self.stale_left).append(
                    "/".join((*parts, name))
                )

    def parent(self, parts: list[str], *, make: bool = False) -> int:
        """The directory that holds the member ``parts``; open until
        another is asked for. OSError if a component is missing (unless
        ``make``: see open_dir), or is not a directory (a file, or a link,
        which is not followed)."""
        wanted = tuple(parts[:-1])
        if wanted != self._parent_parts:
            self._release()
            self._parent = self.open_dir(wanted, make=make)
            self._parent_parts = wanted
            if wanted not in self._swept:
                self._sweep(wanted, self._parent)
        return self._parent

    def open_dir(self, parts: tuple[str, ...] | list[str], *, make: bool = False) -> int:
        """The directory ``parts`` opened; the caller closes it (``close_dir``).
        With ``make``, missing directories on the way are made (as tarfile
        and GNU tar make those an archive does not hold: 0777 less the
        umask), each relative to its parent's descriptor: tarfile's
        ``os.makedirs`` of a path followed a link put in place meanwhile."""
        fd = self.fd
        for end, part in enumerate(parts, 1):
            try:
                try:
                    child = os.open(part, DIRECTORY_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    if not make:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o777, dir_fd=fd)
                        self.made(parts[:end])
                    child = os.open(part, DIRECTORY_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, "/".join(parts[:end])) from None
            finally:
                self.close_dir(fd)
            fd = child
        return fd

    def close_dir(self, fd: int) -> None:
        if fd != self.fd:
            os.close(fd)

    def _release(self) -> None:
        self.close_dir(self._parent)
        self._parent_parts, self._parent = (), self.fd

    def close(self) -> None:
        self._release()
        os.close(self.fd)


class SafeMembers:
    """The extraction filter: nothing is written outside the target, nothing
    already in it is replaced unasked, and every member comes back as it was
    stored (permission bits exactly, a directory's setgid and sticky bits,
    but never a file's set-id bits: see restored_mode; owners when run as
    root, symbolic links wherever they point, as GNU tar does).

    tarfile's ``data`` filter is not used for that (only for hard links): it
    resolves every member's path with ``realpath``, a dozen system calls per
    member, which made restoring many small files 15 times slower than
    ``tar -x``; a chain of symbolic links longer than PATH_MAX fools it on
    Pythons without the fix for CVE-2025-4517 (3.11.7 here); and it refuses
    every symbolic link to an absolute path (/etc alone holds dozens).
    Instead, without ``realpath``: no absolute names, no '..' in names or
    hard-link targets, nothing extracted through, onto or hard-linked to a
    symbolic link that this archive created, and nothing under a path of the
    target that is not a directory (a file, or a symbolic link, which is
    never followed): such members are kept out. The target's directories
    are reached through ``TargetDir``, which also keeps the extraction from
    following links put in place after these checks.

    A member whose path already exists in the target (but for a directory
    over a directory: those merge) is not extracted either, and is listed in
    ``kept``; with ``overwrite`` what is there is removed first (never
    written through), unless it is a directory."""

    def __init__(
        self, target: TargetDir, overwrite: bool = False, only: Sequence[str] = ()
    ) -> None:
        self.target = target
        self.overwrite = overwrite
        # Restore only these entries and what is under them (all if none).
        self.only = Selection(only) if only else None
        self.found: set[str] = set()  # the names of ``only`` that matched
        self.symlinks: set[str] = set()  # normalised names of the archive's links
        self.skipped: list[str] = []  # device nodes: not restored, reported
        self.kept: list[str] = []  # members not extracted: existing paths left as they were
        # Directories the target's file system could not name (_Extraction):
        # what is under them is left out, reported with them.
        self.refused: set[str] = set()
        # (name, why): members that could not be made (see _Extraction._refused)
        self.unrestorable: list[tuple[str, str]] = []
        # Names this restore did not make -> why: "kept, not restored" or "not
        # restored" (see _Extraction._link_to_made)
        self.not_ours: dict[str, str] = {}

    def _parts(self, member: tarfile.TarInfo, path: str, what: str) -> list[str]:
        if path.startswith("/"):  # absolute (os.path.isabs, on POSIX)
            raise UnsafeMember(member, f"{what} {path!r} is an absolute path")
        parts = path_parts(path)
        if ".." in parts:
            raise UnsafeMember(member, f"{what} {path!r} contains '..'")
        return parts

    def _selected(self, parts: list[str]) -> bool:
        assert self.only is not None
        names = self.only.match(parts)
        self.found.update(names)
        return bool(names)

    def _through_link(self, parts: list[str], *, itself: bool) -> str | None:
        return _first_prefix_in(self.symlinks, parts, itself=itself)

    def _blocked(self, member: tarfile.TarInfo, parts: list[str]) -> str | None:
        """Why ``member`` must be kept out, if it must: "kept" when a parent
        in the target is not a directory, or something stands where it
        would go (a directory member merges with a directory). With
        ``overwrite`` what stands there is removed first instead; if it
        cannot be (a directory, an immutable file), the reason."""
        try:
            parent = self.target.parent(parts)
        except FileNotFoundError:
            return None  # a parent is absent: tarfile creates it as a directory
        except OSError:
            return "kept"  # a file or a link (never followed) where a directory should be
        if not (self.overwrite or member.isdir()):
            # Creating it finds what stands there (O_EXCL, EEXIST), and
            # _Extraction keeps that: no stat of every new file.
            return None
        try:
            existing = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except OSError:
            return None
        if member.isdir() and stat.S_ISDIR(existing.st_mode):
            return None
        if not self.overwrite:
            return "kept"  # a directory member where a file or a link is
        if stat.S_ISDIR(existing.st_mode):  # it may hold anything: not removed
            return "a directory stands there, which --overwrite does not remove"
        # A file replaces what stands there once whole, a hard link once it
        # can be made (_Extraction._make_file, _link_to_made): kept till then.
        if not (member.isreg() or member.islnk()):
            try:
                os.unlink(parts[-1], dir_fd=parent)  # replaced, never written through
            except OSError as exc:
                _stop_if_target_wide(exc, self.target.path)
                return f"what stands there could not be removed: {exc.strerror}"
        return None

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        parts = self._parts(member, member.name, "member")
        if not parts:  # "./" (tar -C DIR -cf - .): the target itself, left as it is
            return None
        if self.only is not None and not self._selected(parts):
            return None
        if _first_prefix_in(self.refused, parts, itself=False) is not None:
            return None
        name = "/".join(parts)
        link = self._through_link(parts, itself=not member.issym())
        if link is not None:
            raise UnsafeMember(
                member,
                f"member {member.name!r} would be written through or onto the symbolic "
                f"link {link!r} of this archive",
            )
        if member.islnk():
            # Where it points stays inside the target: by name here, and on
            # disk since makelink reaches it through descriptors, following
            # no link.
            target = self._parts(member, member.linkname, "hard link target")
            link = self._through_link(target, itself=False)  # to a link itself: not followed
            if link is not None:
                raise UnsafeMember(
                    member,
                    f"hard link {member.name!r} points through the symbolic link {link!r} "
                    "of this archive",
                )
        if member.ischr() or member.isblk():
            # A backup client does not create device nodes; say so, go on.
            self.skipped.append(name)
            return None
        blocked = self._blocked(member, parts)
        if blocked == "kept":
            self.kept.append(name)
            self.not_ours[name] = "kept, not restored"
            return None
        if blocked is not None:
            self.unrestorable.append((name, blocked))
            self.not_ours[name] = "not restored"
            if member.isdir():
                self.refused.add(name)  # nothing of the saveset under what stands there
            return None
        if member.issym():
            self.symlinks.add(name)
        # Owners by name where this machine knows the name, else by number, as
        # tar does (tarfile chowns only as root). Looked up here once per name,
        # so that extraction can take the numbers: it would look up every file.
        member.uid = _known_id(pwd.getpwnam, member.uname, member.uid)
        member.gid = _known_id(grp.getgrnam, member.gname, member.gid)
        if not (math.isfinite(member.mtime) and abs(member.mtime) < MAX_TIME):
            # A PAX mtime of 1e20, inf or nan: utime ended the restore in a traceback.
            self.unrestorable.append(
                (name, f"its modification time ({member.mtime}) cannot be set, so it has the "
                 "time of the restore")
            )  # fmt: skip
            member.mtime = time.time()
        return member


# The extraction filter: the member as extracted, or None to leave it out
Filter = Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]


class _Extraction(tarfile.TarFile):
    """tarfile's extraction (headers, contents, directory attributes set
    last: see extract_into), with its file system calls made through
    ``TargetDir``: files are created with O_EXCL|O_NOFOLLOW, links and
    FIFOs relative to their parent's descriptor, and owners, modes and
    times set on descriptors opened with O_NOFOLLOW, on a directory only if
    it is still the one this restore created or merged with. The plain files
    that follow one made in their directory are made in C (_make_run): a
    saveset of small files extracts in a third of the time."""

    tarinfo = PlainTarInfo  # headers parsed in one step where they are plain
    # From the SafeMembers of this extraction: its target, and where members
    # found taken (kept) and directories refused by name (refused) are noted.
    target: TargetDir
    kept: list[str]
    refused: set[str]
    unrestorable: list[tuple[str, str]]  # see _refused (SafeMembers')
    removed: str | None = None  # the file being written when the restore stopped, removed
    not_made = 0  # members the filter let through that were kept or unrestorable here
    # The files that follow the one _make_file made are made in C while they
    # are plain (see _make_run): the arguments of make_files but the first two.
    _run: tuple[int, bytes, bytes, int, int] | None = None

    def extract_into(
        self, safe: SafeMembers, members: Filter, made_in_run: Callable[[int], None]
    ) -> None:
        """Extract ``members`` (``safe``, or a filter that calls it) as
        tarfile's extractall does: member after member, and the directories'
        owners, modes and times last (deepest first), once their contents
        are in. Each member is forgotten once the next is read: tarfile keeps
        every member it read (about 900 bytes each: a saveset of ten million
        files would take gigabytes). Files made in C, which ``members`` does
        not see, are counted through ``made_in_run``."""
        self.target, self.kept, self.refused = safe.target, safe.kept, safe.refused
        self._overwrite = safe.overwrite
        self.unrestorable = safe.unrestorable
        self.unprivileged: list[str] = []  # see restored_mode
        self.kept_different: list[str] = []  # see _note_if_different
        self._not_ours = safe.not_ours  # see _taken, _refused, _link_to_made
        self._links, self._only = safe.symlinks, safe.only  # see _link_to_made
        self._directories: dict[str, tuple[int, int]] = {}  # name -> (st_dev, st_ino)
        self._as_root = os.geteuid() == 0
        # What this restore makes changes its inode at this time or later.
        self._started_ns = time.time_ns() - CTIME_MARGIN_NS
        # A run in C checks what SafeMembers would only where nothing is
        # selected or overwritten, and while every link of the archive could
        # be made (see makelink).
        self._runs = safe.only is None and not safe.overwrite
        destination = str(self.target.path)
        directories: list[tarfile.TarInfo] = []
        try:
            while True:
                if self._run is not None:
                    made_in_run(self._make_run())
                if (member := self.next()) is None:
                    break
                self.members.clear()  # type: ignore[attr-defined]
                tarinfo = members(member, destination)
                if tarinfo is None:
                    continue
                if tarinfo.isdir():
                    directories.append(tarinfo)
                self._extract(tarinfo)
        except BaseException:
            # A restore that stopped part-way (a lost connection, Ctrl-C, a
            # full disk) still gives the directories it made their modes,
            # owners and times: tarfile makes each 0700 until then.
            with contextlib.suppress(OSError):
                self._finish_directories(directories)
            raise
        self._finish_directories(directories)

    def _finish_directories(self, directories: list[tarfile.TarInfo]) -> None:
        """Directories' attributes, deepest first, once their contents are in."""
        directories.sort(key=lambda directory: directory.name, reverse=True)
        for tarinfo in directories:
            self.chown(tarinfo, "", numeric_owner=True)  # and mode and times: see there

    def _extract(self, tarinfo: tarfile.TarInfo) -> None:
        """As tarfile's _extract_member, but for the directories an archive
        does not hold, which are made through TargetDir (see open_dir),
        and a regular file, made at once (_make_file: tarfile builds
        paths, and calls chown, chmod and utime, which _make_file does on
        the new file anyway)."""
        parts = path_parts(tarinfo.name)
        try:
            parent = self.target.parent(parts, make=True)  # (members come in directory order)
        except OSError as exc:  # a directory on the way is none, or could not be made: named
            named = OSError(exc.errno, f"{exc.strerror}: {exc.filename}")
            self._refused(parts, named, directory=tarinfo.isdir())
            return
        if tarinfo.isreg() and tarinfo.sparse is None:  # type: ignore[attr-defined]
            made = self._make_file(tarinfo, parts, parent)
            if made and self._runs and not self.pax_headers:  # type: ignore[attr-defined]
                self._run = self._run_after(tarinfo, parent)
            return
        if tarinfo.isdir():
            self.makedir(tarinfo, "")
            return  # its owner, mode and time: last, see extract_into
        if tarinfo.isfifo():
            self.makefifo(tarinfo, "")
        elif tarinfo.issym() or tarinfo.islnk():
            self.makelink(tarinfo, "")
        else:  # sparse, and types tarfile does not know (made as files, as there)
            self.makefile(tarinfo, "")
        self.chown(tarinfo, "", numeric_owner=True)  # and mode and time: see there

    def makefile(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        parts = path_parts(tarinfo.name)
        self._make_file(tarinfo, parts, self.target.parent(parts))

    def _make_run(self) -> int:
        """The plain files that follow the one _make_file made, in its
        directory and in the piece at hand, made in C (stpd/_plaintar.c):
        how many. tarfile goes on from the first member it did not make."""
        run, self._run = self._run, None
        assert run is not None
        reader: BatchReader = self.fileobj  # type: ignore[assignment]  # extract_stream's
        at: int = self.offset  # type: ignore[attr-defined]  # the next header
        piece, start = reader.piece_ahead(at - reader.tell())
        if start > len(piece):  # the last file's padding goes on in the next piece
            return 0
        end, made = _plaintar.make_files(piece, start, *run)
        if made:
            self.offset = reader.seek(at + end - start)
        return made

    def _run_after(
        self, tarinfo: tarfile.TarInfo, parent: int
    ) -> tuple[int, bytes, bytes, int, int] | None:
        """make_files' arguments for the files after ``tarinfo``, just made,
        in its directory. As root, a run makes those whose owner fields are
        this header's as they stand in it (uid, gid, uname, gname), with the
        owner SafeMembers looked up for it; so there is none after a member
        with PAX or GNU headers of its own, which may name another owner, or
        whose header is no longer in the piece at hand."""
        directory = os.fsencode(tarinfo.name[: tarinfo.name.rfind("/") + 1])
        if not self._as_root:
            return (parent, directory, b"", 0, 0)
        if tarinfo.offset_data - tarinfo.offset != tarfile.BLOCKSIZE:  # type: ignore[attr-defined]
            return None
        reader: BatchReader = self.fileobj  # type: ignore[assignment]
        piece, at = reader.piece_ahead(tarinfo.offset - reader.tell())  # type: ignore[attr-defined]
        if at < 0 or len(piece) - at < tarfile.BLOCKSIZE:
            return None
        header = piece[at : at + tarfile.BLOCKSIZE]
        owner = bytes(header[_IDS]) + bytes(header[_OWNER_NAMES])
        return (parent, directory, owner, tarinfo.uid, tarinfo.gid)

    def _make_file(self, tarinfo: tarfile.TarInfo, parts: list[str], parent: int) -> bool:
        """Whether it was made (not kept, nor refused by the file system).
        With --overwrite, a file (or link) that stands there is replaced
        once the new one is whole: written under a name of its own and
        renamed over it, so that a restore that stops part-way leaves the
        old one, not neither."""
        name = parts[-1]
        try:
            try:
                fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
            except FileExistsError:
                if not self._overwrite:
                    raise
                name, fd = _new_temporary(parent)
        except FileExistsError:
            self._taken(parts)
            self._note_if_different(tarinfo, parts, parent)
            return False
        except OSError as exc:
            self._refused(parts, exc)
            return False
        reader: BatchReader = self.fileobj  # type: ignore[assignment]  # extract_stream's
        try:
            try:
                reader.seek(tarinfo.offset_data)
                # (offset, size) pieces of a GNU sparse member (typeshed: bytes)
                sparse: list[tuple[int, int]] | None = getattr(tarinfo, "sparse", None)
                if sparse is None:
                    _copy_out(reader, fd, tarinfo.size)
                else:
                    with open(fd, "wb", closefd=False) as out:
                        for offset, size in sparse:
                            out.seek(offset)
                            tarfile.copyfileobj(  # type: ignore[attr-defined]
                                reader, out, size, tarfile.ReadError, RESTORE_COPY_BUFFER
                            )
                        out.truncate(tarinfo.size)
                self._set_attributes(fd, tarinfo)
                if name != parts[-1]:  # still open: locked (see _new_temporary)
                    try:
                        _rename_over(name, parts[-1], parent)
                    except OSError as exc:
                        self._refused(parts, exc)
                        return False
            finally:
                os.close(fd)
        except BaseException:
            # Whatever stopped it (a full disk, a lost connection, Ctrl-C), a
            # file written in part would pass for the whole one: it goes.
            try:
                os.unlink(name, dir_fd=parent)
                if name == parts[-1]:
                    self.removed = tarinfo.name
            except OSError:
                pass  # the error that stopped the restore is what to report
            raise
        return True

    def makedir(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        parts = path_parts(tarinfo.name)
        parent = self.target.parent(parts)
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=parent)  # its mode is set last
            self.target.made(parts)
        except FileExistsError:
            pass  # a directory already there: they merge (see SafeMembers)
        except OSError as exc:
            self._refused(parts, exc, directory=True)
            return
        made = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(made.st_mode):
            self._directories["/".join(parts)] = (made.st_dev, made.st_ino)

    def makelink(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        parts = path_parts(tarinfo.name)
        parent = self.target.parent(parts)
        if tarinfo.issym():
            try:
                os.symlink(tarinfo.linkname, parts[-1], dir_fd=parent)
            except FileExistsError:
                self._taken(parts)
            except OSError as exc:
                # SafeMembers refuses a file by a link's name; runs in C, which
                # know no names, would make it (one that stands is seen).
                self._runs = False
                self._refused(parts, exc, link_or_fifo=True)
            return
        try:
            why = self._link_to_made(tarinfo, parts, parent)
        except FileExistsError:
            self._taken(parts)
            return
        except OSError as exc:
            self._refused(parts, exc, link_or_fifo=True)
            return
        if why:
            name = "/".join(parts)
            self.unrestorable.append((name, f"a hard link to {tarinfo.linkname}, which was {why}"))
            self._not_ours[name] = "not restored"
            self.not_made += 1

    def _link_to_made(self, tarinfo: tarfile.TarInfo, parts: list[str], parent: int) -> str:
        """Make the hard link ``tarinfo`` if its first name is a file this
        restore made: "" if so, else why not. A kept file (newer work, or
        a symbolic link planted by whoever may write there) must not get
        further names, in directories where that someone may not write."""
        source = path_parts(tarinfo.linkname)
        first = "/".join(source)
        if first in self._not_ours:
            return self._not_ours[first]
        if self._only is not None and not self._only.match(source):
            return "not restored"  # not asked for: what stands there is not the saveset's
        try:
            source_dir = self.target.open_dir(source[:-1])
            try:
                fd = os.open(source[-1], _NO_FOLLOW_PATH, dir_fd=source_dir)
            finally:
                self.target.close_dir(source_dir)
        except FileNotFoundError:
            return "not restored"
        try:
            if not self._made_here(os.fstat(fd), tarinfo):
                return "not made by this restore, or replaced since"
            # That very file, as checked: its /proc name, followed once.
            made = _replacement_name() if self._overwrite else parts[-1]
            os.link(f"/proc/self/fd/{fd}", made, dst_dir_fd=parent)
        finally:
            os.close(fd)
        if made != parts[-1]:  # --overwrite: what stands there goes only now
            _rename_over(made, parts[-1], parent)
        return ""

    def _made_here(self, st: os.stat_result, tarinfo: tarfile.TarInfo) -> bool:
        """Whether ``st``, the first name of the hard link ``tarinfo`` (not
        followed), is still what this restore made there: not a directory,
        a symbolic link only where the archive has one, and owned as this
        restore leaves what it makes (as root the member's owner, or root
        where fchown failed; else this user), and changed since the restore
        began (what it makes gets that ctime, which no user can set back).
        Someone else who may write to its directory cannot give what they
        put there meanwhile that owner, and a file that was there already
        (a name the saveset does not hold, say) is older. (Recording each
        file's inode would cost memory for every file, and the runs in C
        make most of them, for the few that are linked.)"""
        if stat.S_ISDIR(st.st_mode):
            return False
        if stat.S_ISLNK(st.st_mode) and "/".join(path_parts(tarinfo.linkname)) not in self._links:
            return False
        owners = (tarinfo.uid, 0) if self._as_root else (os.geteuid(),)
        return st.st_uid in owners and st.st_ctime_ns >= self._started_ns

    def makefifo(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        parts = path_parts(tarinfo.name)
        try:
            os.mkfifo(parts[-1], dir_fd=self.target.parent(parts))
        except FileExistsError:
            self._taken(parts)
        except OSError as exc:
            self._refused(parts, exc, link_or_fifo=True)

    def _taken(self, parts: list[str]) -> None:
        """Something stands where a member goes (SafeMembers looks only
        for directories and to overwrite; or it appeared after it looked):
        it is kept, and its owner, mode and time are left alone (``chown``)."""
        name = "/".join(parts)
        self.kept.append(name)
        self._not_ours[name] = "kept, not restored"
        self.not_made += 1

    def _note_if_different(self, tarinfo: tarfile.TarInfo, parts: list[str], parent: int) -> None:
        """A file kept that is not the member's regular file of its size and
        modification time is named in ``kept_different``: a file cut short
        by a restore that was killed (SIGKILL, a power cut) stays under its
        name, and the same restore run again would keep it silently."""
        try:
            st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except OSError:
            return  # gone meanwhile: nothing to compare
        if not stat.S_ISREG(st.st_mode) or (st.st_size, whole_seconds(st.st_mtime_ns)) != (
            tarinfo.size,
            math.floor(tarinfo.mtime),  # (a PAX mtime may have a fraction)
        ):
            self.kept_different.append("/".join(parts))

    # What file systems answer to what they cannot hold: one such member must
    # not cost the rest of the restore. A name: FAT and exFAT refuse ':',
    # '?', '"' and others with EINVAL; a name may be too long. A link or a
    # FIFO: FAT, exFAT and SMB shares have none.
    _BAD_NAME = frozenset({errno.EINVAL, errno.EILSEQ, errno.ENAMETOOLONG})
    _NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS})

    def _refused(
        self, parts: list[str], exc: OSError, *, link_or_fifo: bool = False, directory: bool = False
    ) -> None:
        """A member the target refused: reported, and the restore goes on (a
        directory without what is under it), unless the error is the
        target's as a whole (see _STOPS_THE_RESTORE)."""
        _stop_if_target_wide(exc, self.target.path)
        why = ""
        if exc.errno in self._BAD_NAME:
            why = " (the target's file system cannot hold this name)"
        elif link_or_fifo and exc.errno in self._NO_LINKS:
            why = " (can the target's file system hold links and FIFOs?)"
        name = "/".join(parts)
        under = "; nothing under it was restored" if directory else ""
        self.unrestorable.append((name, f"{exc.strerror or exc}{why}{under}"))
        self.not_made += 1
        self._not_ours[name] = "not restored"
        if directory:
            self.refused.add(name)

    # tarfile calls chown, then chmod and utime (not for links), with paths,
    # which follow links: all three are done here, on a descriptor.
    def chown(
        self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath, numeric_owner: bool
    ) -> None:
        if tarinfo.isreg() or tarinfo.islnk():
            return  # set by makefile on the new file (a hard link shares it)
        parts = path_parts(tarinfo.name)
        if "/".join(parts) in self._not_ours:
            return
        # Each is opened first, and its attributes are set on what was opened
        # if that is still what the restore made: by name, someone who may
        # write to the directory could have put a hard link to a file of
        # someone else in its place meanwhile, and a root restore would have
        # given that file the member's owner and mode.
        try:
            if tarinfo.isdir():
                fd = self.target.open_dir(parts)
            else:  # the link itself (O_PATH), or the FIFO without waiting for a writer
                flags = os.O_PATH if tarinfo.issym() else os.O_RDONLY | os.O_NONBLOCK
                flags |= os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(parts[-1], flags, dir_fd=self.target.parent(parts))
        except OSError:
            return  # gone or replaced meanwhile: nothing of ours to set
        try:
            st = os.fstat(fd)
            if tarinfo.issym():
                if stat.S_ISLNK(st.st_mode):
                    self._set_link_attributes(fd, tarinfo)
            elif tarinfo.isdir():
                if self._directories.get("/".join(parts)) == (st.st_dev, st.st_ino):
                    self._set_attributes(fd, tarinfo)
            elif stat.S_ISFIFO(st.st_mode) and st.st_nlink == 1:  # not one linked there
                self._set_attributes(fd, tarinfo)
        finally:
            os.close(fd)

    def _set_link_attributes(self, fd: int, tarinfo: tarfile.TarInfo) -> None:
        """Owner (as root), extended attributes and time of the symbolic link
        opened (O_PATH) as ``fd``. Python has no calls that take such a
        descriptor; its /proc/self/fd name leads to the link itself (not
        followed further). Without /proc they are left as they are."""
        link = f"/proc/self/fd/{fd}"
        if self._as_root:
            with contextlib.suppress(OSError):
                os.chown(link, tarinfo.uid, tarinfo.gid)
        self._set_xattrs(link, tarinfo)
        with contextlib.suppress(OSError):  # a file system without link times
            # The link's own time, as GNU tar sets it (tarfile leaves it at now).
            os.utime(link, (tarinfo.mtime, tarinfo.mtime))

    def _set_xattrs(self, target: int | str, tarinfo: tarfile.TarInfo) -> bool:
        """The extended attributes stored with ``tarinfo`` (see
        sbc.archive.read_xattrs), set on ``target``: a descriptor, or a
        link's /proc/self/fd name; but security ones (NOT_RESTORED_XATTRS):
        whether there were any. One that cannot be set (not as root, or on a
        file system without them) is reported, and the restore goes on; so
        is an ACL as GNU tar stores it (GNU_TAR_ACL)."""
        left_out = False
        if acls := _gnu_tar_acls(tarinfo.pax_headers):
            where = "/".join(path_parts(tarinfo.name))
            why = (
                f"its ACL ({', '.join(acls)}, as tar --acls stores it) was not restored: sbc "
                "does not apply ACLs in that form; GNU tar --acls -xpf of the saveset does"
            )
            self.unrestorable.append((where, why))
        for record, text in tarinfo.pax_headers.items():
            if not record.startswith(XATTR_RECORD):
                continue
            name = record[len(XATTR_RECORD) :]
            if name.startswith(NOT_RESTORED_XATTRS):
                left_out = True
                continue
            value = text.encode("utf-8", "surrogateescape")  # as tarfile decoded it
            try:
                os.setxattr(target, name, value)
            except OSError as exc:
                if name == NFS_ACL and exc.errno in NO_XATTRS:
                    continue  # restored off NFS
                where = "/".join(path_parts(tarinfo.name))
                why = f"its extended attribute {name} was not restored: {exc.strerror}"
                self.unrestorable.append((where, why))
        return left_out

    def chmod(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        """Done in ``chown``."""

    def utime(self, tarinfo: tarfile.TarInfo, targetpath: StrOrBytesPath) -> None:
        """Done in ``chown``."""

    def _set_attributes(self, fd: int, tarinfo: tarfile.TarInfo) -> None:
        """Owner (as root), extended attributes, mode and time of ``tarinfo``
        on ``fd``. An owner, mode or time that cannot be set (a file system
        without owners) does not stop the restore, as with tarfile; nor does
        an extended attribute (see _set_xattrs)."""
        if self._as_root:
            try:
                os.fchown(fd, tarinfo.uid, tarinfo.gid)
            except OSError:
                pass
        # Before the mode, which an ACL (system.posix_acl_access) would change.
        left_out = self._set_xattrs(fd, tarinfo)
        mode = restored_mode(tarinfo)
        if tarinfo.isreg() and (left_out or mode != stat.S_IMODE(tarinfo.mode)):
            self.unprivileged.append("/".join(path_parts(tarinfo.name)))
        try:
            os.fchmod(fd, mode)
        except OSError:
            pass
        try:
            os.utime(fd, (tarinfo.mtime, tarinfo.mtime))
        except OSError:
            pass


def _gnu_tar_acls(records: Mapping[str, str]) -> list[str]:
    """The GNU tar ACL records among ``records`` that hold more than the
    mode: tar stores a directory's access ACL with its default one even
    where it is just user::, group:: and other::, which the mode restores."""
    return [
        record
        for record, text in records.items()
        if record.startswith(GNU_TAR_ACL)
        and not all(
            entry.startswith(("user::", "group::", "other::"))
            for entry in text.replace(",", "\n").split()
        )
    ]


def restored_mode(tarinfo: tarfile.TarInfo) -> int:
    """The permission bits a member is restored with: never set-user-id, nor
    set-group-id on a file, for no privilege comes from a saveset (savesets
    of clients without a certificate are shared); a restore names the files
    it left without them (RestoreResult.unprivileged). A directory's setgid
    (its files' group) and sticky bit (/tmp: only owners delete) are no
    privilege, and without them a shared directory would be open to all."""
    return stat.S_IMODE(tarinfo.mode) & (0o3777 if tarinfo.isdir() else 0o777)


@functools.cache
def _known_id(lookup: Callable[[str], Any], name: str, number: int) -> int:
    """The id of user or group ``name`` here (``lookup`` is pwd.getpwnam or
    grp.getgrnam), else the stored ``number``."""
    try:
        return int(lookup(name)[2]) if name else number
    except KeyError:
        return number


@dataclass
class RestoreResult:
    members: int = 0  # entries received: the saveset's, or those stpd selected
    extracted: int = 0  # of them, those restored (not kept, skipped or left out)
    bytes: int = 0
    sha256: str = ""  # of what was received
    checked: bool = False  # sha256 is the saveset's (all of it was received)
    skipped: list[str] = field(default_factory=list)  # device nodes, not restored
    kept: list[str] = field(default_factory=list)  # existed already, not overwritten
    # of the files among them, those of another size or time than the member's
    kept_different: list[str] = field(default_factory=list)
    # (name, reason): links, FIFOs and names the target's file system cannot hold
    unrestorable: list[tuple[str, str]] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)  # entries asked for, not in the saveset
    # files restored without their set-id bits or security.* attributes (restored_mode)
    unprivileged: list[str] = field(default_factory=list)
    removed: str | None = None  # the incomplete file of a restore that stopped part-way
    # sbc's temporaries that a killed restore left (TargetDir): removed, or
    # named like them but not certainly stale ones, left
    stale_removed: list[str] = field(default_factory=list)
    stale_left: list[str] = field(default_factory=list)


def extract_stream(
    get: Get,
    target: Path,
    result: RestoreResult,
    *,
    overwrite: bool = False,
    only: Sequence[str] = (),
) -> None:
    """Extract the tar stream from ``get`` into ``target`` and hash it (all
    of it, whatever is extracted). Existing files are kept unless
    ``overwrite``; with ``only``, just those entries and what is under them
    are extracted (see ``SafeMembers``).

    The pieces ``get`` returns must stay valid until the batch after the
    next one is asked for (a two-buffer BodyReader): a thread of its own
    hashes each piece while the next is extracted, and a large file's
    pieces are written behind too (_copy_out). Receiving and extracting,
    hashing, and writing into fresh page cache are about alike in cost;
    hashing in line made a 2 GiB restore 12 % slower."""
    digest = hashlib.sha256()

    def hash_pieces(pieces: Batch) -> None:
        for piece in pieces:
            digest.update(piece)

    with WriteBehind(hash_pieces) as hashing:

        def observe(piece: memoryview) -> None:
            hashing.put([piece])
            result.bytes += len(piece)

        reader = BatchReader(get, observe)
        _extract_all(reader, target, result, overwrite, only)
        reader.drain()
        hashing.finish()
    result.sha256 = digest.hexdigest()


def _extract_all(
    reader: BatchReader,
    target: Path,
    result: RestoreResult,
    overwrite: bool,
    only: Sequence[str],
) -> None:
    """extract_stream's extraction: members through SafeMembers, errors as
    ArchiveError (see there)."""
    extracting: list[tarfile.TarInfo] = []  # the member being extracted, if any
    target.mkdir(parents=True, exist_ok=True)
    target_dir = TargetDir(target)
    archive: _Extraction | None = None
    try:
        # "r:" with a forward-only reader: extract_into takes member after
        # member in order, so it never seeks back (see BatchReader).
        archive = _Extraction.open(fileobj=reader, mode="r:")  # type: ignore[call-overload]
        with archive:
            safe_members = SafeMembers(target_dir, overwrite, only)

            def counted(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
                result.members += 1
                extracting[:] = [member]
                safe = safe_members(member, dest)
                if safe is None:
                    extracting.clear()
                else:
                    result.extracted += 1
                return safe

            def made_in_run(count: int) -> None:
                result.members += count
                result.extracted += count

            result.unrestorable = safe_members.unrestorable  # (also when it stops part-way)
            archive.extract_into(safe_members, counted, made_in_run)
            result.extracted -= archive.not_made
            result.skipped, result.kept = safe_members.skipped, safe_members.kept
            result.unprivileged = archive.unprivileged
            result.kept_different = archive.kept_different
            result.not_found = [name for name in only if name not in safe_members.found]
    except BaseException as exc:
        result.removed = archive.removed if archive is not None else None
        removed = f", and the incomplete {result.removed} was removed" if result.removed else ""
        if isinstance(exc, OSError):  # writing into the target: a full disk, a read-only place
            where = extracting[0].name if extracting else exc.filename or target
            raise ArchiveError(
                f"cannot restore into {target}: {exc.strerror or exc} ({where}); the restore "
                f"stopped there{removed} (what came before it in the saveset is restored)"
            ) from None
        if isinstance(exc, UnsafeMember):
            raise ArchiveError(
                f"refused an unsafe archive member: {exc}; restore stopped there, nothing was "
                "written outside the target directory"
            ) from None
        if isinstance(exc, (tarfile.TarError, EOFError)):
            raise ArchiveError(
                f"the restore stream is not a valid tar archive: {exc}{removed}"
            ) from None
        raise  # the caller says what it was
    finally:
        result.stale_removed, result.stale_left = target_dir.stale_removed, target_dir.stale_left
        target_dir.close()
