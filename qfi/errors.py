"""The one exception of the package."""


class QfiError(ValueError):
    """Bad argument to qfi: the message names the bad value and what is allowed."""
