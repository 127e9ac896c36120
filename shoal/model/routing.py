"""How calls to a Service are routed: ordered rules, each to weighted backends."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shoal.model import mesh


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

    service: mesh.ServiceKey
    weight: int = 100
    subset: mesh.FrozenMap = field(default_factory=mesh.FrozenMap)


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Requests matching every header match go to the backends (first rule wins)."""

    backends: tuple[Backend, ...]
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """The routing of one Service; its last rule matches everything."""

    service: mesh.ServiceKey
    rules: tuple[RouteRule, ...]
    source: str = ""  # where it came from: annotations, or a TrafficRoute

    def backends(self) -> frozenset[mesh.ServiceKey]:
        return frozenset(b.service for r in self.rules for b in r.backends)
