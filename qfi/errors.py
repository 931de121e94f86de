"""The exceptions of the package: :class:`QfiError` and its special cases."""


class QfiError(ValueError):
    """Bad argument to qfi: the message names the bad value and what is allowed."""


class OutputFolderBusy(QfiError):
    """Another running campaign holds the lock of the output folder."""


class NonFiniteBaseline(QfiError):
    """The golden or clean baseline already has NaN/Inf outputs (a broken model or format)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a campaign; ``out`` is its folder, ``rows`` the finished trials kept there."""

    def __init__(self, out: str | None = None, rows: int = 0) -> None:
        super().__init__()
        self.out, self.rows = out, rows
