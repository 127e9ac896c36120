"""The background tasks of a running control plane: named, each failure
logged when it happens (not when someone finally awaits it), and all of
them cancelled and awaited when it stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger("shoal")
T = TypeVar("T")


class Tasks:
    def __init__(self) -> None:
        self._running: dict[asyncio.Task[Any], None] = {}

    def start(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(work, name=name)
        self._running[task] = None
        task.add_done_callback(self._done)
        return task

    def named(self, name: str) -> list[asyncio.Task[Any]]:
        return [t for t in self._running if t.get_name() == name]

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._running.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel every task, newest first, and wait for all of them."""
        running = list(self._running)[::-1]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def __aenter__(self) -> Tasks:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


class Cancellable(Protocol):
    def cancel(self) -> None: ...


# Runs a callback after a delay, cancellably: the event loop's call_later,
# or a test's own clock.
Later = Callable[[float, Callable[[], None]], Cancellable]


def call_later(delay: float, callback: Callable[[], None]) -> Cancellable:
    """On the running loop (RuntimeError without one)."""
    return asyncio.get_running_loop().call_later(delay, callback)


K = TypeVar("K")


class Linger(Generic[K]):
    """What is kept a while after its last user went: `leave(key)` drops it
    (`drop(key)`) after `seconds`, unless `back(key)` comes first. At most
    `most` keys linger; past that, one leaving is dropped at once, so a
    client that churns through names cannot make memory pile up."""

    def __init__(
        self,
        seconds: float,
        drop: Callable[[K], None],
        *,
        most: int = 4096,
        later: Later = call_later,
    ) -> None:
        self.seconds = seconds
        self.most = most
        self._drop = drop
        self._later = later
        self._leaving: dict[K, Cancellable] = {}

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._leaving))

    def leave(self, key: K) -> None:
        if key in self._leaving:
            return
        if self.seconds <= 0 or len(self._leaving) >= self.most:
            self._drop(key)
            return
        try:
            self._leaving[key] = self._later(self.seconds, lambda: self._expire(key))
        except RuntimeError:  # no event loop to wait in: drop it now
            self._drop(key)

    def back(self, key: K) -> None:
        timer = self._leaving.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, key: K) -> None:
        if self._leaving.pop(key, None) is not None:
            self._drop(key)
