"""The SMTP/LMTP wire format: bytes in, command lines, messages and BDAT chunks out.

Pure code, no I/O: the session feeds it what the socket delivered and pulls
one item at a time, so a unit test can feed it any bytes.  The session pulls
a command, decides, and only then asks for the next one; input after a
closing reply is never looked at, and after DATA's 354 the reader is told to
read a message instead of commands.

What it enforces:
- every line ends in CRLF; a bare CR or bare LF anywhere, in a command or in a
  message, is reported as `BareLineEnding` (SMTP smuggling, CVE-2023-51764:
  `\\n.\\n` and friends must never end a message or start a second one);
- command lines up to 512 octets and text lines up to 1000 octets, CRLF
  included (RFC 5321 4.5.3.1.4 and 4.5.3.1.6; one octet more for a stuffed dot);
- dot-unstuffing (RFC 5321 4.5.2);
- bounded memory: an over-long line is skipped, not stored; a message over
  the size limit is read to its end but not kept.
"""

from __future__ import annotations

from dataclasses import dataclass

COMMAND_LINE_LIMIT = 512  # RFC 5321 4.5.3.1.4, CRLF included
TEXT_LINE_LIMIT = 1000  # RFC 5321 4.5.3.1.6, CRLF included


@dataclass(frozen=True, slots=True)
class Command:
    """One command line, without its CRLF."""

    line: bytes


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A command line over the limit; it was skipped up to its end."""


@dataclass(frozen=True, slots=True)
class BareLineEnding:
    """A CR or LF that is not part of a CRLF pair.  The session must end."""


@dataclass(frozen=True, slots=True)
class Message:
    """The end of DATA (or the LAST BDAT chunk) was reached.

    `content` holds the message with CRLF line ends and dots unstuffed; it is
    empty when `too_big` or `line_too_long` says why it was not kept.
    """

    content: bytes
    too_big: bool = False
    line_too_long: bool = False
    bare_line_ending: bool = False  # BDAT only (in DATA it ends the session)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One BDAT chunk was read in full (its octets are kept by the reader)."""

    size: int


Item = Command | LineTooLong | BareLineEnding | Message | Chunk


def _has_long_line(region: bytes) -> bool:
    """Is a line of `region` (whole CRLF lines) over the limit?  A dot-stuffed
    line may be one octet longer (the dot is not the sender's).

    A window of the limit at a time, not line by line: the last LF in the
    window ends a line that fits, and the next window starts after it.  A
    window without an LF holds part of a line too long.  (Splitting every
    message into lines to measure them was a tenth of the listener's CPU.)
    """
    start, end = 0, len(region)
    while end - start > TEXT_LINE_LIMIT:
        window = TEXT_LINE_LIMIT + (region[start:start + 1] == b".")
        lf = region.rfind(b"\n", start, start + window)
        if lf < 0:
            return True
        start = lf + 1
    return False


def _bare(region: bytes) -> bool:
    """True when `region` holds a CR or LF outside a CRLF pair."""
    pairs = region.count(b"\r\n")
    return region.count(b"\n") != pairs or region.count(b"\r") != pairs


class Reader:
    """Bytes from one connection, read as commands, a DATA message or BDAT chunks."""

    def __init__(self, *, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._skipping = False  # inside an over-long line: drop up to its LF
        # The message being read (DATA or BDAT): parts kept, size, problems.
        self._mode = "command"  # command | data | bdat
        self._parts: list[bytes] = []
        self._size = 0
        self._too_big = False
        self._line_too_long = False
        self._chunk_left = 0
        self._chunk_last = False
        self._bdat_open = False  # a BDAT transaction has chunks but no LAST yet
        self._binary = False  # BODY=BINARYMIME: any octets, bare CR and LF too (RFC 3030 3)

    # --- input ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buf += data

    def discard(self) -> None:
        """Forget all input not yet read (after STARTTLS, or a closing reply)."""
        self._buf.clear()
        self._skipping = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    # --- the three modes -----------------------------------------------------------------

    def start_data(self) -> None:
        """After DATA's 354: what follows is a message up to CRLF.CRLF."""
        self._mode = "data"
        self._start_message()

    def start_bdat(self, size: int, last: bool, *, binary: bool = False) -> None:
        """After a BDAT command: exactly `size` octets follow (RFC 3030 2).  `binary`
        (BODY=BINARYMIME): they are kept as they are, bare CR and LF included."""
        if not self._bdat_open:
            self._start_message()
            self._bdat_open = True
            self._binary = binary
        self._mode = "bdat"
        self._chunk_left = size
        self._chunk_last = last

    def abort_message(self) -> None:
        """Drop a BDAT transaction in progress (RSET, or a refused chunk)."""
        self._mode = "command"
        self._bdat_open = False
        self._parts = []

    def _start_message(self) -> None:
        self._parts = []
        self._size = 0
        self._too_big = False
        self._line_too_long = False

    def next(self) -> Item | None:
        """The next complete item, or None when more input is needed."""
        # The session asks after every command, usually with nothing buffered: only a
        # BDAT chunk (which may be empty) can be complete without more input.
        if not self._buf and self._mode != "bdat":
            return None
        if self._mode == "command":
            return self._command()
        if self._mode == "data":
            return self._data()
        return self._bdat()

    # --- commands ------------------------------------------------------------------------

    def _command(self) -> Item | None:
        buf = self._buf
        end = buf.find(b"\n")
        if end < 0:
            cr = buf.find(b"\r")
            if 0 <= cr < len(buf) - 1:
                return BareLineEnding()  # a CR followed by something other than LF
            if len(buf) > COMMAND_LINE_LIMIT:
                self._skipping = True  # keep memory bounded: drop what we have
                buf[:] = buf[-1:] if buf[-1:] == b"\r" else b""
            return None
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        # The only LF is the last octet; so the line is clean if its only CR is just before it.
        if line[-2:-1] != b"\r" or b"\r" in line[:-2]:
            return BareLineEnding()
        if self._skipping:
            self._skipping = False
            return LineTooLong()
        if len(line) > COMMAND_LINE_LIMIT:
            return LineTooLong()
        return Command(line[:-2])

    # --- DATA ------------------------------------------------------------------------------

    def _data(self) -> Item | None:
        # Each region starts at the beginning of a line (we consume whole lines only).
        buf = self._buf
        while True:
            if buf[:3] == b".\r\n" and not self._skipping:
                del buf[:3]
                return self._finish()
            end = buf.find(b"\r\n.\r\n")
            if end >= 0:
                cut, consumed = end + 2, end + 5
            else:
                last = buf.rfind(b"\n")
                if last < 0:
                    return self._partial_line()
                cut = consumed = last + 1
            region = bytes(buf[:cut])
            del buf[:consumed]
            if _bare(region):
                return BareLineEnding()
            self._take(region)
            if end >= 0:
                return self._finish()
            if not buf:
                return None

    def _partial_line(self) -> Item | None:
        """No LF yet: wait, unless the line is already too long or has a bare CR."""
        buf = self._buf
        cr = buf.find(b"\r")
        if 0 <= cr < len(buf) - 1:
            return BareLineEnding()
        if len(buf) > TEXT_LINE_LIMIT + 1:
            self._line_too_long = True
            self._skipping = True
            keep = buf[-1:] if buf[-1:] == b"\r" else b""
            buf[:] = keep
        return None

    def _take(self, region: bytes) -> None:
        """Whole CRLF lines of a message: check lengths, unstuff, keep within the limit."""
        if self._skipping:
            # The rest of an over-long line, up to its CRLF.
            first = region.find(b"\r\n") + 2
            region = region[first:]
            self._skipping = False
            if not region:
                return
        if _has_long_line(region):
            self._line_too_long = True
        if region[:1] == b".":
            region = region[1:]
        if b"\r\n." in region:
            region = region.replace(b"\r\n.", b"\r\n")
        self._size += len(region)
        if self._size > self.max_message_size:
            self._too_big = True
        if self._too_big or self._line_too_long:
            self._parts = []
        else:
            self._parts.append(region)

    def _finish(self) -> Message:
        binary = self._mode == "bdat"
        self._mode = "command"
        self._bdat_open = False
        self._skipping = False
        if self._too_big or self._line_too_long:
            self._parts = []
            return Message(b"", too_big=self._too_big, line_too_long=self._line_too_long)
        content = b"".join(self._parts)
        self._parts = []
        # BDAT frames by octet count, so a bare CR or LF cannot end it early; but the
        # message may later be relayed with DATA, where it could: refuse it here too.
        # A BINARYMIME message is only ever relayed with BDAT (mta/options.py).
        if binary and not self._binary and _bare(content):
            return Message(b"", bare_line_ending=True)
        return Message(content)

    # --- BDAT ------------------------------------------------------------------------------

    def _bdat(self) -> Item | None:
        """Exactly the announced octets, as they are (no dot-stuffing, no line rules)."""
        buf = self._buf
        if self._chunk_left > 0:
            if not buf:
                return None
            take = bytes(buf[: self._chunk_left])
            del buf[: len(take)]
            self._chunk_left -= len(take)
            self._size += len(take)
            if self._size > self.max_message_size:
                self._too_big = True
                self._parts = []
            elif not self._too_big:
                self._parts.append(take)
            if self._chunk_left > 0:
                return None
        if self._chunk_last:
            return self._finish()
        self._mode = "command"
        return Chunk(self._size)

    @property
    def in_bdat(self) -> bool:
        """A BDAT transaction has chunks but no LAST yet."""
        return self._bdat_open
