"""The dashboard's page load on a mesh of 1,000 Services, in a real browser.

    .venv/bin/python bench/dashboard.py [--services 1000] [--loads 5] [--json]

A control plane (`cli.control_plane`, in this process) on a manifests folder
of SERVICES Services in namespace `default`: SERVICES - 2 of them with one
port 80/http and an EndpointSlice of 3 ready endpoints (10.x.y.z:8080), and
`client` and `server`, each with a real Envoy sidecar and demo app of
`shoal.demo.mesh.LocalMesh`, 200 requests sent client -> server through them
before measuring (so the graph has a traffic edge and two sidecars to scrape,
each holding the 1,000 clusters of the mesh). The dashboard server
(`shoal.observe.dashboard.server.serve`, what `shoal dashboard` runs) talks
to the control plane's admin socket, in this process too.

Headless Chromium (Debian's /usr/bin/chromium, driven by Playwright, viewport
1440x900) opens each view LOADS times, each time in a fresh page of one
browser context (the cookie from the token URL kept, nothing else cached:
the server sends `Cache-Control: no-store`). An init script records
`performance.now()` (ms since the navigation started) when the view's
content is put into `<main>` (its `data-view` attribute is set, in the same
task as the content) and at the next animation frame after it (layout and
style done). The table gives the median and range over loads.

Then each `/api/*` report the pages read is fetched 5 times with the
dashboard's cookie (aiohttp, from this process): the median time and its size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import localmesh
from playwright.async_api import Browser, async_playwright

from shoal import envoy
from shoal.demo import mesh
from shoal.observe.dashboard import server as dashboard

CHROMIUM = "/usr/bin/chromium"
VIEWS = ("graph", "services", "proxies")
# What each view shows one of per Service or proxy: the "elements" figure.
VIEW_ITEMS = {
    "graph": "#main svg g[data-node]",
    "services": "#main section[data-service]",
    "proxies": "#main tr[data-proxy]",
}
API = ("graph", "services", "syncz", "ca", "pushes", "problems", "traces")
WAIT_MS = 120_000

RECORDER = """
window.__shoal = {content: null, frame: null};
document.addEventListener("DOMContentLoaded", () => {
  const main = document.getElementById("main");
  new MutationObserver(() => {
    if (main.dataset.view && window.__shoal.content === null) {
      window.__shoal.content = performance.now();
      requestAnimationFrame(() => { window.__shoal.frame = performance.now(); });
    }
  }).observe(main, {attributes: true, attributeFilter: ["data-view"]});
});
"""


def service_yaml(name: str) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  ports: [{{name: http, port: 80}}]
"""


def slice_yaml(name: str, addresses: list[str], port: int, pod: str = "") -> str:
    target = f"\n    targetRef: {{kind: Pod, name: {pod}}}" if pod else ""
    endpoints = "".join(
        f'  - addresses: ["{a}"]\n    conditions: {{ready: true}}{target}\n' for a in addresses
    )
    return f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
{endpoints}"""


def pod_yaml(name: str) -> str:
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}-1, namespace: default}}
spec: {{serviceAccountName: {name}-sa}}
"""


def write_mesh(folder: Path, services: int, ports: dict[str, int]) -> None:
    for i in range(services - len(ports)):
        name = f"svc-{i:05d}"
        n = i * 3
        addresses = [
            f"10.{(n + k) >> 16 & 255}.{(n + k) >> 8 & 255}.{(n + k) & 255}" for k in (1, 2, 3)
        ]
        (folder / f"{name}.yaml").write_text(
            service_yaml(name) + "---\n" + slice_yaml(name, addresses, 8080)
        )
    for name, port in ports.items():
        (folder / f"{name}.yaml").write_text(
            service_yaml(name)
            + "---\n"
            + pod_yaml(name)
            + "---\n"
            + slice_yaml(name, ["127.0.0.1"], port, pod=f"{name}-1")
        )


async def load_view(browser: Browser, url: str, view: str, loads: int) -> dict[str, Any]:
    # bypass_csp: Playwright polls with eval, which the page's CSP refuses.
    context = await browser.new_context(viewport={"width": 1440, "height": 900}, bypass_csp=True)
    try:
        await context.add_init_script(RECORDER)
        page = await context.new_page()
        await page.goto(url)  # the token URL: sets the cookie, redirects to /
        await page.wait_for_selector("main[data-view]", state="attached", timeout=WAIT_MS)
        await page.close()
        content: list[float] = []
        frame: list[float] = []
        wall: list[float] = []
        rows: int = 0
        base = url.split("?")[0]
        for _ in range(loads):
            page = await context.new_page()
            try:
                t0 = time.perf_counter()
                await page.goto(f"{base}#/{view}")
                await page.wait_for_function(
                    "window.__shoal && window.__shoal.frame !== null", timeout=WAIT_MS, polling=10
                )
                wall.append((time.perf_counter() - t0) * 1000)
                found = await page.evaluate("window.__shoal")
                shown = await page.evaluate("document.getElementById('main').dataset.view")
                if shown != view:
                    raise RuntimeError(f"asked for {view}, shown {shown}")
                content.append(found["content"])
                frame.append(found["frame"])
                rows = await page.evaluate(
                    f"document.querySelectorAll({json.dumps(VIEW_ITEMS[view])}).length"
                )
            finally:
                await page.close()
    finally:
        await context.close()

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "median": round(statistics.median(values)),
            "min": round(min(values)),
            "max": round(max(values)),
        }

    return {
        "view": view,
        "content_ms": summary(content),
        "frame_ms": summary(frame),
        "wall_ms": summary(wall),
        "elements": rows,
    }


async def api_sizes(url: str, repeats: int = 5) -> list[dict[str, Any]]:
    base = url.split("?")[0].rstrip("/")
    out = []
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        async with session.get(url, allow_redirects=True) as r:
            await r.read()
        for name in API:
            times = []
            size = 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                async with session.get(f"{base}/api/{name}") as r:
                    body = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"/api/{name}: {r.status} {body[:200]!r}")
                times.append((time.perf_counter() - t0) * 1000)
                size = len(body)
            out.append(
                {"api": name, "bytes": size, "median_ms": round(statistics.median(times), 1)}
            )
    return out


async def run(services: int, loads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-dashboard-") as tmp:
        work = Path(tmp)
        registry = work / "registry"
        registry.mkdir()
        ports = {"client": envoy.free_port(), "server": envoy.free_port()}
        write_mesh(registry, services, ports)
        async with localmesh.control_plane(registry, work, services) as cp:
            local = localmesh.local_mesh(cp, work)
            try:
                w = await localmesh.sidecars(local, ports)
                # Traffic for the graph's edge. If the sidecars cannot carry it
                # (a translation they reject), the pages are still measured
                # and the figures say so.
                sent = 0
                async with aiohttp.ClientSession() as session:
                    deadline = time.monotonic() + 20
                    while sent < 200 and time.monotonic() < deadline:
                        with contextlib.suppress(aiohttp.ClientError, OSError):
                            status, _ = await mesh.get(session, w["client"], "server")
                            sent += status == 200
                        if not sent:
                            await asyncio.sleep(0.1)
                async with dashboard.serve(cp.admin_socket) as url:
                    apis = await api_sizes(url)
                    async with async_playwright() as p:
                        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
                        try:
                            views = [await load_view(browser, url, v, loads) for v in VIEWS]
                        finally:
                            await browser.close()
            finally:
                try:
                    await local.close()
                finally:
                    local.kill_all()
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "services": services,
        "loads": loads,
        "requests_through_sidecars": sent,
        "views": views,
        "api": apis,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found = asyncio.run(run(args.services, args.loads))
    if args.json:
        print(json.dumps(found, indent=2))
        return
    print("| view | content in <main>, median (ms) | range | next frame, median (ms) | wall (ms) |")
    print("|---|---:|---:|---:|---:|")
    for v in found["views"]:
        c, f, w = v["content_ms"], v["frame_ms"], v["wall_ms"]
        print(
            f"| {v['view']} | {c['median']} | {c['min']}-{c['max']} | {f['median']} | "
            f"{w['median']} |"
        )
    print(f"requests through the two sidecars before loading: {found['requests_through_sidecars']}")
    print("| /api/* | bytes | median (ms) |")
    print("|---|---:|---:|")
    for a in found["api"]:
        print(f"| {a['api']} | {a['bytes']:,} | {a['median_ms']} |")


if __name__ == "__main__":
    main()
