"""Tracing and access logs in every sidecar connection manager: golden files,
`envoy --mode validate`, the annotations and the span store's bound."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2
from google.protobuf import json_format

from shoal import envoy
from shoal.model import mesh
from shoal.observe import traces
from shoal.registry import annotations
from shoal.xds.translate import capture, clusters, listeners, sidecar, telemetry
from tests.xds import fixtures
from tests.xds import test_capture as capture_tests
from tests.xds.test_envoy_validate import _bootstrap, validate
from tests.xds.test_translate import check_golden

TRUST_DOMAIN = "cluster.local"
EXTERNAL = mesh.ZipkinEndpoint("zipkin.example.com", 9411, "/api/v2/spans")


def _observed_state(external: mesh.ZipkinEndpoint | None = None) -> mesh.MeshState:
    state = fixtures.state()
    web = state.services[mesh.ServiceKey("shop", "web")]
    services = dict(state.services)
    services[web.key] = dataclasses.replace(web, trace_sampling=100.0)
    return dataclasses.replace(
        state,
        services=services,
        telemetry=mesh.Telemetry(trace_sampling=1.0, access_log=True, external=external),
    )


def _local_listeners(state: mesh.MeshState) -> list[listener_pb2.Listener]:
    s = fixtures.sidecar()
    security = sidecar.security(s, state, TRUST_DOMAIN)
    return sidecar.own_listeners(s, state, security, sidecar.observe(s, state, TRUST_DOMAIN))


def _managers(found: list[listener_pb2.Listener]) -> list[hcm_pb2.HttpConnectionManager]:
    out = []
    for listener in found:
        for chain in [*listener.filter_chains, listener.default_filter_chain]:
            for f in chain.filters:
                manager = hcm_pb2.HttpConnectionManager()
                if f.name == listeners.HCM and f.typed_config.Unpack(manager):
                    out.append(manager)
    return out


def _capture_listeners(state: mesh.MeshState) -> list[listener_pb2.Listener]:
    s = capture_tests.web_1()
    inbound, outbound = capture.observe(s, state, TRUST_DOMAIN)
    return [
        capture.virtual_outbound(state.sorted_services(), state, observe=outbound),
        capture.virtual_inbound(
            s, state, capture.security(s, state, TRUST_DOMAIN), observe=inbound
        ),
    ]


def test_golden_local_listeners_with_tracing_and_access_logs() -> None:
    check_golden("telemetry_local_listeners", list(_local_listeners(_observed_state())))


def test_golden_capture_listeners_with_tracing_and_access_logs() -> None:
    state = dataclasses.replace(capture_tests.state(), telemetry=mesh.Telemetry(access_log=True))
    check_golden("telemetry_capture_listeners", list(_capture_listeners(state)))


def test_every_http_manager_traces_with_b3_and_w3c() -> None:
    state = dataclasses.replace(capture_tests.state(), telemetry=mesh.Telemetry())
    found = [
        *_local_listeners(_observed_state()),
        *_capture_listeners(state),
    ]
    managers = _managers(found)
    # Local: inbound and outbound; capture: every outbound HTTP port and
    # every inbound HTTP port.
    assert len(managers) >= 4
    for manager in managers:
        assert manager.generate_request_id.value
        assert manager.tracing.provider.name == telemetry.ZIPKIN
        zipkin = telemetry.zipkin_pb2.ZipkinConfig()
        manager.tracing.provider.typed_config.Unpack(zipkin)
        assert zipkin.trace_context_option == zipkin.USE_B3_WITH_W3C_PROPAGATION
        assert zipkin.collector_cluster == telemetry.COLLECTOR_CLUSTER
        assert not zipkin.shared_span_context.value


def test_sampling_is_the_services_else_the_meshs() -> None:
    state = _observed_state()
    inbound, outbound = _managers(_local_listeners(state))
    # fixtures.sidecar() is shop/web, which asks for 100 %.
    assert inbound.tracing.random_sampling.value == 100.0
    assert outbound.tracing.random_sampling.value == 1.0
    routes = sidecar.outbound_routes("shop", state.sorted_services(), state)
    web_routes = [
        r
        for vh in routes.virtual_hosts
        if vh.name.startswith("web.shop")
        for r in vh.routes
        if r.name.startswith("web.shop")
    ]
    assert web_routes
    for r in web_routes:
        # Per ten thousand: Envoy compares it with x-request-id modulo 10,000.
        assert r.tracing.random_sampling.numerator == 10_000
        assert r.tracing.random_sampling.denominator == percent_pb2.FractionalPercent.TEN_THOUSAND


def _logs(manager: hcm_pb2.HttpConnectionManager) -> list[Any]:
    """The manager's JSON access logs (not its request metrics)."""
    return [log for log in manager.access_log if log.name == telemetry.STDOUT_LOG]


def test_access_logs_follow_the_service_then_the_namespace_then_the_mesh() -> None:
    base = fixtures.state()
    web = base.services[mesh.ServiceKey("shop", "web")]
    on = dataclasses.replace(base, telemetry=mesh.Telemetry(access_log=True))
    assert all(_logs(m) for m in _managers(_local_listeners(on)))
    services = dict(base.services)
    services[web.key] = dataclasses.replace(web, access_log=False)
    quiet = dataclasses.replace(on, services=services)
    assert not any(_logs(m) for m in _managers(_local_listeners(quiet)))
    namespace_off = dataclasses.replace(
        on, namespaces={"shop": mesh.Namespace("shop", access_log=False)}
    )
    assert not any(_logs(m) for m in _managers(_local_listeners(namespace_off)))
    services[web.key] = dataclasses.replace(web, access_log=True)
    service_on = dataclasses.replace(namespace_off, services=services)
    assert all(_logs(m) for m in _managers(_local_listeners(service_on)))


def test_access_logs_go_to_the_inherited_stdout_opening_no_path() -> None:
    """The file logger on /dev/stdout reopens Envoy's stdout by path, which
    a proxy of another user than its opener may not (a captured Pod's Envoy,
    UID 1337, under a root agent): Envoy then rejects the listener."""
    state = dataclasses.replace(fixtures.state(), telemetry=mesh.Telemetry(access_log=True))
    found = _managers(_local_listeners(state)) + _managers(_capture_listeners(state))
    logs = [log for m in found for log in m.access_log if log.name != telemetry.STATS_LOG]
    assert logs and {log.name for log in logs} == {telemetry.STDOUT_LOG}
    for log in logs:
        assert (
            log.typed_config.TypeName()
            == "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
        )


def _metrics(manager: hcm_pb2.HttpConnectionManager) -> Any:
    (log,) = [log for log in manager.access_log if log.name == telemetry.STATS_LOG]
    config = telemetry.stats_pb2.Config()
    assert log.typed_config.Unpack(config)
    return config


def test_every_http_manager_counts_requests_by_source_and_destination() -> None:
    """Access logs off or on, each manager has the request counter and the
    duration histogram, with the same tags: outbound, the proxy's own
    workload is the source and the upstream the destination; inbound, the
    caller's certificate is the source. No tag takes a value a caller
    chooses (a header would let anyone mint series)."""
    for access_log in (False, True):
        state = dataclasses.replace(
            fixtures.state(), telemetry=mesh.Telemetry(access_log=access_log)
        )
        found = _managers(_local_listeners(state)) + _managers(_capture_listeners(state))
        directions = set()
        for manager in found:
            config = _metrics(manager)
            (counter,) = config.counters
            (histogram,) = config.histograms
            assert (counter.stat.name, histogram.stat.name) == (
                telemetry.REQUESTS,
                telemetry.DURATION,
            )
            assert counter.value_fixed.value == 1
            assert histogram.value_format == "%DURATION%"
            assert histogram.unit == telemetry.stats_pb2.Config.Histogram.Milliseconds
            tags = {t.name: t.value_format for t in counter.stat.tags}
            assert tags == {t.name: t.value_format for t in histogram.stat.tags}
            assert not any("%REQ(" in v or "%RESP(" in v for v in tags.values()), tags
            assert tags["response_code"] == "%RESPONSE_CODE%"
            assert tags["response_flags"] == "%RESPONSE_FLAGS%"
            directions.add(tags["reporter"])
            if tags["reporter"] == "source":
                assert tags["source_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
                assert tags["destination_service"] == "%CLUSTER_METADATA(shoal:service)%"
                assert tags["destination_identity"] == "%UPSTREAM_PEER_URI_SAN%"
            else:
                assert tags["source_identity"] == "%DOWNSTREAM_PEER_URI_SAN%"
                assert tags["source_workload"] == telemetry.UNKNOWN
                assert tags["destination_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
        assert directions == {"source", "destination"}


def test_every_outbound_cluster_names_its_service_for_the_metrics() -> None:
    """The callee's sidecar names itself `reviews.shop`; the caller's reads
    the same name from the cluster it used, so both ends of a call report
    one destination_service."""
    state = fixtures.state()
    for service in state.sorted_services():
        for cluster in [
            *clusters.outbound_for_service(service),
            *(clusters.original_dst(service, port) for port in service.ports),
        ]:
            named = cluster.metadata.filter_metadata[telemetry.METADATA]
            assert named[telemetry.DESTINATION_KEY] == telemetry.service_name(service.key)
    passthrough = clusters.passthrough("PassthroughCluster")
    assert passthrough.metadata.filter_metadata["shoal"]["service"] == "PassthroughCluster"


def test_an_external_endpoint_gets_its_own_cluster() -> None:
    state = _observed_state(EXTERNAL)
    (cluster,) = telemetry.external_clusters(state.telemetry)
    assert cluster.name == telemetry.EXTERNAL_CLUSTER
    assert cluster.name in {c.name for c in sidecar.own_clusters(fixtures.sidecar(), state)}
    for manager in _managers(_local_listeners(state)):
        zipkin = telemetry.zipkin_pb2.ZipkinConfig()
        manager.tracing.provider.typed_config.Unpack(zipkin)
        assert zipkin.collector_cluster == telemetry.EXTERNAL_CLUSTER
        assert zipkin.collector_hostname == "zipkin.example.com"


def _inline_routes(found: list[listener_pb2.Listener], state: mesh.MeshState) -> list[Any]:
    routes = sidecar.outbound_routes("shop", state.sorted_services(), state)
    out = []
    for listener in found:
        for chain in listener.filter_chains:
            for f in chain.filters:
                manager = hcm_pb2.HttpConnectionManager()
                if f.typed_config.Unpack(manager) and manager.HasField("rds"):
                    manager.route_config.CopyFrom(routes)
                    f.typed_config.Pack(manager)
        out.append(json_format.MessageToDict(listener))
    return out


@pytest.mark.parametrize("external", [None, EXTERNAL])
def test_tracing_and_access_logs_are_valid_envoy_config(
    tmp_path: Path, external: mesh.ZipkinEndpoint | None
) -> None:
    state = _observed_state(external)
    config = _bootstrap()
    config["static_resources"]["listeners"] = _inline_routes(_local_listeners(state), state)
    config["static_resources"]["clusters"] += [
        json_format.MessageToDict(c)
        for c in [
            *sidecar.own_clusters(fixtures.sidecar(), state),
            *[c for svc in state.sorted_services() for c in clusters.outbound_for_service(svc)],
        ]
    ]
    result = validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- annotations ------------------------------------------------------------------


def test_trace_sampling_annotation() -> None:
    assert annotations.trace_sampling({}) is None
    assert annotations.trace_sampling({annotations.TRACE_SAMPLING: "100"}) == 100.0
    assert annotations.trace_sampling({annotations.TRACE_SAMPLING: "0.5%"}) == 0.5
    for bad in ("101", "-1", "lots", ""):
        with pytest.raises(annotations.AnnotationError, match="trace-sampling"):
            annotations.trace_sampling({annotations.TRACE_SAMPLING: bad})


def test_access_log_annotation() -> None:
    assert annotations.access_log({}) is None
    assert annotations.access_log({annotations.ACCESS_LOG: "On"}) is True
    assert annotations.access_log({annotations.ACCESS_LOG: "off"}) is False
    with pytest.raises(annotations.AnnotationError, match="'loud' is not 'on' or 'off'"):
        annotations.access_log({annotations.ACCESS_LOG: "loud"})


# -- the span store ---------------------------------------------------------------


def _span(trace: int, span: int, parent: int | None = None, service: str = "a") -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": f"{trace:032x}",
        "id": f"{span:016x}",
        "name": "GET /",
        "kind": "SERVER",
        "timestamp": 1_000_000 + span,
        "duration": 10,
        "localEndpoint": {"serviceName": service},
    }
    if parent is not None:
        out["parentId"] = f"{parent:016x}"
    return out


def test_the_store_stitches_a_trace_with_its_parents() -> None:
    store = traces.SpanStore()
    store.add([_span(1, 1, service="a"), _span(1, 3, 2, service="c")])
    store.add([_span(1, 2, 1, service="b"), {"not": "a span"}])
    assert store.rejected_spans == 1
    trace = store.trace(f"{1:032x}")
    assert trace is not None
    assert [s["service"] for s in trace["spans"]] == ["a", "b", "c"]
    assert [s["depth"] for s in trace["spans"]] == [0, 1, 2]
    assert trace["spans"][0]["children"] == [f"{2:016x}"]
    assert trace["services"] == ["a", "b", "c"]
    (summary,) = store.summaries(service="b")
    assert summary["spans"] == 3


def test_a_long_or_looping_chain_of_parents_is_read_back() -> None:
    """Any workload with a mesh certificate may report spans: a chain far
    deeper than Python's recursion, and a loop, are stitched all the same."""
    store = traces.SpanStore()
    store.add([_span(7, 1)] + [_span(7, n, n - 1) for n in range(2, 5001)])
    trace = store.trace(f"{7:032x}")
    assert trace is not None
    assert [s["depth"] for s in trace["spans"]] == list(range(5000))
    store.add([_span(8, 1, 2), _span(8, 2, 1)])
    looped = store.trace(f"{8:032x}")
    assert looped is not None and len(looped["spans"]) == 2


async def test_the_collector_answers_a_hostile_report_with_a_400() -> None:

    runner = web.AppRunner(traces.app(traces.SpanStore()))
    await runner.setup()
    port = envoy.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            for body in (b"[" * 100_000 + b"]" * 100_000, b"{", b"\xff"):
                async with session.post(
                    f"http://127.0.0.1:{port}{traces.SPANS_PATH}", data=body
                ) as r:
                    assert r.status == 400, await r.text()
                    assert "not a Zipkin v2 JSON report" in (await r.json())["error"]
    finally:
        await runner.cleanup()


def test_the_store_evicts_the_oldest_traces_at_its_bounds() -> None:
    store = traces.SpanStore(max_spans=10, max_bytes=1 << 20)
    for t in range(1, 8):
        store.add([_span(t, 1), _span(t, 2, 1)])
    assert store.spans <= 10
    kept = [s["traceId"] for s in store.summaries(limit=100)]
    assert kept == [f"{t:032x}" for t in (7, 6, 5, 4, 3)]
    assert store.evicted_traces == 2
    size = len(json.dumps(traces._clean(_span(1, 2, 1)), separators=(",", ":")))
    by_bytes = traces.SpanStore(max_spans=1000, max_bytes=size * 4)
    for t in range(1, 6):
        by_bytes.add([_span(t, 1), _span(t, 2, 1)])
    assert by_bytes.bytes <= size * 4
    assert [s["traceId"] for s in by_bytes.summaries()] == [f"{t:032x}" for t in (5, 4)]


def test_the_store_queries_refuse_bad_input() -> None:
    store = traces.SpanStore()
    with pytest.raises(ValueError, match="limit"):
        store.query_list({"limit": "0"})
    with pytest.raises(ValueError, match="not a trace id"):
        store.query_one({"trace_id": "zz"})
    assert store.query_one({"trace_id": "0" * 32}) is None
