"""A progress bar for ``sbc backup`` and ``sbc restore`` on a terminal.

Shown on stderr only when it is a terminal and neither ``--quiet`` nor
``--json`` was given; otherwise every call is a no-op, so scripts and logs
see nothing of it. ``rich`` draws it (bytes, rate, ETA, files).
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sbc.archive import (
    FILE_NOFOLLOW,
    ArchiveError,
    Found,
    WalkOptions,
    archive_root_name,
    data_regions,
    may_have_holes,
    walk,
)

if TYPE_CHECKING:
    from rich.progress import Progress

TAR_BLOCK = 512


def wanted(quiet: bool, as_json: bool) -> bool:
    return not quiet and not as_json and sys.stderr.isatty()


def estimate_tar_bytes(source: Path, options: WalkOptions) -> int | None:
    """About the size of the tar stream of ``source``: contents rounded to
    blocks plus a header each (PAX headers make it a little more), from the
    backup's own walk. None when that walk fails (the backup says why)."""
    try:
        return 2 * TAR_BLOCK + sum(
            TAR_BLOCK + (-(-_stored_bytes(found) // TAR_BLOCK) * TAR_BLOCK)
            # the backup reports what cannot be read
            for found in walk(source, lambda *_: None, options)
        )
    except ArchiveError:
        return None


def _stored_bytes(found: Found) -> int:
    """The contents the backup sends of an entry: a regular file's size, or
    only its data where it has holes (a disk image of 100 GB with 10 of
    data, found as the backup finds them)."""
    st = found.st
    if not stat.S_ISREG(st.st_mode):
        return 0
    if not may_have_holes(st):
        return st.st_size
    try:
        fd = os.open(found.name, FILE_NOFOLLOW, dir_fd=found.within)
    except OSError:
        return st.st_size  # the backup reports it
    try:
        regions = data_regions(fd, st)
    finally:
        os.close(fd)
    return st.st_size if regions is None else sum(length for _, length in regions)


class TransferProgress:
    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: Any = None
        self._label = label

    def __enter__(self) -> TransferProgress:
        if self.enabled:
            # Imported here: rich costs 25 ms at every start, and most runs
            # (cron, scripts, --json) never draw a bar.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[files]} files"),
                console=Console(stderr=True),
                transient=True,  # the summary line replaces it at the end
            )
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=None, files=0)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._task = None  # a late estimate_total changes nothing

    def estimate_total(self, estimate: Callable[[], int | None]) -> threading.Thread | None:
        """The total from ``estimate`` (a walk of the tree), found by a thread
        of its own: the transfer starts at once, not after a first walk of a
        large tree (seconds for a million files), and the bar shows the total
        when the walk is done. The thread, if any, is returned."""
        if self._progress is None:
            return None
        thread = threading.Thread(
            target=lambda: self.set_total(estimate()), name="estimate", daemon=True
        )
        thread.start()
        return thread

    def set_total(self, total: int | None) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)

    def advance(self, nbytes: int, files: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=nbytes, files=files)


def backup_label(source: Path) -> str:
    return f"backup {archive_root_name(source)}"
