"""Fan-out benchmark: `shoal serve` and N simulated Envoy sidecars over real ADS.

Writes a manifests folder of `--services` Services (namespace `default`, one
EndpointSlice file each, 3 endpoints), starts `shoal serve` on it as a separate
process and connects N proxies from worker processes: grpc.aio clients, one
channel (one TCP connection) per stream as real Envoys have, each a sidecar
with its own node metadata (its own OUTBOUND_PORT, so its own snapshot key).
By default xDS is mTLS, as `shoal serve` runs: every proxy presents a client
certificate from the mesh CA (all are default/default). The proxies speak ADS
as Envoy does, delta (DeltaAggregatedResources) or state of the world
(StreamAggregatedResources): CDS and LDS wildcard; on CDS, ACK and subscribe
EDS to the outbound clusters (and, with mTLS, SDS to the two secrets); on LDS,
subscribe RDS to "outbound"; ACK every response. They read only a response's
type, version, nonce and resource names. For each N it measures:

* connect_all_s: from the start of connecting until every proxy has ACKed
  CDS, EDS, LDS and RDS (and SDS);
* push latency: one EndpointSlice file is rewritten with a new address (the
  clock starts just before the write) until each proxy has ACKed the EDS
  update; p50 and p99 over proxies, median over `--pushes` pushes. This
  includes the file watcher, the registry reload, the 100 ms debounce quiet
  period and the rebuild; push_p99_ms_excl_debounce subtracts the 100 ms;
* the server's RSS per idle stream, its CPU seconds per push, and a reconnect
  storm (every proxy drops its stream and reconnects at once, without
  versions, so every proxy is sent its full configuration again);
* the floor: a bare grpc.aio server (this script, `--floor-server`, with the
  same gRPC options and TLS) that holds N streams and, on SIGUSR1, writes one
  pre-serialized response (the bytes a proxy received for shoal's push) to
  every stream; the same clients ACK it.

`--instrument` runs `shoal serve` in a wrapper (shoal is not changed) that
times its garbage collections, registry reloads, rebuilds and writes, and
splits each push into watcher, reload, debounce, rebuild and fan-out;
`--gc-freeze` has the wrapper call gc.freeze() once the proxies are in;
`--server-profile FILE` cProfiles one phase. Every figure assumes nothing
else runs on the machine: `other_cpu_s` says how much did.

    .venv/bin/python bench/fanout.py [--proxies 100,1000,2000] [--mode delta|sotw]
                                     [--services N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from shoal.sds import ca
from shoal.xds import node, resources
from shoal.xds import server as ads_server
from shoal.xds.translate import names, secrets

PYTHON = sys.executable
SCRIPT = Path(__file__).resolve()

CDS = resources.CLUSTER
EDS = resources.ENDPOINT
LDS = resources.LISTENER
RDS = resources.ROUTE
SDS = resources.SECRET
HELLO = "bench.fanout/hello"  # the floor server's first response
ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
ADS_METHODS = {"delta": "DeltaAggregatedResources", "sotw": "StreamAggregatedResources"}

ENDPOINTS_PER_SLICE = 3
ENDPOINT_PORT = 8080
APP_PORT = 8080
INBOUND_PORT = 15006
FIRST_OUTBOUND_PORT = 20000
# shoal serve's default --debounce-quiet; part of every push it measures.
DEBOUNCE_QUIET_MS = 100.0
# Between pushes: more than the debounce's 1 s ceiling, so pushes never merge.
PUSH_GAP_S = 1.2
SETTLE_S = 1.0
PUSH_TIMEOUT_S = 30.0
BANNER_TIMEOUT_S = 60.0
WORKER_REPLY_SLACK_S = 30.0

# Shoal's own, so the floor holds as many streams the same way.
SERVER_OPTIONS = ads_server.GRPC_OPTIONS
CLIENT_OPTIONS = [
    # Channels in one process otherwise share one TCP connection per target;
    # every Envoy has its own.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 1 << 28),
    ("grpc.enable_retries", 0),
]


# -- small helpers --------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if not value:
            out.append(bits)
            return bytes(out)
        out.append(bits | 0x80)


def _field(number: int, payload: bytes) -> bytes:
    """A protobuf length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _text(number: int, value: str) -> bytes:
    return _field(number, value.encode()) if value else b""


def _identity(body: bytes) -> bytes:
    return body


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_TICK = os.sysconf("SC_CLK_TCK")
OTHER_CPU_WARNING_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in found:
            found[parts[0]] = int(parts[1])
    return found["VmRSS:"], found["VmHWM:"]


def cpu_s(pid: int) -> float:
    """utime + stime of a process, all threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# -- the manifests ----------------------------------------------------------------


def service_name(i: int) -> str:
    return f"svc-{i:05d}"


def cluster_name(i: int) -> str:
    return f"outbound|80||{service_name(i)}.default.svc.cluster.local"


def _address(index: int) -> str:
    return f"10.{index >> 16 & 0xFF}.{index >> 8 & 0xFF}.{index & 0xFF}"


def service_yaml(i: int) -> str:
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {service_name(i)}
  namespace: default
spec:
  ports:
    - name: http
      port: 80
"""


def slice_yaml(i: int, addresses: Sequence[str]) -> str:
    endpoints = "".join(
        f'  - addresses: ["{a}"]\n    conditions: {{ready: true}}\n' for a in addresses
    )
    return f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service_name(i)}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {service_name(i)}
addressType: IPv4
ports:
  - name: http
    port: {ENDPOINT_PORT}
endpoints:
{endpoints}"""


def addresses_of(i: int) -> list[str]:
    return [_address(i * ENDPOINTS_PER_SLICE + k + 1) for k in range(ENDPOINTS_PER_SLICE)]


def write_manifests(folder: Path, services: int) -> None:
    for i in range(services):
        (folder / f"{service_name(i)}.yaml").write_text(service_yaml(i))
        (folder / f"{service_name(i)}-slice.yaml").write_text(slice_yaml(i, addresses_of(i)))


def move_endpoint(folder: Path, i: int, address: str) -> None:
    """Replace the first endpoint of Service i, atomically (the registry ignores
    the temporary name)."""
    path = folder / f"{service_name(i)}-slice.yaml"
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(slice_yaml(i, [address, *addresses_of(i)[1:]]))
    os.replace(tmp, path)


# -- a simulated proxy (in a worker process) ----------------------------------------


def node_bytes(index: int, services: int) -> bytes:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            node.NAMESPACE: "default",
            node.SERVICE: service_name(index % services),
            node.APP_PORT: APP_PORT,
            node.INBOUND_PORT: INBOUND_PORT,
            node.OUTBOUND_PORT: FIRST_OUTBOUND_PORT + index,
        }
    )
    n = base_pb2.Node(
        id=f"sidecar~default~proxy-{index}",
        cluster=service_name(index % services),
        metadata=metadata,
    )
    data: bytes = n.SerializeToString()
    return data


def delta_request(
    type_url: str, *, node: bytes = b"", nonce: str = "", encoded_names: bytes = b""
) -> bytes:
    """A DeltaDiscoveryRequest; `encoded_names` from encode_names() (the
    field number of resource_names_subscribe is 3, as in DiscoveryRequest)."""
    return b"".join(
        (
            _field(1, node) if node else b"",
            _text(2, type_url),
            encoded_names,
            _text(6, nonce),
        )
    )


def sotw_request(
    type_url: str,
    *,
    node: bytes = b"",
    version: str = "",
    nonce: str = "",
    encoded_names: bytes = b"",
) -> bytes:
    return b"".join(
        (
            _text(1, version),
            _field(2, node) if node else b"",
            encoded_names,
            _text(4, type_url),
            _text(5, nonce),
        )
    )


def encode_names(items: Sequence[str]) -> bytes:
    """`resource_names` (field 3) of a DiscoveryRequest, or
    `resource_names_subscribe` (field 3) of a DeltaDiscoveryRequest."""
    return b"".join(_text(3, n) for n in items)


def _raw_types() -> tuple[Any, Any]:
    """Cut-down views of discovery.proto's messages, so a client reads no more
    of a large response than it needs: a response's version (field 1 in both
    variants), resources (2) left as bytes, type URL (4) and nonce (5); and
    the name (3) of a delta Resource."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="bench_fanout.proto", package="bench_fanout")
    response = proto.message_type.add(name="RawResponse")
    response.field.add(name="version_info", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    response.field.add(name="resources", number=2, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    response.field.add(name="type_url", number=4, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    response.field.add(name="nonce", number=5, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    item = proto.message_type.add(name="RawResource")
    item.field.add(name="name", number=3, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("bench_fanout.RawResponse")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("bench_fanout.RawResource")),
    )


RawResponse, RawResource = _raw_types()

KIND_BITS = {CDS: 1, EDS: 2, LDS: 4, RDS: 8, SDS: 16}
OUTBOUND_PREFIX = "outbound|"
ROUTE_NAMES = (names.OUTBOUND_ROUTE,)
# With mTLS every sidecar cluster and listener names these two secrets (by
# Istio's names), so a proxy asks for them with its first clusters, as Envoy
# does, without reading the clusters' transport sockets.
SECRET_NAMES = tuple(sorted((secrets.WORKLOAD, secrets.TRUST_BUNDLE)))


class Proxy:
    """One sidecar: one channel, one ADS stream."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.node = node_bytes(index, fleet.services)
        self.channel: grpc.aio.Channel | None = None
        self.task: asyncio.Task[None] | None = None
        self.kinds = 0
        self.done_at = 0.0
        self.error = ""
        self.eds: set[str] = set()
        self.eds_sorted: tuple[str, ...] = ()
        self.eds_version = ""
        self.eds_nonce = ""
        self.rds = False
        self.sds = False
        self.eds_seen = 0
        self.eds_mark = -1
        self.push_at = 0.0

    async def run(self) -> None:
        fleet = self.fleet
        try:
            if fleet.credentials is None:
                self.channel = grpc.aio.insecure_channel(fleet.target, options=CLIENT_OPTIONS)
            else:
                self.channel = grpc.aio.secure_channel(
                    fleet.target, fleet.credentials, options=CLIENT_OPTIONS
                )
            call: Any = self.channel.stream_stream(
                f"/{ADS_SERVICE}/{ADS_METHODS[fleet.mode]}",
                request_serializer=_identity,
                response_deserializer=_identity,
            )()
            delta = fleet.mode == "delta"
            if delta:
                await call.write(delta_request(CDS, node=self.node))
                await call.write(delta_request(LDS))
            else:
                await call.write(sotw_request(CDS, node=self.node))
                await call.write(sotw_request(LDS))
            on_response = self._on_delta if delta else self._on_sotw
            while True:
                body = await call.read()
                if body is grpc.aio.EOF:
                    self.error = "the server ended the stream"
                    return
                await on_response(call, body)
        except grpc.aio.AioRpcError as err:
            self.error = f"{err.code().name}: {err.details()}"
        except Exception as err:
            self.error = repr(err)
        finally:
            if self.error:
                fleet.failed(self)

    async def _on_delta(self, call: Any, body: bytes) -> None:
        msg = RawResponse.FromString(body)
        type_url = msg.type_url
        await call.write(delta_request(type_url, nonce=msg.nonce))
        if type_url == CDS:
            fleet = self.fleet
            known = fleet.names_memo.get
            new = []
            for r in msg.resources:
                n = known(r) or fleet.resource_name(r)
                if n not in self.eds and n.startswith(OUTBOUND_PREFIX):
                    new.append(n)
            if new:
                self.eds.update(new)
                await call.write(delta_request(EDS, encoded_names=fleet.encoded_names(tuple(new))))
            if fleet.secrets and not self.sds:
                self.sds = True
                await call.write(
                    delta_request(SDS, encoded_names=fleet.encoded_names(SECRET_NAMES))
                )
        elif type_url == LDS and not self.rds:
            self.rds = True
            await call.write(
                delta_request(RDS, encoded_names=self.fleet.encoded_names(ROUTE_NAMES))
            )
        self._received(type_url, body)

    async def _on_sotw(self, call: Any, body: bytes) -> None:
        msg = RawResponse.FromString(body)
        type_url = msg.type_url
        version, nonce = msg.version_info, msg.nonce
        fleet = self.fleet
        if type_url == CDS:
            await call.write(sotw_request(CDS, version=version, nonce=nonce))
            known = fleet.names_memo.get
            found = [known(r) or fleet.cluster_name(r) for r in msg.resources]
            eds = tuple(sorted(n for n in found if n.startswith(OUTBOUND_PREFIX)))
            if eds != self.eds_sorted:
                self.eds_sorted = eds
                await call.write(
                    sotw_request(
                        EDS,
                        version=self.eds_version,
                        nonce=self.eds_nonce,
                        encoded_names=fleet.encoded_names(eds),
                    )
                )
            if fleet.secrets and not self.sds:
                self.sds = True
                await call.write(sotw_request(SDS, encoded_names=fleet.encoded_names(SECRET_NAMES)))
        elif type_url == EDS:
            self.eds_version, self.eds_nonce = version, nonce
            await call.write(
                sotw_request(
                    EDS,
                    version=version,
                    nonce=nonce,
                    encoded_names=fleet.encoded_names(self.eds_sorted),
                )
            )
        elif type_url in (LDS, HELLO):
            await call.write(sotw_request(type_url, version=version, nonce=nonce))
            if type_url == LDS and not self.rds:
                self.rds = True
                await call.write(sotw_request(RDS, encoded_names=fleet.encoded_names(ROUTE_NAMES)))
        else:
            asked = SECRET_NAMES if type_url == SDS else ROUTE_NAMES
            await call.write(
                sotw_request(
                    type_url,
                    version=version,
                    nonce=nonce,
                    encoded_names=fleet.encoded_names(asked),
                )
            )
        self._received(type_url, body)

    def _received(self, type_url: str, body: bytes) -> None:
        """Called once the response is ACKed."""
        now = time.monotonic()
        fleet = self.fleet
        if type_url == EDS:
            self.eds_seen += 1
            if self.eds_seen == self.eds_mark + 1:
                self.push_at = now
                fleet.pushed(self, body)
        if not self.done_at:
            self.kinds |= KIND_BITS.get(type_url, 0)
            if self.kinds == fleet.all_kinds or type_url == HELLO:
                self.done_at = now
                fleet.connected()


class Fleet:
    """The proxies of one worker process, driven by commands on stdin."""

    def __init__(self) -> None:
        self.target = ""
        self.mode = "delta"
        self.services = 1
        self.credentials: grpc.ChannelCredentials | None = None
        self.secrets = False
        self.all_kinds = 0
        self.proxies: list[Proxy] = []
        self.errors: list[str] = []
        self._to_connect = 0
        self._connected = asyncio.Event()
        self._to_push = 0
        self._pushed = asyncio.Event()
        self._sample = b""
        self._names: dict[tuple[str, ...], bytes] = {}
        self.names_memo: dict[bytes, str] = {}

    # What every proxy shares: names parsed once, names encoded once.
    def _name(self, body: bytes, parse: Callable[[bytes], str]) -> str:
        found = self.names_memo.get(body)
        if found is None:
            found = parse(body)
            if len(self.names_memo) > 100_000:
                self.names_memo.clear()
            self.names_memo[body] = found
        return found

    def resource_name(self, body: bytes) -> str:
        """The name of a delta Resource."""
        return self._name(body, lambda b: str(RawResource.FromString(b).name))

    def cluster_name(self, body: bytes) -> str:
        """The name of the Cluster in an Any."""
        return self._name(
            body, lambda b: cluster_pb2.Cluster.FromString(any_pb2.Any.FromString(b).value).name
        )

    def encoded_names(self, items: tuple[str, ...]) -> bytes:
        found = self._names.get(items)
        if found is None:
            found = self._names[items] = encode_names(items)
        return found

    def failed(self, proxy: Proxy) -> None:
        if len(self.errors) < 5:
            self.errors.append(f"proxy {proxy.index}: {proxy.error}")

    def connected(self) -> None:
        self._to_connect -= 1
        if self._to_connect <= 0:
            self._connected.set()

    def pushed(self, proxy: Proxy, body: bytes) -> None:
        if not self._sample:
            self._sample = body
        self._to_push -= 1
        if self._to_push <= 0:
            self._pushed.set()

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "connect":
            return await self.connect(cmd)
        if op == "mark":
            return self.mark()
        if op == "wait_push":
            return await self.wait_push(float(cmd["timeout"]))
        if op == "close":
            await self.close()
            return {}
        if op == "cpu":
            t = os.times()
            return {"cpu_s": t.user + t.system}
        if op == "quit":
            return {}
        raise ValueError(f"unknown op {op!r}")

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        await self.close()
        self.target = cmd["target"]
        self.mode = cmd["mode"]
        self.services = int(cmd["services"])
        tls = cmd.get("tls")
        self.credentials = None
        if tls is not None:
            self.credentials = grpc.ssl_channel_credentials(
                root_certificates=tls["roots"].encode(),
                private_key=tls["key"].encode(),
                certificate_chain=tls["cert"].encode(),
            )
        # A floor stream is connected at its first response; it has no secrets.
        self.secrets = tls is not None and not cmd.get("floor", False)
        self.all_kinds = sum(KIND_BITS[t] for t in (CDS, EDS, LDS, RDS))
        if self.secrets:
            self.all_kinds |= KIND_BITS[SDS]
        self.errors = []
        first, count = int(cmd["first"]), int(cmd["count"])
        self.proxies = [Proxy(self, i) for i in range(first, first + count)]
        self._to_connect = count
        self._connected = asyncio.Event()
        if count == 0:
            self._connected.set()
        for p in self.proxies:
            p.task = asyncio.create_task(p.run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), float(cmd["timeout"]))
        done = [p.done_at for p in self.proxies if p.done_at]
        return {
            "connected": len(done),
            "last_at": max(done, default=0.0),
            "errors": self.errors,
        }

    def mark(self) -> dict[str, Any]:
        live = [p for p in self.proxies if p.done_at and not p.error]
        for p in live:
            p.eds_mark = p.eds_seen
            p.push_at = 0.0
        self._to_push = len(live)
        self._pushed = asyncio.Event()
        if not live:
            self._pushed.set()
        self._sample = b""
        return {"marked": len(live)}

    async def wait_push(self, timeout: float) -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pushed.wait(), timeout)
        for p in self.proxies:
            p.eds_mark = -1
        return {
            "acked_at": [p.push_at for p in self.proxies if p.push_at],
            "missing": max(self._to_push, 0),
            "sample": self._sample.hex(),
            "errors": self.errors,
        }

    async def close(self) -> None:
        proxies, self.proxies = self.proxies, []
        for p in proxies:
            if p.task is not None:
                p.task.cancel()
        await asyncio.gather(*(p.task for p in proxies if p.task), return_exceptions=True)
        await asyncio.gather(
            *(p.channel.close() for p in proxies if p.channel), return_exceptions=True
        )


async def worker_main() -> None:
    raise_open_files()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    fleet = Fleet()
    try:
        while True:
            line = await reader.readline()
            if not line:
                return  # the coordinator is gone
            cmd = json.loads(line)
            try:
                reply = await fleet.handle(cmd)
            except Exception as err:
                reply = {"error": repr(err)}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
            if cmd["op"] == "quit":
                return
    finally:
        await fleet.close()


# -- the floor: a bare grpc.aio server --------------------------------------------


class Floor:
    """Holds streams; on SIGUSR1 writes the bytes of `body_file` to every one."""

    def __init__(self, body_file: Path) -> None:
        self._body_file = body_file
        self._body = b""
        self._wakes: set[asyncio.Event] = set()
        self._hello = discovery_pb2.DeltaDiscoveryResponse(
            type_url=HELLO, nonce="0"
        ).SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=_identity, response_serializer=_identity
        )
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE, {name: method for name in ADS_METHODS.values()}
        )

    def push(self) -> None:
        self._body = self._body_file.read_bytes()
        for wake in self._wakes:
            wake.set()

    async def _drain(self, requests: AsyncIterator[bytes], wake: asyncio.Event) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
            async for _ in requests:
                pass
        wake.set()

    async def _stream(self, requests: AsyncIterator[bytes], context: Any) -> None:
        try:
            await anext(aiter(requests))
        except StopAsyncIteration:
            return
        wake = asyncio.Event()
        reader = asyncio.create_task(self._drain(requests, wake))
        self._wakes.add(wake)
        try:
            await context.write(self._hello)
            while not reader.done():
                await wake.wait()
                wake.clear()
                if self._body and not reader.done():
                    await context.write(self._body)
        finally:
            self._wakes.discard(wake)
            reader.cancel()


async def floor_main(
    port: int, body_file: Path, credentials: grpc.ServerCredentials | None
) -> None:
    raise_open_files()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    floor = Floor(body_file)
    server.add_generic_rpc_handlers((floor.handler(),))
    address = f"127.0.0.1:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, floor.push)
    print(f"floor: listening on 127.0.0.1:{bound}", flush=True)
    await stop.wait()
    await server.stop(grace=0.5)


# -- the coordinator ---------------------------------------------------------------


class Children:
    """Every process this run starts; all are stopped at the end, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    def add(self, proc: asyncio.subprocess.Process) -> asyncio.subprocess.Process:
        self.procs.append(proc)
        return proc

    async def stop(
        self, proc: asyncio.subprocess.Process, timeout: float = 10.0, grace: float = 0.0
    ) -> None:
        """Wait `grace` seconds for it to exit by itself, then SIGTERM, then SIGKILL."""
        if grace and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    async def stop_all(self) -> None:
        for proc in list(self.procs):
            await self.stop(proc)

    def kill_all_now(self) -> None:
        """Last resort, outside the event loop."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


CHILDREN = Children()


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _line_starting(path: Path, marker: str) -> str | None:
    return next((x for x in _tail(path, 1 << 20).splitlines() if x.startswith(marker)), None)


async def _await_banner(
    proc: asyncio.subprocess.Process, stdout: Path, stderr: Path, marker: str
) -> str:
    deadline = time.monotonic() + BANNER_TIMEOUT_S
    while time.monotonic() < deadline:
        line = _line_starting(stdout, marker)
        if line is not None:
            return line
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    tail = _tail(stderr)
    raise RuntimeError(f"no {marker!r} banner (exit {proc.returncode}); stderr:\n{tail}")


async def start_process(
    args: Sequence[str], logs: Path, name: str, marker: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = CHILDREN.add(
            await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                cwd=logs,
                env={**os.environ, **(env or {})},
            )
        )
    banner = await _await_banner(proc, out, err, marker)
    return proc, banner


# Runs `shoal serve` in place of `python -m shoal.cli`, for a look inside
# (shoal itself is not changed): tracemalloc snapshots on SIGUSR1; the start and length
# of every garbage collection, registry reload and controller rebuild, and the
# start of every write of a response to a stream, written
# to a JSON file on exit; cProfile of the event-loop thread, switched on and
# off by SIGUSR2, written to a file on exit.
SERVER_WRAPPER = """
import cProfile, gc, json, os, signal, sys, time
from shoal import cli
from shoal.registry import files
from shoal.xds import controller
env = os.environ.get
if env("FANOUT_TRACEMALLOC"):
    import tracemalloc
    tracemalloc.start(12)
    taken = []
    def snapshot(*_):
        tracemalloc.take_snapshot().dump("%s.%d" % (env("FANOUT_TRACEMALLOC"), len(taken)))
        taken.append(1)
    signal.signal(signal.SIGUSR1, snapshot)
events = []
if env("FANOUT_EVENTS"):
    begun = [0.0]
    def on_gc(phase, info):
        now = time.monotonic()
        if phase == "start":
            begun[0] = now
        else:
            events.append(("gc%d" % info["generation"], begun[0], now - begun[0]))
    gc.callbacks.append(on_gc)
    def timed(cls, name):
        original = getattr(cls, name)
        def wrapper(self, *args, **kwargs):
            started = time.monotonic()
            try:
                return original(self, *args, **kwargs)
            finally:
                events.append((name, started, time.monotonic() - started))
        setattr(cls, name, wrapper)
    timed(files.FolderRegistry, "reload")
    timed(controller.Controller, "rebuild")
    from shoal.xds import server
    write = server.AdsServer._write
    async def timed_write(self, *args, **kwargs):
        events.append(("write", time.monotonic(), 0.0))
        return await write(self, *args, **kwargs)
    server.AdsServer._write = timed_write
profile = cProfile.Profile(time.thread_time) if env("FANOUT_PROFILE") else None
profiling = [False]
def toggle(*_):
    if profiling[0]:
        profile.disable()
    else:
        profile.enable()
    profiling[0] = not profiling[0]
if profile is not None:
    signal.signal(signal.SIGUSR2, toggle)
try:
    code = cli.main(sys.argv[1:])
finally:
    if profile is not None:
        profile.disable()
        profile.dump_stats(env("FANOUT_PROFILE"))
    if env("FANOUT_EVENTS"):
        with open(env("FANOUT_EVENTS"), "w") as f:
            json.dump(events, f)
sys.exit(code)
"""


TRUST_DOMAIN = "cluster.local"  # shoal serve's default


@dataclass
class Tls:
    """Certificates from the mesh CA in shoal's state directory: one xDS client
    certificate (every proxy is default/default, so one identity), as
    `shoal bootstrap` writes for a sidecar, and a serving one for the floor."""

    enabled: bool
    client_cert: bytes = b""
    client_key: bytes = b""
    roots: bytes = b""
    server_cert: bytes = b""
    server_key: bytes = b""

    @classmethod
    def from_state(cls, state_dir: Path) -> Tls:
        # The root shoal serve would create on its first start, made first.
        signer, _ = ca.load_or_create(state_dir, TRUST_DOMAIN)
        authority = ca.Authority(signer, trust_domain=TRUST_DOMAIN)
        key = ca.new_key()
        cert = authority.issue(
            key.public_key(),
            uri=authority.spiffe_id("default", "default"),
            ttl=datetime.timedelta(days=1),
            server=False,
        )
        serving = authority.serving(["127.0.0.1", "localhost"])
        return cls(
            True, cert, ca.key_pem(key), authority.trust_bundle, serving.cert_pem, serving.key_pem
        )

    def client(self) -> dict[str, str] | None:
        """For a worker's connect command."""
        if not self.enabled:
            return None
        return {
            "cert": self.client_cert.decode(),
            "key": self.client_key.decode(),
            "roots": self.roots.decode(),
        }

    def write_server(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cert.pem").write_bytes(self.server_cert)
        (folder / "key.pem").write_bytes(self.server_key)
        (folder / "roots.pem").write_bytes(self.roots)
        return folder


@dataclass
class Shoal:
    proc: asyncio.subprocess.Process
    xds_port: int
    events: Path | None
    stderr: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


async def start_shoal(registry: Path, logs: Path, args: argparse.Namespace) -> Shoal:
    xds, admin = free_port(), free_port()
    argv = [
        "--log-level",
        "warning",
        "serve",
        "--registry",
        str(registry),
        "--xds-address",
        f"127.0.0.1:{xds}",
        "--admin-address",
        f"127.0.0.1:{admin}",
        "--state-dir",
        str(logs / "state"),
        # Every simulated proxy is default/default: one identity for the
        # whole fleet, past the default cap on one identity's streams.
        "--max-streams-per-identity",
        "1000000",
    ]
    if args.xds_security == "insecure":
        argv.append("--insecure-xds")
    env: dict[str, str] = {}
    events = None
    if args.tracemalloc:
        env["FANOUT_TRACEMALLOC"] = args.tracemalloc
    if args.instrument:
        events = logs / f"events-{registry.name}.json"
        env["FANOUT_EVENTS"] = str(events)
    if args.server_profile:
        env["FANOUT_PROFILE"] = args.server_profile
    cmd = [PYTHON, "-c", SERVER_WRAPPER, *argv] if env else [PYTHON, "-m", "shoal.cli", *argv]
    name = f"shoal-{registry.name}"
    proc, _ = await start_process(cmd, logs, name, "shoal: xDS on", env)
    return Shoal(proc, xds, events, logs / f"{name}.err")


Event = tuple[str, float, float]


def server_events(log: Path) -> list[Event]:
    """(what, started, seconds): gc0, gc1, gc2, reload, rebuild, write."""
    if not log.exists():
        return []
    return [(str(w), float(t), float(d)) for w, t, d in json.loads(log.read_text())]


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr

    async def call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout + WORKER_REPLY_SLACK_S)
        if not line:
            raise RuntimeError(f"worker {self.proc.pid} died; stderr:\n{_tail(self.stderr)}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.proc.pid}: {reply['error']}")
        return reply


class Workers:
    def __init__(self, workers: list[Worker]) -> None:
        self.all = workers

    @classmethod
    async def start(cls, count: int, logs: Path) -> Workers:
        workers = []
        for k in range(count):
            err = logs / f"worker-{k}.err"
            with err.open("wb") as e:
                proc = CHILDREN.add(
                    await asyncio.create_subprocess_exec(
                        PYTHON,
                        str(SCRIPT),
                        "--worker",
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=e,
                        cwd=logs,
                        limit=1 << 28,
                    )
                )
            workers.append(Worker(proc, err))
        return cls(workers)

    async def each(self, cmds: Sequence[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(*(w.call(c, timeout) for w, c in zip(self.all, cmds, strict=True)))
        )

    async def every(self, cmd: dict[str, Any], timeout: float = 60.0) -> list[dict[str, Any]]:
        return await self.each([cmd] * len(self.all), timeout)

    async def cpu_s(self) -> float:
        return sum(float(r["cpu_s"]) for r in await self.every({"op": "cpu"}))

    async def connect(
        self, target: str, proxies: int, timeout: float, setup: dict[str, Any]
    ) -> tuple[float, int, list[str]]:
        """Seconds until the last proxy is connected, how many did, errors.
        `setup`: mode, services, tls (PEM text or None), floor."""
        share = -(-proxies // len(self.all))
        cmds = [
            {
                **setup,
                "op": "connect",
                "target": target,
                "first": k * share,
                "count": max(0, min(share, proxies - k * share)),
                "timeout": timeout,
            }
            for k in range(len(self.all))
        ]
        started = time.monotonic()
        replies = await self.each(cmds, timeout)
        connected = sum(r["connected"] for r in replies)
        errors = [e for r in replies for e in r["errors"]]
        if connected < proxies:
            return math.nan, connected, errors
        return max(r["last_at"] for r in replies) - started, connected, errors

    async def stop(self) -> None:
        """Ask each worker to quit (it also quits on end of input), then make sure."""
        for w in self.all:
            if w.proc.stdin is not None:
                with contextlib.suppress(Exception):
                    w.proc.stdin.write(json.dumps({"op": "quit"}).encode() + b"\n")
                    w.proc.stdin.close()
        for w in self.all:
            await CHILDREN.stop(w.proc, grace=5.0)


@dataclass
class Push:
    """One push, as seen by every proxy; times from the trigger."""

    p50_ms: float
    p99_ms: float
    first_ms: float
    last_ms: float
    acked: int
    missing: int
    server_cpu_s: float
    client_cpu_s: float
    bytes: int
    resources: int
    # With --instrument: where the time went in the server, from the trigger
    # (file written) to the registry reload, the reload itself, the wait for
    # the debounce, the rebuild, and from the end of the rebuild (when the
    # server starts pushing) to the p99 ACK; garbage collection between the
    # trigger and the last ACK.
    watch_ms: float = math.nan
    reload_ms: float = math.nan
    debounce_ms: float = math.nan
    rebuild_ms: float = math.nan
    fanout_p99_ms: float = math.nan
    # From the end of the rebuild to the server's first and last write.
    first_write_ms: float = math.nan
    last_write_ms: float = math.nan
    gc_ms: float = math.nan
    gc_max_ms: float = math.nan
    gc_full: int | None = None
    # The monotonic clock at the trigger and at the last ACK.
    window: tuple[float, float] = (0.0, 0.0)


def _resource_count(body: bytes) -> int:
    """Resources in a pushed response (the field number is 2 in both variants)."""
    return len(RawResponse.FromString(body).resources) if body else 0


async def push_once(
    workers: Workers, trigger: Callable[[], None], server_pid: int
) -> tuple[Push, bytes]:
    """`trigger()` starts a push; the clock starts just before it."""
    await workers.every({"op": "mark"})
    cpu0, client0 = cpu_s(server_pid), await workers.cpu_s()
    started = time.monotonic()
    trigger()
    replies = await workers.every({"op": "wait_push", "timeout": PUSH_TIMEOUT_S}, PUSH_TIMEOUT_S)
    await asyncio.sleep(0.3)  # let the server take the last ACKs
    cpu1, client1 = cpu_s(server_pid), await workers.cpu_s()
    acked_at = [t for r in replies for t in r["acked_at"]]
    latencies = [(t - started) * 1000 for t in acked_at]
    sample = next((bytes.fromhex(r["sample"]) for r in replies if r["sample"]), b"")
    push = Push(
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        first_ms=min(latencies, default=math.nan),
        last_ms=max(latencies, default=math.nan),
        acked=len(latencies),
        missing=sum(r["missing"] for r in replies),
        server_cpu_s=cpu1 - cpu0,
        client_cpu_s=client1 - client0,
        bytes=len(sample),
        resources=_resource_count(sample),
        window=(started, max(acked_at, default=started)),
    )
    return push, sample


@dataclass
class Result:
    proxies: int
    mode: str
    xds_security: str
    services: int
    workers: int
    instrumented: bool
    connect_all_s: float = math.nan
    connect_server_cpu_s: float = math.nan
    connect_client_cpu_s: float = math.nan
    push_p50_ms: float = math.nan
    push_p99_ms: float = math.nan
    push_p99_ms_excl_debounce: float = math.nan
    push_first_ms: float = math.nan
    push_spread_p99_ms: float = math.nan
    push_cpu_s: float = math.nan
    push_client_cpu_s: float = math.nan
    push_bytes: int = 0
    push_resources: int = 0
    push_watch_ms: float = math.nan
    push_reload_ms: float = math.nan
    push_debounce_ms: float = math.nan
    push_rebuild_ms: float = math.nan
    push_fanout_p99_ms: float = math.nan
    push_first_write_ms: float = math.nan
    push_last_write_ms: float = math.nan
    push_gc_ms: float = math.nan
    push_gc_max_ms: float = math.nan
    floor_push_p50_ms: float = math.nan
    floor_push_p99_ms: float = math.nan
    floor_push_cpu_s: float = math.nan
    floor_push_client_cpu_s: float = math.nan
    floor_rss_per_stream_kb: float = math.nan
    rss_base_mb: float = math.nan
    rss_mb: float = math.nan
    rss_peak_mb: float = math.nan
    rss_per_stream_kb: float = math.nan
    reconnect_all_s: float = math.nan
    reconnect_server_cpu_s: float = math.nan
    reconnect_client_cpu_s: float = math.nan
    # CPU seconds the machine spent, while this proxy count ran, in processes
    # other than this benchmark and its children: more than a few seconds
    # means something else competed for the CPUs and the figures are off.
    other_cpu_s: float = math.nan
    complete: bool = True
    errors: list[str] = field(default_factory=list)
    pushes: list[Push] = field(default_factory=list)
    floor_pushes: list[Push] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _summarize(r: Result) -> None:
    r.push_p50_ms = _median([p.p50_ms for p in r.pushes])
    r.push_p99_ms = _median([p.p99_ms for p in r.pushes])
    r.push_p99_ms_excl_debounce = r.push_p99_ms - DEBOUNCE_QUIET_MS
    r.push_first_ms = _median([p.first_ms for p in r.pushes])
    r.push_spread_p99_ms = _median([p.p99_ms - p.first_ms for p in r.pushes])
    r.push_cpu_s = _median([p.server_cpu_s for p in r.pushes])
    r.push_client_cpu_s = _median([p.client_cpu_s for p in r.pushes])
    r.push_bytes = max((p.bytes for p in r.pushes), default=0)
    r.push_resources = max((p.resources for p in r.pushes), default=0)
    r.floor_push_p50_ms = _median([p.p50_ms for p in r.floor_pushes])
    r.floor_push_p99_ms = _median([p.p99_ms for p in r.floor_pushes])
    r.floor_push_cpu_s = _median([p.server_cpu_s for p in r.floor_pushes])
    r.floor_push_client_cpu_s = _median([p.client_cpu_s for p in r.floor_pushes])


def _attach_events(r: Result, events: Sequence[Event]) -> None:
    ms = 1000.0
    for p in r.pushes:
        begin, end = p.window
        inside = [e for e in events if begin <= e[1] <= end]
        collections = [(w, d) for w, _, d in inside if w.startswith("gc")]
        p.gc_ms = sum(d for _, d in collections) * ms
        p.gc_max_ms = max((d for _, d in collections), default=0.0) * ms
        p.gc_full = sum(1 for w, _ in collections if w == "gc2")
        reload = next((e for e in inside if e[0] == "reload"), None)
        if reload is None:
            continue
        rebuild = next((e for e in inside if e[0] == "rebuild" and e[1] >= reload[1]), None)
        p.watch_ms = (reload[1] - begin) * ms
        p.reload_ms = reload[2] * ms
        if rebuild is not None:
            p.debounce_ms = (rebuild[1] - reload[1] - reload[2]) * ms
            p.rebuild_ms = rebuild[2] * ms
            built = rebuild[1] + rebuild[2]
            p.fanout_p99_ms = p.p99_ms - (built - begin) * ms
            writes = [t for w, t, _ in inside if w == "write" and t >= built]
            p.first_write_ms = (min(writes, default=math.nan) - built) * ms
            p.last_write_ms = (max(writes, default=math.nan) - built) * ms
    r.push_watch_ms = _median([p.watch_ms for p in r.pushes])
    r.push_reload_ms = _median([p.reload_ms for p in r.pushes])
    r.push_debounce_ms = _median([p.debounce_ms for p in r.pushes])
    r.push_rebuild_ms = _median([p.rebuild_ms for p in r.pushes])
    r.push_fanout_p99_ms = _median([p.fanout_p99_ms for p in r.pushes])
    r.push_first_write_ms = _median([p.first_write_ms for p in r.pushes])
    r.push_last_write_ms = _median([p.last_write_ms for p in r.pushes])
    r.push_gc_ms = _median([p.gc_ms for p in r.pushes])
    r.push_gc_max_ms = max((p.gc_max_ms for p in r.pushes), default=math.nan)


async def measure_shoal(
    args: argparse.Namespace, r: Result, workers: Workers, work: Path, timeout: float, tls: Tls
) -> bytes:
    """Connect, push, reconnect; the bytes of one push, for the floor."""
    proxies = r.proxies
    registry = work / f"registry-{proxies}"
    registry.mkdir()
    write_manifests(registry, args.services)
    server = await start_shoal(registry, work, args)
    target = f"127.0.0.1:{server.xds_port}"
    phase = args.server_profile_phase if args.server_profile else ""

    def profile(which: str) -> None:
        if which == phase:
            server.proc.send_signal(signal.SIGUSR2)

    sample = b""
    try:
        await asyncio.sleep(SETTLE_S)
        base_rss, _ = rss_kib(server.pid)

        if args.tracemalloc:
            server.proc.send_signal(signal.SIGUSR1)
        # Every proxy connects at once.
        profile("connect")
        cpu0, client0 = cpu_s(server.pid), await workers.cpu_s()
        setup = {"mode": args.mode, "services": args.services, "tls": tls.client(), "floor": False}
        r.connect_all_s, connected, errors = await workers.connect(target, proxies, timeout, setup)
        r.connect_server_cpu_s = cpu_s(server.pid) - cpu0
        r.connect_client_cpu_s = await workers.cpu_s() - client0
        profile("connect")
        if connected != proxies:
            _problem(r, f"{connected} of {proxies} connected; {errors[:3]}")
            _problem(r, f"shoal serve (exit {server.proc.returncode}): {_tail(server.stderr, 600)}")
        await asyncio.sleep(SETTLE_S * 2)
        if args.tracemalloc:
            server.proc.send_signal(signal.SIGUSR1)
        rss, _ = rss_kib(server.pid)
        r.rss_base_mb = base_rss / 1024
        r.rss_mb = rss / 1024
        r.rss_per_stream_kb = (rss - base_rss) / proxies

        # One endpoint moves, `--pushes` times, in Services spread over the mesh.
        profile("push")
        for k in range(args.pushes if connected else 0):
            service = k * (args.services - 1) // max(args.pushes - 1, 1)
            address = f"172.16.{k}.{proxies % 250 + 1}"
            push, body = await push_once(
                workers, functools.partial(move_endpoint, registry, service, address), server.pid
            )
            r.pushes.append(push)
            sample = sample or body
            if push.missing:
                _problem(r, f"push {k}: {push.missing} proxies did not ACK in {PUSH_TIMEOUT_S} s")
            await asyncio.sleep(PUSH_GAP_S)
        profile("push")

        # Reconnect storm: every stream drops, every proxy comes back at once.
        if not args.no_reconnect:
            await workers.every({"op": "close"}, timeout)
            profile("reconnect")
            cpu0, client0 = cpu_s(server.pid), await workers.cpu_s()
            r.reconnect_all_s, connected, errors = await workers.connect(
                target, proxies, timeout, setup
            )
            r.reconnect_server_cpu_s = cpu_s(server.pid) - cpu0
            r.reconnect_client_cpu_s = await workers.cpu_s() - client0
            profile("reconnect")
            if connected != proxies:
                _problem(r, f"reconnect: {connected} of {proxies} connected; {errors[:3]}")
                _problem(r, f"shoal serve: {_tail(server.stderr, 600)}")
        _, peak = rss_kib(server.pid)
        r.rss_peak_mb = peak / 1024
        await workers.every({"op": "close"}, timeout)
    finally:
        await CHILDREN.stop(server.proc)
    if server.events is not None:
        _attach_events(r, server_events(server.events))
    return sample


async def measure_floor(
    args: argparse.Namespace,
    r: Result,
    workers: Workers,
    work: Path,
    timeout: float,
    sample: bytes,
    tls: Tls,
) -> None:
    """The same clients and the same bytes, from a server that does nothing else."""
    body_file = work / f"floor-body-{r.proxies}"
    body_file.write_bytes(sample)
    port = free_port()
    command = [PYTHON, str(SCRIPT), "--floor-server", str(port), "--floor-body", str(body_file)]
    if tls.enabled:
        command += ["--floor-tls", str(tls.write_server(work / f"floor-tls-{r.proxies}"))]
    floor, _ = await start_process(
        command,
        work,
        f"floor-{r.proxies}",
        "floor: listening",
    )
    try:
        await asyncio.sleep(SETTLE_S)
        base_rss, _ = rss_kib(floor.pid)
        setup = {"mode": args.mode, "services": args.services, "tls": tls.client(), "floor": True}
        _, connected, errors = await workers.connect(f"127.0.0.1:{port}", r.proxies, timeout, setup)
        if connected != r.proxies:
            _problem(r, f"floor: {connected} of {r.proxies} connected; {errors[:3]}")
        await asyncio.sleep(SETTLE_S)
        rss, _ = rss_kib(floor.pid)
        r.floor_rss_per_stream_kb = (rss - base_rss) / r.proxies
        for k in range(args.pushes):
            push, _ = await push_once(
                workers, functools.partial(os.kill, floor.pid, signal.SIGUSR1), floor.pid
            )
            r.floor_pushes.append(push)
            if push.missing:
                _problem(r, f"floor push {k}: {push.missing} proxies did not ACK")
            await asyncio.sleep(0.3)
        await workers.every({"op": "close"}, timeout)
    finally:
        await CHILDREN.stop(floor)


def _problem(r: Result, problem: str) -> None:
    r.complete = False
    r.errors.append(problem)
    print(f"fanout: {r.proxies} proxies: {problem}", file=sys.stderr)


async def run_one(args: argparse.Namespace, proxies: int, work: Path, tls: Tls) -> Result:
    r = Result(
        proxies,
        args.mode,
        args.xds_security,
        args.services,
        args.workers,
        args.instrument,
    )
    timeout = 60.0 + proxies * 0.05
    machine0, ours0 = machine_cpu_s(), own_cpu_s()
    workers = await Workers.start(args.workers, work)
    try:
        sample = await measure_shoal(args, r, workers, work, timeout, tls)
        if not args.no_floor and sample:
            await measure_floor(args, r, workers, work, timeout, sample, tls)
    finally:
        await workers.stop()
    # Every child has been waited for, so its CPU time is in own_cpu_s().
    r.other_cpu_s = max(0.0, (machine_cpu_s() - machine0) - (own_cpu_s() - ours0))
    if r.other_cpu_s > OTHER_CPU_WARNING_S:
        print(
            f"fanout: {proxies} proxies: other processes used {r.other_cpu_s:.0f} CPU seconds "
            "during the run; the figures are disturbed",
            file=sys.stderr,
        )
    _summarize(r)
    return r


async def coordinator(args: argparse.Namespace) -> list[Result]:
    raise_open_files()
    # SIGTERM stops the run as Ctrl-C does: cancelled, every child stopped.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    results = []
    with tempfile.TemporaryDirectory(prefix="shoal-fanout-") as tmp:
        work = Path(tmp)
        tls = Tls.from_state(work / "state") if args.xds_security == "mtls" else Tls(False)
        try:
            for n in [int(p) for p in args.proxies.split(",")]:
                results.append(await run_one(args, n, work, tls))
                if not args.json:
                    print_row(results[-1], header=len(results) == 1)
        finally:
            await CHILDREN.stop_all()
    return results


# -- output --------------------------------------------------------------------


def _f(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


COLUMNS = (
    ("proxies", 7),
    ("connect s", 9),
    ("push p50 ms", 11),
    ("push p99 ms", 11),
    ("p99-debounce", 12),
    ("first ms", 8),
    ("spread p99", 10),
    ("floor p99", 9),
    ("push cpu s", 10),
    ("rss MiB", 7),
    ("KiB/stream", 10),
    ("reconnect s", 11),
)


def print_row(r: Result, header: bool) -> None:
    if header:
        print(
            f"mode {r.mode}, xDS {r.xds_security}, {r.services} services, "
            f"{r.workers} client worker(s)"
        )
        print(" ".join(f"{name:>{width}}" for name, width in COLUMNS))
    cells = (
        str(r.proxies),
        _f(r.connect_all_s, 2),
        _f(r.push_p50_ms),
        _f(r.push_p99_ms),
        _f(r.push_p99_ms_excl_debounce),
        _f(r.push_first_ms),
        _f(r.push_spread_p99_ms),
        _f(r.floor_push_p99_ms),
        _f(r.push_cpu_s, 2),
        _f(r.rss_mb),
        _f(r.rss_per_stream_kb),
        _f(r.reconnect_all_s, 2),
    )
    print(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)), flush=True)
    for e in r.errors:
        print(f"  problem: {e}")


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument(
        "--proxies", default="100,1000,2000", help="comma-separated proxy counts (100,1000,2000)"
    )
    p.add_argument(
        "--mode",
        choices=("delta", "sotw"),
        default="delta",
        help="incremental (DeltaAggregatedResources) or state of the world",
    )
    p.add_argument("--services", type=int, default=1000, help="Services in the mesh (1000)")
    p.add_argument(
        "--xds-security",
        choices=("mtls", "insecure"),
        default="mtls",
        help="xDS over mTLS with client certificates from the mesh CA, as shoal serve "
        "runs by default, or plain text (shoal serve --insecure-xds)",
    )
    p.add_argument("--pushes", type=int, default=5, help="one-endpoint pushes per proxy count")
    p.add_argument(
        "--workers", type=int, default=2, help="client processes the proxies are spread over"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-floor", action="store_true", help="skip the bare gRPC server")
    p.add_argument("--no-reconnect", action="store_true", help="skip the reconnect storm")
    p.add_argument(
        "--tracemalloc",
        metavar="FILE",
        help="run shoal serve under tracemalloc; snapshots before and after the proxies "
        "connect go to FILE.0 and FILE.1 (compare them with tracemalloc.Snapshot.load)",
    )
    p.add_argument(
        "--instrument",
        action="store_true",
        help="run shoal serve in a wrapper that times its garbage collections, registry "
        "reloads and rebuilds, to split each push into its parts",
    )
    p.add_argument(
        "--server-profile",
        default="",
        metavar="FILE",
        help="cProfile shoal serve's event loop in one phase, in the loop thread's CPU time "
        "(gRPC's own threads and waits do not count; slows it down); pstats to FILE",
    )
    p.add_argument(
        "--server-profile-phase", choices=("connect", "push", "reconnect"), default="push"
    )
    # Internal: the processes this script starts.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    p.add_argument("--floor-body", help=argparse.SUPPRESS)
    p.add_argument("--floor-tls", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    counts = args.proxies.split(",")
    if not all(c.strip().isdigit() and int(c) > 0 for c in counts):
        p.error("--proxies takes positive numbers, comma-separated")
    if FIRST_OUTBOUND_PORT + max(int(c) for c in counts) > 65535:
        p.error(f"at most {65535 - FIRST_OUTBOUND_PORT} proxies (one outbound port each)")
    if args.services < 1 or args.pushes < 1 or args.workers < 1:
        p.error("--services, --pushes and --workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.server_profile:
        args.server_profile = os.path.abspath(args.server_profile)
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker_main())
        return 0
    if args.floor_server is not None:
        credentials = None
        if args.floor_tls:
            # As shoal serves xDS: its own certificate, client certificates required.
            folder = Path(args.floor_tls)
            credentials = grpc.ssl_server_credentials(
                [((folder / "key.pem").read_bytes(), (folder / "cert.pem").read_bytes())],
                root_certificates=(folder / "roots.pem").read_bytes(),
                require_client_auth=True,
            )
        asyncio.run(floor_main(args.floor_server, Path(args.floor_body), credentials))
        return 0
    try:
        results = asyncio.run(coordinator(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("fanout: interrupted", file=sys.stderr)
        return 130
    finally:
        CHILDREN.kill_all_now()
    if args.json:
        rows = [
            {
                **_rounded(asdict(r)),
                "python": platform.python_version(),
                "shoal": str(Path(node.__file__).resolve().parent.parent),
                "debounce_quiet_ms": DEBOUNCE_QUIET_MS,
            }
            for r in results
        ]
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
    return 0 if all(r.complete for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
