"""SHL0201, SHL0202, SHL0204: a Service whose callers get 503 because of its
endpoints, diagnosed by the control plane while real sidecars fail.

Each test seeds the mistake in the manifests folder, shows the 503 through
the caller's sidecar, waits for `/debug/problems` to name the Service (and
the field), then corrects the manifest and shows traffic and the problem
clear."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from shoal import cli, envoy
from shoal.demo import mesh
from tests.conftest import write
from tests.e2e import diagnosis
from tests.e2e.helpers import caught_up, eventually


@pytest.fixture
def xds_mode() -> str:
    """The diagnosis, not the xDS variants, is under test: one kind of Envoy.

    State of the world: with delta, a caller's sidecar holds the cluster of
    a Service that gains its first endpoints warming for Envoy's 15 s
    initial-fetch timeout (its expected identities change, so its cluster
    is replaced, and the delta server does not send the assignment again),
    which this file would wait out rather than test."""
    return "sotw"


def _service(name: str, port: int | None, *, slice_port: str = "http", ready: bool = True) -> str:
    """A Service `name` (port 80, named `http`) and, unless `port` is None,
    its EndpointSlice: one endpoint at the sidecar's inbound `port`, its
    port named `slice_port`, running as `<name>-sa`."""
    text = f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  ports: [{{name: http, port: 80}}]
"""
    if port is None:
        return text
    return (
        text
        + f"""---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
  annotations: {{shoal.io/service-account: {name}-sa}}
addressType: IPv4
ports: [{{name: {slice_port}, port: {port}}}]
endpoints:
  - addresses: ["127.0.0.1"]
    conditions: {{ready: {str(ready).lower()}}}
"""
    )


async def _pair(
    cp: cli.ControlPlane, folder: Path, local_mesh: mesh.LocalMesh, web_yaml: str, web_port: int
) -> mesh.Workload:
    """`front` (healthy) and `web` as `web_yaml` says, each with its sidecar;
    returns front."""
    front_port = envoy.free_port()
    write(folder, "front.yaml", _service("front", front_port))
    write(folder, "web.yaml", web_yaml)
    await caught_up(cp, folder)
    front = await local_mesh.add(
        "front-1",
        namespace="default",
        service="front",
        inbound_port=front_port,
        service_account="front-sa",
    )
    await local_mesh.add(
        "web-1", namespace="default", service="web", inbound_port=web_port, service_account="web-sa"
    )
    return front


async def _answers(session: aiohttp.ClientSession, via: mesh.Workload, status: int) -> None:
    """Until a call from `via` to web is answered `status` by its sidecar."""

    async def answered() -> bool:
        return (await mesh.get(session, via, "web"))[0] == status

    await eventually(answered)


async def test_a_service_whose_endpoints_are_all_not_ready_is_diagnosed(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    web_port = envoy.free_port()
    misconfigured = asyncio.get_running_loop().time()
    front = await _pair(
        control_plane, registry_dir, local_mesh, _service("web", web_port, ready=False), web_port
    )
    async with aiohttp.ClientSession() as session:
        await _answers(session, front, 503)
        assert (await mesh.get(session, front, "web"))[1] == "no healthy upstream"

        found = await diagnosis.diagnosed(
            control_plane, "SHL0201", "Service default/web", since=misconfigured
        )
        assert found["object"] == "Service default/web" and found["severity"] == "Error"
        assert (
            f"port 80 (http): its one endpoint (127.0.0.1:{web_port}) is not ready"
            in (found["reason"])
        )
        assert "called by default/front" in found["reason"]

        # `shoal analyze`, as a user runs it: the same problem, and exit 1.
        out = await asyncio.to_thread(diagnosis.analyze_cli, control_plane)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Error [SHL0201] Service default/web" in out.stdout
        assert "is not ready, so its callers get 503" in out.stdout

        write(registry_dir, "web.yaml", _service("web", web_port, ready=True))
        await _answers(session, front, 200)
        await diagnosis.cleared(control_plane, "SHL0201", "Service default/web")


async def test_a_service_port_named_unlike_its_slices_is_traced_to_the_name(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    web_port = envoy.free_port()
    misconfigured = asyncio.get_running_loop().time()
    front = await _pair(
        control_plane,
        registry_dir,
        local_mesh,
        _service("web", web_port, slice_port="web"),
        web_port,
    )
    async with aiohttp.ClientSession() as session:
        await _answers(session, front, 503)

        found = await diagnosis.diagnosed(
            control_plane, "SHL0202", "Service default/web", since=misconfigured
        )
        assert found["field"] == "spec.ports[0].name"
        assert (
            "port 80 is named 'http' but its EndpointSlices name their ports 'web'"
            in (found["reason"])
        )
        assert "called by default/front" in found["reason"]

        write(registry_dir, "web.yaml", _service("web", web_port, slice_port="http"))
        await _answers(session, front, 200)
        await diagnosis.cleared(control_plane, "SHL0202", "Service default/web")


async def test_a_called_service_without_endpoints_names_its_callers(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    web_port = envoy.free_port()
    misconfigured = asyncio.get_running_loop().time()
    front = await _pair(control_plane, registry_dir, local_mesh, _service("web", None), web_port)
    # Idle, it is no problem: a Service scaled to zero is not a mistake.
    assert diagnosis.of_code(await diagnosis.problems(control_plane), "SHL0204") == []
    async with aiohttp.ClientSession() as session:
        await _answers(session, front, 503)

        found = await diagnosis.diagnosed(
            control_plane, "SHL0204", "Service default/web", since=misconfigured
        )
        assert found["severity"] == "Warning"
        assert "has no endpoints" in found["reason"]
        assert "called by default/front" in found["reason"] and "answered 503" in found["reason"]

        # A warning only: `shoal analyze` reports it and exits 0.
        out = await asyncio.to_thread(diagnosis.analyze_cli, control_plane, "--output", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        listed = [p for p in json.loads(out.stdout) if p["code"] == "SHL0204"]
        assert [p["object"] for p in listed] == ["Service default/web"]

        write(registry_dir, "web.yaml", _service("web", web_port))
        await _answers(session, front, 200)
        await diagnosis.cleared(control_plane, "SHL0204", "Service default/web")
