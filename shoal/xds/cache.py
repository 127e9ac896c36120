"""Serialized resources, grouped into per-proxy snapshots, and watches on them.

The seam between building configuration and serving it: the controller puts
snapshots in, the server watches them and never builds anything. A resource
is serialized once per content version; every proxy that gets it is sent the
same bytes, down to the pre-encoded protobuf field of a DiscoveryResponse.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import Message

from shoal.xds import memo, wire

log = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")

# Count of protobuf messages encoded into resources, whole or as a part of
# one; the benchmarks read it to show that a push encodes what changed, not
# one copy per proxy and not the unchanged rest of a table.
_serialized = 0


def serialization_count() -> int:
    return _serialized


def encode(message: Message) -> bytes:
    """A resource, or a part of one, in its deterministic encoding."""
    global _serialized
    _serialized += 1
    return message.SerializeToString(deterministic=True)


def content_version(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class Resource:
    """One named xDS resource, serialized once."""

    type_url: str
    name: str
    # Its encoded message, whole or in the pieces it was assembled from (a
    # route table of every Service's virtual hosts): pieces are joined only
    # into a response's field, once per version, and not into a body first.
    content: bytes | tuple[bytes, ...]
    version: str
    # Resources this one names (type URL, name): a route's clusters, a
    # cluster's endpoints. Used to check a snapshot is whole and to order
    # pushes make-before-break, without the server reading any config.
    refs: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def from_message(
        cls,
        type_url: str,
        name: str,
        message: Message,
        refs: frozenset[tuple[str, str]] = frozenset(),
    ) -> Resource:
        body = encode(message)
        return cls(type_url, name, body, content_version(body), refs)

    @property
    def body(self) -> bytes:
        """The encoded message (joined anew from pieces: for dumps and tests)."""
        content = self.content
        return content if isinstance(content, bytes) else b"".join(content)

    @property
    def size(self) -> int:
        content = self.content
        return len(content) if isinstance(content, bytes) else sum(map(len, content))

    def _pieces(self) -> tuple[bytes, ...]:
        content = self.content
        return (content,) if isinstance(content, bytes) else content

    @cached_property
    def sotw_field(self) -> bytes:
        """`resources` (field 2) of a DiscoveryResponse, ready to concatenate."""
        return wire.sotw_resource(self.type_url, self._pieces())

    @cached_property
    def delta_field(self) -> bytes:
        """`resources` (field 2) of a DeltaDiscoveryResponse: a Resource
        message with version (1), resource (2) and name (3)."""
        return wire.delta_resource(self.version, self.type_url, self._pieces(), self.name)

    def as_any(self) -> any_pb2.Any:
        """For config dumps and tests; never on the push path."""
        return any_pb2.Any(type_url=self.type_url, value=self.body)


@dataclass(frozen=True, eq=False)
class View:
    """What one response of a type carries: resources, their combined version
    and their pre-encoded fields. A view over several groups keeps its parts,
    so work on it (encoding, diffs) is done per shared part, once."""

    version: str
    own: tuple[Resource, ...]
    parts: tuple[View, ...] = ()

    @property
    def resources(self) -> tuple[Resource, ...]:
        # Joined on each call, not kept: a proxy's composite view lives as
        # long as its stream, and a thousand copies of the mesh's clusters
        # would be a thousand streams' worth of memory.
        if self.parts:
            return tuple(r for p in self.parts for r in p.resources)
        return self.own

    @property
    def encoded(self) -> bytes:
        """The `resources` fields of a state-of-the-world response."""
        return b"".join(self.chunks())

    def chunks(self) -> tuple[bytes, ...]:
        """`encoded` in pieces, each kept by a shared view: a response is
        joined from them once (wire.sotw_response), and no proxy's
        composite keeps a copy of its parts' bytes, which with ten thousand
        clusters would be megabytes per stream."""
        if self.parts:
            return tuple(c for p in self.parts for c in p.chunks())
        return (self._own_encoded,)

    @cached_property
    def _own_encoded(self) -> bytes:
        return b"".join(r.sotw_field for r in self.own)

    @property
    def versions(self) -> dict[str, str]:
        """Version by name: kept for a flat view, made per call for a composite."""
        if self.parts:
            return {r.name: r.version for r in self.resources}
        return self._own_versions

    @cached_property
    def _own_versions(self) -> dict[str, str]:
        return {r.name: r.version for r in self.own}

    @cached_property
    def names(self) -> AbstractSet[str]:
        if self.parts:
            return UnionSet(tuple(p.names for p in self.parts))
        return frozenset(r.name for r in self.own)

    @cached_property
    def refs(self) -> AbstractSet[tuple[str, str]]:
        if self.parts:
            return UnionSet(tuple(p.refs for p in self.parts))
        return frozenset(ref for r in self.own for ref in r.refs)


class UnionSet(AbstractSet[T]):
    """The union of sets, without copying them: views over shared groups
    answer for their parts, and per-proxy unions of a thousand names each
    would cost every stream tens of kilobytes."""

    __slots__ = ("__weakref__", "_parts")

    def __init__(self, parts: tuple[AbstractSet[T], ...]) -> None:
        self._parts = tuple(p for p in parts if p)

    @classmethod
    def _from_iterable(cls, it: Iterable[S]) -> AbstractSet[S]:
        # What set operations on it (`|`, `-`, `&`) return: a plain set.
        return frozenset(it)

    def __contains__(self, item: object) -> bool:
        return any(item in p for p in self._parts)

    def __iter__(self) -> Iterator[T]:
        if len(self._parts) == 1:
            yield from self._parts[0]
            return
        seen: set[T] = set()
        for part in self._parts:
            for item in part:
                if item not in seen:
                    seen.add(item)
                    yield item

    def __len__(self) -> int:
        if len(self._parts) == 1:
            return len(self._parts[0])
        return sum(1 for _ in self)

    def __hash__(self) -> int:
        return self._hash()


def make_view(items: Iterable[Resource]) -> View:
    ordered = tuple(sorted(items, key=lambda r: r.name))
    return View(content_version(*(f"{r.name}={r.version}" for r in ordered)), ordered)


def composite(parts: Sequence[View]) -> View:
    """One view over disjoint parts, in O(parts) for the version."""
    if len(parts) == 1:
        return parts[0]
    return View(content_version(*(p.version for p in parts)), (), tuple(parts))


class ResourceGroup:
    """An immutable set of resources of one type, shared by many snapshots.

    Resources every proxy of a scope gets (all clusters, all endpoints) form
    one group; the few that are proxy-specific (its listeners) form another.
    Views over a group are memoized, so proxies asking for the same names
    share one encoding.
    """

    __slots__ = ("__weakref__", "_all", "_by_name", "_views", "composites")

    def __init__(self, items: Iterable[Resource] = ()) -> None:
        self._by_name: dict[str, Resource] = {r.name: r for r in items}
        self._all: View | None = None
        # Views by subscription, for as long as a stream holds it.
        self._views: memo.WeakMemo[View] = memo.WeakMemo()
        # Views over this group and others (a proxy's own), by their parts:
        # while the groups stay, a proxy's view stays the same object, push
        # after push, and what was worked out for it holds. Kept as long as
        # a snapshot or a stream holds the view (which holds its parts).
        self.composites: weakref.WeakValueDictionary[tuple[int, ...], View] = (
            weakref.WeakValueDictionary()
        )

    def replaced(self, changes: Mapping[str, Resource]) -> ResourceGroup | None:
        """A copy with `changes` in place of the resources of those names, in
        the same order; None if it lacks one of the names. A copy of the
        map, not a pass over every resource again."""
        by_name = self._by_name
        if not all(name in by_name for name in changes):
            return None
        group = ResourceGroup()
        group._by_name = {**by_name, **changes}
        return group

    def same_names(self, other: ResourceGroup) -> bool:
        """Names the same resources, whatever their content: a reference
        that resolves in one resolves in the other."""
        return self._by_name.keys() == other._by_name.keys()

    def same_as(self, other: ResourceGroup) -> bool:
        """The very same resources (by identity), in the same order."""
        if len(self._by_name) != len(other._by_name):
            return False
        return all(a is b for a, b in zip(self, other, strict=True))

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[Resource]:
        return iter(self._by_name.values())

    def get(self, name: str) -> Resource | None:
        return self._by_name.get(name)

    def view(self, names: frozenset[str] | None) -> View:
        if names is None:
            if self._all is None:
                self._all = make_view(self._by_name.values())
            return self._all
        found = self._views.get((names,))
        if found is None:
            by_name = self._by_name
            if len(names) >= len(by_name) and names.issuperset(by_name.keys()):
                # Asking for all of it (every endpoint of the clusters it
                # holds, as a sidecar does): the view kept for the group's
                # life, not one built anew, sorted and hashed, each time a
                # proxy connects while no other holds that subscription.
                found = self.view(None)
            elif len(names) > len(by_name):
                found = make_view(r for r in by_name.values() if r.name in names)
            else:
                found = make_view(r for n in names if (r := by_name.get(n)) is not None)
            self._views.put((names,), found)
        return found


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Everything one scope of proxies gets, per type, as disjoint groups."""

    groups: Mapping[str, Sequence[ResourceGroup]]
    label: str = ""
    # When (time.monotonic) the change this snapshot answers was first seen
    # (its debounce began); 0 if unknown. The server times ACKs from it.
    changed_at: float = 0.0
    _all: dict[str, View] = field(default_factory=dict)
    _views: memo.WeakMemo[View] = field(default_factory=memo.WeakMemo)

    def view(self, type_url: str, names: frozenset[str] | None) -> View:
        """The resources of `type_url` (all of them, or those in `names`)."""
        found = self._all.get(type_url) if names is None else self._views.get((names,), type_url)
        if found is None:
            groups = self.groups.get(type_url, ())
            parts = tuple(g.view(names) for g in groups)
            if len(parts) > 1:
                composites = groups[0].composites
                ids = tuple(map(id, parts))
                found = composites.get(ids)
                if found is None:
                    found = composites[ids] = composite(parts)
            else:
                found = parts[0] if parts else make_view(())
            if names is None:
                self._all[type_url] = found
            else:
                self._views.put((names,), found, type_url)
        return found

    def get(self, type_url: str, name: str) -> Resource | None:
        for group in self.groups.get(type_url, ()):
            r = group.get(name)
            if r is not None:
                return r
        return None

    def resources(self, type_url: str) -> Iterator[Resource]:
        for group in self.groups.get(type_url, ()):
            yield from group


class Watch:
    """A server stream's interest in one snapshot key."""

    def __init__(self, cache: SnapshotCache, key: str, changed: asyncio.Event) -> None:
        self.key = key
        self._cache = cache
        self.changed = changed

    @property
    def snapshot(self) -> Snapshot | None:
        return self._cache.get(self.key)


@dataclass(frozen=True)
class Client:
    """Who is asking: the node it sent, and the SPIFFE ID its TLS client
    certificate proves (None on an insecure channel). Only the latter is
    evidence; the node is what the proxy claims."""

    node: Any
    identity: str | None = None


NodeKey = Callable[[Client], str]


class SnapshotCache:
    """Snapshots by key; `key_of(node)` says which key a proxy reads.

    `on_watch(key, node)` lets the owner of the configuration build a
    snapshot for a proxy it has not seen before, and `on_idle(key)` tells it
    when the last proxy of a key has gone.
    """

    def __init__(self, key_of: NodeKey) -> None:
        self._key_of = key_of
        self._snapshots: dict[str, Snapshot] = {}
        self._watches: dict[str, set[Watch]] = {}
        self.on_watch: Callable[[str, Client], None] | None = None
        self.on_idle: Callable[[str], None] | None = None

    def key_of(self, client: Client) -> str:
        return self._key_of(client)

    def get(self, key: str) -> Snapshot | None:
        return self._snapshots.get(key)

    def set_snapshot(self, key: str, snapshot: Snapshot) -> None:
        self._snapshots[key] = snapshot
        for w in self._watches.get(key, ()):
            w.changed.set()

    def clear_snapshot(self, key: str) -> None:
        self._snapshots.pop(key, None)

    def keys(self) -> list[str]:
        return list(self._snapshots)

    def watched_keys(self) -> list[str]:
        return [k for k, ws in self._watches.items() if ws]

    def watch(self, client: Client, changed: asyncio.Event) -> Watch:
        """Set `changed` whenever the snapshot for `client` changes. Raises
        ValueError for a client the configuration side cannot place."""
        key = self._key_of(client)
        w = Watch(self, key, changed)
        self._watches.setdefault(key, set()).add(w)
        if self.on_watch is not None:
            self.on_watch(key, client)
        if key in self._snapshots:
            w.changed.set()
        return w

    def cancel(self, watch: Watch) -> None:
        ws = self._watches.get(watch.key)
        if ws is None:
            return
        ws.discard(watch)
        if not ws:
            del self._watches[watch.key]
            if self.on_idle is not None:
                self.on_idle(watch.key)
