"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad path, unknown name, bad value); the message says how."""
