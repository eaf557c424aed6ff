"""The one exception type for problems a user can fix (bad flags, files, data)."""


class UserError(Exception):
    """A problem with the user's input; the entry scripts print it as one line and exit non-zero."""
