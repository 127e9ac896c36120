"""Aggregated Discovery Service over grpc.aio (state of the world).

Follows Envoy's `api/xds_protocol.rst`: versions and nonces per type, ACK and
NACK, stale nonces ignored, named subscriptions remembered so a resource that
appears later is pushed, and pushes ordered make-before-break. The server
reads snapshots from the cache and never builds configuration.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from shoal.xds import cache, resources

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW_METHOD = "StreamAggregatedResources"
KNOWN_TYPES = frozenset(resources.PUSH_ORDER)
# Requests waiting to be handled on one stream. Envoy sends about one request
# per response; a client that floods more than this is misbehaving.
MAX_QUEUED_REQUESTS = 256
MAX_NAMES = 100_000
MAX_NAME_LENGTH = 1024


@dataclass
class TypeState:
    """What one stream has asked for, been sent and acknowledged of one type."""

    type_url: str
    names: frozenset[str] | None  # None: everything (wildcard)
    sent: cache.View | None = None
    sent_version: str = ""
    nonce: str = ""
    in_flight: bool = False
    sent_at: float = 0.0
    acked_version: str = ""
    acked_at: float = 0.0
    nacked_version: str = ""
    error: str = ""


@dataclass
class Connection:
    """One ADS stream of one proxy."""

    stream_id: int
    node_id: str
    cluster: str
    key: str
    peer: str
    connected_at: float
    types: dict[str, TypeState] = field(default_factory=dict)
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: collections.deque[discovery_pb2.DiscoveryRequest] = field(
        default_factory=collections.deque
    )
    closed: bool = False


class StreamError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class AdsServer:
    """Serves snapshots from a cache to every connected proxy."""

    def __init__(
        self,
        snapshots: cache.SnapshotCache,
        *,
        clock: Callable[[], float] = time.time,
        write_timeout: float = 30.0,
    ) -> None:
        self._cache = snapshots
        self._clock = clock
        self._write_timeout = write_timeout
        self._ids = itertools.count(1)
        self.connections: dict[int, Connection] = {}
        self.nacks_total = 0
        self.pushes_total = 0

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(
            self._stream_sotw,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            # Responses are assembled from pre-encoded bytes (see cache.py).
            response_serializer=lambda b: b,
        )
        return grpc.method_handlers_generic_handler(ADS_SERVICE, {SOTW_METHOD: method})

    # -- the stream --------------------------------------------------------

    async def _stream_sotw(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> None:
        try:
            first = await anext(aiter(requests))
        except StopAsyncIteration:
            return
        if not first.HasField("node") or not first.node.id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first request of a stream must carry node.id"
            )
        conn = Connection(
            stream_id=next(self._ids),
            node_id=first.node.id,
            cluster=first.node.cluster,
            key="",
            peer=context.peer(),
            connected_at=self._clock(),
        )
        try:
            watch = self._cache.watch(first.node, conn.wake)
        except ValueError as err:
            log.warning("rejecting proxy %s: %s", first.node.id, err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {first.node.id}: {err}")
        conn.key = watch.key
        self.connections[conn.stream_id] = conn
        log.info("proxy %s connected (stream %d, %s)", conn.node_id, conn.stream_id, conn.peer)
        reader = asyncio.create_task(self._read(requests, conn))
        conn.inbox.append(first)
        try:
            while True:
                while conn.inbox:
                    self._on_request(conn, conn.inbox.popleft())
                snapshot = watch.snapshot
                if snapshot is not None:
                    await self._send_pending(conn, snapshot, context)
                if conn.closed and not conn.inbox:
                    return
                await conn.wake.wait()
                conn.wake.clear()
        except StreamError as err:
            log.warning("proxy %s: %s", conn.node_id, err)
            await context.abort(err.code, str(err))
        finally:
            reader.cancel()
            self._cache.cancel(watch)
            self.connections.pop(conn.stream_id, None)
            log.info("proxy %s disconnected (stream %d)", conn.node_id, conn.stream_id)

    async def _read(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], conn: Connection
    ) -> None:
        try:
            async for request in requests:
                if len(conn.inbox) >= MAX_QUEUED_REQUESTS:
                    conn.inbox.clear()
                    conn.inbox.append(_overflow_marker())
                    conn.wake.set()
                    return
                conn.inbox.append(request)
                conn.wake.set()
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        finally:
            conn.closed = True
            conn.wake.set()

    def _on_request(self, conn: Connection, request: discovery_pb2.DiscoveryRequest) -> None:
        type_url = request.type_url
        if type_url == _OVERFLOW:
            raise StreamError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {MAX_QUEUED_REQUESTS} requests queued without being answered",
            )
        if not type_url:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "a request without type_url")
        if type_url not in KNOWN_TYPES:
            if type_url not in conn.types:
                log.info("proxy %s asked for unserved type %s; ignored", conn.node_id, type_url)
                conn.types[type_url] = TypeState(type_url, names=frozenset())
            return
        _check_names(request)
        state = conn.types.get(type_url)
        if state is None:
            state = conn.types[type_url] = TypeState(type_url, names=None)
            # A reconnecting client says what it already has: if it is still
            # current, there is nothing to send.
            state.sent_version = state.acked_version = request.version_info
        nonce = request.response_nonce
        if nonce:
            if nonce != state.nonce:
                return  # stale: answers a response that has been superseded
            state.in_flight = False
            if request.HasField("error_detail"):
                self._on_nack(conn, state, request)
            else:
                state.acked_version = request.version_info
                state.acked_at = self._clock()
                state.error = ""
                state.nacked_version = ""
        state.names = _subscription(type_url, request.resource_names)

    def _on_nack(
        self, conn: Connection, state: TypeState, request: discovery_pb2.DiscoveryRequest
    ) -> None:
        if state.nacked_version != state.sent_version:
            self.nacks_total += 1
            log.error(
                "proxy %s rejected %s version %s: %s",
                conn.node_id,
                resources.short(state.type_url),
                state.sent_version,
                request.error_detail.message,
            )
        state.nacked_version = state.sent_version
        state.error = request.error_detail.message

    # -- what to send ------------------------------------------------------

    def _desired(self, conn: Connection, state: TypeState, snapshot: cache.Snapshot) -> cache.View:
        view = snapshot.view(state.type_url, state.names)
        if state.names is not None or state.sent is None:
            return view
        # Make before break: a resource the proxy still needs (a route still
        # names the cluster) stays until what needs it has moved on.
        needed = self._referenced_after(conn, state.type_url)
        kept = [
            r
            for r in state.sent.resources
            if r.name not in view.names and (state.type_url, r.name) in needed
        ]
        if not kept:
            return view
        return cache.make_view([*view.resources, *kept])

    def _referenced_after(self, conn: Connection, type_url: str) -> frozenset[tuple[str, str]]:
        later = resources.PUSH_ORDER[resources.PUSH_ORDER.index(type_url) + 1 :]
        refs: set[tuple[str, str]] = set()
        for t in later:
            st = conn.types.get(t)
            if st is not None and st.sent is not None:
                refs |= st.sent.refs
        return frozenset(refs)

    def _waiting_for_subscription(
        self, conn: Connection, upto: str, snapshot: cache.Snapshot
    ) -> bool:
        """True while the proxy has yet to ask for (or receive) a named
        resource that something already sent refers to: a cluster's endpoints
        before any route may send traffic to it."""
        for t in resources.PUSH_ORDER[: resources.PUSH_ORDER.index(upto)]:
            st = conn.types.get(t)
            if t in resources.WILDCARD or (st is not None and st.sent is None):
                continue
            wanted = {
                n
                for (rt, n) in self._sent_refs_before(conn, t)
                if rt == t and snapshot.get(t, n) is not None
            }
            if not wanted:
                continue
            # A type not subscribed to at all is not asked for yet either: a
            # client may ACK clusters before it asks for their endpoints.
            if st is None or st.sent is None or st.names is None or not wanted <= st.sent.names:
                return True
        return False

    def _sent_refs_before(self, conn: Connection, type_url: str) -> frozenset[tuple[str, str]]:
        refs: set[tuple[str, str]] = set()
        for t in resources.PUSH_ORDER[: resources.PUSH_ORDER.index(type_url)]:
            st = conn.types.get(t)
            if st is not None and st.sent is not None:
                refs |= st.sent.refs
        return frozenset(refs)

    async def _send_pending(self, conn: Connection, snapshot: cache.Snapshot, context: Any) -> None:
        for type_url in resources.PUSH_ORDER:
            state = conn.types.get(type_url)
            if state is None:
                continue
            if state.in_flight:
                return  # later types wait for this one's ACK
            if self._waiting_for_subscription(conn, type_url, snapshot):
                return
            view = self._desired(conn, state, snapshot)
            if view.version in (state.sent_version, state.nacked_version):
                continue
            await self._send(conn, state, view, context)
            return

    async def _send(
        self, conn: Connection, state: TypeState, view: cache.View, context: Any
    ) -> None:
        nonce = str(next(conn.nonces))
        body = (
            cache.length_delimited(1, view.version.encode())
            + view.encoded
            + cache.length_delimited(4, state.type_url.encode())
            + cache.length_delimited(5, nonce.encode())
        )
        state.sent = view
        state.sent_version = view.version
        state.nonce = nonce
        state.in_flight = True
        state.sent_at = self._clock()
        self.pushes_total += 1
        log.debug(
            "proxy %s: %s version %s (%d resources, nonce %s)",
            conn.node_id,
            resources.short(state.type_url),
            view.version,
            len(view.resources),
            nonce,
        )
        try:
            await asyncio.wait_for(context.write(body), self._write_timeout)
        except TimeoutError as err:
            raise StreamError(
                grpc.StatusCode.UNAVAILABLE,
                f"not reading its responses for {self._write_timeout:.0f}s; dropped",
            ) from err


_OVERFLOW = "shoal.internal/overflow"


def _overflow_marker() -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(type_url=_OVERFLOW)


def _subscription(type_url: str, names: Any) -> frozenset[str] | None:
    """Legacy wildcard: an empty name list on a wildcard type means all."""
    if type_url in resources.WILDCARD and (not names or "*" in names):
        return None
    return frozenset(names)


def _check_names(request: discovery_pb2.DiscoveryRequest) -> None:
    if len(request.resource_names) > MAX_NAMES:
        raise StreamError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{len(request.resource_names)} resource names in one request (limit {MAX_NAMES})",
        )
    for name in request.resource_names:
        if len(name) > MAX_NAME_LENGTH:
            raise StreamError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a resource name of {len(name)} characters (limit {MAX_NAME_LENGTH})",
            )
