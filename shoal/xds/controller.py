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
        self._route_memo: dict[str, tuple[tuple[mesh.Service, ...], cache.Resource]] = {}
        self._shared: tuple[cache.ResourceGroup, cache.ResourceGroup] | None = None
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
        shared = self._shared or self._build_shared(self._state)
        self._publish(key, self._sidecars[key], self._state, shared)

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
        for key, s in self._sidecars.items():
            self._publish(key, s, state, shared)
        self.builds += 1
        log.info(
            "mesh version %d: %d services, %d proxies, built in %.1f ms",
            state.version,
            len(state.services),
            len(self._sidecars),
            (time.perf_counter() - started) * 1000,
        )

    def _build_shared(
        self, state: mesh.MeshState
    ) -> tuple[cache.ResourceGroup, cache.ResourceGroup]:
        service_memo: dict[mesh.Service, list[cache.Resource]] = {}
        endpoint_memo: dict[
            tuple[mesh.ServiceKey, mesh.Port, tuple[mesh.Endpoint, ...]], cache.Resource
        ] = {}
        cds: list[cache.Resource] = []
        eds: list[cache.Resource] = []
        for svc in state.sorted_services():
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
        return cache.ResourceGroup(cds), cache.ResourceGroup(eds)

    def _routes_for(self, namespace: str, state: mesh.MeshState) -> cache.Resource:
        services = tuple(state.sorted_services())
        memo = self._route_memo.get(namespace)
        if memo is not None and memo[0] == services:
            return memo[1]
        config = sidecar.outbound_routes(namespace, state)
        built = _resource(resources.ROUTE, config.name, config)
        self._route_memo[namespace] = (services, built)
        return built

    def _publish(
        self,
        key: str,
        s: proxy.Sidecar,
        state: mesh.MeshState,
        shared: tuple[cache.ResourceGroup, cache.ResourceGroup],
    ) -> None:
        shared_clusters, shared_endpoints = shared
        own_clusters, own_listeners = self._own_groups(s, state)
        snapshot = cache.Snapshot(
            groups={
                resources.CLUSTER: (shared_clusters, own_clusters),
                resources.ENDPOINT: (shared_endpoints,),
                resources.LISTENER: (own_listeners,),
                resources.ROUTE: (cache.ResourceGroup([self._routes_for(s.namespace, state)]),),
            },
            label=f"mesh version {state.version}",
        )
        self.publish(key, snapshot)

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
        missing = unresolved(snapshot)
        if missing:
            reason = "refers to missing " + ", ".join(
                f"{resources.short(t)} {n}" for t, n in missing[:5]
            )
            problem = problems.Problem("translation", f"proxy config {key}", reason)
            self.problems.append(problem)
            log.error("not publishing %s: %s; proxies keep their last config", key, reason)
            return False
        self._cache.set_snapshot(key, snapshot)
        return True


def unresolved(snapshot: cache.Snapshot) -> list[tuple[str, str]]:
    """Every reference in the snapshot that names nothing in it."""
    missing: list[tuple[str, str]] = []
    for type_url in resources.PUSH_ORDER:
        for r in snapshot.resources(type_url):
            for ref_type, ref_name in r.refs:
                if snapshot.get(ref_type, ref_name) is None:
                    missing.append((ref_type, ref_name))
    return sorted(set(missing))
