"""The background tasks of a running control plane: named, each failure
logged when it happens (not when someone finally awaits it), and all of
them cancelled and awaited when it stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

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
