"""The memos' lifetimes: generations for rebuilds."""

from __future__ import annotations

from shoal.xds import memo


def test_a_generation_keeps_what_it_used_and_forgets_the_rest_after_the_next() -> None:
    g: memo.Generations[str, int] = memo.Generations()
    g.put("a", 1)
    g.put("b", 2)
    g.advance()
    assert g.fresh("a") is None, "not used yet in this generation"
    assert g.get("a") == 1 and g.fresh("a") == 1, "carried into this generation"
    assert len(g) == 2
    g.advance()
    assert g.get("b") is None, "unused for a whole generation: forgotten"
    assert g.get("a") == 1
    assert len(g) == 1


def test_a_value_put_again_replaces_the_last_one() -> None:
    g: memo.Generations[tuple[str, int], str] = memo.Generations()
    g.put(("k", 1), "old")
    g.advance()
    g.put(("k", 1), "new")
    assert g.get(("k", 1)) == "new"
    g.advance()
    assert g.get(("k", 1)) == "new"


def test_a_carried_generation_outlives_one_more_advance_without_being_fresh() -> None:
    """A rebuild that only swapped groups keeps what the last one used for
    the next, which still compares what it looks up."""
    g: memo.Generations[str, int] = memo.Generations()
    g.put("a", 1)
    g.advance()
    g.carry()
    assert g.fresh("a") is None
    g.advance()
    assert g.fresh("a") is None
    assert g.get("a") == 1, "carried through the generation that did not look"
    g.advance()
    g.advance()
    assert g.get("a") is None, "then forgotten as any other"


def test_bytes_give_back_what_was_read_from_them_while_it_is_held() -> None:
    m: memo.ByBytes[frozenset[str]] = memo.ByBytes()
    names = frozenset({"a", "b"})
    assert m.put(b"ab", names) is names
    assert m.get(b"ab") is names
    assert m.get(b"ba") is None
    del names
    assert m.get(b"ab") is None and len(m) == 0, "gone with the last holder"


def test_a_collected_value_does_not_take_a_later_one_of_the_same_bytes() -> None:
    m: memo.ByBytes[frozenset[str]] = memo.ByBytes()
    first = frozenset({"a"})
    m.put(b"a", first)
    second = m.put(b"a", frozenset({"a"}))  # replaces the first entry
    del first
    assert m.get(b"a") is second, "the first one's going left the second's entry alone"


def test_an_object_is_kept_by_its_first_bytes_only() -> None:
    m: memo.ByBytes[frozenset[str]] = memo.ByBytes()
    names = frozenset({"a", "b"})
    m.put(b"ab", names)
    assert m.put(b"ba", names) is names
    assert m.get(b"ba") is None and len(m) == 1, "another encoding is not kept"
    del names
    assert len(m) == 0
    again = frozenset({"a", "b"})
    m.put(b"ba", again)
    assert m.get(b"ba") is again, "once the first is gone, the next may be kept"
