"""Joining from outside: a one-time token and a CSR; the key never leaves."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509

from shoal import cli, envoy
from shoal._gen import ca_pb2, ca_pb2_grpc
from shoal.demo import apps, mesh
from shoal.sds import ca, join
from tests.conftest import write
from tests.e2e.helpers import caught_up
from tests.manifests import workload


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, timeout=60
    )


def _token(cp: cli.ControlPlane, account: str, ttl: str = "600") -> str:
    result = shoal(
        "ca",
        "join-token",
        "--namespace",
        "default",
        "--service-account",
        account,
        "--ttl",
        ttl,
        "--admin",
        cp.admin_socket,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def test_a_joined_sidecar_serves_with_a_key_made_on_its_machine(
    registry_dir: Path,
    control_plane: cli.ControlPlane,
    local_mesh: mesh.LocalMesh,
    tmp_path: Path,
) -> None:
    assert control_plane.authority is not None
    root = tmp_path / "root.pem"
    root.write_bytes(control_plane.authority.root_pem)
    token = await asyncio.to_thread(_token, control_plane, "vm-sa")
    v_in, app_port, out_port, admin_port = (envoy.free_port() for _ in range(4))
    write(registry_dir, "vm.yaml", workload("vm", "vm-sa", v_in))
    out = tmp_path / "vm"
    result = await asyncio.to_thread(
        shoal,
        "bootstrap",
        "--join",
        f"127.0.0.1:{control_plane.join_port}",
        "--token",
        token,
        "--ca-root",
        str(root),
        "--xds",
        f"127.0.0.1:{control_plane.xds_port}",
        "--service",
        "vm",
        "--service-account",
        "vm-sa",
        "--app-port",
        str(app_port),
        "--inbound-port",
        str(v_in),
        "--outbound-port",
        str(out_port),
        "--admin-port",
        str(admin_port),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "joined as spiffe://cluster.local/ns/default/sa/vm-sa" in result.stdout
    assert stat.S_IMODE((out / "xds-key.pem").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((out / "xds-cert.pem").read_bytes())
    assert ca.spiffe_ids(cert) == ["spiffe://cluster.local/ns/default/sa/vm-sa"]

    # The same token again: refused, nothing issued.
    again = await asyncio.to_thread(
        shoal,
        "bootstrap",
        "--join",
        f"127.0.0.1:{control_plane.join_port}",
        "--token",
        token,
        "--ca-root",
        str(root),
        "--service",
        "vm",
        "--service-account",
        "vm-sa",
        "--app-port",
        "1",
        "--inbound-port",
        "2",
        "--outbound-port",
        "3",
        "--admin-port",
        "4",
        "--out",
        str(tmp_path / "again"),
    )
    assert again.returncode != 0 and "already used" in again.stderr

    # The joined Envoy connects with its own key and serves mesh traffic.
    a_in = envoy.free_port()
    write(registry_dir, "a.yaml", workload("a", "a-sa", a_in))
    await caught_up(control_plane, registry_dir)
    a = await local_mesh.add(
        "a-1", namespace="default", service="a", inbound_port=a_in, service_account="a-sa"
    )
    app = apps.App("vm", "vm-1")
    runner = await apps.start(app, app_port)
    proc = envoy.EnvoyProcess(out / "envoy.yaml", admin_port)
    try:
        await proc.start()
        await proc.wait_ready()
        async with aiohttp.ClientSession() as session:
            status, body = await mesh.get(session, a, "vm")
        assert status == 200 and isinstance(body, dict) and body["instance"] == "vm-1"
    finally:
        await proc.stop()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("case", "reason", "code"),
    [
        ("garbage CSR", "not a PEM certificate signing request", grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong identity", "asks for", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown token", "unknown join token", grpc.StatusCode.PERMISSION_DENIED),
        ("expired token", "join token expired", grpc.StatusCode.PERMISSION_DENIED),
        ("oversized", "", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_malformed_joins_are_refused_and_change_nothing(
    control_plane: cli.ControlPlane, case: str, reason: str, code: grpc.StatusCode
) -> None:
    assert control_plane.authority is not None
    token = await asyncio.to_thread(
        _token, control_plane, "vm-sa", "0.2" if "expired" in case else "600"
    )
    key = ca.new_key()
    csr = ca.csr(key, "spiffe://cluster.local/ns/default/sa/vm-sa")
    if case == "garbage CSR":
        csr = b"-----BEGIN CERTIFICATE REQUEST-----\nnonsense\n-----END CERTIFICATE REQUEST-----\n"
    elif case == "wrong identity":
        csr = ca.csr(key, "spiffe://cluster.local/ns/kube-system/sa/admin")
    elif case == "unknown token":
        token = "not-a-token"
    elif case == "expired token":
        await asyncio.sleep(0.5)
    elif case == "oversized":
        csr = csr + b"x" * (join.MAX_REQUEST_BYTES * 2)
    creds = grpc.ssl_channel_credentials(control_plane.authority.root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{control_plane.join_port}", creds) as ch:
        stub = ca_pb2_grpc.CertificateServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Join(ca_pb2.JoinRequest(token=token, csr_pem=csr), timeout=10)
        assert info.value.code() == code
        assert reason in (info.value.details() or "")
        if case in ("garbage CSR", "wrong identity", "oversized"):
            # The token was not spent: a correct request still works.
            good = ca.csr(key, "spiffe://cluster.local/ns/default/sa/vm-sa")
            answer = await stub.Join(ca_pb2.JoinRequest(token=token, csr_pem=good), timeout=10)
            assert answer.spiffe_id.endswith("/sa/vm-sa")
