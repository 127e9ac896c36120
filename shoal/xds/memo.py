"""Memos, and what bounds them.

Two lifetimes cover every memo in the push path; no memo counts its entries
or clears itself at an arbitrary size.

- Work shared by streams (the view of a subscription, the diff between two
  views, the names a subscription asks for that do not exist) is keyed by
  objects the streams hold (an interned subscription, the view it was sent):
  a `WeakMemo` entry lives exactly as long as every object of its key. When
  the last stream holding a subscription goes, so does everything worked out
  for it. No stream can evict another's work or pin its own.
- Work shared by a rebuild (a Service's clusters, a scope's route tables) is
  keyed by named tuples of its inputs and kept by `Generations`: what one
  rebuild did not use is gone after the next, so memory follows the mesh as
  it is, not its history.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")


class _Drop:
    """Removes one entry when one of its key objects is collected."""

    __slots__ = ("_entries", "_key")

    def __init__(self, entries: dict[Hashable, object], key: Hashable) -> None:
        self._entries = entries
        self._key = key

    def __call__(self, _: object) -> None:
        self._entries.pop(self._key, None)


class WeakMemo(Generic[V]):
    """Values by the identity of key objects (and a hashable tag), dropped
    when any key object is. Key objects must support weak references; the
    value must not refer to them, or they would never go."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple[weakref.ref[object], ...], V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, objects: tuple[object, ...], tag: Hashable = None) -> V | None:
        found = self._entries.get((tag, *map(id, objects)))
        return None if found is None else found[1]

    def put(self, objects: tuple[object, ...], value: V, tag: Hashable = None) -> V:
        key = (tag, *map(id, objects))
        drop = _Drop(self._entries, key)  # type: ignore[arg-type]
        self._entries[key] = (tuple(weakref.ref(o, drop) for o in objects), value)
        return value

    def clear(self) -> None:
        self._entries.clear()


class Interned(Generic[T]):
    """One object per distinct value, for as long as anyone holds it: a
    thousand sidecars asking for the same names share one set, and memos
    keyed by it are found by identity. Nothing is kept for a value nobody
    holds any more."""

    __slots__ = ("_by_hash",)

    def __init__(self) -> None:
        self._by_hash: dict[int, weakref.ref[T]] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def __call__(self, value: T) -> T:
        h = hash(value)
        ref = self._by_hash.get(h)
        found = ref() if ref is not None else None
        if found is not None:
            # Equal hashes of unequal values are rare: the newcomer is then
            # simply not shared.
            return found if found is value or found == value else value
        self._by_hash[h] = weakref.ref(value, _Drop(self._by_hash, h))  # type: ignore[arg-type]
        return value


class ByBytes(Generic[T]):
    """What was read from some bytes, by those bytes, for as long as anyone
    holds it: the same bytes read again give the same object back unread.
    One encoding per object: others of it (the same names in another
    order) are read again, and hold no more memory. T must support weak
    references."""

    __slots__ = ("_by_bytes", "_keyed")

    def __init__(self) -> None:
        self._by_bytes: dict[bytes, weakref.ref[T]] = {}
        self._keyed: set[int] = set()

    def __len__(self) -> int:
        return len(self._by_bytes)

    def get(self, raw: bytes) -> T | None:
        ref = self._by_bytes.get(raw)
        return None if ref is None else ref()

    def put(self, raw: bytes, value: T) -> T:
        """`value`, kept by `raw` unless it is kept by other bytes already."""
        keyed, entries, ident = self._keyed, self._by_bytes, id(value)
        if ident in keyed:
            return value

        def drop(ref: weakref.ref[T]) -> None:
            keyed.discard(ident)
            # Only this entry: a later put of the same bytes is another's.
            if entries.get(raw) is ref:
                del entries[raw]

        entries[raw] = weakref.ref(value, drop)
        keyed.add(ident)
        return value


class Generations(Generic[K, V]):
    """Values kept while rebuilds use them. Each rebuild begins a generation
    (`advance`); an entry the previous generation did not use is forgotten.
    An entry is `fresh` once this generation has looked it up or put it: a
    rebuild compares its inputs once, not once per proxy."""

    __slots__ = ("_carried", "_fresh", "_previous")

    def __init__(self) -> None:
        self._fresh: dict[K, V] = {}
        self._previous: dict[K, V] = {}
        self._carried: dict[K, V] = {}

    def __len__(self) -> int:
        kept = self._previous.keys() | self._carried.keys()
        return len(self._fresh) + sum(1 for k in kept if k not in self._fresh)

    def get(self, key: K) -> V | None:
        """The value of `key` from this generation or the last (which then
        carries it into this one)."""
        found = self._fresh.get(key)
        if found is None:
            found = self._previous.get(key)
            if found is not None:
                self._fresh[key] = found
        return found

    def fresh(self, key: K) -> V | None:
        """The value of `key` if this generation already used it."""
        return self._fresh.get(key)

    def put(self, key: K, value: V) -> V:
        self._fresh[key] = value
        return value

    def carry(self) -> None:
        """Keep the last generation's entries through the next `advance`
        too: a rebuild that did not look at them (it swapped groups and made
        nothing) must not leave the next to make them all again. They are
        not fresh: this generation still compares what it looks up."""
        self._carried = self._previous

    def advance(self) -> tuple[Mapping[K, V], dict[K, V]]:
        """Begin a generation; the last one and this one, for a rebuild that
        visits each key once and reads and fills them directly (keys that
        are tuples hash anew at every lookup: once each way is enough)."""
        previous, self._fresh = self._fresh, {}
        if self._carried:
            previous = {**self._carried, **previous}
            self._carried = {}
        self._previous = previous
        return self._previous, self._fresh


def frozen(names: Iterable[str]) -> frozenset[str]:
    return names if isinstance(names, frozenset) else frozenset(names)
