"""How many bytes of responses are on their way out at once, across streams.

When a thousand proxies connect together (a control-plane restart), each is
owed its whole configuration at once: a megabyte with a thousand Services,
joined into one buffer per response and copied again by gRPC. Built all at
once, those buffers are the peak of the process's memory, and gRPC sends
them no faster for it: the CPU and the sockets are the bottleneck. So a
response is built only once the bytes already on their way leave room for
it, first come first served.

A client that does not read would hold its share until its write times out
(30 s) and so stall every other stream; a grant therefore stops counting
after `stall` seconds, whether or not its write has finished. The budget
bounds memory under load, not what a client that stops reading costs
(the stream limits do that).
"""

from __future__ import annotations

import asyncio
import collections

from shoal import tasks

# Enough to keep both cores busy writing; small beside the heap of a
# thousand streams.
DEFAULT_BYTES = 64 << 20
STALL_S = 2.0
# Below this a response is not counted: a push of one changed resource to
# a thousand streams is a few hundred bytes each, and waiting, a timer and
# a grant per write would cost that push more than its bytes ever could.
SMALL_BYTES = 64 << 10


class Grant:
    """A share of the budget, given back once (`release`)."""

    __slots__ = ("_budget", "_timer", "size")

    def __init__(self, budget: WriteBudget | None, size: int) -> None:
        self._budget: WriteBudget | None = budget
        self.size = size
        self._timer: tasks.Cancellable | None = None

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        budget._give_back(self.size)


class _Nothing(Grant):
    """What a small response is granted: nothing to give back."""

    def __init__(self) -> None:
        super().__init__(None, 0)

    def release(self) -> None:
        pass


_NOTHING = _Nothing()


class WriteBudget:
    """At most `limit` bytes granted at once; a response larger than the
    whole limit waits until nothing else is out, then goes alone."""

    def __init__(
        self,
        limit: int = DEFAULT_BYTES,
        *,
        stall: float = STALL_S,
        small: int = SMALL_BYTES,
        later: tasks.Later = tasks.call_later,
    ) -> None:
        self.limit = limit
        self.small = small
        self.stall = stall
        self._later = later
        self.used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        # Counted for metrics and tests: grants that had to wait.
        self.waited = 0

    async def take(self, size: int) -> Grant:
        if size < self.small:
            return _NOTHING
        size = min(size, self.limit)
        if self._waiting or not self._fits(size):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (size, future)
            self._waiting.append(entry)
            self.waited += 1
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self._give_back(size)  # granted as it was cancelled
                else:
                    self._waiting.remove(entry)
                    self._grant_waiting()
                raise
        else:
            self.used += size
        grant = Grant(self, size)
        if self.stall > 0:
            grant._timer = self._later(self.stall, grant.release)
        return grant

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def _give_back(self, size: int) -> None:
        self.used -= size
        self._grant_waiting()

    def _grant_waiting(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            size, future = self._waiting.popleft()
            if future.done():
                continue
            self.used += size
            future.set_result(None)
