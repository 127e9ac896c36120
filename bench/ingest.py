"""Ingest benchmark: one Kubernetes change, from the watch event to the snapshots.

Builds a mesh of Kubernetes objects (10 Namespaces, `--services` Services,
one EndpointSlice of `--endpoints-per-slice` endpoints each: 10,000 and
100,000 by default) and feeds them through the real registry path: the
`KubernetesRegistry` a watch drives (`replace` for the first list, `apply`
for each watch event: parse, `ObjectStore.check`, `ObjectStore.put`), its
`build` (`ObjectStore.build`), then `Controller.update` and `rebuild` (no
debounce wait) with `--proxies` sidecars registered through the
`SnapshotCache` watch path (as bench/translate.py does). It measures:

* first: the first full build (store build, then translation and publish
  to every proxy), after the list was put into the store (timed apart);
* annotation: one Service's `shoal.io/timeout` annotation changes (its
  route changes);
* endpoint: one address of one EndpointSlice changes;
* Service added, Service removed: a Service and its EndpointSlice come,
  and go, each after an annotation change elsewhere (as in a live mesh);
* route (with `--routes N`): one of N TrafficRoutes, each splitting its
  Service's traffic with the next Service of its namespace, changes its
  weights;

each from the registry event to the snapshots set in the cache, split into
store (event + build) and translation (update + rebuild + publish). Changes
are repeated `--changes` times (median). Times are CPU seconds of this
process (time.process_time, user and system; the system part is shown too:
page faults of new buffers) beside wall seconds (perf_counter): on a shared
machine the CPU time is the steadier figure. glibc's malloc is tuned as
`shoal serve` tunes it (heap.tune_malloc); the stores' builds and the
rebuilds keep the garbage collector out, as `shoal serve` does for the
registry (heap.HeapKeeper.paused; the controller's `quiet_gc`).

`--scoped` exports every 10th Service to its own namespace only, so that
the sidecars of the other namespaces have a scope (their route tables are
then keyed by it, and a Service that comes or goes changes it).

`--check` compares, after the changes, every proxy's snapshot with the one
a fresh registry and controller build from the same objects (same names and
versions of every resource).

    .venv/bin/python bench/ingest.py [--services N] [--endpoints-per-slice K]
        [--proxies N] [--changes N] [--profile first|annotation|endpoint|service|route]
        [--routes N] [--check] [--scoped] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import translate  # noqa: E402  (bench/, this script's folder)
from envoy.config.core.v3 import base_pb2  # noqa: E402

from shoal import heap  # noqa: E402
from shoal.registry import kubernetes, manifests  # noqa: E402
from shoal.xds import cache, controller, debounce  # noqa: E402
from tests.kube import objects  # noqa: E402

NAMESPACES = 10
ANNOTATION = "shoal.io/timeout"
EXPORT_TO = "shoal.io/export-to"
SCOPED_EVERY = 10


@dataclass
class Timing:
    """One measured step: CPU and wall seconds, store and translation."""

    store_cpu: float
    translate_cpu: float
    store_wall: float
    translate_wall: float
    # Of the CPU time, the kernel's (page faults of new buffers, mostly).
    system_cpu: float = 0.0

    @property
    def total_cpu(self) -> float:
        return self.store_cpu + self.translate_cpu

    @property
    def total_wall(self) -> float:
        return self.store_wall + self.translate_wall


@dataclass
class Result:
    services: int
    endpoints: int
    proxies: int
    list_cpu_s: float = 0.0
    first: Timing | None = None
    annotation: list[Timing] = field(default_factory=list)
    endpoint: list[Timing] = field(default_factory=list)
    service_added: list[Timing] = field(default_factory=list)
    service_removed: list[Timing] = field(default_factory=list)
    routes: int = 0
    route: list[Timing] = field(default_factory=list)
    checked: bool | None = None


def _address(index: int) -> str:
    return f"10.{index >> 16 & 0xFF}.{index >> 8 & 0xFF}.{index & 0xFF}"


def _where(i: int) -> tuple[str, str]:
    return f"ns{i % NAMESPACES}", f"svc{i}"


def _slice(i: int, per_slice: int, moved: dict[int, str]) -> dict[str, Any]:
    namespace, name = _where(i)
    first = i * per_slice
    addresses = [moved.get(first + k, _address(first + k)) for k in range(per_slice)]
    return objects.endpoint_slice(namespace, name, addresses=addresses, name=f"{name}-x7k2p")


def _service(i: int, annotations: dict[int, str], scoped: bool = False) -> dict[str, Any]:
    namespace, name = _where(i)
    notes = {ANNOTATION: annotations[i]} if i in annotations else {}
    if scoped and i % SCOPED_EVERY == SCOPED_EVERY // 2:
        # Seen from one namespace only: the sidecars of the others have a scope.
        notes[EXPORT_TO] = _where(i)[0]
    return objects.service(
        namespace, name, annotations=notes or None, cluster_ip=_address(1 << 20 | i)
    )


def _traffic_route(i: int, services: int, weight: int = 90) -> dict[str, Any]:
    """Service i's TrafficRoute: `weight` to it, the rest to the next
    Service of its namespace."""
    namespace, name = _where(i)
    other = _where((i + NAMESPACES) % services)[1]
    spec = {
        "service": name,
        "rules": [
            {
                "backends": [
                    {"service": name, "weight": weight},
                    {"service": other, "weight": 100 - weight},
                ]
            }
        ],
    }
    return objects.traffic_route(namespace, name, spec)


def proxy_node(i: int) -> base_pb2.Node:
    """A sidecar of Service i; distinct outbound ports give distinct snapshot keys."""
    return translate.sidecar_node(i, *_where(i))


class Mesh:
    """A registry fed like a watch feeds it, and a controller with proxies."""

    def __init__(
        self, services: int, per_slice: int, scoped: bool = False, routes: int = 0
    ) -> None:
        self.services = services
        self.scoped = scoped
        # Services 0, k, 2k, ... have a TrafficRoute, with these weights.
        self.routed = range(0, services, max(services // routes, 1))[:routes] if routes else ()
        self.weights: dict[int, int] = {i: 90 for i in self.routed}
        self.per_slice = per_slice
        # The registry never calls the API here: the events are handed to it.
        # Its builds keep the garbage collector out, as `shoal serve` has it.
        self.keeper = heap.HeapKeeper()
        self.registry = kubernetes.KubernetesRegistry(
            None,  # type: ignore[arg-type]
            quiet_gc=self.keeper.paused,
        )
        self.reflectors = {r.kind.type: r for r in self.registry.reflectors}
        self.snapshots = cache.SnapshotCache(controller.Controller.key_of)
        # Rebuilds too (what `shoal serve` should pass the controller).
        self.ctl = controller.Controller(
            self.snapshots, debounce.Debouncer(0.1, 1.0), quiet_gc=self.keeper.paused
        )
        self.annotations: dict[int, str] = {}
        self.moved: dict[int, str] = {}
        self.watches: list[cache.Watch] = []
        self.events: list[asyncio.Event] = []

    def connect(self, proxies: int) -> None:
        self.events = [asyncio.Event() for _ in range(proxies)]
        # Spread over the Services and over every namespace: each namespace
        # has its own outbound route table.
        step = max(self.services // max(proxies, 1), 1)
        spread = step % NAMESPACES == 0
        self.watches = [
            self.snapshots.watch(
                cache.Client(
                    proxy_node((i * step + (i % NAMESPACES if spread else 0)) % self.services)
                ),
                e,
            )
            for i, e in enumerate(self.events)
        ]
        if len(set(self.snapshots.watched_keys())) != proxies:
            raise SystemExit("proxies do not have distinct snapshot keys")

    def list_all(self) -> None:
        """The first list of every kind, as the reflectors hand it on."""
        kinds: dict[tuple[str, str], list[dict[str, Any]]] = {
            manifests.NAMESPACE: [objects.namespace(f"ns{n}") for n in range(NAMESPACES)],
            manifests.SERVICE: [
                _service(i, self.annotations, self.scoped) for i in range(self.services)
            ],
            manifests.ENDPOINT_SLICE: [
                _slice(i, self.per_slice, self.moved) for i in range(self.services)
            ],
            manifests.TRAFFIC_ROUTE: [
                _traffic_route(i, self.services, w) for i, w in self.weights.items()
            ],
        }
        for reflector in self.registry.reflectors:
            self.registry.replace(reflector, kinds.get(reflector.kind.type, []))

    def event(self, kind: tuple[str, str], obj: dict[str, Any], verb: str = "MODIFIED") -> None:
        self.registry.apply(self.reflectors[kind], verb, obj)

    def build(self) -> None:
        # As KubernetesRegistry.watch builds, once per burst of events.
        with self.registry.quiet_gc():
            state = self.registry.build()
        self.ctl.update(state)

    def translate(self) -> None:
        self.ctl.rebuild()


def _timed(event: Callable[[], None], m: Mesh, profile: cProfile.Profile | None = None) -> Timing:
    gc.collect()
    for e in m.events:
        e.clear()
    if profile is not None:
        profile.enable()
    s0 = os.times().system
    c0, w0 = time.process_time(), time.perf_counter()
    event()
    m.build()
    c1, w1 = time.process_time(), time.perf_counter()
    m.translate()
    c2, w2 = time.process_time(), time.perf_counter()
    s2 = os.times().system
    if profile is not None:
        profile.disable()
    if not all(e.is_set() for e in m.events):
        raise SystemExit("a proxy was not given a new snapshot")
    return Timing(c1 - c0, c2 - c1, w1 - w0, w2 - w1, s2 - s0)


def content(snapshots: cache.SnapshotCache) -> dict[str, set[tuple[str, str, str]]]:
    """(type, name, version) of every resource, per watched key."""
    out: dict[str, set[tuple[str, str, str]]] = {}
    for key in snapshots.watched_keys():
        snapshot = snapshots.get(key)
        assert snapshot is not None
        out[key] = {
            (type_url, r.name, r.version)
            for type_url, groups in snapshot.groups.items()
            for group in groups
            for r in group
        }
    return out


async def run(args: argparse.Namespace) -> Result:
    r = Result(args.services, args.services * args.endpoints_per_slice, args.proxies)
    m = Mesh(args.services, args.endpoints_per_slice, args.scoped, args.routes)
    r.routes = len(m.routed)
    m.connect(args.proxies)
    profiles = {
        name: cProfile.Profile() if args.profile == name else None
        for name in ("first", "annotation", "endpoint", "service", "route")
    }

    c0 = time.process_time()
    m.list_all()
    r.list_cpu_s = time.process_time() - c0
    r.first = _timed(lambda: None, m, profiles["first"])

    for n in range(args.changes):
        # Services spread over the sorted order, none twice in a row.
        i = (n * 7919 + 13) % args.services
        m.annotations[i] = f"{n % 50 + 2}s"
        obj = _service(i, m.annotations, m.scoped)
        r.annotation.append(
            _timed(functools.partial(m.event, manifests.SERVICE, obj), m, profiles["annotation"])
        )
    for n in range(args.changes):
        i = (n * 7919 + 101) % args.services
        # 172.16/12 never collides with the 10/8 addresses of the mesh.
        m.moved[i * args.endpoints_per_slice] = f"172.16.{n >> 8 & 0xFF}.{n & 0xFF}"
        obj = _slice(i, args.endpoints_per_slice, m.moved)
        r.endpoint.append(
            _timed(
                functools.partial(m.event, manifests.ENDPOINT_SLICE, obj), m, profiles["endpoint"]
            )
        )

    for n in range(args.changes):
        # A Service deployed (with its endpoints), then taken away.
        i = args.services + n
        added = [
            (manifests.SERVICE, _service(i, {})),
            (manifests.ENDPOINT_SLICE, _slice(i, args.endpoints_per_slice, {})),
        ]

        def apply(verb: str, objs: list[tuple[tuple[str, str], dict[str, Any]]] = added) -> None:
            for kind, obj in objs:
                m.event(kind, obj, verb)

        # Between them, other changes, as in a live mesh: what a rebuild
        # keeps for the next one is then that of an annotation's rebuild.
        other = (n * 7919 + 57) % args.services
        m.annotations[other] = f"{n % 50 + 3}s"
        _timed(
            functools.partial(m.event, manifests.SERVICE, _service(other, m.annotations, m.scoped)),
            m,
        )
        r.service_added.append(_timed(functools.partial(apply, "ADDED"), m, profiles["service"]))
        m.annotations.pop(other)
        _timed(
            functools.partial(m.event, manifests.SERVICE, _service(other, m.annotations, m.scoped)),
            m,
        )
        r.service_removed.append(_timed(functools.partial(apply, "DELETED"), m))

    for n in range(args.changes if m.routed else 0):
        i = m.routed[(n * 7919 + 3) % len(m.routed)]
        m.weights[i] = 80 - n % 50
        obj = _traffic_route(i, args.services, m.weights[i])
        r.route.append(
            _timed(functools.partial(m.event, manifests.TRAFFIC_ROUTE, obj), m, profiles["route"])
        )

    if args.check:
        fresh = Mesh(args.services, args.endpoints_per_slice, args.scoped, args.routes)
        fresh.annotations, fresh.moved, fresh.weights = m.annotations, m.moved, m.weights
        fresh.connect(args.proxies)
        fresh.list_all()
        _timed(lambda: None, fresh)
        r.checked = content(fresh.snapshots) == content(m.snapshots)

    for name, profile in profiles.items():
        if profile is not None:
            translate.print_profile(profile, name, most=30)
    for w in m.watches:
        m.snapshots.cancel(w)
    return r


def _median(timings: list[Timing], attr: str) -> float:
    return float(statistics.median(getattr(t, attr) for t in timings))


def _report(r: Result) -> None:
    assert r.first is not None
    print(
        f"{r.services} Services, {r.endpoints} endpoints, {r.proxies} proxies "
        f"(python {platform.python_version()}); ms, CPU (process_time) and wall"
    )
    print(f"list into the store (replace: parse, check, put): {r.list_cpu_s * 1000:.0f} ms CPU")
    print(
        f"{'':>22} {'total cpu':>10} {'store cpu':>10} {'transl cpu':>10} "
        f"{'(system)':>10} {'total wall':>10}"
    )
    rows = [("first build", [r.first]), ("annotation (median)", r.annotation)]
    rows.append(("endpoint (median)", r.endpoint))
    rows += [("Service added (median)", r.service_added)]
    rows += [("Service removed (median)", r.service_removed)]
    if r.route:
        rows += [(f"route of {r.routes} (median)", r.route)]
    for label, timings in rows:
        print(
            f"{label:>22} {_median(timings, 'total_cpu') * 1000:>10.1f} "
            f"{_median(timings, 'store_cpu') * 1000:>10.1f} "
            f"{_median(timings, 'translate_cpu') * 1000:>10.1f} "
            f"{_median(timings, 'system_cpu') * 1000:>10.1f} "
            f"{_median(timings, 'total_wall') * 1000:>10.1f}"
        )
    if r.checked is not None:
        print(f"snapshots equal to a fresh build: {'yes' if r.checked else 'NO'}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints-per-slice", type=int, default=10)
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--changes", type=int, default=7, help="changes of each kind (median)")
    parser.add_argument(
        "--profile", choices=("first", "annotation", "endpoint", "service", "route")
    )
    parser.add_argument(
        "--routes", type=int, default=0, help="TrafficRoutes, spread over the Services (0)"
    )
    parser.add_argument("--check", action="store_true", help="compare with a fresh build")
    parser.add_argument(
        "--scoped",
        action="store_true",
        help=f"every {SCOPED_EVERY}th Service is exported to its own namespace only, so "
        "the sidecars of every other namespace have a scope",
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    heap.tune_malloc()  # as `shoal serve` does
    r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(asdict(r)))
    else:
        _report(r)
    return 0 if r.checked in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
