"""How calls to a Service are routed: ordered rules, each to weighted backends."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shoal.model import keys


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"
    # A path prefix of whole segments (the Gateway API's PathPrefix): `/v2`
    # matches `/v2` and `/v2/x`, never `/v2x`.
    SEGMENTS = "segments"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    kind: MatchKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class Backend:
    """A weighted destination: a Service, optionally a label subset of it.

    `port` names the Service port to call (the Gateway API's backendRef
    port; None: the one standing in for the port called). A `missing`
    backend is one a route names that cannot be reached: its share of the
    requests is answered 500, as the Gateway API says."""

    service: keys.ServiceKey
    weight: int = 100
    subset: keys.FrozenMap = field(default_factory=keys.FrozenMap)
    port: int | None = None
    missing: bool = False


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: MatchKind  # EXACT, PREFIX or REGEX
    value: str


@dataclass(frozen=True, slots=True)
class HeaderChange:
    """Headers set (replacing), added (appended) and removed, by name."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathChange:
    """A new path: the whole of it (`full`), or the matched prefix replaced."""

    full: bool
    value: str


@dataclass(frozen=True, slots=True)
class Redirect:
    """Answer with a redirect; parts left None keep the request's."""

    status: int = 302
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path: PathChange | None = None


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Change the request on its way to the backend."""

    hostname: str | None = None
    path: PathChange | None = None


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Requests matching every condition go to the backends (first rule wins).

    Policies left None fall back to the route's own. A rule with neither
    backends nor a redirect answers `status` itself."""

    backends: tuple[Backend, ...]
    headers: tuple[HeaderMatch, ...] = ()
    path: PathMatch | None = None
    method: str | None = None
    query: tuple[HeaderMatch, ...] = ()
    timeout_s: float | None = None
    retry: Retry | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    # What the Gateway API adds: the rule's name (for logs and spans),
    # header changes, redirects, rewrites, more mirrors, a per-try timeout.
    name: str = ""
    request_headers: HeaderChange | None = None
    response_headers: HeaderChange | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    backend_timeout_s: float | None = None
    status: int | None = None
    # What the share of a backend that cannot be reached is answered: 500,
    # and 503 for gRPC (which callers see as UNAVAILABLE), as the Gateway
    # API says.
    unreachable_status: int = 500


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int
    retry_on: str = "5xx,reset,connect-failure"
    per_try_timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    """Injected failures, each applied to a share (percent) of requests."""

    abort_status: int | None = None
    abort_percent: float = 0.0
    delay_s: float | None = None
    delay_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class Mirror:
    service: keys.ServiceKey
    percent: float = 100.0
    port: int | None = None  # None: the port standing in for the one called


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """The routing of one Service; its last rule matches everything."""

    service: keys.ServiceKey
    rules: tuple[RouteRule, ...]
    source: str = ""  # where it came from: annotations, or a TrafficRoute
    timeout_s: float | None = None
    retry: Retry | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None
    # Gateway API routes attached to the Service: for the ports and the
    # callers one applies to, they route instead of `rules` (README,
    # "Gateway API").
    attached: tuple[AttachedRoute, ...] = ()
    # Made once: translation asks every route of the mesh for them on every
    # rebuild, and the registry keeps the objects of routes that did not change.
    _backends: frozenset[keys.ServiceKey] = field(init=False, repr=False, compare=False)
    _subsets: frozenset[tuple[keys.ServiceKey, keys.FrozenMap]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "_backends",
            _targets(self.rules, self.mirror).union(*(a.backends() for a in self.attached)),
        )
        object.__setattr__(
            self,
            "_subsets",
            frozenset((b.service, b.subset) for r in self.rules for b in r.backends if b.subset),
        )

    def backends(self) -> frozenset[keys.ServiceKey]:
        """Every Service this route sends traffic (or copies of it) to."""
        return self._backends

    def subsets(self) -> frozenset[tuple[keys.ServiceKey, keys.FrozenMap]]:
        """Label subsets of Services this route sends to."""
        return self._subsets


def _targets(
    rules: tuple[RouteRule, ...], mirror: Mirror | None = None
) -> frozenset[keys.ServiceKey]:
    targets = {b.service for r in rules for b in r.backends if not b.missing}
    for m in (mirror, *(r.mirror for r in rules), *(m for r in rules for m in r.mirrors)):
        if m is not None:
            targets.add(m.service)
    return frozenset(targets)


@dataclass(frozen=True, slots=True)
class AttachedRoute:
    """A Gateway API route (HTTPRoute, GRPCRoute) attached to one Service.

    A producer route (in the Service's namespace) routes every caller; a
    consumer route (`consumer`: its own namespace) only callers in that
    namespace, for whom it replaces the producer's. `port` None: every port
    of the Service. `rules` are one per match, each with its `order`: the
    Gateway API's precedence, so that rules of several routes merge by
    sorting."""

    service: keys.ServiceKey
    origin: str  # "HTTPRoute shop/reviews-canary"
    rules: tuple[RouteRule, ...]
    order: tuple[tuple[object, ...], ...]
    port: int | None = None
    consumer: str | None = None
    grpc: bool = False

    def backends(self) -> frozenset[keys.ServiceKey]:
        return _targets(self.rules)

    def applies(self, port: int, caller_namespace: str | None) -> bool:
        if self.port is not None and self.port != port:
            return False
        return self.consumer is None or self.consumer == caller_namespace


def attached_rules(
    attached: tuple[AttachedRoute, ...], port: int, caller_namespace: str | None
) -> tuple[RouteRule, ...] | None:
    """The merged rules of the Gateway API routes that route a call from
    `caller_namespace` to `port`, most specific first; None when none does.

    A caller's own namespace's consumer routes replace the producer's; a
    GRPCRoute wins over an HTTPRoute on the same port (GEP-1426)."""
    applying = [a for a in attached if a.applies(port, caller_namespace)]
    consumers = [a for a in applying if a.consumer is not None]
    chosen = consumers or [a for a in applying if a.consumer is None]
    if any(a.grpc for a in chosen):
        chosen = [a for a in chosen if a.grpc]
    if not chosen:
        return None
    # The order names the route, its rule and match: a route attached twice
    # (by port and by name) counts once.
    merged = {order: rule for a in chosen for order, rule in zip(a.order, a.rules, strict=True)}
    return tuple(merged[order] for order in sorted(merged))
