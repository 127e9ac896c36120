"""The control plane's admin HTTP endpoint (default 127.0.0.1:15014)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

Report = Callable[[], Any]
# A report that takes the request's query parameters; None means "not found".
Query = Callable[[Mapping[str, str]], Any]

# A change, by POST, with the query parameters.
Action = Callable[[Mapping[str, str]], Awaitable[Any]]

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def app(
    *,
    ready: Callable[[], tuple[bool, str]],
    reports: Mapping[str, Report],
    queries: Mapping[str, Query] | None = None,
    metrics: Callable[[], bytes] | None = None,
    actions: Mapping[str, Action] | None = None,
) -> web.Application:
    """`/ready` for probes, `/metrics` for Prometheus, `/debug/<name>` as JSON."""
    queries = queries or {}

    async def ready_handler(_: web.Request) -> web.Response:
        ok, reason = ready()
        return web.Response(status=200 if ok else 503, text=f"{reason}\n")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def index(_: web.Request) -> web.Response:
        lines = ["shoal control plane", "", "/ready", "/healthz"]
        lines += ["/metrics"] if metrics else []
        lines += [f"/debug/{name}" for name in sorted({*reports, *queries})]
        return web.Response(text="\n".join(lines) + "\n")

    def report_handler(report: Report) -> Callable[[web.Request], Any]:
        async def handle(_: web.Request) -> web.Response:
            return web.json_response(report(), dumps=_dumps)

        return handle

    def query_handler(query: Query) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            try:
                found = query(request.query)
            except ValueError as err:
                return web.json_response({"error": str(err)}, status=400)
            if found is None:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response(found, dumps=_dumps)

        return handle

    application = web.Application()
    application.router.add_get("/", index)
    application.router.add_get("/ready", ready_handler)
    application.router.add_get("/healthz", healthz)
    if metrics is not None:
        render = metrics

        async def metrics_handler(_: web.Request) -> web.Response:
            return web.Response(body=render(), headers={"Content-Type": PROMETHEUS_TEXT})

        application.router.add_get("/metrics", metrics_handler)
    for name, report in reports.items():
        application.router.add_get(f"/debug/{name}", report_handler(report))
    for name, query in queries.items():
        application.router.add_get(f"/debug/{name}", query_handler(query))

    def action_handler(action: Action) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            try:
                result = await action(request.query)
            except ValueError as err:
                return web.json_response({"error": str(err)}, status=400)
            except RuntimeError as err:
                return web.json_response({"error": str(err)}, status=409)
            return web.json_response(result, status=202, dumps=_dumps)

        return handle

    # Changes go by POST only, and the admin address is 127.0.0.1 by default.
    for name, action in (actions or {}).items():
        application.router.add_post(f"/{name}", action_handler(action))
    return application


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
