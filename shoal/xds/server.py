"""Aggregated Discovery Service over grpc.aio: state of the world and delta.

Follows Envoy's `api/xds_protocol.rst`: versions and nonces per type, ACK and
NACK, stale nonces ignored, named subscriptions remembered so a resource that
appears later is pushed, and pushes ordered make-before-break. Both protocol
variants share one per-type state machine; they differ only in how a change
is put on the wire. The server reads snapshots from the cache and never
builds configuration.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2

from shoal.xds import cache, resources

log = logging.getLogger(__name__)

# The gRPC server an AdsServer runs in. Thousands of sidecars each hold one
# stream; gRPC's default cap on pending calls would refuse the ones past
# about a thousand.
GRPC_OPTIONS = [
    ("grpc.max_concurrent_streams", 1 << 20),
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SOTW_METHOD = "StreamAggregatedResources"
DELTA_METHOD = "DeltaAggregatedResources"
KNOWN_TYPES = frozenset(resources.PUSH_ORDER)
# Requests waiting to be handled on one stream. Envoy sends about one request
# per response; a client that floods more than this is misbehaving.
MAX_QUEUED_REQUESTS = 256
MAX_NAMES = 100_000
MAX_NAME_LENGTH = 1024
_EMPTY = cache.View("", ())


@dataclass
class TypeState:
    """What one stream has asked for, been sent and acknowledged of one type."""

    type_url: str
    wildcard: bool
    names: frozenset[str] = frozenset()
    # What the client holds (its last ACKed state) and what is on its way.
    held: cache.View = _EMPTY
    pending: cache.View | None = None
    nonce: str = ""
    sent_version: str = ""
    sent_at: float = 0.0
    acked_version: str = ""
    acked_at: float = 0.0
    nacked_version: str = ""
    error: str = ""
    # Delta: subscribed names already reported as absent.
    told_absent: frozenset[str] = frozenset()

    @property
    def in_flight(self) -> bool:
        return self.pending is not None

    @property
    def subscription(self) -> frozenset[str] | None:
        """None for everything (wildcard)."""
        return None if self.wildcard else self.names


@dataclass
class Connection:
    """One ADS stream of one proxy."""

    stream_id: int
    node_id: str
    cluster: str
    key: str
    peer: str
    delta: bool
    connected_at: float
    types: dict[str, TypeState] = field(default_factory=dict)
    nonces: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: collections.deque[Any] = field(default_factory=collections.deque)
    closed: bool = False
    watch: cache.Watch | None = None

    @property
    def snapshot(self) -> cache.Snapshot | None:
        return self.watch.snapshot if self.watch is not None else None


class StreamError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Listener(Protocol):
    """Told of what happens on streams (metrics, logs of a fleet)."""

    def pushed(self, type_url: str, resources: int, delta: bool) -> None: ...
    def nacked(self, type_url: str) -> None: ...


class _NoListener:
    def pushed(self, type_url: str, resources: int, delta: bool) -> None:
        pass

    def nacked(self, type_url: str) -> None:
        pass


@dataclass(frozen=True)
class Diff:
    changed: tuple[cache.Resource, ...]
    removed: tuple[str, ...]
    # A composite's diff is its parts' diffs, whose encodings are shared.
    pieces: tuple[Diff, ...] = ()

    @functools.cached_property
    def encoded(self) -> bytes:
        """The `resources` fields of a delta response carrying `changed`."""
        if self.pieces:
            return b"".join(p.encoded for p in self.pieces)
        if len(self.changed) == 1:
            return self.changed[0].delta_field  # the resource's own bytes, not a copy
        return b"".join(r.delta_field for r in self.changed)


class AdsServer:
    """Serves snapshots from a cache to every connected proxy."""

    def __init__(
        self,
        snapshots: cache.SnapshotCache,
        *,
        clock: Callable[[], float] = time.time,
        write_timeout: float = 30.0,
        listener: Listener | None = None,
    ) -> None:
        self._cache = snapshots
        self._clock = clock
        self._write_timeout = write_timeout
        self._listener = listener or _NoListener()
        self._ids = itertools.count(1)
        self.connections: dict[int, Connection] = {}
        self.nacks_total = 0
        self.pushes_total = 0
        # Work shared by every stream that is in the same place: the same
        # diff between two views, the same names a set of clusters needs.
        self._diffs: dict[tuple[cache.View, cache.View], Diff] = {}
        self._flat_diffs: dict[tuple[cache.View, cache.View], tuple[Diff, frozenset[str]]] = {}
        # What reconnecting proxies say they hold, by content: a thousand
        # proxies of one scope hold the same, and share one view of it.
        self._held_views: dict[str, cache.View] = {}
        self._absents: dict[tuple[frozenset[str], cache.View], frozenset[str]] = {}
        self._subscriptions: dict[frozenset[str], frozenset[str]] = {}
        self._wanted: dict[
            tuple[str, cache.View, tuple[cache.ResourceGroup, ...]], frozenset[str]
        ] = {}

    def handler(self) -> grpc.GenericRpcHandler:
        sotw = grpc.stream_stream_rpc_method_handler(
            self._stream_sotw,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            # Responses are assembled from pre-encoded bytes (see cache.py).
            response_serializer=_identity,
        )
        delta = grpc.stream_stream_rpc_method_handler(
            self._stream_delta,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=_identity,
        )
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE, {SOTW_METHOD: sotw, DELTA_METHOD: delta}
        )

    # -- the stream --------------------------------------------------------

    async def _stream_sotw(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._stream(requests, context, delta=False)

    async def _stream_delta(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._stream(requests, context, delta=True)

    async def _stream(self, requests: AsyncIterator[Any], context: Any, *, delta: bool) -> None:
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
            delta=delta,
            connected_at=self._clock(),
        )
        try:
            client = cache.Client(first.node, peer_identity(context))
            conn.watch = self._cache.watch(client, conn.wake)
        except PermissionError as err:
            log.warning("refusing proxy %s: %s", first.node.id, err)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"node {first.node.id}: {err}")
        except ValueError as err:
            log.warning("rejecting proxy %s: %s", first.node.id, err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node {first.node.id}: {err}")
        assert conn.watch is not None
        conn.key = conn.watch.key
        self.connections[conn.stream_id] = conn
        log.info(
            "proxy %s connected (stream %d, %s, %s)",
            conn.node_id,
            conn.stream_id,
            "delta" if delta else "state of the world",
            conn.peer,
        )
        reader = asyncio.create_task(self._read(requests, conn))
        conn.inbox.append(first)
        on_request = self._on_delta_request if delta else self._on_sotw_request
        try:
            while True:
                while conn.inbox:
                    request = conn.inbox.popleft()
                    if request is _OVERFLOW:
                        raise StreamError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"more than {MAX_QUEUED_REQUESTS} requests queued without answer",
                        )
                    on_request(conn, request)
                snapshot = conn.snapshot
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
            self._cache.cancel(conn.watch)
            self.connections.pop(conn.stream_id, None)
            log.info("proxy %s disconnected (stream %d)", conn.node_id, conn.stream_id)

    async def _read(self, requests: AsyncIterator[Any], conn: Connection) -> None:
        try:
            async for request in requests:
                if len(conn.inbox) >= MAX_QUEUED_REQUESTS:
                    conn.inbox.clear()
                    conn.inbox.append(_OVERFLOW)
                    conn.wake.set()
                    return
                conn.inbox.append(request)
                conn.wake.set()
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        finally:
            conn.closed = True
            conn.wake.set()

    # -- requests ------------------------------------------------------------

    def _intern(self, names: Iterable[str]) -> frozenset[str]:
        """One object per distinct subscription: a thousand sidecars asking
        for the same thousand names share one set, and the views and diffs
        memoized on it are found by identity."""
        key = frozenset(names)
        found = self._subscriptions.get(key)
        if found is None:
            if len(self._subscriptions) > 10_000:
                self._subscriptions.clear()
            found = self._subscriptions[key] = key
        return found

    def _serves(self, conn: Connection, type_url: str) -> bool:
        """Whether this server serves the type; an unknown one is noted once."""
        if not type_url:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "a request without type_url")
        if type_url in KNOWN_TYPES:
            return True
        if type_url not in conn.types:
            log.info("proxy %s asked for unserved type %s; ignored", conn.node_id, type_url)
            conn.types[type_url] = TypeState(type_url, wildcard=False)
        return False

    def _on_sotw_request(self, conn: Connection, request: Any) -> None:
        type_url = request.type_url
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "proxy %s asks %s version %r nonce %r for %d names%s",
                conn.node_id,
                resources.short(type_url),
                request.version_info,
                request.response_nonce,
                len(request.resource_names),
                " (NACK)" if request.HasField("error_detail") else "",
            )
        _check_names(request.resource_names)
        if not self._serves(conn, type_url):
            return
        names = request.resource_names
        # Legacy wildcard: an empty name list on LDS or CDS means everything.
        wildcard = type_url in resources.WILDCARD and (not names or "*" in names)
        state = conn.types.get(type_url)
        if state is None:
            state = conn.types[type_url] = TypeState(type_url, wildcard, self._intern(names))
            snapshot = conn.snapshot
            if request.version_info and snapshot is not None:
                # A reconnecting client says what it already has: if that is
                # still current, there is nothing to send.
                current = snapshot.view(type_url, state.subscription)
                if current.version == request.version_info:
                    state.held = current
                    state.acked_version = current.version
        nonce = request.response_nonce
        if nonce:
            if nonce != state.nonce:
                return  # stale: answers a response that has been superseded
            self._on_answer(conn, state, request)
        state.wildcard = wildcard
        if state.names != frozenset(names):
            state.names = self._intern(names)

    def _on_delta_request(self, conn: Connection, request: Any) -> None:
        type_url = request.type_url
        _check_names(request.resource_names_subscribe)
        _check_names(request.resource_names_unsubscribe)
        if not self._serves(conn, type_url):
            return
        state = conn.types.get(type_url)
        first = state is None
        if state is None:
            # Legacy wildcard: a first request naming nothing on LDS or CDS.
            wildcard = type_url in resources.WILDCARD and not request.resource_names_subscribe
            state = conn.types[type_url] = TypeState(type_url, wildcard=wildcard)
            if request.initial_resource_versions:
                _check_names(request.initial_resource_versions)
                held = cache.make_view(
                    cache.Resource(type_url, name, b"", version)
                    for name, version in request.initial_resource_versions.items()
                )
                if len(self._held_views) > 1024:
                    self._held_views.clear()
                state.held = self._held_views.setdefault(f"{type_url}|{held.version}", held)
        # Subscription changes are deltas and apply whatever the nonce; only
        # the ACK or NACK is tied to the latest response.
        if request.response_nonce and request.response_nonce == state.nonce:
            self._on_answer(conn, state, request)
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        if "*" in subscribe:
            state.wildcard = True
        if "*" in unsubscribe:
            state.wildcard = False
        if subscribe or unsubscribe:
            state.names = self._intern((state.names | subscribe) - unsubscribe - {"*"})
            state.told_absent -= subscribe
            # The client forgets what it unsubscribed from. A name it
            # subscribes to again must be sent again, even unchanged: it may
            # have forgotten it (xds_protocol.rst, "Subscribing to
            # Resources"); not on the first request, whose
            # initial_resource_versions say what it does hold.
            dropped = set() if state.wildcard else unsubscribe & state.held.names
            if not first:
                dropped |= subscribe & state.held.names
            if dropped:
                state.held = _without(state.held, dropped)
                if state.pending is not None:
                    # Not restored by the ACK of a response already sent.
                    state.pending = _without(state.pending, dropped)

    def _on_answer(self, conn: Connection, state: TypeState, request: Any) -> None:
        """The request answers our latest response of its type: ACK or NACK."""
        sent = state.pending
        state.pending = None
        now = self._clock()
        if request.HasField("error_detail"):
            if state.nacked_version != state.sent_version:
                self.nacks_total += 1
                self._listener.nacked(state.type_url)
                log.error(
                    "proxy %s rejected %s version %s: %s",
                    conn.node_id,
                    resources.short(state.type_url),
                    state.sent_version,
                    request.error_detail.message,
                )
            state.nacked_version = state.sent_version
            state.error = request.error_detail.message
            return
        if sent is not None:
            state.held = sent
        state.acked_version = state.held.version
        state.acked_at = now
        state.error = ""
        state.nacked_version = ""

    # -- what to send ------------------------------------------------------

    def _desired(self, conn: Connection, state: TypeState, snapshot: cache.Snapshot) -> cache.View:
        view = snapshot.view(state.type_url, state.subscription)
        if not state.wildcard or view.version == state.held.version:
            return view
        removed = self._diff(state.held, view).removed
        if not removed:
            return view
        # Make before break: a resource the proxy still needs (a route still
        # names the cluster) stays until what needs it has moved on.
        held_elsewhere = self._held_refs(conn, resources.later_than(state.type_url))
        gone = set(removed)
        kept = [
            r
            for r in state.held.resources
            if r.name in gone and (state.type_url, r.name) in held_elsewhere
        ]
        if not kept:
            return view
        if len(kept) == len(removed) and not self._diff(state.held, view).changed:
            return state.held  # nothing may go yet, and nothing else changed
        return cache.make_view([*view.resources, *kept])

    @staticmethod
    def _held_refs(conn: Connection, types: Iterable[str]) -> AbstractSet[tuple[str, str]]:
        refs: AbstractSet[tuple[str, str]] = frozenset()
        for t in types:
            st = conn.types.get(t)
            if st is not None and st.held.refs:
                refs = refs | st.held.refs if refs else st.held.refs
        return refs

    def _waiting_for_subscription(
        self, conn: Connection, upto: str, snapshot: cache.Snapshot
    ) -> bool:
        """True while the proxy has yet to ask for (or receive) a named
        resource that something it already holds refers to: a cluster's
        endpoints before any route may send traffic to it. A client may ACK
        clusters before it asks for their endpoints, so a type not yet
        subscribed to counts as not asked for."""
        for t in resources.earlier_than(upto):
            if t in resources.WILDCARD:
                continue
            st = conn.types.get(t)
            wanted = self._wanted_names(conn, t, snapshot)
            if not wanted:
                continue
            if st is None or not (st.wildcard or wanted <= st.names):
                return True
            if not wanted <= st.held.names:
                return True
        return False

    def _wanted_names(self, conn: Connection, t: str, snapshot: cache.Snapshot) -> AbstractSet[str]:
        """Names of type `t` that what the client holds refers to and that
        exist. Worked out per shared part of what it holds (every proxy of
        a scope holds the same cluster group), so no stream keeps a copy."""
        groups = tuple(snapshot.groups.get(t, ()))
        found: list[frozenset[str]] = []
        for e in resources.earlier_than(t):
            st = conn.types.get(e)
            if st is None or not st.held.refs:
                continue
            for part in st.held.parts or (st.held,):
                key = (t, part, groups)
                names = self._wanted.get(key)
                if names is None:
                    names = frozenset(
                        n
                        for (rt, n) in part.refs
                        if rt == t and any(g.get(n) is not None for g in groups)
                    )
                    if len(self._wanted) > 4096:
                        self._wanted.clear()
                    self._wanted[key] = names
                if names:
                    found.append(names)
        if len(found) == 1:
            return found[0]
        return cache.UnionSet(tuple(found))

    async def _send_pending(self, conn: Connection, snapshot: cache.Snapshot, context: Any) -> None:
        held_back = False
        for type_url in resources.PUSH_ORDER:
            state = conn.types.get(type_url)
            if state is None:
                continue
            if state.in_flight:
                # Listeners and routes wait for this one's ACK; endpoints and
                # secrets do not: Envoy may ACK clusters only once they warm,
                # and they warm on exactly those.
                held_back = held_back or type_url not in resources.WARMING
                continue
            if held_back and type_url not in resources.WARMING:
                continue
            view = self._desired(conn, state, snapshot)
            if view.version == state.nacked_version:
                continue
            if view.version == state.held.version and not (
                conn.delta and self._absent(state, view)
            ):
                continue
            if self._waiting_for_subscription(conn, type_url, snapshot):
                return
            if conn.delta:
                if not await self._send_delta(conn, state, view, context):
                    continue
            else:
                await self._send_sotw(conn, state, view, context)
            return

    def _absent(self, state: TypeState, view: cache.View) -> frozenset[str]:
        """Delta: names asked for that do not exist and that the client has
        not been told of yet. Worked out once per subscription and view for
        all streams: subscriptions are interned and views shared, so a
        thousand sidecars asking for the same names cost one difference."""
        if state.wildcard or not state.names:
            return frozenset()
        key = (state.names, view)
        absent = self._absents.get(key)
        if absent is None:
            absent = state.names - view.names
            if len(self._absents) > 4096:
                self._absents.clear()
            self._absents[key] = absent
        return absent - state.told_absent if state.told_absent else absent

    async def _send_sotw(
        self, conn: Connection, state: TypeState, view: cache.View, context: Any
    ) -> None:
        nonce = str(next(conn.nonces))
        body = (
            cache.length_delimited(1, view.version.encode())
            + view.encoded
            + cache.length_delimited(4, state.type_url.encode())
            + cache.length_delimited(5, nonce.encode())
        )
        await self._write(conn, state, view, nonce, body, len(view.resources), context)

    def _diff(self, held: cache.View, want: cache.View) -> Diff:
        """What changes from `held` to `want`; done part by part when both
        are made of parts, so streams sharing parts share the work."""
        key = (held, want)
        found = self._diffs.get(key)
        if found is not None:
            return found
        if want.parts and (len(held.parts) == len(want.parts) or not (held.parts or held.own)):
            # Part by part (a first response: each part from nothing), and
            # only the parts' diffs are kept: they are shared by every
            # stream of a scope, the composite's are one stream's.
            befores = held.parts or (_EMPTY,) * len(want.parts)
            pieces = tuple(self._diff(h, w) for h, w in zip(befores, want.parts, strict=True))
            changed = tuple(itertools.chain.from_iterable(p.changed for p in pieces))
            removed = {n for p in pieces for n in p.removed}
            if removed:
                # A name may move between parts: removed from one, added to another.
                removed -= {r.name for r in changed}
            return Diff(changed, tuple(sorted(removed)), pieces)
        elif want.parts and not held.parts:
            # What a reconnecting proxy holds (its initial_resource_versions,
            # interned, so shared by every proxy of a scope) against each
            # shared part: worked out once per part, not per stream.
            flat = [self._diff_from_flat(held, w) for w in want.parts]
            pieces = tuple(d for d, _ in flat)
            changed = tuple(itertools.chain.from_iterable(p.changed for p in pieces))
            gone: set[str] = set()
            if sum(len(c) for _, c in flat) != len(held.own):
                gone = set(held.versions)
                for _, covered in flat:
                    gone -= covered
            return Diff(changed, tuple(sorted(gone)), pieces)
        else:
            before = held.versions
            changed = tuple(r for r in want.resources if before.get(r.name) != r.version)
            found = Diff(changed, tuple(sorted(before.keys() - want.names)))
        if held.parts or want.parts:
            return found  # one stream's; not worth keeping
        if len(self._diffs) > 4096:
            self._diffs.clear()
        self._diffs[key] = found
        return found

    def _diff_from_flat(self, held: cache.View, part: cache.View) -> tuple[Diff, frozenset[str]]:
        """The resources of `part` that `held` lacks or has at another
        version, and the names of `held` that `part` has."""
        key = (held, part)
        found = self._flat_diffs.get(key)
        if found is None:
            before = held.versions
            changed = tuple(r for r in part.own if before.get(r.name) != r.version)
            covered = frozenset(n for n in before if n in part.names)
            found = (Diff(changed, ()), covered)
            if len(self._flat_diffs) > 4096:
                self._flat_diffs.clear()
            self._flat_diffs[key] = found
        return found

    async def _send_delta(
        self, conn: Connection, state: TypeState, view: cache.View, context: Any
    ) -> bool:
        diff = self._diff(state.held, view)
        absent = self._absent(state, view)
        removed = sorted({*diff.removed, *absent})
        if not diff.changed and not removed:
            state.held = view  # the same content under another version
            state.acked_version = view.version
            return False
        state.told_absent |= absent | (frozenset(diff.removed) & state.names)
        nonce = str(next(conn.nonces))
        body = b"".join(
            (
                cache.length_delimited(1, view.version.encode()),
                diff.encoded,
                cache.length_delimited(4, state.type_url.encode()),
                *(cache.length_delimited(6, name.encode()) for name in removed),
                cache.length_delimited(5, nonce.encode()),
            )
        )
        await self._write(conn, state, view, nonce, body, len(diff.changed), context)
        return True

    async def _write(
        self,
        conn: Connection,
        state: TypeState,
        view: cache.View,
        nonce: str,
        body: bytes,
        count: int,
        context: Any,
    ) -> None:
        state.pending = view
        state.sent_version = view.version
        state.nonce = nonce
        state.sent_at = self._clock()
        self.pushes_total += 1
        self._listener.pushed(state.type_url, count, conn.delta)
        log.debug(
            "proxy %s: %s version %s (%d resources, nonce %s)",
            conn.node_id,
            resources.short(state.type_url),
            view.version,
            count,
            nonce,
        )
        try:
            # asyncio.timeout, not wait_for: wait_for makes a Task per write,
            # which delays every stream's response until all were scheduled.
            async with asyncio.timeout(self._write_timeout):
                await context.write(body)
        except TimeoutError as err:
            raise StreamError(
                grpc.StatusCode.UNAVAILABLE,
                f"not reading its responses for {self._write_timeout:.0f}s; dropped",
            ) from err


_OVERFLOW = object()


def peer_identity(context: Any) -> str | None:
    """The SPIFFE ID in the client certificate of a TLS stream, if any."""
    auth = context.auth_context() or {}
    for pem in auth.get("x509_pem_cert", ()):
        found = _spiffe_id_of(bytes(pem))
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=4096)
def _spiffe_id_of(pem: bytes) -> str | None:
    # A sidecar reconnects with the same certificate: parse it once.
    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return str(uri)
    return None


def _without(view: cache.View, names: Iterable[str]) -> cache.View:
    gone = set(names)
    return cache.make_view(r for r in view.resources if r.name not in gone)


def _identity(body: bytes) -> bytes:
    return body


def _check_names(names: Collection[str]) -> None:
    # In C (len, map, max): a request may carry a hundred thousand names.
    count = len(names)
    if count > MAX_NAMES:
        raise StreamError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{count} resource names in one request (limit {MAX_NAMES})",
        )
    longest = max(map(len, names), default=0)
    if longest > MAX_NAME_LENGTH:
        raise StreamError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"a resource name of {longest} characters (limit {MAX_NAME_LENGTH})",
        )
