"""Debounced rebuilds: mesh state in, checked snapshots out to the cache.

The one module that joins the model, translation and the cache. Translation
is memoized per Service, so a change costs translation and serialization of
what changed only; every proxy then shares the same Resource objects.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from google.protobuf.message import Message

from shoal.model import mesh, problems, proxy, scope
from shoal.xds import cache, node, resources
from shoal.xds.translate import (
    capture,
    clusters,
    endpoints,
    names,
    proxyless,
    refs,
    secrets,
    sidecar,
)

log = logging.getLogger(__name__)


def _resource(type_url: str, message: Message) -> cache.Resource:
    # A ClusterLoadAssignment is named by its cluster; everything else by `name`.
    name = getattr(message, "cluster_name" if type_url == resources.ENDPOINT else "name")
    return cache.Resource.from_message(type_url, name, message, refs.of(message))


def _resources(type_url: str, messages: Iterable[Message]) -> list[cache.Resource]:
    return [_resource(type_url, m) for m in messages]


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


Scope = frozenset[mesh.ServiceKey]
# A Service's clusters depend on it, its peers' identities and its subsets.
ServiceMemoKey = tuple[mesh.Service, frozenset[str] | None, tuple[mesh.FrozenMap, ...]]
EndpointMemoKey = tuple[
    mesh.ServiceKey, mesh.Port, mesh.FrozenMap | None, tuple[mesh.Endpoint, ...]
]


HeadlessMemo = dict[tuple[mesh.Service, frozenset[str] | None], list[cache.Resource]]


@dataclass
class Shared:
    """What proxies share, built once per mesh state and memoized per scope."""

    state: mesh.MeshState
    services: tuple[mesh.Service, ...]
    clusters: dict[mesh.ServiceKey, list[cache.Resource]]
    endpoints: dict[mesh.ServiceKey, list[cache.Resource]]
    # Whether clusters and endpoints resolve among themselves (checked once).
    whole: bool
    # Ids of groups known to resolve, so a proxy's check costs its own part.
    verified: set[int] = field(default_factory=set)
    scopes: dict[tuple[str, frozenset[tuple[str, str]] | None], Scope] = field(default_factory=dict)
    groups: dict[tuple[Any, ...], cache.ResourceGroup] = field(default_factory=dict)
    memo_used: set[tuple[Any, ...]] = field(default_factory=set)
    headless: HeadlessMemo = field(default_factory=dict)
    _pods: capture.PodIndex = field(default_factory=dict)
    _pods_covered: set[tuple[str, str]] = field(default_factory=set)

    def pod_index(self, pods: Collection[tuple[str, str]]) -> capture.PodIndex:
        """The ports of captured proxies' Pods: one pass over the mesh's
        endpoints for all the Pods known, another only for a Pod new since."""
        missing = set(pods) - self._pods_covered
        if missing:
            self._pods.update(capture.pod_index(self.state, missing))
            self._pods_covered |= missing
        return self._pods


class Identities(Protocol):
    """Workload certificates, as the controller needs them. Present when
    the mesh speaks mutual TLS (that is, when xDS itself is authenticated)."""

    @property
    def trust_domain(self) -> str: ...

    def get(self, namespace: str, service_account: str) -> KeyPairLike: ...
    def trust_bundle(self) -> bytes: ...
    def forget(self, namespace: str, service_account: str) -> None: ...


class KeyPairLike(Protocol):
    @property
    def cert_pem(self) -> bytes: ...
    @property
    def key_pem(self) -> bytes: ...


class Controller:
    def __init__(
        self,
        snapshots: cache.SnapshotCache,
        debouncer: Debouncer,
        identities: Identities | None = None,
    ) -> None:
        self._cache = snapshots
        self._debouncer = debouncer
        self._identities = identities
        self._secret_memo: dict[tuple[str, str], tuple[bytes, bytes, cache.ResourceGroup]] = {}
        self._bundle: tuple[bytes, cache.Resource] | None = None
        # Proxy keys per identity: its key material goes when the last one does.
        self._identity_users: collections.Counter[tuple[str, str]] = collections.Counter()
        # (namespace, Pod) of connected captured sidecars, for the Pod index.
        self._captured_pods: collections.Counter[tuple[str, str]] = collections.Counter()
        self._state = mesh.MeshState()
        self._proxies: dict[str, proxy.Proxy] = {}
        self._service_memo: dict[ServiceMemoKey, list[cache.Resource]] = {}
        self._endpoint_memo: dict[EndpointMemoKey, cache.Resource] = {}
        self._headless_memo: dict[
            tuple[mesh.Service, frozenset[str] | None], list[cache.Resource]
        ] = {}
        # Per proxy: what its own resources were built from, and them. One
        # entry each, found by the proxy: a thousand disconnecting must not
        # each scan the others'.
        self._own_memo: dict[
            proxy.Proxy, tuple[Any, tuple[cache.ResourceGroup, cache.ResourceGroup]]
        ] = {}
        # Route tables outlive a rebuild when nothing they depend on changed.
        self._route_memo: dict[tuple[Any, ...], tuple[Any, cache.ResourceGroup]] = {}
        self._shared: Shared | None = None
        # Scoped groups of the last rebuild, kept when unchanged (see _kept).
        self._previous_groups: dict[tuple[Any, ...], cache.ResourceGroup] = {}
        self._groups_now: dict[tuple[Any, ...], cache.ResourceGroup] = {}
        # No configuration before the first mesh state: a proxy that connects
        # while the registry is still listing waits, rather than being given
        # an empty mesh that would drop its traffic.
        self._started = False
        self.problems: list[problems.Problem] = []
        self.last_build_seconds = 0.0
        snapshots.on_watch = self._on_watch
        snapshots.on_idle = self._on_idle

    @staticmethod
    def key_of(client: cache.Client) -> str:
        return node.key(node.parse(client.node, client.identity))

    @property
    def state(self) -> mesh.MeshState:
        return self._state

    def update(self, state: mesh.MeshState) -> None:
        """A new mesh state; pushed after the debounce."""
        self._state = state
        self._started = True
        self._debouncer.touch()

    async def run(self) -> None:
        while True:
            await self._debouncer.settled()
            try:
                self.rebuild()
            except Exception:
                log.exception("rebuild of mesh version %d failed", self._state.version)

    # -- proxies coming and going -------------------------------------------

    def _on_watch(self, key: str, client: cache.Client) -> None:
        if key in self._proxies:
            return
        found = self._proxies[key] = node.parse(client.node, client.identity)
        if isinstance(found, proxy.CapturedSidecar):
            self._captured_pods[(found.namespace, found.pod)] += 1
        if isinstance(found, proxy.Sidecar | proxy.CapturedSidecar):
            self._identity_users[(found.namespace, found.service_account)] += 1
        if not self._started:
            return
        if self._shared is None or self._shared.state is not self._state:
            self._shared = self._build_shared(self._state)
        if self._shared.whole:
            self._publish(key, self._proxies[key], self._shared)

    def _on_idle(self, key: str) -> None:
        gone = self._proxies.pop(key, None)
        if gone is not None:
            self._own_memo.pop(gone, None)
        if isinstance(gone, proxy.CapturedSidecar):
            pod = (gone.namespace, gone.pod)
            self._captured_pods[pod] -= 1
            if self._captured_pods[pod] <= 0:
                del self._captured_pods[pod]
        self._cache.clear_snapshot(key)
        if isinstance(gone, proxy.Sidecar | proxy.CapturedSidecar):
            identity = (gone.namespace, gone.service_account)
            self._identity_users[identity] -= 1
            if self._identity_users[identity] <= 0:
                del self._identity_users[identity]
                # No key material is kept for workloads that are gone.
                self._secret_memo.pop(identity, None)
                if self._identities is not None:
                    self._identities.forget(*identity)

    # -- building -------------------------------------------------------------

    def rebuild(self) -> None:
        if not self._started:
            return
        state = self._state
        started = time.perf_counter()
        self.problems = []
        shared = self._shared = self._build_shared(state)
        if shared.whole:
            for key, p in self._proxies.items():
                self._publish(key, p, shared)
            self._route_memo = {k: self._route_memo[k] for k in shared.memo_used}
            self._headless_memo = shared.headless
        self.last_build_seconds = time.perf_counter() - started
        log.info(
            "mesh version %d: %d services, %d proxies, built in %.1f ms",
            state.version,
            len(state.services),
            len(self._proxies),
            self.last_build_seconds * 1000,
        )

    def _build_shared(self, state: mesh.MeshState) -> Shared:
        if self._groups_now:
            self._previous_groups, self._groups_now = self._groups_now, {}
        service_memo: dict[ServiceMemoKey, list[cache.Resource]] = {}
        endpoint_memo: dict[EndpointMemoKey, cache.Resource] = {}
        subsets: dict[mesh.ServiceKey, set[mesh.FrozenMap]] = {}
        for route in state.routes.values():
            for target, labels in route.subsets():
                subsets.setdefault(target, set()).add(labels)
        by_service_clusters: dict[mesh.ServiceKey, list[cache.Resource]] = {}
        by_service_endpoints: dict[mesh.ServiceKey, list[cache.Resource]] = {}
        services = tuple(state.sorted_services())
        for svc in services:
            peers = self._peers(svc, state)
            its_subsets = tuple(sorted(subsets.get(svc.key, ()), key=names.subset_name))
            built = self._service_memo.get((svc, peers, its_subsets))
            if built is None:
                built = _resources(
                    resources.CLUSTER, clusters.outbound_for_service(svc, peers, its_subsets)
                )
            service_memo[(svc, peers, its_subsets)] = by_service_clusters[svc.key] = built
            assigned_all = []
            for port in svc.ports:
                for subset in (None, *its_subsets):
                    eps = state.endpoints_of(svc.key, port)
                    if subset is not None:
                        eps = tuple(
                            e for e in eps if all(e.labels.get(k) == v for k, v in subset.items())
                        )
                    memo_key = (svc.key, port, subset, eps)
                    assigned = self._endpoint_memo.get(memo_key)
                    if assigned is None:
                        cla = endpoints.load_assignment(
                            names.outbound_cluster(svc.key, port, subset), eps
                        )
                        assigned = _resource(resources.ENDPOINT, cla)
                    endpoint_memo[memo_key] = assigned
                    assigned_all.append(assigned)
            by_service_endpoints[svc.key] = assigned_all
        # Only what the current state uses is remembered, so memory follows
        # the mesh, not its history.
        if self._identities is not None:
            for svc in services:  # plain-text variants, for proxyless clients
                plain = self._service_memo.get((svc, None, ()))
                if plain is not None:
                    service_memo[(svc, None, ())] = plain
        self._service_memo = service_memo
        self._endpoint_memo = endpoint_memo
        shared = Shared(state, services, by_service_clusters, by_service_endpoints, whole=True)
        everything = self._scoped_groups(shared, None)
        only_shared = cache.Snapshot(
            {resources.CLUSTER: (everything[0],), resources.ENDPOINT: (everything[1],)}
        )
        shared.whole = self._check(f"mesh version {state.version}", only_shared, frozenset())
        if shared.whole:
            shared.verified |= {id(everything[0]), id(everything[1])}
        return shared

    def _peers(self, svc: mesh.Service, state: mesh.MeshState) -> frozenset[str] | None:
        """SPIFFE IDs a caller must see on the other end; None without mTLS."""
        if self._identities is None:
            return None
        domain = self._identities.trust_domain
        accounts = {e.service_account for e in state.endpoints.get(svc.key, ())} or {"default"}
        return frozenset(f"spiffe://{domain}/ns/{svc.namespace}/sa/{sa}" for sa in accounts)

    def _secrets(self, s: proxy.Sidecar | proxy.CapturedSidecar) -> cache.ResourceGroup | None:
        """The workload certificate and trust bundle of a sidecar's identity,
        shared by every proxy of that identity and rebuilt on rotation."""
        if self._identities is None:
            return None
        identity = (s.namespace, s.service_account)
        pair = self._identities.get(*identity)
        bundle = self._identities.trust_bundle()
        memo = self._secret_memo.get(identity)
        if memo is None or memo[0] is not pair.cert_pem or memo[1] != bundle:
            group = cache.ResourceGroup(
                [
                    _resource(resources.SECRET, secrets.workload(pair.cert_pem, pair.key_pem)),
                    self._bundle_resource(bundle),
                ]
            )
            memo = self._secret_memo[identity] = (pair.cert_pem, bundle, group)
        return memo[2]

    def _bundle_resource(self, bundle: bytes) -> cache.Resource:
        """The trust bundle is the same for everyone: serialized once."""
        if self._bundle is None or self._bundle[0] != bundle:
            secret = secrets.trust_bundle(bundle)
            self._bundle = (bundle, _resource(resources.SECRET, secret))
        return self._bundle[1]

    # -- scopes ---------------------------------------------------------------

    def _scope(self, p: proxy.Proxy, shared: Shared) -> Scope | None:
        """The Services a proxy may call; None when that is all of them."""
        if isinstance(p, proxy.CapturedSidecar):
            # A Pod behind one Service takes its dependencies; behind several,
            # any of them may be what it is asked to do, so none narrow it.
            served = capture.served_services(p, shared.state, shared.pod_index(self._captured_pods))
            dependencies = served[0].dependencies if len(served) == 1 else None
        else:
            own = shared.state.services.get(p.service_key)
            dependencies = own.dependencies if own is not None else None
        memo_key = (p.namespace, dependencies)
        if memo_key not in shared.scopes:
            shared.scopes[memo_key] = scope.visible(
                shared.services, shared.state.routes, p.namespace, dependencies
            )
        found = shared.scopes[memo_key]
        return None if len(found) == len(shared.services) else found

    def _visible(self, shared: Shared, in_scope: Scope | None) -> tuple[mesh.Service, ...]:
        if in_scope is None:
            return shared.services
        return tuple(s for s in shared.services if s.key in in_scope)

    def _scoped_groups(
        self, shared: Shared, in_scope: Scope | None
    ) -> tuple[cache.ResourceGroup, cache.ResourceGroup]:
        """Clusters and endpoints of a scope, shared by every proxy in it."""
        key = ("clusters", in_scope)
        if key not in shared.groups:
            visible = self._visible(shared, in_scope)
            shared.groups[key] = self._kept(
                key, cache.ResourceGroup(r for s in visible for r in shared.clusters[s.key])
            )
            shared.groups[("endpoints", in_scope)] = self._kept(
                ("endpoints", in_scope),
                cache.ResourceGroup(r for s in visible for r in shared.endpoints[s.key]),
            )
            if in_scope is not None:
                # A scope is closed over route backends, so its clusters'
                # endpoints are in it: it resolves if the whole mesh does.
                shared.verified |= {
                    id(shared.groups[key]),
                    id(shared.groups[("endpoints", in_scope)]),
                }
        return shared.groups[key], shared.groups[("endpoints", in_scope)]

    def _kept(self, key: tuple[Any, ...], group: cache.ResourceGroup) -> cache.ResourceGroup:
        """The last rebuild's group of that key if nothing in it changed: its
        views, and every proxy's views over it, stay the same objects."""
        previous = self._previous_groups.get(key)
        if previous is not None and previous.same_as(group):
            group = previous
        self._groups_now[key] = group
        return group

    def _plain_clusters(
        self, shared: Shared, in_scope: Scope | None, visible: tuple[mesh.Service, ...]
    ) -> cache.ResourceGroup:
        key = ("plain-clusters", in_scope)
        if key not in shared.groups:
            built = []
            for svc in visible:
                memo = self._service_memo.get((svc, None, ()))
                if memo is None:
                    memo = self._service_memo[(svc, None, ())] = _resources(
                        resources.CLUSTER, clusters.outbound_for_service(svc)
                    )
                built.extend(memo)
            group = shared.groups[key] = cache.ResourceGroup(built)
            shared.verified.add(id(group))
        return shared.groups[key]

    def refresh(self) -> None:
        """Something outside the mesh state changed (a certificate): rebuild."""
        self._debouncer.touch()

    def _memo_group(
        self,
        shared: Shared,
        key: tuple[Any, ...],
        inputs: Any,
        build: Callable[[], list[cache.Resource]],
    ) -> cache.ResourceGroup:
        """A group rebuilt only when `inputs` changed. Inputs are compared once
        per key and rebuild, not once per proxy: the comparison walks every
        visible Service."""
        if key in shared.memo_used:
            return self._route_memo[key][1]
        shared.memo_used.add(key)
        memo = self._route_memo.get(key)
        if memo is None or not (memo[0] is inputs or memo[0] == inputs):
            memo = (inputs, cache.ResourceGroup(build()))
        # The newest inputs are kept, so the next rebuild compares by identity
        # first whenever nothing changed.
        self._route_memo[key] = (inputs, memo[1])
        return memo[1]

    def _verify(self, shared: Shared, group: cache.ResourceGroup, against: cache.Snapshot) -> None:
        if id(group) not in shared.verified and not unresolved(against, frozenset(shared.verified)):
            shared.verified.add(id(group))

    # -- one proxy --------------------------------------------------------------

    def _publish(self, key: str, p: proxy.Proxy, shared: Shared) -> None:
        in_scope = self._scope(p, shared)
        scoped_clusters, scoped_endpoints = self._scoped_groups(shared, in_scope)
        visible = self._visible(shared, in_scope)
        state = shared.state
        # Route tables depend on the visible Services (annotations included)
        # and on the routes between them.
        inputs = (visible, state.routes)
        if isinstance(p, proxy.Proxyless):
            listeners = self._memo_group(
                shared,
                ("proxyless-lds", p.namespace, in_scope),
                inputs,
                lambda: _resources(resources.LISTENER, proxyless.listeners(visible, p.namespace)),
            )
            route_group = self._memo_group(
                shared,
                ("proxyless-rds", in_scope),
                inputs,
                lambda: _resources(resources.ROUTE, proxyless.route_configs(visible, state)),
            )
            if self._identities is not None:
                # gRPC's xDS client takes TLS only from certificate providers,
                # not SDS: proxyless clients call in plain text for now.
                scoped_clusters = self._plain_clusters(shared, in_scope, visible)
            groups: dict[str, tuple[cache.ResourceGroup, ...]] = {
                resources.CLUSTER: (scoped_clusters,),
                resources.ENDPOINT: (scoped_endpoints,),
                resources.LISTENER: (listeners,),
                resources.ROUTE: (route_group,),
            }
        elif isinstance(p, proxy.CapturedSidecar):
            problem = capture.pod_problem(p, state)
            if problem is not None:
                self.problems.append(problems.Problem("proxy", key, problem))
                log.warning("not configuring proxy %s: %s", key, problem)
                return
            own_clusters, own_listeners = self._captured_groups(p, shared)
            headless = self._headless_clusters(shared, in_scope, visible)
            outbound = self._memo_group(
                shared,
                ("capture-lds", in_scope),
                (visible, _headless_endpoints(visible, state)),
                lambda: [_resource(resources.LISTENER, capture.virtual_outbound(visible, state))],
            )
            route_group = self._memo_group(
                shared,
                ("capture-rds", p.namespace, in_scope),
                inputs,
                lambda: _resources(
                    resources.ROUTE, capture.route_configs(visible, p.namespace, state)
                ),
            )
            scoped_clusters = self._with(shared, scoped_clusters, headless)
            groups = {
                resources.CLUSTER: (scoped_clusters, own_clusters),
                resources.ENDPOINT: (scoped_endpoints,),
                resources.LISTENER: (outbound, own_listeners),
                resources.ROUTE: (route_group,),
            }
            secret_group = self._secrets(p)
            if secret_group is not None:
                groups[resources.SECRET] = (secret_group,)
        else:
            own_clusters, own_listeners = self._own_groups(p, state)
            secret_group = self._secrets(p)
            route_group = self._memo_group(
                shared,
                ("outbound", p.namespace, in_scope),
                inputs,
                lambda: [
                    _resource(resources.ROUTE, sidecar.outbound_routes(p.namespace, visible, state))
                ],
            )
            groups = {
                resources.CLUSTER: (scoped_clusters, own_clusters),
                resources.ENDPOINT: (scoped_endpoints,),
                resources.LISTENER: (own_listeners,),
                resources.ROUTE: (route_group,),
            }
            if secret_group is not None:
                groups[resources.SECRET] = (secret_group,)
        self._verify(
            shared,
            route_group,
            cache.Snapshot(
                {resources.CLUSTER: (scoped_clusters,), resources.ROUTE: (route_group,)}
            ),
        )
        snapshot = cache.Snapshot(groups=groups, label=f"mesh version {state.version}")
        if self._check(key, snapshot, skip=frozenset(shared.verified)):
            self._cache.set_snapshot(key, snapshot)

    def _own_groups(
        self, s: proxy.Sidecar, state: mesh.MeshState
    ) -> tuple[cache.ResourceGroup, cache.ResourceGroup]:
        """A sidecar's inbound cluster and listeners: they change only with
        the sidecar itself or its Service's protocol."""
        security = (
            sidecar.security(s, state, self._identities.trust_domain)
            if self._identities is not None
            else None
        )
        return self._own(
            s,
            (sidecar.inbound_protocol(s, state), security),
            lambda: (
                cache.ResourceGroup(_resources(resources.CLUSTER, sidecar.own_clusters(s, state))),
                cache.ResourceGroup(
                    _resources(resources.LISTENER, sidecar.own_listeners(s, state, security))
                ),
            ),
        )

    def _own(
        self,
        p: proxy.Proxy,
        inputs: Any,
        build: Callable[[], tuple[cache.ResourceGroup, cache.ResourceGroup]],
    ) -> tuple[cache.ResourceGroup, cache.ResourceGroup]:
        memo = self._own_memo.get(p)
        if memo is None or memo[0] != inputs:
            memo = self._own_memo[p] = (inputs, build())
        return memo[1]

    def _captured_groups(
        self, s: proxy.CapturedSidecar, shared: Shared
    ) -> tuple[cache.ResourceGroup, cache.ResourceGroup]:
        """A captured Pod's inbound clusters and listener: they change only
        with the ports it serves and their security."""
        state, index = shared.state, shared.pod_index(self._captured_pods)
        security = (
            capture.security(s, state, self._identities.trust_domain, index)
            if self._identities is not None
            else None
        )
        return self._own(
            s,
            (
                capture.inbound_ports(s, state, index),
                tuple(sorted(security.items())) if security is not None else None,
                capture.passthrough_permissive(s, state),
            ),
            lambda: (
                cache.ResourceGroup(
                    _resources(resources.CLUSTER, capture.own_clusters(s, state, index))
                ),
                cache.ResourceGroup(
                    [
                        _resource(
                            resources.LISTENER, capture.virtual_inbound(s, state, security, index)
                        )
                    ]
                ),
            ),
        )

    def _headless_clusters(
        self, shared: Shared, in_scope: Scope | None, visible: tuple[mesh.Service, ...]
    ) -> cache.ResourceGroup:
        """ORIGINAL_DST clusters of the scope's headless Services, which only
        captured sidecars dial (local-mode sidecars route by name)."""
        key = ("headless", in_scope)
        if key not in shared.groups:
            built = []
            for svc in visible:
                if not svc.headless:
                    continue
                peers = self._peers(svc, shared.state)
                memo = shared.headless.get((svc, peers)) or self._headless_memo.get((svc, peers))
                if memo is None:
                    memo = _resources(resources.CLUSTER, capture.headless_clusters(svc, peers))
                shared.headless[(svc, peers)] = memo
                built.extend(memo)
            shared.groups[key] = cache.ResourceGroup(built)
        return shared.groups[key]

    def _with(
        self, shared: Shared, base: cache.ResourceGroup, extra: cache.ResourceGroup
    ) -> cache.ResourceGroup:
        """`base` and `extra` as one group (one per pair and rebuild)."""
        if not len(extra):
            return base
        key = ("with", id(base), id(extra))
        if key not in shared.groups:
            group = shared.groups[key] = cache.ResourceGroup([*base, *extra])
            shared.verified.add(id(group))
        return shared.groups[key]

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


def _headless_endpoints(
    visible: tuple[mesh.Service, ...], state: mesh.MeshState
) -> tuple[tuple[mesh.Endpoint, ...], ...]:
    """What the outbound capture listener reads besides the Services: the
    endpoints of headless ones, which it matches by address."""
    return tuple(state.endpoints.get(s.key, ()) for s in visible if s.headless)


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
                    # A partial snapshot (the shared groups alone) is checked
                    # only for the types it has; secrets are per proxy.
                    if ref[0] in snapshot.groups and snapshot.get(*ref) is None:
                        missing.add(ref)
    return sorted(missing)
