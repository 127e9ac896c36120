"""The heap keeper freezes the heap once it has settled and collects fully
only when quiet and not too often."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shoal import heap


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()
    gc.enable()  # whatever a failed test left


def test_freezes_only_after_a_quiet_spell(unfrozen: None) -> None:
    clock = Clock()
    keeper = heap.HeapKeeper(quiet=0.5, full_every=600, clock=clock)
    keeper.settle()
    assert keeper.freezes == 0, "nothing grew: nothing to do"
    keeper.note_growth()
    clock.now += 0.2
    keeper.settle()
    assert keeper.freezes == 0 and gc.get_freeze_count() == 0, "still busy"
    clock.now += 0.4
    keeper.settle()
    assert keeper.freezes == 1 and gc.get_freeze_count() > 0
    assert keeper.full_collections == 0
    keeper.settle()
    assert keeper.freezes == 1, "one freeze per burst"


def test_a_full_collection_reclaims_frozen_cycles(unfrozen: None) -> None:
    clock = Clock()
    keeper = heap.HeapKeeper(quiet=0.5, full_every=60, clock=clock)

    class Node:
        peer: object

    def make_cycle() -> weakref.ref[Node]:
        a, b = Node(), Node()
        a.peer, b.peer = b, a
        return weakref.ref(a)

    gc.collect()
    held = make_cycle()()
    gc.collect()  # the cycle is old now
    alive = weakref.ref(held)
    del held  # garbage, in the oldest generation
    keeper.note_growth()
    clock.now += 1
    keeper.settle()  # frozen with the cycle in it
    assert keeper.full_collections == 0
    gc.collect()
    assert alive() is not None, "a frozen cycle is out of the collector's sight"
    keeper.note_growth()
    clock.now += 60
    keeper.settle()
    assert keeper.full_collections == 1
    assert alive() is None, "the frozen cycle is reclaimed"
    assert gc.get_freeze_count() > 0, "and the heap is frozen again"


def test_garbage_a_burst_just_left_is_not_frozen(unfrozen: None) -> None:
    clock = Clock()
    keeper = heap.HeapKeeper(quiet=0.5, full_every=600, clock=clock)

    class Node:
        peer: object

    a, b = Node(), Node()
    a.peer, b.peer = b, a
    alive = weakref.ref(a)
    del a, b  # a closed stream's cycle, young
    keeper.note_growth()
    clock.now += 1
    keeper.settle()
    assert keeper.freezes == 1 and keeper.full_collections == 0
    assert alive() is None, "collected before the freeze, not kept for ten minutes"


def test_growth_is_seen_through_the_collectors_callbacks(unfrozen: None) -> None:
    clock = Clock()
    keeper = heap.HeapKeeper(quiet=0.5, clock=clock)
    gc.callbacks.append(keeper._on_gc)
    try:
        gc.collect(1)
    finally:
        gc.callbacks.remove(keeper._on_gc)
    clock.now += 1
    keeper.settle()
    assert keeper.freezes == 1


def test_collection_is_paused_while_a_burst_builds_and_resumed_after(unfrozen: None) -> None:
    clock = Clock()
    keeper = heap.HeapKeeper(quiet=0.5, clock=clock)
    assert gc.isenabled()
    with keeper.paused():
        assert not gc.isenabled()
        with keeper.paused():  # two lists at once
            assert not gc.isenabled()
        assert not gc.isenabled(), "still one burst going"
    assert gc.isenabled()
    clock.now += 1
    keeper.settle()
    assert keeper.freezes == 1, "what the burst built is frozen once it settles"


def test_malloc_is_tuned_on_glibc() -> None:
    # This machine is glibc (as is the control-plane image); elsewhere the
    # call says it did nothing rather than failing.
    assert heap.tune_malloc() is True


class FakeMalloc(heap.Malloc):
    def __init__(self) -> None:
        self.trimmed = 0

    def trim(self) -> None:
        self.trimmed += 1


def test_freed_memory_goes_back_at_quiet_moments() -> None:
    clock, malloc = Clock(), FakeMalloc()
    keeper = heap.HeapKeeper(quiet=0.5, trim_every=10, clock=clock, malloc=malloc)
    keeper.settle()
    assert malloc.trimmed == 0, "not more often than every trim_every seconds"
    clock.now += 11
    keeper.note_growth()
    clock.now += 0.1
    keeper.settle()
    assert malloc.trimmed == 0, "not while the heap is busy"
    clock.now += 1
    keeper.settle()
    assert malloc.trimmed == 1 and keeper.trims == 1
    clock.now += 1
    keeper.settle()
    assert malloc.trimmed == 1


def test_glibc_is_found_here() -> None:
    malloc = heap.Malloc.of_libc()
    assert malloc is not None
    malloc.trim()


def test_collection_stays_off_through_the_fan_out_after_a_burst(unfrozen: None) -> None:
    clock = Clock()
    keeper = heap.HeapKeeper(quiet=0.5, hold=1.0, clock=clock)
    with keeper.paused():
        pass
    assert not gc.isenabled(), "held off while the burst's fan-out runs"
    clock.now += 0.2
    keeper.settle()
    assert not gc.isenabled(), "not settled yet"
    with keeper.paused():  # the next burst, within the hold
        assert not gc.isenabled()
    assert not gc.isenabled()
    clock.now += 0.6
    keeper.settle()
    assert keeper.freezes == 1, "settled: the young generation collected, then frozen"
    assert gc.isenabled(), "and collection back on"


def test_a_hold_ends_when_bursts_keep_coming(unfrozen: None) -> None:
    clock = Clock()
    keeper = heap.HeapKeeper(quiet=0.5, hold=1.0, clock=clock)
    for _ in range(3):  # a burst every 0.4 s: never quiet for 0.5 s
        with keeper.paused():
            pass
        keeper.settle()
        assert not gc.isenabled(), "held, within a second of the first burst"
        clock.now += 0.4
    keeper.settle()
    assert keeper.freezes == 0, "never quiet"
    assert gc.isenabled(), "but the collector waits no longer than the hold"
