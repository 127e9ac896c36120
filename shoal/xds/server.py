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
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2

from shoal import spiffe, tasks, terminal
from shoal.xds import accounts, budget, cache, memo, resources, wire

log = logging.getLogger(__name__)
printable = terminal.printable

# The gRPC server an AdsServer runs in. Thousands of sidecars each hold one
# stream; gRPC's default cap on pending calls would refuse the ones past
# about a thousand.
GRPC_OPTIONS = [
    ("grpc.max_concurrent_streams", 1 << 20),
    # gRPC's default, written out: a request is refused by gRPC itself,
    # before any of it is parsed, above this (the README's limits table).
    ("grpc.max_receive_message_length", 4 << 20),
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
# A NACK's error text is kept (for proxy-status) and logged up to this long.
MAX_ERROR = 4096
# Kept here too: the server's limits are part of its interface.
Limits = accounts.Limits


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
    # The change (time.monotonic) the response in flight answers: see
    # cache.Snapshot.changed_at.
    changed_at: float = 0.0
    nacked_version: str = ""
    error: str = ""
    # Delta: subscribed names already reported as absent.
    told_absent: frozenset[str] = frozenset()
    # What `names` costs (names_cost), charged to the stream.
    names_cost: int = 0
    # The view a delta client said it held when it (re)connected, while it
    # is charged to the stream (until the first response replaces it).
    announced: cache.View | None = None
    announced_cost: int = 0
    # The inputs (see _send_pending) under which there was nothing to send.
    settled: tuple[object, ...] = ()

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
    # The SPIFFE ID its client certificate proves (None without mTLS), and
    # the certificate (PEM), checked again while the stream lives.
    identity: str | None = None
    certificate: bytes = b""
    # Set when the stream must end: why.
    revoked: str = ""
    # Types it asked for that are not served (bounded by Limits).
    unknown: set[str] = field(default_factory=set)
    # What its subscriptions and announced views cost (names_cost).
    cost: int = 0
    allowance: accounts.Allowance = field(default_factory=accounts.Allowance)
    # time.monotonic at connect: a change older than the stream is not one
    # it converged on (its first configuration is not timed).
    opened: float = field(default_factory=time.monotonic)
    # Where its Envoy admin is, as its node metadata says (shown by the
    # dashboard; a claim, so never used for configuration): a local
    # sidecar's port on its own 127.0.0.1, a captured sidecar's Pod.
    admin_port: int = 0
    pod: str = ""
    # While a response is being written: since when (the loop's clock), by
    # which task; `stalled` once the write watchdog gave up on it.
    writing_since: float = 0.0
    writer: asyncio.Task[Any] | None = None
    stalled: bool = False
    # A type whose ACK the reader may take itself, without waking the
    # stream's task: nothing else was due when its response went out.
    answered_alone: TypeState | None = None

    @property
    def snapshot(self) -> cache.Snapshot | None:
        return self.watch.snapshot if self.watch is not None else None


def _admin_port(node: Any) -> int:
    """The admin port a local sidecar's metadata names (shoal.xds.node.ADMIN_PORT;
    the server knows no more of the node): 0 for none, or not a port."""
    field = node.metadata.fields.get("ADMIN_PORT")
    number = field.number_value if field is not None and field.HasField("number_value") else 0
    return int(number) if number == int(number) and 0 < number < 65536 else 0


def _pod_of(node: Any) -> str:
    """`namespace/pod` of a captured sidecar, as its metadata says ("" else)."""
    fields = node.metadata.fields
    namespace, pod = fields.get("NAMESPACE"), fields.get("POD_NAME")
    if namespace is None or pod is None or not pod.string_value:
        return ""
    return printable(f"{namespace.string_value}/{pod.string_value}", 256)


class StreamError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamObserver(Protocol):
    """Told of what happens on streams (metrics, a benchmark's timings).

    Called on the event loop, inline, on the push path: a method must be
    quick and must not raise."""

    def pushed(self, type_url: str, resources: int, delta: bool) -> None:
        """A response of `resources` resources is about to be written to a
        stream: called once per response, just before the write starts."""

    def nacked(self, type_url: str) -> None:
        """A proxy rejected a response: called once per version a stream
        rejects, however often it says so."""

    def acked(self, type_url: str, seconds: float) -> None:
        """A proxy ACKed a response that a change made after it connected
        caused: `seconds` from that change (its debounce's start) to now."""


class _NoObserver:
    def pushed(self, type_url: str, resources: int, delta: bool) -> None:
        pass

    def nacked(self, type_url: str) -> None:
        pass

    def acked(self, type_url: str, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class Diff:
    changed: tuple[cache.Resource, ...]
    removed: tuple[str, ...]
    # A composite's diff is its parts' diffs, whose encodings are shared.
    pieces: tuple[Diff, ...] = ()

    def chunks(self) -> tuple[bytes, ...]:
        """The `resources` fields of a delta response carrying `changed`, in
        pieces each kept once (by a shared part's diff), joined once into
        the response."""
        if self.pieces:
            return tuple(c for p in self.pieces for c in p.chunks())
        return (self._encoded,)

    @functools.cached_property
    def _encoded(self) -> bytes:
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
        observer: StreamObserver | None = None,
        trust_domain: str | None = None,
        limits: Limits = accounts.DEFAULT_LIMITS,
        still_trusted: Callable[[bytes], bool] | None = None,
        write_budget: budget.WriteBudget | None = None,
    ) -> None:
        """With `trust_domain`, every stream must prove a workload identity
        of that domain with its client certificate (mutual TLS); without it,
        streams are anonymous (plain-text xDS, for debugging).
        `still_trusted(client certificate PEM)` says whether the issuer of a
        certificate is trusted now: a new stream may come on a connection
        whose handshake was made under a root trusted no more."""
        self._cache = snapshots
        self._clock = clock
        self._write_timeout = write_timeout
        # One timer looks at every stream's write in progress, rather than a
        # timeout per write (a timer in the loop's heap per response, set
        # and cancelled a thousand times a push).
        self._write_watchdog: tasks.Cancellable | None = None
        self._observer = observer or _NoObserver()
        self.trust_domain = trust_domain
        self.limits = limits
        self._still_trusted = still_trusted
        self._accounts = accounts.Accounts(limits, time.monotonic)
        self.write_budget = write_budget if write_budget is not None else budget.WriteBudget()
        # Moves when what is trusted changes: a stream that waited for its
        # first request meanwhile is checked again.
        self._trust_generation = 0
        self._ids = itertools.count(1)
        self.connections: dict[int, Connection] = {}
        # The streams it refused lately, the newest last, one per (identity,
        # reason): a proxy that keeps retrying is one entry, not a flood.
        self.refusals: collections.OrderedDict[tuple[str, str], Refusal] = collections.OrderedDict()
        self.nacks_total = 0
        self.pushes_total = 0
        # Streams given up on a write their client never read, whose calls
        # gRPC still holds (see _outlast).
        self.stalled_streams = 0
        # Work shared by every stream that is in the same place: the same
        # diff between two views, the same names a set of clusters needs.
        # Each entry lives as long as the views and subscriptions it was
        # worked out for (see memo.py).
        self._diffs: memo.WeakMemo[Diff] = memo.WeakMemo()
        self._flat_diffs: memo.WeakMemo[tuple[Diff, frozenset[str]]] = memo.WeakMemo()
        # What reconnecting proxies say they hold, by content: a thousand
        # proxies of one scope hold the same, and share one view of it.
        self._held_views: weakref.WeakValueDictionary[str, cache.View] = (
            weakref.WeakValueDictionary()
        )
        self._absents: memo.WeakMemo[frozenset[str]] = memo.WeakMemo()
        self._subscriptions: memo.Interned[frozenset[str]] = memo.Interned()
        # What each interned subscription costs its stream (accounts.names_cost).
        self._names_costs: memo.WeakMemo[int] = memo.WeakMemo()
        # The long name lists of requests by their encoding: every sidecar's
        # EDS request names every cluster of its scope, as do its ACKs in
        # SotW; read once, not once per request (see _request_names).
        self._names_by_wire: memo.ByBytes[frozenset[str]] = memo.ByBytes()
        self._wanted: memo.WeakMemo[frozenset[str]] = memo.WeakMemo()
        self._wanted_unions: memo.WeakMemo[cache.UnionSet[str]] = memo.WeakMemo()
        self._covered: memo.WeakMemo[bool] = memo.WeakMemo()

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
        """One stream, from its first request to its end. A refusal ends the
        RPC with a status and a return, never by raising: an exception's
        traceback would keep the request (megabytes, in C memory) alive in a
        reference cycle until the next full garbage collection."""
        # Read once: gRPC builds the peer's auth context anew on every call.
        certificate = peer_pem(context)
        try:
            identity = self._identity_of(certificate)
        except spiffe.IdentityError as err:
            self._refuse(context, context.peer(), "", grpc.StatusCode.UNAUTHENTICATED, str(err))
            return
        # Counted from now: a stream waiting for its first request is one too.
        if not self._accounts.admit(identity):
            self._refuse(
                context,
                context.peer(),
                identity or "",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{identity} already has {self.limits.streams_per_identity} streams (the limit)",
            )
            return
        conn: Connection | None = None
        try:
            conn, refusal = await self._open(requests, context, identity, certificate, delta=delta)
            if conn is None:
                if refusal is not None:
                    self._refuse(context, context.peer(), identity or "", *refusal)
                return
            refusal = await self._serve(conn, requests, context)
            if refusal is not None:
                self._refuse(context, f"proxy {conn.node_id}", identity or "", *refusal)
            if conn.stalled:
                await self._outlast()
        finally:
            if conn is not None:
                self._release(conn)
            self._accounts.discharge(identity)

    async def _outlast(self) -> None:
        """Wait for the end of a call given up on an unread write. grpc.aio
        cannot end a call whose write is queued in gRPC's core, which keeps
        the response until the client goes (gRPC then cancels this task);
        until then the stream still counts against its identity, so that a
        client cannot make the server hold unread responses beyond its
        identity's streams."""
        self.stalled_streams += 1
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.stalled_streams -= 1

    def _refuse(
        self, context: Any, who: str, identity: str, code: grpc.StatusCode, message: str
    ) -> None:
        _end(context, who, code, message)
        key = (identity, message)
        self.refusals.pop(key, None)
        self.refusals[key] = Refusal(self._clock(), who, identity, code.name, message)
        while len(self.refusals) > MAX_REFUSALS:
            self.refusals.popitem(last=False)

    async def _open(
        self,
        requests: AsyncIterator[Any],
        context: Any,
        identity: str | None,
        certificate: bytes,
        *,
        delta: bool,
    ) -> tuple[Connection | None, tuple[grpc.StatusCode, str] | None]:
        """The stream's connection, once its first request passes; or why
        not (None: the client left before asking anything)."""
        generation = self._trust_generation
        try:
            async with asyncio.timeout(self.limits.first_request_s):
                first = await anext(aiter(requests))
        except StopAsyncIteration:
            return None, None
        except TimeoutError:
            reason = f"no first request within {self.limits.first_request_s:.0f}s"
            return None, (grpc.StatusCode.DEADLINE_EXCEEDED, reason)
        if generation != self._trust_generation:
            # What is trusted changed while it waited (a root replaced).
            try:
                self._identity_of(certificate)
            except spiffe.IdentityError as err:
                return None, (grpc.StatusCode.UNAUTHENTICATED, str(err))
        node_id = first.node.id if first.HasField("node") else ""
        problem = _node_id_problem(node_id, self.limits.node_id_length)
        if problem is not None:
            return None, (grpc.StatusCode.INVALID_ARGUMENT, problem)
        conn = Connection(
            stream_id=next(self._ids),
            node_id=node_id,
            cluster=printable(first.node.cluster, 256),
            key="",
            peer=context.peer(),
            delta=delta,
            connected_at=self._clock(),
            identity=identity,
            certificate=certificate,
            admin_port=_admin_port(first.node),
            pod=_pod_of(first.node),
        )
        try:
            conn.watch = self._cache.watch(cache.Client(first.node, identity), conn.wake)
        except PermissionError as err:
            return None, (grpc.StatusCode.PERMISSION_DENIED, f"node {node_id}: {err}")
        except ValueError as err:
            return None, (grpc.StatusCode.INVALID_ARGUMENT, f"node {node_id}: {err}")
        conn.key = conn.watch.key
        conn.inbox.append(first)
        self.connections[conn.stream_id] = conn
        log.info(
            "proxy %s connected (stream %d, %s, %s)",
            printable(conn.node_id),
            conn.stream_id,
            "delta" if delta else "state of the world",
            conn.peer,
        )
        return conn, None

    async def _serve(
        self, conn: Connection, requests: AsyncIterator[Any], context: Any
    ) -> tuple[grpc.StatusCode, str] | None:
        """Answer requests and push changes until the client is done (None)
        or the stream must end (its status)."""
        reader = asyncio.create_task(self._read(requests, conn))
        conn.writer = asyncio.current_task()
        if self._write_watchdog is None:
            self._watch_writes()
        on_request = self._on_delta_request if conn.delta else self._on_sotw_request
        try:
            while True:
                if conn.revoked:
                    return grpc.StatusCode.UNAUTHENTICATED, conn.revoked
                if conn.inbox:
                    conn.answered_alone = None  # requests are taken in order
                while conn.inbox:
                    request = conn.inbox.popleft()
                    if request is _OVERFLOW:
                        return (
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"more than {MAX_QUEUED_REQUESTS} requests queued without answer",
                        )
                    wait = self._accounts.spend(conn, _work(conn, request))
                    if wait:
                        # This identity went through its names for now: its
                        # requests wait their turn, and nobody else's do.
                        await asyncio.sleep(wait)
                    try:
                        on_request(conn, request)
                    except StreamError as err:
                        return err.code, str(err)
                    except accounts.Exceeded as err:
                        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
                    finally:
                        del request
                if conn.revoked:
                    continue
                snapshot = conn.snapshot
                if snapshot is not None:
                    try:
                        await self._send_pending(conn, snapshot, context)
                    except StreamError as err:
                        return err.code, str(err)
                if conn.closed and not conn.inbox:
                    return None
                await conn.wake.wait()
                conn.wake.clear()
        finally:
            reader.cancel()
            if conn.watch is not None:
                self._cache.cancel(conn.watch)
            self.connections.pop(conn.stream_id, None)
            log.info("proxy %s disconnected (stream %d)", printable(conn.node_id), conn.stream_id)

    # -- who may have a stream ------------------------------------------------

    def authenticate(self, context: Any) -> str | None:
        """The workload identity of the stream's client certificate; with a
        trust domain, IdentityError unless it proves exactly one of ours,
        issued by a key trusted now, and valid now."""
        return self._identity_of(peer_pem(context))

    def _identity_of(self, certificate: bytes) -> str | None:
        if self.trust_domain is None:
            return None
        uris = _uris_of(certificate) if certificate else ()
        identity = spiffe.of_certificate(uris, self.trust_domain)
        if self._still_trusted is not None and not self._still_trusted(certificate):
            raise spiffe.IdentityError(
                "the client certificate is not valid now or its issuer is no longer trusted"
            )
        return identity

    def _release(self, conn: Connection) -> None:
        """Let go of everything the stream holds, now: the connection itself
        may sit in a cycle (its tasks, its watch) that only a full collection
        reclaims, and the heap keeper freezes old objects."""
        for state in conn.types.values():
            self._set_names(conn, state, frozenset(), 0)
            self._announce(conn, state, None)
        conn.types.clear()
        conn.inbox.clear()
        conn.unknown.clear()
        conn.watch = None

    def recheck(self) -> int:
        """End streams whose client certificate has expired, or whose issuer
        is trusted no more (a retired root's window ended); how many."""
        ended = 0
        if self._still_trusted is None:
            return ended
        for conn in self.connections.values():
            if conn.certificate and not conn.revoked and not self._still_trusted(conn.certificate):
                conn.revoked = "the client certificate expired, or its issuer is no longer trusted"
                conn.wake.set()
                ended += 1
        return ended

    async def keep_checking(self, every: float = 60.0) -> None:
        """`recheck` every `every` seconds, until cancelled."""
        while True:
            await asyncio.sleep(every)
            self.recheck()

    def disconnect_all(self, reason: str) -> int:
        """End every stream (UNAUTHENTICATED, with `reason`), and check the
        certificates of streams still opening again; proxies that can,
        reconnect. How many there were."""
        self._trust_generation += 1
        for conn in self.connections.values():
            conn.revoked = reason
            conn.wake.set()
        return len(self.connections)

    def usage(self, identity: str) -> tuple[int, int]:
        """(streams, cost of what they hold) of one identity."""
        return self._accounts.usage(identity)

    async def _read(self, requests: AsyncIterator[Any], conn: Connection) -> None:
        try:
            async for request in requests:
                if conn.answered_alone is not None and self._take_answer(conn, request):
                    continue
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

    def _take_answer(self, conn: Connection, request: Any) -> bool:
        """Take a delta ACK here, in the reader, when the stream's task
        would wake for it only to find nothing to send: the ACK of the one
        response awaited (conn.answered_alone), with nothing queued before
        it and no other wake-up pending. A push to a thousand streams
        otherwise wakes each twice (its response, its ACK)."""
        state = conn.answered_alone
        if (
            state is None
            or conn.inbox
            or conn.wake.is_set()
            or request.type_url != state.type_url
            or request.response_nonce != state.nonce
            or request.resource_names_subscribe
            or request.resource_names_unsubscribe
            or request.initial_resource_versions
            or request.HasField("error_detail")
        ):
            return False
        conn.answered_alone = None
        self._on_answer(conn, state, request)
        return True

    # -- requests ------------------------------------------------------------

    def _subscribe(self, conn: Connection, state: TypeState, names: frozenset[str]) -> None:
        """Make `names` what the stream subscribes to of the type, within its
        limits: one object per distinct subscription (a thousand sidecars
        asking for the same names share one set, and the views and diffs
        memoized on it are found by identity)."""
        wanted = self._subscriptions(names)
        long = len(wanted) >= _KEYED_BY_WIRE_FROM
        cost = self._names_costs.get((wanted,)) if long else None
        if cost is None:
            cost = accounts.names_cost(wanted)
            if long:
                self._names_costs.put((wanted,), cost)
        self._accounts.check(conn, cost - state.names_cost)
        if wanted is not state.names:
            self._set_names(conn, state, wanted, cost)

    def _set_names(
        self, conn: Connection, state: TypeState, names: frozenset[str], cost: int
    ) -> None:
        """Replace a type's subscription, charged to the stream and (once per
        distinct set) to its identity; refused, nothing changes."""
        self._accounts.check(conn, cost - state.names_cost)
        self._accounts.replace(conn, (state.names, state.names_cost), (names, cost))
        state.names, state.names_cost = names, cost

    def _announce(self, conn: Connection, state: TypeState, view: cache.View | None) -> None:
        """What a delta client said it holds (its initial_resource_versions),
        charged like a subscription while it is what the stream holds."""
        cost = 0
        if view is not None:
            cost = sum(len(r.name) + len(r.version) + 2 * accounts.NAME_COST for r in view.own)
        self._accounts.check(conn, cost - state.announced_cost)
        self._accounts.replace(conn, (state.announced, state.announced_cost), (view, cost))
        state.announced, state.announced_cost = view, cost

    def _serves(self, conn: Connection, type_url: str) -> bool:
        """Whether this server serves the type; an unknown one is noted once,
        and only so many of them."""
        if not type_url:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "a request without type_url")
        if type_url in KNOWN_TYPES:
            return True
        if len(type_url) > self.limits.type_url_length:
            raise StreamError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a type_url of {len(type_url)} characters (limit {self.limits.type_url_length})",
            )
        if type_url not in conn.unknown:
            if len(conn.unknown) >= self.limits.unknown_types:
                raise StreamError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"more than {self.limits.unknown_types} types this server does not serve",
                )
            conn.unknown.add(type_url)
            log.info(
                "proxy %s asked for unserved type %s; ignored",
                printable(conn.node_id),
                printable(type_url),
            )
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
        # Read out of the message once: each read of a repeated string
        # field makes every name anew, and a sidecar's EDS request (and each
        # of its ACKs) names every cluster of the mesh.
        names = self._request_names(request, "resource_names", _SOTW_STRINGS)
        if not self._serves(conn, type_url):
            return
        # Legacy wildcard: an empty name list on LDS or CDS means everything.
        wildcard = type_url in resources.WILDCARD and (not names or "*" in names)
        state = conn.types.get(type_url)
        if state is None:
            state = conn.types[type_url] = TypeState(type_url, wildcard)
            self._subscribe(conn, state, names)
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
        if names is not state.names and (len(names) != len(state.names) or names != state.names):
            self._subscribe(conn, state, names)

    def _on_delta_request(self, conn: Connection, request: Any) -> None:
        type_url = request.type_url
        subscribe = self._request_names(request, "resource_names_subscribe", _DELTA_STRINGS)
        unsubscribe = _names_of(request.resource_names_unsubscribe)
        if not self._serves(conn, type_url):
            return
        state = conn.types.get(type_url)
        first = state is None
        if state is None:
            # Legacy wildcard: a first request naming nothing on LDS or CDS.
            wildcard = type_url in resources.WILDCARD and not request.resource_names_subscribe
            state = conn.types[type_url] = TypeState(type_url, wildcard=wildcard)
            if request.initial_resource_versions:
                versions = request.initial_resource_versions
                _check_names(versions)
                cost = sum(map(len, versions)) + sum(map(len, versions.values()))
                self._accounts.check(conn, cost + 2 * accounts.NAME_COST * len(versions))
                held = cache.make_view(
                    cache.Resource(type_url, name, b"", version)
                    for name, version in versions.items()
                )
                state.held = self._held_views.setdefault(f"{type_url}|{held.version}", held)
                self._announce(conn, state, state.held)
        # Subscription changes are deltas and apply whatever the nonce; only
        # the ACK or NACK is tied to the latest response.
        if request.response_nonce and request.response_nonce == state.nonce:
            self._on_answer(conn, state, request)
        if "*" in subscribe:
            state.wildcard = True
        if "*" in unsubscribe:
            state.wildcard = False
        if subscribe or unsubscribe:
            if state.names or unsubscribe or "*" in subscribe:
                subscribe_to = (state.names | subscribe) - unsubscribe - {"*"}
            else:
                subscribe_to = subscribe  # the first list: already a shared set
            self._subscribe(conn, state, subscribe_to)
            if state.told_absent:
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

    def _request_names(self, request: Any, field: str, strings: tuple[str, ...]) -> frozenset[str]:
        """The names of a request's repeated `field`. A long list is looked
        up by its encoding first: turning 10,000 names into Python strings
        and hashing them costs three times what encoding the list does, and
        a fleet sends the same few lists over and over. The same encoding
        means the same names, already checked against the limits. A list is
        found while a stream subscribes to it, and no longer: what streams
        asked for goes with them (tests/security)."""
        values = getattr(request, field)
        if len(values) < _KEYED_BY_WIRE_FROM:
            return _names_of(values)
        raw = _names_wire(request, strings)
        if raw is None:
            return _names_of(values)
        names = self._names_by_wire.get(raw)
        if names is None:
            names = self._names_by_wire.put(raw, self._subscriptions(_names_of(values)))
        return names

    def _on_answer(self, conn: Connection, state: TypeState, request: Any) -> None:
        """The request answers our latest response of its type: ACK or NACK."""
        sent = state.pending
        state.pending = None
        now = self._clock()
        if request.HasField("error_detail"):
            error = request.error_detail.message[:MAX_ERROR]
            if state.nacked_version != state.sent_version:
                self.nacks_total += 1
                self._observer.nacked(state.type_url)
                log.error(
                    "proxy %s rejected %s version %s: %s",
                    printable(conn.node_id),
                    resources.short(state.type_url),
                    state.sent_version,
                    printable(error, 1000),
                )
            state.nacked_version = state.sent_version
            state.error = error
            return
        if sent is not None:
            state.held = sent
            if state.announced is not None:
                self._announce(conn, state, None)
            if state.changed_at > conn.opened:
                self._observer.acked(state.type_url, time.monotonic() - state.changed_at)
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
        held_elsewhere = self._held_refs(conn, resources.NAMED_LATER_BY[state.type_url])
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
        for t in resources.ASKED_BEFORE[upto]:
            st = conn.types.get(t)
            wanted = self._wanted_names(conn, t, snapshot)
            if not wanted:
                continue
            if st is None or not (st.wildcard or self._covers(st.names, wanted)):
                return True
            if not self._covers(st.held.names, wanted):
                return True
        return False

    def _covers(self, names: AbstractSet[str], wanted: AbstractSet[str]) -> bool:
        """`wanted <= names`, worked out once per pair: both are shared (an
        interned subscription, a view's names, the names a shared part
        refers to), and every send to every stream asks again."""
        key = (names, wanted)
        found = self._covered.get(key)
        if found is None:
            found = self._covered.put(key, wanted <= names)
        return found

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
                key = (part, *groups)
                names = self._wanted.get(key, t)
                if names is None:
                    names = self._wanted.put(
                        key,
                        frozenset(
                            n
                            for (rt, n) in part.refs
                            if rt == t and any(g.get(n) is not None for g in groups)
                        ),
                        t,
                    )
                if names:
                    found.append(names)
        if len(found) == 1:
            return found[0]
        # Kept while its parts are, so that it too is the same object
        # send after send (see _covers).
        union = self._wanted_unions.get(tuple(found))
        if union is None:
            union = self._wanted_unions.put(tuple(found), cache.UnionSet(tuple(found)))
        return union

    async def _send_pending(self, conn: Connection, snapshot: cache.Snapshot, context: Any) -> None:
        conn.answered_alone = None
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
            inputs = _inputs(conn, state, snapshot)
            if state.settled == inputs:
                continue
            view = self._desired(conn, state, snapshot)
            if view.version == state.nacked_version or (
                view.version == state.held.version
                and not (conn.delta and self._absent(state, view))
            ):
                state.settled = inputs
                continue
            if self._waiting_for_subscription(conn, type_url, snapshot):
                return
            state.changed_at = snapshot.changed_at
            if conn.delta:
                # Marked before the write: its ACK may be read before the
                # write's own completion is.
                if type_url in resources.ANSWERED_ALONE and _settled_after(
                    conn, type_url, snapshot
                ):
                    conn.answered_alone = state
                if not await self._send_delta(conn, state, view, context):
                    conn.answered_alone = None
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
            absent = self._absents.put(key, state.names - view.names)
        return absent - state.told_absent if state.told_absent else absent

    async def _send_sotw(
        self, conn: Connection, state: TypeState, view: cache.View, context: Any
    ) -> None:
        chunks = view.chunks()
        grant = await self.write_budget.take(sum(map(len, chunks)))
        try:
            nonce = str(next(conn.nonces))
            body = wire.sotw_response(view.version, chunks, state.type_url, nonce)
            await self._write(conn, state, view, nonce, body, len(view.resources), context)
        finally:
            grant.release()

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
        return self._diffs.put(key, found)

    def _diff_from_flat(self, held: cache.View, part: cache.View) -> tuple[Diff, frozenset[str]]:
        """The resources of `part` that `held` lacks or has at another
        version, and the names of `held` that `part` has."""
        key = (held, part)
        found = self._flat_diffs.get(key)
        if found is None:
            before = held.versions
            changed = tuple(r for r in part.own if before.get(r.name) != r.version)
            covered = frozenset(n for n in before if n in part.names)
            found = self._flat_diffs.put(key, (Diff(changed, ()), covered))
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
        chunks = diff.chunks()
        grant = await self.write_budget.take(sum(map(len, chunks)))
        try:
            state.told_absent |= absent | (frozenset(diff.removed) & state.names)
            if state.type_url == resources.CLUSTER:
                self._resend_endpoints_of_updated(conn, state, diff)
            nonce = str(next(conn.nonces))
            body = wire.delta_response(view.version, chunks, state.type_url, removed, nonce)
            await self._write(conn, state, view, nonce, body, len(diff.changed), context)
        finally:
            grant.release()
        return True

    @staticmethod
    def _resend_endpoints_of_updated(conn: Connection, clusters: TypeState, diff: Diff) -> None:
        """Delta: an updated cluster warms again, and warms only on a
        ClusterLoadAssignment, which Envoy does not ask for again (it is
        subscribed already). Unless sent, the cluster waits out the 15 s
        initial fetch timeout with the old one serving (go-control-plane
        #1035). So the endpoints of every updated cluster count as not held,
        and go out after it, changed or not. SotW needs nothing: Envoy asks
        again for every name there."""
        endpoints = conn.types.get(resources.ENDPOINT)
        if endpoints is None or not endpoints.held.names:
            return
        held = clusters.held.names
        subscribed = endpoints.held.names
        again = {
            name
            for r in diff.changed
            if r.name in held
            for (t, name) in r.refs
            if t == resources.ENDPOINT and name in subscribed
        }
        if again:
            endpoints.held = _without(endpoints.held, again)

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
        self._observer.pushed(state.type_url, count, conn.delta)
        log.debug(
            "proxy %s: %s version %s (%d resources, nonce %s)",
            conn.node_id,
            resources.short(state.type_url),
            view.version,
            count,
            nonce,
        )
        conn.writing_since = asyncio.get_running_loop().time()
        try:
            await context.write(body)
        except asyncio.CancelledError:
            if not conn.stalled:
                raise
            writer = asyncio.current_task()
            if writer is not None:
                writer.uncancel()  # the watchdog's cancel, not the stream's end
            raise StreamError(
                grpc.StatusCode.UNAVAILABLE,
                f"not reading its responses for {self._write_timeout:.0f}s; dropped",
            ) from None
        finally:
            conn.writing_since = 0.0

    def _watch_writes(self) -> None:
        """End every stream whose write has waited longer than the write
        timeout (a client that stopped reading: flow control holds the
        write forever); looks again every quarter of it while streams are
        open."""
        now = asyncio.get_running_loop().time()
        for conn in self.connections.values():
            since, writer = conn.writing_since, conn.writer
            if since and now - since > self._write_timeout and writer and not conn.stalled:
                conn.stalled = True
                writer.cancel()
        self._write_watchdog = (
            tasks.call_later(self._write_timeout / 4, self._watch_writes)
            if self.connections
            else None
        )


# Refusals kept for the analyzers: enough for every kind of mistake at once.
MAX_REFUSALS = 64


@dataclass(frozen=True, slots=True)
class Refusal:
    """A stream the server ended, and why: `who` is the peer (or the proxy,
    once it said its node), `identity` what its certificate proved."""

    at: float
    who: str
    identity: str
    code: str
    message: str


_OVERFLOW = object()


def _end(context: Any, who: str, code: grpc.StatusCode, message: str) -> None:
    """End the RPC with `code` once the handler returns (see _stream)."""
    log.warning("%s: %s", printable(who), printable(message, 1000))
    context.set_code(code)
    context.set_details(message)


def peer_pem(context: Any) -> bytes:
    """The client certificate of a TLS stream, PEM (b"" without)."""
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert", ())
    return bytes(pems[0]) if pems else b""


@functools.lru_cache(maxsize=4096)
def _uris_of(pem: bytes) -> tuple[str, ...]:
    # A sidecar reconnects with the same certificate: parse it once.
    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier))


def _work(conn: Connection, request: Any) -> int:
    """Names a request makes the server go through: those it carries, and
    for a delta subscription change, the subscription it rebuilds."""
    if request is _OVERFLOW:
        return 0
    if not conn.delta:
        return len(request.resource_names)
    changed = len(request.resource_names_subscribe) + len(request.resource_names_unsubscribe)
    state = conn.types.get(request.type_url)
    rebuilt = len(state.names) if changed and state is not None else 0
    return changed + rebuilt + len(request.initial_resource_versions)


def _node_id_problem(node_id: str, limit: int) -> str | None:
    if not node_id:
        return "the first request of a stream must carry node.id"
    if len(node_id) > limit:
        return f"a node.id of {len(node_id)} characters (limit {limit})"
    if terminal.has_control(node_id):
        return f"node.id {printable(node_id)} has control characters"
    return None


def _inputs(conn: Connection, state: TypeState, snapshot: cache.Snapshot) -> tuple[object, ...]:
    """Everything _desired and _absent read of a type: a stream is woken for
    each push, write and ACK, and most wake-ups change nothing for most
    types (a push of endpoints leaves every other type's groups the same
    objects); those are passed over at once."""
    type_url = state.type_url
    return (
        snapshot.groups.get(type_url),
        state.names,
        state.wildcard,
        state.told_absent,
        state.nacked_version,
        state.held,
        *(_held_of(conn, resources.NAMED_LATER_BY[type_url]) if state.wildcard else ()),
    )


def _settled_after(conn: Connection, type_url: str, snapshot: cache.Snapshot) -> bool:
    """Whether every type pushed after `type_url` awaits its own ACK or was
    found to need nothing with what it has now: then the ACK of `type_url`
    leaves nothing to send."""
    for later in resources.PUSH_ORDER[resources.PUSH_ORDER.index(type_url) + 1 :]:
        state = conn.types.get(later)
        if state is None or state.in_flight:
            continue
        if state.settled != _inputs(conn, state, snapshot):
            return False
    return True


def _held_of(conn: Connection, types: Iterable[str]) -> tuple[cache.View | None, ...]:
    """What the stream holds of `types` (see _held_refs)."""
    return tuple(st.held if (st := conn.types.get(t)) is not None else None for t in types)


def _without(view: cache.View, names: Iterable[str]) -> cache.View:
    gone = set(names)
    return cache.make_view(r for r in view.resources if r.name not in gone)


def _identity(body: bytes) -> bytes:
    return body


_NO_NAMES: frozenset[str] = frozenset()
# Below this, reading the names costs about what encoding them does.
_KEYED_BY_WIRE_FROM = 64
# The fields of a request other than its names that _names_wire sets aside.
_SOTW_STRINGS = ("version_info", "type_url", "response_nonce")
_DELTA_STRINGS = ("type_url", "response_nonce")


def _names_wire(request: Any, strings: tuple[str, ...]) -> bytes | None:
    """The encoding of the request's one name list, or None when it carries
    more than that list and `strings` (a node, an error, a second list):
    those are rare, and read the long way. The strings are set aside for
    the encoding and put back."""
    kept = [getattr(request, name) for name in strings]
    for name in strings:
        request.ClearField(name)
    try:
        if len(request.ListFields()) != 1:
            return None
        raw: bytes = request.SerializeToString()
        return raw
    finally:
        for name, value in zip(strings, kept, strict=True):
            setattr(request, name, value)


def _names_of(field: Collection[str]) -> frozenset[str]:
    """The names of a repeated field, within the limits, as a set. Counted
    before any is read, and each read once: the set shares the strings
    whose lengths were checked."""
    if not field:
        return _NO_NAMES
    _check_count(field)
    listed = list(field)
    _check_names(listed)
    return frozenset(listed)


def _check_count(names: Collection[str]) -> None:
    count = len(names)
    if count > MAX_NAMES:
        raise StreamError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{count} resource names in one request (limit {MAX_NAMES})",
        )


def _check_names(names: Collection[str]) -> None:
    # In C (len, map, max): a request may carry a hundred thousand names.
    _check_count(names)
    longest = max(map(len, names), default=0)
    if longest > MAX_NAME_LENGTH:
        raise StreamError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"a resource name of {longest} characters (limit {MAX_NAME_LENGTH})",
        )
