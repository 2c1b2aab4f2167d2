"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad path, unknown name, bad value); the message says how."""


class DataWarning(UserWarning):
    """Something odd but usable in the user's data (duplicate rows, mixed label case); the CLI prints
    it as one `warning: ...` line."""
