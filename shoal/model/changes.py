"""What changed between two mesh states: the subject of a push, in words a
log line or the dashboard can show."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TypeVar

from shoal.model import mesh

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class ChangeSet:
    """Keys of what was added, removed or changed, by kind of object."""

    services: frozenset[mesh.ServiceKey] = frozenset()
    endpoints: frozenset[mesh.ServiceKey] = frozenset()
    routes: frozenset[mesh.ServiceKey] = frozenset()
    namespaces: frozenset[str] = frozenset()
    pods: frozenset[tuple[str, str]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.services or self.endpoints or self.routes or self.namespaces or self.pods)

    def summary(self, most: int = 3) -> str:
        """ "endpoints of shop/reviews; route of shop/web" (`most` named per
        kind, then a count)."""
        parts = []
        for label, keys in (
            ("Service", self.services),
            ("endpoints of", self.endpoints),
            ("route of", self.routes),
            ("namespace", self.namespaces),
            ("Pod", {f"{ns}/{name}" for ns, name in self.pods}),
        ):
            if not keys:
                continue
            named = sorted(str(k) for k in keys)
            more = f" and {len(named) - most} more" if len(named) > most else ""
            parts.append(f"{label} {', '.join(named[:most])}{more}")
        return "; ".join(parts) or "nothing in the mesh"


def between(before: mesh.MeshState, after: mesh.MeshState) -> ChangeSet:
    """What differs. Registries keep the objects of what did not change, so
    most comparisons are by identity."""
    if before is after:
        return ChangeSet()
    delta = after.changed_since(before)
    if delta is not None:
        # The registry said which keys: only those are compared.
        return ChangeSet(
            services=differing_among(delta.services, before.services, after.services),
            endpoints=differing_among(delta.endpoints, before.endpoints, after.endpoints),
            routes=differing_among(delta.routes, before.routes, after.routes),
            namespaces=differing_among(delta.namespaces, before.namespaces, after.namespaces),
            pods=differing_among(delta.pods, before.pods, after.pods),
        )
    return ChangeSet(
        services=differing(before.services, after.services),
        endpoints=differing(before.endpoints, after.endpoints),
        routes=differing(before.routes, after.routes),
        namespaces=differing(before.namespaces, after.namespaces),
        pods=differing(before.pods, after.pods),
    )


def differing_among(
    keys: AbstractSet[K], before: Mapping[K, object], after: Mapping[K, object]
) -> frozenset[K]:
    """Those of `keys` whose values differ (or that were added or removed)."""
    out = set()
    for key in keys:
        old, new = before.get(key), after.get(key)
        if old is not new and old != new:
            out.add(key)
    return frozenset(out)


def differing(before: Mapping[K, object], after: Mapping[K, object]) -> frozenset[K]:
    """The keys whose values differ (or that were added or removed), each
    value compared only where it is not the very object of `before`."""
    if before is after:
        return frozenset()
    out: set[K] = set()
    found = 0
    for key, value in after.items():
        old = before.get(key)
        if old is None:
            out.add(key)
            continue
        found += 1
        if old is not value and old != value:
            out.add(key)
    if found != len(before):
        # Some went: only then are the keys compared as sets (each key
        # hashed once more; at 10,000 Services that is milliseconds).
        out.update(before.keys() - after.keys())
    return frozenset(out)
