"""What the mesh is made of, independent of where it was read from.

Everything here is immutable so that one snapshot can be shared by every
translation that runs against it without copying or locking.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

from shoal import spiffe
from shoal.model import keys, routing

DEFAULT_TRUST_DOMAIN = "cluster.local"
CLUSTER_DOMAIN = keys.CLUSTER_DOMAIN


FrozenMap = keys.FrozenMap
frozen_map = keys.frozen_map
ServiceKey = keys.ServiceKey
_EMPTY = keys.frozen_map()


def _fields_of(obj: object) -> tuple[object, ...]:
    """The values a dataclass compares by, for a hash made once."""
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj) if f.compare)  # type: ignore[arg-type]


class Protocol(enum.Enum):
    HTTP = "http"
    HTTP2 = "http2"
    GRPC = "grpc"
    TCP = "tcp"

    @property
    def is_http(self) -> bool:
        return self is not Protocol.TCP


@dataclass(frozen=True, slots=True)
class Telemetry:
    """Mesh-wide tracing and access-log settings (`shoal serve` flags); a
    Service or Namespace annotation overrides them for its own traffic."""

    # Percent of requests that start a trace (one that arrives with a
    # sampling decision keeps it).
    trace_sampling: float = 1.0
    # One JSON line per request on each sidecar's stdout.
    access_log: bool = False
    # Where spans go: None, the control plane's embedded collector (a
    # cluster in every sidecar's bootstrap); else an external Zipkin-protocol
    # endpoint, reached through a cluster served over CDS.
    external: ZipkinEndpoint | None = None


@dataclass(frozen=True, slots=True)
class ZipkinEndpoint:
    """A Zipkin v2 (JSON) endpoint: Zipkin, Jaeger's or the OpenTelemetry
    Collector's Zipkin receiver."""

    host: str
    port: int
    path: str = "/api/v2/spans"
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Port:
    """A port the Service offers to callers (the number in `Host: web:80`)."""

    port: int
    name: str = ""
    protocol: Protocol = Protocol.HTTP
    target_port: int | str | None = None


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_5xx: int = 5
    ejection_s: float = 30.0
    max_ejection_percent: int = 50


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int | None = None
    max_pending_requests: int | None = None
    max_requests: int | None = None


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    ports: tuple[Port, ...]
    annotations: FrozenMap = field(default=_EMPTY)
    labels: FrozenMap = field(default=_EMPTY)
    cluster_ip: str | None = None
    # Namespaces whose proxies may call it ("*": every namespace).
    export_to: frozenset[str] = frozenset({"*"})
    # (namespace, name or "*") its own workloads call; None: no narrowing.
    dependencies: frozenset[tuple[str, str]] | None = None
    # "strict" or "permissive" mutual TLS on its inbound; None: its namespace's.
    mtls: str | None = None
    # Callers allowed, as (namespace, service account or "*"); None: everyone;
    # empty: nobody (what a malformed policy becomes: it fails closed).
    allow: frozenset[tuple[str, str]] | None = None
    # Eject an endpoint after this many consecutive 5xx, for this long.
    outlier: OutlierPolicy | None = None
    limits: ConnectionLimits | None = None
    # Percent of requests to it that start a trace; None: the mesh's.
    trace_sampling: float | None = None
    # Access logs of its sidecars; None: its namespace's, else the mesh's.
    access_log: bool | None = None
    # Made once: translation asks for it hundreds of thousands of times.
    key: ServiceKey = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ServiceKey(self.namespace, self.name))
        object.__setattr__(self, "_hash", hash(_fields_of(self)))

    def __hash__(self) -> int:
        # Services key the translation memos: hashed once, not per lookup.
        return self._hash

    def port_named(self, name: str) -> Port | None:
        return next((p for p in self.ports if p.name == name), None)

    @property
    def headless(self) -> bool:
        """No virtual IP: callers reach its endpoints' own addresses.

        Kubernetes spells it `clusterIP: None`; a Service read without one
        (a manifests folder) is headless too, which only matters where
        traffic is captured by address."""
        return self.cluster_ip is None or self.cluster_ip == "None"


@dataclass(frozen=True, slots=True)
class Identity:
    """A workload identity; rendered as a SPIFFE ID."""

    namespace: str
    service_account: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def spiffe_id(self) -> str:
        return spiffe.workload_id(self.trust_domain, self.namespace, self.service_account)

    def __str__(self) -> str:
        return self.spiffe_id


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address:port that serves one port of a Service.

    `port_name` ties it to the Service port it serves, as EndpointSlice port
    names tie slice ports to Service ports in Kubernetes.
    """

    address: str
    port: int
    port_name: str = ""
    ready: bool = True
    labels: FrozenMap = field(default=_EMPTY)
    service_account: str = "default"
    pod: str | None = None
    zone: str | None = None
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(_fields_of(self)))

    def __hash__(self) -> int:
        # Tuples of endpoints key the endpoint memos, ten thousand at a time.
        return self._hash


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: FrozenMap = field(default=_EMPTY)
    annotations: FrozenMap = field(default=_EMPTY)
    # Default mutual-TLS mode of its Services ("strict" or "permissive").
    mtls: str | None = None
    # Default access-log switch of its Services' sidecars; None: the mesh's.
    access_log: bool | None = None


@dataclass(frozen=True, slots=True)
class Pod:
    """A Pod, sidecar or not. Its service account is the identity of the
    endpoints it backs; a captured sidecar in it is configured for it.

    The uid tells a Pod from its successor of the same name (a StatefulSet
    replica comes back as `db-0` again), so a proxy of the old one is not
    given the new one's configuration."""

    namespace: str
    name: str
    uid: str
    ip: str = ""
    service_account: str = "default"
    labels: FrozenMap = field(default=_EMPTY)
    # Whether it runs shoal's proxy container: injected, or written by hand.
    sidecar: bool = False
    # Left out of injection on purpose (`shoal.io/inject: "false"`), or on
    # the node's network, which the injector never changes.
    opted_out: bool = False
    # Its containers have stopped for good (phase Succeeded or Failed):
    # it sends and serves nothing, sidecar or not.
    finished: bool = False


@dataclass(frozen=True, slots=True)
class Delta:
    """The keys in which a state differs from the one a registry built before
    it: those added, removed or changed, as `changes.between` would find by
    comparing every key. It names that state by its mappings (held, so that
    they are the very objects); `prior` is the delta of that state in turn,
    so a consumer that skipped states adds them up. Its own state's mappings
    are named too: a copy of the state with other mappings
    (`dataclasses.replace`) does not claim it."""

    base: tuple[Mapping[object, object], ...]
    own: tuple[int, ...]
    services: frozenset[ServiceKey] = frozenset()
    endpoints: frozenset[ServiceKey] = frozenset()
    routes: frozenset[ServiceKey] = frozenset()
    namespaces: frozenset[str] = frozenset()
    pods: frozenset[tuple[str, str]] = frozenset()
    prior: Delta | None = None
    # How many deltas back `prior` reaches, bounded by the registry.
    depth: int = 1


@dataclass(frozen=True, slots=True)
class MeshState:
    """One consistent view of the mesh. `version` grows with every change."""

    version: int = 0
    services: Mapping[ServiceKey, Service] = field(default_factory=dict)
    endpoints: Mapping[ServiceKey, tuple[Endpoint, ...]] = field(default_factory=dict)
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    service_accounts: frozenset[tuple[str, str]] = frozenset()
    # Routing of Services that have more than "all to my own endpoints".
    routes: Mapping[ServiceKey, routing.ServiceRoute] = field(default_factory=dict)
    # Pods by (namespace, name); only Kubernetes registries know them.
    pods: Mapping[tuple[str, str], Pod] = field(default_factory=dict)
    telemetry: Telemetry = Telemetry()
    # What changed since the registry's previous state, where it knows.
    delta: Delta | None = field(default=None, compare=False, repr=False)

    def mappings(self) -> tuple[Mapping[object, object], ...]:
        """The mappings a Delta describes, in its order."""
        return (self.services, self.endpoints, self.routes, self.namespaces, self.pods)  # type: ignore[return-value]

    def changed_since(self, before: MeshState) -> Delta | None:
        """The keys that may differ from `before` (those that do, and where
        states were skipped some that changed back), if this state's deltas
        reach it; None when only a comparison of every key can tell."""
        delta = self.delta
        if delta is None or delta.own != tuple(map(id, self.mappings())):
            return None
        wanted = before.mappings()
        found: list[Delta] = []
        while delta is not None:
            found.append(delta)
            if all(map(operator.is_, delta.base, wanted)):
                if len(found) == 1:
                    return delta
                return Delta(
                    delta.base,
                    found[0].own,
                    frozenset().union(*(d.services for d in found)),
                    frozenset().union(*(d.endpoints for d in found)),
                    frozenset().union(*(d.routes for d in found)),
                    frozenset().union(*(d.namespaces for d in found)),
                    frozenset().union(*(d.pods for d in found)),
                )
            delta = delta.prior
        return None

    def routes_changed_since(
        self, routes: Mapping[ServiceKey, routing.ServiceRoute]
    ) -> frozenset[ServiceKey] | None:
        """The Services whose routes may differ from those of `routes`, a
        mapping of an earlier state, if this state's deltas reach one that
        held it; None when only a comparison of every key can tell."""
        if self.routes is routes:
            return frozenset()
        delta = self.delta
        if delta is None or delta.own != tuple(map(id, self.mappings())):
            return None
        found: list[frozenset[ServiceKey]] = []
        while delta is not None:
            found.append(delta.routes)
            if delta.base[2] is routes:
                return frozenset().union(*found)
            delta = delta.prior
        return None

    def endpoints_moved_since(self, before: MeshState) -> frozenset[ServiceKey] | None:
        """The Services whose endpoints may differ from `before`'s, when
        nothing else does; None when something else may (a Service, a
        route, a namespace, a Pod, service accounts or telemetry)."""
        if self is before:
            return frozenset()
        if self.service_accounts != before.service_accounts or self.telemetry != before.telemetry:
            return None
        delta = self.changed_since(before)
        if delta is not None:
            if delta.services or delta.routes or delta.namespaces or delta.pods:
                return None
            return delta.endpoints
        # Without the registry's delta, unchanged mappings are the very objects.
        if (
            self.services is not before.services
            or self.routes is not before.routes
            or self.namespaces is not before.namespaces
            or self.pods is not before.pods
        ):
            return None
        now, then = self.endpoints, before.endpoints
        return frozenset(k for k in now.keys() | then.keys() if now.get(k) is not then.get(k))

    def endpoints_of(self, key: ServiceKey, port: Port) -> tuple[Endpoint, ...]:
        """Endpoints serving `port`: matched by port name, as Kubernetes does."""
        return tuple(e for e in self.endpoints.get(key, ()) if e.port_name == port.name)

    def service_accounts_of(self, key: ServiceKey) -> frozenset[str]:
        """The service accounts callers accept behind the Service `key`: those
        its endpoints declare (a Pod's, or the EndpointSlice's), `default`
        when it has none. One rule for translation and its analyzers."""
        return frozenset({e.service_account for e in self.endpoints.get(key, ())} or {"default"})

    def sorted_services(self) -> list[Service]:
        return sorted(self.services.values(), key=lambda s: (s.namespace, s.name))
