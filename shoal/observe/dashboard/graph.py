"""The service graph: who calls whom, from the sidecars' own Envoy stats.

A caller's sidecar keeps one outbound cluster per Service it calls
(`outbound|PORT||NAME.NAMESPACE.svc.DOMAIN`), and Envoy counts every
request, every 5xx and the time to the upstream's response on it. So an
edge is (the proxy's own Service, the cluster's Service), and its numbers
are those counters summed over the caller's sidecars. Pure functions: the
scraping is the server's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# cluster.outbound|80||reviews-v2.demo.svc.cluster.local.upstream_rq_total
_STAT = re.compile(
    r"^cluster\.outbound\|\d+\|[^|]*\|(?P<name>[^.|]+)\.(?P<ns>[^.|]+)\.svc\.[^|]*?"
    r"\.(?P<stat>upstream_rq_total|upstream_rq_5xx|upstream_rq_time)$"
)
# What Envoy's admin is asked for: only the three stats `edges_of` reads, of
# the outbound clusters. Asking for all outbound cluster stats
# returned 15 MB (125,000 stats) per sidecar on a mesh of 1,000 Services,
# and took 0.7 s per sidecar to fetch, parse and match (BENCHMARKS.md).
STATS_QUERY = {
    "format": "json",
    "filter": r"^cluster\.outbound\|.*\.(upstream_rq_total|upstream_rq_5xx|upstream_rq_time)$",
}


@dataclass
class Edge:
    source: str
    target: str
    requests: int = 0
    errors: int = 0
    # (p50, p99, requests) of each sidecar that measured them, in ms.
    latencies: list[tuple[float, float, int]] = field(default_factory=list)

    def p50(self) -> float | None:
        """The request-weighted mean of the callers' medians (Envoy hands
        out quantiles, not buckets, so this is an estimate when several
        sidecars call)."""
        weighted = [(p50, n) for p50, _, n in self.latencies if n > 0]
        total = sum(n for _, n in weighted)
        return sum(p * n for p, n in weighted) / total if total else None

    def p99(self) -> float | None:
        """The worst caller's p99: never better than the truth."""
        return max((p99 for _, p99, _ in self.latencies), default=None)


def caller_of(cluster: str) -> str:
    """`namespace/service` from a sidecar's node cluster `service.namespace`."""
    service, _, namespace = cluster.partition(".")
    return f"{namespace}/{service}" if namespace else service


def _quantiles(histogram: Mapping[str, Any], supported: list[float]) -> tuple[float, float] | None:
    """Cumulative p50 and p99 of one Envoy histogram, when it has data."""
    values = histogram.get("values")
    if not isinstance(values, list) or not values:
        return None
    found: dict[float, float] = {}
    for q, value in zip(supported, values, strict=False):
        cumulative = value.get("cumulative") if isinstance(value, dict) else None
        if isinstance(cumulative, int | float):
            found[q] = float(cumulative)
    if 50 in found and 99 in found:
        return found[50], found[99]
    return None


def edges_of(caller: str, stats: Mapping[str, Any]) -> dict[str, Edge]:
    """One sidecar's outbound edges, by target, from `/stats?format=json`."""
    out: dict[str, Edge] = {}

    def edge(match: re.Match[str]) -> Edge:
        target = f"{match['ns']}/{match['name']}"
        return out.setdefault(target, Edge(caller, target))

    histograms: list[tuple[re.Match[str], Mapping[str, Any]]] = []
    supported: list[float] = []
    for entry in stats.get("stats", ()):
        if not isinstance(entry, dict):
            continue
        if "histograms" in entry and isinstance(entry["histograms"], dict):
            supported = [float(q) for q in entry["histograms"].get("supported_quantiles", ())]
            for h in entry["histograms"].get("computed_quantiles", ()):
                found = _STAT.match(str(h.get("name", "")))
                if found and found["stat"] == "upstream_rq_time":
                    histograms.append((found, h))
            continue
        found = _STAT.match(str(entry.get("name", "")))
        value = entry.get("value")
        if found is None or not isinstance(value, int):
            continue
        if found["stat"] == "upstream_rq_total":
            edge(found).requests += value
        elif found["stat"] == "upstream_rq_5xx":
            edge(found).errors += value
    for found, h in histograms:
        q = _quantiles(h, supported)
        e = edge(found)
        if q is not None:
            e.latencies.append((q[0], q[1], e.requests))
    # A cluster a sidecar has but never used is configuration, not traffic.
    return {t: e for t, e in out.items() if e.requests > 0}


def merge(per_sidecar: Iterable[dict[str, Edge]]) -> dict[tuple[str, str], Edge]:
    """Every sidecar's edges, summed per (caller, callee)."""
    out: dict[tuple[str, str], Edge] = {}
    for edges in per_sidecar:
        for e in edges.values():
            total = out.setdefault((e.source, e.target), Edge(e.source, e.target))
            total.requests += e.requests
            total.errors += e.errors
            total.latencies += e.latencies
    return out


@dataclass
class Rates:
    """Requests per second per edge, over the last `window` seconds of scrapes."""

    window: float = 60.0
    samples: list[tuple[float, dict[tuple[str, str], tuple[int, int]]]] = field(
        default_factory=list
    )

    def add(
        self, now: float, edges: Mapping[tuple[str, str], Edge]
    ) -> dict[tuple[str, str], tuple[float, float]]:
        """Record a scrape; (requests/s, errors/s) per edge since the oldest
        sample in the window (none on the first scrape). A counter that went
        down (a restarted sidecar) starts again from zero."""
        counts = {k: (e.requests, e.errors) for k, e in edges.items()}
        self.samples = [s for s in self.samples if now - s[0] <= self.window]
        rates: dict[tuple[str, str], tuple[float, float]] = {}
        if self.samples:
            then, old = self.samples[0]
            elapsed = now - then
            if elapsed > 0:
                for k, (requests, errors) in counts.items():
                    before = old.get(k, (0, 0))
                    if requests < before[0]:
                        before = (0, 0)
                    rates[k] = (
                        (requests - before[0]) / elapsed,
                        max(errors - before[1], 0) / elapsed,
                    )
        self.samples.append((now, counts))
        return rates
