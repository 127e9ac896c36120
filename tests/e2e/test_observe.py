"""Sync state, visible: proxy-status, config-dump, CSDS and metrics on a real mesh."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2, string_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from shoal import cli, envoy
from shoal.demo import mesh
from shoal.xds import node, resources, server
from tests import manifests
from tests.conftest import ADMIN_IDENTITY, write
from tests.e2e.helpers import caught_up, eventually


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, timeout=30
    )


async def _mesh(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    a_in, b_in = envoy.free_port(), envoy.free_port()
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [a_in]))
    write(registry_dir, "b.yaml", manifests.service_with_endpoints("b", [b_in]))
    await caught_up(control_plane, registry_dir)
    await local_mesh.add("a-1", namespace="default", service="a", inbound_port=a_in)
    await local_mesh.add("b-1", namespace="default", service="b", inbound_port=b_in)


async def test_proxy_status_config_dump_and_csds_show_synced_envoys(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh, xds_mode: str
) -> None:
    await _mesh(control_plane, registry_dir, local_mesh)
    admin = control_plane.admin_socket

    async def all_synced() -> bool:
        out = (await asyncio.to_thread(shoal, "proxy-status", "--admin", admin)).stdout
        rows = [line for line in out.splitlines() if line.startswith("sidecar~")]
        return len(rows) == 2 and all(line.split()[3:7] == ["SYNCED"] * 4 for line in rows)

    await eventually(all_synced)
    result = await asyncio.to_thread(shoal, "proxy-status", "--admin", admin)
    assert result.returncode == 0
    header = result.stdout.splitlines()[0].split()
    assert header[:7] == ["NAME", "CLUSTER", "MODE", "CDS", "LDS", "EDS", "RDS"]
    assert xds_mode in result.stdout

    dump = await asyncio.to_thread(shoal, "config-dump", "sidecar~default~a-1", "--admin", admin)
    assert dump.returncode == 0, dump.stderr
    config = json.loads(dump.stdout)
    clusters = {c["name"] for c in config["types"]["CDS"]["resources"]}
    assert "outbound|80||b.default.svc.cluster.local" in clusters
    assert config["types"]["RDS"]["resources"][0]["virtual_hosts"]
    assert config["types"]["EDS"]["status"] == "SYNCED"

    missing = await asyncio.to_thread(shoal, "config-dump", "nobody", "--admin", admin)
    assert missing.returncode != 0 and "not found" in missing.stderr

    async with _channel(control_plane, *ADMIN_IDENTITY.split("/")) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        everyone = await stub.FetchClientStatus(csds_pb2.ClientStatusRequest())
        assert {c.node.id for c in everyone.config} == {
            "sidecar~default~a-1",
            "sidecar~default~b-1",
        }
        only_a = await stub.FetchClientStatus(
            csds_pb2.ClientStatusRequest(
                node_matchers=[
                    node_pb2.NodeMatcher(
                        node_id=string_pb2.StringMatcher(exact="sidecar~default~a-1")
                    )
                ]
            )
        )
        (config_a,) = only_a.config
        by_type: dict[str, set[int]] = {}
        for item in config_a.generic_xds_configs:
            by_type.setdefault(item.type_url, set()).add(item.config_status)
            if item.type_url == resources.SECRET:
                # Listed, never dumped: no key material leaves over CSDS.
                assert not item.HasField("xds_config")
            else:
                assert item.xds_config.type_url == item.type_url
        assert set(by_type) == {
            resources.SECRET,
            resources.CLUSTER,
            resources.ENDPOINT,
            resources.LISTENER,
            resources.ROUTE,
        }
        assert all(s == {csds_pb2.SYNCED} for s in by_type.values())

    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{control_plane.admin_port}/metrics")
    assert "shoal_xds_connected_streams 2.0" in text
    assert f'shoal_xds_pushes_total{{mode="{xds_mode}",type="CDS"}}' in text
    assert "shoal_mesh_services 2.0" in text


def _channel(cp: cli.ControlPlane, namespace: str, account: str) -> grpc.aio.Channel:
    """A TLS channel to xDS with a client certificate of the mesh CA."""
    assert cp.authority is not None
    pair = cp.authority.workload(namespace, account)
    creds = grpc.ssl_channel_credentials(
        root_certificates=cp.authority.trust_bundle,
        private_key=pair.key_pem,
        certificate_chain=pair.cert_pem,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", creds)


def _get(url: str) -> str:
    # In a thread: the control plane answering it runs on this test's loop.
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def _node() -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            node.NAMESPACE: "default",
            node.SERVICE: "a",
            node.APP_PORT: 1,
            node.INBOUND_PORT: 2,
            node.OUTBOUND_PORT: 3,
        }
    )
    return base_pb2.Node(id="rejecting-proxy", cluster="a.default", metadata=meta)


async def test_a_nack_shows_in_proxy_status_with_envoys_error(
    registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    write(registry_dir, "a.yaml", manifests.service("a"))
    await caught_up(control_plane, registry_dir)
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    async def outgoing():  # type: ignore[no-untyped-def]
        while (item := await requests.get()) is not None:
            yield item

    async with _channel(control_plane, "default", "default") as channel:
        stream = channel.stream_stream(
            f"/{server.ADS_SERVICE}/{server.SOTW_METHOD}",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )(outgoing())
        await requests.put(discovery_pb2.DiscoveryRequest(node=_node(), type_url=resources.CLUSTER))
        response = await stream.read()
        await requests.put(
            discovery_pb2.DiscoveryRequest(
                type_url=resources.CLUSTER,
                response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=3, message="cluster a: bad thing"),
            )
        )
        admin = control_plane.admin_socket

        async def shows_nack() -> bool:
            out = (await asyncio.to_thread(shoal, "proxy-status", "--admin", admin)).stdout
            return "NACKED" in out

        await eventually(shows_nack)
        result = await asyncio.to_thread(shoal, "proxy-status", "--admin", admin)
        assert result.returncode == 1
        assert (
            f"rejecting-proxy: CDS version {response.version_info} rejected: cluster a: bad thing"
            in result.stdout
        )
        text = await asyncio.to_thread(_get, f"http://127.0.0.1:{control_plane.admin_port}/metrics")
        assert 'shoal_xds_nacks_total{type="CDS"} 1.0' in text
        await requests.put(None)
        stream.cancel()


async def test_debug_pushes_says_what_each_push_changed_and_why(
    registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [envoy.free_port()]))
    await caught_up(control_plane, registry_dir)
    connector = aiohttp.UnixConnector(path=control_plane.admin_socket)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def pushes() -> list[dict[str, Any]]:
            async with session.get("http://localhost/debug/pushes") as response:
                assert response.status == 200
                found: list[dict[str, Any]] = await response.json()
                return found

        async def a_pushed() -> bool:
            return any("Service default/a" in p["changed"] for p in await pushes())

        await eventually(a_pushed)
        latest = (await pushes())[0]
        assert latest["push"] == max(p["push"] for p in await pushes()), "newest first"
        assert latest["reasons"].get("mesh state", 0) >= 1
        assert latest["mesh_version"] == control_plane.controller.state.version
