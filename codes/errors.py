"""The exception types for what the user can act on; the entry scripts print them as one line."""


class UserError(Exception):
    """A problem with the user's input (bad flags, files, data): one line on stderr, exit status 2."""
    exit_code = 2


class Interrupted(UserError):
    """The user stopped a run (Ctrl-C) and what is needed to continue was saved: exit status 130."""
    exit_code = 130
