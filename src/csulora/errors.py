"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class CsuloraError(Exception):
    """A user-facing error: the message names the file and the module concerned."""


class CsuloraWarning(UserWarning):
    """Something suspicious that does not stop the run (the CLI prints it as one line)."""
