"""What a backoff shared by every watch allows an API server to see during an
outage, worked out from the policy and the outage as it really lasted (a
busy machine makes outages longer, never the policy looser)."""

from __future__ import annotations

from shoal import kube
from shoal.registry import kubernetes

# The emulator's outage accepts each connection and resets it, and aiohttp
# retries an idempotent request once on a connection reset: one probe can
# be two connections. (A refused connection is not retried.)
CONNECTIONS_PER_PROBE = 2
# Each watch cut by the outage tries once on its own before the first
# failure is counted.
WATCHES = len(kubernetes.KINDS)


def most_attempts(backoff: kube.Backoff, outage_s: float, others: int = 0) -> int:
    """Every connection the policy allows in `outage_s`, `others` (requests
    that were already on their way) included."""
    probes = WATCHES + others + backoff.most_probes(outage_s)
    return CONNECTIONS_PER_PROBE * probes


def most_at_cap(backoff: kube.Backoff, start: float, end: float) -> int:
    """Connections the policy allows between `start` and `end`, once the
    backoff has reached its cap: one probe per shortest capped wait."""
    gap = backoff.maximum * (1.0 - backoff.JITTER)
    return CONNECTIONS_PER_PROBE * (int((end - start) / gap) + 1)


def between(dropped_at: list[float], start: float, end: float) -> int:
    return sum(1 for t in dropped_at if start <= t <= end)
