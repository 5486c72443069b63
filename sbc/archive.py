"""Tar on the client: writing a tree as a stream, and extracting one safely.

Both run in a worker thread of the transfer core (``stpd.transfer``):
``write_tree`` pushes batches through a :class:`BatchWriter`, and
``extract_stream`` pulls them through a :class:`BatchReader`.

The archive is written by ``tarfile`` in PAX format (unicode names, long
names, exact mtimes), with regular files, directories and symlinks (as
links). Extraction uses ``tarfile``'s ``data`` filter (no absolute paths, no
``..``, no links out of the target, no device nodes), but keeps the stored
permission bits, which that filter would otherwise loosen or tighten.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stpd.transfer import BatchReader, BatchWriter, Get, Put

COPY_BUFFER = 1024 * 1024  # tarfile's copy size for file contents (its default: 16 KiB)
STREAM_BUFFER = 64 * 1024  # tarfile's read-ahead in stream mode; small, it is re-sliced per member


class ArchiveError(Exception):
    """A problem with the local files of a backup or restore."""


@dataclass
class TreeStats:
    files: int = 0
    directories: int = 0
    links: int = 0
    payload_bytes: int = 0  # file contents, without tar headers
    skipped: list[str] = field(default_factory=list)


def archive_root_name(source: Path) -> str:
    """Members are stored under the last component of the backed-up path."""
    name = source.name
    return name if name not in ("", ".", "..") else "root"


def _walk(source: Path) -> Iterator[Path]:
    """The tree in a stable order: each directory before its entries."""
    yield source
    if source.is_dir() and not source.is_symlink():
        stack = [source]
        while stack:
            directory = stack.pop()
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError as exc:
                raise ArchiveError(f"cannot read directory {directory}: {exc.strerror}") from None
            subdirs = []
            for entry in entries:
                yield Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(Path(entry.path))
            stack.extend(reversed(subdirs))


def write_tree(source: Path, put: Put, stats: TreeStats) -> None:
    """Write ``source`` (a file or a directory tree) as a tar stream to ``put``."""
    root_name = archive_root_name(source)
    out = BatchWriter(put)
    with tarfile.open(
        fileobj=out,
        mode="w",
        format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
        copybufsize=COPY_BUFFER,
    ) as archive:
        for path in _walk(source):
            arcname = (
                root_name
                if path == source
                else f"{root_name}/{path.relative_to(source).as_posix()}"
            )
            try:
                info = archive.gettarinfo(str(path), arcname)
            except OSError as exc:
                raise ArchiveError(f"cannot read {path}: {exc.strerror}") from None
            if info is None:  # sockets and the like have no tar form
                stats.skipped.append(str(path))
                continue
            if info.isreg():
                try:
                    with open(path, "rb") as f:
                        archive.addfile(info, f)
                except OSError as exc:
                    raise ArchiveError(f"cannot read {path}: {exc.strerror}") from None
                stats.files += 1
                stats.payload_bytes += info.size
            else:
                archive.addfile(info)
                stats.directories += info.isdir()
                stats.links += info.issym() or info.islnk()
    out.finish()


def _keep_mode(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    safe = tarfile.data_filter(member, dest)  # raises tarfile.FilterError on escapes
    if safe is None:
        return None
    if member.isreg() or member.isdir():
        # Restore the stored permission bits exactly (but never set-id bits).
        return safe.replace(mode=stat.S_IMODE(member.mode) & 0o777, deep=False)
    return safe


@dataclass
class RestoreResult:
    members: int = 0
    bytes: int = 0
    sha256: str = ""


def extract_stream(get: Get, target: Path, result: RestoreResult) -> None:
    """Extract the tar stream from ``get`` into ``target`` and hash it."""
    digest = hashlib.sha256()

    def observe(piece: bytes) -> None:
        digest.update(piece)
        result.bytes += len(piece)

    reader = BatchReader(get, observe)
    try:
        with tarfile.open(fileobj=reader, mode="r|", bufsize=STREAM_BUFFER) as archive:  # type: ignore[call-overload]
            archive.copybufsize = COPY_BUFFER

            def counted(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
                result.members += 1
                return _keep_mode(member, dest)

            # extractall sets directory modes and mtimes last, after their contents.
            archive.extractall(target, filter=counted)
    except tarfile.FilterError as exc:
        raise ArchiveError(f"refused an unsafe archive member: {exc}") from None
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"the restore stream is not a valid tar archive: {exc}") from None
    reader.drain()
    result.sha256 = digest.hexdigest()
