"""Request-body framing for uploads, without copies and without I/O.

h11 parses the request line and headers; the body of an upload (gigabytes)
bypasses it. h11 copies every body byte twice (into its buffer and out into
a fresh ``bytes``) and costs an event per read, about a tenth of stpd's CPU
in an upload. The decoders here take a view of the bytes as received and
return views of the payload inside it, so the received buffer goes straight
to hashing and writing.

``feed_spans(view)`` returns where the payload lies in ``view`` (``[start,
stop)`` pairs) and how many bytes of ``view`` belong to the body; bytes
after the end of the body (a pipelined request) are not consumed.
``feed(view)`` gives the same payload as views into ``view``, valid while
the caller's buffer is. ``done`` says the body ended. Malformed framing
raises :class:`h11.RemoteProtocolError`, as h11 itself would.
"""

from __future__ import annotations

import h11

MAX_LINE = 4096  # a chunk-size line or a trailer line longer than this is refused
FIRST_LOOK = 64  # bytes searched for the end of a line before all MAX_LINE
_HEX = frozenset(b"0123456789abcdefABCDEF")

Span = tuple[int, int]  # [start, stop) of payload in the view given to feed_spans


class _Body:
    def feed_spans(self, view: memoryview) -> tuple[list[Span], int]:
        raise NotImplementedError

    def feed(self, view: memoryview) -> tuple[list[memoryview], int]:
        spans, used = self.feed_spans(view)
        return [view[start:stop] for start, stop in spans], used


class LengthBody(_Body):
    """A body of ``Content-Length`` bytes (what ``curl -T FILE`` sends)."""

    def __init__(self, length: int) -> None:
        self.remaining = length

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed_spans(self, view: memoryview) -> tuple[list[Span], int]:
        take = min(self.remaining, len(view))
        self.remaining -= take
        return ([(0, take)] if take else []), take


class ChunkedBody(_Body):
    """A ``Transfer-Encoding: chunked`` body (what sbc and ``curl -T -``
    send), per RFC 9112 section 7.1: chunk extensions are ignored, trailer
    fields are read and dropped."""

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._line = bytearray()  # a size or trailer line split across feeds
        self._remaining = 0  # payload bytes left in the current chunk
        self._crlf_seen = 0  # of the CRLF after a chunk's data

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def feed_spans(self, view: memoryview) -> tuple[list[Span], int]:
        payload: list[Span] = []
        pos, end = 0, len(view)
        while pos < end and self._state != self._DONE:
            if self._state == self._DATA:
                take = min(self._remaining, end - pos)
                payload.append((pos, pos + take))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
            elif self._state == self._DATA_END:
                if view[pos] != b"\r\n"[self._crlf_seen]:
                    raise h11.RemoteProtocolError("chunk data not followed by CRLF")
                pos += 1
                self._crlf_seen += 1
                if self._crlf_seen == 2:
                    self._crlf_seen = 0
                    self._state = self._SIZE
            else:  # a line: chunk size, or a trailer field
                line, pos = self._take_line(view, pos)
                if line is not None:
                    self._end_of_line(line)
        return payload, pos

    def _take_line(self, view: memoryview, pos: int) -> tuple[bytes | None, int]:
        """The next whole line (without CRLF) and the position after it, or
        None with everything consumed into the pending line."""
        room = MAX_LINE + 2 - len(self._line)  # the line with its CRLF
        # A chunk-size line is a few bytes: look at a few first, so that a
        # chunk costs no 4 KiB copy (curl sends 64 KiB chunks).
        window = bytes(view[pos : pos + min(room, FIRST_LOOK)])
        newline = window.find(b"\n")
        if newline < 0 and len(window) == FIRST_LOOK < room:
            window = bytes(view[pos : pos + room])
            newline = window.find(b"\n")
        if newline < 0:
            if len(window) == room:
                raise h11.RemoteProtocolError("chunk-size or trailer line too long")
            self._line += window
            return None, pos + len(window)
        self._line += window[: newline + 1]
        line, self._line = bytes(self._line), bytearray()
        if not line.endswith(b"\r\n"):
            raise h11.RemoteProtocolError("bare LF in chunked framing")
        return line[:-2], pos + newline + 1

    def _end_of_line(self, line: bytes) -> None:
        if self._state == self._TRAILER:
            if not line:
                self._state = self._DONE
            return  # a trailer field: dropped
        size_text = line.split(b";", 1)[0].rstrip(b" \t")
        if not size_text or len(size_text) > 16 or not _HEX.issuperset(size_text):
            raise h11.RemoteProtocolError(f"bad chunk size {line[:40]!r}")
        self._remaining = int(size_text, 16)
        self._state = self._DATA if self._remaining else self._TRAILER


def request_body(headers: list[tuple[bytes, bytes]]) -> ChunkedBody | LengthBody:
    """The decoder for a request h11 has accepted (``headers`` as h11 lists
    them, names in lower case): h11 has already refused
    any transfer coding but chunked, and a bad or doubled Content-Length."""
    lengths = [value for name, value in headers if name == b"content-length"]
    if any(name == b"transfer-encoding" for name, _ in headers):
        return ChunkedBody()
    return LengthBody(int(lengths[0]) if lengths else 0)
