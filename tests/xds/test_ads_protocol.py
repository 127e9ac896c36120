"""State-of-the-world ADS, spoken by a real grpc.aio client to the real server.

Each test drives `StreamAggregatedResources` over 127.0.0.1 the way Envoy
does (node on the first request, ACK/NACK by version and nonce, names for
EDS and RDS) and checks what comes back, including what must *not* come back
(resend loops, answers to stale nonces).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from shoal import cli
from shoal.xds import cache, node, resources, server
from shoal.xds.translate import refs
from tests import manifests
from tests.conftest import write
from tests.xds import stream

CDS = resources.CLUSTER
EDS = resources.ENDPOINT
LDS = resources.LISTENER
RDS = resources.ROUTE

ADS_METHOD = f"/{server.ADS_SERVICE}/{server.SOTW_METHOD}"
PUSH_TIMEOUT = stream.PUSH_TIMEOUT

Response = discovery_pb2.DiscoveryResponse
Request = discovery_pb2.DiscoveryRequest


def cluster_name(service: str, port: int = 80, namespace: str = "default") -> str:
    return f"outbound|{port}||{service}.{namespace}.svc.cluster.local"


def service_manifest(name: str, endpoint_port: int) -> str:
    return manifests.service_with_endpoints(name, [endpoint_port])


def make_node(node_id: str, *, without: Iterable[str] = ()) -> base_pb2.Node:
    """A sidecar's node, with the metadata `shoal bootstrap` writes."""
    metadata: dict[str, str | float] = {
        node.NAMESPACE: "default",
        node.SERVICE: "web",
        node.APP_PORT: 8080,
        node.INBOUND_PORT: 15006,
        node.OUTBOUND_PORT: 15001,
    }
    for key in without:
        del metadata[key]
    struct = struct_pb2.Struct()
    struct.update(metadata)
    return base_pb2.Node(id=node_id, cluster="web", metadata=struct)


class AdsClient(stream.StreamClient[Request, Response]):
    """One state-of-the-world ADS stream."""

    def __init__(self, channel: grpc.aio.Channel, first_node: base_pb2.Node | None) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        super().__init__(stub.StreamAggregatedResources(), first_node, Response, _describe)

    async def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
    ) -> None:
        req = Request(
            type_url=type_url,
            resource_names=sorted(names),
            version_info=version,
            response_nonce=nonce,
        )
        await self.send(req, error)

    async def ack(self, response: Response, names: Iterable[str] = ()) -> None:
        await self.request(
            response.type_url, names, version=response.version_info, nonce=response.nonce
        )


def _describe(item: Response) -> str:
    return (
        f"{resources.short(item.type_url)} response, version "
        f"{item.version_info}, nonce {item.nonce}, {len(item.resources)} resources"
    )


def ads_stream(
    port: int, first_node: base_pb2.Node | None
) -> contextlib.AbstractAsyncContextManager[AdsClient]:
    return stream.open_stream(port, lambda channel: AdsClient(channel, first_node))


M = TypeVar("M", bound=Message)


def unpack_all(response: Response, kind: type[M]) -> list[M]:
    """Every resource of a response, as `kind`."""
    out = []
    for any_msg in response.resources:
        found = kind()
        assert any_msg.Unpack(found), f"{any_msg.type_url} is not a {kind.__name__}"
        out.append(found)
    return out


def unpack_clusters(response: Response) -> list[cluster_pb2.Cluster]:
    return unpack_all(response, cluster_pb2.Cluster)


def clusters_of(response: Response) -> dict[str, cluster_pb2.Cluster]:
    assert response.type_url == CDS
    return {c.name: c for c in unpack_clusters(response)}


def assignments_of(response: Response) -> dict[str, endpoint_pb2.ClusterLoadAssignment]:
    assert response.type_url == EDS
    return {c.cluster_name: c for c in unpack_all(response, endpoint_pb2.ClusterLoadAssignment)}


def listeners_of(response: Response) -> list[listener_pb2.Listener]:
    assert response.type_url == LDS
    out = []
    for any_msg in response.resources:
        listener = listener_pb2.Listener()
        assert any_msg.Unpack(listener)
        out.append(listener)
    return out


def routes_of(response: Response) -> list[route_pb2.RouteConfiguration]:
    assert response.type_url == RDS
    out = []
    for any_msg in response.resources:
        config = route_pb2.RouteConfiguration()
        assert any_msg.Unpack(config)
        out.append(config)
    return out


def eds_names(clusters: Iterable[cluster_pb2.Cluster]) -> set[str]:
    return {
        c.eds_cluster_config.service_name or c.name
        for c in clusters
        if c.type == cluster_pb2.Cluster.EDS
    }


@dataclass
class Proxy(stream.Converging[Response]):
    """What an Envoy-like client holds, and the check that it is never
    routing to a cluster it does not have."""

    client: AdsClient
    # Envoy asks for new clusters' endpoints before it ACKs the clusters; a
    # simpler client ACKs first. The server must order pushes either way.
    subscribe_before_ack: bool = False
    clusters: set[str] = field(default_factory=set)
    eds: set[str] = field(default_factory=set)
    rds: set[str] = field(default_factory=set)
    listener_refs: set[tuple[str, str]] = field(default_factory=set)
    route_refs: set[tuple[str, str]] = field(default_factory=set)
    last: dict[str, Response] = field(default_factory=dict)
    log: list[Response] = field(default_factory=list)

    def check_routes_resolve(self) -> None:
        named = {n for t, n in self.listener_refs | self.route_refs if t == CDS}
        missing = named - self.clusters
        assert not missing, f"routes name clusters the proxy never received: {missing}"

    async def subscribe(self, type_url: str, names: set[str]) -> None:
        last = self.last.get(type_url)
        await self.client.request(
            type_url,
            names,
            version=last.version_info if last else "",
            nonce=last.nonce if last else "",
        )

    async def handle(self, response: Response) -> None:
        """Apply a response, ACK it, and ask for what it newly needs."""
        self.log.append(response)
        self.last[response.type_url] = response
        if response.type_url == CDS:
            got = clusters_of(response)
            self.clusters = set(got)
            if not self.subscribe_before_ack:
                await self.client.ack(response)
            wanted = eds_names(got.values())
            if wanted != self.eds:
                self.eds = wanted
                await self.subscribe(EDS, wanted)
            if self.subscribe_before_ack:
                await self.client.ack(response)
        elif response.type_url == EDS:
            await self.client.ack(response, self.eds)
        elif response.type_url == LDS:
            self.listener_refs = set().union(*(refs.of(x) for x in listeners_of(response)))
            await self.client.ack(response)
            wanted = {n for t, n in self.listener_refs if t == RDS}
            if wanted != self.rds:
                self.rds = wanted
                await self.subscribe(RDS, wanted)
        elif response.type_url == RDS:
            self.route_refs = set().union(*(refs.of(x) for x in routes_of(response)))
            await self.client.ack(response, self.rds)
        self.check_routes_resolve()


async def eventually(condition: Callable[[], bool], timeout: float = PUSH_TIMEOUT) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# -- fixtures -----------------------------------------------------------------


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    """The folder `control_plane` serves, with two Services already in it."""
    folder = tmp_path / "registry"
    folder.mkdir()
    write(folder, "alpha.yaml", service_manifest("alpha", 9001))
    write(folder, "beta.yaml", service_manifest("beta", 9002))
    return folder


@pytest.fixture
def port(control_plane: cli.ControlPlane) -> int:
    return control_plane.xds_port


# -- 1. ACK ---------------------------------------------------------------------


async def test_ack_settles_the_stream(port: int, control_plane: cli.ControlPlane) -> None:
    async with ads_stream(port, make_node("ack")) as client:
        await client.request(CDS)
        first = await client.recv()
        assert first.type_url == CDS
        assert first.version_info
        assert first.nonce
        assert {cluster_name("alpha"), cluster_name("beta")} <= set(clusters_of(first))

        await client.ack(first)
        await client.expect_nothing()

        (conn,) = control_plane.ads.connections.values()
        assert conn.types[CDS].acked_version == first.version_info
        assert not conn.types[CDS].in_flight


# -- 2. NACK --------------------------------------------------------------------


async def test_nack_is_not_answered_with_the_same_version(
    port: int, control_plane: cli.ControlPlane, registry_dir: Path
) -> None:
    ads = control_plane.ads
    assert ads.nacks_total == 0
    async with ads_stream(port, make_node("nack")) as client:
        await client.request(CDS)
        rejected = await client.recv()
        # A NACK carries the version the client still runs: none yet.
        await client.request(CDS, version="", nonce=rejected.nonce, error="cluster is bad")
        await client.expect_nothing()
        assert ads.nacks_total == 1
        (conn,) = ads.connections.values()
        assert conn.types[CDS].error == "cluster is bad"

        write(registry_dir, "gamma.yaml", service_manifest("gamma", 9003))
        fixed = await client.recv()
        assert fixed.type_url == CDS
        assert fixed.version_info != rejected.version_info
        assert fixed.nonce != rejected.nonce
        assert cluster_name("gamma") in clusters_of(fixed)
        assert ads.nacks_total == 1

        await client.ack(fixed)
        await client.expect_nothing(0.2)
        assert conn.types[CDS].error == ""


# -- 3. stale nonce -------------------------------------------------------------


async def test_request_with_stale_nonce_is_ignored(port: int) -> None:
    alpha, beta = cluster_name("alpha"), cluster_name("beta")
    async with ads_stream(port, make_node("stale")) as client:
        await client.request(EDS, [alpha])
        old = await client.recv()
        assert set(assignments_of(old)) == {alpha}
        await client.ack(old, [alpha])

        # Widening the subscription (answering the current nonce) is honoured.
        await client.request(EDS, [alpha, beta], version=old.version_info, nonce=old.nonce)
        current = await client.recv()
        assert set(assignments_of(current)) == {alpha, beta}
        await client.ack(current, [alpha, beta])
        await client.expect_nothing(0.2)

        # The same narrowing, answering the superseded nonce: ignored.
        await client.request(EDS, [beta], version=old.version_info, nonce=old.nonce)
        await client.expect_nothing()

        # The stream is alive and the subscription was not changed by it:
        # narrowing with the current nonce is answered.
        await client.request(EDS, [beta], version=current.version_info, nonce=current.nonce)
        narrowed = await client.recv()
        assert set(assignments_of(narrowed)) == {beta}


# -- 4. a resource created after it was asked for -------------------------------


async def test_resource_created_later_is_pushed(
    port: int, registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    gamma = cluster_name("gamma")
    async with ads_stream(port, make_node("late")) as client:
        await client.request(EDS, [gamma])
        # The server holds the subscription before gamma exists.
        await eventually(
            lambda: any(
                c.types.get(EDS) is not None and c.types[EDS].names == {gamma}
                for c in control_plane.ads.connections.values()
            )
        )

        write(registry_dir, "gamma.yaml", service_manifest("gamma", 9003))
        async with asyncio.timeout(PUSH_TIMEOUT):
            while True:
                pushed = await client.recv()
                assignments = assignments_of(pushed)
                if assignments:
                    break
                # "None of those yet" is allowed; it is only ever ACKed.
                assert len(pushed.resources) == 0
                await client.ack(pushed, [gamma])

        first, *acks = client.sent
        assert not first.response_nonce
        assert all(r.response_nonce and list(r.resource_names) == [gamma] for r in acks), (
            "the push needed another request"
        )
        assert set(assignments) == {gamma}
        (locality,) = assignments[gamma].endpoints
        (endpoint,) = locality.lb_endpoints
        assert endpoint.endpoint.address.socket_address.port_value == 9003


# -- 5. reconnecting with a version --------------------------------------------


async def test_reconnect_with_current_version_gets_no_resend(port: int, registry_dir: Path) -> None:
    async with ads_stream(port, make_node("before")) as client:
        await client.request(CDS)
        known = await client.recv()
        await client.ack(known)

    async with ads_stream(port, make_node("again")) as client:
        await client.request(CDS, version=known.version_info)
        await client.expect_nothing()
        # Still subscribed: a change is pushed.
        write(registry_dir, "gamma.yaml", service_manifest("gamma", 9003))
        changed = await client.recv()
        assert changed.version_info != known.version_info
        assert cluster_name("gamma") in clusters_of(changed)
        known = changed

    async with ads_stream(port, make_node("outdated")) as client:
        await client.request(CDS, version="an-old-version")
        resent = await client.recv()
        assert resent.version_info == known.version_info
        assert set(clusters_of(resent)) == set(clusters_of(known))


# -- 6. push order ----------------------------------------------------------------


async def connect_proxy(client: AdsClient, *, subscribe_before_ack: bool = False) -> Proxy:
    """Connect and converge, checking the order of pushes."""
    proxy = Proxy(client, subscribe_before_ack=subscribe_before_ack)
    await client.request(CDS)
    await client.request(LDS)

    cds = await client.recv()
    assert cds.type_url == CDS, f"first push is {resources.short(cds.type_url)}"
    # ACK and ask for the endpoints of the clusters just received.
    await proxy.handle(cds)
    assert proxy.eds == {cluster_name("alpha"), cluster_name("beta")}

    eds = await proxy.step()
    assert eds.type_url == EDS, f"after CDS came {resources.short(eds.type_url)}"
    assert set(assignments_of(eds)) == proxy.eds

    lds = await proxy.step()
    assert lds.type_url == LDS, f"after EDS came {resources.short(lds.type_url)}"
    assert proxy.rds == {"outbound"}

    rds = await proxy.step()
    assert rds.type_url == RDS, f"after LDS came {resources.short(rds.type_url)}"
    routed = {n for t, n in proxy.route_refs if t == CDS}
    assert {cluster_name("alpha"), cluster_name("beta")} <= routed

    await client.expect_nothing(0.2)
    return proxy


@pytest.mark.parametrize("subscribe_before_ack", [False, True], ids=["ack-first", "eds-first"])
async def test_pushes_are_ordered_cds_eds_lds_rds(port: int, subscribe_before_ack: bool) -> None:
    async with ads_stream(port, make_node("order")) as client:
        proxy = await connect_proxy(client, subscribe_before_ack=subscribe_before_ack)
        assert [resources.short(r.type_url) for r in proxy.log] == ["CDS", "EDS", "LDS", "RDS"]


@pytest.mark.parametrize("subscribe_before_ack", [False, True], ids=["ack-first", "eds-first"])
async def test_removed_cluster_outlives_the_routes_to_it(
    port: int, registry_dir: Path, subscribe_before_ack: bool
) -> None:
    beta = cluster_name("beta")
    async with ads_stream(port, make_node("removal")) as client:
        proxy = await connect_proxy(client, subscribe_before_ack=subscribe_before_ack)
        start = len(proxy.log)

        (registry_dir / "beta.yaml").unlink()
        pushes = await proxy.until(lambda r: r.type_url == CDS and beta not in clusters_of(r))
        kinds = [resources.short(r.type_url) for r in pushes]

        # Every push on the way kept routes resolvable (checked in handle);
        # the route table lost beta before the cluster list did.
        rds_index = next(
            (
                i
                for i, r in enumerate(pushes)
                if r.type_url == RDS
                and (CDS, beta) not in set().union(*(refs.of(x) for x in routes_of(r)))
            ),
            None,
        )
        assert rds_index is not None, f"no route update without beta before CDS: {kinds}"
        assert rds_index < len(pushes) - 1, kinds
        assert all(r.type_url != CDS for r in pushes[:-1]), kinds
        assert beta not in proxy.clusters
        assert proxy.eds == {cluster_name("alpha")}
        assert len(proxy.log) == start + len(pushes)
        await client.expect_nothing(0.2)


# -- 7. malformed requests ----------------------------------------------------------


@pytest.mark.parametrize(
    ("first_node", "type_url", "names", "message"),
    [
        pytest.param(None, CDS, [], "node.id", id="no-node"),
        pytest.param(make_node("x", without=[node.SERVICE]), CDS, [], "SERVICE", id="no-service"),
        pytest.param(make_node("x"), "", [], "type_url", id="no-type-url"),
        pytest.param(make_node("x"), EDS, ["n" * 1025], "1025", id="long-name"),
    ],
)
async def test_malformed_request_is_invalid_argument(
    port: int,
    first_node: base_pb2.Node | None,
    type_url: str,
    names: list[str],
    message: str,
) -> None:
    async with ads_stream(port, first_node) as client:
        await client.request(type_url, names)
        err = await client.status()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.details() or "")


async def test_long_name_after_a_good_start_ends_the_stream(port: int) -> None:
    async with ads_stream(port, make_node("long")) as client:
        await client.request(CDS)
        response = await client.recv()
        await client.ack(response)
        await client.request(EDS, ["n" * (server.MAX_NAME_LENGTH + 1)])
        err = await client.status()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# A name list long enough to be looked up by its encoding (server._names_wire).
MANY_NAMES = [f"outbound|8080||svc-{i:03}.default.svc.cluster.local" for i in range(100)]


def count_name_reads(monkeypatch: pytest.MonkeyPatch, at_least: int) -> list[int]:
    """The lengths of the name lists the server reads into sets, of those of
    `at_least` names."""
    reads: list[int] = []
    names_of = server._names_of

    def counted(field: Any) -> frozenset[str]:
        if len(field) >= at_least:
            reads.append(len(field))
        return names_of(field)

    monkeypatch.setattr(server, "_names_of", counted)
    return reads


def acked(state: server.TypeState, response: Response) -> Callable[[], bool]:
    return lambda: state.acked_version == response.version_info


def serve_assignments(
    snapshots: cache.SnapshotCache, proxy: base_pb2.Node, names: Iterable[str]
) -> None:
    """An empty ClusterLoadAssignment of each name, for the proxy."""
    made = [endpoint_pb2.ClusterLoadAssignment(cluster_name=name) for name in names]
    snapshot = cache.Snapshot(
        groups={
            EDS: (
                cache.ResourceGroup(
                    cache.Resource.from_message(EDS, c.cluster_name, c) for c in made
                ),
            )
        }
    )
    snapshots.set_snapshot(snapshots.key_of(cache.Client(proxy)), snapshot)


async def test_a_long_name_list_is_read_once_for_every_stream_that_sends_it(
    bare_server: tuple[int, cache.SnapshotCache, server.AdsServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every sidecar's EDS request names every cluster, and in SotW so does
    each of its ACKs: while a stream holds the list, another sending it is
    not read into a set again but found by its encoding. What else the
    requests carry (version, nonce) still counts."""
    bound, snapshots, ads = bare_server
    reads = count_name_reads(monkeypatch, server._KEYED_BY_WIRE_FROM)
    async with contextlib.AsyncExitStack() as streams:
        states = []
        for i in range(3):
            n = make_node(f"long-list-{i}")
            serve_assignments(snapshots, n, MANY_NAMES)
            client = await streams.enter_async_context(ads_stream(bound, n))
            await client.request(CDS)  # the node goes with this one
            await client.recv()
            await client.request(EDS, MANY_NAMES)
            response = await client.recv()
            assert set(assignments_of(response)) == set(MANY_NAMES)
            await client.ack(response, MANY_NAMES)
            (conn,) = (c for c in ads.connections.values() if c.node_id == n.id)
            eds = conn.types[EDS]
            await eventually(acked(eds, response))
            assert eds.names == frozenset(MANY_NAMES)
            states.append((client, eds))
        assert reads == [len(MANY_NAMES)], "read once, for the first request of the first stream"

        # Another list is another encoding: read anew, once too.
        for client, eds in states:
            await client.request(EDS, MANY_NAMES[:-1], version=eds.acked_version, nonce=eds.nonce)
            fewer = await client.recv()
            assert set(assignments_of(fewer)) == set(MANY_NAMES[:-1])
            await client.ack(fewer, MANY_NAMES[:-1])
            await eventually(acked(eds, fewer))
            assert eds.names == frozenset(MANY_NAMES[:-1])
        assert reads == [len(MANY_NAMES), len(MANY_NAMES) - 1]

    # Every stream gone, the lists went with them (as all they asked for,
    # tests/security): a sidecar connecting alone has its list read anew.
    n = make_node("long-list-alone")
    serve_assignments(snapshots, n, MANY_NAMES)
    async with ads_stream(bound, n) as client:
        await client.request(CDS)
        await client.recv()
        await client.request(EDS, MANY_NAMES)
        assert set(assignments_of(await client.recv())) == set(MANY_NAMES)
    assert reads == [len(MANY_NAMES), len(MANY_NAMES) - 1, len(MANY_NAMES)]


async def test_a_long_list_over_the_limits_is_refused_every_time_it_is_sent(
    bare_server: tuple[int, cache.SnapshotCache, server.AdsServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound, _, _ = bare_server
    reads = count_name_reads(monkeypatch, server._KEYED_BY_WIRE_FROM)
    too_long = [*MANY_NAMES, "n" * (server.MAX_NAME_LENGTH + 1)]
    for i in range(2):
        async with ads_stream(bound, make_node(f"long-refused-{i}")) as client:
            await client.request(CDS)  # the node goes with this one
            await client.request(EDS, too_long)
            err = await client.status()
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reads == [len(too_long)] * 2, "read and refused each time, never kept"


# -- 8. the bytes on the wire ---------------------------------------------------------


async def test_response_bytes_parse_as_discovery_response(
    bare_server: tuple[int, cache.SnapshotCache, server.AdsServer],
) -> None:
    bound, snapshots, _ = bare_server
    n = make_node("wire")
    made = [
        cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC) for name in ("one", "two")
    ]
    snapshots.set_snapshot(
        snapshots.key_of(cache.Client(n)),
        cache.Snapshot(
            groups={
                CDS: (
                    cache.ResourceGroup(cache.Resource.from_message(CDS, c.name, c) for c in made),
                )
            }
        ),
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{bound}")
    try:
        raw_call = channel.stream_stream(
            ADS_METHOD,
            request_serializer=Request.SerializeToString,
            response_deserializer=None,  # the bytes as the server wrote them
        )()
        try:
            await raw_call.write(Request(node=n, type_url=CDS))
            raw = await asyncio.wait_for(raw_call.read(), PUSH_TIMEOUT)
        finally:
            raw_call.cancel()
    finally:
        await channel.close()

    assert isinstance(raw, bytes)
    parsed = Response.FromString(raw)
    # Nothing the parser skipped as unknown: without the unknown fields,
    # re-encoding gives the very same bytes back.
    parsed.DiscardUnknownFields()
    assert parsed.SerializeToString() == raw
    assert parsed.type_url == CDS
    assert parsed.version_info
    assert parsed.nonce
    assert [r.type_url for r in parsed.resources] == [CDS, CDS]
    got = unpack_clusters(parsed)
    assert [c.name for c in got] == ["one", "two"]
    for cluster, resource in zip(got, parsed.resources, strict=True):
        cluster.DiscardUnknownFields()
        assert cluster.SerializeToString(deterministic=True) == resource.value
    assert got == made


@pytest.fixture
def xds_security() -> str:
    """This suite speaks the xDS protocol with a bare client: plain text."""
    return "insecure"
