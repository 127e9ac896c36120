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


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    kind: MatchKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class Backend:
    """A weighted destination: a Service, optionally a label subset of it."""

    service: keys.ServiceKey
    weight: int = 100
    subset: keys.FrozenMap = field(default_factory=keys.FrozenMap)


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: MatchKind  # EXACT, PREFIX or REGEX
    value: str


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Requests matching every condition go to the backends (first rule wins).

    Policies left None fall back to the route's own."""

    backends: tuple[Backend, ...]
    headers: tuple[HeaderMatch, ...] = ()
    path: PathMatch | None = None
    method: str | None = None
    query: tuple[HeaderMatch, ...] = ()
    timeout_s: float | None = None
    retry: Retry | None = None
    fault: Fault | None = None
    mirror: Mirror | None = None


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

    def backends(self) -> frozenset[keys.ServiceKey]:
        """Every Service this route sends traffic (or copies of it) to."""
        targets = {b.service for r in self.rules for b in r.backends}
        for mirror in (self.mirror, *(r.mirror for r in self.rules)):
            if mirror is not None:
                targets.add(mirror.service)
        return frozenset(targets)

    def subsets(self) -> frozenset[tuple[keys.ServiceKey, keys.FrozenMap]]:
        """Label subsets of Services this route sends to."""
        return frozenset((b.service, b.subset) for r in self.rules for b in r.backends if b.subset)
