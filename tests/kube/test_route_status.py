"""HTTPRoutes on Kubernetes: shoal reads them from the API server, routes
with them, and writes their status back, which a user reads with kubectl."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shoal import cli
from shoal.model import mesh, routing
from shoal.registry import gatewayapi
from tests.kube import serving
from tests.kube.emulator import KubeEmulator
from tests.kube.kubectl import Kubectl

pytestmark = pytest.mark.timeout(120)


def _service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": 80}]},
    }


def _route(name: str, backend: str, parents: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "parentRefs": parents,
            "rules": [{"backendRefs": [{"name": backend, "port": 80}]}],
        },
    }


SERVICE_PARENT = {"group": "", "kind": "Service", "name": "reviews"}
GATEWAY_STATUS = {
    "parentRef": {"name": "public", "kind": "Gateway"},
    "controllerName": "example.net/gateway-controller",
    "conditions": [
        {
            "type": "Accepted",
            "status": "True",
            "reason": "Accepted",
            "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    ],
}


async def _until(emu: KubeEmulator, check: Any, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def _ours(emu: KubeEmulator, name: str) -> dict[str, Any] | None:
    route = emu.get("httproutes", name, namespace="shop") or {}
    for parent in (route.get("status") or {}).get("parents") or ():
        if parent.get("controllerName") == gatewayapi.CONTROLLER:
            found: dict[str, Any] = parent
            return found
    return None


async def test_routes_from_the_api_server_route_and_get_their_status(tmp_path: Path) -> None:
    emu = KubeEmulator()
    await emu.start()
    try:
        for obj in (
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": serving.HOME}},
            _service("reviews"),
            _service("reviews-v2"),
        ):
            await emu.acreate(obj)
        good = _route("canary", "reviews-v2", [SERVICE_PARENT, {"name": "public"}])
        good["status"] = {"parents": [GATEWAY_STATUS]}
        # A gateway controller's entry is there before shoal's.
        await emu.acreate(good)
        await emu.acreate(_route("dangling", "nowhere", [SERVICE_PARENT]))
        async with cli.control_plane(serving.options(emu, tmp_path)) as cp:
            key = mesh.ServiceKey("shop", "reviews")

            def routed() -> bool:
                route = cp.registry.state.routes.get(key)
                return route is not None and len(route.attached) == 2

            await _until(emu, routed)
            rules = routing.attached_rules(cp.registry.state.routes[key].attached, 80, "shop")
            assert rules is not None

            def written() -> bool:
                return _ours(emu, "canary") is not None and _ours(emu, "dangling") is not None

            await _until(emu, written)
            canary = _ours(emu, "canary")
            assert canary is not None
            assert canary["parentRef"] == SERVICE_PARENT
            assert {c["type"]: (c["status"], c["reason"]) for c in canary["conditions"]} == {
                "Accepted": ("True", "Accepted"),
                "ResolvedRefs": ("True", "ResolvedRefs"),
            }
            assert all(c["observedGeneration"] == 1 for c in canary["conditions"])
            dangling = _ours(emu, "dangling")
            assert dangling is not None
            resolved = {c["type"]: c for c in dangling["conditions"]}["ResolvedRefs"]
            assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
            assert "Service shop/nowhere does not exist" in resolved["message"]

            # What a user reads, with the real kubectl.
            kubectl = Kubectl.for_emulator(emu, tmp_path)
            shown = await kubectl.ajson("get", "httproute", "canary", "-n", "shop")
            controllers = [p["controllerName"] for p in shown["status"]["parents"]]
            assert controllers == ["example.net/gateway-controller", gatewayapi.CONTROLLER]

            # Fixed by the user: the status follows.
            await emu.acreate(_service("nowhere"))

            def resolved_now() -> bool:
                found = _ours(emu, "dangling")
                return found is not None and all(c["status"] == "True" for c in found["conditions"])

            await _until(emu, resolved_now)
    finally:
        await emu.stop()
