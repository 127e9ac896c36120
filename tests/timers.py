"""A scheduler for tests: callbacks run when the test says, not after time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timer:
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Later:
    """Stands in for the loop's call_later (shoal.tasks.Later): keeps each
    delay and callback; `fire` runs those not cancelled, as if their time
    had come."""

    timers: list[tuple[float, Timer]] = field(default_factory=list)

    def __call__(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(callback)
        self.timers.append((delay, timer))
        return timer

    def fire(self) -> None:
        due, self.timers = self.timers, []
        for _, timer in due:
            if not timer.cancelled:
                timer.callback()
