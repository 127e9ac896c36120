"""Gateway API benchmark: HTTPRoutes through the registry, translation and a push.

Builds a mesh from Kubernetes-shaped objects (Namespaces, Services,
EndpointSlices, and optionally HTTPRoutes) fed to `store.ObjectStore` as the
manifests folder and the Kubernetes watch feed it, then drives the real
`Controller` and `SnapshotCache` with simulated sidecars registered through
the cache's public watch path (as bench/translate.py does). For each mesh
size it measures:

* the registry build (`ObjectStore.build()` of a fresh store) without routes
  and with one producer HTTPRoute per Service plus one consumer HTTPRoute
  per namespace,
* the controller's first full build of each of those two states,
* a rebuild with nothing changed (one HTTPRoute put again as it was): the
  registry build and the controller rebuild, which should serialize nothing,
* a push after one producer HTTPRoute's default weights go from 90/10 to
  80/20: the registry build and the controller rebuild, the messages
  encoded, and the resources whose content changed.

A route table is assembled from each Service's encoded virtual hosts, so a
push should encode, per changed table, the changed Service's virtual hosts
and at most those of the one route that names it as a backend (its hosts
carry that Service's ports), whatever the mesh's size; and only route tables
should change. The script exits 1 when either does not hold (or when the
unchanged rebuild encodes anything, or the registry reports a problem).

    .venv/bin/python bench/gateway.py [--json] [--sizes 100,1000] [--proxies 100]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import translate  # the sibling benchmark: the same mesh naming and proxies

from shoal.model import mesh
from shoal.registry import manifests, store
from shoal.xds import cache, controller, debounce

NAMESPACES = 10
ENDPOINTS_PER_SERVICE = 3
CONSUMER_PARENTS = 3  # Services each namespace's consumer route attaches to
REGISTRY_REPS = 5
BUILD_REPS = 3
PUSHES = 3
# Per changed table: the changed Service's virtual hosts, and those of the
# one producer route that names it (Service i - NAMESPACES's, its partner).
PUSH_ENCODES_PER_TABLE = 2
FIRST_OUTBOUND_PORT = 15001
SOURCE = "bench"


@dataclass
class Run:
    services: int
    proxies: int
    producer_routes: int = 0
    consumer_routes: int = 0
    registry_s: list[float] = field(default_factory=list)
    registry_routes_s: list[float] = field(default_factory=list)
    build_s: list[float] = field(default_factory=list)
    build_serializations: int = 0
    build_routes_s: list[float] = field(default_factory=list)
    build_routes_serializations: int = 0
    # A rebuild with nothing changed (one route put again as it was): what
    # any push of this mesh costs before translating what changed.
    same_registry_s: float = 0.0
    same_controller_s: float = 0.0
    same_serializations: int = 0
    push_registry_s: list[float] = field(default_factory=list)
    push_controller_s: list[float] = field(default_factory=list)
    push_serializations: list[int] = field(default_factory=list)
    push_changed_resources: list[int] = field(default_factory=list)
    push_changed_types: list[dict[str, int]] = field(default_factory=list)
    push_reached_proxies: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def median_ms(self, values: list[float]) -> float:
        return statistics.median(values) * 1000

    @property
    def only_routes_changed(self) -> bool:
        return all(set(t) == {"RouteConfiguration"} for t in self.push_changed_types)

    @property
    def ok(self) -> bool:
        return (
            not self.problems
            and self.same_serializations == 0
            and all(
                c <= s <= PUSH_ENCODES_PER_TABLE * c
                for s, c in zip(self.push_serializations, self.push_changed_resources, strict=True)
            )
            and self.only_routes_changed
            and all(n == self.proxies for n in self.push_reached_proxies)
        )

    def summary(self) -> dict[str, Any]:
        return {
            "registry_ms": round(self.median_ms(self.registry_s), 2),
            "registry_routes_ms": round(self.median_ms(self.registry_routes_s), 2),
            "build_median_s": round(statistics.median(self.build_s), 4),
            "build_routes_median_s": round(statistics.median(self.build_routes_s), 4),
            "same_registry_ms": round(self.same_registry_s * 1000, 2),
            "same_controller_ms": round(self.same_controller_s * 1000, 2),
            "push_registry_ms": round(self.median_ms(self.push_registry_s), 2),
            "push_controller_ms": round(self.median_ms(self.push_controller_s), 2),
            "push_total_ms": round(
                statistics.median(
                    r + c for r, c in zip(self.push_registry_s, self.push_controller_s, strict=True)
                )
                * 1000,
                2,
            ),
        }


# -- the mesh, as Kubernetes objects -------------------------------------------


def _ns(i: int) -> str:
    return f"ns{i % NAMESPACES}"


def _partner(i: int, services: int) -> int:
    """The "v2" Service of Service i: the next one in its namespace."""
    return (i + NAMESPACES) % services


def service_doc(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc{i}", "namespace": _ns(i)},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def slice_doc(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc{i}-abcde",
            "namespace": _ns(i),
            "labels": {manifests.SERVICE_NAME_LABEL: f"svc{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {
                "addresses": [translate._address(i * ENDPOINTS_PER_SERVICE + k)],
                "conditions": {"ready": True},
            }
            for k in range(ENDPOINTS_PER_SERVICE)
        ],
    }


def producer_route_doc(i: int, services: int, weights: tuple[int, int] = (90, 10)) -> dict:
    """Service i's own route: a header match to its partner, a PathPrefix with
    a RequestHeaderModifier, an Exact path with a URLRewrite, and a weighted
    default split between it and its partner."""
    me, other = f"svc{i}", f"svc{_partner(i, services)}"
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": me,
            "namespace": _ns(i),
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": me, "port": 80}],
            "rules": [
                {
                    "name": "canary",
                    "matches": [{"headers": [{"name": "x-canary", "value": "true"}]}],
                    "backendRefs": [{"name": other, "port": 80}],
                },
                {
                    "name": "api",
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [{"name": "x-route", "value": "api"}]},
                        }
                    ],
                    "backendRefs": [{"name": me, "port": 80}],
                },
                {
                    "name": "legacy",
                    "matches": [{"path": {"type": "Exact", "value": "/legacy"}}],
                    "filters": [
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/v2/legacy"}
                            },
                        }
                    ],
                    "backendRefs": [{"name": me, "port": 80}],
                },
                {
                    "name": "default",
                    "backendRefs": [
                        {"name": me, "port": 80, "weight": weights[0]},
                        {"name": other, "port": 80, "weight": weights[1]},
                    ],
                },
            ],
        },
    }


def consumer_parents(n: int) -> list[int]:
    """The Services namespace n's consumer route attaches to: the first
    CONSUMER_PARENTS Services of the next namespace."""
    return [(n + 1) % NAMESPACES + NAMESPACES * k for k in range(CONSUMER_PARENTS)]


def consumer_route_doc(n: int) -> dict[str, Any]:
    """Callers in namespace n: calls to a few Services of the next namespace
    get a 5 s timeout and go to the first of them."""
    parents = consumer_parents(n)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": "consumer",
            "namespace": f"ns{n}",
            "creationTimestamp": "2026-01-02T00:00:00Z",
        },
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": f"svc{p}", "namespace": _ns(p)}
                for p in parents
            ],
            "rules": [
                {
                    "timeouts": {"request": "5s"},
                    "backendRefs": [
                        {"name": f"svc{parents[0]}", "namespace": _ns(parents[0]), "port": 80}
                    ],
                }
            ],
        },
    }


def _sourced(doc: dict[str, Any]) -> store.Sourced:
    obj = manifests.parse_object(doc)
    assert obj is not None
    return store.Sourced(obj, SOURCE)


def mesh_objects(services: int, routes: bool) -> list[store.Sourced]:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns{n}"}}
        for n in range(NAMESPACES)
    ]
    for i in range(services):
        docs += [service_doc(i), slice_doc(i)]
    if routes:
        docs += [producer_route_doc(i, services) for i in range(services)]
        docs += [consumer_route_doc(n) for n in range(NAMESPACES)]
    return [_sourced(d) for d in docs]


# -- proxies (as bench/translate.py) -------------------------------------------


def changed(
    before: set[tuple[str, str, str]], after: set[tuple[str, str, str]]
) -> set[tuple[str, str, str]]:
    """Resources with new content, and those removed.

    Counted by content (type, name, version), not by (type, name) as
    bench/translate.py does: every namespace's outbound route table is
    named `outbound`, so ten changed tables would count as one."""
    names = {(t, n) for t, n, _ in after}
    removed = {(t, n, "") for t, n, _ in before - after if (t, n) not in names}
    return (after - before) | removed


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


# -- the benchmark -------------------------------------------------------------


def _timed(step: Callable[[], object]) -> tuple[float, int]:
    """Seconds and serializations of one step, after a collection."""
    gc.collect()
    count = cache.serialization_count()
    started = time.perf_counter()
    step()
    return time.perf_counter() - started, cache.serialization_count() - count


def registry_build(items: list[store.Sourced]) -> tuple[float, store.ObjectStore, Any, list]:
    """A fresh store's first build of `items`: seconds, store, state, problems."""
    objects = store.ObjectStore()
    objects.replace_source(SOURCE, items)
    out: list[Any] = []
    seconds, _ = _timed(lambda: out.extend(objects.build()))
    state, found = out
    return seconds, objects, state, found


def registry_push(
    objects: store.ObjectStore, item: store.Sourced
) -> tuple[float, mesh.MeshState, list]:
    """One object replaced (as a watch event does), then a build: seconds,
    state, problems."""
    out: list[Any] = []

    def step() -> None:
        objects.put(SOURCE, item)
        out.extend(objects.build())

    seconds, _ = _timed(step)
    state, found = out
    return seconds, state, found


class Sidecars:
    """A cache, a controller and `proxies` sidecars watching, before any mesh."""

    def __init__(self, proxies: int) -> None:
        self.snapshots = cache.SnapshotCache(controller.Controller.key_of)
        self.ctl = controller.Controller(self.snapshots, debounce.Debouncer(0.1, 1.0))
        self.events = [asyncio.Event() for _ in range(proxies)]
        self.watches = [
            self.snapshots.watch(cache.Client(translate.proxy_node(i)), e)
            for i, e in enumerate(self.events)
        ]
        if len(set(self.snapshots.watched_keys())) != proxies:
            raise SystemExit("proxies do not have distinct snapshot keys")
        self.clear()

    def clear(self) -> None:
        for e in self.events:
            e.clear()

    def reached(self) -> int:
        return sum(e.is_set() for e in self.events)

    def rebuild(self, state: mesh.MeshState) -> tuple[float, int]:
        def step() -> None:
            self.ctl.update(state)
            self.ctl.rebuild()

        return _timed(step)

    def close(self) -> None:
        for w in self.watches:
            self.snapshots.cancel(w)


async def run(services: int, proxies: int) -> Run:
    if services % NAMESPACES or services < NAMESPACES * CONSUMER_PARENTS or proxies > services:
        raise SystemExit(
            f"--sizes must be multiples of {NAMESPACES}, at least "
            f"{NAMESPACES * CONSUMER_PARENTS}, and no fewer than the proxies"
        )
    result = Run(services, proxies)
    plain = mesh_objects(services, routes=False)
    routed = mesh_objects(services, routes=True)

    # (1) The registry: a fresh store's build, REGISTRY_REPS times each.
    for _ in range(REGISTRY_REPS):
        seconds, _, plain_state, found = registry_build(plain)
        result.registry_s.append(seconds)
        result.problems += [str(p) for p in found]
        seconds, objects, routed_state, found = registry_build(routed)
        result.registry_routes_s.append(seconds)
        result.problems += [str(p) for p in found]
    attached = [r for r in routed_state.routes.values() if r.attached]
    result.producer_routes = sum(1 for r in attached for a in r.attached if a.consumer is None)
    result.consumer_routes = len(
        {a.origin for r in attached for a in r.attached if a.consumer is not None}
    )
    if result.producer_routes != services or result.consumer_routes != NAMESPACES:
        result.problems.append(
            f"{result.producer_routes} producer and {result.consumer_routes} consumer "
            "routes attached"
        )

    # (2) The controller's first build, BUILD_REPS times, with fresh proxies.
    for rep in range(BUILD_REPS):
        sidecars = Sidecars(proxies)
        seconds, result.build_serializations = sidecars.rebuild(plain_state)
        result.build_s.append(seconds)
        sidecars.close()
        sidecars = Sidecars(proxies)
        seconds, result.build_routes_serializations = sidecars.rebuild(routed_state)
        result.build_routes_s.append(seconds)
        if sidecars.reached() != proxies:
            raise SystemExit("a proxy was not told of the first build")
        if rep != BUILD_REPS - 1:
            sidecars.close()

    # (3) A rebuild with nothing changed, then pushes: one producer route's
    # default split goes 90/10 -> 80/20. The targets are no consumer route's
    # parents, so every namespace's table (each holds the target) changes.
    same = _sourced(producer_route_doc(services - 1, services))
    result.same_registry_s, state, found = registry_push(objects, same)
    result.problems += [str(p) for p in found]
    result.same_controller_s, result.same_serializations = sidecars.rebuild(state)
    targets = [
        NAMESPACES * CONSUMER_PARENTS + 5,
        services // 2 + 7 if services // 2 + 7 < services else services - 2,
        services - 1,
    ][:PUSHES]
    for target in targets:
        sidecars.clear()
        before = translate.content(sidecars.snapshots)
        new = _sourced(producer_route_doc(target, services, weights=(80, 20)))
        registry_s, state, found = registry_push(objects, new)
        result.problems += [str(p) for p in found]
        controller_s, serialized = sidecars.rebuild(state)
        diff = changed(before, translate.content(sidecars.snapshots))
        result.push_registry_s.append(registry_s)
        result.push_controller_s.append(controller_s)
        result.push_serializations.append(serialized)
        result.push_changed_resources.append(len(diff))
        result.push_changed_types.append(dict(collections.Counter(_short(t) for t, _, _ in diff)))
        result.push_reached_proxies.append(sidecars.reached())
    sidecars.close()
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--sizes", default="100,1000", help="comma-separated Service counts (100,1000)"
    )
    parser.add_argument("--proxies", type=int, default=100, help="sidecars watching (100)")
    return parser.parse_args(argv)


def _types(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "none"


def _report(runs: list[Run]) -> None:
    print(
        f"{'services':>8} {'proxies':>7} {'registry ms':>11} {'+routes ms':>10} {'diff ms':>8} "
        f"{'build s':>8} {'ser.':>6} {'+routes s':>9} {'ser.':>6}"
    )
    for r in runs:
        s = r.summary()
        print(
            f"{r.services:>8} {r.proxies:>7} {s['registry_ms']:>11.1f} "
            f"{s['registry_routes_ms']:>10.1f} "
            f"{s['registry_routes_ms'] - s['registry_ms']:>8.1f} "
            f"{s['build_median_s']:>8.3f} {r.build_serializations:>6} "
            f"{s['build_routes_median_s']:>9.3f} {r.build_routes_serializations:>6}"
        )
    print()
    print(
        f"{'services':>8} {'same: registry ms':>17} {'controller ms':>13} {'ser.':>4} "
        f"{'push: registry ms':>17} {'controller ms':>13} {'total ms':>8} "
        f"{'ser.':>4} {'changed':>7}  {'ok':>3}  changed resources"
    )
    for r in runs:
        s = r.summary()
        print(
            f"{r.services:>8} {s['same_registry_ms']:>17.1f} {s['same_controller_ms']:>13.1f} "
            f"{r.same_serializations:>4} {s['push_registry_ms']:>17.1f} "
            f"{s['push_controller_ms']:>13.1f} {s['push_total_ms']:>8.1f} "
            f"{max(r.push_serializations):>4} {max(r.push_changed_resources):>7}  "
            f"{'yes' if r.ok else 'NO':>3}  {_types(r.push_changed_types[-1])}"
        )
    for r in runs:
        for p in r.problems[:5]:
            print(f"problem ({r.services} services): {p}")
    print(f"peak RSS: {translate.peak_rss_mib():.0f} MiB")


async def _main(args: argparse.Namespace) -> list[Run]:
    return [await run(int(s), args.proxies) for s in args.sizes.split(",")]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    runs = asyncio.run(_main(args))
    ok = all(r.ok for r in runs)
    if args.json:
        print(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "namespaces": NAMESPACES,
                    "endpoints_per_service": ENDPOINTS_PER_SERVICE,
                    "runs": [{**asdict(r), **r.summary(), "ok": r.ok} for r in runs],
                    "peak_rss_mib": round(translate.peak_rss_mib(), 1),
                    "ok": ok,
                }
            )
        )
    else:
        _report(runs)
    if not ok:
        print(
            "FAIL: a route push encoded more than the changed Service's virtual hosts and "
            "those of the route naming it per changed table (or fewer than one per table), "
            "changed more than route tables or did not reach every proxy, an unchanged "
            "rebuild encoded something, or the registry reported problems",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
