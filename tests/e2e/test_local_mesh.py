"""Real Envoy sidecars carrying real HTTP between real apps, configured by shoal."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from shoal import cli, envoy
from shoal.demo import mesh
from tests import manifests
from tests.conftest import write
from tests.e2e.helpers import ServeProcess, caught_up, eventually, who_answers


def _ports(n: int) -> list[int]:
    return [envoy.free_port() for _ in range(n)]


async def test_a_request_crosses_both_sidecars(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    a_in, b_in = _ports(2)
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [a_in]))
    write(registry_dir, "b.yaml", manifests.service_with_endpoints("b", [b_in]))
    await caught_up(control_plane, registry_dir)
    a = await local_mesh.add(
        "a-1", namespace="default", service="a", inbound_port=a_in, calls=("b",)
    )
    b = await local_mesh.add("b-1", namespace="default", service="b", inbound_port=b_in)
    async with aiohttp.ClientSession() as session:
        # a's sidecar (out) -> a's sidecar (in, mTLS) -> a's app -> a's sidecar
        # -> b's sidecar (mTLS) -> b's app.
        async with session.get(f"{a.outbound}/hello", headers={"Host": "a"}) as r:
            assert r.status == 200
            body = await r.json()
            assert "x-envoy-upstream-service-time" in r.headers
        assert body["instance"] == "a-1"
        (up,) = body["upstream"]
        assert (up["status"], up["instance"]) == (200, "b-1")
        # b's app saw a request that came through Envoy (which adds a request id).
        assert "x-request-id" in {k.lower() for k in b.app.seen_headers[0]}
        for host in ("b", "b.default", "b.default.svc", "b.default.svc.cluster.local:80", "b:80"):
            status, reply = await mesh.get(session, a, host)
            assert status == 200 and isinstance(reply, dict) and reply["instance"] == "b-1", host
        status, text = await mesh.get(session, a, "nope")
        assert status == 404 and "no service in the mesh" in str(text)


async def test_adding_and_removing_an_endpoint_moves_traffic(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    a_in, b1_in, b2_in = _ports(3)
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [a_in]))
    write(registry_dir, "b.yaml", manifests.service("b"))
    write(registry_dir, "b1.yaml", manifests.endpoint_slice("b1", "b", [b1_in]))
    await caught_up(control_plane, registry_dir)
    a = await local_mesh.add("a-1", namespace="default", service="a", inbound_port=a_in)
    await local_mesh.add("b-1", namespace="default", service="b", inbound_port=b1_in)
    await local_mesh.add("b-2", namespace="default", service="b", inbound_port=b2_in)
    async with aiohttp.ClientSession() as session:
        assert set(await who_answers(session, a, "b", 10)) == {"b-1"}

        write(registry_dir, "b2.yaml", manifests.endpoint_slice("b2", "b", [b2_in]))

        async def both() -> bool:
            return set(await who_answers(session, a, "b", 6)) == {"b-1", "b-2"}

        await eventually(both, 30.0)

        (registry_dir / "b1.yaml").unlink()

        async def only_b2() -> bool:
            return set(await who_answers(session, a, "b", 6)) == {"b-2"}

        await eventually(only_b2, 30.0)


def _dump(w: mesh.Workload) -> dict[str, Any]:
    with urllib.request.urlopen(f"{w.envoy.admin}/config_dump?include_eds", timeout=5) as r:
        data: dict[str, Any] = json.load(r)
    return data


def _shared_config(w: mesh.Workload) -> dict[str, Any]:
    """Outbound clusters, their endpoints and routes: what every sidecar of a namespace shares."""
    out: dict[str, Any] = {}
    for section in _dump(w)["configs"]:
        kind = section["@type"].rsplit(".", 1)[-1]
        if kind == "ClustersConfigDump":
            for c in section.get("dynamic_active_clusters", []):
                if c["cluster"]["name"].startswith("outbound|"):
                    # version_info is the CDS response's, which also covers the
                    # proxy's own inbound cluster; the content must match.
                    out[c["cluster"]["name"]] = c["cluster"]
        elif kind == "RoutesConfigDump":
            for rc in section.get("dynamic_route_configs", []):
                out["route:" + rc["route_config"]["name"]] = (
                    rc["version_info"],
                    rc["route_config"],
                )
        elif kind == "EndpointsConfigDump":
            for e in section.get("dynamic_endpoint_configs", []):
                cfg = e["endpoint_config"]
                if cfg["cluster_name"].startswith("outbound|"):
                    out["eds:" + cfg["cluster_name"]] = (e.get("version_info"), cfg)
    return out


async def test_a_second_envoy_connecting_later_gets_the_same_config(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    a_in, b_in, c_in = _ports(3)
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [a_in]))
    write(registry_dir, "b.yaml", manifests.service_with_endpoints("b", [b_in, c_in]))
    await caught_up(control_plane, registry_dir)
    first = await local_mesh.add("a-1", namespace="default", service="a", inbound_port=a_in)
    await asyncio.sleep(0.5)
    later = await local_mesh.add(
        "a-2", namespace="default", service="a", inbound_port=envoy.free_port()
    )

    async def same() -> bool:
        return _shared_config(first) == _shared_config(later)

    # Pushes may still be on their way to the first; it must end up the same.
    await eventually(same, 30.0)
    one, two = _shared_config(first), _shared_config(later)
    assert set(one) == {
        "outbound|80||a.default.svc.cluster.local",
        "outbound|80||b.default.svc.cluster.local",
        "route:outbound",
        "eds:outbound|80||a.default.svc.cluster.local",
        "eds:outbound|80||b.default.svc.cluster.local",
    }
    assert one == two


async def test_sidecars_outlive_a_killed_control_plane_and_resync_when_it_returns(
    registry_dir: Path, tmp_path: Path, xds_mode: str
) -> None:
    a_in, b1_in, b2_in, xds = _ports(4)
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [a_in]))
    write(registry_dir, "b.yaml", manifests.service_with_endpoints("b", [b1_in], slice_name="b1"))
    state = tmp_path / "state"
    serve = ServeProcess(registry_dir, xds, state)
    local = mesh.LocalMesh(tmp_path / "sidecars", xds, delta=xds_mode == "delta")
    try:
        await serve.start()
        local.authority = serve.authority()
        a = await local.add("a-1", namespace="default", service="a", inbound_port=a_in)
        await local.add("b-1", namespace="default", service="b", inbound_port=b1_in)
        await local.add("b-2", namespace="default", service="b", inbound_port=b2_in)
        envoy_pids = {
            name: w.envoy._proc.pid for name, w in local.workloads.items() if w.envoy._proc
        }
        async with aiohttp.ClientSession() as session:
            assert set(await who_answers(session, a, "b", 5)) == {"b-1"}

            serve.kill()
            await serve.wait()
            # The data plane does not need the control plane to keep serving.
            assert set(await who_answers(session, a, "b", 20)) == {"b-1"}

            # The world changes while the control plane is down...
            write(
                registry_dir,
                "b.yaml",
                manifests.service_with_endpoints("b", [b2_in], slice_name="b2"),
            )
            await asyncio.sleep(1.0)
            assert set(await who_answers(session, a, "b", 5)) == {"b-1"}

            # ...and reaches the same Envoys when it comes back.
            serve = ServeProcess(registry_dir, xds, state)
            await serve.start()

            async def moved() -> bool:
                return set(await who_answers(session, a, "b", 4)) == {"b-2"}

            await eventually(moved, 60.0)
        assert {
            n: w.envoy._proc.pid for n, w in local.workloads.items() if w.envoy._proc
        } == envoy_pids
    finally:
        await serve.stop()
        await local.close()
        local.kill_all()


async def test_serve_stops_cleanly_on_sigterm(registry_dir: Path, tmp_path: Path) -> None:
    write(registry_dir, "a.yaml", manifests.service("a"))
    serve = ServeProcess(registry_dir, envoy.free_port(), tmp_path / "state")
    try:
        await serve.start()
        assert "1 services" in serve.banner
        assert serve.proc is not None
        serve.proc.send_signal(signal.SIGTERM)
        assert await serve.wait() == 0
        assert "shoal: stopping\n" in serve.output
    finally:
        await serve.stop()


async def test_a_service_created_later_becomes_routable(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    # A new cluster: Envoy holds its CDS ACK until the cluster has warmed,
    # which needs the cluster's endpoints (and, with mTLS, its secrets).
    a_in, n_in = _ports(2)
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [a_in]))
    await caught_up(control_plane, registry_dir)
    a = await local_mesh.add("a-1", namespace="default", service="a", inbound_port=a_in)
    await local_mesh.add("new-1", namespace="default", service="new", inbound_port=n_in)
    write(registry_dir, "new.yaml", manifests.service_with_endpoints("new", [n_in]))
    async with aiohttp.ClientSession() as session:

        async def routable() -> bool:
            return set(await who_answers(session, a, "new", 2)) == {"new-1"}

        await eventually(routable, 30.0)
