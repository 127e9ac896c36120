"""tasks.Linger: kept a while after its last user, then dropped; bounded."""

from __future__ import annotations

from shoal import tasks
from tests.timers import Later


def test_a_key_is_dropped_after_its_linger_unless_it_comes_back() -> None:
    dropped: list[str] = []
    later = Later()
    linger = tasks.Linger(60.0, dropped.append, later=later)
    linger.leave("a")
    linger.leave("b")
    linger.leave("a")  # once is enough
    assert [d for d, _ in later.timers] == [60.0, 60.0]
    linger.back("a")
    later.fire()
    assert dropped == ["b"]
    assert list(linger) == []


def test_past_the_most_that_may_linger_a_key_goes_at_once() -> None:
    dropped: list[str] = []
    later = Later()
    linger = tasks.Linger(60.0, dropped.append, most=2, later=later)
    for key in ("a", "b", "c"):
        linger.leave(key)
    assert dropped == ["c"], "a third key would pile up past the bound"
    assert sorted(linger) == ["a", "b"]
    later.fire()
    assert sorted(dropped) == ["a", "b", "c"]
