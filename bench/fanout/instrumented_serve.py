"""`shoal serve` with a look inside, run by the benchmark as a script in place
of `python -m shoal.cli` (same arguments); shoal itself is not changed.

What it does is chosen by environment variables, each naming a file:

* FANOUT_TRACEMALLOC: tracemalloc snapshots on SIGUSR1, to FILE.0, FILE.1...
* FANOUT_EVENTS: the start and length of every garbage collection, registry
  reload and controller rebuild, and the start of every write of a response
  to a stream (told by the ADS server's observer), as a JSON list of
  (what, monotonic start, seconds), what being gc0, gc1, gc2, reload,
  rebuild or write; written on exit.
* FANOUT_PROFILE: cProfile of the event loop thread, in its CPU time,
  switched on and off by SIGUSR2; pstats written on exit.

It imports nothing of the benchmark's: as a script, its folder is first on
sys.path.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import json
import os
import signal
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from shoal import cli
from shoal.registry import files
from shoal.xds import controller, server

Event = tuple[str, float, float]


class WriteTimes:
    """A stream observer that notes when each response starts going out, and
    tells the observer shoal serve gave the server all the rest."""

    def __init__(self, events: list[Event], inner: server.StreamObserver | None) -> None:
        self._events = events
        self._inner = inner

    def pushed(self, type_url: str, resources: int, delta: bool) -> None:
        self._events.append(("write", time.monotonic(), 0.0))
        if self._inner is not None:
            self._inner.pushed(type_url, resources, delta)

    def nacked(self, type_url: str) -> None:
        if self._inner is not None:
            self._inner.nacked(type_url)

    def acked(self, type_url: str, seconds: float) -> None:
        if self._inner is not None:
            self._inner.acked(type_url, seconds)


def observe_writes(events: list[Event]) -> None:
    """Every ADS server built from now on (shoal serve builds one) has a
    WriteTimes in front of its observer."""
    build = server.AdsServer.__init__

    @functools.wraps(build)
    def init(
        self: server.AdsServer,
        *args: Any,
        observer: server.StreamObserver | None = None,
        **kwargs: Any,
    ) -> None:
        build(self, *args, observer=WriteTimes(events, observer), **kwargs)

    server.AdsServer.__init__ = init  # type: ignore[method-assign]


def timed(cls: type, name: str, events: list[Event]) -> None:
    """Note the start and length of every call of `cls.name`."""
    original: Callable[..., Any] = getattr(cls, name)

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return original(self, *args, **kwargs)
        finally:
            events.append((name, started, time.monotonic() - started))

    setattr(cls, name, wrapper)


def time_collections(events: list[Event]) -> None:
    begun = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            begun[0] = now
        else:
            events.append((f"gc{info['generation']}", begun[0], now - begun[0]))

    gc.callbacks.append(on_gc)


def snapshot_on_sigusr1(prefix: str) -> None:
    tracemalloc.start(12)
    taken = 0

    def snapshot(*_: object) -> None:
        nonlocal taken
        tracemalloc.take_snapshot().dump(f"{prefix}.{taken}")
        taken += 1

    signal.signal(signal.SIGUSR1, snapshot)


def profile_on_sigusr2() -> cProfile.Profile:
    # The loop thread's CPU time: wall time would charge every function for
    # the moments gRPC's own threads held the core.
    profile = cProfile.Profile(time.thread_time)
    profiling = False

    def toggle(*_: object) -> None:
        nonlocal profiling
        if profiling:
            profile.disable()
        else:
            profile.enable()
        profiling = not profiling

    signal.signal(signal.SIGUSR2, toggle)
    return profile


def main(argv: list[str]) -> int:
    tracemalloc_prefix = os.environ.get("FANOUT_TRACEMALLOC")
    events_file = os.environ.get("FANOUT_EVENTS")
    profile_file = os.environ.get("FANOUT_PROFILE")
    if tracemalloc_prefix:
        snapshot_on_sigusr1(tracemalloc_prefix)
    events: list[Event] = []
    if events_file:
        time_collections(events)
        timed(files.FolderRegistry, "reload", events)
        timed(controller.Controller, "rebuild", events)
        observe_writes(events)
    profile = profile_on_sigusr2() if profile_file else None
    try:
        return cli.main(argv)
    finally:
        if profile is not None and profile_file:
            profile.disable()
            profile.dump_stats(profile_file)
        if events_file:
            with open(events_file, "w") as f:
                json.dump(events, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
