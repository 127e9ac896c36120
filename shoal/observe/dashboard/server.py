"""`shoal dashboard`: the mesh's web pages, for the user who runs it.

The pages need what a *reader* of the admin API may see (`/debug/*`), and
the TCP admin port serves only anonymous callers. So the dashboard is not
served by that port: `shoal dashboard` runs as the operator, where the
control plane's admin socket is (the operating system says who may open
it), serves the pages on 127.0.0.1, and forwards an allowlist of read-only
`GET /debug/*` calls over the socket. Nothing it serves changes state.

127.0.0.1 is reachable by every local user and, through DNS rebinding or a
cross-origin request, by any web page the operator visits. So every API call
needs a secret: a random token, handed over once in the URL (`/?token=`),
swapped for an HttpOnly, SameSite=Strict cookie and dropped from the address
bar; the Host must be an address or localhost (admin.host_allowed), and an
Origin, if sent, this very one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from shoal.observe import admin, peers
from shoal.observe.dashboard import graph, prometheus

STATIC = Path(__file__).resolve().parent / "static"
# The reports the pages read; anything else of the admin API is not forwarded.
FORWARDED = ("syncz", "services", "ca", "pushes", "problems", "kubernetes", "traces")
# A trace id is hex (Zipkin: 16 or 32 characters).
_TRACE_ID = "{trace_id:[0-9a-fA-F]{1,64}}"
SCRAPE_TIMEOUT = 2.0

_STATE = web.AppKey("dashboard", dict)


@dataclass
class Upstream:
    """The control plane's admin API, over its Unix socket."""

    socket_path: str
    timeout: float = 10.0
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    async def get(self, path: str) -> tuple[int, bytes]:
        """Status and body of `GET path`; 502 with the reason when the
        control plane cannot be reached."""
        try:
            async with self.session().get(f"http://shoal{path}") as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            reason = f"cannot reach the control plane at {self.socket_path}: {err}"
            return 502, json.dumps({"error": reason}).encode()

    async def json(self, path: str) -> Any:
        status, body = await self.get(path)
        if status != 200:
            raise LookupError(f"{path}: {status}")
        return json.loads(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# Whether a proxy's admin page at 127.0.0.1 is this host's.
loopback = peers.on_this_host


async def _scrape(session: aiohttp.ClientSession, port: int) -> dict[str, Any] | None:
    try:
        async with session.get(f"http://127.0.0.1:{port}/stats", params=graph.STATS_QUERY) as r:
            if r.status != 200:
                return None
            found = await r.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
    return found if isinstance(found, dict) else None


async def _scraped(
    proxies: list[dict[str, Any]], rates: graph.Rates, scraper: aiohttp.ClientSession, now: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Traffic edges from the Envoy admin of each sidecar on this host."""
    local = [
        p for p in proxies if int(p.get("admin_port") or 0) and loopback(str(p.get("peer", "")))
    ]
    scraped = await asyncio.gather(*(_scrape(scraper, int(p["admin_port"])) for p in local))
    per_sidecar = [
        graph.edges_of(graph.caller_of(str(p["cluster"])), stats)
        for p, stats in zip(local, scraped, strict=True)
        if stats is not None
    ]
    merged = graph.merge(per_sidecar)
    per_second = rates.add(now, merged)
    edges: list[dict[str, Any]] = []
    for (caller, callee), e in sorted(merged.items()):
        rate = per_second.get((caller, callee))
        edges.append(
            {
                "source": caller,
                "target": callee,
                "kind": "traffic",
                "requests": e.requests,
                "errors": e.errors,
                "rps": None if rate is None else round(rate[0], 3),
                "error_rate": None if rate is None or rate[0] == 0 else round(rate[1] / rate[0], 4),
                "p50_ms": e.p50(),
                "p99_ms": e.p99(),
            }
        )
    source = {
        "kind": "envoy-stats",
        "scraped": len(per_sidecar),
        "unreachable": len(proxies) - len(per_sidecar),
    }
    return edges, source


async def _from_prometheus(
    metrics: prometheus.Prometheus, session: aiohttp.ClientSession
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Traffic edges from Prometheus; none, and the reason, when it fails
    (the routing configuration is still worth showing)."""
    source: dict[str, Any] = {"kind": "prometheus", "url": metrics.url, "window": metrics.window}
    try:
        return await metrics.traffic(session), source
    except prometheus.PrometheusError as err:
        return [], {**source, "error": str(err)}


async def service_graph(
    upstream: Upstream,
    rates: graph.Rates,
    scraper: aiohttp.ClientSession,
    metrics: prometheus.Prometheus | None = None,
) -> dict[str, Any]:
    """Nodes (Services), traffic edges (from Prometheus when configured,
    else the sidecars' stats), and the routing edges (a Service's calls
    sent on to its backends, by weight)."""
    services: dict[str, Any] = (await upstream.json("/debug/services"))["services"]
    proxies: list[dict[str, Any]] = await upstream.json("/debug/syncz")
    now = time.time()
    if metrics is None:
        edges, source = await _scraped(proxies, rates, scraper, now)
    else:
        edges, source = await _from_prometheus(metrics, scraper)
    for name, service in services.items():
        routing = service.get("routing") or {}
        for rule in routing.get("rules", ()):
            total = sum(b["weight"] for b in rule["backends"]) or 1
            for b in rule["backends"]:
                if b["service"] != name:
                    edges.append(
                        {
                            "source": name,
                            "target": b["service"],
                            "kind": "route",
                            "weight": round(100 * b["weight"] / total, 1),
                            "headers": rule.get("headers", []),
                            "from": routing.get("source", ""),
                        }
                    )
    nodes = sorted({*services, *(e["source"] for e in edges), *(e["target"] for e in edges)})
    return {
        "nodes": [{"id": n, "known": n in services} for n in nodes],
        "edges": edges,
        "source": {**source, "proxies": len(proxies), "at": now},
    }


def app(
    upstream: Upstream, token: str, metrics: prometheus.Prometheus | None = None
) -> web.Application:
    """The pages and `/api/*` (the forwarded reports and the graph)."""
    cookie = "shoal-dashboard"

    def authorized(request: web.Request) -> bool:
        given = request.cookies.get(cookie, "")
        return bool(given) and hmac.compare_digest(given, token)

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not admin.host_allowed(request.host, ()):
            return web.json_response({"error": "Host is not served here"}, status=421)
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
            return web.json_response({"error": "cross-origin requests are refused"}, status=403)
        if request.method != "GET":
            return web.json_response({"error": "the dashboard is read-only"}, status=405)
        if request.path.startswith("/api/") and not authorized(request):
            return web.json_response(
                {"error": "open the dashboard with the URL `shoal dashboard` printed"}, status=401
            )
        response = await handler(request)
        # No framing by other pages, no referrer leaking, scripts only ours.
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'"
        )
        return response

    async def index(request: web.Request) -> web.StreamResponse:
        given = request.query.get("token", "")
        if given:
            if not hmac.compare_digest(given, token):
                return web.Response(status=401, text="wrong token: use the URL shoal printed\n")
            # Swap the token for a cookie and take it out of the address bar.
            response = web.HTTPFound("/")
            response.set_cookie(cookie, token, httponly=True, samesite="Strict", path="/")
            raise response
        if not authorized(request):
            return web.Response(
                status=401,
                text="open the dashboard with the URL `shoal dashboard` printed\n",
            )
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def forward(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            path = f"/debug/{name}"
            if "trace_id" in request.match_info:
                path += f"/{request.match_info['trace_id']}"
            if request.query_string:
                path += f"?{request.query_string}"
            status, body = await upstream.get(path)
            return web.Response(
                status=status,
                body=body,
                content_type="application/json",
                headers={"Cache-Control": "no-store"},
            )

        return handle

    async def graph_handler(request: web.Request) -> web.Response:
        state = request.app[_STATE]
        try:
            found = await service_graph(upstream, state["rates"], state["scraper"], metrics)
        except (LookupError, ValueError, KeyError) as err:
            return web.json_response({"error": str(err)}, status=502)
        return web.json_response(found, headers={"Cache-Control": "no-store"})

    async def scraper(application: web.Application) -> AsyncIterator[None]:
        application[_STATE] = {
            "rates": graph.Rates(),
            "scraper": aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)),
        }
        yield
        await application[_STATE]["scraper"].close()
        await upstream.close()

    application = web.Application(middlewares=[guard])
    application.cleanup_ctx.append(scraper)
    application.router.add_get("/", index)
    application.router.add_get("/api/graph", graph_handler)
    for name in FORWARDED:
        application.router.add_get(f"/api/{name}", forward(name))
    application.router.add_get(f"/api/traces/{_TRACE_ID}", forward("traces"))
    application.router.add_static("/static/", STATIC, append_version=False)
    return application


def new_token() -> str:
    return secrets.token_urlsafe(24)


@contextlib.asynccontextmanager
async def serve(
    socket_path: str,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str = "",
    metrics: prometheus.Prometheus | None = None,
) -> AsyncIterator[str]:
    """Serve the dashboard; yields the URL to open (with its token). With
    `metrics`, the graph's traffic comes from that Prometheus."""
    token = token or new_token()
    runner = web.AppRunner(app(Upstream(socket_path), token, metrics), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound: int = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound}/?token={token}"
    finally:
        await runner.cleanup()
