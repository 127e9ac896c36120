"""The write budget: responses wait their turn for room, first come first
served, and a write that stalls stops holding others up."""

from __future__ import annotations

import asyncio

import pytest

from shoal.xds import budget
from tests.timers import Later


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_grants_wait_for_room_in_order() -> None:
    async def scenario() -> None:
        later = Later()
        b = budget.WriteBudget(100, stall=2.0, small=0, later=later)
        first = await b.take(60)
        order: list[str] = []

        async def take(name: str, size: int) -> budget.Grant:
            grant = await b.take(size)
            order.append(name)
            return grant

        big = asyncio.create_task(take("big", 50))
        small = asyncio.create_task(take("small", 10))
        await settle()
        assert order == [], "room for the small one, but the big one came first"
        assert b.waited == 2
        first.release()
        first.release()  # once only
        await settle()
        assert order == ["big", "small"]
        assert b.used == 60
        (await big).release()
        (await small).release()
        assert b.used == 0
        assert all(t.cancelled for _, t in later.timers), "a finished grant stops its timer"

    asyncio.run(scenario())


def test_a_response_larger_than_the_budget_goes_alone() -> None:
    async def scenario() -> None:
        b = budget.WriteBudget(100, small=0, later=Later())
        huge = await b.take(10_000)
        assert b.used == 100
        waiting = asyncio.create_task(b.take(1))
        await settle()
        assert not waiting.done()
        huge.release()
        (await waiting).release()
        assert b.used == 0

    asyncio.run(scenario())


def test_a_stalled_write_stops_counting() -> None:
    async def scenario() -> None:
        later = Later()
        b = budget.WriteBudget(100, stall=2.0, small=0, later=later)
        stalled = await b.take(100)
        waiting = asyncio.create_task(b.take(50))
        await settle()
        assert not waiting.done()
        later.fire()  # two seconds on: the stalled grant gives its room back
        granted = await waiting
        stalled.release()  # its write ends at last: nothing given back twice
        assert b.used == 50
        granted.release()
        assert b.used == 0

    asyncio.run(scenario())


def test_a_cancelled_wait_leaves_the_budget_whole() -> None:
    async def scenario() -> None:
        b = budget.WriteBudget(100, small=0, later=Later())
        held = await b.take(100)
        waiting = asyncio.create_task(b.take(10))
        behind = asyncio.create_task(b.take(10))
        await settle()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        held.release()
        (await behind).release()
        assert b.used == 0

    asyncio.run(scenario())


def test_small_responses_are_not_counted() -> None:
    async def scenario() -> None:
        b = budget.WriteBudget(100, small=10, later=Later())
        held = await b.take(100)
        small = await b.take(9)  # no wait, though the budget is spent
        small.release()
        assert b.used == 100 and b.waited == 0
        held.release()
        assert b.used == 0

    asyncio.run(scenario())
