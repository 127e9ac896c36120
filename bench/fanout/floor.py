"""The floor: a bare grpc.aio server, with shoal's gRPC options and the same
TLS, that holds every stream and, on SIGUSR1, writes the same pre-serialized
response to each: what the fan-out would cost if the server did nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from shoal.xds import server as ads_server

from . import harness, processes, wire

# Shoal's own, so the floor holds as many streams the same way.
SERVER_OPTIONS = ads_server.GRPC_OPTIONS


class Floor:
    """Holds streams; on SIGUSR1 writes the bytes of `body_file` to every one."""

    def __init__(self, body_file: Path) -> None:
        self._body_file = body_file
        self._body = b""
        self._wakes: set[asyncio.Event] = set()
        self._hello = discovery_pb2.DeltaDiscoveryResponse(
            type_url=wire.HELLO, nonce="0"
        ).SerializeToString()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=wire.identity, response_serializer=wire.identity
        )
        return grpc.method_handlers_generic_handler(
            wire.ADS_SERVICE, {name: method for name in wire.ADS_METHODS.values()}
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


async def floor_main(port: int, body_file: Path, tls: Path | None) -> None:
    """`tls`: a folder of cert.pem, key.pem and roots.pem (plain text without)."""
    floor = Floor(body_file)
    await _serve(port, floor.handler(), tls, on_usr1=floor.push)


async def _serve(
    port: int,
    handler: grpc.GenericRpcHandler,
    tls: Path | None,
    on_usr1: Callable[[], None] | None = None,
) -> None:
    """Serve `handler` with shoal's gRPC options until SIGINT or SIGTERM."""
    processes.raise_open_files()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    address = f"127.0.0.1:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, _credentials(tls))
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if on_usr1 is not None:
        loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    print(f"floor: listening on 127.0.0.1:{bound}", flush=True)
    await stop.wait()
    await server.stop(grace=0.5)


def _credentials(folder: Path) -> grpc.ServerCredentials:
    # As shoal serves xDS: its own certificate, client certificates required.
    return grpc.ssl_server_credentials(
        [((folder / "key.pem").read_bytes(), (folder / "cert.pem").read_bytes())],
        root_certificates=(folder / "roots.pem").read_bytes(),
        require_client_auth=True,
    )


class ReplayFloor:
    """A bare grpc.aio server that hands a new stream a whole configuration
    recorded from shoal: each subscription (a request without a response
    nonce, of a type not yet answered on the stream) is answered with the
    recorded response of its type, as bytes; ACKs are read and dropped.
    Requests are parsed into the same messages shoal's server parses, so
    what is left is gRPC, TLS, parsing and writing: what handing a proxy its
    configuration would cost a server that had it ready."""

    def __init__(self, bodies: dict[str, bytes]) -> None:
        self._bodies = bodies

    def handler(self) -> grpc.GenericRpcHandler:
        sotw = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=wire.identity,
        )
        delta = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=wire.identity,
        )
        return grpc.method_handlers_generic_handler(
            wire.ADS_SERVICE,
            {wire.ADS_METHODS["sotw"]: sotw, wire.ADS_METHODS["delta"]: delta},
        )

    async def _stream(self, requests: AsyncIterator[Any], context: Any) -> None:
        answered: set[str] = set()
        async for request in requests:
            type_url = request.type_url
            if request.response_nonce or type_url in answered:
                continue
            body = self._bodies.get(type_url)
            if body is not None:
                answered.add(type_url)
                await context.write(body)


def write_bodies(folder: Path, bodies: dict[str, bytes]) -> Path:
    """Recorded responses by type URL, for replay_main."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (type_url, body) in enumerate(sorted(bodies.items())):
        (folder / f"{k}.type").write_text(type_url)
        (folder / f"{k}.body").write_bytes(body)
    return folder


def read_bodies(folder: Path) -> dict[str, bytes]:
    return {
        t.read_text(): t.with_suffix(".body").read_bytes() for t in sorted(folder.glob("*.type"))
    }


async def replay_main(port: int, bodies: Path, tls: Path | None) -> None:
    """A ReplayFloor of the responses in `bodies` (write_bodies), until
    SIGINT or SIGTERM; `tls` as for floor_main."""
    await _serve(port, ReplayFloor(read_bodies(bodies)).handler(), tls)


async def start_replay(
    work: Path, tag: str, bodies: dict[str, bytes], tls: harness.Tls
) -> tuple[asyncio.subprocess.Process, int]:
    """A replay floor in its own process (bench/fanout.py --replay-server),
    with the same TLS as shoal; the process and its port."""
    served = write_bodies(work / f"replay-bodies-{tag}", bodies)
    return await start(
        work, f"replay-{tag}", "--replay-server", ["--replay-bodies", str(served)], tls
    )


async def start(
    work: Path, name: str, server_flag: str, flags: list[str], tls: harness.Tls
) -> tuple[asyncio.subprocess.Process, int]:
    """A floor server in its own process (bench/fanout.py `server_flag`
    PORT `flags`), with the same TLS as shoal; the process and its port."""
    port = processes.free_port()
    command = [processes.PYTHON, str(processes.ENTRY), server_flag, str(port), *flags]
    if tls.enabled:
        command += ["--floor-tls", str(tls.write_server(work / f"{name}-tls"))]
    proc, _ = await processes.start_process(command, work, name, "floor: listening")
    return proc, port
