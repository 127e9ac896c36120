"""Every port of the control plane, probed as the README's Security table
says it behaves, anonymous and authenticated; and the table's rows and
limits checked against the code, so that neither drifts from the other."""

from __future__ import annotations

import os
import re
import ssl
import stat
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from shoal import cli, sidecar_files
from shoal._gen import ca_pb2, ca_pb2_grpc
from shoal.model import proxy
from shoal.sds import join, operations
from shoal.xds import resources, server
from tests.security import clients
from tests.security.test_admin_attacks import tcp, unix
from tests.security.test_xds_attacks import sidecar_node

README = Path(__file__).resolve().parents[2] / "README.md"


def _security_section() -> str:
    text = README.read_text()
    start = text.index("## Security\n")
    return text[start : text.index("\n## ", start + 1)]


async def _first_cds(channel: grpc.aio.Channel) -> discovery_pb2.DiscoveryResponse:
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
    await call.write(
        discovery_pb2.DiscoveryRequest(node=sidecar_node("probe"), type_url=resources.CLUSTER)
    )
    response: discovery_pb2.DiscoveryResponse = await call.read()
    call.cancel()
    return response


async def test_the_xds_port(control_plane: cli.ControlPlane) -> None:
    assert control_plane.authority is not None
    address = f"127.0.0.1:{control_plane.xds_port}"
    # Anonymous: plain text, and TLS without a client certificate, get nothing.
    async with grpc.aio.insecure_channel(address) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _first_cds(plain)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(root_certificates=control_plane.authority.xds_trust)
    async with grpc.aio.secure_channel(address, creds) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _first_cds(anonymous)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # A workload of the mesh gets its configuration.
    pair = clients.workload(control_plane, "demo", "web")
    async with clients.channel(control_plane, pair) as channel:
        response = await _first_cds(channel)
    assert response.type_url == resources.CLUSTER


async def test_the_join_port(control_plane: cli.ControlPlane) -> None:
    assert control_plane.authority is not None
    creds = grpc.ssl_channel_credentials(control_plane.authority.root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{control_plane.join_port}", creds) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Join(ca_pb2.JoinRequest(token="none", csr_pem=b""), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_certify_needs_kubernetes_to_check_a_token(
    control_plane: cli.ControlPlane,
) -> None:
    """Without --kubernetes nothing can check a Pod's token: refused, saying so."""
    assert control_plane.authority is not None
    creds = grpc.ssl_channel_credentials(control_plane.authority.root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{control_plane.join_port}", creds) as channel:
        stub = ca_pb2_grpc.CertificateServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Certify(
                ca_pb2.CertifyRequest(kubernetes_token="t", csr_pem=b"x"), timeout=30
            )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_webhook_port(tmp_path: Path) -> None:
    options = cli.ServeOptions(
        registry=tmp_path,
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        join_address="",
        webhook_address="127.0.0.1:0",
        state_dir=tmp_path / "state",
    )
    async with cli.control_plane(options) as cp, aiohttp.ClientSession() as session:
        assert cp.authority is not None and cp.webhook_port
        trusted = ssl.create_default_context(cadata=cp.authority.xds_trust.decode())
        url = f"https://127.0.0.1:{cp.webhook_port}"
        # TLS only.
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{cp.webhook_port}/healthz") as r:
                await r.read()
        async with session.get(f"{url}/healthz", ssl=trusted) as r:
            assert r.status == 200
        async with session.get(f"{url}/inject", ssl=trusted) as r:
            assert r.status == 405
        async with session.post(f"{url}/inject", json={}, ssl=trusted) as r:
            assert r.status == 400
            assert "expected kind AdmissionReview" in await r.text()
        async with session.get(f"{url}/debug/syncz", ssl=trusted) as r:
            assert r.status == 404


async def test_the_admin_port_and_the_admin_socket(control_plane: cli.ControlPlane) -> None:
    for path in ("/healthz", "/ready", "/metrics", "/"):
        assert (await tcp(control_plane, "GET", path))[0] == 200, path
    for method, path in (("GET", "/debug/syncz"), ("POST", "/ca/rotate-root")):
        assert (await tcp(control_plane, method, path))[0] == 403, path
    assert (await tcp(control_plane, "GET", "/metrics", {"Host": "rebound.example"}))[0] == 421
    mode = stat.S_IMODE(os.stat(control_plane.admin_socket).st_mode)
    assert mode == 0o600
    assert (await unix(control_plane, "GET", "/debug/syncz"))[0] == 200


async def test_the_sidecar_admin_is_on_loopback_only() -> None:
    from shoal.model import proxy
    from shoal.xds.translate import bootstrap

    config = bootstrap.sidecar(
        proxy.Sidecar("demo", "web", app_port=1, inbound_port=2, outbound_port=3),
        node_id="n",
        xds_host="127.0.0.1",
        xds_port=15010,
        admin_port=15000,
    )
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


async def test_the_trace_collector_port(control_plane: cli.ControlPlane, tmp_path: Path) -> None:
    """Spans only from a mesh certificate; nobody else gets a handshake."""
    assert control_plane.authority is not None and control_plane.collector_port
    url = f"https://127.0.0.1:{control_plane.collector_port}/api/v2/spans"
    anonymous = ssl.create_default_context()
    anonymous.check_hostname = False
    anonymous.verify_mode = ssl.CERT_NONE
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(url, json=[], ssl=anonymous) as r:
                await r.read()
        creds = sidecar_files.issue(control_plane.authority, proxy.Sidecar("default", "web"))
        (tmp_path / "cert.pem").write_bytes(creds.cert_pem)
        (tmp_path / "key.pem").write_bytes(creds.key_pem)
        meshed = ssl.create_default_context(cadata=creds.trust_pem.decode())
        meshed.check_hostname = False
        meshed.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
        async with session.post(url, json=[], ssl=meshed) as r:
            assert r.status == 202
        async with session.get(url, ssl=meshed) as r:
            assert r.status == 405


def test_the_readme_table_has_a_row_for_every_port() -> None:
    section = _security_section()
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    firsts = [row.split("|")[1].strip() for row in rows]
    for port in (
        "15010 xDS",
        "15012 join",
        "15014 admin",
        "15017 injection webhook",
        "15018 trace collector",
        "admin socket",
        "`shoal dashboard`",
        "15019 dashboard of `shoal serve`",
        "sidecar inbound",
        "sidecar health 15021",
        "sidecar stats 15090",
    ):
        assert any(first.startswith(port) for first in firsts), port


def test_the_readme_states_the_limits_in_force() -> None:
    section = _security_section()
    limits = server.Limits()
    mib = 1 << 20

    def stated(value: str) -> None:
        assert re.search(rf"\| {re.escape(value)}[ ;|]", section), value

    stated(f"{limits.subscription_bytes // mib} MiB")
    stated(f"{limits.identity_bytes // mib} MiB")
    stated(f"{limits.streams_per_identity:,}")
    stated(
        f"{limits.stream_names_per_second:,} a second, bursts of {limits.stream_names_burst:,}; "
        f"{limits.names_per_second:,} a second, bursts of {limits.names_burst:,}"
    )
    assert f"up to {server.MAX_ERROR:,} characters" in section
    stated(f"{limits.first_request_s:.0f} s")
    stated(f"{server.MAX_QUEUED_REQUESTS}")
    stated(f"{limits.unknown_types}")
    stated(f"{server.MAX_NAMES:,}, each at most {server.MAX_NAME_LENGTH:,} characters")
    assert f"| `node.id` | {limits.node_id_length} printable characters" in section
    stated(f"{join.MAX_REQUEST_BYTES // 1024} KiB")
    stated(f"{join.MAX_FAILURES} a minute")
    assert f"{limits.type_url_length} characters" in section
    assert f"{join.MAX_TOKENS:,}" in section
    assert dict(server.GRPC_OPTIONS)["grpc.max_receive_message_length"] == 4 * mib
    assert "| a DiscoveryRequest | 4 MiB" in section
    assert f"{operations.MAX_JOIN_TOKEN_TTL.total_seconds() / 3600:.0f} h" in section


async def test_an_admin_request_body_is_bounded(control_plane: cli.ControlPlane) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{control_plane.admin_port}/ca/rotate-root", data=b"x" * 65536
        ) as r,
    ):
        assert r.status == 413
