"""Prometheus metrics of the control plane, on its own registry (no globals).

Every name, label and bucket here is listed in the README ("Introspection",
"Metrics"); a change to one is a change to that table. What the push path
calls (XdsMetrics) does a dictionary look-up and an increment or a
histogram observation; everything else is read when Prometheus scrapes.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.sds import ca, workloads
from shoal.xds import controller, resources, server, status

# Change to ACK: the debounce (0.1 s quiet by default) is its floor, and a
# push to a thousand proxies reaches the last in about 0.4 s (BENCHMARKS.md);
# the upper buckets catch proxies that lag by seconds.
CONVERGENCE_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
# Debounce: between --debounce-quiet (0.1 s) and --debounce-max (1 s).
DEBOUNCE_BUCKETS = (0.01, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0)
# A rebuild: milliseconds for a small mesh, ~0.1 s at a thousand Services.
BUILD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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
        self.convergence = Histogram(
            "shoal_xds_convergence_seconds",
            "From a change (the start of its debounce) to a proxy's ACK of the response "
            "it caused, by type; a proxy's first configuration is not counted",
            ["type"],
            buckets=CONVERGENCE_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, bool], tuple[Any, Any]] = {}
        self._converged: dict[str, Any] = {}

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

    def acked(self, type_url: str, seconds: float) -> None:
        # Once per ACK, on the push path: the child is looked up once.
        child = self._converged.get(type_url)
        if child is None:
            child = self._converged[type_url] = self.convergence.labels(resources.short(type_url))
        child.observe(seconds)


class PushMetrics:
    """Each push (a rebuild for every proxy): its debounce and its build."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.debounce = Histogram(
            "shoal_push_debounce_seconds",
            "From the first change of a burst to the start of the push it became",
            buckets=DEBOUNCE_BUCKETS,
            registry=registry,
        )
        self.build = Histogram(
            "shoal_push_build_seconds",
            "Time to translate the mesh and publish every proxy's snapshot, per push",
            buckets=BUILD_BUCKETS,
            registry=registry,
        )

    def observe(self, push: controller.Push) -> None:
        self.debounce.observe(push.debounce_seconds)
        self.build.observe(push.seconds)


class ProxyMetrics(Collector):
    """Connected proxies, and those holding a rejected configuration, read
    at scrape time from the ADS server (nothing on the push path)."""

    MODES = ("sotw", "delta")
    KINDS = ("sidecar", "captured", "proxyless")

    def __init__(self, ads: server.AdsServer, kind_of: Callable[[str], str]) -> None:
        self._ads = ads
        self._kind_of = kind_of

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # Every (mode, kind) is present, at 0 when none: a series that
        # vanishes reads as "no data", not as "no proxies".
        counts = {(m, k): 0 for m in self.MODES for k in self.KINDS}
        nacked = 0
        for conn in list(self._ads.connections.values()):
            kind = self._kind_of(conn.key) or "sidecar"
            mode = "delta" if conn.delta else "sotw"
            counts[(mode, kind)] = counts.get((mode, kind), 0) + 1
            snapshot = conn.snapshot
            if any(
                status.of_type(state, snapshot) == status.NACKED for state in conn.types.values()
            ):
                nacked += 1
        proxies = GaugeMetricFamily(
            "shoal_xds_proxies",
            "Proxies connected now (ADS streams), by protocol (sotw, delta) and kind "
            "(sidecar, captured, proxyless)",
            labels=["mode", "kind"],
        )
        for (mode, kind), count in sorted(counts.items()):
            proxies.add_metric([mode, kind], count)
        yield proxies
        yield GaugeMetricFamily(
            "shoal_xds_nacked_proxies",
            "Proxies whose latest response of some type they rejected (NACKED in "
            "proxy-status; the error is in /debug/syncz)",
            value=nacked,
        )
        yield GaugeMetricFamily(
            "shoal_xds_stalled_streams",
            "Streams given up because their client stopped reading, whose calls gRPC "
            "still holds until the client goes (each still counts against its identity)",
            value=self._ads.stalled_streams,
        )


class CertificateMetrics(Collector):
    """The CA and its workload certificates, read at scrape time."""

    def __init__(
        self,
        certificates: workloads.WorkloadCertificates,
        clock: Callable[[], datetime.datetime] = ca.utcnow,
    ) -> None:
        self._certificates = certificates
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = self._clock()
        certificates = self._certificates
        issued = certificates.issued()
        yield GaugeMetricFamily(
            "shoal_workload_certificates",
            "Workload certificates held now (one per identity with a proxy)",
            value=len(issued),
        )
        if issued:
            # Absent rather than 0 with none: 0 would read as "expiring now".
            earliest = min(i.pair.not_after for i in issued)
            yield GaugeMetricFamily(
                "shoal_workload_certificate_expiry_seconds",
                "Seconds until the earliest workload certificate expires",
                value=(earliest - now).total_seconds(),
            )
        yield CounterMetricFamily(
            "shoal_workload_certificates_issued",
            "Workload certificates signed (first issues, renewals, reissues)",
            value=certificates.issues,
        )
        yield CounterMetricFamily(
            "shoal_workload_certificate_renewals",
            "Workload certificates renewed because they came due",
            value=certificates.renewals,
        )
        signer = certificates.authority.signer.cert
        yield GaugeMetricFamily(
            "shoal_ca_signer_expiry_seconds",
            "Seconds until the certificate the CA signs with (the root, or a plugged "
            "intermediate) expires",
            value=(signer.not_valid_after_utc - now).total_seconds(),
        )


class FolderMetrics(Collector):
    """The manifests folder: how often it was read, and failed to be."""

    def __init__(self, reloads: Callable[[], int], failures: Callable[[], int]) -> None:
        self._reloads = reloads
        self._failures = failures

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "shoal_registry_reloads",
            "Reads of the manifests folder (the first, and one per burst of file changes)",
            value=self._reloads(),
        )
        yield CounterMetricFamily(
            "shoal_registry_reload_failures",
            "Reads of the manifests folder that failed (the last state stays)",
            value=self._failures(),
        )


class InjectionMetrics:
    """What the injection webhook answered, and how long it took."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reviews = Counter(
            "shoal_injection_reviews",
            "AdmissionReviews answered, by outcome (injected, skipped, refused, malformed, failed)",
            ["outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "shoal_injection_seconds",
            "Time to answer an AdmissionReview: reading its body, deciding, building the patch",
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

    def __init__(
        self,
        health: Callable[[], Mapping[str, Any]],
        events: Callable[[], Mapping[tuple[str, str], int]] = dict,
    ) -> None:
        self._health = health
        # Watch events by (kind, type): a handful of series, Kubernetes's
        # own names.
        self._events = events

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
        by_kind = CounterMetricFamily(
            "shoal_kubernetes_watch_events",
            "Watch events applied, by kind (Service, EndpointSlice, ...) and type "
            "(ADDED, MODIFIED, DELETED)",
            labels=["kind", "type"],
        )
        for (kind, event), count in sorted(self._events().items()):
            by_kind.add_metric([kind, event], count)
        yield by_kind


class Gauges(Collector):
    """Read-at-scrape values: whatever the callables say now."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (help_text, read) in self._gauges.items():
            yield GaugeMetricFamily(name, help_text, value=read())


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
