"""Bursts of changes become one push, and the push knows why it happens."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable


class Debouncer:
    """Waits for `quiet` seconds without a change, but never more than
    `max_delay` after the first change of a burst."""

    def __init__(
        self,
        quiet: float,
        max_delay: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.quiet = quiet
        self.max_delay = max_delay
        self._clock = clock
        self._sleep = sleep
        self._first: float | None = None
        self._last = 0.0
        self._event = asyncio.Event()
        self._reasons: collections.Counter[str] = collections.Counter()
        # How long the last burst waited, from its first change until it
        # settled (for the push it becomes: metrics and change-to-ACK times).
        self.waited = 0.0

    def touch(self, reason: str = "change") -> None:
        now = self._clock()
        if self._first is None:
            self._first = now
        self._last = now
        self._reasons[reason] += 1
        self._event.set()

    async def settled(self) -> collections.Counter[str]:
        """Once a burst of changes has settled: why, with how many times each
        reason was given during it."""
        await self._event.wait()
        while True:
            assert self._first is not None
            now = self._clock()
            due = min(self._last + self.quiet, self._first + self.max_delay)
            if now >= due:
                break
            await self._sleep(due - now)
        self.waited = now - self._first
        self._first = None
        self._event.clear()
        reasons, self._reasons = self._reasons, collections.Counter()
        return reasons


def describe(reasons: collections.Counter[str]) -> str:
    """ "mesh state x3, certificates" for a log line."""
    return ", ".join(r if n == 1 else f"{r} x{n}" for r, n in sorted(reasons.items())) or "none"
