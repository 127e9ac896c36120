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
* FANOUT_TIMED: the loop thread's CPU time (time.thread_time) spent in
  each function named in FANOUT_TIMED_FUNCS ("module:Qualified.name", comma-
  separated; synchronous functions and properties; a call inside a call of
  the same function is not counted twice), and in garbage collections ("gc",
  wall time), counted while switched on by SIGUSR2 (with FANOUT_PROFILE, the
  same signal switches both); {name: [calls, seconds]} as JSON on exit.
* FANOUT_MALLOC=glibc (not a file): glibc's own malloc settings, without
  the tuning `shoal serve` does at start (shoal.heap.tune_malloc).

It imports nothing of the benchmark's: as a script, its folder is first on
sys.path.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import importlib
import inspect
import json
import os
import signal
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from shoal import cli, heap
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


class Timings:
    """CPU time of the calling thread in chosen functions, while on."""

    def __init__(self) -> None:
        self.on = False
        self.totals: dict[str, list[float]] = {}
        self._depth: dict[str, int] = {}
        self._gc_started = 0.0

    def toggle(self) -> None:
        self.on = not self.on

    def wrap(self, spec: str) -> None:
        """`spec`: "module:Qualified.name" of a function, method or property."""
        module_name, _, qualified = spec.partition(":")
        owner: Any = importlib.import_module(module_name)
        *path, name = qualified.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = inspect.getattr_static(owner, name)
        if isinstance(original, property):
            assert original.fget is not None
            wrapped: Any = property(self._timed(spec, original.fget), original.fset)
        elif isinstance(original, staticmethod):
            wrapped = staticmethod(self._timed(spec, original.__func__))
        elif isinstance(original, classmethod):
            wrapped = classmethod(self._timed(spec, original.__func__))
        else:
            if inspect.iscoroutinefunction(original):
                raise ValueError(f"{spec}: a coroutine function's time is not its own")
            wrapped = self._timed(spec, original)
        setattr(owner, name, wrapped)

    def _timed(self, spec: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        totals = self.totals.setdefault(spec, [0, 0.0])
        depth = self._depth
        depth[spec] = 0
        clock = time.thread_time

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.on or depth[spec]:
                return fn(*args, **kwargs)
            depth[spec] += 1
            started = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[1] += clock() - started
                totals[0] += 1
                depth[spec] -= 1

        return wrapper

    def count_collections(self) -> None:
        totals = self.totals.setdefault("gc", [0, 0.0])

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                self._gc_started = time.perf_counter()
            elif self.on and self._gc_started:
                totals[0] += 1
                totals[1] += time.perf_counter() - self._gc_started

        gc.callbacks.append(on_gc)


def main(argv: list[str]) -> int:
    tracemalloc_prefix = os.environ.get("FANOUT_TRACEMALLOC")
    events_file = os.environ.get("FANOUT_EVENTS")
    profile_file = os.environ.get("FANOUT_PROFILE")
    timed_file = os.environ.get("FANOUT_TIMED")
    if os.environ.get("FANOUT_MALLOC") == "glibc":
        heap.tune_malloc = lambda **_: False
    if tracemalloc_prefix:
        snapshot_on_sigusr1(tracemalloc_prefix)
    events: list[Event] = []
    if events_file:
        time_collections(events)
        timed(files.FolderRegistry, "reload", events)
        timed(controller.Controller, "rebuild", events)
        observe_writes(events)
    profile = profile_on_sigusr2() if profile_file else None
    timings = Timings()
    if timed_file:
        for spec in filter(None, os.environ.get("FANOUT_TIMED_FUNCS", "").split(",")):
            timings.wrap(spec.strip())
        timings.count_collections()
        toggle_profile = signal.getsignal(signal.SIGUSR2) if profile is not None else None

        def toggle(signum: int, frame: Any) -> None:
            timings.toggle()
            if callable(toggle_profile):
                toggle_profile(signum, frame)

        signal.signal(signal.SIGUSR2, toggle)
    try:
        return cli.main(argv)
    finally:
        if profile is not None and profile_file:
            profile.disable()
            profile.dump_stats(profile_file)
        if timed_file:
            with open(timed_file, "w") as f:
                json.dump(timings.totals, f)
        if events_file:
            with open(events_file, "w") as f:
                json.dump(events, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
