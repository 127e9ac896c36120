"""The dashboard in a real browser (Debian's Chromium, driven by Playwright)
against a running mesh of real Envoys: what a person sees is checked against
the mesh's real state, and each view is saved as a screenshot."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from shoal import cli, envoy
from shoal.demo import mesh
from shoal.observe.dashboard import prometheus
from shoal.observe.dashboard import server as dashboard
from shoal.xds import resources
from shoal.xds import server as xds_server
from tests import manifests
from tests import prometheus as prometheus_server
from tests.conftest import write
from tests.e2e import test_observe
from tests.e2e.helpers import caught_up, eventually

CHROMIUM = Path("/usr/bin/chromium")  # Debian's: Playwright cannot download browsers here
WAIT_MS = 30_000
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def xds_mode() -> str:
    """The browser checks the pages, not the xDS variants: one kind of Envoy."""
    return "sotw"


@pytest.fixture
def chromium() -> str:
    assert CHROMIUM.exists(), "Debian's chromium is missing: `make system` installs it"
    return str(CHROMIUM)


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium, headless=True)
        try:
            yield b
        finally:
            await b.close()


@contextlib.asynccontextmanager
async def opened(b: Browser, url: str, dark: bool = False) -> AsyncIterator[Page]:
    context = await b.new_context(
        viewport={"width": 1440, "height": 900},
        color_scheme="dark" if dark else "light",
        device_scale_factor=1,
    )
    try:
        page = await context.new_page()
        await page.goto(url)
        yield page
    finally:
        await context.close()


async def show(page: Page, view: str) -> None:
    await page.goto(page.url.split("#")[0] + f"#/{view}")
    await expect(page.locator(f'main[data-view="{view}"]')).to_be_visible(timeout=WAIT_MS)


async def read_all(elements: Locator, count: int, *attributes: str) -> list[tuple[str, ...]]:
    """`attributes` of each of `count` elements, read in one step: the page
    redraws itself every few seconds, and elements read one by one may be
    gone between two reads."""
    found: list[tuple[str, ...]] = []

    async def all_there() -> bool:
        rows = await elements.evaluate_all(
            "(els, names) => els.map(e => names.map(n => e.getAttribute(n) ?? ''))",
            list(attributes),
        )
        found[:] = [tuple(row) for row in rows]
        return len(found) == count

    await eventually(all_there, timeout=WAIT_MS / 1000)
    return found


async def shot(page: Page, folder: Path, name: str) -> None:
    # Playwright makes the folder.
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


SPLIT = (
    '    shoal.io/split: "reviews=80,reviews-v2=20"\n'
    '    shoal.io/route-headers: "x-user-group=internal -> reviews-v2"\n'
)


async def _mesh(cp: cli.ControlPlane, folder: Path, local: mesh.LocalMesh) -> mesh.Workload:
    """frontend -> reviews (80 %) / reviews-v2 (20 %), and a Service whose
    annotation is malformed (a problem)."""
    ports = {name: envoy.free_port() for name in ("frontend", "reviews", "reviews-v2")}
    write(
        folder, "frontend.yaml", manifests.service_with_endpoints("frontend", [ports["frontend"]])
    )
    write(
        folder,
        "reviews.yaml",
        manifests.service("reviews", extra="\n  annotations:\n" + SPLIT)
        + "---\n"
        + manifests.endpoint_slice("reviews", "reviews", [ports["reviews"]]),
    )
    write(
        folder,
        "reviews-v2.yaml",
        manifests.service_with_endpoints("reviews-v2", [ports["reviews-v2"]]),
    )
    write(
        folder,
        "canary-route.yaml",
        """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-v2-header, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews-v2}]
  rules:
    - name: tagged
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-version, value: v2}]}
      backendRefs: [{name: reviews-v2, port: 80}]
""",
    )
    write(
        folder,
        "broken.yaml",
        manifests.service("broken", extra='\n  annotations:\n    shoal.io/split: "nonsense"\n'),
    )
    await caught_up(cp, folder)
    caller = await local.add(
        "frontend-1", namespace="default", service="frontend", inbound_port=ports["frontend"]
    )
    await local.add(
        "reviews-1", namespace="default", service="reviews", inbound_port=ports["reviews"]
    )
    await local.add(
        "reviews-v2-1", namespace="default", service="reviews-v2", inbound_port=ports["reviews-v2"]
    )
    return caller


def _trace() -> tuple[str, list[dict[str, object]]]:
    """A stitched trace of three services, as sidecars report them (Zipkin v2)."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    start = int(time.time() * 1_000_000)

    def span(
        span_id: str, parent: str | None, service: str, name: str, at: int, took: int
    ) -> dict[str, object]:
        return {
            "traceId": trace_id,
            "id": span_id,
            **({"parentId": parent} if parent else {}),
            "name": name,
            "kind": "SERVER" if parent is None or span_id.endswith("2") else "CLIENT",
            "timestamp": start + at,
            "duration": took,
            "localEndpoint": {"serviceName": service},
            "tags": {"http.status_code": "200", "upstream_cluster": f"outbound|80||{service}"},
        }

    return trace_id, [
        span("a000000000000001", None, "frontend.default", "GET /", 0, 42_000),
        span(
            "a000000000000002", "a000000000000001", "reviews.default", "GET /reviews", 3_000, 30_000
        ),
        span(
            "a000000000000003", "a000000000000002", "ratings.default", "GET /ratings", 9_000, 14_000
        ),
    ]


async def _nacking_proxy(cp: cli.ControlPlane) -> AsyncIterator[None]:
    """A proxy that rejects its clusters with Envoy's kind of error."""
    outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    async def outgoing():  # type: ignore[no-untyped-def]
        while (item := await outbox.get()) is not None:
            yield item

    async with test_observe._channel(cp, "default", "default") as channel:
        stream = channel.stream_stream(
            f"/{xds_server.ADS_SERVICE}/{xds_server.SOTW_METHOD}",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )(outgoing())
        await outbox.put(
            discovery_pb2.DiscoveryRequest(node=test_observe._node(), type_url=resources.CLUSTER)
        )
        response = await stream.read()
        await outbox.put(
            discovery_pb2.DiscoveryRequest(
                type_url=resources.CLUSTER,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=3, message="cluster a: bad thing"),
            )
        )
        try:
            yield
        finally:
            await outbox.put(None)
            stream.cancel()


async def test_each_view_shows_the_mesh_as_it_is(
    registry_dir: Path,
    control_plane: cli.ControlPlane,
    local_mesh: mesh.LocalMesh,
    browser: Browser,
    tmp_path: Path,
) -> None:
    caller = await _mesh(control_plane, registry_dir, local_mesh)
    sent = 60
    async with aiohttp.ClientSession() as session:

        async def routed() -> bool:
            status, _ = await mesh.get(session, caller, "reviews")
            return status == 200

        await eventually(routed)
        for _ in range(sent - 1):
            status, _ = await mesh.get(session, caller, "reviews")
            assert status == 200
    trace_id, spans = _trace()
    assert control_plane.traces is not None
    control_plane.traces.add(spans)
    shots = tmp_path / "screenshots"

    nack = contextlib.asynccontextmanager(_nacking_proxy)
    async with (
        nack(control_plane),
        dashboard.serve(control_plane.admin_socket) as url,
        opened(browser, url) as page,
    ):
        # Service graph: the caller's edges count every request it sent.
        await show(page, "graph")
        edges = page.locator('path[data-kind="traffic"][data-edge^="default/frontend>"]')
        await expect(edges).to_have_count(2, timeout=WAIT_MS)
        counted = [int(n or 0) for (n,) in await read_all(edges, 2, "data-requests")]
        assert sum(counted) == sent, counted
        await expect(page.locator('path[data-kind="route"]')).to_have_count(2)
        await expect(page.locator("#graph-source")).to_contain_text("sidecars' own Envoy stats")
        # Latency quantiles come once Envoy has merged its histograms (its
        # stats flush); the page refreshes itself until then.
        label = page.locator('g[data-label="default/frontend>default/reviews"]').first
        await expect(label).to_contain_text(re.compile(r"p99 [0-9.]+ m?s"), timeout=WAIT_MS)
        await shot(page, shots, "graph")

        # Services: the split's weights and the header route, and where they came from.
        await show(page, "services")
        reviews = page.locator('[data-service="default/reviews"]')
        await expect(reviews.locator('[data-weight="80"]')).to_contain_text("default/reviews")
        await expect(reviews.locator('[data-weight="20"]')).to_contain_text("default/reviews-v2")
        await expect(reviews).to_contain_text("header x-user-group = internal")
        await expect(reviews.locator(".pill.src")).to_have_text("annotations")
        attached = page.locator('[data-attached="HTTPRoute default/reviews-v2-header"]')
        await expect(attached).to_contain_text("routes every caller, every port")
        await expect(attached).to_contain_text("response x-version = v2")
        await expect(attached).to_contain_text("rule tagged")
        await shot(page, shots, "services")

        # Proxies: the real sidecars SYNCED, the rejecting one NACKED with Envoy's error.
        await show(page, "proxies")
        frontend = page.locator('tr[data-proxy="sidecar~default~frontend-1"]')
        for t in ("CDS", "LDS", "EDS", "RDS", "SDS"):
            await expect(frontend.locator(f'td[data-type="{t}"]')).to_have_text(
                "SYNCED", timeout=WAIT_MS
            )
        await expect(
            page.locator('tr[data-proxy="rejecting-proxy"] td[data-type="CDS"]')
        ).to_have_text("NACKED")
        await expect(page.locator('tr[data-proxy-error="rejecting-proxy"]')).to_contain_text(
            "rejected: cluster a: bad thing"
        )
        await shot(page, shots, "proxies")

        # Certificates: the root, and the workload identity the sidecars hold.
        await show(page, "certificates")
        await expect(page.locator("#roots tbody tr")).to_have_count(1)
        workload = page.locator('tr[data-identity="spiffe://cluster.local/ns/default/sa/default"]')
        await expect(workload).to_contain_text("sidecar~default~frontend-1", timeout=WAIT_MS)
        await expect(workload).to_contain_text("in 2")  # a 24 h certificate: "in 24.0h"/"in 23.9h"
        await shot(page, shots, "certificates")

        # Traces: the list, a search, and the waterfall of three services.
        await show(page, "traces")
        await expect(page.locator(f'tr[data-trace="{trace_id}"]')).to_contain_text(
            "frontend.default"
        )
        await page.fill("#trace-search", "ratings")
        await expect(page.locator("#traces tbody tr")).to_have_count(1)
        rows = page.locator("#waterfall .wf-row")
        await expect(rows).to_have_count(3, timeout=WAIT_MS)
        assert await read_all(rows, 3, "data-service") == [
            ("frontend.default",),
            ("reviews.default",),
            ("ratings.default",),
        ]
        await rows.nth(2).click()
        await expect(page.locator("#span-tags")).to_contain_text("outbound|80||ratings.default")
        await page.fill("#trace-search", "no-such-service")
        await expect(page.locator("#traces tbody tr")).to_have_count(0)
        await page.fill("#trace-search", "")
        await expect(rows).to_have_count(3, timeout=WAIT_MS)
        await shot(page, shots, "traces")

        # Pushes and problems.
        await show(page, "pushes")
        await expect(page.locator("#pushes tbody tr").first).to_be_visible()
        await shot(page, shots, "pushes")
        await show(page, "problems")
        broken = page.locator('#problems tr[data-code="SHL0003"]')
        await expect(broken).to_contain_text("Service default/broken")
        await expect(broken).to_contain_text("metadata.annotations[shoal.io/split]")
        await expect(broken).to_contain_text("Error")
        await expect(broken).to_contain_text("Fix: Correct the annotation")
        await shot(page, shots, "problems")

    async with (
        dashboard.serve(control_plane.admin_socket) as url,
        opened(browser, url, dark=True) as page,
    ):
        await show(page, "graph")
        await expect(page.locator('path[data-kind="traffic"]')).to_have_count(2, timeout=WAIT_MS)
        await shot(page, shots, "graph-dark")
        await show(page, "services")
        await expect(page.locator('[data-service="default/reviews"]')).to_be_visible()
        await shot(page, shots, "services-dark")


async def test_with_prometheus_the_graph_counts_what_prometheus_scraped(
    registry_dir: Path,
    control_plane: cli.ControlPlane,
    local_mesh: mesh.LocalMesh,
    browser: Browser,
    tmp_path: Path,
) -> None:
    """`shoal dashboard --prometheus URL`: a real Prometheus scrapes every
    sidecar's request metrics; the graph's edges are its figures, the page
    says so, and when Prometheus is gone the page says why and still draws
    the routing configuration."""
    caller = await _mesh(control_plane, registry_dir, local_mesh)
    admins = [w.envoy.admin_port for w in local_mesh.workloads.values()]
    sent = 40
    async with (
        prometheus_server.running(tmp_path / "prometheus", admins) as url,
        aiohttp.ClientSession() as session,
    ):

        async def routed() -> bool:
            status, _ = await mesh.get(session, caller, "reviews")
            return status == 200

        await eventually(routed)
        for _ in range(sent - 1):
            status, _ = await mesh.get(session, caller, "reviews")
            assert status == 200
        counted = prometheus.queries()["requests"]

        async def scraped() -> bool:
            found = await prometheus_server.query(session, url, counted)
            return sum(float(s["value"][1]) for s in found) == sent

        # Prometheus scrapes every second; the last requests are in after a scrape.
        await eventually(scraped, timeout=60)
        shots = tmp_path / "screenshots"
        metrics = prometheus.Prometheus(url)
        async with (
            dashboard.serve(control_plane.admin_socket, metrics=metrics) as page_url,
            opened(browser, page_url) as page,
        ):
            await show(page, "graph")
            edges = page.locator('path[data-kind="traffic"][data-edge^="default/frontend>"]')
            await expect(edges).to_have_count(2, timeout=WAIT_MS)
            counts = {
                edge: int(n or 0)
                for edge, n in await read_all(edges, 2, "data-edge", "data-requests")
            }
            assert sum(counts.values()) == sent, counts
            assert set(counts) == {
                "default/frontend>default/reviews",
                "default/frontend>default/reviews-v2",
            }
            note = page.locator("#graph-source")
            await expect(note).to_contain_text(f"Prometheus at {url}")
            await expect(note).to_contain_text("envoy_shoal_requests_total")
            label = page.locator('g[data-label="default/frontend>default/reviews"]').first
            await expect(label).to_contain_text(re.compile(r"p99 [0-9.]+ m?s"), timeout=WAIT_MS)
            await shot(page, shots, "graph-prometheus")

    # Prometheus has stopped: the reason, and the routes the registry knows.
    async with (
        dashboard.serve(control_plane.admin_socket, metrics=metrics) as page_url,
        opened(browser, page_url) as page,
    ):
        await show(page, "graph")
        await expect(page.locator("#graph-source .source-error")).to_contain_text(
            "Prometheus did not answer", timeout=WAIT_MS
        )
        await expect(page.locator('path[data-kind="route"]')).to_have_count(2)
        await expect(page.locator('path[data-kind="traffic"]')).to_have_count(0)


async def test_the_dashboard_needs_its_token_and_answers_only_its_own_origin(
    control_plane: cli.ControlPlane,
) -> None:
    async with (
        dashboard.serve(control_plane.admin_socket) as url,
        # Cookies of an IP address, as a browser keeps them.
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session,
    ):
        base = url.split("?")[0].rstrip("/")
        async with session.get(f"{base}/api/syncz") as r:
            assert r.status == 401
        async with session.get(f"{base}/?token=wrong") as r:
            assert r.status == 401
        async with session.get(url) as r:  # the token becomes a cookie
            assert r.status == 200 and str(r.url) == f"{base}/"
        async with session.get(f"{base}/api/syncz") as r:
            assert r.status == 200
        async with session.get(f"{base}/api/syncz", headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403
        async with session.get(f"{base}/api/syncz", headers={"Host": "rebound.example"}) as r:
            assert r.status == 421
        # Read-only: nothing but GET, and only the reports the pages need.
        async with session.post(f"{base}/api/ca/rotate-root") as r:
            assert r.status == 405
        async with session.get(f"{base}/api/config_dump?proxy=x") as r:
            assert r.status == 404


async def test_shoal_serve_serves_the_dashboard_and_hands_its_link_to_admins(
    registry_dir: Path, tmp_path: Path
) -> None:
    """`shoal serve --dashboard-address`: the control plane serves the pages
    itself (what `shoal dashboard --kubernetes` forwards to), and
    `shoal dashboard url` over the admin socket is the one way to its token."""
    options = cli.ServeOptions(
        registry=registry_dir,
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        state_dir=tmp_path / "state",
        collector_address="",
        dashboard_address="127.0.0.1:0",
    )
    async with cli.control_plane(options) as cp:
        printed = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shoal.cli", "dashboard", "url", "--admin", cp.admin_socket],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.strip() == cp.dashboard_url
        base = cp.dashboard_url.split("?")[0].rstrip("/")
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(f"{base}/api/graph") as r:
                assert r.status == 401
            async with session.get(cp.dashboard_url) as r:
                assert r.status == 200
            async with session.get(f"{base}/api/graph") as r:
                assert r.status == 200
                assert (await r.json())["source"]["kind"] == "envoy-stats"
            # Not to anonymous callers of the TCP admin port.
            admin = f"http://127.0.0.1:{cp.admin_port}/{cli.DASHBOARD_LOGIN}"
            async with session.post(admin) as r:
                assert r.status == 403
