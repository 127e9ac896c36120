"""Keeping Python's cyclic garbage collector out of the push path.

A control plane holds a large, long-lived heap (resources, views, streams)
and adds to it in bursts (a rebuild, a thousand proxies connecting). CPython
then runs a full collection that walks the whole heap, which at 1,000
streams takes 150-300 ms; when it lands inside a push, every proxy waits for
it (measured by bench/fanout.py --instrument). So, once the heap has
settled after a burst, it is frozen: frozen objects are never walked again,
and later full collections only see what is new. Cycles frozen by mistake
(a closed stream's objects) are reclaimed by an occasional full collection
at a quiet moment.

Memory freed in bulk (streams that subscribed to megabytes of names, then
closed) stays in glibc's heaps, counted in RSS, until malloc_trim returns
it: every `trim_every` seconds at a quiet moment it is trimmed (a few
milliseconds for a heap of hundreds of megabytes; glibc reports free
memory for its main heap only, while gRPC's threads allocate in another,
so no threshold decides). Measured with bench/abuse.py, 40 streams of 2 MB
of names closed: RSS 441 -> 96 MiB after (76 before).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


# How long collection may stay off after a burst (a rebuild) so that its
# fan-out runs without a collection walking what the rebuild made: a push to
# a thousand streams takes 150-250 ms; the first collection after a rebuild
# took up to 9 ms of it (bench/fanout.py --instrument, push_gc_ms).
HOLD_AFTER_BURST_S = 1.0


class HeapKeeper:
    """Freeze the heap `quiet` seconds after it last grew; collect fully
    (unfreezing first) at most every `full_every` seconds, also only when
    quiet. Growth is seen through the collector's own callbacks: objects
    reach the old generation only through a collection of generation 1."""

    def __init__(
        self,
        *,
        quiet: float = 0.5,
        full_every: float = 600.0,
        trim_every: float = 10.0,
        hold: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        malloc: Malloc | None = None,
    ) -> None:
        self.quiet = quiet
        self.full_every = full_every
        self.trim_every = trim_every
        self._malloc = malloc if malloc is not None else Malloc.of_libc()
        self._last_trim = clock()
        self.trims = 0
        self._clock = clock
        self._sleep = sleep
        self._grew_at: float | None = None
        self._last_full = clock()
        self.freezes = 0
        self.full_collections = 0
        self._pauses = 0
        self._was_enabled = True
        # A burst is followed by its fan-out (a rebuild by a thousand
        # writes): collection stays off through it, up to `hold` seconds,
        # and the young generation is then collected once at the freeze.
        self.hold = hold
        self._held_since: float | None = None

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info.get("generation", 0) >= 1:
            self._grew_at = self._clock()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No automatic collection while a large, long-lived structure is
        being built (a first list of ten thousand objects): each full pass
        would walk everything built so far, for nothing. The heap is frozen
        once the burst settles, as after any other."""
        self._pauses += 1
        # While held since the last burst, collection is off by our doing.
        if self._pauses == 1 and self._held_since is None:
            self._was_enabled = gc.isenabled()
            gc.disable()
        try:
            yield
        finally:
            self._pauses -= 1
            if self._pauses == 0 and self._was_enabled:
                if self.hold > 0:
                    if self._held_since is None:  # a hold counts from its first burst
                        self._held_since = self._clock()
                else:
                    gc.enable()
            self.note_growth()

    def _resume(self) -> None:
        """Automatic collection back on, after a burst's hold."""
        if self._held_since is not None and not self._pauses:
            self._held_since = None
            gc.enable()

    def note_growth(self) -> None:
        """For callers that know a burst just happened (and for tests)."""
        self._grew_at = self._clock()

    def trim(self) -> None:
        """Give freed heap memory back to the system, at a quiet moment."""
        now = self._clock()
        if self._malloc is None or now - self._last_trim < self.trim_every:
            return
        if self._grew_at is not None and now - self._grew_at < self.quiet:
            return
        self._last_trim = now
        self._malloc.trim()
        self.trims += 1

    def settle(self) -> None:
        """One decision: freeze, collect-and-freeze, or nothing."""
        self.trim()
        now = self._clock()
        if self._held_since is not None and now - self._held_since >= self.hold:
            self._resume()  # bursts kept coming: the collector may not wait longer
        if self._grew_at is None or now - self._grew_at < self.quiet:
            return
        self._grew_at = None
        if now - self._last_full >= self.full_every:
            started = time.perf_counter()
            gc.unfreeze()
            unreachable = gc.collect()
            gc.freeze()
            self._last_full = now
            self.full_collections += 1
            log.info(
                "full garbage collection: %d unreachable, %.0f ms; %d objects frozen",
                unreachable,
                (time.perf_counter() - started) * 1000,
                gc.get_freeze_count(),
            )
        else:
            # The young generations first: garbage a burst left (a closed
            # stream's cycles) would otherwise be frozen with the rest and
            # kept until the next full collection.
            gc.collect(1)
            gc.freeze()
        self.freezes += 1
        self._resume()

    async def run(self) -> None:
        gc.callbacks.append(self._on_gc)
        try:
            gc.freeze()  # what start-up built lives as long as the process
            while True:
                await self._sleep(self.quiet / 2)
                self.settle()
        finally:
            gc.callbacks.remove(self._on_gc)
            self._resume()


class Malloc:
    """glibc's malloc_trim, where the C library is glibc."""

    def __init__(self, libc: Any) -> None:
        self._libc = libc

    @classmethod
    def of_libc(cls) -> Malloc | None:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        try:
            libc = ctypes.CDLL(name)
            libc.malloc_trim  # noqa: B018 (probing for glibc)
        except (OSError, AttributeError):
            return None
        return cls(libc)

    def trim(self) -> None:
        self._libc.malloc_trim(0)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc(
    *, mmap_threshold: int | None = 32 << 20, trim_threshold: int = 64 << 20, arena_max: int = 2
) -> bool:
    """Keep few malloc arenas, and serve large buffers from the heap.

    gRPC's threads would add an arena each, every one holding freed memory
    of its own. Large buffers come and go all the time (a proxy's whole
    configuration, a route table of every Service: megabytes at 10,000
    Services). glibc maps each above its mmap threshold afresh and unmaps it
    on free, so every one costs its page faults again: with the 128 KiB
    threshold once set here, 8-12 ms of system time per connecting proxy,
    and 10 of an annotation change's 36 ms (bench/ingest.py). Below 32 MiB
    they now come from the heap and reuse its memory, and the heap's top is
    given back past 64 MiB; HeapKeeper's trim at quiet moments returns the
    rest. Memory did not grow for it (bench/fanout.py: 1,000 delta proxies
    160-165 KiB per idle stream and 355 MiB peak either way; 2,000 SotW
    918 MiB peak either way), and the annotation change went 36 -> 13 ms.
    Environment settings (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_) win.
    Call before threads start. False where this is not glibc."""
    import os

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    done = True
    if mmap_threshold is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and done
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
            done = bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and done
    if "MALLOC_ARENA_MAX" not in os.environ:
        done = bool(mallopt(_M_ARENA_MAX, arena_max)) and done
    return done
