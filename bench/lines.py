"""A child process's stderr, line by line, awaited with deadlines.

The benchmark, the demo and the daemon tests all start a server (``stpd``,
nginx) and wait for lines of its log: "listening on", "stored saveset".
A thread reads the pipe (so a chatty server never blocks on it) and a
condition wakes whoever waits; nothing sleeps.
"""

from __future__ import annotations

import re
import subprocess
import threading


class StderrLines:
    """Reads ``process.stderr`` (text mode) until it closes; ``start``
    starts a server that way."""

    @classmethod
    def start(cls, argv: list[str], name: str, new_session: bool = False) -> StderrLines:
        """``argv`` as a child with no stdin or stdout, its stderr read here
        (``.process`` is the child)."""
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=new_session,
        )
        return cls(process, name)

    def __init__(self, process: subprocess.Popen[str], name: str = "stderr") -> None:
        self.process = process
        self.lines: list[str] = []
        self.ended = False  # the pipe closed: the process exited
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"{name}-lines", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> str | None:
        """The first line from index ``after`` matching ``pattern``; None if
        the process ended or ``timeout`` seconds passed without one."""
        regex = re.compile(pattern)
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines[after:] if regex.search(line)]
            return bool(found) or self.ended

        with self.changed:
            self.changed.wait_for(seen, timeout)
        return found[0] if found else None

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        with self.changed:
            return [line for line in self.lines if regex.search(line)]

    def mark(self) -> int:
        """An index for ``wait_for(after=...)``: only lines from now on."""
        with self.changed:
            return len(self.lines)

    def tail(self, count: int = 15) -> str:
        with self.changed:
            return "\n".join(self.lines[-count:])

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)
