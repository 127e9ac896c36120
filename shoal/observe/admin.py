"""The control plane's admin HTTP API, and who may use which part of it.

Three roles:

- anonymous: `/healthz`, `/ready`, `/metrics`, the index. What kubelet's
  probes and Prometheus need, and nothing that reveals configuration.
- reader: `/debug/*` (proxies' status and configuration, the CA's
  certificates, problems). What a read-only dashboard may show.
- admin: everything that changes state (`POST /ca/*`: join tokens, root
  rotation), and everything a reader may.

The same application is served twice. On a Unix socket in the state
directory (0600), every caller is an admin: the operating system has
authenticated it (the socket's mode, and the peer's uid checked with
SO_PEERCRED). On TCP (`--admin-address`) every caller is anonymous, and
requests are refused unless their Host is an IP address, `localhost` or a
name the operator listed, and their Origin (if any) is that same host: a
web page in a browser can neither reach the API by a name that rebinds to
127.0.0.1 nor send it cross-origin requests.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import http_exceptions, web

# A report's answer, or an awaitable of it (one that asks the proxies).
Report = Callable[[], Any]
# A report that takes the request's query parameters; None means "not found".
Query = Callable[[Mapping[str, str]], Any]

# A change, by POST, with the query parameters.
Action = Callable[[Mapping[str, str]], Awaitable[Any]]

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# Bodies are never read; a request with one larger than this is refused.
MAX_BODY = 16 * 1024


class Role(enum.IntEnum):
    ANONYMOUS = 0
    READER = 1
    ADMIN = 2


_ROLE = web.AppKey("route_role", dict)


def caller_role(request: web.Request) -> Role:
    """An admin on the Unix socket (when the peer runs as this process's
    user or root), anonymous on TCP."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return Role.ANONYMOUS
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return Role.ADMIN if uid in (0, os.geteuid()) else Role.ANONYMOUS


def host_allowed(host: str, names: Collection[str]) -> bool:
    """An IP address, `localhost`, or one of `names` (with any port)."""
    if not host:
        return False
    if host.startswith("["):
        bare = host[1 : host.find("]")] if "]" in host else ""
    else:
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    bare = bare.lower()
    if bare == "localhost" or bare in names:
        return True
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        return False
    return True


class _BadRequests(logging.Filter):
    """aiohttp answers a malformed request (an overlong line, a broken
    header) with 400 and logs it as an error with a traceback: anyone who can
    reach the port could fill the log. One line at warning is what it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError):
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "malformed HTTP request refused (%s): %s"
            record.args = (exc.code, str(exc.message)[:200])
        return True


def quiet_bad_requests() -> None:
    """Install the filter above (once) on aiohttp's server logger."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequests) for f in logger.filters):
        logger.addFilter(_BadRequests())


def _refused(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def app(
    *,
    ready: Callable[[], tuple[bool, str] | Awaitable[tuple[bool, str]]],
    reports: Mapping[str, Report],
    queries: Mapping[str, Query] | None = None,
    metrics: Callable[[], bytes | Awaitable[bytes]] | None = None,
    actions: Mapping[str, Action] | None = None,
    hosts: Collection[str] = (),
    socket_path: str = "",
) -> web.Application:
    """`/ready` for probes, `/metrics` for Prometheus, `/debug/<name>` as JSON
    for readers, `POST /<action>` for admins. `hosts`: names (besides IP
    addresses and localhost) TCP callers may use; `socket_path` is named in
    refusals, so a caller learns where to go."""
    queries = queries or {}
    names = frozenset(h.lower() for h in hosts)
    where = f" (the admin socket, {socket_path})" if socket_path else ""

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        role = caller_role(request)
        if role is Role.ANONYMOUS:
            # Browser-reachable: only by an address or a known name, and
            # never from another origin.
            if not host_allowed(request.host, names):
                return _refused(421, f"Host {request.host[:100]!r} is not served here")
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc.lower() != request.host.lower():
                return _refused(403, "cross-origin requests are refused")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _refused(413, f"request bodies are limited to {MAX_BODY} bytes")
        route = request.match_info.route.resource
        needed = request.app[_ROLE].get(route.canonical if route is not None else "", Role.ADMIN)
        if role < needed:
            what = "an admin" if needed is Role.ADMIN else "a reader or an admin"
            return _refused(
                403,
                f"{request.path} needs {what}: use the Unix socket{where}, "
                "for example `shoal proxy-status --admin PATH`",
            )
        return await handler(request)

    async def ready_handler(_: web.Request) -> web.Response:
        found = ready()
        ok, reason = await found if inspect.isawaitable(found) else found
        return web.Response(status=200 if ok else 503, text=f"{reason}\n")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def index(request: web.Request) -> web.Response:
        lines = ["shoal control plane", "", "/ready", "/healthz"]
        lines += ["/metrics"] if metrics else []
        if caller_role(request) >= Role.READER:
            lines += [f"/debug/{name}" for name in sorted({*reports, *queries})]
        return web.Response(text="\n".join(lines) + "\n")

    def report_handler(report: Report) -> Callable[[web.Request], Any]:
        async def handle(_: web.Request) -> web.Response:
            found = report()
            if inspect.isawaitable(found):
                found = await found
            return web.json_response(found, dumps=_dumps)

        return handle

    def query_handler(query: Query) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.Response:
            try:
                # A query's name may hold a path parameter
                # ("traces/{trace_id}"): it is read like a query argument.
                found = query({**request.query, **request.match_info})
                if inspect.isawaitable(found):
                    found = await found
            except ValueError as err:
                return web.json_response({"error": str(err)}, status=400)
            if found is None:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response(found, dumps=_dumps)

        return handle

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

    quiet_bad_requests()
    application = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    roles: dict[str, Role] = {}

    def add(method: str, path: str, handler: Any, role: Role) -> None:
        application.router.add_route(method, path, handler)
        roles[path] = role

    add("GET", "/", index, Role.ANONYMOUS)
    add("GET", "/ready", ready_handler, Role.ANONYMOUS)
    add("GET", "/healthz", healthz, Role.ANONYMOUS)
    if metrics is not None:
        render = metrics

        async def metrics_handler(_: web.Request) -> web.Response:
            body = render()
            if inspect.isawaitable(body):
                body = await body
            return web.Response(body=body, headers={"Content-Type": PROMETHEUS_TEXT})

        add("GET", "/metrics", metrics_handler, Role.ANONYMOUS)
    for name, report in reports.items():
        add("GET", f"/debug/{name}", report_handler(report), Role.READER)
    for name, query in queries.items():
        add("GET", f"/debug/{name}", query_handler(query), Role.READER)
    # Changes go by POST only, and only for admins.
    for name, action in (actions or {}).items():
        add("POST", f"/{name}", action_handler(action), Role.ADMIN)
    application[_ROLE] = roles
    return application


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


@contextlib.asynccontextmanager
async def serve(
    application: web.Application, host: str | None, port: int, socket_path: Path
) -> AsyncIterator[int]:
    """The admin API on host:port (anonymous callers) and on a Unix socket
    only this user can open (readers and admins); yields the TCP port bound
    (0 with no host: the socket only)."""
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    try:
        bound = 0
        if host is not None:
            await web.TCPSite(runner, host, port).start()
            bound = runner.addresses[0][1]
        _free_socket(socket_path)
        await web.UnixSite(runner, str(socket_path)).start()
        # Besides the mode, each caller's uid is checked (caller_role).
        os.chmod(socket_path, 0o600)
        try:
            yield bound
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)
    finally:
        await runner.cleanup()


def _free_socket(path: Path) -> None:
    """Make room for the admin socket: a stale one (from a control plane
    that did not stop cleanly) goes; a live one means another control plane."""
    if len(os.fsencode(path)) >= 108:
        raise OSError(f"admin socket path {path} is too long for a Unix socket; use a shorter one")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.exists() or path.is_symlink()):
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise OSError(f"another control plane serves {path}; give it another --state-dir")
    finally:
        probe.close()
