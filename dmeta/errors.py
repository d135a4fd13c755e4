"""The one exception type for mistakes a user can fix (bad config, bad graph, bad file)."""


class DmetaError(Exception):
    """A user-facing error: its message names the problem and what to change.

    The command-line entry point prints it as one line and exits non-zero on every rank;
    any other exception is a bug and aborts the MPI job with a traceback.
    """


class AgreedError(DmetaError):
    """An error every rank raises alike, at the same point, from values all ranks share (e.g.
    the all-reduced centroid of a diverged run): printed once, and no rank needs aborting."""


class OutputError(DmetaError):
    """A file could not be written (a full disk, a quota): the run stops, and any checkpoint
    written before stays valid."""


def agree(errors: list[str | None]) -> None:
    """Given every rank's error message or None (an allgather), raise the first as AgreedError
    on every rank alike; it names its rank when not every rank failed."""
    failed = [(rank, message) for rank, message in enumerate(errors) if message]
    if failed:
        rank, message = failed[0]
        raise AgreedError(message if len(failed) == len(errors) else f"rank {rank}: {message}")
