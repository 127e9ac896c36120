"""What proxies share, worked out once per mesh state.

Each Service's clusters and ClusterLoadAssignments are translated once per
mesh state, and only when the Service, the identities behind it or its
endpoints changed (`Memos` keeps them across rebuilds). Proxies that may
call the same Services (a scope) share one group of each, and one route
table per kind of proxy; every proxy's snapshot is made of these groups, so
a thousand proxies share the same Resource objects.

A local sidecar's outbound route table (ten thousand virtual hosts at ten
thousand Services) is assembled from each Service's virtual hosts, encoded
once per Service and kind of caller (its own namespace or another): a
change to one Service re-encodes its hosts and joins the bytes again, as
the table's encoding would have them (see `Shared.route_table`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf.message import Message

from shoal import spiffe
from shoal.model import changes, mesh, proxy, routing, scope
from shoal.xds import cache, memo, resources
from shoal.xds.translate import capture, clusters, endpoints, names, refs, routes

# The RouteTable kind of a local sidecar's outbound routes (generators.py),
# which `Shared.route_table` assembles from each Service's virtual hosts.
OUTBOUND_ROUTES = "outbound"

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


class VirtualHosts(NamedTuple):
    """One Service's virtual hosts in an outbound route table: they depend
    on it, its route and the Services that route sends to, the mesh's
    trace sampling, and the caller: its namespace where Gateway API routes
    apply (they may be a namespace's own), else whether it is the Service's."""

    service: mesh.Service
    route: routing.ServiceRoute | None
    backends: tuple[mesh.Service | None, ...]
    sampling: float
    caller: str | bool


@dataclass(frozen=True, slots=True)
class HostsPart:
    """Virtual hosts encoded as the `virtual_hosts` fields of a
    RouteConfiguration, with a digest of them and the clusters they name."""

    encoded: bytes
    digest: bytes
    refs: frozenset[tuple[str, str]]


# A place in a table whose part is yet to be made.
_NO_PART = HostsPart(b"", b"", frozenset())


@dataclass(frozen=True, slots=True)
class OutboundTable:
    """An outbound route table as last assembled: its inputs, the part of
    each visible Service (by position) and the resulting group."""

    visible: tuple[mesh.Service, ...]
    routes: Mapping[mesh.ServiceKey, routing.ServiceRoute]
    sampling: float
    index: dict[mesh.ServiceKey, int]
    parts: list[HostsPart]
    # Their encodings and digests, joined as they are for each assembly.
    encoded: list[bytes]
    digests: list[bytes]
    group: cache.ResourceGroup


@dataclass(frozen=True, slots=True)
class _Entry:
    """What a build made of one Service, with what it was made from."""

    key: ServiceClusters
    clusters: list[cache.Resource]
    assignments: dict[Assignment, tuple[tuple[mesh.Endpoint, ...], cache.Resource]]


@dataclass(frozen=True, slots=True)
class Built:
    """What the last build made, for the next to redo only what changed.
    Its entries are those of the Services of its state: memory follows the
    mesh."""

    state: mesh.MeshState
    trust_domain: str | None
    services: tuple[mesh.Service, ...]
    keys: tuple[mesh.ServiceKey, ...]
    index: dict[mesh.ServiceKey, int]
    subsets: dict[mesh.ServiceKey, tuple[mesh.FrozenMap, ...]]
    entries: dict[mesh.ServiceKey, _Entry]
    clusters: dict[mesh.ServiceKey, list[cache.Resource]]
    endpoints: dict[mesh.ServiceKey, list[cache.Resource]]
    # The scopes its proxies were given (filled as they are worked out).
    scopes: dict[ScopeOf, Scope]
    everywhere: bool


@dataclass(frozen=True, slots=True)
class RouteIndex:
    """What the mesh's routes say of other Services, for one mapping of
    them. Carried from one mapping to the next by the keys that changed:
    walking every route on every rebuild cost milliseconds a table at
    10,000 routes."""

    routes: Mapping[mesh.ServiceKey, routing.ServiceRoute]
    # The routes naming each Service among their backends: a route's
    # virtual hosts name its backends' ports.
    naming: dict[mesh.ServiceKey, frozenset[mesh.ServiceKey]]
    # The routes sending to label subsets of each Service, and those subsets
    # in the order their clusters are made.
    sending: dict[mesh.ServiceKey, frozenset[mesh.ServiceKey]]
    subsets: dict[mesh.ServiceKey, tuple[mesh.FrozenMap, ...]]
    # The mapping this index was carried from, and the keys whose routes
    # may differ from it.
    previous: Mapping[mesh.ServiceKey, routing.ServiceRoute] | None
    changed: frozenset[mesh.ServiceKey]

    def changed_since(
        self, routes: Mapping[mesh.ServiceKey, routing.ServiceRoute]
    ) -> frozenset[mesh.ServiceKey]:
        """The Services whose routes may differ between `routes` and this
        index's."""
        if routes is self.routes:
            return frozenset()
        if routes is self.previous:
            return self.changed
        return changes.differing(routes, self.routes)

    def naming_any(self, services: Iterable[mesh.ServiceKey]) -> set[mesh.ServiceKey]:
        """The routes naming any of `services` among their backends."""
        naming = self.naming
        return set().union(*(naming.get(k, ()) for k in services))


_NO_ROUTES = RouteIndex({}, {}, {}, {}, None, frozenset())


def route_index(last: RouteIndex | None, state: mesh.MeshState) -> RouteIndex:
    """The index of `state`'s routes, carried from `last` by the keys that
    changed (the registry's delta names them; else every key is compared)."""
    routes = state.routes
    if last is not None and last.routes is routes:
        return last
    base = _NO_ROUTES if last is None else last
    keys: Iterable[mesh.ServiceKey]
    if last is None:
        keys = routes.keys()
    else:
        found = state.routes_changed_since(last.routes)
        keys = found if found is not None else changes.differing(last.routes, routes)
    naming, sending = dict(base.naming), dict(base.sending)
    subsets = dict(base.subsets)
    targets: set[mesh.ServiceKey] = set()
    for key in keys:
        before, after = base.routes.get(key), routes.get(key)
        if before is after:
            continue
        for route, add in ((before, False), (after, True)):
            if route is None:
                continue
            for backend in route.backends():
                _file(naming, backend, key, add)
            for target, _ in route.subsets():
                _file(sending, target, key, add)
                targets.add(target)
    for target in targets:
        labels = {
            subset
            for key in sending.get(target, ())
            for t, subset in routes[key].subsets()
            if t == target
        }
        if labels:
            subsets[target] = tuple(sorted(labels, key=names.subset_name))
        else:
            subsets.pop(target, None)
    return RouteIndex(
        routes, naming, sending, subsets, None if last is None else last.routes, frozenset(keys)
    )


def _file(
    index: dict[mesh.ServiceKey, frozenset[mesh.ServiceKey]],
    under: mesh.ServiceKey,
    key: mesh.ServiceKey,
    add: bool,
) -> None:
    held = index.get(under, frozenset())
    held = held | {key} if add else held - {key}
    if held:
        index[under] = held
    else:
        index.pop(under, None)


@dataclass(frozen=True, slots=True)
class _CommonParts:
    """What the outbound tables over the same visible Services share."""

    visible: tuple[mesh.Service, ...]
    index: dict[mesh.ServiceKey, int]
    # As a caller in another namespace sees each Service.
    parts: list[HostsPart]
    encoded: list[bytes]
    digests: list[bytes]
    # Positions of each namespace's Services, and of those with Gateway API
    # routes (which may differ for every namespace).
    local: dict[str, list[int]]
    attached: list[int]


@dataclass
class Memos:
    """What one rebuild keeps for the next (see memo.Generations)."""

    # The last build, and the plain-text clusters of proxyless clients.
    built: Built | None = None
    service_clusters: memo.Generations[ServiceClusters, list[cache.Resource]] = field(
        default_factory=memo.Generations
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

    # Each Service's encoded virtual hosts, per kind of caller.
    virtual_hosts: memo.Generations[VirtualHosts, HostsPart] = field(
        default_factory=memo.Generations
    )
    # The outbound table last assembled for each namespace, whatever its
    # scope: a table whose scope is new (a Service came into it) starts
    # from it, since a Service's virtual hosts do not depend on the scope.
    outbound_by_namespace: memo.Generations[str, OutboundTable] = field(
        default_factory=memo.Generations
    )
    # The Services of each scope, with the mesh's Services they were picked
    # from: a rebuild that kept those (endpoints moved) keeps these.
    visible: memo.Generations[Scope, tuple[tuple[mesh.Service, ...], tuple[mesh.Service, ...]]] = (
        field(default_factory=memo.Generations)
    )
    # The index of the last mesh state's routes (a function of them alone).
    route_index: RouteIndex | None = None

    def publishing(self) -> None:
        """A rebuild that passed its check begins publishing."""
        self.headless.advance()
        self.route_tables.advance()
        self.outbound_by_namespace.advance()

    def carry(self) -> None:
        """This rebuild swapped groups in the last snapshots and looked at
        nothing else: what the last rebuild kept, the next may use. (Not
        `groups`: `Shared.replacing` puts every one of them again, and a
        group is patched with one build's moves, from the last build's.)"""
        kept: tuple[memo.Generations[Any, Any], ...] = (
            self.service_clusters,
            self.headless,
            self.route_tables,
            self.virtual_hosts,
            self.outbound_by_namespace,
            self.visible,
        )
        for generations in kept:
            generations.carry()


# RouteConfiguration's fields, by number: `name` and `virtual_hosts`.
_NAME = 1
_VIRTUAL_HOSTS = 2


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, as the encoder writes it."""
    out = bytearray()
    for value in (number << 3 | 2, len(payload)):
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


@functools.cache
def _not_found_field() -> bytes:
    """The last virtual host of every outbound table, encoded once: it
    never changes, and a route push would otherwise encode it per table."""
    return _field(_VIRTUAL_HOSTS, cache.encode(routes.not_found_host()))


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
    # Whether every Service is exported to every namespace: a proxy that
    # declares no dependencies then sees the whole mesh.
    everywhere: bool = False
    # Whether any Service's clusters (endpoints) differ from the last build's:
    # if not, the last groups of them are this state's.
    clusters_changed: bool = True
    endpoints_changed: bool = True
    # The Services whose endpoints alone changed since the last build, with
    # their lists then and now; None when the mesh's Services changed.
    endpoint_moves: EndpointMoves | None = None
    # What each proxy was last given from this build: the proxy it was for
    # and its snapshot's groups (see `replacing`). The groups, not the
    # snapshot: a replaced snapshot and the views worked out on it go when
    # the cache lets go of them, as they did before.
    published: dict[str, tuple[proxy.Proxy, Groups]] = field(default_factory=dict)
    _pods: capture.PodIndex = field(default_factory=dict)
    _interned: dict[Scope, Scope] = field(default_factory=dict)
    routes: RouteIndex = _NO_ROUTES
    _affected_memo: dict[
        tuple[int, ...], tuple[tuple[object, ...], frozenset[mesh.ServiceKey] | None]
    ] = field(default_factory=dict)
    _common: dict[int, _CommonParts] = field(default_factory=dict)
    _realigned_memo: dict[
        tuple[int, ...],
        tuple[
            tuple[mesh.Service, ...],
            tuple[mesh.Service, ...],
            frozenset[mesh.ServiceKey],
            list[int],
            list[int],
            dict[mesh.ServiceKey, int],
        ],
    ] = field(default_factory=dict)
    _pods_covered: set[tuple[str, str]] = field(default_factory=set)

    @functools.cached_property
    def label(self) -> str:
        """What the snapshots made from it say they are."""
        return f"mesh version {self.state.version}"

    # -- scopes ---------------------------------------------------------------

    def scope(
        self, namespace: str, dependencies: frozenset[tuple[str, str]] | None
    ) -> Scope | None:
        """The Services a proxy may call; None when that is all of them."""
        if dependencies is None and self.everywhere:
            return None
        key = ScopeOf(namespace, dependencies)
        found = self.by_dependencies.get(key)
        if found is None:
            made = scope.visible(self.services, self.state.routes, namespace, dependencies)
            # Equal scopes (namespaces that see the same Services) are one
            # object: the groups and tables of a scope are then found by
            # identity, not by comparing ten thousand keys per proxy.
            if not self._interned and self.by_dependencies:
                self._interned.update((s, s) for s in self.by_dependencies.values())
            found = self.by_dependencies[key] = self._interned.setdefault(made, made)
        return None if len(found) == len(self.services) else found

    def visible(self, in_scope: Scope | None) -> tuple[mesh.Service, ...]:
        if in_scope is None:
            return self.services
        # Asked for by each table and group of the scope, rebuild after
        # rebuild: with ten thousand Services, a pass over them each time
        # was half of an endpoint change in a mesh of scoped sidecars.
        found = self.memos.visible.get(in_scope)
        if found is None or found[0] is not self.services:
            found = self.memos.visible.put(
                in_scope, (self.services, tuple(s for s in self.services if s.key in in_scope))
            )
        return found[1]

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

            def keys() -> Sequence[mesh.ServiceKey]:
                if (
                    in_scope is None
                    and self.memos.built is not None
                    and self.memos.built.services is self.services
                ):
                    return self.memos.built.keys
                return [s.key for s in self.visible(in_scope)]

            self.groups[clusters_key] = self._group(
                clusters_key, self.clusters_changed, keys, self.clusters
            )
            self.groups[endpoints_key] = self._group(
                endpoints_key, self.endpoints_changed, keys, self.endpoints, self.endpoint_moves
            )
            if in_scope is not None:
                # A scope is closed over route backends, so its clusters'
                # endpoints are in it: it resolves if the whole mesh does.
                self.verified |= {
                    id(self.groups[clusters_key]),
                    id(self.groups[endpoints_key]),
                }
        return self.groups[clusters_key], self.groups[endpoints_key]

    def _group(
        self,
        key: ScopedGroup,
        changed: bool,
        keys: Callable[[], Sequence[mesh.ServiceKey]],
        by_service: dict[mesh.ServiceKey, list[cache.Resource]],
        moves: EndpointMoves | None = None,
    ) -> cache.ResourceGroup:
        """The last group of `key` when none of its kind changed; the last
        one with the moved Services' resources in place, when only those
        changed; else made anew (at C speed, from each Service's list)."""
        previous = self.memos.groups.get(key)
        if previous is not None and not changed:
            return self.memos.groups.put(key, previous)
        if previous is not None and moves is not None:
            # Most pushes move a few endpoints: each scope's group of ten
            # thousand is the last one with those few swapped.
            patched = _moved(previous, moves, key.scope)
            if patched is not None:
                return self.memos.groups.put(key, patched)
        group = cache.ResourceGroup(
            itertools.chain.from_iterable(map(by_service.__getitem__, keys()))
        )
        if key.scope is None and previous is not None:
            # Something in the whole mesh changed: it is not the same group.
            return self.memos.groups.put(key, group)
        return self.kept(key, group)

    def kept(self, key: ScopedGroup, group: cache.ResourceGroup) -> cache.ResourceGroup:
        """The last rebuild's group of that key if nothing in it changed: its
        views, and every proxy's views over it, stay the same objects."""
        previous = self.memos.groups.get(key)
        if previous is not None and previous.same_as(group):
            group = previous
        return self.memos.groups.put(key, group)

    def replacing(self, before: Shared) -> dict[int, cache.ResourceGroup] | None:
        """The endpoint groups (ENDPOINT) of `before` that this build
        replaces, by id (the snapshots made from `before` hold them), when
        each scope's clusters are the very group `before` had and each
        replacement names the same resources; None when not. (The other
        kinds of group, plain-text and headless clusters, are made from the
        Services and the identities behind them, which are then unchanged.)
        A snapshot made from `before` with those swapped is then what this
        build would make, and resolves as it did, provided nothing else a
        proxy's generator reads changed (see
        generators.endpoints_reach_only_scoped_groups)."""
        if (
            not before.whole
            or not self.whole
            or self.clusters_changed
            or self.endpoint_moves is None
            or before.trust_domain != self.trust_domain
        ):
            return None
        found: dict[int, cache.ResourceGroup] = {}
        for key, group in before.groups.items():
            if key.kind == "clusters":
                if self.scoped_groups(key.scope)[0] is not group:
                    return None
            elif key.kind == "endpoints":
                now = self.scoped_groups(key.scope)[1]
                if now is not group:
                    if not now.same_names(group):
                        return None
                    found[id(group)] = now
        return found

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

    def outbound_routes(self, namespace: str, in_scope: Scope | None) -> cache.ResourceGroup:
        """A sidecar's outbound route table, once per namespace, scope and
        rebuild: assembled from the encoded parts of the Services, and only
        those that changed since the last rebuild are encoded again (the
        bytes are what `sidecar.outbound_routes` serializes whole, checked
        by the tests, which would cost every Service each time)."""
        tables = self.memos.route_tables
        key = RouteTable(OUTBOUND_ROUTES, namespace, in_scope)
        fresh = tables.fresh(key)
        if fresh is not None:
            return fresh[1]
        found = tables.get(key)
        last = found[0] if found is not None else None
        if not isinstance(last, OutboundTable):
            last = self.memos.outbound_by_namespace.get(namespace)
        table = self._outbound(namespace, in_scope, last)
        self.memos.outbound_by_namespace.put(namespace, table)
        return tables.put(key, (table, table.group))[1]

    # -- outbound route tables, by parts ----------------------------------------

    def _outbound(
        self, namespace: str, in_scope: Scope | None, last: OutboundTable | None
    ) -> OutboundTable:
        visible = self.visible(in_scope)
        now_routes = self.state.routes
        sampling = self.state.telemetry.trace_sampling
        affected = None
        if last is not None and last.sampling == sampling:
            affected = self._affected(last.visible, visible, last.routes, now_routes)
        if last is None or affected is None:
            common = self._common_parts(visible)
            parts, encoded, digests = list(common.parts), list(common.encoded), list(common.digests)
            index = common.index
            own = list(itertools.chain(common.local.get(namespace, ()), common.attached))
            for i in own:
                parts[i] = part = self._hosts(visible[i], namespace)
                encoded[i], digests[i] = part.encoded, part.digest
            return OutboundTable(
                visible,
                now_routes,
                sampling,
                index,
                parts,
                encoded,
                digests,
                self._table_group(encoded, digests, frozenset().union(*[p.refs for p in parts])),
            )
        if len(visible) != len(last.visible):
            return self._resized(last, visible, namespace, affected)
        parts, index = last.parts, last.index
        redone = {
            at: self._hosts(visible[at], namespace)
            for k in affected
            if (at := index.get(k)) is not None
        }
        if all(part is parts[i] for i, part in redone.items()):
            return dataclasses.replace(last, visible=visible, routes=now_routes)
        parts, encoded, digests = list(parts), list(last.encoded), list(last.digests)
        for i, part in redone.items():
            parts[i], encoded[i], digests[i] = part, part.encoded, part.digest
        (resource,) = last.group
        table_refs = resource.refs
        if any(part.refs != last.parts[i].refs for i, part in redone.items()):
            table_refs = frozenset().union(*[p.refs for p in parts])
        group = self._table_group(encoded, digests, table_refs)
        return OutboundTable(visible, now_routes, sampling, index, parts, encoded, digests, group)

    def _resized(
        self,
        last: OutboundTable,
        visible: tuple[mesh.Service, ...],
        namespace: str,
        affected: frozenset[mesh.ServiceKey],
    ) -> OutboundTable:
        """A table whose Services came or went: the parts of the others
        carried over by position, the new and the affected made."""
        carried, redo, index = self._realigned(last.visible, last.index, visible, affected)
        # (-1: made below.)
        parts = [last.parts[j] if j >= 0 else _NO_PART for j in carried]
        encoded = [p.encoded for p in parts]
        digests = [p.digest for p in parts]
        for i in redo:
            parts[i] = part = self._hosts(visible[i], namespace)
            encoded[i], digests[i] = part.encoded, part.digest
        group = self._table_group(encoded, digests, frozenset().union(*[p.refs for p in parts]))
        return OutboundTable(
            visible, self.state.routes, last.sampling, index, parts, encoded, digests, group
        )

    def _realigned(
        self,
        old: tuple[mesh.Service, ...],
        old_index: Mapping[mesh.ServiceKey, int],
        new: tuple[mesh.Service, ...],
        affected: frozenset[mesh.ServiceKey],
    ) -> tuple[list[int], list[int], dict[mesh.ServiceKey, int]]:
        """For each position of `new`, where its part was in `old` (-1 for
        those to redo), those to redo, and the new index: once per rebuild
        for every table with the same inputs."""
        ids = (id(old), id(new), id(affected))
        found = self._realigned_memo.get(ids)
        # The key objects are kept and checked: an id is its object's only
        # while that object lives.
        if found is None or found[0] is not old or found[1] is not new or found[2] is not affected:
            index = {s.key: i for i, s in enumerate(new)}
            carried = [old_index.get(k, -1) if k not in affected else -1 for k in index]
            redo = [i for i, j in enumerate(carried) if j < 0]
            found = self._realigned_memo[ids] = (old, new, affected, carried, redo, index)
        return found[3], found[4], found[5]

    def _common_parts(self, visible: tuple[mesh.Service, ...]) -> _CommonParts:
        """The parts of a table that every namespace but a Service's own sees
        alike (those of Services without Gateway API routes), made once per
        set of visible Services: each table then redoes only its own
        namespace's Services."""
        found = self._common.get(id(visible))
        if found is None or found.visible is not visible:
            # A namespace that is none of the mesh's: as any other caller.
            parts = [self._hosts(s, "") for s in visible]
            local: dict[str, list[int]] = {}
            attached = []
            state_routes = self.state.routes
            for i, svc in enumerate(visible):
                local.setdefault(svc.namespace, []).append(i)
                route = state_routes.get(svc.key)
                if route is not None and route.attached:
                    attached.append(i)
            found = self._common[id(visible)] = _CommonParts(
                visible,
                {s.key: i for i, s in enumerate(visible)},
                parts,
                [p.encoded for p in parts],
                [p.digest for p in parts],
                local,
                attached,
            )
        return found

    def _affected(
        self,
        old: tuple[mesh.Service, ...],
        new: tuple[mesh.Service, ...],
        old_routes: Mapping[mesh.ServiceKey, routing.ServiceRoute],
        new_routes: Mapping[mesh.ServiceKey, routing.ServiceRoute],
    ) -> frozenset[mesh.ServiceKey] | None:
        """The Services whose virtual hosts may differ between two inputs of a
        table: those changed, come or gone, and those whose routes changed or
        name one of them. Worked out once per rebuild for every table with
        the same inputs. None if as many Services came as went (then the
        table is assembled anew: rare, and not worth a keyed comparison on
        every rebuild)."""
        inputs = (old, new, old_routes, new_routes)
        ids = tuple(map(id, inputs))
        memo = self._affected_memo.get(ids)
        # Its inputs are kept with it and checked: an id is its object's
        # only while that object lives.
        if memo is not None and all(map(operator.is_, memo[0], inputs)):
            return memo[1]
        found: frozenset[mesh.ServiceKey] | None = None
        changed: set[mesh.ServiceKey] | None = None
        if len(old) == len(new):
            # Compared by identity at C speed: the registry keeps the very
            # objects of what did not change.
            moved = list(map(operator.is_not, old, new))
            before = list(itertools.compress(old, moved))
            after = list(itertools.compress(new, moved))
            if all(a.key == b.key for a, b in zip(before, after, strict=True)):
                changed = {s.key for s in after}
        else:
            # Services came or went (rarer): compared by key.
            was = {s.key: s for s in old}
            now = {s.key: s for s in new}
            changed = {k for k in was.keys() | now.keys() if was.get(k) is not now.get(k)}
        if changed is not None:
            index = self.routes
            if index.routes is not new_routes:  # not this build's state: walked whole
                index = route_index(None, dataclasses.replace(self.state, routes=new_routes))
            changed.update(index.changed_since(old_routes))
            # A route's hosts name its backends' ports.
            changed.update(index.naming_any(changed))
            found = frozenset(changed)
        self._affected_memo[ids] = (inputs, found)
        return found

    def _hosts(self, svc: mesh.Service, namespace: str) -> HostsPart:
        """A Service's virtual hosts as seen from `namespace`, encoded."""
        state = self.state
        route = state.routes.get(svc.key)
        key = VirtualHosts(
            svc,
            route,
            () if route is None else tuple(state.services.get(k) for k in sorted(route.backends())),
            state.telemetry.trace_sampling,
            namespace if route is not None and route.attached else namespace == svc.namespace,
        )
        found = self.memos.virtual_hosts.get(key)
        if found is None:
            vhosts = routes.virtual_hosts(svc, namespace, state)
            encoded = b"".join(_field(_VIRTUAL_HOSTS, cache.encode(vh)) for vh in vhosts)
            found = self.memos.virtual_hosts.put(
                key,
                HostsPart(
                    encoded,
                    hashlib.blake2b(encoded, digest_size=8).digest(),
                    frozenset(refs.virtual_host_refs(vhosts)),
                ),
            )
        return found

    def _table_group(
        self, encoded: list[bytes], digests: list[bytes], table_refs: frozenset[tuple[str, str]]
    ) -> cache.ResourceGroup:
        """The table as `routes.outbound` encodes it (its name, then its
        virtual hosts, the last one for names not in the mesh), versioned
        by the digests of its parts: hashing megabytes per table and push
        would cost more than the rest of the push. Kept in its pieces, not
        joined: a table is megabytes at 10,000 Services, one per namespace,
        and joining each on every change was most of an annotation's cost
        (bench/ingest.py); a response joins them into its field once."""
        head = _field(_NAME, names.OUTBOUND_ROUTE.encode())
        tail = _not_found_field()
        pieces = (head, *encoded, tail)
        version = cache.content_version(head, b"".join(digests), tail)
        return cache.ResourceGroup(
            [cache.Resource(resources.ROUTE, names.OUTBOUND_ROUTE, pieces, version, table_refs)]
        )


def build(state: mesh.MeshState, memos: Memos, trust_domain: str | None) -> Shared:
    """Every Service's clusters and endpoints for `state`, and the whole
    mesh's groups of them (not yet checked: see Shared.whole).

    Only the Services whose inputs changed since the last build are
    visited: the registry keeps the objects of what did not change, so the
    others are found by identity, at C speed."""
    memos.service_clusters.advance()
    memos.groups.advance()
    memos.virtual_hosts.advance()
    memos.visible.advance()
    routes_index = memos.route_index = route_index(memos.route_index, state)
    its_subsets = routes_index.subsets
    last = memos.built
    if last is not None and last.trust_domain == trust_domain:
        found = _changes(last, state, its_subsets)
    else:
        found = None
    scopes_hold = False
    if found is None:
        services = tuple(state.sorted_services())
        redo: Iterable[mesh.ServiceKey] = [s.key for s in services]
        entries: dict[mesh.ServiceKey, _Entry] = {}
        shared = Shared(state, memos, trust_domain, services, {}, {})
        shared.clusters_changed = shared.endpoints_changed = True
        last_entries = last.entries if last is not None else {}
    else:
        services, redo, scopes_hold, gone = found
        assert last is not None
        entries = dict(last.entries)
        shared = Shared(
            state, memos, trust_domain, services, dict(last.clusters), dict(last.endpoints)
        )
        shared.clusters_changed = shared.endpoints_changed = False
        if scopes_hold:
            shared.by_dependencies = dict(last.scopes)
        last_entries = last.entries
        for key in gone:
            # A Service gone: its clusters and endpoints with it.
            del entries[key]
            shared.clusters.pop(key, None)
            shared.endpoints.pop(key, None)
            shared.clusters_changed = shared.endpoints_changed = True
    shared.routes = routes_index
    if found is not None and scopes_hold and last is not None:
        shared.everywhere = last.everywhere  # what Services are exported to did not change
    else:
        shared.everywhere = all(scope.EVERYONE in s.export_to for s in services)
    # Only where every Service is the last build's, in its place.
    moves: EndpointMoves | None = (
        {} if found is not None and last is not None and services is last.services else None
    )
    for key in redo:
        svc = state.services[key]
        entry = _entry(shared, svc, its_subsets.get(key, ()), last_entries.get(key))
        entries[key] = entry
        if shared.clusters.get(key) is not entry.clusters:
            shared.clusters[key] = entry.clusters
            shared.clusters_changed = True
        endpoint_list = [r for _, r in entry.assignments.values()]
        before = shared.endpoints.get(key)
        if (
            before is None
            or len(before) != len(endpoint_list)
            or any(map(operator.is_not, before, endpoint_list))
        ):
            shared.endpoints[key] = endpoint_list
            shared.endpoints_changed = True
            if moves is not None and before is not None:
                moves[key] = (before, endpoint_list)
            else:
                moves = None
    shared.endpoint_moves = moves
    if found is None or last is None or len(services) != len(last.keys) or gone:
        keys = tuple(s.key for s in services)
        index = {k: i for i, k in enumerate(keys)}
    else:
        keys, index = last.keys, last.index
    memos.built = Built(
        state,
        trust_domain,
        services,
        keys,
        index,
        its_subsets,
        entries,
        shared.clusters,
        shared.endpoints,
        shared.by_dependencies,
        shared.everywhere,
    )
    return shared


EndpointMoves = dict[mesh.ServiceKey, tuple[list[cache.Resource], list[cache.Resource]]]


def _moved(
    previous: cache.ResourceGroup, moves: EndpointMoves, in_scope: Scope | None
) -> cache.ResourceGroup | None:
    """`previous` with the moved Services' resources in place (itself if
    none of them is in the scope); None when a Service's resources are not
    the same names as before (a port or subset came or went)."""
    swapped: dict[str, cache.Resource] = {}
    for key, (before, after) in moves.items():
        if in_scope is not None and key not in in_scope:
            continue
        if len(before) != len(after):
            return None
        for b, a in zip(before, after, strict=True):
            if b.name != a.name:
                return None
            swapped[a.name] = a
    if not swapped:
        return previous
    return previous.replaced(swapped)


# The Services in order, those whose translation may differ from the last
# build's, whether every scope stays as it was, and the Services gone.
_Changes = tuple[tuple[mesh.Service, ...], set[mesh.ServiceKey], bool, frozenset[mesh.ServiceKey]]


def _changes(
    last: Built, state: mesh.MeshState, subsets: dict[mesh.ServiceKey, tuple[mesh.FrozenMap, ...]]
) -> _Changes | None:
    """The Services of `state` in order, those whose translation may differ
    from the last build's, and whether every scope stays as it was; None when
    the mesh does not have the same Services (it is then built whole, from
    each Service's entry)."""
    now = state.services
    delta = state.changed_since(last.state)
    if delta is not None:
        return _delta_changes(last, state, subsets, delta)
    if len(now) != len(last.keys) or now.keys() != last.entries.keys():
        return None
    keys = last.keys
    services = tuple(map(now.__getitem__, keys))
    moved = list(map(operator.is_not, last.services, services))
    redo = set(itertools.compress(keys, moved))
    # Scopes depend on what each Service is exported to and on route backends.
    scopes_hold = all(
        a.export_to == b.export_to
        for a, b in zip(
            itertools.compress(last.services, moved),
            itertools.compress(services, moved),
            strict=True,
        )
    )
    old_eps, new_eps = last.state.endpoints, state.endpoints
    if old_eps is not new_eps:
        redo.update(
            itertools.compress(
                keys, map(operator.is_not, map(old_eps.get, keys), map(new_eps.get, keys))
            )
        )
    old_routes, new_routes = last.state.routes, state.routes
    if old_routes is not new_routes:
        for k in old_routes.keys() | new_routes.keys():
            before, after = old_routes.get(k), new_routes.get(k)
            if before != after and _reaches(before, k) != _reaches(after, k):
                scopes_hold = False
    if last.subsets != subsets:
        redo.update(
            k for k in last.subsets.keys() | subsets.keys() if last.subsets.get(k) != subsets.get(k)
        )
    return services, redo, scopes_hold, frozenset()


def _delta_changes(
    last: Built,
    state: mesh.MeshState,
    subsets: dict[mesh.ServiceKey, tuple[mesh.FrozenMap, ...]],
    delta: mesh.Delta,
) -> _Changes:
    """`_changes` from the keys the registry says changed: no pass over
    the mesh at all."""
    now, entries = state.services, last.entries
    redo = {k for k in delta.services if k in now}  # not one that came and went since
    services: Sequence[mesh.Service]
    if any((k in now) != (k in entries) for k in delta.services):
        # Services came or went: the order is made anew, and every scope
        # (what a Service is exported to decides who sees it); the other
        # Services' entries stay.
        services = state.sorted_services()
        scopes_hold = False
        gone = frozenset(k for k in delta.services if k not in now and k in entries)
    else:
        gone = frozenset()
        scopes_hold = True
        if redo:
            services = list(last.services)
            for k in redo:
                at = last.index[k]
                before, services[at] = services[at], now[k]
                scopes_hold = scopes_hold and before.export_to == services[at].export_to
        else:
            # The very tuple: what was worked out from it (each scope's
            # Services, its groups) holds as it is.
            services = last.services
    old_routes, new_routes = last.state.routes, state.routes
    for k in delta.routes:
        if _reaches(old_routes.get(k), k) != _reaches(new_routes.get(k), k):
            scopes_hold = False
    redo.update(k for k in delta.endpoints if k in now)
    if last.subsets != subsets:
        redo.update(
            k
            for k in last.subsets.keys() | subsets.keys()
            if last.subsets.get(k) != subsets.get(k) and k in now
        )
    return tuple(services), redo, scopes_hold, gone


def _reaches(
    route: routing.ServiceRoute | None, key: mesh.ServiceKey
) -> frozenset[mesh.ServiceKey]:
    """The other Services a route sends to: what it adds to a scope."""
    return frozenset() if route is None else route.backends() - {key}


def _entry(
    shared: Shared,
    svc: mesh.Service,
    its_subsets: tuple[mesh.FrozenMap, ...],
    last: _Entry | None,
) -> _Entry:
    """One Service's clusters and ClusterLoadAssignments, reusing what its
    last entry made from the same inputs."""
    state = shared.state
    key = ServiceClusters(svc, shared.peers(svc), its_subsets)
    if last is not None and last.key == key:
        built = last.clusters
    else:
        built = resource_list(
            resources.CLUSTER, clusters.outbound_for_service(svc, key.peers, its_subsets)
        )
        if last is not None and [r.version for r in built] == [r.version for r in last.clusters]:
            # The same clusters (an annotation they do not read changed):
            # the very resources, so that the groups over them stay too.
            built = last.clusters
    assignments: dict[Assignment, tuple[tuple[mesh.Endpoint, ...], cache.Resource]] = {}
    before = last.assignments if last is not None else {}
    for port in svc.ports:
        for subset in (None, *its_subsets):
            eps = state.endpoints_of(svc.key, port)
            if subset is not None:
                eps = tuple(e for e in eps if all(e.labels.get(k) == v for k, v in subset.items()))
            assignment = Assignment(svc.key, port, subset)
            found = before.get(assignment)
            # Endpoints are compared, not hashed into the key: the same
            # objects when unchanged, so the comparison is by identity.
            if found is None or found[0] != eps:
                cla = endpoints.load_assignment(names.outbound_cluster(svc.key, port, subset), eps)
                found = (eps, resource(resources.ENDPOINT, cla))
            assignments[assignment] = found
    return _Entry(key, built, assignments)
