"""How often an unreachable API server is asked again."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable


class Backoff:
    """Exponential backoff with jitter, shared by every caller of one API
    server: while it is down, one caller at a time probes it, and the others
    go on as soon as a probe gets through."""

    def __init__(
        self,
        *,
        initial: float = 0.5,
        # Low for a backoff: an API server that is back must be noticed within
        # seconds (objects deleted meanwhile must leave the mesh). One probe
        # at a time for all watches keeps that to ~15 requests a minute.
        maximum: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._failures = 0
        self._next_try = 0.0
        self._recovered = asyncio.Event()
        self.down_since: float | None = None
        self.last_error = ""

    @property
    def up(self) -> bool:
        return self.down_since is None

    def delay(self) -> float:
        """The wait after the current run of failures: doubling, capped,
        jittered down by up to a fifth so replicas spread out."""
        return self._base(self._failures) * self._rng.uniform(1.0 - self.JITTER, 1.0)

    JITTER = 0.2

    def _base(self, failures: int) -> float:
        return float(min(self.maximum, self.initial * 2.0 ** max(0, failures - 1)))

    def most_probes(self, seconds: float) -> int:
        """The most probes this backoff lets through in `seconds` of an
        outage, its shortest jittered waits between them: what one API
        server sees from a replica, however many watches it has."""
        probes, elapsed = 1, 0.0
        while True:
            elapsed += self._base(probes) * (1.0 - self.JITTER)
            if elapsed > seconds:
                return probes
            probes += 1

    def failed(self, error: str) -> None:
        self._failures += 1
        now = self._clock()
        if self.down_since is None:
            self.down_since = now
        self.last_error = error
        self._recovered.clear()
        self._next_try = now + self.delay()

    def succeeded(self) -> None:
        if self._failures or self.down_since is not None:
            self._failures = 0
            self.down_since = None
            self.last_error = ""
            self._recovered.set()

    async def wait_turn(self) -> None:
        """Return when a request may be made: at once while all is well;
        while failing, when the backoff has passed (the caller then probes,
        and the next slot is taken, so the others wait for its outcome)."""
        while self._failures:
            now = self._clock()
            if now >= self._next_try:
                self._next_try = now + self.delay()
                return
            sleeper = asyncio.ensure_future(self._sleep(self._next_try - now))
            recovered = asyncio.ensure_future(self._recovered.wait())
            try:
                await asyncio.wait({sleeper, recovered}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                recovered.cancel()
