"""`shoal proxy-status PROXY` and `shoal describe service NAME`, run as a user
would against a real mesh: a proxy that has not acknowledged a change shows
the change as a diff, a synced one matches everywhere, and one screen tells
a Service's endpoints, identities, proxies, routing, policies and problems."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from shoal import cli, envoy
from shoal.demo import mesh
from shoal.xds import node, resources, server
from tests import manifests
from tests.conftest import write
from tests.e2e.helpers import caught_up, eventually
from tests.manifests import workload

CALLER = "sidecar~default~caller-1"
SPLIT_90_10 = '    shoal.io/split: "reviews=90,reviews-v2=10"\n'
SPLIT_50_50 = '    shoal.io/split: "reviews=50,reviews-v2=50"\n'
MATCHES = "Everything matches: the proxy holds what the control plane wants it to have."


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    # A loaded machine takes seconds just to import the CLI.
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", *args], capture_output=True, text=True, timeout=60
    )


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(shoal, *args)


async def until_output(check: Callable[[str], bool], *args: str, timeout: float = 60.0) -> str:
    """The CLI's output once `check(output)` holds."""
    seen: list[str] = []

    async def holds() -> bool:
        result = await run(*args)
        seen[:] = [result.stdout + result.stderr]
        return check(result.stdout)

    try:
        await eventually(holds, timeout)
    except AssertionError as err:
        raise AssertionError(f"{err}; last output:\n{seen[0] if seen else ''}") from err
    return seen[0]


def rows(out: str) -> set[str]:
    """Lines with their runs of spaces (aligned columns) made one."""
    return {" ".join(line.split()) for line in out.splitlines()}


async def test_proxy_status_diffs_an_unacknowledged_change_and_describe_tells_a_service(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    admin = ("--admin", control_plane.admin_socket)
    ports = {name: envoy.free_port() for name in ("caller", "reviews", "reviews-v2")}
    for name, port in ports.items():
        notes = SPLIT_90_10 if name == "reviews" else ""
        write(registry_dir, f"{name}.yaml", workload(name, f"{name}-sa", port, notes))
    await caught_up(control_plane, registry_dir)
    workloads = {
        name: await local_mesh.add(
            f"{name}-1",
            namespace="default",
            service=name,
            inbound_port=port,
            service_account=f"{name}-sa",
        )
        for name, port in ports.items()
    }

    synced = await until_output(lambda out: MATCHES in out, "proxy-status", CALLER, *admin)
    print(f"$ shoal proxy-status {CALLER}  # synced\n{synced}")
    assert "Routes (RDS) Match" in synced and "Don't Match" not in synced
    # A part of an id that names several proxies filters the table only.
    several = await run("proxy-status", "reviews", *admin)
    assert several.returncode == 0, several.stderr
    assert "2 proxies match 'reviews': name one" in several.stdout
    assert "sidecar~default~reviews-v2-1" in several.stdout and "Match" not in several.stdout

    described = await until_output(
        lambda out: "sidecar~default~reviews-1" in out, "describe", "service", "reviews", *admin
    )
    print(f"$ shoal describe service reviews\n{described}")
    shown = rows(described)
    reviews_port = ports["reviews"]
    for line in (
        "Name: reviews",
        "Namespace: default",
        "Ports: http 80/http (1 endpoint)",
        "Endpoints: 1 ready of 1",
        f"127.0.0.1:{reviews_port} (http) ready spiffe://cluster.local/ns/default/sa/reviews-sa "
        "pod reviews-1 proxy sidecar~default~reviews-1",
        "Identities: callers accept spiffe://cluster.local/ns/default/sa/reviews-sa",
        "sidecar~default~reviews-1 spiffe://cluster.local/ns/default/sa/reviews-sa SYNCED",
        "1. every request -> default/reviews weight 90 (90%), default/reviews-v2 weight 10 (10%)",
        "mTLS: strict (from the mesh default)",
        "May call it: everyone (no shoal.io/allow)",
        f"{CALLER} default/caller-sa may call it",
        "Problems: none",
    ):
        assert line in shown, (line, described)

    caller_envoy = workloads["caller"].envoy._proc
    assert caller_envoy is not None
    os.kill(caller_envoy.pid, signal.SIGSTOP)
    try:
        write(
            registry_dir,
            "reviews.yaml",
            workload("reviews", "reviews-sa", reviews_port, SPLIT_50_50),
        )

        def unacknowledged(out: str) -> bool:
            return "Routes (RDS) Don't Match" in out and "not acknowledged yet" in out

        stale = await until_output(unacknowledged, "proxy-status", CALLER, *admin)
        print(f"$ shoal proxy-status {CALLER}  # its Envoy stopped, the split changed\n{stale}")
        lines = stale.splitlines()
        assert any(line.startswith(CALLER) and "STALE" in line for line in lines), stale
        assert "Clusters (CDS) Match" in stale and MATCHES not in stale
        changed = [line for line in lines if line.startswith("  ~ ")]
        assert len(changed) == 1, stale
        # The content diff of the route table: the weights, held and wanted.
        for line in ('- "weight": 90', '+ "weight": 50', '- "weight": 10'):
            assert line in rows(stale), (line, stale)

        caller_described = (await run("describe", "service", "caller", *admin)).stdout
        print(f"$ shoal describe service caller  # its Envoy stopped\n{caller_described}")
        assert any(
            line.startswith(f"{CALLER} ") and "STALE (RDS)" in line
            for line in rows(caller_described)
        ), caller_described
    finally:
        os.kill(caller_envoy.pid, signal.SIGCONT)

    resumed = await until_output(lambda out: MATCHES in out, "proxy-status", CALLER, *admin)
    assert "Don't Match" not in resumed
    result = await run("proxy-status", CALLER, *admin)
    assert result.returncode == 0, result.stderr

    # A malformed annotation: the last good routing stays, and the Service's
    # screen names the problem.
    write(
        registry_dir,
        "reviews.yaml",
        workload(
            "reviews",
            "reviews-sa",
            reviews_port,
            SPLIT_50_50 + '    shoal.io/timeout: "soon"\n',
        ),
    )
    troubled = await until_output(
        lambda out: "[SHL0003]" in out,
        "describe",
        "service",
        "reviews",
        *admin,
    )
    print(f"$ shoal describe service reviews  # with a malformed annotation\n{troubled}")
    assert "weight 50 (50%)" in troubled
    assert any(
        line.startswith("Error [SHL0003] Service default/reviews") for line in rows(troubled)
    )

    unknown = await run("describe", "service", "reviwes", *admin)
    print(f"$ shoal describe service reviwes\n{unknown.stderr}")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert "no Service default/reviwes" in unknown.stderr
    assert "did you mean default/reviews" in unknown.stderr


async def test_a_nack_shows_envoys_error_and_what_the_rejected_version_would_change(
    registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    """A proxy that rejects its clusters (a bare xDS client, as Envoy says it)."""
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [envoy.free_port()]))
    await caught_up(control_plane, registry_dir)
    assert control_plane.authority is not None
    pair = control_plane.authority.workload("default", "default")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=control_plane.authority.trust_bundle,
        private_key=pair.key_pem,
        certificate_chain=pair.cert_pem,
    )
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            node.NAMESPACE: "default",
            node.SERVICE: "a",
            node.APP_PORT: 1,
            node.INBOUND_PORT: 2,
            node.OUTBOUND_PORT: 3,
        }
    )
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (item := await requests.get()) is not None:
            yield item

    async with grpc.aio.secure_channel(
        f"127.0.0.1:{control_plane.xds_port}", credentials
    ) as channel:
        stream = channel.stream_stream(
            f"/{server.ADS_SERVICE}/{server.SOTW_METHOD}",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )(outgoing())
        try:
            await requests.put(
                discovery_pb2.DiscoveryRequest(
                    node=base_pb2.Node(
                        id="rejecting-proxy", cluster="a.default", metadata=metadata
                    ),
                    type_url=resources.CLUSTER,
                )
            )
            response = await asyncio.wait_for(stream.read(), 30)
            assert isinstance(response, discovery_pb2.DiscoveryResponse)
            await requests.put(
                discovery_pb2.DiscoveryRequest(
                    type_url=resources.CLUSTER,
                    response_nonce=response.nonce,
                    error_detail=status_pb2.Status(code=3, message="cluster a: bad thing"),
                )
            )
            admin = ("--admin", control_plane.admin_socket)
            nacked = await until_output(
                lambda out: "NACKED version" in out, "proxy-status", "rejecting-proxy", *admin
            )
            print(f"$ shoal proxy-status rejecting-proxy\n{nacked}")
            version = response.version_info[:8]
            shown = nacked.splitlines()
            assert f"  NACKED version {version}: cluster a: bad thing" in shown, nacked
            assert "  what the rejected version would change:" in shown, nacked
            assert any(
                line.startswith("  + outbound|80||a.default.svc.cluster.local  (added, ")
                for line in shown
            ), nacked
            assert "Clusters (CDS) Don't Match: holds nothing (0 resources)" in nacked
            assert (await run("proxy-status", "rejecting-proxy", *admin)).returncode == 1
        finally:
            await requests.put(None)
            stream.cancel()


def _anonymous_get(url: str) -> int:
    # In a thread: the control plane answering it runs on this test's loop.
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return err.code


async def test_the_diff_and_the_description_are_for_the_admin_socket_only(
    registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    """They reveal configuration: anonymous callers (the TCP admin port) are
    refused, as for config dumps."""
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [envoy.free_port()]))
    await caught_up(control_plane, registry_dir)
    base = f"http://127.0.0.1:{control_plane.admin_port}/debug"
    for path in ("proxy_diff?proxy=sidecar", "describe?service=default/a"):
        assert await asyncio.to_thread(_anonymous_get, f"{base}/{path}") == 403
    described = await run("describe", "service", "a", "--admin", control_plane.admin_socket)
    assert described.returncode == 0 and "Name:         a" in described.stdout
