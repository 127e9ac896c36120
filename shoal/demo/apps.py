"""Tiny HTTP services for the demo: each says who it is and whom it called."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field

import aiohttp
import grpc
from aiohttp import web

# What an app must copy from the request it serves to the calls it makes,
# for the mesh to stitch one trace across services (Envoy starts and reports
# the spans; only the app knows which call belongs to which request).
TRACE_HEADERS = ("x-request-id", "x-b3-", "b3", "traceparent", "tracestate")


@dataclass
class App:
    service: str
    instance: str
    version: str = "v1"
    calls: tuple[str, ...] = ()  # Hosts it calls through its sidecar, e.g. "backend"
    outbound_port: int = 0
    # Misbehaviour on purpose, to show what retries, timeouts and outlier
    # detection do: a share of requests answered 503, and a delay.
    fail_percent: float = 0.0
    delay_s: float = 0.0
    served: int = 0
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    namespace: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.served += 1
        self.seen_headers = [dict(request.headers)][-1:]
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_percent and random.random() * 100 < self.fail_percent:
            return web.json_response(
                {"service": self.service, "instance": self.instance, "error": "injected"},
                status=503,
            )
        upstream = []
        if self.calls:
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for host in self.calls:
                    upstream.append(await self._call(session, host, request))
        return web.json_response(
            {
                "service": self.service,
                "instance": self.instance,
                "namespace": self.namespace,
                "version": self.version,
                "upstream": upstream,
                # What reached the app, as the Gateway API conformance echo
                # server reports it: routing tests check rewrites and headers.
                "request": {
                    "method": request.method,
                    "path": request.path,
                    "query": request.query_string,
                    "host": request.host,
                    # A header sent twice is one value, joined as RFC 9110 says.
                    "headers": {
                        k.lower(): ",".join(request.headers.getall(k)) for k in request.headers
                    },
                },
            }
        )

    async def _call(
        self, session: aiohttp.ClientSession, host: str, request: web.Request
    ) -> dict[str, object]:
        # Trace context travels with the call, as a real app must do for
        # traces to stitch across services.
        forward = {
            k: v
            for k, v in request.headers.items()
            if k.lower().startswith((*TRACE_HEADERS, "x-user"))
        }
        try:
            async with session.get(
                f"http://127.0.0.1:{self.outbound_port}/",
                headers={"Host": host, **forward},
            ) as r:
                if r.content_type == "application/json":
                    body: dict[str, object] = await r.json()
                else:
                    body = {"error": (await r.text()).strip()}
                body["status"] = r.status
                return body
        except (TimeoutError, aiohttp.ClientError) as err:
            return {"error": f"{type(err).__name__}: {err}", "status": 0}


async def start(app: App, port: int) -> web.AppRunner:
    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", app.handle)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


class _AnyMethod(grpc.GenericRpcHandler):
    """Every gRPC method of every service: the reply says who answered and
    what arrived (the method's path and the metadata), as JSON."""

    def __init__(self, app: App) -> None:
        self.app = app

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        app = self.app
        method = handler_call_details.method

        async def reply(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            app.served += 1
            metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
            app.seen_headers = [metadata]
            return json.dumps(
                {
                    "service": app.service,
                    "instance": app.instance,
                    "namespace": app.namespace,
                    "version": app.version,
                    "request": {"method": "POST", "path": method, "headers": metadata},
                }
            ).encode()

        return grpc.unary_unary_rpc_method_handler(reply)


async def start_grpc(app: App, port: int) -> grpc.aio.Server:
    """The app as a gRPC server (h2c) on 127.0.0.1:`port`."""
    server = grpc.aio.server(handlers=[_AnyMethod(app)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server
