"""Prometheus metrics of the control plane, on its own registry (no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.xds import resources


class XdsMetrics:
    """Counts what the ADS server does; implements its Listener protocol."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter(
            "shoal_xds_pushes",
            "xDS responses sent, by type and protocol",
            ["type", "mode"],
            registry=registry,
        )
        self.resources = Counter(
            "shoal_xds_pushed_resources",
            "Resources carried by xDS responses, by type",
            ["type"],
            registry=registry,
        )
        self.nacks = Counter(
            "shoal_xds_nacks",
            "xDS responses a proxy rejected (counted once per version)",
            ["type"],
            registry=registry,
        )
        self._children: dict[tuple[str, bool], tuple[Any, Any]] = {}

    def pushed(self, type_url: str, count: int, delta: bool) -> None:
        # Called once per response: at a thousand streams, looking the
        # labelled children up each time is a visible part of a push.
        children = self._children.get((type_url, delta))
        if children is None:
            kind = resources.short(type_url)
            children = self._children[(type_url, delta)] = (
                self.pushes.labels(kind, "delta" if delta else "sotw"),
                self.resources.labels(kind),
            )
        children[0].inc()
        children[1].inc(count)

    def nacked(self, type_url: str) -> None:
        self.nacks.labels(resources.short(type_url)).inc()


class Gauges(Collector):
    """Read-at-scrape values: whatever the callables say now."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (help_text, read) in self._gauges.items():
            yield GaugeMetricFamily(name, help_text, value=read())


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
