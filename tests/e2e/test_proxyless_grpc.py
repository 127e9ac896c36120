"""Proxyless gRPC: grpcio's built-in xDS client configured by shoal, no sidecar."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from shoal import cli
from tests.conftest import write
from tests.e2e.helpers import caught_up

CLIENT = Path(__file__).with_name("grpc_xds_client.py")


def _service(name: str, annotations: str = "") -> str:
    notes = f"\n  annotations:\n{annotations}" if annotations else ""
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default{notes}
spec:
  ports:
    - name: grpc
      port: 50051
"""


def _slice(service: str, port: int) -> str:
    return f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: grpc, port: {port}}}]
endpoints: [{{addresses: ["127.0.0.1"]}}]
"""


async def _backend(name: str) -> tuple[grpc.aio.Server, int]:
    async def hello(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        return name.encode()

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "demo.Greeter",
        {
            "Hello": grpc.unary_unary_rpc_method_handler(
                hello, request_deserializer=lambda b: b, response_serializer=lambda b: b
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, int]]:
    started = [await _backend("greeter-a"), await _backend("greeter-b")]
    try:
        yield {"greeter-a": started[0][1], "greeter-b": started[1][1]}
    finally:
        for server, _ in started:
            await server.stop(grace=None)


async def _run_client(bootstrap: Path, target: str, count: int, *headers: str) -> dict[str, int]:
    args = [sys.executable, str(CLIENT), target, "--count", str(count)]
    for h in headers:
        args += ["--header", h]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    counts: dict[str, int] = json.loads(out)
    return counts


async def test_weighted_and_header_routes_reach_a_proxyless_grpc_client(
    registry_dir: Path,
    control_plane: cli.ControlPlane,
    backends: dict[str, int],
    tmp_path: Path,
) -> None:
    write(
        registry_dir,
        "a.yaml",
        _service("greeter-a") + "---\n" + _slice("greeter-a", backends["greeter-a"]),
    )
    write(
        registry_dir,
        "b.yaml",
        _service("greeter-b") + "---\n" + _slice("greeter-b", backends["greeter-b"]),
    )
    write(
        registry_dir,
        "greeter.yaml",
        _service(
            "greeter",
            '    shoal.io/split: "greeter-a=20,greeter-b=80"\n'
            '    shoal.io/route-headers: "x-user-group=internal -> greeter-a"\n',
        ),
    )
    await caught_up(control_plane, registry_dir)
    code = cli.main(
        [
            "bootstrap",
            "--grpc",
            "--xds",
            f"127.0.0.1:{control_plane.xds_port}",
            "--namespace",
            "default",
            "--out",
            str(tmp_path / "client"),
        ]
    )
    assert code == 0
    bootstrap = tmp_path / "client" / "grpc-bootstrap.json"

    counts = await _run_client(bootstrap, "xds:///greeter", 1000)
    assert set(counts) == {"greeter-a", "greeter-b"}, counts
    share_a = counts["greeter-a"] / 1000
    assert 0.15 <= share_a <= 0.25, counts

    internal = await _run_client(bootstrap, "xds:///greeter:50051", 200, "x-user-group=internal")
    assert internal == {"greeter-a": 200}

    # Every name a caller may dial works, and the client never rejected a response.
    direct = await _run_client(bootstrap, "xds:///greeter-b.default.svc.cluster.local:50051", 20)
    assert direct == {"greeter-b": 20}
    assert control_plane.ads.nacks_total == 0


@pytest.fixture
def xds_security() -> str:
    """This suite speaks the xDS protocol with a bare client: plain text."""
    return "insecure"
