"""What the commands (sm_ssl_cert, sbc, stpd) share about their standard streams."""

from __future__ import annotations

import io
import math
import os
import re
import signal
import sys
from typing import Any


class OutputError(OSError):
    """Writing stdout failed (``> /dev/full``, an I/O error): told apart
    from an error of the files a command works on, whose advice ("check
    --ini-dir") would send the operator to the wrong place."""


class _Stdout(io.FileIO):
    """Descriptor 1, whose write errors are OutputErrors (but a reader gone:
    see reader_gone)."""

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror) from None


def standard_streams() -> None:
    """Made ready at the start of a command run as a process.

    A stream closed by the caller (``sbc backup src >&-`` from cron) is
    /dev/null: the work is done and the exit status says so (0), its
    output lost by the caller's choice. Python leaves sys.stdout None then
    (sbc failed with a traceback after the backup was stored), and the
    next file opened would get the free descriptor, and be written to as
    stdout by whatever writes there. A character that the locale cannot
    show (a subject's "Ł" under a latin-1 locale) is written as
    ``\\u0141`` instead of ending the command with a traceback half-way
    through its output (Python's own choice outside the C locale is to
    fail). And an error writing stdout is an OutputError."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: fd
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        if getattr(sys, name) is None:  # (for the whole run: no context manager)
            setattr(sys, name, open(fd, mode, errors="backslashreplace", closefd=False))  # noqa: SIM115
    if isinstance(sys.stderr, io.TextIOWrapper) and sys.stderr.errors == "strict":
        sys.stderr.reconfigure(errors="backslashreplace")
    was = sys.stdout
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(_Stdout(1, "w", closefd=False)),
        encoding=was.encoding,
        errors="backslashreplace" if was.errors == "strict" else was.errors,
        line_buffering=bool(was.line_buffering),  # (a terminal's)
    )


def _stdout_to_devnull() -> None:
    """What is still to be written to stdout goes nowhere, and Python's
    flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def reader_gone() -> int:
    """stdout's reader went away (``sm_ssl_cert list | head``): end quietly,
    with the status of a tool killed by SIGPIPE. The work itself is done
    by then."""
    _stdout_to_devnull()
    return 128 + signal.SIGPIPE


def output_failed(exc: OSError) -> str:
    """What to say when stdout could not be written (an OutputError); the
    rest of the output is dropped."""
    _stdout_to_devnull()
    return f"cannot write the output: {exc.strerror or exc}"


def share_of(part: int, whole: int) -> str:
    """``part`` of ``whole`` bytes in the unit that suits ``whole``: "1.8 of
    20.0 MB" (a small data file system read "0.0 of 0.0 GB")."""
    scale, unit = next(
        ((scale, unit) for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))
         if whole >= scale),
        (1, "bytes"),
    )  # fmt: skip
    if unit == "bytes":
        return f"{part} of {whole} bytes"
    return f"{part / scale:.1f} of {whole / scale:.1f} {unit}"


def colon_hex(digest: bytes) -> str:
    """A fingerprint as ``openssl x509 -fingerprint`` prints it (AB:CD:...),
    the form SBC_SERVER_FINGERPRINT is given in."""
    return ":".join(f"{byte:02X}" for byte in digest)


def in_days(days: float) -> str:
    """When a coming date (a CRL's next update) is, in whole days left, as
    stpd's log and `sbc status` both say it: "in 2 days" for 2.9, and "in
    less than a day" rather than "in 0 days" or "within 1 day"."""
    whole = math.floor(days)
    if whole < 1:
        return "in less than a day"
    return f"in {whole} day{'s' if whole > 1 else ''}"


def expiry_in_words(days: float) -> str:
    """A certificate's end, ``days`` from now (negative: past), counted as
    in_days counts: "expires in 2 days", "expires in less than a day",
    "expired 3 days ago", "expired less than a day ago" (not "expires in 0
    days" nor "in -2 days")."""
    if days > 0:
        return f"expires {in_days(days)}"
    ago = math.floor(-days)
    if ago < 1:
        return "expired less than a day ago"
    return f"expired {ago} day{'s' if ago > 1 else ''} ago"


# C0 controls, DEL and C1 controls (NEL among them), the Unicode line and
# paragraph separators that str.splitlines() and some viewers break lines at,
# and surrogates: bytes of a name that are not UTF-8, as Python decodes
# them (surrogateescape: U+DC80..U+DCFF for 0x80..0xFF), which a UTF-8
# terminal cannot be sent (and 0x9B, raw, is a C1 control to some).
_CONTROL_RANGES = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
_CONTROLS = re.compile(f"[{_CONTROL_RANGES}]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# tar -tv escapes the backslash too, names a few controls, and writes the
# bytes of the others in octal (ESC as \033).
_TAR_ESCAPED = re.compile(f"[\\\\{_CONTROL_RANGES}]")
_TAR_SHORT = {"\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\v": "\\v", **_SHORT}


def _escaped_byte(char: str) -> int | None:
    """The byte that surrogateescape decoded as ``char``, if it is one."""
    return ord(char) - 0xDC00 if "\udc80" <= char <= "\udcff" else None


def _escaped(match: re.Match[str]) -> str:
    char = match[0]
    code = _escaped_byte(char) or ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def control_character(text: str) -> str | None:
    """The first character of ``text`` that one_line would escape, if any:
    what a name an administrator gives (a certificate's subject) must not
    hold."""
    found = _CONTROLS.search(text)
    return found[0] if found else None


def one_line(text: str) -> str:
    """``text`` with its control characters written as ``\\n``, ``\\xNN``
    (``\\u2028``), so that a name from a peer (a certificate's subject, a
    backup's source) can neither forge a line of a log or a listing nor send
    the terminal an escape sequence; a byte that is not UTF-8 as ``\\xNN``
    too. Backslashes stay as they are."""
    return _CONTROLS.sub(_escaped, text)


def _tar_escaped(match: re.Match[str]) -> str:
    char = match[0]
    code = _escaped_byte(char)
    raw = char.encode("utf-8", "surrogatepass") if code is None else bytes([code])
    return _TAR_SHORT.get(char) or "".join(f"\\{byte:03o}" for byte in raw)


def as_tar_lists(name: str) -> str:
    """A name from a saveset on one line, escaped as ``tar -tv`` escapes it,
    so that `sbc list ID` shows what GNU tar does (see one_line for why):
    a byte that is not UTF-8 in octal too (``d\\351j\\340``)."""
    return _TAR_ESCAPED.sub(_tar_escaped, name)
