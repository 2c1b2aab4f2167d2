"""Mute file descriptor 2 around C++ code that prints straight to it (TensorFlow's start-up lines,
Ray's connection retries), where Python's logging settings cannot reach."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator


@contextlib.contextmanager
def muted_stderr(show_on_error: bool = True) -> Iterator[None]:
    """Send fd 2 to a temporary file for the block; on an exception, write what it caught to stderr
    first when `show_on_error` (the chatter may explain the failure), then re-raise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            if show_on_error:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
