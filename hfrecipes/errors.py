"""The one exception for bad input. The CLI prints its message and exits with code 2, without a traceback."""


class UsageError(Exception):
    """Bad input found before expensive work: the message names the file or field and the fix."""


class NonFiniteLoss(UsageError):
    """Training diverged (nan or inf loss): the stage stops, its last good checkpoint kept, no record written."""
