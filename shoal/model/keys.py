"""The model's keys: what names a Service and the maps that label things.

Apart from the rest of the model so that routing and the mesh can both use
them without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

CLUSTER_DOMAIN = "cluster.local"


class FrozenMap(Mapping[str, str]):
    """A read-only, hashable string map (labels, annotations).

    Hashable so that model objects can key memo tables: translation of an
    unchanged Service is looked up, not redone.
    """

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(sorted(items.items())) if items else {}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self._items.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._items == other._items
        return isinstance(other, Mapping) and self._items == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


_EMPTY = FrozenMap()


def frozen_map(items: Mapping[str, str] | None = None) -> FrozenMap:
    """A read-only copy, so a model object cannot be changed behind a snapshot."""
    return FrozenMap(items) if items else _EMPTY


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    namespace: str
    name: str
    # Made once: keys are looked up in maps of ten thousand Services, several
    # times per Service and push.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.namespace, self.name)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        # Identity first: maps keyed by the Services' own keys are looked up
        # with those very objects.
        if self is other:
            return True
        if not isinstance(other, ServiceKey):
            return NotImplemented
        return (
            self._hash == other._hash
            and self.namespace == other.namespace
            and self.name == other.name
        )

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"
