"""The input codes, end to end: a manifest, annotation or route the mesh
cannot use keeps its last good version in force, so the user's change
silently does not happen; the analyzer says which object and why.

Each test seeds one mistake in a real mesh, shows what traffic does
instead of what the user meant, waits for the diagnosis, fixes the input,
and shows the traffic and the diagnosis change.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from shoal import cli, envoy, sidecar_files
from shoal.demo import mesh
from shoal.model import proxy
from tests.conftest import write
from tests.e2e import diagnosis
from tests.e2e.helpers import caught_up, eventually
from tests.manifests import workload

CANARY = {"x-canary": "yes"}


async def _answer(
    session: aiohttp.ClientSession, via: mesh.Workload, host: str, headers: dict[str, str]
) -> str:
    """Which Service answered (its name), or `!STATUS`."""
    try:
        status, body = await mesh.get(session, via, host, headers=headers)
    except aiohttp.ClientError as err:
        return f"!{type(err).__name__}"
    if status == 200 and isinstance(body, dict):
        return str(body["service"])
    return f"!{status}"


async def _answered_by(
    session: aiohttp.ClientSession,
    via: mesh.Workload,
    host: str,
    wanted: str,
    headers: dict[str, str] | None = None,
) -> None:
    async def answered() -> bool:
        return await _answer(session, via, host, headers or {}) == wanted

    await eventually(answered)


async def _mesh(
    cp: cli.ControlPlane, folder: Path, local_mesh: mesh.LocalMesh, *names: str
) -> dict[str, mesh.Workload]:
    """A caller and the Services `names`, each with one sidecar."""
    ports = {name: envoy.free_port() for name in ("caller", *names)}
    for name, port in ports.items():
        write(folder, f"{name}.yaml", workload(name, f"{name}-sa", port))
    await caught_up(cp, folder)
    return {
        name: await local_mesh.add(
            f"{name}-1",
            namespace="default",
            service=name,
            inbound_port=port,
            service_account=f"{name}-sa",
        )
        for name, port in ports.items()
    }


def _headers_note(route: str) -> str:
    return f'    shoal.io/route-headers: "{route}"\n'


async def test_shl0001_a_manifest_that_cannot_be_read_is_named_with_its_field(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    w = await _mesh(control_plane, registry_dir, local_mesh, "api")
    api = workload("api", "api-sa", w["api"].sidecar.inbound_port)
    since = asyncio.get_running_loop().time()
    # The user moves the Service to port 8080, with a typo.
    write(registry_dir, "api.yaml", api.replace("port: 80}", "port: 8080x}"))
    async with aiohttp.ClientSession() as session:
        found = await diagnosis.diagnosed(control_plane, "SHL0001", "api", since=since)
        assert found["object"] == "Service default/api" and found["source"] == "api.yaml#0"
        assert "spec.ports[0].port must be an integer, got '8080x'" in found["reason"]
        # The last good version stays: port 80 answers, 8080 does not exist.
        assert await _answer(session, w["caller"], "api:80", {}) == "api"
        assert await _answer(session, w["caller"], "api:8080", {}) == "!404"
        write(registry_dir, "api.yaml", api.replace("port: 80}", "port: 8080}"))
        await _answered_by(session, w["caller"], "api:8080", "api")
        await diagnosis.cleared(control_plane, "SHL0001")


async def test_shl0002_a_second_definition_is_ignored_and_named(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    w = await _mesh(control_plane, registry_dir, local_mesh, "web", "web-v2")
    again = workload(
        "web", "web-sa", w["web"].sidecar.inbound_port, _headers_note("x-canary=yes -> web-v2")
    )
    since = asyncio.get_running_loop().time()
    # The user adds the header route in a copy of the Service's file.
    write(registry_dir, "z-web-canary.yaml", again)
    async with aiohttp.ClientSession() as session:
        found = await diagnosis.diagnosed(control_plane, "SHL0002", "web.yaml", since=since)
        assert found["source"].startswith("z-web-canary.yaml#")
        assert found["severity"] == "Warning"
        assert await _answer(session, w["caller"], "web", CANARY) == "web"
        (registry_dir / "z-web-canary.yaml").unlink()
        write(registry_dir, "web.yaml", again)
        await _answered_by(session, w["caller"], "web", "web-v2", CANARY)
        await diagnosis.cleared(control_plane, "SHL0002")


async def test_shl0003_a_malformed_annotation_keeps_the_last_good_routing(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    w = await _mesh(control_plane, registry_dir, local_mesh, "web", "web-v2")
    port = w["web"].sidecar.inbound_port
    since = asyncio.get_running_loop().time()
    write(
        registry_dir, "web.yaml", workload("web", "web-sa", port, _headers_note("x-canary web-v2"))
    )
    async with aiohttp.ClientSession() as session:
        found = await diagnosis.diagnosed(control_plane, "SHL0003", "web", since=since)
        assert found["object"] == "Service default/web"
        assert found["field"] == "metadata.annotations[shoal.io/route-headers]"
        assert await _answer(session, w["caller"], "web", CANARY) == "web"
        write(
            registry_dir,
            "web.yaml",
            workload("web", "web-sa", port, _headers_note("x-canary=yes -> web-v2")),
        )
        await _answered_by(session, w["caller"], "web", "web-v2", CANARY)
        await diagnosis.cleared(control_plane, "SHL0003")


TRAFFIC_ROUTE = """apiVersion: shoal.io/v1alpha1
kind: TrafficRoute
metadata: {{name: web-canary, namespace: default}}
spec:
  service: web
  rules:
    - match: {{headers: [{{name: x-canary, exact: "yes"}}]}}
      backends: [{{service: web-v2}}]
      retries: {{attempts: {attempts}}}
    - backends: [{{service: web}}]
"""


async def test_shl0004_a_refused_traffic_route_names_its_field(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    w = await _mesh(control_plane, registry_dir, local_mesh, "web", "web-v2")
    since = asyncio.get_running_loop().time()
    write(registry_dir, "route.yaml", TRAFFIC_ROUTE.format(attempts=-1))
    async with aiohttp.ClientSession() as session:
        found = await diagnosis.diagnosed(control_plane, "SHL0004", "web-canary", since=since)
        assert found["object"] == "TrafficRoute default/web-canary"
        assert "spec.rules[0].retries.attempts" in found["reason"]
        assert await _answer(session, w["caller"], "web", CANARY) == "web"
        write(registry_dir, "route.yaml", TRAFFIC_ROUTE.format(attempts=2))
        await _answered_by(session, w["caller"], "web", "web-v2", CANARY)
        await diagnosis.cleared(control_plane, "SHL0004")


async def test_shl0005_a_slice_naming_no_service_is_named(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    w = await _mesh(control_plane, registry_dir, local_mesh)
    port = envoy.free_port()
    right = workload("api", "api-sa", port)
    since = asyncio.get_running_loop().time()
    write(registry_dir, "api.yaml", right.replace("service-name: api}", "service-name: apis}"))
    await local_mesh.add(
        "api-1", namespace="default", service="api", inbound_port=port, service_account="api-sa"
    )
    async with aiohttp.ClientSession() as session:
        found = await diagnosis.diagnosed(control_plane, "SHL0005", "apis", since=since)
        assert found["object"] == "EndpointSlice default/api-1"
        assert "Service default/apis does not exist" in found["reason"]
        # The Service it was meant for has no endpoints: its callers get 503.
        await _answered_by(session, w["caller"], "api", "!503")
        write(registry_dir, "api.yaml", right)
        await _answered_by(session, w["caller"], "api", "api")
        await diagnosis.cleared(control_plane, "SHL0005")


POD = """apiVersion: v1
kind: Pod
metadata: {{name: db-0, namespace: default, uid: {uid}}}
spec: {{serviceAccountName: db}}
"""


def _captured_sidecar(
    cp: cli.ControlPlane, folder: Path, ip: str
) -> tuple[envoy.EnvoyProcess, int]:
    """A Pod's sidecar for Pod default/db-0 (uid-1), bootstrapped as
    `shoal bootstrap --pod db-0 --pod-uid uid-1 [--pod-ip IP]` writes it."""
    assert cp.authority is not None
    s = proxy.CapturedSidecar(
        namespace="default",
        pod="db-0",
        pod_uid="uid-1",
        service_account="db",
        ip=ip,
        outbound_port=envoy.free_port(),
        inbound_port=envoy.free_port(),
    )
    admin_port = envoy.free_port()
    path = sidecar_files.write(
        folder,
        s,
        xds_host="127.0.0.1",
        xds_port=cp.xds_port,
        admin_port=admin_port,
        authority=cp.authority,
        stats_port=envoy.free_port(),
        health_port=envoy.free_port(),
    )
    return envoy.EnvoyProcess(path, admin_port), admin_port


async def _listeners(session: aiohttp.ClientSession, admin_port: int) -> list[str]:
    """The listeners the control plane gave the proxy (its bootstrap's own
    stats and health listeners left out)."""
    async with session.get(f"http://127.0.0.1:{admin_port}/listeners?format=json") as r:
        found = (await r.json(content_type=None)).get("listener_statuses", [])
    return [x["name"] for x in found if x["name"] not in ("shoal-stats", "shoal-health")]


async def test_shl0405_a_proxy_the_control_plane_cannot_configure_is_named(
    control_plane: cli.ControlPlane, registry_dir: Path, tmp_path: Path
) -> None:
    """A Pod's sidecar whose Pod the mesh does not know gets nothing: a
    proxy must not be given the ports and callers of a Pod it is not."""
    sidecar, admin_port = _captured_sidecar(control_plane, tmp_path / "db-0", "127.0.0.1")
    since = asyncio.get_running_loop().time()
    await sidecar.start()
    try:
        found = await diagnosis.diagnosed(control_plane, "SHL0405", "db-0", since=since)
        assert "Pod default/db-0 is not known to the mesh" in found["reason"]
        async with aiohttp.ClientSession() as session:
            # The symptom: no listeners, so the Pod's traffic goes nowhere.
            assert await _listeners(session, admin_port) == []
            write(registry_dir, "db.yaml", POD.format(uid="uid-1"))

            async def configured() -> bool:
                try:
                    return bool(await _listeners(session, admin_port))
                except aiohttp.ClientError:
                    return False  # its admin is not up yet

            await eventually(configured)
        await diagnosis.cleared(control_plane, "SHL0405")
    finally:
        await sidecar.stop()


async def test_shl0405_a_stream_the_server_refuses_is_named_until_it_connects(
    control_plane: cli.ControlPlane, registry_dir: Path, tmp_path: Path
) -> None:
    """`shoal bootstrap --pod` without `--pod-ip`: the server refuses the
    stream (a Pod's proxy must say its address), which only its log said."""
    write(registry_dir, "db.yaml", POD.format(uid="uid-1"))
    await caught_up(control_plane, registry_dir)
    sidecar, admin_port = _captured_sidecar(control_plane, tmp_path / "no-ip", "")
    since = asyncio.get_running_loop().time()
    await sidecar.start()
    try:
        found = await diagnosis.diagnosed(control_plane, "SHL0405", "POD_IP", since=since)
        assert "the xDS server refused its stream (INVALID_ARGUMENT" in found["reason"]
        assert "spiffe://cluster.local/ns/default/sa/db" in found["object"]
        async with aiohttp.ClientSession() as session:
            assert await _listeners(session, admin_port) == []
    finally:
        await sidecar.stop()
    fixed, admin_port = _captured_sidecar(control_plane, tmp_path / "ip", "127.0.0.1")
    await fixed.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def configured() -> bool:
                try:
                    return bool(await _listeners(session, admin_port))
                except aiohttp.ClientError:
                    return False  # its admin is not up yet

            await eventually(configured)
        await diagnosis.cleared(control_plane, "SHL0405")
    finally:
        await fixed.stop()
