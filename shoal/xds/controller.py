"""Debounced rebuilds: mesh state in, checked snapshots out to the cache.

The one module that joins the model, translation and the cache. Translation
is memoized per Service, so a change costs translation and serialization of
what changed only; every proxy then shares the same Resource objects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from shoal.model import mesh, problems, proxy
from shoal.xds import cache, node, resources
from shoal.xds.translate import clusters, endpoints, names, refs, sidecar

log = logging.getLogger(__name__)


def _resource(type_url: str, name: str, message: Message) -> cache.Resource:
    return cache.Resource.from_message(type_url, name, message, refs.of(message))


class Debouncer:
    """Waits for `quiet` seconds without a change, but never more than
    `max_delay` after the first change of a burst."""

    def __init__(
        self,
        quiet: float,
        max_delay: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.quiet = quiet
        self.max_delay = max_delay
        self._clock = clock
        self._sleep = sleep
        self._first: float | None = None
        self._last = 0.0
        self._event = asyncio.Event()

    def touch(self) -> None:
        now = self._clock()
        if self._first is None:
            self._first = now
        self._last = now
        self._event.set()

    async def settled(self) -> None:
        """Return once a burst of changes has settled."""
        await self._event.wait()
        while True:
            assert self._first is not None
            now = self._clock()
            due = min(self._last + self.quiet, self._first + self.max_delay)
            if now >= due:
                break
            await self._sleep(due - now)
        self._first = None
        self._event.clear()


@dataclass(frozen=True)
class Shared:
    """What every proxy gets from one mesh state, built once per rebuild."""

    state: mesh.MeshState
    services: tuple[mesh.Service, ...]
    clusters: cache.ResourceGroup
    endpoints: cache.ResourceGroup
    # Whether the shared groups' own references resolve among themselves;
    # checked once, so a proxy's check costs its own resources only.
    whole: bool
    # Ids of groups (shared, or shared by a namespace) known to resolve.
    verified: set[int]


class Controller:
    def __init__(self, snapshots: cache.SnapshotCache, debouncer: Debouncer) -> None:
        self._cache = snapshots
        self._debouncer = debouncer
        self._state = mesh.MeshState()
        self._sidecars: dict[str, proxy.Sidecar] = {}
        self._service_memo: dict[mesh.Service, list[cache.Resource]] = {}
        self._endpoint_memo: dict[
            tuple[mesh.ServiceKey, mesh.Port, tuple[mesh.Endpoint, ...]], cache.Resource
        ] = {}
        self._own_memo: dict[
            tuple[proxy.Sidecar, mesh.Protocol], tuple[cache.ResourceGroup, cache.ResourceGroup]
        ] = {}
        self._route_memo: dict[str, tuple[tuple[mesh.Service, ...], cache.ResourceGroup]] = {}
        self._shared: Shared | None = None
        self.problems: list[problems.Problem] = []
        self.builds = 0
        snapshots.on_watch = self._on_watch
        snapshots.on_idle = self._on_idle

    @staticmethod
    def key_of(n: Any) -> str:
        return node.key(node.sidecar(n))

    @property
    def state(self) -> mesh.MeshState:
        return self._state

    def update(self, state: mesh.MeshState) -> None:
        """A new mesh state; pushed after the debounce."""
        self._state = state
        self._debouncer.touch()

    async def run(self) -> None:
        while True:
            await self._debouncer.settled()
            try:
                self.rebuild()
            except Exception:
                log.exception("rebuild of mesh version %d failed", self._state.version)

    # -- proxies coming and going -------------------------------------------

    def _on_watch(self, key: str, n: Any) -> None:
        if key in self._sidecars:
            return
        self._sidecars[key] = node.sidecar(n)
        if self._shared is None or self._shared.state is not self._state:
            self._shared = self._build_shared(self._state)
        self._publish(key, self._sidecars[key], self._shared)

    def _on_idle(self, key: str) -> None:
        gone = self._sidecars.pop(key, None)
        for memo_key in [k for k in self._own_memo if k[0] == gone]:
            del self._own_memo[memo_key]
        self._cache.clear_snapshot(key)

    # -- building -------------------------------------------------------------

    def rebuild(self) -> None:
        state = self._state
        started = time.perf_counter()
        shared = self._build_shared(state)
        self._shared = shared
        self.problems = []
        if not shared.whole:
            return
        for key, s in self._sidecars.items():
            self._publish(key, s, shared)
        self.builds += 1
        log.info(
            "mesh version %d: %d services, %d proxies, built in %.1f ms",
            state.version,
            len(state.services),
            len(self._sidecars),
            (time.perf_counter() - started) * 1000,
        )

    def _build_shared(self, state: mesh.MeshState) -> Shared:
        service_memo: dict[mesh.Service, list[cache.Resource]] = {}
        endpoint_memo: dict[
            tuple[mesh.ServiceKey, mesh.Port, tuple[mesh.Endpoint, ...]], cache.Resource
        ] = {}
        cds: list[cache.Resource] = []
        eds: list[cache.Resource] = []
        services = tuple(state.sorted_services())
        for svc in services:
            built = self._service_memo.get(svc)
            if built is None:
                built = [
                    _resource(resources.CLUSTER, c.name, c)
                    for c in clusters.outbound_for_service(svc)
                ]
            service_memo[svc] = built
            cds.extend(built)
            for port in svc.ports:
                key = (svc.key, port, state.endpoints_of(svc.key, port))
                assigned = self._endpoint_memo.get(key)
                if assigned is None:
                    cla = endpoints.load_assignment(names.outbound_cluster(svc.key, port), key[2])
                    assigned = _resource(resources.ENDPOINT, cla.cluster_name, cla)
                endpoint_memo[key] = assigned
                eds.append(assigned)
        # Only what the current state uses is remembered, so memory follows
        # the mesh, not its history.
        self._service_memo = service_memo
        self._endpoint_memo = endpoint_memo
        cds_group, eds_group = cache.ResourceGroup(cds), cache.ResourceGroup(eds)
        only_shared = cache.Snapshot(
            {resources.CLUSTER: (cds_group,), resources.ENDPOINT: (eds_group,)}
        )
        whole = self._check(f"mesh version {state.version}", only_shared, skip=frozenset())
        return Shared(state, services, cds_group, eds_group, whole, {id(cds_group), id(eds_group)})

    def _routes_for(self, namespace: str, shared: Shared) -> cache.ResourceGroup:
        """The outbound routes of a namespace, shared by its proxies and
        checked against the shared clusters once."""
        memo = self._route_memo.get(namespace)
        if memo is None or not (memo[0] is shared.services or memo[0] == shared.services):
            config = sidecar.outbound_routes(namespace, shared.services)
            group = cache.ResourceGroup([_resource(resources.ROUTE, config.name, config)])
            memo = self._route_memo[namespace] = (shared.services, group)
        group = memo[1]
        if id(group) not in shared.verified:
            routes_only = cache.Snapshot(
                {resources.CLUSTER: (shared.clusters,), resources.ROUTE: (group,)}
            )
            if not unresolved(routes_only, frozenset({id(shared.clusters)})):
                shared.verified.add(id(group))
        return group

    def _publish(self, key: str, s: proxy.Sidecar, shared: Shared) -> None:
        own_clusters, own_listeners = self._own_groups(s, shared.state)
        snapshot = cache.Snapshot(
            groups={
                resources.CLUSTER: (shared.clusters, own_clusters),
                resources.ENDPOINT: (shared.endpoints,),
                resources.LISTENER: (own_listeners,),
                resources.ROUTE: (self._routes_for(s.namespace, shared),),
            },
            label=f"mesh version {shared.state.version}",
        )
        if self._check(key, snapshot, skip=frozenset(shared.verified)):
            self._cache.set_snapshot(key, snapshot)

    def _own_groups(
        self, s: proxy.Sidecar, state: mesh.MeshState
    ) -> tuple[cache.ResourceGroup, cache.ResourceGroup]:
        """A sidecar's inbound cluster and listeners: they change only with
        the sidecar itself or its Service's protocol."""
        memo_key = (s, sidecar.inbound_protocol(s, state))
        found = self._own_memo.get(memo_key)
        if found is None:
            found = (
                cache.ResourceGroup(
                    _resource(resources.CLUSTER, c.name, c) for c in sidecar.own_clusters(s, state)
                ),
                cache.ResourceGroup(
                    _resource(resources.LISTENER, item.name, item)
                    for item in sidecar.own_listeners(s, state)
                ),
            )
            self._own_memo[memo_key] = found
        return found

    def publish(self, key: str, snapshot: cache.Snapshot) -> bool:
        """Hand a snapshot to the cache if it is whole; else keep the last one."""
        if not self._check(key, snapshot, skip=frozenset()):
            return False
        self._cache.set_snapshot(key, snapshot)
        return True

    def _check(self, subject: str, snapshot: cache.Snapshot, skip: frozenset[int]) -> bool:
        missing = unresolved(snapshot, skip)
        if not missing:
            return True
        reason = "refers to missing " + ", ".join(
            f"{resources.short(t)} {n}" for t, n in missing[:5]
        )
        self.problems.append(problems.Problem("translation", subject, reason))
        log.error("not publishing %s: %s; proxies keep their last config", subject, reason)
        return False


def unresolved(
    snapshot: cache.Snapshot, skip: frozenset[int] = frozenset()
) -> list[tuple[str, str]]:
    """Every reference in the snapshot that names nothing in it, leaving out
    groups (by id) already known to resolve."""
    missing: set[tuple[str, str]] = set()
    for groups in snapshot.groups.values():
        for group in groups:
            if id(group) in skip:
                continue
            for r in group:
                for ref in r.refs:
                    if snapshot.get(*ref) is None:
                        missing.add(ref)
    return sorted(missing)
