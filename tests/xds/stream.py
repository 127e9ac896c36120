"""A test client for one ADS stream, either protocol: a background task reads
every response into a queue, so waiting for "nothing" never cancels a read
(which would cancel the RPC)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from google.rpc import status_pb2

# Long enough for a debounced push on a loaded machine, short enough to fail fast.
PUSH_TIMEOUT = 30.0
# How long a stream must stay silent to count as "nothing sent".
QUIET = 0.5

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class StreamClient(Generic[Req, Resp]):
    def __init__(
        self,
        call: Any,
        first_node: base_pb2.Node | None,
        response_type: type[Resp],
        describe: Callable[[Resp], str],
    ) -> None:
        self.call = call
        self.sent: list[Req] = []
        self._node = first_node
        self._response_type = response_type
        self._describe = describe
        self._inbox: asyncio.Queue[Resp | grpc.aio.AioRpcError | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    self._inbox.put_nowait(None)
                    return
                self._inbox.put_nowait(message)
        except grpc.aio.AioRpcError as err:
            self._inbox.put_nowait(err)

    async def close(self) -> None:
        self._reader.cancel()
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
            await self._reader

    async def send(self, req: Any, error: str | None = None) -> None:
        """The node goes on the first request only, as Envoy sends it."""
        if not self.sent and self._node is not None:
            req.node.CopyFrom(self._node)
        if error is not None:
            req.error_detail.CopyFrom(
                status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=error)
            )
        self.sent.append(req)
        await self.call.write(req)

    async def recv(self, timeout: float = PUSH_TIMEOUT) -> Resp:
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        assert item is not None, "the server ended the stream"
        return item

    async def expect_nothing(self, within: float = QUIET) -> None:
        try:
            item = await asyncio.wait_for(self._inbox.get(), within)
        except TimeoutError:
            return
        if isinstance(item, self._response_type):
            raise AssertionError(f"unexpected response: {self._describe(item)}")
        raise AssertionError(f"unexpected end of stream: {item!r}")

    async def status(self) -> grpc.aio.AioRpcError:
        """Wait for the server to end the stream with an error."""
        item = await asyncio.wait_for(self._inbox.get(), PUSH_TIMEOUT)
        assert isinstance(item, grpc.aio.AioRpcError), f"expected an error, got {item!r}"
        return item


C = TypeVar("C", bound=StreamClient[Any, Any])


@contextlib.asynccontextmanager
async def open_stream(
    port: int, make: Callable[[grpc.aio.Channel], C], channel: grpc.aio.Channel | None = None
) -> AsyncIterator[C]:
    """A client on its own channel (its own connection, as every Envoy has;
    plain text unless `channel` is given); both closed after."""
    channel = channel or grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        client = make(channel)
        try:
            yield client
        finally:
            await client.close()
    finally:
        await channel.close()


class Converging(Generic[Resp]):
    """For a simulated proxy with a `client` and a `handle(response)` that
    acts on each response as Envoy would."""

    client: StreamClient[Any, Resp]

    async def handle(self, response: Resp) -> None:
        raise NotImplementedError

    async def step(self, timeout: float = PUSH_TIMEOUT) -> Resp:
        response = await self.client.recv(timeout)
        await self.handle(response)
        return response

    async def until(
        self, done: Callable[[Resp], bool], timeout: float = PUSH_TIMEOUT
    ) -> list[Resp]:
        """Handle responses until one satisfies `done`; return them all."""
        seen: list[Resp] = []
        async with asyncio.timeout(timeout):
            while True:
                response = await self.step()
                seen.append(response)
                if done(response):
                    return seen
