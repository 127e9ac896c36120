"""What `shoal dashboard` and `shoal dashboard envoy PROXY` do for a person:
serve or find the page, print its URL, and open a browser where there is one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import webbrowser
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    kubectl: Kubectl | None = None,
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
    kubectl = kubectl or Kubectl()
    if shutil.which(kubectl.binary) is None:
        say(
            f"shoal: kubectl not found; run: kubectl port-forward -n {namespace} "
            f"pod/{name} 15000:{POD_ADMIN_PORT}, then open http://127.0.0.1:15000/"
        )
        return 1
    return port_forward(
        kubectl,
        namespace,
        name,
        POD_ADMIN_PORT,
        lambda local: f"{proxy['id']}: Envoy admin at http://127.0.0.1:{local}/ (Ctrl-C to stop)",
        "/",
        browser=browser,
        say=say,
    )


@dataclass(frozen=True)
class Kubectl:
    """kubectl, and the kubeconfig and context to use it with."""

    binary: str = "kubectl"
    kubeconfig: str | None = None
    context: str | None = None

    def command(self, namespace: str, *args: str) -> list[str]:
        out = [self.binary]
        if self.kubeconfig:
            out += ["--kubeconfig", self.kubeconfig]
        if self.context:
            out += ["--context", self.context]
        return [*out, "-n", namespace, *args]


def port_forward(
    kubectl: Kubectl,
    namespace: str,
    pod: str,
    remote: int,
    announce: Callable[[int], str],
    path: str,
    *,
    browser: bool,
    say: Callable[[str], None] = print,
    local: int = 0,
) -> int:
    """`kubectl port-forward` to a Pod's `remote` port on 127.0.0.1 until
    interrupted; once kubectl says it forwards, `announce(local port)` is
    printed and `path` opened."""
    if not local:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            local = s.getsockname()[1]
    command = kubectl.command(
        namespace, "port-forward", f"pod/{pod}", f"{local}:{remote}", "--address", "127.0.0.1"
    )
    opened: Path | None = None
    with (
        _stopped_by_signals(),
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as forward,
    ):
        try:
            assert forward.stdout is not None
            # kubectl says "Forwarding from 127.0.0.1:LOCAL -> REMOTE" once it
            # listens; if it cannot, it exits (its reason on stderr).
            line = forward.stdout.readline()
            if not line.startswith("Forwarding from"):
                code = forward.wait()
                say(f"shoal: kubectl port-forward to {namespace}/{pod} failed (exit {code})")
                return code or 1
            say(announce(local))
            if browser and can_open_browser():
                target = f"http://127.0.0.1:{local}{path}"
                if "token=" in path:
                    opened = open_in_browser(target)
                else:
                    webbrowser.open(target)
            # Keep reading, so kubectl never blocks on a full pipe.
            for _ in forward.stdout:
                pass
            return forward.wait()
        except KeyboardInterrupt:
            forward.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                forward.wait(5)
            return 0
        finally:
            if opened is not None:
                opened.unlink(missing_ok=True)


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM end the forward, and so kubectl with it: also when
    the process was started with SIGINT ignored (a background job of a
    script), and for a SIGTERM, which would otherwise leave kubectl behind."""

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Labels of shoal's control plane Pods (examples/kubernetes/deployment.yaml).
CONTROL_PLANE_SELECTOR = "app.kubernetes.io/name=shoal,app.kubernetes.io/component=control-plane"
CONTROL_PLANE_CONTAINER = "shoal"


def control_plane_pod(kubectl: Kubectl, namespace: str) -> str:
    """The name of a running, ready control plane Pod; LookupError saying why not."""
    found = subprocess.run(
        kubectl.command(namespace, "get", "pods", "-l", CONTROL_PLANE_SELECTOR, "-o", "json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if found.returncode != 0:
        raise LookupError(f"kubectl get pods -n {namespace}: {found.stderr.strip()}")
    pods = json.loads(found.stdout).get("items", [])
    ready = sorted(
        str(p["metadata"]["name"])
        for p in pods
        if p.get("status", {}).get("phase") == "Running"
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in p.get("status", {}).get("conditions", ())
        )
    )
    if not ready:
        raise LookupError(
            f"no ready shoal control plane Pod in namespace {namespace} "
            f"({len(pods)} with labels {CONTROL_PLANE_SELECTOR})"
        )
    return ready[0]


def login_link(kubectl: Kubectl, namespace: str, pod: str) -> tuple[int, str]:
    """The port and login path (with its token) of the dashboard a control
    plane Pod serves, asked over its admin socket with `kubectl exec`: who
    may exec into shoal's Pods may read the mesh, as the admin socket says."""
    asked = subprocess.run(
        kubectl.command(
            namespace,
            "exec",
            pod,
            "-c",
            CONTROL_PLANE_CONTAINER,
            "--",
            "shoal",
            "dashboard",
            "url",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if asked.returncode != 0:
        raise LookupError(
            f"kubectl exec -n {namespace} {pod} -- shoal dashboard url: "
            f"{asked.stderr.strip() or asked.stdout.strip()}"
        )
    url = urlsplit(asked.stdout.strip().splitlines()[-1] if asked.stdout.strip() else "")
    if url.scheme != "http" or not url.port or not url.query.startswith("token="):
        raise LookupError(f"{namespace}/{pod} answered no dashboard URL: {asked.stdout[:200]!r}")
    return url.port, f"/?{url.query}"


def kubernetes(
    kubectl: Kubectl,
    namespace: str,
    *,
    browser: bool,
    local: int = 0,
    say: Callable[[str], None] = print,
) -> int:
    """The dashboard a control plane Pod serves, on this machine's
    127.0.0.1 through `kubectl port-forward`."""
    if shutil.which(kubectl.binary) is None:
        say("shoal: kubectl not found: `shoal dashboard --kubernetes` runs kubectl")
        return 1
    try:
        pod = control_plane_pod(kubectl, namespace)
        remote, login = login_link(kubectl, namespace, pod)
    except (LookupError, subprocess.TimeoutExpired, ValueError) as err:
        say(f"shoal: {err}")
        return 1
    return port_forward(
        kubectl,
        namespace,
        pod,
        remote,
        lambda port: (
            f"shoal dashboard: http://127.0.0.1:{port}{login}\n"
            f"(read-only; served by {namespace}/{pod}, forwarded by kubectl; Ctrl-C to stop)"
        ),
        login,
        browser=browser,
        say=say,
        local=local,
    )
