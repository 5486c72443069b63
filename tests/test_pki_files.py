"""pki.files: atomic writes with exact modes, and moving files aside."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pki import files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_private_creates_0600_and_missing_parents_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "key.pem"
    files.write_private(target, b"secret")
    assert target.read_bytes() == b"secret"
    assert mode(target) == 0o600
    assert mode(tmp_path / "a") == 0o700
    assert mode(tmp_path / "a" / "b") == 0o700
    assert sorted(p.name for p in target.parent.iterdir()) == ["key.pem"]  # no temp file


def test_write_public_is_0644_even_under_a_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        files.write_public(tmp_path / "cert.pem", b"cert")
    finally:
        os.umask(old)
    assert mode(tmp_path / "cert.pem") == 0o644


def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    directory = tmp_path / "ssl"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    files.write_private(directory / "server.key", b"k")
    assert mode(directory) == 0o755


def test_write_replaces_atomically_and_tightens_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    os.chmod(target, 0o666)
    files.write_private(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600


def test_failed_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        files.write_private(tmp_path / "key.pem", b"k")
    assert list(tmp_path.iterdir()) == []


def test_move_aside_renames_with_timestamp_and_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "server.key"
    target.write_bytes(b"one")
    first = files.move_aside(target)
    target.write_bytes(b"two")
    second = files.move_aside(target)  # same second: needs a different name
    assert first is not None and second is not None
    assert first != second
    assert first.name.startswith("server.key.old-") and first.name.endswith("Z")
    assert first.read_bytes() == b"one"
    assert second.read_bytes() == b"two"
    assert not target.exists()


def test_move_aside_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert files.move_aside(tmp_path / "nothing") is None
