"""How much of the control plane's memory an abusive mesh identity can take,
and whether it comes back: the attack of issue #10, finding 4, measured.

    .venv/bin/python bench/abuse.py [--streams 40] [--megabytes 2]

Starts `shoal serve` as its own process (mTLS, a folder of one Service),
then, as one workload identity, opens `--streams` EDS subscriptions of
`--megabytes` of distinct names each, twice over (two rounds of distinct
name sets), and closes them; then the same from as many identities as
streams (each within its own limits). Prints the server's RSS (from /proc)
before, while the streams are open and after they closed, how many streams
were refused, and how long a healthy proxy's push took during the abuse.
Only uses what every version of `shoal serve` has, so it measures an older
checkout the same way (`--shoal PATH/TO/python`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from shoal.sds import ca

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SERVICE = """apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: demo, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: ["127.0.0.1"]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def node(node_id: str, account: str) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            "NAMESPACE": "demo",
            "SERVICE": "web",
            "SERVICE_ACCOUNT": account,
            "APP_PORT": 8080,
            "INBOUND_PORT": 15006,
            "OUTBOUND_PORT": 15001,
        }
    )
    return base_pb2.Node(id=node_id, cluster="web.demo", metadata=meta)


class Server:
    def __init__(self, python: str, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        (workdir / "registry").mkdir()
        self.write_service(20001)
        self.proc = subprocess.Popen(
            [
                python,
                "-m",
                "shoal.cli",
                "--log-level",
                "error",
                "serve",
                "--registry",
                str(workdir / "registry"),
                "--state-dir",
                str(workdir / "state"),
                "--xds-address",
                f"127.0.0.1:{self.port}",
                "--admin-address",
                "127.0.0.1:0",
                "--join-address",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline()
        root, _ = ca.load_or_create(workdir / "state", "cluster.local")
        self.authority = ca.Authority(root)

    def write_service(self, port: int) -> None:
        path = self.workdir / "registry" / "web.yaml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(SERVICE.format(port=port))
        tmp.replace(path)

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def channel(self, account: str) -> grpc.aio.Channel:
        pair = self.authority.workload("demo", account)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.authority.root_pem,
            private_key=pair.key_pem,
            certificate_chain=pair.cert_pem,
        )
        return grpc.aio.secure_channel(
            f"127.0.0.1:{self.port}", creds, options=[("grpc.max_send_message_length", -1)]
        )

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def subscribe(
    server: Server, account: str, node_id: str, names: list[str]
) -> tuple[grpc.aio.Channel, Any, str]:
    """Open one stream asking for `names`; 'held' if the server keeps it."""
    channel = server.channel(account)
    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
    await call.write(
        discovery_pb2.DiscoveryRequest(
            node=node(node_id, account), type_url=EDS, resource_names=names
        )
    )
    try:
        await asyncio.wait_for(call.read(), 2.0)
        outcome = "held"
    except TimeoutError:
        outcome = "held"  # names that do not exist: nothing to send, still subscribed
    except grpc.aio.AioRpcError as err:
        outcome = err.code().name
    return channel, call, outcome


async def healthy_push(server: Server, port: int) -> float:
    """Seconds for an endpoint change to reach a proxy that watches it."""
    cluster = "outbound|80||web.demo.svc.cluster.local"
    async with server.channel("healthy") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(
            discovery_pb2.DiscoveryRequest(
                node=node("healthy", "healthy"), type_url=EDS, resource_names=[cluster]
            )
        )
        first = await asyncio.wait_for(call.read(), 30)
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=EDS,
                resource_names=[cluster],
                version_info=first.version_info,
                response_nonce=first.nonce,
            )
        )
        started = time.monotonic()
        server.write_service(port)
        await asyncio.wait_for(call.read(), 60)
        took = time.monotonic() - started
        call.cancel()
        return took


async def attack(
    server: Server, streams: int, megabytes: float, after_close: float
) -> dict[str, Any]:
    per_name = len("outbound|80||s00-000000.demo.svc.cluster.local")
    count = int(megabytes * 2**20 / per_name)
    out: dict[str, Any] = {"rss_before_mib": round(server.rss(), 1)}
    for label, accounts in (
        ("one identity", ["web"] * streams),
        ("one identity, new names", ["web"] * streams),
        ("an identity per stream", [f"abuser-{i}" for i in range(streams)]),
    ):
        opened = []
        outcomes: dict[str, int] = {}
        for i, account in enumerate(accounts):
            names = [
                f"outbound|80||s{i:02d}-{j:06d}.{label[:3]}.svc.cluster.local" for j in range(count)
            ]
            channel, call, outcome = await subscribe(
                server, account, f"{account}-{label}-{i}", names
            )
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            opened.append((channel, call))
        during = server.rss()
        push = await healthy_push(server, 20002 if len(out) % 2 else 20001)
        for channel, call in opened:
            call.cancel()
            await channel.close()
        # The control plane gives freed heap back at a quiet moment, at most
        # every 10 s (shoal.heap); older versions never do.
        await asyncio.sleep(1)
        closed = server.rss()
        await asyncio.sleep(after_close)
        out[label] = {
            "streams": outcomes,
            "rss_open_mib": round(during, 1),
            "rss_1s_after_close_mib": round(closed, 1),
            "rss_after_close_mib": round(server.rss(), 1),
            "healthy_push_ms": round(push * 1000, 1),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--megabytes", type=float, default=2.0)
    parser.add_argument(
        "--after-close",
        type=float,
        default=15.0,
        help="seconds after the streams close before the last RSS is read (15: past the "
        "heap keeper's 10 s)",
    )
    parser.add_argument("--shoal", default=sys.executable, help="the python of the shoal to test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-abuse-") as workdir:
        server = Server(args.shoal, Path(workdir))
        try:
            time.sleep(1.0)
            result = asyncio.run(attack(server, args.streams, args.megabytes, args.after_close))
        finally:
            server.stop()
    result["banner"] = server.banner.strip()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
