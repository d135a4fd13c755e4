"""The one exception type for mistakes a user can fix (bad config, bad graph, bad file)."""


class DmetaError(Exception):
    """A user-facing error: its message names the problem and what to change.

    The command-line entry point prints it as one line and exits non-zero on every rank;
    any other exception is a bug and aborts the MPI job with a traceback.
    """
