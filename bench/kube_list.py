"""Kubernetes ingest benchmark: list a large cluster into the model, translate, change one Service.

Seeds the in-memory API server of the tests (tests/kube/emulator.py, real
HTTP, in a background thread of this process) with Namespaces, Services and
one EndpointSlice per Service (and optionally Pods that the endpoints name in
targetRef), then runs the real `KubernetesRegistry` against it and measures:

* list: from `registry.watch()` starting to the first full `MeshState`
  handed on (every kind listed in pages of 500, then one
  `ObjectStore.build()`), with the list requests counted from the
  emulator's request log, and the build timed on its own;
* the first translation: `Controller.update(state)` + `rebuild()` on a
  fresh `Controller` (no proxies, identities=None: plain-text mesh, the
  shared clusters and endpoints are translated and serialized, no per-proxy
  snapshot is published);
* memory: this process's RSS (the emulator shares it, so the registry's
  part is the growth from after seeding to after the list), and the size of
  what the registry holds (its ObjectStore and MeshState), by walking the
  objects it reaches;
* one change: a merge patch of one Service's annotation through the
  emulator, timed until the registry hands on a state containing it and
  until a controller rebuild of that state completes (no debounce).

Seeding goes through the emulator's own thread-safe API (`emu.create`), not
HTTP, and its time is reported separately; it is not part of any figure.

The emulator's thread shares this process and its GIL: the list time
includes the emulator serving the pages (its thread's CPU is reported), and
its objects are frozen out of the garbage collector after seeding
(`--no-gc-freeze` keeps them in), since they would not be in shoal's process.

    .venv/bin/python bench/kube_list.py [--services N] [--endpoints-per-slice K]
        [--pods N] [--changes N] [--json] [--no-gc-freeze]
        [--profile ingest|translate|change] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import threading
import time
import tracemalloc
import types
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The emulator lives in the tests package, next to shoal.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shoal import heap, kube  # noqa: E402
from shoal.model import mesh  # noqa: E402
from shoal.registry import kubernetes  # noqa: E402
from shoal.xds import cache, controller, debounce  # noqa: E402
from tests.kube import objects  # noqa: E402
from tests.kube.emulator import KubeEmulator, running_emulator  # noqa: E402

NAMESPACES = 10
PAGE_SIZE = 500  # KubernetesRegistry's default
TIMEOUT_S = 600.0
ANNOTATION = "shoal.io/timeout"
OTHER_CPU_WARNING_S = 0.5


@dataclass
class Change:
    service: str
    state_ms: float = 0.0  # patch -> registry hands on a state with it
    build_ms: float = 0.0  # of which: the registry's ObjectStore build
    rebuild_ms: float = 0.0  # the controller rebuild of that state
    rebuilt_ms: float = 0.0  # patch -> controller rebuild done
    serializations: int = 0


@dataclass
class Result:
    services: int
    endpoints_per_slice: int
    endpoints: int
    pods: int
    namespaces: int = NAMESPACES
    proxies: int = 0
    identities: None = None
    history_limit: int = 0
    gc_frozen_objects: int = 0  # frozen after seeding (0 with --no-gc-freeze)
    seed_objects: int = 0
    seed_s: float = 0.0
    # Ingest (registry start -> first MeshState handed on).
    list_s: float = 0.0
    lists_done_s: float = 0.0  # the last reflector's replace() returned
    build_s: float = 0.0  # registry.build() (ObjectStore.build) of the first state
    builds: int = 0  # builds during the ingest (1 expected)
    replace_s: float = 0.0  # registry.replace(): parse + put every listed object
    list_requests: int = 0
    list_requests_by_resource: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0  # this (the registry's) thread
    emulator_cpu_s: float = 0.0  # the emulator's thread
    gc_s: float = 0.0  # collection pauses during the ingest, any thread
    gc_full: int = 0
    state_services: int = 0
    state_endpoints: int = 0
    state_pods: int = 0
    problems: int = 0
    # First translation.
    translate_s: float = 0.0
    translate_serializations: int = 0
    # Memory (MiB).
    rss_start_mb: float = 0.0
    rss_seeded_mb: float = 0.0
    rss_ingested_mb: float = 0.0
    rss_translated_mb: float = 0.0
    rss_end_mb: float = 0.0
    peak_rss_mb: float = 0.0
    registry_rss_mb: float = 0.0  # rss_ingested - rss_seeded
    controller_rss_mb: float = 0.0  # rss_translated - rss_ingested
    registry_heap_mb: float = 0.0  # what the registry's store and state reach
    registry_heap_objects: int = 0
    registry_objects_mb: float = 0.0  # of which the listed objects (trimmed JSON)
    # One change.
    changes: list[Change] = field(default_factory=list)
    one_change_ms: float = 0.0  # median state_ms
    one_change_rebuilt_ms: float = 0.0  # median rebuilt_ms
    # CPU used by other processes on the machine while measuring.
    other_cpu_s: float = 0.0
    # How it was run.
    gc_freeze_after_seeding: bool = True
    tracemalloc: bool = False  # if so, the ingest times and RSS are distorted
    ok: bool = True
    errors: list[str] = field(default_factory=list)


# -- the cluster ----------------------------------------------------------------


def _address(index: int) -> str:
    return f"10.{index >> 16 & 0xFF}.{index >> 8 & 0xFF}.{index & 0xFF}"


def _where(i: int) -> tuple[str, str]:
    return f"ns{i % NAMESPACES}", f"svc{i}"


def seed(emu: KubeEmulator, services: int, per_slice: int, pods: int) -> int:
    """Namespaces, Services, one slice each; a Pod for each of the first
    `pods` endpoints (targetRef). Returns the objects written."""
    written = 0
    for n in range(NAMESPACES):
        emu.create(objects.namespace(f"ns{n}"))
        written += 1
    for i in range(services):
        namespace, name = _where(i)
        emu.create(objects.service(namespace, name))
        first = i * per_slice
        with_pods = max(0, min(per_slice, pods - first))
        for k in range(with_pods):
            emu.create(
                objects.pod(
                    namespace,
                    f"{name}-{k}",
                    labels={"app": name},
                    ip=_address(first + k),
                )
            )
        emu.create(
            objects.endpoint_slice(
                namespace,
                name,
                addresses=[_address(first + k) for k in range(per_slice)],
                pods=[f"{name}-{k}" if k < with_pods else None for k in range(per_slice)],
                name=f"{name}-x7k2p",
            )
        )
        written += 2 + with_pods
    return written


# -- measuring --------------------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def thread_cpu_s(native_id: int) -> float:
    """utime + stime of one thread of this process."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emulator_thread() -> int:
    for t in threading.enumerate():
        if t.name == "kube-emulator" and t.native_id is not None:
            return t.native_id
    raise SystemExit("the emulator's thread is not running")


class GcClock:
    """Collection pauses, from the collector's callbacks (any thread)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.full = 0
        self._started = 0.0
        self.on = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._started
            self.full += info.get("generation") == 2


_SKIP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)


def reachable(*roots: object) -> tuple[int, int]:
    """(bytes, objects) of everything reachable from `roots`, each object once
    (sys.getsizeof; classes, modules and functions are not counted)."""
    seen: set[int] = set()
    stack = list(roots)
    size = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _SKIP):
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return size, len(seen)


def _print_profile(profile: cProfile.Profile, title: str) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)
    print(f"== profile: {title} ==", file=sys.stderr)
    print(out.getvalue(), file=sys.stderr)


async def _within(awaitable: Awaitable[Any], what: str) -> Any:
    try:
        return await asyncio.wait_for(awaitable, TIMEOUT_S)
    except TimeoutError:
        raise SystemExit(f"timed out after {TIMEOUT_S:.0f} s waiting for {what}") from None


# -- the benchmark ----------------------------------------------------------------


class Handed:
    """Every state the registry hands on, with when."""

    def __init__(self) -> None:
        self.states: list[tuple[float, mesh.MeshState]] = []
        self.event = asyncio.Event()

    def __call__(self, state: mesh.MeshState) -> None:
        self.states.append((time.perf_counter(), state))
        self.event.set()

    async def next(self, check: Callable[[mesh.MeshState], bool], what: str) -> float:
        """The time of the first state (from now on) that passes `check`."""
        seen = len(self.states)
        while True:
            for at, state in self.states[seen:]:
                if check(state):
                    return at
            seen = len(self.states)
            self.event.clear()
            await _within(self.event.wait(), what)


async def run(args: argparse.Namespace, emu: KubeEmulator, r: Result) -> None:
    profile = cProfile.Profile() if args.profile else None
    gc_clock = GcClock()
    gc.callbacks.append(gc_clock)
    emu_tid = emulator_thread()

    api = kube.Api(kube.ApiServer(emu.url, False), kube.Backoff())
    # As `shoal serve --kubernetes` builds it: no automatic garbage collection
    # during a list and the build after it (shoal/heap.py).
    keeper = heap.HeapKeeper()
    registry = kubernetes.KubernetesRegistry(api, page_size=PAGE_SIZE, quiet_gc=keeper.paused)

    # The registry's build() and replace(), timed by wrapping this instance's
    # methods (shoal is not changed).
    builds: list[tuple[float, float]] = []  # (start, seconds)
    replaces: list[tuple[float, float]] = []  # (end, seconds)
    real_build, real_replace = registry.build, registry.replace

    def timed_build() -> mesh.MeshState:
        started = time.perf_counter()
        state = real_build()
        builds.append((started, time.perf_counter() - started))
        return state

    def timed_replace(reflector: kubernetes.Reflector, items: list[dict[str, Any]]) -> None:
        started = time.perf_counter()
        real_replace(reflector, items)
        ended = time.perf_counter()
        replaces.append((ended, ended - started))

    registry.build = timed_build  # type: ignore[method-assign]
    registry.replace = timed_replace  # type: ignore[method-assign]

    handed = Handed()
    stop = asyncio.Event()
    emu.clear_requests()
    traced0: tracemalloc.Snapshot | None = None
    if args.tracemalloc:
        tracemalloc.start()
        traced0 = tracemalloc.take_snapshot()

    # -- ingest
    gc_clock.on = True
    cpu0, emu_cpu0 = time.thread_time(), thread_cpu_s(emu_tid)
    if profile is not None and args.profile == "ingest":
        profile.enable()
    started = time.perf_counter()
    task = asyncio.create_task(registry.watch(handed, stop))
    first_at = await handed.next(lambda s: True, "the first state")
    if profile is not None and args.profile == "ingest":
        profile.disable()
    r.client_cpu_s = time.thread_time() - cpu0
    r.emulator_cpu_s = thread_cpu_s(emu_tid) - emu_cpu0
    gc_clock.on = False
    r.list_s = first_at - started
    r.gc_s, r.gc_full = gc_clock.total, gc_clock.full
    first_build = [b for b in builds if b[0] <= first_at]
    r.builds = len(first_build)
    r.build_s = first_build[-1][1] if first_build else float("nan")
    r.replace_s = sum(s for end, s in replaces if end <= first_at)
    r.lists_done_s = (
        max((end for end, _ in replaces if end <= first_at), default=first_at) - started
    )
    lists = emu.requests(verb="list")
    r.list_requests = len(lists)
    for rec in lists:
        assert rec.resource is not None
        r.list_requests_by_resource[rec.resource] = (
            r.list_requests_by_resource.get(rec.resource, 0) + 1
        )
    state = handed.states[-1][1]
    r.state_services = len(state.services)
    r.state_endpoints = sum(len(e) for e in state.endpoints.values())
    r.state_pods = len(state.pods)
    r.problems = len(registry.problems)
    if r.state_services != r.services or r.state_endpoints != r.endpoints:
        _problem(
            r,
            f"first state has {r.state_services} Services and {r.state_endpoints} endpoints, "
            f"expected {r.services} and {r.endpoints}",
        )
    if traced0 is not None:
        _report_tracemalloc(traced0)
        tracemalloc.stop()
    gc.collect()
    r.rss_ingested_mb = rss_mb()
    r.registry_rss_mb = r.rss_ingested_mb - r.rss_seeded_mb

    # -- first translation
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.1, 1.0))
    gc.collect()
    count = cache.serialization_count()
    if profile is not None and args.profile == "translate":
        profile.enable()
    t = time.perf_counter()
    ctl.update(state)
    ctl.rebuild()
    r.translate_s = time.perf_counter() - t
    if profile is not None and args.profile == "translate":
        profile.disable()
    r.translate_serializations = cache.serialization_count() - count
    gc.collect()
    r.rss_translated_mb = rss_mb()
    r.controller_rss_mb = r.rss_translated_mb - r.rss_ingested_mb

    # -- one change at a time: an annotation patched through the API
    await _within(
        emu.until(lambda: emu.open_watches() >= len(registry.reflectors), TIMEOUT_S),
        "the watches to open",
    )
    await asyncio.sleep(0.2)
    for n in range(args.changes):
        index = n * (args.services - 1) // max(args.changes - 1, 1)
        namespace, name = _where(index)
        key = mesh.ServiceKey(namespace, name)
        seconds = float(n + 2)
        change = Change(f"{namespace}/{name}")
        gc.collect()
        builds_before = len(builds)
        if profile is not None and args.profile == "change":
            profile.enable()
        t = time.perf_counter()
        emu.patch(
            "services",
            name,
            {"metadata": {"annotations": {ANNOTATION: f"{seconds:g}s"}}},
            namespace=namespace,
        )

        def has_it(s: mesh.MeshState, key: mesh.ServiceKey = key, want: float = seconds) -> bool:
            route = s.routes.get(key)
            return route is not None and route.timeout_s == want

        at = await handed.next(has_it, f"the change to {change.service}")
        changed = next(s for when, s in reversed(handed.states) if when == at)
        change.state_ms = (at - t) * 1000
        change.build_ms = sum(s for _, s in builds[builds_before:]) * 1000
        count = cache.serialization_count()
        t1 = time.perf_counter()
        ctl.update(changed)
        ctl.rebuild()
        done = time.perf_counter()
        if profile is not None and args.profile == "change":
            profile.disable()
        change.rebuild_ms = (done - t1) * 1000
        change.rebuilt_ms = (done - t) * 1000
        change.serializations = cache.serialization_count() - count
        r.changes.append(change)
        await asyncio.sleep(0.3)
    r.one_change_ms = statistics.median(c.state_ms for c in r.changes)
    r.one_change_rebuilt_ms = statistics.median(c.rebuilt_ms for c in r.changes)

    stop.set()
    await _within(task, "the registry to stop")
    await api.close()
    gc.callbacks.remove(gc_clock)

    gc.collect()
    r.rss_end_mb = rss_mb()
    r.peak_rss_mb = peak_rss_mb()
    size, reached = reachable(registry._store, registry.state)
    r.registry_heap_mb, r.registry_heap_objects = size / 2**20, reached
    # Of which the objects as listed (trimmed JSON in KubeObjects); the rest
    # is the model (and the store's memos of it).
    r.registry_objects_mb = reachable(registry._store._by_source)[0] / 2**20
    if profile is not None:
        _print_profile(profile, f"{args.profile}, {args.services} services")


def _report_tracemalloc(before: tracemalloc.Snapshot) -> None:
    after = tracemalloc.take_snapshot()
    diff = after.compare_to(before, "lineno")
    total = sum(d.size_diff for d in diff)
    print(
        f"== tracemalloc: {total / 2**20:.1f} MiB more traced after the ingest ==", file=sys.stderr
    )
    for d in diff[:15]:
        frame = d.traceback[0]
        print(
            f"{d.size_diff / 2**20:8.1f} MiB {d.count_diff:>9,} blocks  "
            f"{frame.filename}:{frame.lineno}",
            file=sys.stderr,
        )


def _problem(r: Result, problem: str) -> None:
    r.ok = False
    r.errors.append(problem)
    print(f"kube_list: {problem}", file=sys.stderr)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--services", type=int, default=10000, help="Services (10000)")
    p.add_argument(
        "--endpoints-per-slice", type=int, default=10, help="endpoints per EndpointSlice (10)"
    )
    p.add_argument(
        "--pods",
        type=int,
        default=0,
        help="Pods, one behind each of the first N endpoints (targetRef); 0: none",
    )
    p.add_argument("--changes", type=int, default=3, help="one-Service changes to time (3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="leave the seeded emulator's objects in the garbage collector's generations "
        "(by default they are frozen after seeding: they would not be in shoal's process)",
    )
    p.add_argument(
        "--profile",
        choices=("ingest", "translate", "change"),
        help="cProfile this thread in one phase (slows it); top functions to stderr",
    )
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace allocations during the ingest (slows it a lot); top lines to stderr",
    )
    args = p.parse_args(argv)
    if args.services < 1 or args.endpoints_per_slice < 1 or args.changes < 1 or args.pods < 0:
        p.error("--services, --endpoints-per-slice and --changes must be at least 1")
    return args


def _report(r: Result) -> None:
    print(
        f"{r.services:,} Services in {r.namespaces} namespaces, {r.endpoints:,} endpoints "
        f"({r.endpoints_per_slice} per slice), {r.pods:,} Pods"
    )
    print(f"seeding the emulator (not timed below): {r.seed_objects:,} objects in {r.seed_s:.1f} s")
    print(
        f"list -> first state:   {r.list_s:.3f} s  ({r.list_requests} list requests: "
        + ", ".join(f"{k} {v}" for k, v in sorted(r.list_requests_by_resource.items()))
        + ")"
    )
    print(f"  lists done at:       {r.lists_done_s:.3f} s  (replace() total {r.replace_s:.3f} s)")
    print(f"  build (ObjectStore): {r.build_s:.3f} s  ({r.builds} build(s))")
    print(
        f"  CPU: registry thread {r.client_cpu_s:.2f} s, emulator thread "
        f"{r.emulator_cpu_s:.2f} s; GC pauses {r.gc_s:.3f} s ({r.gc_full} full; "
        f"{r.gc_frozen_objects:,} objects frozen after seeding)"
    )
    print(
        f"first translation:     {r.translate_s:.3f} s  "
        f"({r.translate_serializations:,} serializations; no proxies, identities=None)"
    )
    print(
        f"RSS MiB: start {r.rss_start_mb:.0f}, seeded {r.rss_seeded_mb:.0f}, "
        f"ingested {r.rss_ingested_mb:.0f}, translated {r.rss_translated_mb:.0f}, "
        f"end {r.rss_end_mb:.0f}, peak {r.peak_rss_mb:.0f}"
    )
    print(
        f"  registry: +{r.registry_rss_mb:.0f} MiB RSS; reaches {r.registry_heap_mb:.0f} MiB "
        f"in {r.registry_heap_objects:,} objects ({r.registry_objects_mb:.0f} MiB of them the "
        f"listed JSON).  controller: +{r.controller_rss_mb:.0f} MiB RSS"
    )
    for c in r.changes:
        print(
            f"one change ({c.service}): state {c.state_ms:.0f} ms (build {c.build_ms:.0f} ms), "
            f"rebuild {c.rebuild_ms:.0f} ms, total {c.rebuilt_ms:.0f} ms, "
            f"{c.serializations} serialization(s)"
        )
    print(
        f"one change, median: {r.one_change_ms:.0f} ms to the state, "
        f"{r.one_change_rebuilt_ms:.0f} ms to the rebuilt snapshot"
    )
    print(f"other processes' CPU during the measurements: {r.other_cpu_s:.1f} s")
    if r.tracemalloc:
        print("(--tracemalloc: the ingest's times and the RSS figures include tracing)")
    for e in r.errors:
        print(f"  problem: {e}")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    per_slice = args.endpoints_per_slice
    pods = min(args.pods, args.services * per_slice)
    r = Result(args.services, per_slice, args.services * per_slice, pods)
    r.gc_freeze_after_seeding = not args.no_gc_freeze
    r.tracemalloc = args.tracemalloc
    r.rss_start_mb = rss_mb()
    writes = NAMESPACES + 2 * args.services + pods
    # History for every write of the seeding and then some: no compaction
    # during the run (a list needs no history; the watches that follow it
    # start from the list's resourceVersion).
    r.history_limit = writes + 10_000
    with running_emulator(history_limit=r.history_limit, bookmark_interval=1.0) as emu:
        t = time.perf_counter()
        r.seed_objects = seed(emu, args.services, per_slice, pods)
        r.seed_s = time.perf_counter() - t
        gc.collect()
        r.rss_seeded_mb = rss_mb()
        if not args.no_gc_freeze:
            # The emulator's objects would not be in shoal's process: keep
            # them (and what was imported) out of every collection the
            # ingest triggers.
            gc.freeze()
        r.gc_frozen_objects = gc.get_freeze_count()
        machine0, own0 = machine_cpu_s(), own_cpu_s()
        asyncio.run(run(args, emu, r))
        r.other_cpu_s = max(0.0, (machine_cpu_s() - machine0) - (own_cpu_s() - own0))
    if r.other_cpu_s > OTHER_CPU_WARNING_S:
        print(
            f"kube_list: other processes used {r.other_cpu_s:.1f} CPU seconds during the "
            "measurements; the figures are disturbed",
            file=sys.stderr,
        )
    if args.json:
        out = asdict(r)
        out["changes"] = [asdict(c) for c in r.changes]
        print(
            json.dumps(
                {
                    **_rounded(out),
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "page_size": PAGE_SIZE,
                }
            )
        )
    else:
        _report(r)
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
