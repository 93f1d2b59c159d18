"""One warning per kind of message, however often the condition recurs (every epoch, every batch)."""

from __future__ import annotations

from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class WarnOnce:
    """Warns (rank 0) at most once per kind of message.

    Example:
        >>> warn = WarnOnce()
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("empty", "nothing measured")
        ...     warn("empty", "nothing measured")
        >>> len(caught)
        1
    """

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def __call__(self, kind: str, message: str) -> None:
        """Warn ``message`` unless a message of ``kind`` was already given."""
        if kind not in self.warned:
            self.warned.add(kind)
            rank_zero_warn(message, category=UserWarning)


__all__ = ["WarnOnce"]
