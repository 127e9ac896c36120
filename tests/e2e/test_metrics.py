"""The control plane's own metrics, one family per test, read over HTTP from
a real control plane's /metrics and parsed as Prometheus would
(prometheus_client.parser); real Envoys where a proxy must ACK."""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from prometheus_client import parser

from shoal import cli, envoy
from shoal.demo import mesh
from shoal.injector import settings
from shoal.observe import metrics
from shoal.xds import node, resources, server
from tests import manifests
from tests.conftest import write
from tests.e2e.helpers import caught_up, eventually
from tests.injector import shapes
from tests.kube import objects, serving
from tests.kube.emulator import KubeEmulator, running_emulator

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(cp: cli.ControlPlane) -> Samples:
    """Every sample of /metrics on the admin port, as anonymous callers see it."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{cp.admin_port}/metrics") as r,
    ):
        assert r.status == 200
        text = await r.text()
    found: Samples = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def debug(cp: cli.ControlPlane, name: str) -> Any:
    connector = aiohttp.UnixConnector(path=cp.admin_socket)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://localhost/debug/{name}") as r,
    ):
        assert r.status == 200
        return await r.json()


async def test_proxies_by_mode_and_kind_and_change_to_ack_per_type(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh, xds_mode: str
) -> None:
    a_in, b_in = envoy.free_port(), envoy.free_port()
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [a_in]))
    write(registry_dir, "b.yaml", manifests.service_with_endpoints("b", [b_in]))
    await caught_up(control_plane, registry_dir)
    await local_mesh.add("a-1", namespace="default", service="a", inbound_port=a_in)
    await local_mesh.add("b-1", namespace="default", service="b", inbound_port=b_in)
    other = "sotw" if xds_mode == "delta" else "delta"

    async def connected() -> bool:
        s = await scrape(control_plane)
        return value(s, "shoal_xds_proxies", mode=xds_mode, kind="sidecar") == 2.0

    await eventually(connected)
    samples = await scrape(control_plane)
    # Every mode and kind is there, at 0 when none.
    for kind in ("sidecar", "captured", "proxyless"):
        assert value(samples, "shoal_xds_proxies", mode=other, kind=kind) == 0.0
    assert value(samples, "shoal_xds_proxies", mode=xds_mode, kind="proxyless") == 0.0
    before = value(samples, "shoal_xds_convergence_seconds_count", type="EDS") or 0.0
    pushes_before = value(samples, "shoal_push_build_seconds_count") or 0.0

    # An endpoint of b moves: both sidecars (b is in their scope) ACK new EDS.
    write(registry_dir, "b.yaml", manifests.service_with_endpoints("b", [envoy.free_port()]))

    async def both_acked() -> bool:
        s = await scrape(control_plane)
        count = value(s, "shoal_xds_convergence_seconds_count", type="EDS") or 0.0
        return count >= before + 2

    await eventually(both_acked)
    samples = await scrape(control_plane)
    # Timed from the change, so never less than the debounce's quiet time
    # (0.05 s here): nothing in the first bucket.
    assert value(samples, "shoal_xds_convergence_seconds_bucket", type="EDS", le="0.025") == 0.0
    assert value(samples, "shoal_xds_convergence_seconds_bucket", type="EDS", le="+Inf") == (
        value(samples, "shoal_xds_convergence_seconds_count", type="EDS")
    )
    buckets = {
        float(dict(labels)["le"])
        for (name, labels) in samples
        if name == "shoal_xds_convergence_seconds_bucket" and dict(labels)["type"] == "EDS"
    }
    assert buckets == {*metrics.CONVERGENCE_BUCKETS, float("inf")}
    # The push itself: its debounce and its build, once per push.
    pushes = value(samples, "shoal_push_build_seconds_count") or 0.0
    assert pushes > pushes_before
    debounced = value(samples, "shoal_push_debounce_seconds_count") or 0.0
    assert debounced >= 1
    assert (value(samples, "shoal_push_debounce_seconds_sum") or 0.0) >= 0.05 * debounced
    latest = (await debug(control_plane, "pushes"))[0]
    assert latest["debounce_ms"] >= 50


def _proxyless_node() -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update({node.NAMESPACE: "default", node.PROXYLESS: True})
    return base_pb2.Node(id="rejecting-grpc-client", cluster="default", metadata=meta)


def _channel(cp: cli.ControlPlane) -> grpc.aio.Channel:
    assert cp.authority is not None
    pair = cp.authority.workload("default", "default")
    creds = grpc.ssl_channel_credentials(
        root_certificates=cp.authority.trust_bundle,
        private_key=pair.key_pem,
        certificate_chain=pair.cert_pem,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", creds)


async def test_nacks_by_type_and_the_proxies_holding_one(
    registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    write(registry_dir, "a.yaml", manifests.service("a"))
    await caught_up(control_plane, registry_dir)
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (item := await requests.get()) is not None:
            yield item

    async with _channel(control_plane) as channel:
        stream = channel.stream_stream(
            f"/{server.ADS_SERVICE}/{server.SOTW_METHOD}",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )(outgoing())
        await requests.put(
            discovery_pb2.DiscoveryRequest(node=_proxyless_node(), type_url=resources.CLUSTER)
        )
        response = await stream.read()
        error = "cluster outbound|80||a.default.svc.cluster.local: bad thing"
        await requests.put(
            discovery_pb2.DiscoveryRequest(
                type_url=resources.CLUSTER,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=3, message=error),
            )
        )

        async def holding() -> bool:
            return value(await scrape(control_plane), "shoal_xds_nacked_proxies") == 1.0

        await eventually(holding)
        samples = await scrape(control_plane)
        assert value(samples, "shoal_xds_nacks_total", type="CDS") == 1.0
        assert value(samples, "shoal_xds_proxies", mode="sotw", kind="proxyless") == 1.0
        # The error is never a label: it is on /debug/syncz, with its proxy.
        assert not any(error in str(labels) for (_, labels) in samples)
        (proxy,) = await debug(control_plane, "syncz")
        (cds,) = [t for t in proxy["types"] if t["type"] == "CDS"]
        assert proxy["id"] == "rejecting-grpc-client"
        assert (cds["status"], cds["error"]) == ("NACKED", error)
        await requests.put(None)
        stream.cancel()

    async def gone() -> bool:
        s = await scrape(control_plane)
        return (
            value(s, "shoal_xds_nacked_proxies") == 0.0
            and value(s, "shoal_xds_proxies", mode="sotw", kind="proxyless") == 0.0
        )

    await eventually(gone)
    # A counter: the rejection stays counted after the proxy has gone.
    assert value(await scrape(control_plane), "shoal_xds_nacks_total", type="CDS") == 1.0


@pytest.mark.parametrize("workload_ttl", [datetime.timedelta(seconds=6)])
async def test_certificates_by_expiry_issues_and_renewals(
    control_plane: cli.ControlPlane, workload_ttl: datetime.timedelta
) -> None:
    samples = await scrape(control_plane)
    assert value(samples, "shoal_workload_certificates") == 0.0
    # None held: no expiry at all, rather than a 0 that reads "expiring now".
    assert value(samples, "shoal_workload_certificate_expiry_seconds") is None
    signer = value(samples, "shoal_ca_signer_expiry_seconds")
    assert signer is not None and signer > 365 * 86400
    assert control_plane.certificates is not None
    # What a sidecar's first SDS request does.
    control_plane.certificates.get("default", "web")
    samples = await scrape(control_plane)
    assert value(samples, "shoal_workload_certificates") == 1.0
    assert value(samples, "shoal_workload_certificates_issued_total") == 1.0
    assert value(samples, "shoal_workload_certificate_renewals_total") == 0.0
    expiry = value(samples, "shoal_workload_certificate_expiry_seconds")
    assert expiry is not None and 0 < expiry <= workload_ttl.total_seconds()

    async def renewed() -> bool:
        s = await scrape(control_plane)
        return (value(s, "shoal_workload_certificate_renewals_total") or 0.0) >= 1.0

    # Renewed at half its life, less up to 10 % jitter: after 2.4-3 s.
    await eventually(renewed)
    samples = await scrape(control_plane)
    assert (value(samples, "shoal_workload_certificates_issued_total") or 0.0) >= 2.0
    assert value(samples, "shoal_workload_certificates") == 1.0
    renewed_expiry = value(samples, "shoal_workload_certificate_expiry_seconds")
    assert renewed_expiry is not None and renewed_expiry > expiry - 1.0


async def test_folder_reloads_and_problems(
    registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    samples = await scrape(control_plane)
    reloads = value(samples, "shoal_registry_reloads_total")
    assert reloads is not None and reloads >= 1.0, "the first read counts"
    assert value(samples, "shoal_registry_reload_failures_total") == 0.0
    assert value(samples, "shoal_config_problems") == 0.0
    write(registry_dir, "a.yaml", manifests.service("a"))
    write(registry_dir, "broken.yaml", "kind: Service\nmetadata: {name: [not, a, name]}\n")

    async def seen() -> bool:
        s = await scrape(control_plane)
        return (value(s, "shoal_registry_reloads_total") or 0.0) > reloads and (
            value(s, "shoal_config_problems") or 0.0
        ) >= 1.0

    await eventually(seen)
    # A broken manifest is a problem of the input, not a failed read.
    assert value(await scrape(control_plane), "shoal_registry_reload_failures_total") == 0.0


HOME = "shoal-system"
WEBHOOK = Path(__file__).resolve().parents[2] / "examples" / "kubernetes" / "webhook.yaml"


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with running_emulator(bookmark_interval=0.5) as emulator:
        emulator.create(objects.namespace(HOME))
        yield emulator


@pytest.fixture
async def kube_plane(emu: KubeEmulator, tmp_path: Path) -> AsyncIterator[cli.ControlPlane]:
    options = serving.options(emu, tmp_path, webhook_address="127.0.0.1:0")
    async with cli.control_plane(options) as cp:
        yield cp


async def test_kubernetes_watch_events_by_kind_and_type_and_webhook_answers(
    emu: KubeEmulator, kube_plane: cli.ControlPlane
) -> None:
    async def counted(name: str, at_least: float, **labels: str) -> None:
        async def check() -> bool:
            return (value(await scrape(kube_plane), name, **labels) or 0.0) >= at_least

        await eventually(check)

    # Listed first: what exists then arrives by the list, not as events.
    await counted("shoal_kubernetes_synced", 1)
    emu.create(objects.namespace("shop", labels={settings.INJECT_LABEL: settings.INJECT_ENABLED}))
    emu.create(objects.service("shop", "web", ports=[("http", 80)]))
    await counted("shoal_kubernetes_watch_events_total", 1, kind="Service", type="ADDED")
    emu.delete("services", "web", namespace="shop")
    await counted("shoal_kubernetes_watch_events_total", 1, kind="Service", type="DELETED")

    # The API server calls the webhook (over HTTPS) when a Pod is created.
    assert kube_plane.webhook_port
    emu.map_service(HOME, "shoal", 443, f"127.0.0.1:{kube_plane.webhook_port}")
    configuration: dict[str, Any] = yaml.safe_load(WEBHOOK.read_text())
    emu.create(configuration)

    async def bundle_written() -> bool:
        found: Mapping[str, Any] | None = emu.get(
            "mutatingwebhookconfigurations", configuration["metadata"]["name"]
        )
        return bool(found and found["webhooks"][0]["clientConfig"].get("caBundle"))

    await eventually(bundle_written)
    pod = copy.deepcopy(shapes.load("named_probe_ports"))
    pod["metadata"]["namespace"] = "shop"
    # Off the test's loop, which serves the webhook the API server calls.
    await asyncio.to_thread(emu.create, pod)
    await counted("shoal_injection_reviews_total", 1, outcome="injected")
    samples = await scrape(kube_plane)
    assert (value(samples, "shoal_injection_seconds_count") or 0.0) >= 1.0
    assert value(samples, "shoal_kubernetes_synced") == 1.0
    # Also on the JSON report, unchanged.
    assert json.dumps(await debug(kube_plane, "kubernetes"))
