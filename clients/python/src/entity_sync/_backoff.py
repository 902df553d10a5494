"""Delays between attempts: doubling from a floor to a ceiling, jittered."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff. Each delay is drawn from the upper half of its
    step (``step/2 .. step``), so backends that lost the same node do not all
    come back at the same instant."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self._min = minimum
        self._max = max(minimum, maximum)
        self._step = minimum

    def next_delay(self) -> float:
        """The next delay in seconds; the one after it is twice as long, up to the ceiling."""
        step = self._step
        self._step = min(step * 2, self._max)
        return step / 2 + random.random() * step / 2

    def reset(self) -> None:
        """Back to the floor (after a success)."""
        self._step = self._min
