"""How long a connection waits before its next connect attempt."""

from __future__ import annotations

import random

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


class ReconnectBackoff:
    """Exponential backoff: ``BACKOFF_FIRST`` doubling to ``BACKOFF_MAX``, with +-20 % jitter.

    Jitter keeps a fleet that lost its broker at once from reconnecting in lockstep.
    """

    def __init__(self) -> None:
        self._delay = BACKOFF_FIRST
        self.failures = 0  # consecutive failed attempts since the last successful connect

    def next_delay(self) -> float:
        """Count one more failure and return the seconds to wait before the next attempt."""
        delay = self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, BACKOFF_MAX)
        self.failures += 1
        return delay

    def reset(self) -> None:
        """Start over after a successful connect."""
        self._delay = BACKOFF_FIRST
        self.failures = 0
