"""The two kinds of failure a user sees: their input was wrong, or the run broke."""


class UsageError(ValueError):
    """Bad input from the user: a name, path, number or vector that is not allowed.

    The message is one line naming the value and what is allowed; the CLI exits 2.
    """


class RunError(RuntimeError):
    """A run that could not go on (unreadable checkpoint, unwritable folder); the CLI exits 1."""
