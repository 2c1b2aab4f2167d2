"""The one exception type the CLI turns into a one-line message and a non-zero exit, and the one
mapping of filesystem errors (disk full, read-only, not a folder, no permission) to such a line."""

import errno


class UserError(Exception):
    """A problem the user can fix (bad path, unknown name, bad value); the message says how."""


class UncleanFileError(OSError):
    """A filesystem error (disk full) inside the HDF5 library while it wrote a file: HDF5 keeps that file
    half-closed and would crash the process when it shuts down, so the CLI leaves without that shutdown
    after its one line (the temporary file is already removed, locks are released by the system)."""


class DataWarning(UserWarning):
    """Something odd but usable in the user's data (duplicate rows, mixed label case); the CLI prints
    it as one `warning: ...` line."""


# errno -> what the user can do about it ({path}: the file or folder the system named)
_FILESYSTEM_ADVICE = {
    errno.ENOSPC: "no space left on the device holding {path}: free some space or point --cache-dir at another "
                  "disk, then run the command again (finished extraction chunks are kept)",
    errno.EDQUOT: "disk quota exceeded writing {path}: free some space or point --cache-dir at another disk",
    errno.EROFS: "{path} is on a read-only file system: use a writable --cache-dir (copy the cache there to "
                 "keep its files)",
    errno.ENOTDIR: "{path}: a file stands where a folder is needed; check --cache-dir and the data path",
    errno.EISDIR: "{path} is a folder where a file is needed; check the path",
    errno.EACCES: "permission denied: {path}; check its permissions, or use a --cache-dir you can write",
    errno.EPERM: "operation not permitted on {path}; check its permissions, or use a --cache-dir you can write",
}


def filesystem_message(exc: BaseException) -> str | None:
    """One line for a filesystem error the user can fix (naming the path), or None for any other error."""
    if not isinstance(exc, OSError) or exc.errno not in _FILESYSTEM_ADVICE:
        return None
    path = exc.filename if exc.filename is not None else "a file"
    return _FILESYSTEM_ADVICE[exc.errno].format(path=path)


def first_reason(exc: BaseException, limit: int = 400) -> str:
    """A library exception's reason on one line: its first line, and the next one too where the first
    ends with a colon (Keras' "... Example error message for object <Conv2D ...>:", keras-hub's "A
    preset must be a one of:" put the reason there), cut at `limit` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    reason = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return reason if len(reason) <= limit else reason[:limit] + "..."
