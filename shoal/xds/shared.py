"""What proxies share, worked out once per mesh state.

Each Service's clusters and ClusterLoadAssignments are translated once per
mesh state, and only when the Service, the identities behind it or its
endpoints changed (`Memos` keeps them across rebuilds). Proxies that may
call the same Services (a scope) share one group of each, and one route
table per kind of proxy; every proxy's snapshot is made of these groups, so
a thousand proxies share the same Resource objects.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf.message import Message

from shoal import spiffe
from shoal.model import mesh, scope
from shoal.xds import cache, memo, resources
from shoal.xds.translate import capture, clusters, endpoints, names, refs

Scope = frozenset[mesh.ServiceKey]
Groups = dict[str, tuple[cache.ResourceGroup, ...]]


# What each memo is keyed by: its inputs, by name.


class ServiceClusters(NamedTuple):
    """A Service's outbound clusters: they depend on it, on the identities a
    caller must see behind it (None: plain text) and on the subsets routes
    split it into."""

    service: mesh.Service
    peers: frozenset[str] | None
    subsets: tuple[mesh.FrozenMap, ...]


class Assignment(NamedTuple):
    """One ClusterLoadAssignment: a port of a Service, or a subset of it
    (its endpoints are the memo's inputs, compared)."""

    service: mesh.ServiceKey
    port: mesh.Port
    subset: mesh.FrozenMap | None


class HeadlessClusters(NamedTuple):
    """The ORIGINAL_DST clusters of a headless Service."""

    service: mesh.Service
    peers: frozenset[str] | None


class ScopeOf(NamedTuple):
    """Proxies of one namespace with the same declared dependencies (None:
    all) may call the same Services."""

    namespace: str
    dependencies: frozenset[tuple[str, str]] | None


class ScopedGroup(NamedTuple):
    """A group every proxy of a scope (None: the whole mesh) is sent:
    "clusters", "endpoints", "plain-clusters", "headless" or
    "clusters+headless"."""

    kind: str
    scope: Scope | None


class RouteTable(NamedTuple):
    """Listeners or route tables of one kind of proxy, per scope and, where
    the namespace changes them, per namespace."""

    kind: str
    namespace: str | None
    scope: Scope | None


@dataclass
class Memos:
    """What one rebuild keeps for the next (see memo.Generations)."""

    service_clusters: memo.Generations[ServiceClusters, list[cache.Resource]] = field(
        default_factory=memo.Generations
    )
    assignments: memo.Generations[Assignment, tuple[tuple[mesh.Endpoint, ...], cache.Resource]] = (
        field(default_factory=memo.Generations)
    )
    # The last groups of each key: kept when unchanged, so that every view
    # over them stays the same object (see Shared.kept).
    groups: memo.Generations[ScopedGroup, cache.ResourceGroup] = field(
        default_factory=memo.Generations
    )
    # Advanced only by a rebuild that publishes: one that fails its check
    # leaves them as the last good rebuild made them.
    headless: memo.Generations[HeadlessClusters, list[cache.Resource]] = field(
        default_factory=memo.Generations
    )
    # With the inputs they were built from, compared once per rebuild.
    route_tables: memo.Generations[RouteTable, tuple[Any, cache.ResourceGroup]] = field(
        default_factory=memo.Generations
    )

    def publishing(self) -> None:
        """A rebuild that passed its check begins publishing."""
        self.headless.advance()
        self.route_tables.advance()


def resource(type_url: str, message: Message) -> cache.Resource:
    # A ClusterLoadAssignment is named by its cluster; everything else by `name`.
    name = getattr(message, "cluster_name" if type_url == resources.ENDPOINT else "name")
    return cache.Resource.from_message(type_url, name, message, refs.of(message))


def resource_list(type_url: str, messages: Iterable[Message]) -> list[cache.Resource]:
    return [resource(type_url, m) for m in messages]


@dataclass
class Shared:
    """One mesh state's translation, for every proxy."""

    state: mesh.MeshState
    memos: Memos
    trust_domain: str | None
    services: tuple[mesh.Service, ...]
    clusters: dict[mesh.ServiceKey, list[cache.Resource]]
    endpoints: dict[mesh.ServiceKey, list[cache.Resource]]
    # Whether clusters and endpoints resolve among themselves (checked once).
    whole: bool = True
    # Groups this state holds that are known to resolve (by id: they live as
    # long as this object), so a proxy's check costs only its own part.
    verified: set[int] = field(default_factory=set)
    by_dependencies: dict[ScopeOf, Scope] = field(default_factory=dict)
    groups: dict[ScopedGroup, cache.ResourceGroup] = field(default_factory=dict)
    _pods: capture.PodIndex = field(default_factory=dict)
    _pods_covered: set[tuple[str, str]] = field(default_factory=set)

    # -- scopes ---------------------------------------------------------------

    def scope(
        self, namespace: str, dependencies: frozenset[tuple[str, str]] | None
    ) -> Scope | None:
        """The Services a proxy may call; None when that is all of them."""
        key = ScopeOf(namespace, dependencies)
        found = self.by_dependencies.get(key)
        if found is None:
            found = self.by_dependencies[key] = scope.visible(
                self.services, self.state.routes, namespace, dependencies
            )
        return None if len(found) == len(self.services) else found

    def visible(self, in_scope: Scope | None) -> tuple[mesh.Service, ...]:
        if in_scope is None:
            return self.services
        return tuple(s for s in self.services if s.key in in_scope)

    def pod_index(self, pods: Collection[tuple[str, str]]) -> capture.PodIndex:
        """The ports of captured proxies' Pods: one pass over the mesh's
        endpoints for all the Pods known, another only for a Pod new since."""
        missing = set(pods) - self._pods_covered
        if missing:
            self._pods.update(capture.pod_index(self.state, missing))
            self._pods_covered |= missing
        return self._pods

    def peers(self, svc: mesh.Service) -> frozenset[str] | None:
        """SPIFFE IDs a caller must see on the other end; None without mTLS."""
        if self.trust_domain is None:
            return None
        accounts = self.state.service_accounts_of(svc.key)
        return frozenset(
            spiffe.workload_id(self.trust_domain, svc.namespace, sa) for sa in accounts
        )

    # -- groups of a scope ----------------------------------------------------

    def scoped_groups(
        self, in_scope: Scope | None
    ) -> tuple[cache.ResourceGroup, cache.ResourceGroup]:
        """Clusters and endpoints of a scope, shared by every proxy in it."""
        clusters_key = ScopedGroup("clusters", in_scope)
        endpoints_key = ScopedGroup("endpoints", in_scope)
        if clusters_key not in self.groups:
            visible = self.visible(in_scope)
            self.groups[clusters_key] = self.kept(
                clusters_key,
                cache.ResourceGroup(r for s in visible for r in self.clusters[s.key]),
            )
            self.groups[endpoints_key] = self.kept(
                endpoints_key,
                cache.ResourceGroup(r for s in visible for r in self.endpoints[s.key]),
            )
            if in_scope is not None:
                # A scope is closed over route backends, so its clusters'
                # endpoints are in it: it resolves if the whole mesh does.
                self.verified |= {
                    id(self.groups[clusters_key]),
                    id(self.groups[endpoints_key]),
                }
        return self.groups[clusters_key], self.groups[endpoints_key]

    def kept(self, key: ScopedGroup, group: cache.ResourceGroup) -> cache.ResourceGroup:
        """The last rebuild's group of that key if nothing in it changed: its
        views, and every proxy's views over it, stay the same objects."""
        previous = self.memos.groups.get(key)
        if previous is not None and previous.same_as(group):
            group = previous
        return self.memos.groups.put(key, group)

    def plain_clusters(self, in_scope: Scope | None) -> cache.ResourceGroup:
        """The scope's clusters without TLS, for proxyless gRPC clients."""
        key = ScopedGroup("plain-clusters", in_scope)
        if key not in self.groups:
            built = []
            for svc in self.visible(in_scope):
                memo_key = ServiceClusters(svc, None, ())
                found = self.memos.service_clusters.get(memo_key)
                if found is None:
                    found = self.memos.service_clusters.put(
                        memo_key,
                        resource_list(resources.CLUSTER, clusters.outbound_for_service(svc)),
                    )
                built.extend(found)
            group = self.groups[key] = cache.ResourceGroup(built)
            self.verified.add(id(group))
        return self.groups[key]

    def headless_clusters(self, in_scope: Scope | None) -> cache.ResourceGroup:
        """ORIGINAL_DST clusters of the scope's headless Services, which only
        captured sidecars dial (local-mode sidecars route by name)."""
        key = ScopedGroup("headless", in_scope)
        if key not in self.groups:
            built = []
            for svc in self.visible(in_scope):
                if not svc.headless:
                    continue
                memo_key = HeadlessClusters(svc, self.peers(svc))
                found = self.memos.headless.get(memo_key)
                if found is None:
                    found = self.memos.headless.put(
                        memo_key,
                        resource_list(
                            resources.CLUSTER, capture.headless_clusters(svc, memo_key.peers)
                        ),
                    )
                built.extend(found)
            self.groups[key] = cache.ResourceGroup(built)
        return self.groups[key]

    def clusters_with_headless(self, in_scope: Scope | None) -> cache.ResourceGroup:
        """The scope's clusters and its headless ones, as one group."""
        scoped, _ = self.scoped_groups(in_scope)
        headless = self.headless_clusters(in_scope)
        if not len(headless):
            return scoped
        key = ScopedGroup("clusters+headless", in_scope)
        if key not in self.groups:
            group = self.groups[key] = cache.ResourceGroup([*scoped, *headless])
            self.verified.add(id(group))
        return self.groups[key]

    def route_table(
        self, key: RouteTable, inputs: Any, build: Callable[[], list[cache.Resource]]
    ) -> cache.ResourceGroup:
        """A group rebuilt only when `inputs` changed. Inputs are compared once
        per key and rebuild, not once per proxy: the comparison walks every
        visible Service."""
        tables = self.memos.route_tables
        fresh = tables.fresh(key)
        if fresh is not None:
            return fresh[1]
        found = tables.get(key)
        if found is None or not (found[0] is inputs or found[0] == inputs):
            found = (inputs, cache.ResourceGroup(build()))
        # The newest inputs are kept, so the next rebuild compares by identity
        # first whenever nothing changed.
        return tables.put(key, (inputs, found[1]))[1]


def build(state: mesh.MeshState, memos: Memos, trust_domain: str | None) -> Shared:
    """Every Service's clusters and endpoints for `state`, and the whole
    mesh's groups of them (not yet checked: see Shared.whole)."""
    # This loop visits each key once: it reads the last generation and fills
    # this one directly (see Generations.advance).
    last_clusters, clusters_now = memos.service_clusters.advance()
    last_assignments, assignments_now = memos.assignments.advance()
    memos.groups.advance()
    subsets: dict[mesh.ServiceKey, set[mesh.FrozenMap]] = {}
    for route in state.routes.values():
        for target, labels in route.subsets():
            subsets.setdefault(target, set()).add(labels)
    services = tuple(state.sorted_services())
    shared = Shared(state, memos, trust_domain, services, {}, {})
    for svc in services:
        its_subsets = tuple(sorted(subsets.get(svc.key, ()), key=names.subset_name))
        key = ServiceClusters(svc, shared.peers(svc), its_subsets)
        built = last_clusters.get(key)
        if built is None:
            built = resource_list(
                resources.CLUSTER, clusters.outbound_for_service(svc, key.peers, its_subsets)
            )
        clusters_now[key] = shared.clusters[svc.key] = built
        assigned_all = []
        for port in svc.ports:
            for subset in (None, *its_subsets):
                eps = state.endpoints_of(svc.key, port)
                if subset is not None:
                    eps = tuple(
                        e for e in eps if all(e.labels.get(k) == v for k, v in subset.items())
                    )
                assignment = Assignment(svc.key, port, subset)
                found = last_assignments.get(assignment)
                # Endpoints are compared, not hashed into the key: the same
                # objects when unchanged, so the comparison is by identity.
                if found is None or found[0] != eps:
                    cla = endpoints.load_assignment(
                        names.outbound_cluster(svc.key, port, subset), eps
                    )
                    found = (eps, resource(resources.ENDPOINT, cla))
                assignments_now[assignment] = found
                assigned_all.append(found[1])
        shared.endpoints[svc.key] = assigned_all
    return shared
