"""What a backoff shared by every watch allows an API server to see during an
outage, worked out from the policy and the outage as it really lasted (a
busy machine makes outages longer, never the policy looser)."""

from __future__ import annotations

from shoal.registry import kubernetes

# Each watch cut by the outage tries once on its own before the first
# failure is counted, and aiohttp may retry a request once on a fresh
# connection when its pooled one was cut: two each, at most.
WATCHES = 6
FIRST_TRIES = 2 * WATCHES


def most_attempts(backoff: kubernetes.Backoff, outage_s: float, others: int = 0) -> int:
    """Every connection attempt the policy allows in `outage_s`, `others`
    (requests that were already on their way) included."""
    return FIRST_TRIES + others + backoff.most_probes(outage_s)


def most_at_cap(backoff: kubernetes.Backoff, start: float, end: float) -> int:
    """Attempts the policy allows between `start` and `end`, once the
    backoff has reached its cap: one per shortest capped wait."""
    gap = backoff.maximum * (1.0 - backoff.JITTER)
    return int((end - start) / gap) + 1


def between(dropped_at: list[float], start: float, end: float) -> int:
    return sum(1 for t in dropped_at if start <= t <= end)
