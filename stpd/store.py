"""Savesets on disk.

A saveset is two files in the data directory: ``<id>.tar`` (a plain tar
archive, readable by ``tar -tf``) and ``<id>.json`` (its metadata). An
upload is checked to be a tar archive while it streams in
(``stpd.tarcheck``), written to ``.incoming/<id>.tar.part``, fsynced, checked
to have ended properly, renamed into place, and only then is its metadata
written (atomically). Listing looks at metadata files only, so a saveset
becomes visible in one step and nothing partial is ever listed. Leftovers
of interrupted uploads (``.incoming/*``) are removed at start, under a lock
(flock on the directory) that one stpd holds while it runs: a second stpd
given the same data directory would remove the first one's uploads in
progress. A tar in the data directory was whole when it was renamed there:
one without metadata (a crash in the middle of a removal) is never removed
by itself, only reported (``Scan.warnings``), like metadata that cannot be
read or has lost its tar; ``stpd delete`` removes any of them by id.

Everything here is blocking and runs in worker threads.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import tarfile
import time
from collections.abc import Generator, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pki.inventory import timestamp
from stpd.tarcheck import InvalidTar, PlainTarInfo, Selection, TarStreamCheck, path_parts
from stpd.transfer import write_all

INCOMING = ".incoming"
# \Z, not $: "$" also matches before a trailing newline ("SS-...\n").
SAVESET_ID = re.compile(r"^SS-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}\Z")


class StoreError(Exception):
    """Base of storage errors; ``status`` is the HTTP answer."""

    status = 500


DATA_DIRECTORY_GONE = (
    "the data directory is gone (its file system unmounted?); stpd makes it again only when "
    "it starts"
)


class StorageFull(StoreError):
    status = 507


class InvalidArchive(StoreError):
    status = 400


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_saveset_id(now: dt.datetime) -> str:
    return f"SS-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class SavesetMeta:
    saveset: str
    owner: str
    source: str
    bytes: int
    sha256: str
    started: str
    finished: str
    peer: str

    @property
    def created(self) -> str:
        return self.finished

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "created": self.created}


def _finished_at(meta: SavesetMeta) -> dt.datetime | None:
    """When ``meta``'s saveset finished; None when its time is unreadable
    or has no zone (such a saveset is never removed by age)."""
    try:
        finished = dt.datetime.fromisoformat(meta.finished)
    except ValueError:
        return None
    return finished if finished.tzinfo is not None else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def in_the_way(path: Path, where: str) -> str:
    """Says that ``path``, something stpd did not make (a directory in
    ``.incoming``, say), is in the way of ``where``, and what to do."""
    kind = "a directory" if path.is_dir() else "a file" if path.is_file() else "a special file"
    return f"{path} is in the way: {kind}, {where}; remove it or move it elsewhere"


NAMED_LIKE_A_SAVESET = "named like a file of a saveset, which stpd neither lists nor serves"


def _storage_error(exc: OSError, what: str) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("storage full on the server: free space in the data directory")
    return StoreError(f"cannot {what}: {exc.strerror}")


class Upload:
    """One saveset being received: ``write`` pieces, then ``commit`` or ``abort``."""

    def __init__(self, store: SavesetStore, owner: str, source: str, peer: str) -> None:
        self.store = store
        self.started = utc_now()
        self.saveset = new_saveset_id(self.started)
        self.owner, self.source, self.peer = owner, source, peer
        self.part = store.incoming / f"{self.saveset}.tar.part"
        self._hash = hashlib.sha256()
        self._check = TarStreamCheck()
        try:
            self._fd: int | None = os.open(
                self.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise _storage_error(exc, "create a saveset file") from None

    def write(self, pieces: Sequence[bytes | memoryview]) -> None:
        self.absorb(pieces)
        self.write_out(pieces)

    def absorb(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Hash the pieces and check their tar framing (``write``'s first
        half; stpd calls the halves in two threads, see WriteBehind)."""
        try:
            for piece in pieces:
                self._hash.update(piece)
                self._check.feed(piece)
        except InvalidTar as exc:
            raise InvalidArchive(
                f"upload is not a valid tar stream: {exc}; nothing stored"
            ) from None

    def write_out(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Write the pieces to the saveset file (``write``'s second half)."""
        assert self._fd is not None
        try:
            write_all(self._fd, pieces)
        except OSError as exc:
            raise _storage_error(exc, "write the saveset") from None

    def commit(self) -> SavesetMeta:
        """Make the saveset durable and visible; on any failure nothing is left."""
        try:
            assert self._fd is not None
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise _storage_error(exc, "flush the saveset to disk") from None
            os.close(self._fd)
            self._fd = None
            try:
                self._check.finish()
            except InvalidTar as exc:
                raise InvalidArchive(
                    f"upload is not a valid tar stream: {exc}; nothing stored"
                ) from None
            meta = SavesetMeta(
                saveset=self.saveset,
                owner=self.owner,
                source=self.source,
                bytes=self._check.offset,  # the checker saw every byte written
                sha256=self._hash.hexdigest(),
                started=timestamp(self.started),
                finished=timestamp(utc_now()),
                peer=self.peer,
            )
            self.store.publish(self.part, meta)
            return meta
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.part.unlink(missing_ok=True)


@dataclass(frozen=True)
class Prepared:
    """What ``SavesetStore.prepare`` did, for stpd to say."""

    created: bool  # the data directory was not there (its file system not mounted?)
    removed: list[Path]  # leftovers of interrupted uploads
    # Savesets whose publish a crash cut between its two renames: the tar in
    # place, its metadata (whole, fsynced) still in .incoming; now in place.
    published: list[str] = field(default_factory=list)


class SavesetStore:
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()  # as the log names it: stpd may be started anywhere
        self.incoming = self.root / INCOMING
        self._lock: int | None = None
        # Metadata read before, by file name: (inode, size, mtime), and what it said.
        self._read_before: dict[str, tuple[tuple[int, int, int], SavesetMeta | None]] = {}

    def check_in_place(self) -> None:
        """StoreError unless the data directory is still the one locked at
        start: unmounted (a disk pulled, a share gone), the bare mount point
        beneath would list no savesets and take backups onto the file
        system under it. stpd makes it only when it starts."""
        if self._lock is None:
            return  # not prepared (tests of the store alone)
        try:
            now, locked = os.stat(self.root), os.fstat(self._lock)
        except OSError:
            raise StoreError(DATA_DIRECTORY_GONE) from None
        if (now.st_dev, now.st_ino) != (locked.st_dev, locked.st_ino):
            raise StoreError(DATA_DIRECTORY_GONE)

    def in_place(self) -> bool:
        """Whether the data directory is still the one locked at start (see
        check_in_place): for status, which answers either way."""
        try:
            self.check_in_place()
        except StoreError:
            return False
        return True

    def space(self) -> dict[str, int] | None:
        """Bytes free for savesets (for stpd's user, as ``df`` counts them)
        and in all, in the data directory's file system; None if it cannot
        be asked (status answers anyway), or is not there."""
        try:
            self.check_in_place()
            fs = os.statvfs(self.root)
        except (OSError, StoreError):
            return None
        return {"free_bytes": fs.f_bavail * fs.f_frsize, "total_bytes": fs.f_blocks * fs.f_frsize}

    def prepare(self) -> Prepared:
        """Lock the data directory for this stpd, create the directories and
        remove the leftovers of interrupted uploads. A data directory that
        cannot be used is a StoreError that says so."""
        fix = "set STPD_DATA_DIR in stpd.ini (or --data-dir) to a writable directory"
        removed, published = [], []
        try:
            try:
                # Backups are private: a data directory we create is ours alone.
                self.root.mkdir(parents=True, mode=0o700)
                created = True
            except FileExistsError:
                created = False
            self._take_lock()
            try:
                self.incoming.mkdir(exist_ok=True, mode=0o700)
            except FileExistsError:  # a file, not the directory
                raise StoreError(
                    in_the_way(
                        self.incoming, "where stpd keeps its uploads in progress, in a directory"
                    )
                ) from None
            for leftover in self.incoming.iterdir():
                if leftover.is_dir() and not leftover.is_symlink():  # not stpd's: not removed
                    raise StoreError(
                        in_the_way(
                            leftover,
                            f"where stpd keeps only its uploads in progress ({self.incoming}), "
                            "and removes what is left of them at start",
                        )
                    )
                finished = self._finish_publish(leftover)
                if finished is not None:
                    published.append(finished)
                    continue
                leftover.unlink()
                removed.append(leftover)
            if published:
                _fsync_dir(self.root)
        except StoreError:
            self.close()
            raise
        except OSError as exc:
            self.close()
            raise StoreError(
                f"data directory {self.root} cannot be used: {exc.strerror or exc} "
                f"({exc.filename or self.root}): {fix}"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            self.close()
            raise StoreError(f"data directory {self.root} is not writable: {fix}")
        return Prepared(created, removed, published)

    def _finish_publish(self, leftover: Path) -> str | None:
        """Put ``leftover`` in place when it is the metadata of a publish cut
        short after its tar went into place (see publish): the saveset is
        whole, and without it no longer served. Its id; None for anything else."""
        saveset = leftover.name.removesuffix(".json.part")
        if saveset == leftover.name or not SAVESET_ID.match(saveset):
            return None
        meta_path = self.root / f"{saveset}.json"
        meta = _read_meta(leftover)
        if meta is None or meta.saveset != saveset or os.path.lexists(meta_path):
            return None
        try:
            tar = self.tar_path(saveset).lstat()
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(tar.st_mode) or tar.st_size != meta.bytes:
            return None
        os.replace(leftover, meta_path)
        return saveset

    def _take_lock(self) -> None:
        # On the directory itself: no lock file to leave behind or delete.
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"data directory {self.root} is in use by another stpd: give each stpd "
                "its own STPD_DATA_DIR in stpd.ini (or --data-dir), or stop the other one"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock = fd

    def close(self) -> None:
        """Release the data directory (the lock goes with the descriptor)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def begin(self, owner: str, source: str, peer: str) -> Upload:
        self.check_in_place()
        return Upload(self, owner, source, peer)

    def publish(self, part: Path, meta: SavesetMeta) -> None:
        """Write the metadata aside, rename ``part`` into place, then the
        metadata, which makes the saveset visible. On any failure both or
        neither are left (see _unpublish), and a StoreError says why. The
        metadata is whole in .incoming before the tar is in place, so that a
        scan meanwhile sees a publish under way (see scan), not a tar
        without metadata."""
        tar = self.tar_path(meta.saveset)
        tmp = self.incoming / f"{meta.saveset}.json.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "w", encoding="utf-8") as f:
                json.dump(asdict(meta), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, tar)
            os.replace(tmp, tar.with_suffix(".json"))
            _fsync_dir(self.root)
        except OSError as exc:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._unpublish(meta.saveset)
            self.check_in_place()  # a directory gone says so, not the errno of a file in it
            raise _storage_error(exc, "store the saveset") from None

    def _unpublish(self, saveset: str) -> None:
        """Undo a publish cut short. The metadata goes first: while it is
        there the saveset is listed, so its tar stays until it is gone."""
        try:
            (self.root / f"{saveset}.json").unlink(missing_ok=True)
        except OSError:
            return  # still listed, and whole
        with suppress(OSError):  # a tar without metadata is never served
            self.tar_path(saveset).unlink(missing_ok=True)

    def tar_path(self, saveset: str) -> Path:
        if not SAVESET_ID.match(saveset):
            raise ValueError(saveset)
        return self.root / f"{saveset}.tar"

    def all(self) -> list[SavesetMeta]:
        return [meta for _, meta in self._metadata() if meta is not None]

    def _metadata(self) -> list[tuple[str, SavesetMeta | None]]:
        """Every metadata file by name, read (None: it cannot be). Every
        listing reads the directory anew (what `stpd delete` removed is gone
        at once), but a file unchanged since it was last read (same inode,
        size and modification time) is not parsed again: with 30,000
        savesets each `sbc list` parsed them all (1.4 s, and 20 at once ran
        past SBC_IO_TIMEOUT). Threads may call this at once: the cache is
        replaced whole, and what it holds is frozen."""
        with os.scandir(self.root) as listing:  # DirEntry: no Path to make, sort or stat
            entries = sorted(
                (e for e in listing if _META_NAME.fullmatch(e.name)), key=lambda e: e.name
            )
        read_before, now_read = self._read_before, {}
        found: list[tuple[str, SavesetMeta | None]] = []
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:  # gone meanwhile
                found.append((entry.name, None))
                continue
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            before = read_before.get(entry.name)
            if before is not None and before[0] == key:
                meta = before[1]
            else:
                meta = _read_meta(Path(entry.path))
            now_read[entry.name] = (key, meta)
            found.append((entry.name, meta))
        self._read_before = now_read
        return found

    def scan(self) -> Scan:
        """Every saveset, and what is wrong in the data directory."""
        found = self._metadata()
        with os.scandir(self.root) as listing:
            entries = sorted(
                (e for e in listing if _SAVESET_FILE.fullmatch(e.name)), key=lambda e: e.name
            )
        there = {e.name for e in entries}
        in_the_way = {e.name for e in entries if not e.is_file()}  # (follows links, as is_file)
        # The two listings are not one moment: a saveset removed (metadata
        # first) or published (tar first) by the running stpd meanwhile
        # looked damaged. So each finding is looked at again, and dropped
        # when it has gone or is a publish under way.
        return Scan(
            savesets=[meta for _, meta in found if meta is not None],
            unreadable=[
                path
                for path in (self.root / n for n, m in found if m is None and n not in in_the_way)
                if path.exists() and _read_meta(path) is None
            ],
            orphans=[
                path
                for path in (
                    Path(e.path)
                    for e in entries
                    if e.name.endswith(".tar")
                    and e.name[:-4] + ".json" not in there
                    and e.name not in in_the_way
                )
                # (.part first: a publish renames it to .json in between)
                if path.exists()
                and not (self.incoming / f"{path.stem}.json.part").exists()
                and not path.with_suffix(".json").exists()
            ],
            strays=[Path(e.path) for e in entries if e.name in in_the_way],
            without_data=[
                meta
                for name, meta in found
                if meta is not None
                and name[:-5] + ".tar" not in there
                and (self.root / name).exists()
            ],
        )

    def in_incoming(self) -> tuple[int, int]:
        """The files in .incoming and their bytes: uploads in progress, or
        what is left of interrupted ones until the next start (see prepare)."""
        files = size = 0
        try:
            with os.scandir(self.incoming) as listing:
                for entry in listing:
                    with suppress(FileNotFoundError):  # stored or given up meanwhile
                        if entry.is_file(follow_symlinks=False):
                            size += entry.stat(follow_symlinks=False).st_size
                            files += 1
        except (FileNotFoundError, NotADirectoryError):  # no stpd started yet; in the way
            pass
        return files, size

    def files_of(self, saveset: str) -> list[Path]:
        """The files of ``saveset`` that are there, whole or not (what
        ``remove`` removes); none for a malformed id."""
        if not SAVESET_ID.match(saveset):
            return []
        return [p for p in (self.root / f"{saveset}.json", self.tar_path(saveset)) if p.exists()]

    def obstacle(self, saveset: str) -> str | None:
        """What stands where a file of ``saveset`` goes and is not stpd's to
        remove (a directory, say): said, for `stpd delete` and retention to
        leave the saveset alone; None when nothing does."""
        for path in self.files_of(saveset):
            if not path.is_file():
                return in_the_way(path, NAMED_LIKE_A_SAVESET)
        return None

    def owned_by(self, owner: str) -> list[SavesetMeta]:
        self.check_in_place()
        return [m for m in self.all() if m.owner == owner]

    def remove_finished_before(
        self, moment: dt.datetime
    ) -> tuple[list[SavesetMeta], list[tuple[SavesetMeta, str]]]:
        """Remove the savesets that finished before ``moment`` (see
        ``remove``): those removed, and those that could not be, with why
        (one must not keep the rest, nor unsay those removed before it). A
        saveset whose time cannot be read is kept, and so is one whose tar
        is not a file (in the way: Scan reports it). So is the newest
        saveset of each owner and source, however old: a clock that jumps
        ahead, or backups refused for weeks (an expired CRL), must not
        leave a client with no backup at all."""
        removed, failed = [], []
        timed = [(meta, _finished_at(meta)) for meta in self.all()]
        newest: dict[tuple[str, str], tuple[dt.datetime, str]] = {}
        for meta, finished in timed:
            if finished is not None:
                key = (meta.owner, meta.source)
                newest[key] = max(
                    newest.get(key, (finished, meta.saveset)), (finished, meta.saveset)
                )
        for meta, finished in timed:
            if finished is None or finished >= moment:
                continue
            if newest[(meta.owner, meta.source)][1] == meta.saveset:
                continue
            obstacle = self.obstacle(meta.saveset)
            if obstacle is not None:
                failed.append((meta, obstacle))
                continue
            try:
                self.remove(meta.saveset)
            except OSError as exc:
                failed.append((meta, exc.strerror or str(exc)))
                continue
            removed.append(meta)
        return removed, failed

    def remove(self, saveset: str) -> None:
        """Remove one saveset. The metadata goes first, so it leaves every
        listing in one step; a tar left by a crash in between is reported
        (see Scan), and removed by removing the saveset again."""
        (self.root / f"{saveset}.json").unlink(missing_ok=True)
        self.tar_path(saveset).unlink(missing_ok=True)

    def get(self, saveset: str) -> SavesetMeta | None:
        """The saveset's metadata, whoever owns it; None for a malformed id
        or a saveset that is not there."""
        if not SAVESET_ID.match(saveset):
            return None
        self.check_in_place()
        return _read_meta(self.root / f"{saveset}.json")

    def find(self, owner: str, saveset: str) -> SavesetMeta | None:
        """The saveset if it exists and belongs to ``owner``; others' savesets
        are reported exactly like missing ones."""
        meta = self.get(saveset)
        return meta if meta is not None and meta.owner == owner else None


@dataclass(frozen=True)
class Scan:
    """The data directory as ``stpd list`` and stpd's start see it."""

    savesets: list[SavesetMeta]  # every readable metadata: these are listed
    unreadable: list[Path]  # metadata that cannot be read: neither listed nor served
    orphans: list[Path]  # tars without metadata: never served
    without_data: list[SavesetMeta]  # listed, but their tar is gone
    strays: list[Path]  # directories (or the like) named like a saveset's files

    def warnings(self) -> list[str]:
        """What takes room or is listed but cannot be served, each with what
        to do about it."""
        found = [
            f"{path} cannot be read by this user ({denied}), so that saveset is neither listed "
            "nor served, though it may well be whole (stored by an stpd that ran as another "
            "user?): give the user stpd runs as access to it and to its .tar (chown), do not "
            "delete it"
            if (denied := _denied(path))
            else f"{path} cannot be read as saveset metadata, so that saveset is neither listed "
            f"nor served: repair the file, or `stpd delete {path.stem}` removes it and its .tar"
            for path in self.unreadable
        ]
        found += [
            f"{path} has no metadata (a removal or an upload cut short by a crash?), so it is "
            "neither listed nor served: it is a whole tar archive (`tar -tvf` reads it); keep "
            f"a copy elsewhere if it is needed, and `stpd delete {path.stem}` removes it"
            for path in self.orphans
        ]
        found += [
            f"saveset {meta.saveset} of {meta.owner} has lost its data ({meta.saveset}.tar is "
            "not there): it is listed, but cannot be restored; put the .tar back from a copy, "
            f"or `stpd delete {meta.saveset}` removes its metadata"
            for meta in self.without_data
        ]
        found += [in_the_way(path, NAMED_LIKE_A_SAVESET) for path in self.strays]
        return found


_META_NAME = re.compile(r"SS-.*\.json")  # as glob("SS-*.json") matches
_SAVESET_FILE = re.compile(r"SS-.*\.(json|tar)")


def _denied(path: Path) -> str | None:
    """Its owner and mode when this user may not read ``path``: then the
    file is not damaged, and deleting it (the fix for a damaged one) would
    lose a saveset."""
    try:
        with open(path, "rb"):
            return None
    except PermissionError:
        with suppress(OSError):
            st = path.stat()
            return f"Permission denied; owned by uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}"
        return "Permission denied"
    except OSError:
        return None


def _read_meta(path: Path) -> SavesetMeta | None:
    """A saveset's metadata; None when it cannot be read (then the saveset
    is neither listed nor served)."""
    if not path.is_file():  # a directory in the way; a FIFO would block the reading
        return None
    try:
        return SavesetMeta(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


class SavesetCheck:
    """A stored saveset hashed anew (``sbc verify``), a step at a time: a
    large one takes minutes, and stpd tells the client how far it got
    between steps. ``sha256`` once ``done``."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._hash = hashlib.sha256()
        self._buffer = memoryview(bytearray(1024 * 1024))
        self.bytes = 0
        self.done = False

    def step(self, seconds: float) -> None:
        """Read and hash for about ``seconds`` (one buffer at least)."""
        until = time.monotonic() + seconds
        while not self.done:
            read = os.readv(self._fd, [self._buffer])
            if not read:
                self.done = True
                break
            self._hash.update(self._buffer[:read])
            self.bytes += read
            if time.monotonic() >= until:
                break

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        os.close(self._fd)


def _stored_members(path: Path) -> Generator[tuple[tarfile.TarInfo, int], None, None]:
    """The members of the stored saveset ``path``, header by header (tarfile
    seeks over the contents), none kept: millions in constant memory. Each
    comes with the offset where the next member's header begins. A damaged
    header is a ReadError (see PlainTarInfo.fromtarfile), not the end."""
    with tarfile.open(path, "r:", tarinfo=PlainTarInfo) as tar:
        while (member := tar.next()) is not None:
            # tarfile keeps every member it read (an attribute typeshed lacks);
            # none is needed again here.
            tar.members.clear()  # type: ignore[attr-defined]
            yield member, tar.offset


SCAN_STEP = 1000  # members (about 13 ms of reading headers)


def saveset_selection(
    path: Path, entries: Sequence[str]
) -> Generator[tuple[int, int] | None, None, None]:
    """The byte ranges ``(start, end)`` of the stored saveset ``path`` that
    hold ``entries`` and what is under them, each member with its extended
    headers and contents, adjacent ones joined. A selective restore sends
    them as they are stored, then END_OF_ARCHIVE: the stream is a tar
    archive of just those members. tarfile seeks over the rest. Every
    SCAN_STEP members passed over it yields None: a sender can show that
    it is still there (see STILL_LOOKING)."""
    selection = Selection(entries)
    start = end = -1  # of the range being gathered
    passed = 0
    for member, next_offset in _stored_members(path):
        if selection.match(path_parts(member.name)):
            if start < 0:
                start = member.offset  # its first header block (a PAX one, say)
            end = next_offset
            continue
        if start >= 0:
            yield start, end
            start = -1
        passed += 1
        if passed % SCAN_STEP == 0:
            yield None
    if start >= 0:
        yield start, end


_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "directory",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.FIFOTYPE: "fifo",
    tarfile.CHRTYPE: "device",
    tarfile.BLKTYPE: "device",
}


def _mtime_text(mtime: float) -> str:
    try:
        return timestamp(dt.datetime.fromtimestamp(mtime, dt.UTC))
    except (ValueError, OverflowError, OSError):  # a PAX time beyond datetime's years
        return f"{mtime:.0f}"  # seconds since 1970


def saveset_entries(path: Path) -> Generator[dict[str, Any], None, None]:
    """The entries of the stored saveset ``path`` (see _stored_members)."""
    for member, _ in _stored_members(path):
        entry: dict[str, Any] = {
            "name": member.name,
            "type": _KINDS.get(member.type, "other"),
            "size": member.size,
            "mode": f"{member.mode & 0o7777:04o}",
            "owner": f"{member.uname or member.uid}/{member.gname or member.gid}",
            "mtime": _mtime_text(member.mtime),
        }
        if member.issym() or member.islnk():
            entry["link"] = member.linkname
        if member.ischr() or member.isblk():  # tar -tv shows c or b and major,minor
            kind = "char" if member.ischr() else "block"
            entry["device"] = {"kind": kind, "major": member.devmajor, "minor": member.devminor}
        yield entry
