"""Kubelet's probes of an injected Pod, rewritten to go through the agent.

Under STRICT mTLS the kubelet, which has no mesh certificate, cannot reach
the app's ports: iptables hands its connection to Envoy, which wants a
client certificate. A TCP probe is worse: Envoy accepts the connection
whatever the app's state, so it always passes. Each HTTP, TCP and gRPC
probe of an app container is rewritten to an HTTP GET of the sidecar's
health port (never captured), `/app-health/<container>/<livez|readyz|startupz>`,
and the agent runs the original probe from inside the Pod, where it is not
captured. Exec probes run in the container and need nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.injector import settings

KINDS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
_ACTIONS = ("httpGet", "tcpSocket", "grpc")


def path(container: str, kind: str) -> str:
    return f"/app-health/{container}/{KINDS[kind]}"


def _port_number(port: Any, container: Mapping[str, Any]) -> int | None:
    """A probe's port as a number: a named one is the container port of
    that name. None when it cannot be resolved (the kubelet would fail the
    probe too; it is left as written)."""
    if isinstance(port, bool):
        return None
    if isinstance(port, int):
        return port if 0 < port < 65536 else None
    if isinstance(port, str):
        declared_ports = container.get("ports")
        for declared in declared_ports if isinstance(declared_ports, list) else ():
            if isinstance(declared, Mapping) and declared.get("name") == port:
                number = declared.get("containerPort")
                if isinstance(number, int) and not isinstance(number, bool):
                    return number if 0 < number < 65536 else None
    return None


def _original(probe: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the agent must check for this probe, or None to leave it alone."""
    action = next((a for a in _ACTIONS if isinstance(probe.get(a), Mapping)), None)
    if action is None:
        return None
    spec = probe[action]
    port = _port_number(spec.get("port"), container)
    if port is None:
        return None
    checked: dict[str, Any] = {"port": port}
    if action == "httpGet":
        checked["path"] = str(spec.get("path") or "/")
        checked["scheme"] = str(spec.get("scheme") or "HTTP")
        if spec.get("host"):
            checked["host"] = str(spec["host"])
        headers = [
            {"name": str(h.get("name", "")), "value": str(h.get("value", ""))}
            for h in (spec.get("httpHeaders") if isinstance(spec.get("httpHeaders"), list) else ())
            if isinstance(h, Mapping)
        ]
        if headers:
            checked["httpHeaders"] = headers
    elif action == "grpc" and spec.get("service"):
        checked["service"] = str(spec["service"])
    original: dict[str, Any] = {action: checked}
    timeout = probe.get("timeoutSeconds")
    if isinstance(timeout, int) and not isinstance(timeout, bool):
        original["timeoutSeconds"] = timeout
    return original


def rewrite(
    containers: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The app containers with their probes rewritten, and what the agent
    checks for each rewritten path (SHOAL_APP_PROBES)."""
    rewritten: list[dict[str, Any]] = []
    checks: dict[str, dict[str, Any]] = {}
    for container in containers:
        changed = copy.deepcopy(dict(container))
        name = str(container.get("name", ""))
        for kind in KINDS:
            probe = container.get(kind)
            if not isinstance(probe, Mapping):
                continue
            original = _original(probe, container)
            if original is None:
                continue
            route = path(name, kind)
            checks[route] = original
            new = {k: copy.deepcopy(v) for k, v in probe.items() if k not in _ACTIONS}
            new["httpGet"] = {"path": route, "port": settings.HEALTH_PORT, "scheme": "HTTP"}
            changed[kind] = new
        rewritten.append(changed)
    return rewritten, checks


def encode(checks: Mapping[str, Mapping[str, Any]]) -> str:
    return json.dumps(checks, sort_keys=True, separators=(",", ":"))
