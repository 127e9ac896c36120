"""The client fleet: simulated Envoy sidecars, one grpc.aio channel and one
ADS stream each, run in worker processes (Fleet, worker_main) that the
coordinator drives (Workers) with one JSON command a line on stdin: connect,
mark, wait_push, close, cpu, quit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2

from shoal.xds.translate import names, secrets

from . import mesh, processes, wire

CLIENT_OPTIONS = [
    # Channels in one process otherwise share one TCP connection per target;
    # every Envoy has its own.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 1 << 28),
    ("grpc.enable_retries", 0),
]
WORKER_REPLY_SLACK_S = 30.0

KIND_BITS = {wire.CDS: 1, wire.EDS: 2, wire.LDS: 4, wire.RDS: 8, wire.SDS: 16}
OUTBOUND_PREFIX = "outbound|"
ROUTE_NAMES = (names.OUTBOUND_ROUTE,)
# With mTLS every sidecar cluster and listener names these two secrets (by
# Istio's names), so a proxy asks for them with its first clusters, as Envoy
# does, without reading the clusters' transport sockets.
SECRET_NAMES = tuple(sorted((secrets.WORKLOAD, secrets.TRUST_BUNDLE)))


# -- in a worker process ---------------------------------------------------------


class Proxy:
    """One sidecar: one channel, one ADS stream."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.node = mesh.node_bytes(index, fleet.services)
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
                f"/{wire.ADS_SERVICE}/{wire.ADS_METHODS[fleet.mode]}",
                request_serializer=wire.identity,
                response_deserializer=wire.identity,
            )()
            delta = fleet.mode == "delta"
            if delta:
                await call.write(wire.delta_request(wire.CDS, node=self.node))
                await call.write(wire.delta_request(wire.LDS))
            else:
                await call.write(wire.sotw_request(wire.CDS, node=self.node))
                await call.write(wire.sotw_request(wire.LDS))
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
        msg = wire.RawResponse.FromString(body)
        type_url = msg.type_url
        await call.write(wire.delta_request(type_url, nonce=msg.nonce))
        if type_url == wire.CDS:
            fleet = self.fleet
            known = fleet.names_memo.get
            new = []
            for r in msg.resources:
                n = known(r) or fleet.resource_name(r)
                if n not in self.eds and n.startswith(OUTBOUND_PREFIX):
                    new.append(n)
            if new:
                self.eds.update(new)
                await call.write(
                    wire.delta_request(wire.EDS, encoded_names=fleet.encoded_names(tuple(new)))
                )
            if fleet.secrets and not self.sds:
                self.sds = True
                await call.write(
                    wire.delta_request(wire.SDS, encoded_names=fleet.encoded_names(SECRET_NAMES))
                )
        elif type_url == wire.LDS and not self.rds:
            self.rds = True
            await call.write(
                wire.delta_request(wire.RDS, encoded_names=self.fleet.encoded_names(ROUTE_NAMES))
            )
        self._received(type_url, body)

    async def _on_sotw(self, call: Any, body: bytes) -> None:
        msg = wire.RawResponse.FromString(body)
        type_url = msg.type_url
        version, nonce = msg.version_info, msg.nonce
        fleet = self.fleet
        if type_url == wire.CDS:
            await call.write(wire.sotw_request(wire.CDS, version=version, nonce=nonce))
            known = fleet.names_memo.get
            found = [known(r) or fleet.cluster_name(r) for r in msg.resources]
            eds = tuple(sorted(n for n in found if n.startswith(OUTBOUND_PREFIX)))
            if eds != self.eds_sorted:
                self.eds_sorted = eds
                await call.write(
                    wire.sotw_request(
                        wire.EDS,
                        version=self.eds_version,
                        nonce=self.eds_nonce,
                        encoded_names=fleet.encoded_names(eds),
                    )
                )
            if fleet.secrets and not self.sds:
                self.sds = True
                await call.write(
                    wire.sotw_request(wire.SDS, encoded_names=fleet.encoded_names(SECRET_NAMES))
                )
        elif type_url == wire.EDS:
            self.eds_version, self.eds_nonce = version, nonce
            await call.write(
                wire.sotw_request(
                    wire.EDS,
                    version=version,
                    nonce=nonce,
                    encoded_names=fleet.encoded_names(self.eds_sorted),
                )
            )
        elif type_url in (wire.LDS, wire.HELLO):
            await call.write(wire.sotw_request(type_url, version=version, nonce=nonce))
            if type_url == wire.LDS and not self.rds:
                self.rds = True
                await call.write(
                    wire.sotw_request(wire.RDS, encoded_names=fleet.encoded_names(ROUTE_NAMES))
                )
        else:
            asked = SECRET_NAMES if type_url == wire.SDS else ROUTE_NAMES
            await call.write(
                wire.sotw_request(
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
        if type_url == wire.EDS:
            self.eds_seen += 1
            if self.eds_seen == self.eds_mark + 1:
                self.push_at = now
                fleet.pushed(self, body)
        if not self.done_at:
            self.kinds |= KIND_BITS.get(type_url, 0)
            if self.kinds == fleet.all_kinds or type_url == wire.HELLO:
                self.done_at = now
                fleet.connected()


class Recorded(Proxy):
    """A proxy that keeps what it was sent while connecting: the size of each
    response, and the first response of each type (for a floor that replays
    them: see floor.ReplayFloor)."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        super().__init__(fleet, index)
        self.sizes: list[tuple[str, int]] = []
        self.bodies: dict[str, bytes] = {}

    def _received(self, type_url: str, body: bytes) -> None:
        if not self.done_at:
            self.sizes.append((type_url, len(body)))
            self.bodies.setdefault(type_url, body)
        super()._received(type_url, body)


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
        return self._name(body, lambda b: str(wire.RawResource.FromString(b).name))

    def cluster_name(self, body: bytes) -> str:
        """The name of the Cluster in an Any."""
        return self._name(
            body, lambda b: cluster_pb2.Cluster.FromString(any_pb2.Any.FromString(b).value).name
        )

    def encoded_names(self, items: tuple[str, ...]) -> bytes:
        found = self._names.get(items)
        if found is None:
            found = self._names[items] = wire.encode_names(items)
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
        self.configure(cmd)
        return await self.add(int(cmd["first"]), int(cmd["count"]), float(cmd["timeout"]))

    def configure(self, cmd: dict[str, Any]) -> None:
        """Where and how proxies connect from now on: `cmd`'s target, mode,
        services, tls (PEM text or None) and floor."""
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
        self.all_kinds = sum(KIND_BITS[t] for t in (wire.CDS, wire.EDS, wire.LDS, wire.RDS))
        if self.secrets:
            self.all_kinds |= KIND_BITS[wire.SDS]
        self.errors = []

    async def add(
        self,
        first: int,
        count: int,
        timeout: float,
        make: Callable[[Fleet, int], Proxy] = Proxy,
    ) -> dict[str, Any]:
        """Connect proxies `first`..`first + count - 1` (`make` builds each),
        leaving those already connected as they are, and wait until all of
        them are connected or `timeout` seconds pass."""
        added = [make(self, i) for i in range(first, first + count)]
        self.proxies.extend(added)
        self._to_connect = count
        self._connected = asyncio.Event()
        if count == 0:
            self._connected.set()
        for p in added:
            p.task = asyncio.create_task(p.run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        done = [p.done_at for p in added if p.done_at]
        return {
            "connected": len(done),
            "last_at": max(done, default=0.0),
            "errors": self.errors,
        }

    async def remove(self, proxy: Proxy) -> None:
        """End one proxy's stream and close its channel; the others stay."""
        if proxy in self.proxies:
            self.proxies.remove(proxy)
        if proxy.task is not None:
            proxy.task.cancel()
            await asyncio.gather(proxy.task, return_exceptions=True)
        if proxy.channel is not None:
            await proxy.channel.close()

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
    processes.raise_open_files()
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


# -- the coordinator's side ----------------------------------------------------


class Worker:
    """A worker process, as the coordinator drives it."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr

    async def call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout + WORKER_REPLY_SLACK_S)
        if not line:
            raise RuntimeError(
                f"worker {self.proc.pid} died; stderr:\n{processes.tail(self.stderr)}"
            )
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.proc.pid}: {reply['error']}")
        return reply


class Workers:
    """Every worker process of a run, each with its share of the proxies."""

    def __init__(self, workers: list[Worker]) -> None:
        self.all = workers

    @classmethod
    async def start(cls, count: int, logs: Path) -> Workers:
        workers = []
        for k in range(count):
            err = logs / f"worker-{k}.err"
            with err.open("wb") as e:
                proc = processes.CHILDREN.add(
                    await asyncio.create_subprocess_exec(
                        processes.PYTHON,
                        str(processes.ENTRY),
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
            await processes.CHILDREN.stop(w.proc, grace=5.0)
