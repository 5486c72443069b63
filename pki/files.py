"""Writing key and certificate files safely.

Files are written atomically (a temporary file in the same directory, flushed
to disk, then renamed over the target), so a crash never leaves a half-written
key behind a valid name. Nothing here deletes an existing file: old files are
renamed aside.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from pki.errors import PkiError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
# Directories we create hold private keys next to certificates.
DIRECTORY_MODE = 0o700
# Upper bound on "<name>.old-<timestamp>-<n>" candidates, in case of a bug:
# more than this many moves within one second does not happen by hand.
_MAX_ASIDE_ATTEMPTS = 1000


def write_private(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (keys)."""
    _write_atomic(Path(path), data, PRIVATE_MODE)


def write_public(path: Path, data: bytes, *, make_parent: bool = True) -> None:
    """Atomically write ``data`` to ``path`` with mode 0644 (certificates)."""
    _write_atomic(Path(path), data, PUBLIC_MODE, make_parent)


def unreadable(path: Path, what: str, exc: OSError) -> str:
    """The line for a file that is there but that this user may not read
    (the file, or a directory above it): not "not found", which would send
    the administrator off to make a new one."""
    if isinstance(exc, PermissionError):
        return (
            f"{what} {path} cannot be read by this user ({exc.strerror}): run this as a "
            "user who may read it (the file's owner), or give this user access to it"
        )
    return f"{what} {path} cannot be read ({exc.strerror or exc})"


def present(path: Path, what: str) -> bool:
    """Whether ``path`` exists. PkiError when this user cannot even look (a
    directory above it is closed to them): that is not "missing"."""
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PkiError(unreadable(path, what, exc)) from None
    return True


def open_to_others(path: Path, what: str) -> str | None:
    """Why the secret ``path`` (a private key, a passphrase) is not safe:
    other users than its owner may read or change it. None when it is
    safe, or cannot be looked at (reading it then says why)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077:
        return None
    # "Owned by": chmod 600 alone locks out a service user that read it by its group.
    return (
        f"{what} {path} is open to other users (mode {mode:04o}): chmod 600 {path}, owned "
        "by the user that reads it"
    )


def read_passphrase(path: Path) -> bytes:
    """The first line of the file ``path`` (as OpenSSL's ``-passin
    file:``), which must be its owner's alone: a passphrase that anyone on
    the machine can read protects nothing."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"passphrase file {path} not found") from None
    except OSError as exc:
        raise PkiError(f"cannot read the passphrase file {path}: {exc.strerror}") from None
    problem = open_to_others(path, "passphrase file")
    if problem is not None:
        raise PkiError(problem)
    passphrase = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not passphrase:
        raise PkiError(f"passphrase file {path} is empty: put the passphrase on its first line")
    return passphrase


def ensure_directory(directory: Path) -> None:
    """Create ``directory`` and missing parents with mode 0700.

    Directories that already exist keep their mode: they are the
    administrator's. (``os.makedirs(mode=...)`` only applies the mode to the
    last directory, hence the walk.)
    """
    missing: list[Path] = []
    current = Path(directory)
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent run made it
            new.mkdir(mode=DIRECTORY_MODE)
            # mkdir's mode is filtered by the umask; make it exact.
            os.chmod(new, DIRECTORY_MODE)
    if not Path(directory).is_dir():
        raise NotADirectoryError(f"not a directory: {directory}")


def move_aside(path: Path) -> Path | None:
    """Rename an existing file to ``<name>.old-<UTC timestamp>`` and return the new path.

    Returns None when ``path`` does not exist. Never overwrites anything: when
    the name is taken (two moves in the same second), a counter is appended.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(_MAX_ASIDE_ATTEMPTS):
        suffix = f".old-{stamp}" if attempt == 0 else f".old-{stamp}-{attempt}"
        candidate = path.with_name(path.name + suffix)
        if _rename_noreplace(path, candidate):
            return candidate
    raise FileExistsError(f"cannot find a free name to move {path} aside")


def _rename_noreplace(source: Path, target: Path) -> bool:
    """Rename without replacing ``target``; False when ``target`` exists.

    os.rename silently replaces on POSIX, so link + unlink gives the
    "fail if it exists" guarantee where hard links work.
    """
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError:
        # No hard links here (some network and FAT file systems): check, then
        # rename. Only a concurrent writer could slip in between.
        if target.exists() or target.is_symlink():
            return False
        os.rename(source, target)
        return True
    os.unlink(source)
    return True


def _write_atomic(path: Path, data: bytes, mode: int, make_parent: bool = True) -> None:
    if make_parent:
        ensure_directory(path.parent)
    temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    # O_EXCL: never write through a file or symlink someone else placed there.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not supported everywhere, and the data
    # is already safe, so failure here is not an error.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
