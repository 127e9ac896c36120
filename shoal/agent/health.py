"""The Pod's health port (15021): readiness of the sidecar, and the app's
own HTTP, TCP and gRPC probes, which the injector rewrote to pass through
here so that kubelet's plain-text probes still reach an app whose port needs
mTLS (and so that a TCP probe is not answered by Envoy, which accepts a
connection whatever the app's state).

Only the probes in SHOAL_APP_PROBES are run, each against 127.0.0.1 on its
own port (and path, or gRPC service): the health port is anonymous and must
not become a way into the Pod.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp
import grpc
from aiohttp import web

log = logging.getLogger("shoal.agent")

READY_PATH = "/healthz/ready"
PROBE_PREFIX = "/app-health/"
_KINDS = ("livez", "readyz", "startupz")
# kubelet's default probe timeout (Pod spec: timeoutSeconds, default 1).
DEFAULT_TIMEOUT = 1.0
_MAX_TIMEOUT = 600.0


class ProbeError(ValueError):
    """SHOAL_APP_PROBES is not what the injector writes; says where."""


# gRPC's health checking protocol (grpc/grpc doc/health-checking.md), the
# one kubelet's gRPC probe speaks.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = 1


@dataclass(frozen=True)
class Probe:
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    # What kubelet would have done: an HTTP GET, a TCP connect, or a gRPC
    # health check (of `service`, "" for the server as a whole).
    action: Literal["httpGet", "tcpSocket", "grpc"] = "httpGet"
    service: str = ""

    def url(self) -> str:
        return f"{self.scheme.lower()}://127.0.0.1:{self.port}{self.path}"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def health_check_request(service: str) -> bytes:
    """HealthCheckRequest{service}, encoded by hand: one string field."""
    encoded = service.encode()
    return b"\x0a" + _varint(len(encoded)) + encoded if encoded else b""


def serving_status(response: bytes) -> int:
    """HealthCheckResponse.status (field 1, a varint); 0 (UNKNOWN) if absent
    or not readable."""
    if response[:1] != b"\x08":
        return 0
    value = shift = 0
    for byte in response[1:11]:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value
    return 0


def parse_probes(text: str) -> dict[str, Probe]:
    """SHOAL_APP_PROBES: {"/app-health/<container>/<livez|readyz|startupz>":
    {"httpGet": {...}, "timeoutSeconds": N}, ...}, as the injector writes it."""
    try:
        data = json.loads(text or "{}")
    except ValueError as err:
        raise ProbeError(f"SHOAL_APP_PROBES is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ProbeError("SHOAL_APP_PROBES is not a JSON object")
    return {path: _probe(path, entry) for path, entry in data.items()}


def _probe(path: str, entry: object) -> Probe:
    where = f"SHOAL_APP_PROBES[{path[:100]!r}]"
    parts = path.removeprefix(PROBE_PREFIX).split("/")
    if not path.startswith(PROBE_PREFIX) or len(parts) != 2 or parts[1] not in _KINDS:
        raise ProbeError(f"{where}: not /app-health/<container>/<{'|'.join(_KINDS)}>")
    if not isinstance(entry, dict):
        raise ProbeError(f"{where}: not an object")
    action = next((a for a in ("httpGet", "tcpSocket", "grpc") if a in entry), None)
    if action is None or not isinstance(entry[action], dict):
        raise ProbeError(f"{where}: no httpGet, tcpSocket or grpc")
    get = entry[action]
    port = get.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ProbeError(f"{where}: {action}.port {port!r} is not a port number")
    timeout = entry.get("timeoutSeconds", DEFAULT_TIMEOUT)
    if not isinstance(timeout, int | float) or not 0 < timeout <= _MAX_TIMEOUT:
        raise ProbeError(f"{where}: timeoutSeconds {timeout!r} is not a number of seconds")
    if action == "tcpSocket":
        return Probe(port, timeout=float(timeout), action="tcpSocket")
    if action == "grpc":
        service = get.get("service", "")
        if not isinstance(service, str):
            raise ProbeError(f"{where}: grpc.service {service!r} is not a string")
        return Probe(port, timeout=float(timeout), action="grpc", service=service)
    target = get.get("path") or "/"
    if not isinstance(target, str) or not target.startswith("/"):
        raise ProbeError(f"{where}: httpGet.path {target!r} is not a path")
    scheme = str(get.get("scheme") or "HTTP").upper()
    if scheme not in ("HTTP", "HTTPS"):
        raise ProbeError(f"{where}: httpGet.scheme {scheme!r} is not HTTP or HTTPS")
    headers = []
    for header in get.get("httpHeaders") or []:
        if not isinstance(header, dict) or not isinstance(header.get("name"), str):
            raise ProbeError(f"{where}: httpGet.httpHeaders has an entry without a name")
        headers.append((header["name"], str(header.get("value", ""))))
    return Probe(port, target, scheme, tuple(headers), float(timeout))


class Health:
    """The health port's answers; `ready` asks whether Envoy is."""

    def __init__(self, probes: dict[str, Probe], ready: Callable[[], Awaitable[str]]) -> None:
        """`ready` returns "" when the sidecar is ready, else why not."""
        self._probes = probes
        self._ready = ready
        self.draining = False
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(READY_PATH, self._readiness)
        app.router.add_get(PROBE_PREFIX + "{container}/{kind}", self._app_probe)
        return app

    async def _readiness(self, _: web.Request) -> web.Response:
        if self.draining:
            return web.Response(status=503, text="draining\n")
        why = await self._ready()
        if why:
            return web.Response(status=503, text=f"not ready: {why}\n")
        return web.Response(text="ready\n")

    async def _app_probe(self, request: web.Request) -> web.Response:
        probe = self._probes.get(request.path)
        if probe is None:
            return web.Response(status=404, text="no such probe\n")
        if probe.action == "tcpSocket":
            return await _tcp_probe(request.path, probe)
        if probe.action == "grpc":
            return await _grpc_probe(request.path, probe)
        if self._session is None:
            # kubelet does not verify an HTTPS probe's certificate either.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=False, force_close=True)
            )
        try:
            async with self._session.get(
                probe.url(),
                headers=dict(probe.headers),
                timeout=aiohttp.ClientTimeout(total=probe.timeout),
                allow_redirects=False,
            ) as answer:
                # kubelet reads at most a little of the body; so do we.
                body = await answer.content.read(1024)
                status = answer.status
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return web.Response(
                status=503, text=f"probe {request.path} failed: {type(err).__name__}: {err}\n"
            )
        # kubelet counts 200-399 as success and follows a redirect itself,
        # which would lead it away from this port: a redirect is passed on as
        # the success it is.
        return web.Response(status=200 if 300 <= status < 400 else status, body=body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _tcp_probe(path: str, probe: Probe) -> web.Response:
    """Success if the app accepts a connection, as kubelet's TCP probe."""
    try:
        async with asyncio.timeout(probe.timeout):
            _, writer = await asyncio.open_connection("127.0.0.1", probe.port)
    except (TimeoutError, OSError) as err:
        return web.Response(status=503, text=f"probe {path} failed: {type(err).__name__}: {err}\n")
    writer.close()
    return web.Response(text=f"port {probe.port} accepts connections\n")


async def _grpc_probe(path: str, probe: Probe) -> web.Response:
    """Success if the app's gRPC health service says SERVING, as kubelet's
    gRPC probe (plain text, no certificate, like kubelet's)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probe.port}") as channel:
        # Bytes in and out: the two messages are encoded by hand above.
        check: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(HEALTH_CHECK)
        try:
            answer = await check(health_check_request(probe.service), timeout=probe.timeout)
        except grpc.aio.AioRpcError as err:
            return web.Response(
                status=503, text=f"probe {path} failed: {err.code().name}: {err.details()}\n"
            )
    status = serving_status(answer)
    if status != SERVING:
        return web.Response(status=503, text=f"probe {path}: status {status}, not SERVING\n")
    return web.Response(text="SERVING\n")
