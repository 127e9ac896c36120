"""Traces and access logs from real sidecars: one request through three
services is one stitched trace in the embedded collector (or an external
Zipkin endpoint), and each sidecar logs it with its trace id."""

from __future__ import annotations

import json
import secrets
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from shoal import cli, envoy
from shoal.demo import mesh
from shoal.model import mesh as model_mesh
from tests.conftest import write
from tests.e2e.helpers import caught_up, eventually
from tests.manifests import workload

CHAIN = ("frontend", "catalog", "pricing")


def _notes(sampling: str | None, access_log: str | None) -> str:
    lines = []
    if sampling is not None:
        lines.append(f'    shoal.io/trace-sampling: "{sampling}"')
    if access_log is not None:
        lines.append(f'    shoal.io/access-log: "{access_log}"')
    return "\n".join(lines)


async def _chain(
    control_plane: cli.ControlPlane,
    registry_dir: Path,
    local_mesh: mesh.LocalMesh,
    *,
    sampling: str | None = "100",
    pricing_log: str = "on",
) -> dict[str, mesh.Workload]:
    """client -> frontend -> catalog -> pricing, each behind its sidecar."""
    names = ("client", *CHAIN)
    ports = {name: envoy.free_port() for name in names}
    for name, port in ports.items():
        log = pricing_log if name == "pricing" else "on"
        notes = _notes(sampling if name == "frontend" else None, log)
        write(registry_dir, f"{name}.yaml", workload(name, f"{name}-sa", port, notes))
    await caught_up(control_plane, registry_dir)
    calls = {"frontend": ("catalog",), "catalog": ("pricing",)}
    out = {}
    for name, port in ports.items():
        out[name] = await local_mesh.add(
            f"{name}-1",
            namespace="default",
            service=name,
            inbound_port=port,
            service_account=f"{name}-sa",
            calls=calls.get(name, ()),
        )
    return out


async def _through(session: aiohttp.ClientSession, client: mesh.Workload) -> dict[str, Any]:
    async def answered() -> bool:
        status, body = await mesh.get(session, client, "frontend")
        return status == 200 and isinstance(body, dict) and body["upstream"][0]["status"] == 200

    await eventually(answered)
    status, body = await mesh.get(session, client, "frontend")
    assert status == 200 and isinstance(body, dict)
    return body


def _log_lines(w: mesh.Workload) -> list[dict[str, Any]]:
    out = []
    for line in w.envoy.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


async def test_one_request_through_three_services_is_one_stitched_trace(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    assert control_plane.traces is not None and control_plane.collector_port
    w = await _chain(control_plane, registry_dir, local_mesh, pricing_log="off")
    async with aiohttp.ClientSession() as session:
        await _through(session, w["client"])
        # A W3C caller: its trace id is the one every hop reports.
        trace_id = secrets.token_hex(16)
        parent = secrets.token_hex(8)
        status, _ = await mesh.get(
            session,
            w["client"],
            "frontend",
            headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        )
        assert status == 200
    store = control_plane.traces

    def trace() -> dict[str, Any] | None:
        return store.trace(trace_id)

    async def complete() -> bool:
        found = trace()
        # client out; frontend in, out; catalog in, out; pricing in.
        return found is not None and len(found["spans"]) == 6

    await eventually(complete)
    found = trace()
    assert found is not None
    spans = found["spans"]
    by_id = {s["id"]: s for s in spans}
    assert {s["traceId"] for s in spans} == {trace_id}
    (root,) = [s for s in spans if s.get("parentId") not in by_id]
    assert root["parentId"] == parent and root["service"] == "client.default"
    chain = [root]
    while chain[-1]["children"]:
        (child,) = chain[-1]["children"]
        chain.append(by_id[child])
    assert [(s["service"], s["kind"]) for s in chain] == [
        ("client.default", "CLIENT"),
        ("frontend.default", "SERVER"),
        ("frontend.default", "CLIENT"),
        ("catalog.default", "SERVER"),
        ("catalog.default", "CLIENT"),
        ("pricing.default", "SERVER"),
    ]
    spiffe = "spiffe://cluster.local/ns/default/sa/"
    for client_span, server_span in zip(chain[0::2], chain[1::2], strict=True):
        source = client_span["service"].split(".")[0]
        destination = server_span["service"].split(".")[0]
        tags = client_span["tags"]
        assert tags["shoal.source.service"] == f"{source}.default"
        assert tags["shoal.source.identity"] == f"{spiffe}{source}-sa"
        assert tags["shoal.destination.service"] == f"{destination}.default"
        assert tags["shoal.destination.identity"] == f"{spiffe}{destination}-sa"
        assert tags["shoal.route"] == f"{destination}.default:80#0"
        assert tags["upstream_cluster"].startswith(f"outbound|80||{destination}.default")
        assert tags["http.status_code"] == "200"
        assert "response_flags" in tags
        server_tags = server_span["tags"]
        assert server_tags["shoal.destination.identity"] == f"{spiffe}{destination}-sa"
        assert server_tags["shoal.source.identity"] == f"{spiffe}{source}-sa"
    # The admin API shows it to readers (the socket), stitched.
    connector = aiohttp.UnixConnector(path=control_plane.admin_socket)
    async with aiohttp.ClientSession(connector=connector) as admin:
        async with admin.get("http://shoal/debug/traces?service=catalog") as r:
            listed = await r.json()
        assert trace_id in [t["traceId"] for t in listed["traces"]]
        async with admin.get(f"http://shoal/debug/traces/{trace_id}") as r:
            assert r.status == 200
            assert len((await r.json())["spans"]) == 6
    async with (
        aiohttp.ClientSession() as anonymous,
        anonymous.get(f"http://127.0.0.1:{control_plane.admin_port}/debug/traces") as r,
    ):
        assert r.status == 403

    # Access logs: each sidecar's line carries the request's trace id; pricing
    # has shoal.io/access-log: "off" and logs nothing.
    async def logged() -> bool:
        return all(
            any(line["trace_id"] == trace_id for line in _log_lines(w[name]))
            for name in ("client", "frontend", "catalog")
        )

    await eventually(logged)
    (inbound,) = [
        line
        for line in _log_lines(w["catalog"])
        if line["trace_id"] == trace_id and line["direction"] == "inbound"
    ]
    assert inbound["source_identity"] == f"{spiffe}frontend-sa"
    assert inbound["destination_service"] == "catalog.default"
    assert inbound["response_code"] == 200
    assert inbound["method"] == "GET"
    (outbound,) = [
        line
        for line in _log_lines(w["catalog"])
        if line["trace_id"] == trace_id and line["direction"] == "outbound"
    ]
    assert outbound["destination_identity"] == f"{spiffe}pricing-sa"
    assert outbound["route_name"] == "pricing.default:80#0"
    assert outbound["upstream_cluster"].startswith("outbound|80||pricing.default")
    assert _log_lines(w["pricing"]) == []


async def _only_forced_requests_are_traced(
    control_plane: cli.ControlPlane, w: dict[str, mesh.Workload]
) -> None:
    """20 requests that sampling leaves untraced, then 5 a header forces:
    the collector ends up with exactly the forced trace."""
    assert control_plane.traces is not None
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            await _through(session, w["client"])

    # The request ids were logged, and those requests were not traced: the
    # log lines of a request are written when it ends, after its spans.
    async def logged() -> bool:
        return len(_log_lines(w["pricing"])) >= 20

    await eventually(logged)
    # Envoy flushes spans every 5 s or 5 spans: a few more requests traced at
    # 100 % (a header forces it) show the pipeline works, and only them.
    async with aiohttp.ClientSession() as session:
        trace_id = secrets.token_hex(16)
        headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
        for _ in range(5):
            status, _ = await mesh.get(session, w["client"], "frontend", headers=headers)
            assert status == 200

    async def forced_arrived() -> bool:
        found = control_plane.traces.trace(trace_id) if control_plane.traces else None
        return found is not None and len(found["spans"]) >= 6

    await eventually(forced_arrived)
    assert [t["traceId"] for t in control_plane.traces.summaries(limit=1000)] == [trace_id]


async def test_sampling_zero_yields_no_trace(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    assert control_plane.traces is not None
    w = await _chain(control_plane, registry_dir, local_mesh, sampling="0")
    await _only_forced_requests_are_traced(control_plane, w)


@pytest.mark.parametrize("telemetry", [model_mesh.Telemetry(trace_sampling=0.0)])
async def test_the_mesh_wide_sampling_flag_alone_turns_tracing_off(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    """`shoal serve --trace-sampling 0`, no annotation: no request is traced
    (every route carries the mesh's sampling: a route's tracing without one
    would sample all)."""
    assert control_plane.traces is not None
    w = await _chain(control_plane, registry_dir, local_mesh, sampling=None)
    await _only_forced_requests_are_traced(control_plane, w)


async def test_the_collector_refuses_a_client_without_a_mesh_certificate(
    control_plane: cli.ControlPlane,
) -> None:
    url = f"https://127.0.0.1:{control_plane.collector_port}/api/v2/spans"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(url, json=[], ssl=context) as r:
                await r.read()
        # Plain HTTP is not spoken either.
        with pytest.raises(aiohttp.ClientError):
            async with session.post(url.replace("https", "http"), json=[]) as r:
                await r.read()


@pytest.fixture
async def zipkin() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """A Zipkin-protocol endpoint, as small as they come."""
    received: list[dict[str, Any]] = []

    async def spans(request: web.Request) -> web.Response:
        received.extend(await request.json())
        return web.Response(status=202)

    application = web.Application()
    application.router.add_post("/api/v2/spans", spans)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    port = envoy.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port, received
    finally:
        await runner.cleanup()


async def test_an_external_zipkin_endpoint_receives_the_spans(
    registry_dir: Path,
    tmp_path: Path,
    zipkin: tuple[int, list[dict[str, Any]]],
    xds_mode: str,
) -> None:
    port, received = zipkin
    options = cli.ServeOptions(
        registry=registry_dir,
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        state_dir=tmp_path / "state",
        join_address="127.0.0.1:0",
        collector_address="127.0.0.1:0",
        debounce_quiet=0.05,
        debounce_max=0.5,
        telemetry=model_mesh.Telemetry(
            trace_sampling=100.0,
            external=model_mesh.ZipkinEndpoint("127.0.0.1", port, "/api/v2/spans"),
        ),
    )
    async with cli.control_plane(options) as cp:
        local = mesh.LocalMesh(
            tmp_path / "sidecars",
            cp.xds_port,
            delta=xds_mode == "delta",
            authority=cp.authority,
            collector_port=cp.collector_port,
        )
        try:
            w = await _chain(cp, registry_dir, local)
            trace_id = secrets.token_hex(16)
            async with aiohttp.ClientSession() as session:
                await _through(session, w["client"])
                headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
                status, _ = await mesh.get(session, w["client"], "frontend", headers=headers)
                assert status == 200

            async def arrived() -> bool:
                return len([s for s in received if s["traceId"] == trace_id]) >= 6

            await eventually(arrived)
            services = {s["localEndpoint"]["serviceName"] for s in received}
            assert {"client.default", "frontend.default", "catalog.default"} <= services
            # Nothing went to the embedded collector.
            assert cp.traces is not None and len(cp.traces) == 0
        finally:
            try:
                await local.close()
            finally:
                local.kill_all()


async def test_a_sampling_percentage_samples_that_share_of_requests(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    """10 % samples about 10 %: Envoy draws a request's number modulo
    10,000, so a route sampling expressed per million sampled everything
    below 1 % of a million (a 1 % setting traced every request)."""
    ports = {name: envoy.free_port() for name in ("caller", "web")}
    sampled = '    shoal.io/trace-sampling: "10"\n'
    for name, port in ports.items():
        notes = sampled if name == "web" else ""
        write(registry_dir, f"{name}.yaml", workload(name, f"{name}-sa", port, notes))
    await caught_up(control_plane, registry_dir)
    w = {
        name: await local_mesh.add(
            f"{name}-1",
            namespace="default",
            service=name,
            inbound_port=port,
            service_account=f"{name}-sa",
        )
        for name, port in ports.items()
    }
    stat = "http.outbound.tracing.random_sampling"
    async with aiohttp.ClientSession() as session:
        for _ in range(400):
            status, _ = await mesh.get(session, w["caller"], "web")
            assert status == 200
        admin = f"http://127.0.0.1:{w['caller'].envoy.admin_port}/stats"
        async with session.get(admin, params={"filter": f"^{stat}$"}) as r:
            counted = int((await r.text()).split(":")[1])
    # Binomial(400, 0.1): mean 40, standard deviation 6; outside 15-80 is
    # a chance below one in a million.
    assert 15 <= counted <= 80, counted
