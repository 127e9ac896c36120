"""What one stream, and one identity's streams together, may make the
control plane hold and do, and the accounts that keep them to it.

Memory is counted as what subscriptions cost (names_cost), once per distinct
thing an identity's streams hold; work as names gone through, from token
buckets per stream and per identity. The README's Security section lists the
limits.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

# What Python holds for one name of a subscription besides its characters
# (the str object, a set slot): names are charged their bytes plus this, so
# the limits below are memory, however short the names.
NAME_COST = 64


def names_cost(names: Collection[str]) -> int:
    return sum(map(len, names)) + NAME_COST * len(names)


@dataclass(frozen=True)
class Limits:
    """What one stream, and one identity's streams together, may make the
    control plane hold and do. The README's Security section lists them."""

    # A stream that has not sent its first request by then is closed.
    first_request_s: float = 30.0
    # Concurrent streams of one identity, from the moment its certificate
    # is checked (a Deployment's Pods share one identity).
    streams_per_identity: int = 1024
    # What one stream subscribes to (every type) and a delta client says it
    # holds, as names_cost.
    subscription_bytes: int = 8 << 20
    # The same, of every stream of an identity together, counting what
    # several hold (a fleet asking for the same names) once.
    identity_bytes: int = 16 << 20
    # Names a stream, and an identity's streams together, may make the
    # server go through (in requests, and in subscriptions a request
    # changes) per second, and in a burst: past it, their requests wait
    # their turn. A proxy reconnecting to 10,000 Services goes through some
    # 40,000; a thousand of one identity reconnecting to 1,000, 5 million.
    stream_names_per_second: int = 1_000_000
    stream_names_burst: int = 2_000_000
    names_per_second: int = 5_000_000
    names_burst: int = 50_000_000
    # Types a stream may ask for that the server does not serve.
    unknown_types: int = 8
    type_url_length: int = 256
    node_id_length: int = 512


DEFAULT_LIMITS = Limits()


@dataclass
class Allowance:
    """A token bucket of names; `tokens` None: full."""

    tokens: float | None = None
    refilled: float = 0.0


def _take(bucket: Allowance, now: float, work: int, rate: int, burst: int) -> float:
    """Take `work` from `bucket`; seconds until it is paid back (0: none)."""
    tokens = burst if bucket.tokens is None else bucket.tokens + (now - bucket.refilled) * rate
    bucket.tokens = min(burst, tokens) - work
    bucket.refilled = now
    return 0.0 if bucket.tokens >= 0 else -bucket.tokens / rate


@dataclass
class _Usage:
    """One identity's streams, the distinct things they hold, and the names
    they may still go through before they wait."""

    streams: int = 0
    # id of an interned subscription or held view -> (references, cost)
    held: dict[int, tuple[int, int]] = field(default_factory=dict)
    cost: int = 0
    allowance: Allowance = field(default_factory=Allowance)


class Exceeded(Exception):
    """A stream asked for more than a limit allows; the message says which."""


class Account(Protocol):
    """What a stream carries of its accounts (server.Connection has it)."""

    identity: str | None
    cost: int
    allowance: Allowance


class Accounts:
    """Every identity's streams and what they hold, against the limits."""

    def __init__(self, limits: Limits, monotonic: Callable[[], float]) -> None:
        self.limits = limits
        self._monotonic = monotonic
        self._usage: dict[str, _Usage] = {}

    def admit(self, identity: str | None) -> bool:
        """Count a stream against its identity; False past the cap."""
        if identity is None:
            return True
        usage = self._usage.get(identity)
        if usage is None:
            usage = self._usage[identity] = _Usage()
        if usage.streams >= self.limits.streams_per_identity:
            return False
        usage.streams += 1
        return True

    def discharge(self, identity: str | None) -> None:
        if identity is None:
            return
        usage = self._usage[identity]
        usage.streams -= 1
        if not usage.streams:
            del self._usage[identity]

    def usage(self, identity: str) -> tuple[int, int]:
        """(streams, cost of what they hold) of one identity."""
        found = self._usage.get(identity)
        return (found.streams, found.cost) if found is not None else (0, 0)

    def spend(self, stream: Account, work: int) -> float:
        """Take `work` names from the stream's allowance and its identity's;
        seconds to wait before going on (0: at once)."""
        usage = self._usage.get(stream.identity) if stream.identity is not None else None
        if usage is None or not work:
            return 0.0
        now = self._monotonic()
        limits = self.limits
        return max(
            _take(
                stream.allowance,
                now,
                work,
                limits.stream_names_per_second,
                limits.stream_names_burst,
            ),
            _take(usage.allowance, now, work, limits.names_per_second, limits.names_burst),
        )

    def check(self, stream: Account, more: int) -> None:
        """Exceeded if `more` would take the stream past its own limit."""
        if more > 0 and stream.cost + more > self.limits.subscription_bytes:
            raise Exceeded(
                f"subscriptions of {stream.cost + more} bytes (names and {NAME_COST} per name; "
                f"limit {self.limits.subscription_bytes} per stream)"
            )

    def replace(self, stream: Account, old: tuple[object, int], new: tuple[object, int]) -> None:
        """Charge `new` in place of `old`; if `new` is refused, `old` stays."""
        self._uncharge(stream, *old)
        try:
            self._charge(stream, *new)
        except Exceeded:
            self._charge(stream, *old, check=False)
            raise

    def _charge(self, stream: Account, held: object, cost: int, *, check: bool = True) -> None:
        if held is None or not cost:
            return
        usage = self._usage.get(stream.identity) if stream.identity is not None else None
        if usage is not None:
            refs, _ = usage.held.get(id(held), (0, cost))
            if check and not refs and usage.cost + cost > self.limits.identity_bytes:
                raise Exceeded(
                    f"{stream.identity}'s streams hold {usage.cost} bytes of distinct "
                    f"subscriptions; {cost} more exceed the limit of {self.limits.identity_bytes}"
                )
            usage.held[id(held)] = (refs + 1, cost)
            usage.cost += 0 if refs else cost
        stream.cost += cost

    def _uncharge(self, stream: Account, held: object, cost: int) -> None:
        if held is None or not cost:
            return
        usage = self._usage.get(stream.identity) if stream.identity is not None else None
        if usage is not None:
            refs, charged = usage.held.pop(id(held), (1, 0))
            if refs > 1:
                usage.held[id(held)] = (refs - 1, charged)
            else:
                usage.cost -= charged
        stream.cost -= cost
