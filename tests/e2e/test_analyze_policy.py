"""SHL0302, SHL0303, SHL0304: policies that refuse callers who do call,
diagnosed from what real sidecars counted.

Each test seeds the policy in the manifests folder, makes the refused
calls for real (a plain-text client straight to a STRICT sidecar, a caller
the `allow` list leaves out, a caller in a namespace the Service is not
exported to), waits for `/debug/problems` to name the Service, its
annotation and the callers, then corrects the annotation and shows the
calls go through and the problem clear."""

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

TD = "spiffe://cluster.local/ns"


@pytest.fixture
def xds_mode() -> str:
    """The diagnosis, not the xDS variants, is under test: one kind of Envoy."""
    return "sotw"


def _service(name: str, port: int, namespace: str = "default", notes: str = "") -> str:
    """A Service (port 80, `http`) with `notes` as its annotations, and its
    EndpointSlice: the sidecar's inbound `port`, running as `<name>-sa`."""
    annotations = f"\n  annotations: {{{notes}}}" if notes else ""
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}{annotations}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: {namespace}
  labels: {{kubernetes.io/service-name: {name}}}
  annotations: {{shoal.io/service-account: {name}-sa}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: ["127.0.0.1"]
"""


async def _workloads(
    cp: cli.ControlPlane,
    folder: Path,
    local_mesh: mesh.LocalMesh,
    *names: str,
    notes: dict[str, str] | None = None,
) -> dict[str, mesh.Workload]:
    """`name` or `namespace/name` for each: its Service and a sidecar."""
    ports = {n: envoy.free_port() for n in names}
    for n, port in ports.items():
        namespace, _, name = n.rpartition("/")
        write(
            folder,
            f"{name}.yaml",
            _service(name, port, namespace or "default", (notes or {}).get(n, "")),
        )
    await caught_up(cp, folder)
    out = {}
    for n, port in ports.items():
        namespace, _, name = n.rpartition("/")
        out[name] = await local_mesh.add(
            f"{name}-1",
            namespace=namespace or "default",
            service=name,
            inbound_port=port,
            service_account=f"{name}-sa",
        )
    return out


async def _plain_get(port: int) -> int:
    """A caller without a sidecar: plain HTTP straight to a sidecar's
    inbound port (0: the connection was refused or cut)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/") as r,
        ):
            return r.status
    except aiohttp.ClientError:
        return 0


async def _answers(
    session: aiohttp.ClientSession, via: mesh.Workload, host: str, status: int
) -> str:
    """Until a call from `via` to `host` is answered `status`; the body."""
    said: list[str] = []

    async def answered() -> bool:
        code, body = await mesh.get(session, via, host)
        said[:] = [str(body)]
        return code == status

    await eventually(answered)
    return said[0]


async def test_strict_mtls_refusing_a_caller_without_a_sidecar_is_diagnosed(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    w = await _workloads(control_plane, registry_dir, local_mesh, "a", "b")
    inbound = w["b"].sidecar.inbound_port
    async with aiohttp.ClientSession() as session:
        # Mesh callers get through: STRICT is working as meant for them.
        await _answers(session, w["a"], "b", 200)
    misconfigured = asyncio.get_running_loop().time()
    assert await _plain_get(inbound) == 0

    found = await diagnosis.diagnosed(
        control_plane, "SHL0302", "Service default/b", since=misconfigured
    )
    assert found["severity"] == "Error" and found["field"] == ""
    assert "requires mutual TLS (STRICT, the default)" in found["reason"]
    assert f"sidecar~default~b-1 (inbound port {inbound}) refused" in found["reason"]

    # `shoal analyze`: the problem, its fix, and exit 1.
    out = await asyncio.to_thread(diagnosis.analyze_cli, control_plane)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Error [SHL0302] Service default/b" in out.stdout
    assert "shoal.io/mtls: permissive" in out.stdout

    write(
        registry_dir,
        "b.yaml",
        _service("b", inbound, notes="shoal.io/mtls: permissive"),
    )

    async def served() -> bool:
        return await _plain_get(inbound) == 200

    await eventually(served)
    await diagnosis.cleared(control_plane, "SHL0302", "Service default/b")
    async with aiohttp.ClientSession() as session:
        await _answers(session, w["a"], "b", 200)


async def test_an_allow_policy_denying_a_caller_that_calls_is_diagnosed(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    misconfigured = asyncio.get_running_loop().time()
    w = await _workloads(
        control_plane,
        registry_dir,
        local_mesh,
        "a",
        "b",
        "c",
        notes={"b": 'shoal.io/allow: "default/a-sa"'},
    )
    async with aiohttp.ClientSession() as session:
        await _answers(session, w["a"], "b", 200)
        assert await _answers(session, w["c"], "b", 403) == "RBAC: access denied"

        found = await diagnosis.diagnosed(
            control_plane, "SHL0303", "Service default/b", since=misconfigured
        )
        assert found["field"] == "metadata.annotations[shoal.io/allow]"
        assert "allows only default/a-sa" in found["reason"]
        assert f"denied {TD}/default/sa/c-sa (" in found["reason"]
        assert "a-sa (" not in found["reason"]  # the admitted caller is not named
        assert found["fix"].startswith("Add default/c-sa to shoal.io/allow")

        out = await asyncio.to_thread(diagnosis.analyze_cli, control_plane, "--output", "json")
        assert out.returncode == 1, out.stdout + out.stderr
        (listed,) = [p for p in json.loads(out.stdout) if p["code"] == "SHL0303"]
        assert listed["object"] == "Service default/b" and listed["name"] == "CallerDenied"

        write(
            registry_dir,
            "b.yaml",
            _service(
                "b",
                w["b"].sidecar.inbound_port,
                notes='shoal.io/allow: "default/a-sa, default/c-sa"',
            ),
        )
        await _answers(session, w["c"], "b", 200)
        await diagnosis.cleared(control_plane, "SHL0303", "Service default/b")


async def test_an_export_to_hiding_a_service_from_its_callers_is_diagnosed(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    misconfigured = asyncio.get_running_loop().time()
    w = await _workloads(
        control_plane,
        registry_dir,
        local_mesh,
        "a",
        "other/hid",
        notes={"other/hid": 'shoal.io/export-to: "."'},
    )
    async with aiohttp.ClientSession() as session:
        said = await _answers(session, w["a"], "hid.other", 404)
        assert "no service in the mesh matches this Host" in said

        found = await diagnosis.diagnosed(
            control_plane, "SHL0304", "Service other/hid", since=misconfigured
        )
        assert found["field"] == "metadata.annotations[shoal.io/export-to]"
        assert (
            "is exported to its own namespace only, hiding it from namespace default"
            in (found["reason"])
        )
        assert "default/a got" in found["reason"]
        assert found["fix"].startswith("Add default to shoal.io/export-to")

        write(
            registry_dir,
            "hid.yaml",
            _service(
                "hid", w["hid"].sidecar.inbound_port, "other", 'shoal.io/export-to: "default"'
            ),
        )
        await _answers(session, w["a"], "hid.other", 200)
        await diagnosis.cleared(control_plane, "SHL0304", "Service other/hid")
