"""File descriptor 2 around C/C++ code that prints straight to it, where Python's logging settings
cannot reach: muted (TensorFlow's start-up lines, Ray's connection retries) or filtered for a whole
command (decoder warnings about damaged images counted into one line)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import select
import sys
import tempfile
import threading
from typing import IO, Iterator


@contextlib.contextmanager
def muted_stderr(show_on_error: bool = True) -> Iterator[None]:
    """Send fd 2 to a temporary file for the block; on an exception, write what it caught to stderr
    first when `show_on_error` (the chatter may explain the failure), then re-raise.

    fd 2 is the whole process's: other threads (image decoding overlaps TensorFlow's import) write into
    the mute too. Their decoder warnings about the user's images are passed on afterwards, so that a
    command's NativeChatter still counts them; only the set-up chatter is dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            _pass_on(sink, saved, everything=show_on_error)
            raise
        else:
            _pass_on(sink, saved, everything=False)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _pass_on(sink: IO[bytes], saved: int, everything: bool) -> None:
    """Restore fd 2 and write to it what the mute caught: everything (an error's explanation), or only
    the decoder warnings a NativeChatter counts."""
    os.dup2(saved, 2)
    sink.seek(0)
    caught = sink.read()
    if not everything:
        caught = b"".join(line for line in caught.splitlines(keepends=True) if is_counted(line))
    if caught:
        with contextlib.suppress(OSError):
            os.write(2, caught if caught.endswith(b"\n") else caught + b"\n")


# Lines C libraries print straight to fd 2: (family, pattern, counted). Counted families are about the
# user's images (folded into one summary line); the rest is set-up chatter, dropped.
_CHATTER = (
    ("libjpeg", re.compile(rb"^(Corrupt JPEG data|Premature end of JPEG file|Invalid SOS parameters|"
                           rb"Inconsistent progression sequence|Warning: unknown JFIF revision|"
                           rb"Huffman table 0x|Bogus (virtual array|Huffman|DQT|marker))"), True),
    ("libpng", re.compile(rb"^libpng warning: "), True),
    ("tflite", re.compile(rb"^INFO: Created TensorFlow Lite "), False),
)


def _family(line: bytes) -> tuple[str, bool] | None:
    """The chatter family of a line C code printed and whether it is counted; None for other lines."""
    for family, pattern, counted in _CHATTER:
        if pattern.match(line):
            return family, counted
    return None


def is_counted(line: bytes) -> bool:
    """Whether a line C code printed is a decoder's warning about an image's data (one NativeChatter counts)."""
    found = _family(line)
    return found is not None and found[1]


class NativeChatter:
    """Filter what C code writes to file descriptor 2 for the length of a command: decoder warnings
    about damaged image data (libjpeg's `Corrupt JPEG data: ...`, libpng's) are counted and summarized
    in one `note:` line at the end, TFLite's delegate announcement is dropped, everything else passes
    on at once. Python's own stderr (progress, errors) keeps writing to the terminal directly.

    fd 2 becomes a pipe read by a thread; it is restored on exit even when the block raises."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def __enter__(self) -> "NativeChatter":
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        self._saved = os.dup(2)
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)  # room for bursts
        os.dup2(write_end, 2)
        os.close(write_end)
        self._read_end = read_end
        self._python_stderr = None
        if _writes_to_fd2(sys.stderr):  # Python's own lines go straight to the terminal, unfiltered
            self._python_stderr = sys.stderr
            sys.stderr = io.TextIOWrapper(io.FileIO(self._saved, "w", closefd=False),
                                          encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                          errors="backslashreplace", line_buffering=True, write_through=True)
        self._stop = threading.Event()
        self._drained = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="native-stderr", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._python_stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            sys.stderr = self._python_stderr
        self._stop.set()  # the pump reads what is in the pipe, then reports drained (and closes at its end)
        os.dup2(self._saved, 2)  # nothing in this process writes to the pipe any more
        self._drained.wait(timeout=60.0)  # not an end-of-file: a child process may still hold the pipe
        line = self.summary()
        if line:
            with contextlib.suppress(OSError, ValueError):
                print(line, file=sys.stderr, flush=True)

    def summary(self) -> str | None:
        """One line for the damaged-data warnings seen, or None."""
        if not self.counts:
            return None
        total = sum(self.counts.values())
        which = ", ".join(f"{n} from {family}" for family, n in self.counts.items())
        example = next(iter(self.first.values()))
        return (f"note: the image decoders warned {total} time(s) about damaged data ({which}; first: '{example}'); "
                f"such images are kept as they decode")

    def _pump(self) -> None:
        """Read the pipe until its end. Once asked to stop, read whatever is already in it (everything this
        process wrote before fd 2 was restored), count it, and say so; a child process still holding the
        pipe (a worker pool) is then only passed on, and the pump closes both descriptors at the end."""
        try:
            self._read_until_end()
        finally:  # whatever ends the reading, the command's exit must not wait for it
            self._drained.set()
            if self._stop.is_set():  # (not before: the command still writes to both descriptors)
                for fd in (self._read_end, self._saved):
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _read_until_end(self) -> None:
        pending = b""
        counting = True
        while True:
            stopping = self._stop.is_set()
            try:
                ready, _, _ = select.select([self._read_end], [], [], 0.0 if stopping and counting else 0.2)
                data = os.read(self._read_end, 65536) if ready else None
            except (OSError, ValueError):
                break
            if data is None:  # quiet for a moment: pass on a partial line (a C progress bar) as it is
                if pending:
                    self._pass(pending)
                    pending = b""
                if stopping and counting:
                    counting = False
                    self._drained.set()
                continue
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                self._take(line, counting)
        if pending:
            self._take(pending, counting)

    def _take(self, line: bytes, counting: bool) -> None:
        if counting:
            self._line(line)
        else:
            self._pass(line + b"\n")

    def _line(self, line: bytes) -> None:
        found = _family(line)
        if found is None:
            self._pass(line + b"\n")
        elif found[1]:
            family = found[0]
            self.counts[family] = self.counts.get(family, 0) + 1
            self.first.setdefault(family, line.decode(errors="replace").strip())

    def _pass(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(self._saved, data)


def _writes_to_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False
