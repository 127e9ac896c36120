"""Prometheus metrics of the control plane, on its own registry (no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.xds import resources


class XdsMetrics:
    """Counts what the ADS server does; implements its StreamObserver protocol."""

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


class InjectionMetrics:
    """What the injection webhook answered, and how long it took."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reviews = Counter(
            "shoal_injection_reviews",
            "AdmissionReviews answered, by outcome (injected, skipped, refused, malformed)",
            ["outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "shoal_injection_seconds",
            "Time to answer an AdmissionReview",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )

    def observe(self, outcome: str, seconds: float) -> None:
        self.reviews.labels(outcome).inc()
        self.seconds.observe(seconds)


class KubernetesMetrics(Collector):
    """The Kubernetes watches, read at scrape time from the registry's health."""

    COUNTERS = {
        "lists": "Lists made of the API server (first lists, relists, pages)",
        "relists_after_expiry": "Lists made because a watch's resourceVersion expired (410)",
        "watches": "Watches opened",
        "events": "Watch events applied",
        "errors": "Failed API requests and broken watches",
        "requests": "Requests made of the API server",
    }

    def __init__(self, health: Callable[[], Mapping[str, Any]]) -> None:
        self._health = health

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        health = self._health()
        yield GaugeMetricFamily(
            "shoal_kubernetes_api_up",
            "1 while the Kubernetes API server answers; 0 while serving the last state",
            value=1.0 if health["api_up"] else 0.0,
        )
        yield GaugeMetricFamily(
            "shoal_kubernetes_synced",
            "1 once every watched kind has been listed",
            value=1.0 if health["synced"] else 0.0,
        )
        for key, help_text in self.COUNTERS.items():
            yield CounterMetricFamily(f"shoal_kubernetes_{key}", help_text, value=health[key])


class Gauges(Collector):
    """Read-at-scrape values: whatever the callables say now."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (help_text, read) in self._gauges.items():
            yield GaugeMetricFamily(name, help_text, value=read())


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
