"""The control plane's admin HTTP endpoint (default 127.0.0.1:15014)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

Report = Callable[[], Any]


def app(*, ready: Callable[[], bool], reports: dict[str, Report]) -> web.Application:
    """`/ready` for probes; `/debug/<name>` serves each report as JSON."""

    async def ready_handler(_: web.Request) -> web.Response:
        ok = ready()
        return web.Response(status=200 if ok else 503, text="ready\n" if ok else "not ready\n")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def index(_: web.Request) -> web.Response:
        lines = ["shoal control plane", "", "/ready", "/healthz"]
        lines += [f"/debug/{name}" for name in sorted(reports)]
        return web.Response(text="\n".join(lines) + "\n")

    def report_handler(report: Report) -> Callable[[web.Request], Any]:
        async def handle(_: web.Request) -> web.Response:
            return web.json_response(report(), dumps=_dumps)

        return handle

    application = web.Application()
    application.router.add_get("/", index)
    application.router.add_get("/ready", ready_handler)
    application.router.add_get("/healthz", healthz)
    for name, report in reports.items():
        application.router.add_get(f"/debug/{name}", report_handler(report))
    return application


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
