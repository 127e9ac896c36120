"""What `shoal dashboard` and `shoal dashboard envoy PROXY` do for a person:
serve or find the page, print its URL, and open a browser where there is one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import webbrowser
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

from shoal.observe.dashboard import prometheus, server

# A captured sidecar's Envoy admin port inside its Pod (DESIGN.md).
POD_ADMIN_PORT = 15000


def can_open_browser() -> bool:
    """A graphical session to open a browser in: on a server `webbrowser`
    would start a text browser in the terminal instead."""
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def open_in_browser(url: str) -> Path | None:
    """Open `url` without putting its token on a command line other users
    can read (`ps`): the browser gets a file only this user can read, which
    sends it on. Returns that file, for the caller to remove later."""
    fd, name = tempfile.mkstemp(prefix="shoal-dashboard-", suffix=".html")
    with os.fdopen(fd, "w") as f:
        f.write(
            '<!doctype html><meta http-equiv="refresh" content="0;url='
            f'{escape(url, quote=True)}"><title>shoal dashboard</title>'
        )
    webbrowser.open(Path(name).as_uri())
    return Path(name)


def run(
    socket_path: str,
    host: str,
    port: int,
    *,
    browser: bool,
    metrics: prometheus.Prometheus | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Serve the dashboard until interrupted."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        opened: Path | None = None
        async with server.serve(socket_path, host, port, metrics=metrics) as url:
            say(f"shoal dashboard: {url}")
            say(f"(read-only, for this user; data from the admin socket {socket_path})")
            if metrics is not None:
                say(f"(the service graph's traffic from Prometheus at {metrics.url})")
            if browser and can_open_browser():
                opened = open_in_browser(url)
            try:
                await stop.wait()
            finally:
                if opened is not None:
                    opened.unlink(missing_ok=True)

    asyncio.run(main())
    return 0


def find_proxy(proxies: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The one proxy `name` names (its id, or a part of it)."""
    for matches in (
        lambda p: p["id"] == name,
        lambda p: str(p["id"]).startswith(name),
        lambda p: name in str(p["id"]),
    ):
        found = [p for p in proxies if matches(p)]
        if len({p["id"] for p in found}) == 1:
            return found[-1]
        if found:
            raise LookupError(
                f"{name!r} names {len(found)} proxies: {', '.join(sorted(p['id'] for p in found))}"
            )
    raise LookupError(f"no connected proxy {name!r} (see `shoal proxy-status`)")


def envoy_admin(
    proxy: dict[str, Any],
    *,
    browser: bool,
    kubectl: str = "kubectl",
    say: Callable[[str], None] = print,
) -> int:
    """Open a proxy's own Envoy admin page: a local sidecar's directly (its
    admin listens on this host's 127.0.0.1), a Pod's through `kubectl
    port-forward` to its port 15000, as `istioctl dashboard envoy` does."""
    port = int(proxy.get("admin_port") or 0)
    if port and server.loopback(str(proxy.get("peer", ""))):
        url = f"http://127.0.0.1:{port}/"
        say(f"{proxy['id']}: Envoy admin at {url}")
        if browser and can_open_browser():
            webbrowser.open(url)
        return 0
    pod = str(proxy.get("pod") or "")
    if not pod:
        say(
            f"shoal: {proxy['id']} does not say where its Envoy admin is (a sidecar "
            "bootstrapped by an older shoal, or not on this host): its admin address is "
            "the --admin-port its `shoal bootstrap` was given, on that machine's 127.0.0.1"
        )
        return 1
    namespace, _, name = pod.partition("/")
    if shutil.which(kubectl) is None:
        say(
            f"shoal: kubectl not found; run: kubectl port-forward -n {namespace} "
            f"pod/{name} 15000:{POD_ADMIN_PORT}, then open http://127.0.0.1:15000/"
        )
        return 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        local = s.getsockname()[1]
    command = [
        kubectl,
        "port-forward",
        "-n",
        namespace,
        f"pod/{name}",
        f"{local}:{POD_ADMIN_PORT}",
        "--address",
        "127.0.0.1",
    ]
    say(f"{proxy['id']}: Envoy admin at http://127.0.0.1:{local}/ (Ctrl-C to stop)")
    with subprocess.Popen(command) as forward:
        if browser and can_open_browser():
            webbrowser.open(f"http://127.0.0.1:{local}/")
        try:
            return forward.wait()
        except KeyboardInterrupt:
            forward.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                forward.wait(5)
            return 0
