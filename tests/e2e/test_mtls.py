"""Mutual TLS between real sidecars: identities, refusals, modes, authorization."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from shoal import cli, envoy
from shoal.demo import mesh
from shoal.sds import ca
from shoal.xds import node, resources
from tests.conftest import write
from tests.e2e.helpers import caught_up
from tests.manifests import workload

TD = "spiffe://cluster.local/ns/default/sa"


async def _pair(
    control_plane: cli.ControlPlane,
    registry_dir: Path,
    local_mesh: mesh.LocalMesh,
    b_notes: str = "",
) -> tuple[mesh.Workload, mesh.Workload]:
    a_in, b_in = envoy.free_port(), envoy.free_port()
    write(registry_dir, "a.yaml", workload("a", "a-sa", a_in))
    write(registry_dir, "b.yaml", workload("b", "b-sa", b_in, b_notes))
    await caught_up(control_plane, registry_dir)
    a = await local_mesh.add(
        "a-1", namespace="default", service="a", inbound_port=a_in, service_account="a-sa"
    )
    b = await local_mesh.add(
        "b-1", namespace="default", service="b", inbound_port=b_in, service_account="b-sa"
    )
    return a, b


def _admin(w: mesh.Workload, path: str) -> str:
    with urllib.request.urlopen(f"{w.envoy.admin}{path}", timeout=5) as r:
        return str(r.read().decode())


async def test_sidecars_speak_tls13_with_spiffe_identities(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    a, b = await _pair(control_plane, registry_dir, local_mesh)
    async with aiohttp.ClientSession() as session:
        status, body = await mesh.get(session, a, "b")
    assert status == 200 and isinstance(body, dict) and body["instance"] == "b-1"
    # b's app is told who called, by b's sidecar, from the verified certificate.
    xfcc = {k.lower(): v for k, v in b.app.seen_headers[0].items()}["x-forwarded-client-cert"]
    assert f"URI={TD}/a-sa" in xfcc

    for w, account in ((a, "a-sa"), (b, "b-sa")):
        certs = json.loads(await asyncio.to_thread(_admin, w, "/certs"))["certificates"]
        sans = {
            san["uri"]
            for c in certs
            for chain in c["cert_chain"]
            for san in chain.get("subject_alt_names", [])
            if "uri" in san
        }
        assert sans == {f"{TD}/{account}"}, (account, sans)

    # shoal ca status names each identity and the proxy that holds its certificate.
    out = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "ca",
            "status",
            "--admin",
            control_plane.admin_socket,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f"{TD}/a-sa" in out.stdout and "held by sidecar~default~a-1" in out.stdout
    assert "BEGIN" not in out.stdout  # no key (or certificate) material printed

    stats = await asyncio.to_thread(_admin, b, "/stats?filter=ssl")
    versions = {
        line.split(":")[0].split(".ssl.versions.")[1]: int(line.split(":")[1])
        for line in stats.splitlines()
        if ".ssl.versions." in line and line.startswith("listener.")
    }
    assert versions.get("TLSv1.3", 0) >= 1 and sum(versions.values()) == versions["TLSv1.3"]


async def _plain_get(port: int) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as r:
        return r.status


def _tls_handshake(port: int, pair: ca.KeyPair, roots: bytes, tmp: Path) -> None:
    (tmp / "c.pem").write_bytes(pair.cert_pem)
    (tmp / "k.pem").write_bytes(pair.key_pem)
    (tmp / "r.pem").write_bytes(roots)
    context = ssl.create_default_context(cafile=str(tmp / "r.pem"))
    context.check_hostname = False
    context.load_cert_chain(str(tmp / "c.pem"), str(tmp / "k.pem"))

    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        data = tls.recv(1024)
        if not data:
            raise ConnectionResetError("closed after the handshake")


async def test_strict_refuses_plain_text_and_other_cas(
    registry_dir: Path,
    control_plane: cli.ControlPlane,
    local_mesh: mesh.LocalMesh,
    tmp_path: Path,
) -> None:
    _, b = await _pair(control_plane, registry_dir, local_mesh)
    with pytest.raises(aiohttp.ClientError):
        await _plain_get(b.sidecar.inbound_port)
    stranger = ca.Authority(ca.new_root("cluster.local"))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await asyncio.to_thread(
            _tls_handshake,
            b.sidecar.inbound_port,
            stranger.workload("default", "a-sa"),
            control_plane.authority.trust_bundle if control_plane.authority else b"",
            tmp_path,
        )
    # The mesh's own certificate does get through (the refusals are not an accident).
    assert control_plane.authority is not None
    await asyncio.to_thread(
        _tls_handshake,
        b.sidecar.inbound_port,
        control_plane.authority.workload("default", "a-sa"),
        control_plane.authority.trust_bundle,
        tmp_path,
    )


async def test_permissive_accepts_plain_text_and_mtls(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    a, b = await _pair(
        control_plane, registry_dir, local_mesh, b_notes="    shoal.io/mtls: permissive\n"
    )
    assert await _plain_get(b.sidecar.inbound_port) == 200
    async with aiohttp.ClientSession() as session:
        status, _ = await mesh.get(session, a, "b")
    assert status == 200
    xfcc = {k.lower(): v for k, v in b.app.seen_headers[0].items()}["x-forwarded-client-cert"]
    assert f"URI={TD}/a-sa" in xfcc


async def test_allow_admits_the_listed_caller_and_403s_others(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    a, _b = await _pair(
        control_plane, registry_dir, local_mesh, b_notes='    shoal.io/allow: "default/a-sa"\n'
    )
    c_in = envoy.free_port()
    write(registry_dir, "c.yaml", workload("c", "c-sa", c_in))
    await caught_up(control_plane, registry_dir)
    c = await local_mesh.add(
        "c-1", namespace="default", service="c", inbound_port=c_in, service_account="c-sa"
    )
    async with aiohttp.ClientSession() as session:
        assert (await mesh.get(session, a, "b"))[0] == 200
        status, text = await mesh.get(session, c, "b")
    assert status == 403 and "RBAC" in str(text)


def _claiming_node(account: str) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            node.NAMESPACE: "default",
            node.SERVICE: "b",
            node.SERVICE_ACCOUNT: account,
            node.APP_PORT: 1,
            node.INBOUND_PORT: 2,
            node.OUTBOUND_PORT: 3,
        }
    )
    return base_pb2.Node(id="impostor", metadata=meta)


async def test_a_proxy_claiming_another_identity_gets_none_of_its_secrets(
    control_plane: cli.ControlPlane,
) -> None:
    assert control_plane.authority is not None
    own = control_plane.authority.workload("default", "a-sa")
    creds = grpc.ssl_channel_credentials(
        control_plane.authority.trust_bundle, own.key_pem, own.cert_pem
    )
    refused = 0
    for _ in range(5):
        async with grpc.aio.secure_channel(f"127.0.0.1:{control_plane.xds_port}", creds) as ch:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    node=_claiming_node("b-sa"),
                    type_url=resources.SECRET,
                    resource_names=["default"],
                )
            )
            try:
                response = await asyncio.wait_for(call.read(), 30)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "certificate is spiffe://cluster.local/ns/default/sa/a-sa" in (
                    err.details() or ""
                )
                refused += 1
            else:
                raise AssertionError(f"got {response!r}")
    assert refused == 5
    issued = control_plane.certificates.issued() if control_plane.certificates else []
    assert ("default", "b-sa") not in {i.identity for i in issued}
