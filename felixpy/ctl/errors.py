"""felixctl's user-facing error, in its own module so that subcommand modules can raise it without
importing felixctl's entry point (which may be running as __main__, a different module object)."""


class UserError(Exception):
    """A problem the user can fix; felixctl prints it as one line and exits 1."""
