"""The service graph's traffic from Prometheus, when one is configured.

Every sidecar counts its requests as `envoy_shoal_requests_total` and
`envoy_shoal_request_duration_milliseconds` on 15090 (README, "Request
metrics"), and a Prometheus that scrapes them sees the whole mesh, which a
dashboard on the operator's machine cannot reach. An edge is what the
caller's sidecar counted (`reporter="source"`), as in the scraped mode: a
(source_workload, destination_service) pair. The queries are pure strings
and the answer's parsing pure functions; only `fetch` does I/O.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from shoal.observe.dashboard import graph

REQUESTS = "envoy_shoal_requests_total"
DURATION_BUCKETS = "envoy_shoal_request_duration_milliseconds_bucket"
PAIR = "source_workload, destination_service"
# A counter's rate needs two samples in the window: a minute holds four at
# Prometheus' common 15 s scrape interval.
RATE_WINDOW = "1m"
# Seconds; a sum over every sidecar's series of a large mesh is not instant.
QUERY_TIMEOUT = 10.0
# A Service as the sidecars name it (`reviews.shop`); PassthroughCluster and
# `-` (no cluster: no route) are not Services and draw no edge.
_SERVICE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\.[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _selector(errors: bool) -> str:
    code = ',response_code=~"5.."' if errors else ""
    return f'{{reporter="source"{code}}}'


def queries(window: str = RATE_WINDOW) -> dict[str, str]:
    """What the graph asks Prometheus, by the figure each answers. Totals and
    quantiles are over the counters' lifetime, as Envoy's own stats are in
    the scraped mode; rates over `window`."""

    def total(errors: bool) -> str:
        return f"sum by ({PAIR}) ({REQUESTS}{_selector(errors)})"

    def rate(errors: bool) -> str:
        return f"sum by ({PAIR}) (rate({REQUESTS}{_selector(errors)}[{window}]))"

    buckets = f"sum by (le, {PAIR}) ({DURATION_BUCKETS}{_selector(False)})"
    return {
        "requests": total(False),
        "errors": total(True),
        "rps": rate(False),
        "errors_per_second": rate(True),
        "p50_ms": f"histogram_quantile(0.5, {buckets})",
        "p99_ms": f"histogram_quantile(0.99, {buckets})",
    }


class PrometheusError(Exception):
    """Prometheus did not answer a query, with the reason."""


def vector(answer: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    """(caller, callee) -> value of an instant-query answer; series that
    name no Service, and NaN (a quantile of no requests), are left out."""
    if answer.get("status") != "success":
        raise PrometheusError(str(answer.get("error") or answer.get("status") or "no status"))
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector":
        raise PrometheusError("the answer is not an instant vector")
    out: dict[tuple[str, str], float] = {}
    for series in data.get("result", ()):
        labels = series.get("metric", {}) if isinstance(series, dict) else {}
        caller = str(labels.get("source_workload", ""))
        callee = str(labels.get("destination_service", ""))
        if not _SERVICE.match(caller) or not _SERVICE.match(callee):
            continue
        try:
            value = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isfinite(value):
            out[(graph.caller_of(caller), graph.caller_of(callee))] = value
    return out


def edges(figures: Mapping[str, Mapping[tuple[str, str], float]]) -> list[dict[str, Any]]:
    """The graph's traffic edges from each query's vector: every pair that
    counted a request, with what is known of it."""
    requests = figures.get("requests", {})
    out = []
    for pair in sorted(p for p, n in requests.items() if n > 0):
        rps = figures.get("rps", {}).get(pair)
        errors_per_second = figures.get("errors_per_second", {}).get(pair, 0.0)
        p50 = figures.get("p50_ms", {}).get(pair)
        p99 = figures.get("p99_ms", {}).get(pair)
        out.append(
            {
                "source": pair[0],
                "target": pair[1],
                "kind": "traffic",
                "requests": round(requests[pair]),
                "errors": round(figures.get("errors", {}).get(pair, 0.0)),
                "rps": None if rps is None else round(rps, 3),
                "error_rate": None if not rps else round(errors_per_second / rps, 4),
                "p50_ms": None if p50 is None else round(p50, 3),
                "p99_ms": None if p99 is None else round(p99, 3),
            }
        )
    return out


@dataclass(frozen=True)
class Prometheus:
    """A Prometheus HTTP API (`http://prometheus.monitoring:9090`)."""

    url: str
    window: str = RATE_WINDOW

    async def query(self, session: aiohttp.ClientSession, promql: str) -> dict[str, Any]:
        endpoint = f"{self.url.rstrip('/')}/api/v1/query"
        try:
            limit = aiohttp.ClientTimeout(total=QUERY_TIMEOUT)
            async with session.get(endpoint, params={"query": promql}, timeout=limit) as r:
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
            raise PrometheusError(f"cannot query {endpoint}: {err or type(err).__name__}") from err
        if not isinstance(body, dict):
            raise PrometheusError(f"{endpoint} answered {r.status} without a JSON object")
        return body

    async def traffic(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """The traffic edges; PrometheusError with the reason when any query fails."""
        asked = queries(self.window)
        answers = await asyncio.gather(*(self.query(session, q) for q in asked.values()))
        return edges({name: vector(a) for name, a in zip(asked, answers, strict=True)})
