"""Translation benchmark: a full build, then a push after one endpoint changes.

Builds `MeshState` objects directly (no registry), drives the real
`Controller` and `SnapshotCache`, and registers simulated proxies through the
cache's public watch path. For each mesh size and proxy count it measures:

* the first full build (translate and serialize everything),
* a rebuild after one endpoint of one Service changes address,
* the serializations during that rebuild (`cache.serialization_count()`),
  against the number of resources whose content changed.

A push should cost one serialization per changed resource, whatever the
number of proxies; the script exits 1 when it does not.

    .venv/bin/python bench/translate.py [--json] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import platform
import pstats
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from shoal.model import mesh
from shoal.xds import cache, controller, debounce, node

NAMESPACES = 10
ENDPOINTS_PER_SERVICE = 10
PUSHES = 3
FIRST_OUTBOUND_PORT = 15001


@dataclass
class Run:
    services: int
    proxies: int
    first_build_s: float = 0.0
    first_build_serializations: int = 0
    push_s: list[float] = field(default_factory=list)
    push_serializations: list[int] = field(default_factory=list)
    push_changed_resources: list[int] = field(default_factory=list)
    push_reached_proxies: list[int] = field(default_factory=list)

    @property
    def push_median_s(self) -> float:
        return statistics.median(self.push_s)

    @property
    def ok(self) -> bool:
        return all(
            s == c
            for s, c in zip(self.push_serializations, self.push_changed_resources, strict=True)
        ) and all(n == self.proxies for n in self.push_reached_proxies)


# -- the mesh -----------------------------------------------------------------


def _address(index: int) -> str:
    return f"10.{index >> 16 & 0xFF}.{index >> 8 & 0xFF}.{index & 0xFF}"


def _service_key(i: int) -> mesh.ServiceKey:
    return mesh.ServiceKey(f"ns{i % NAMESPACES}", f"svc{i}")


def build_state(services: int) -> mesh.MeshState:
    """`services` Services on one port 80 "http", each with ready endpoints."""
    port = mesh.Port(80, "http")
    by_key: dict[mesh.ServiceKey, mesh.Service] = {}
    eps: dict[mesh.ServiceKey, tuple[mesh.Endpoint, ...]] = {}
    for i in range(services):
        key = _service_key(i)
        by_key[key] = mesh.Service(key.namespace, key.name, (port,))
        eps[key] = tuple(
            mesh.Endpoint(
                _address(i * ENDPOINTS_PER_SERVICE + k), 8080, "http", pod=f"{key.name}-{k}"
            )
            for k in range(ENDPOINTS_PER_SERVICE)
        )
    return mesh.MeshState(
        version=1,
        services=by_key,
        endpoints=eps,
        namespaces={f"ns{n}": mesh.Namespace(f"ns{n}") for n in range(NAMESPACES)},
    )


def move_one_endpoint(state: mesh.MeshState, key: mesh.ServiceKey) -> mesh.MeshState:
    """The next version: the first endpoint of `key` moves to a new address."""
    old = state.endpoints[key]
    moved = old[0]
    # 172.16/12 never collides with the 10/8 addresses build_state hands out.
    address = f"172.16.{state.version >> 8 & 0xFF}.{state.version & 0xFF}"
    endpoints = dict(state.endpoints)
    endpoints[key] = (mesh.Endpoint(address, moved.port, moved.port_name, pod=moved.pod), *old[1:])
    return mesh.MeshState(
        version=state.version + 1,
        services=state.services,
        endpoints=endpoints,
        namespaces=state.namespaces,
        service_accounts=state.service_accounts,
    )


# -- proxies ------------------------------------------------------------------


def proxy_node(i: int) -> base_pb2.Node:
    """A sidecar of Service i; distinct outbound ports give distinct snapshot keys."""
    key = _service_key(i)
    return sidecar_node(i, key.namespace, key.name)


def sidecar_node(i: int, namespace: str, name: str) -> base_pb2.Node:
    """Sidecar number i, of Service `name` in `namespace`, with outbound
    port FIRST_OUTBOUND_PORT + i (bench/ingest.py uses it too)."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            node.NAMESPACE: namespace,
            node.SERVICE: name,
            node.SERVICE_ACCOUNT: "default",
            node.APP_PORT: 8080,
            node.INBOUND_PORT: 15006,
            node.OUTBOUND_PORT: FIRST_OUTBOUND_PORT + i,
            node.INBOUND_ADDRESS: "127.0.0.1",
        }
    )
    return base_pb2.Node(id=f"bench-{i}", cluster=f"{name}.{namespace}", metadata=metadata)


def content(snapshots: cache.SnapshotCache) -> set[tuple[str, str, str]]:
    """(type, name, version) of every resource in the snapshot of every watched
    key; a group shared by many snapshots is read once."""
    seen: set[int] = set()
    out: set[tuple[str, str, str]] = set()
    for key in snapshots.watched_keys():
        snapshot = snapshots.get(key)
        assert snapshot is not None
        for type_url, groups in snapshot.groups.items():
            for group in groups:
                if id(group) in seen:
                    continue
                seen.add(id(group))
                out.update((type_url, r.name, r.version) for r in group)
    return out


def changed_resources(before: set[tuple[str, str, str]], after: set[tuple[str, str, str]]) -> int:
    """Resources added, removed or with new content."""
    return len({(t, n) for t, n, _ in before ^ after})


# -- the benchmark ------------------------------------------------------------


def _timed_rebuild(
    ctl: controller.Controller,
    state: mesh.MeshState,
    profile: cProfile.Profile | None = None,
) -> tuple[float, int]:
    """Seconds and serializations of `update` then `rebuild`."""
    gc.collect()
    count = cache.serialization_count()
    if profile is not None:
        profile.enable()
    started = time.perf_counter()
    ctl.update(state)
    ctl.rebuild()
    elapsed = time.perf_counter() - started
    if profile is not None:
        profile.disable()
    return elapsed, cache.serialization_count() - count


async def run(services: int, proxies: int, profile: cProfile.Profile | None) -> Run:
    result = Run(services, proxies)
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.1, 1.0))

    # Proxies connect first (to an empty mesh), as a server's streams would.
    events = [asyncio.Event() for _ in range(proxies)]
    watches = [snapshots.watch(cache.Client(proxy_node(i)), e) for i, e in enumerate(events)]
    if len(set(snapshots.watched_keys())) != proxies:
        raise SystemExit("proxies do not have distinct snapshot keys")
    for e in events:
        e.clear()

    state = build_state(services)
    result.first_build_s, result.first_build_serializations = _timed_rebuild(ctl, state)
    if not all(e.is_set() for e in events):
        raise SystemExit("a proxy was not told of the first build")

    for n in range(PUSHES):
        for e in events:
            e.clear()
        before = content(snapshots)
        # One Service at the start, middle and end of the sorted order.
        target = sorted(state.services)[n * (services - 1) // max(PUSHES - 1, 1)]
        state = move_one_endpoint(state, target)
        elapsed, serialized = _timed_rebuild(ctl, state, profile)
        result.push_s.append(elapsed)
        result.push_serializations.append(serialized)
        result.push_changed_resources.append(changed_resources(before, content(snapshots)))
        result.push_reached_proxies.append(sum(e.is_set() for e in events))

    for w in watches:
        snapshots.cancel(w)
    return result


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--sizes", default="1000,10000", help="comma-separated Service counts (1000,10000)"
    )
    parser.add_argument("--proxies", default="3,100", help="comma-separated proxy counts (3,100)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the one-endpoint pushes of the largest size; top functions to stderr",
    )
    return parser.parse_args(argv)


def _report(runs: list[Run]) -> None:
    print(
        f"{'services':>8} {'proxies':>7} {'first build s':>13} {'first ser.':>10} "
        f"{'push s (median)':>15} {'push ser.':>9} {'changed':>7} {'ok':>3}"
    )
    for r in runs:
        print(
            f"{r.services:>8} {r.proxies:>7} {r.first_build_s:>13.3f} "
            f"{r.first_build_serializations:>10} {r.push_median_s:>15.3f} "
            f"{max(r.push_serializations):>9} {max(r.push_changed_resources):>7} "
            f"{'yes' if r.ok else 'NO':>3}"
        )
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


async def _main(args: argparse.Namespace) -> list[Run]:
    sizes = [int(s) for s in args.sizes.split(",")]
    proxy_counts = [int(p) for p in args.proxies.split(",")]
    runs: list[Run] = []
    for services in sizes:
        for proxies in proxy_counts:
            profile = cProfile.Profile() if args.profile and services == max(sizes) else None
            runs.append(await run(services, proxies, profile))
            if profile is not None:
                print_profile(profile, f"{services} services, {proxies} proxies")
    return runs


def print_profile(profile: cProfile.Profile, title: str, most: int = 25) -> None:
    """The `most` costliest calls, by cumulative and by own time, on stderr."""
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("cumulative").print_stats(most)
    stats.sort_stats("tottime").print_stats(most * 2 // 3)
    print(f"== profile: {title} ==", file=sys.stderr)
    print(out.getvalue(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    runs = asyncio.run(_main(args))
    ok = all(r.ok for r in runs)
    if args.json:
        print(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "endpoints_per_service": ENDPOINTS_PER_SERVICE,
                    "runs": [
                        {**asdict(r), "push_median_s": r.push_median_s, "ok": r.ok} for r in runs
                    ],
                    "peak_rss_mib": round(peak_rss_mib(), 1),
                    "ok": ok,
                }
            )
        )
    else:
        _report(runs)
    if not ok:
        print(
            "FAIL: a one-endpoint push serialized more (or fewer) resources than changed, "
            "or did not reach every proxy",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
