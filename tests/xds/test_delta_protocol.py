"""Delta (incremental) ADS, spoken by a real grpc.aio client to the real server.

Each test drives `DeltaAggregatedResources` over 127.0.0.1 the way a delta
Envoy does (node on the first request, subscribe and unsubscribe by name,
ACK/NACK by nonce alone, `initial_resource_versions` on reconnect) and checks
what comes back: only what changed, removals by name, and what must *not*
come back (the world, resend loops, names no longer subscribed to).
Reference: Envoy's api/xds_protocol.rst, "Incremental xDS".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf.message import Message

from shoal import cli
from shoal.xds import cache, resources, server
from shoal.xds.translate import refs
from tests.conftest import write
from tests.xds import stream
from tests.xds.test_ads_protocol import (
    CDS,
    EDS,
    LDS,
    MANY_NAMES,
    RDS,
    cluster_name,
    count_name_reads,
    eds_names,
    eventually,
    make_node,
    serve_assignments,
    service_manifest,
)

Response = discovery_pb2.DeltaDiscoveryResponse
Request = discovery_pb2.DeltaDiscoveryRequest

ALPHA = cluster_name("alpha")
BETA = cluster_name("beta")
GAMMA = cluster_name("gamma")
# What the sidecar of `make_node` gets besides the Services' clusters.
INBOUND = "inbound|8080||"

MESSAGE_TYPES: dict[str, type[Message]] = {
    CDS: cluster_pb2.Cluster,
    EDS: endpoint_pb2.ClusterLoadAssignment,
    LDS: listener_pb2.Listener,
    RDS: route_pb2.RouteConfiguration,
}


class DeltaClient(stream.StreamClient[Request, Response]):
    """One delta ADS stream."""

    def __init__(self, channel: grpc.aio.Channel, first_node: base_pb2.Node | None) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        super().__init__(stub.DeltaAggregatedResources(), first_node, Response, describe)

    async def request(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        nonce: str = "",
        error: str | None = None,
        initial: Mapping[str, str] | None = None,
    ) -> None:
        req = Request(
            type_url=type_url,
            resource_names_subscribe=sorted(subscribe),
            resource_names_unsubscribe=sorted(unsubscribe),
            response_nonce=nonce,
        )
        if initial:
            req.initial_resource_versions.update(initial)
        await self.send(req, error)

    async def ack(self, response: Response) -> None:
        await self.request(response.type_url, nonce=response.nonce)

    async def nack(self, response: Response, error: str) -> None:
        await self.request(response.type_url, nonce=response.nonce, error=error)


def delta_stream(
    port: int, first_node: base_pb2.Node | None
) -> contextlib.AbstractAsyncContextManager[DeltaClient]:
    return stream.open_stream(port, lambda channel: DeltaClient(channel, first_node))


def describe(response: Response) -> str:
    return (
        f"{resources.short(response.type_url)} nonce {response.nonce}: "
        f"resources {sorted(r.name for r in response.resources)}, "
        f"removed {sorted(response.removed_resources)}"
    )


def versions(response: Response) -> dict[str, str]:
    """Name -> version of every resource in a response, checking each is a
    whole Resource: a name, a version and a body of the response's type
    that names itself the same."""
    out: dict[str, str] = {}
    for r in response.resources:
        assert r.name, "a delta Resource without a name"
        assert r.version, f"{r.name} has no version"
        assert r.resource.type_url == response.type_url, r.resource.type_url
        assert r.name not in out, f"{r.name} twice in one response"
        out[r.name] = r.version
    return out


def unpack(response: Response) -> dict[str, Message]:
    """The resources of a response, by name."""
    out: dict[str, Message] = {}
    for r in response.resources:
        message = MESSAGE_TYPES[response.type_url]()
        assert r.resource.Unpack(message), f"{r.resource.type_url} does not unpack"
        out[r.name] = message
    return out


def endpoint_ports(response: Response) -> dict[str, set[int]]:
    assert response.type_url == EDS, describe(response)
    out: dict[str, set[int]] = {}
    for name, cla in unpack(response).items():
        assert isinstance(cla, endpoint_pb2.ClusterLoadAssignment)
        assert cla.cluster_name == name
        out[name] = {
            lb.endpoint.address.socket_address.port_value
            for locality in cla.endpoints
            for lb in locality.lb_endpoints
        }
    return out


def server_names(control_plane: cli.ControlPlane, type_url: str) -> set[str]:
    """Every resource of a type the server has for the (only) connected proxy."""
    snapshot = only_connection(control_plane).snapshot
    assert snapshot is not None
    return {r.name for r in snapshot.resources(type_url)}


def only_connection(control_plane: cli.ControlPlane) -> server.Connection:
    (conn,) = control_plane.ads.connections.values()
    return conn


@dataclass
class DeltaProxy(stream.Converging[Response]):
    """What a delta Envoy holds, updated from responses as Envoy would
    (resources replace by name, removals delete), with the check that it is
    never routing to a cluster it does not have."""

    client: DeltaClient
    # Envoy asks for new clusters' endpoints before it ACKs the clusters; a
    # simpler client ACKs first. The server must order pushes either way.
    subscribe_before_ack: bool = False
    held: dict[str, dict[str, Message]] = field(
        default_factory=lambda: {t: {} for t in (CDS, EDS, LDS, RDS)}
    )
    eds: set[str] = field(default_factory=set)
    rds: set[str] = field(default_factory=set)
    log: list[Response] = field(default_factory=list)

    @property
    def clusters(self) -> set[str]:
        return set(self.held[CDS])

    def named(self, *types: str) -> set[tuple[str, str]]:
        return {ref for t in types for m in self.held[t].values() for ref in refs.of(m)}

    def check_routes_resolve(self) -> None:
        named = {n for t, n in self.named(LDS, RDS) if t == CDS}
        missing = named - self.clusters
        assert not missing, f"routes name clusters the proxy does not hold: {missing}"

    async def follow(self, type_url: str, have: set[str], want: set[str]) -> None:
        """Change a named subscription: subscribe and unsubscribe the difference."""
        if want != have:
            await self.client.request(type_url, want - have, have - want)

    async def handle(self, response: Response) -> None:
        """Apply a response, ACK it, and change subscriptions as it needs."""
        self.log.append(response)
        held = self.held[response.type_url]
        held.update(unpack(response))
        for name in response.removed_resources:
            held.pop(name, None)
        if response.type_url == CDS:
            wanted = eds_names(
                c for c in self.held[CDS].values() if isinstance(c, cluster_pb2.Cluster)
            )
            if not self.subscribe_before_ack:
                await self.client.ack(response)
            await self.follow(EDS, self.eds, wanted)
            self.eds = wanted
            if self.subscribe_before_ack:
                await self.client.ack(response)
        elif response.type_url == LDS:
            await self.client.ack(response)
            wanted = {n for t, n in self.named(LDS) if t == RDS}
            await self.follow(RDS, self.rds, wanted)
            self.rds = wanted
        else:
            await self.client.ack(response)
        self.check_routes_resolve()


async def connect_proxy(client: DeltaClient, *, subscribe_before_ack: bool = False) -> DeltaProxy:
    """Connect with wildcard CDS and LDS and converge, checking push order."""
    proxy = DeltaProxy(client, subscribe_before_ack=subscribe_before_ack)
    await client.request(CDS)
    await client.request(LDS)

    cds = await proxy.step()
    assert cds.type_url == CDS, f"first push is {describe(cds)}"
    assert proxy.eds == {ALPHA, BETA}

    eds = await proxy.step()
    assert eds.type_url == EDS, f"after CDS came {describe(eds)}"
    assert set(versions(eds)) == {ALPHA, BETA}

    lds = await proxy.step()
    assert lds.type_url == LDS, f"after EDS came {describe(lds)}"
    assert proxy.rds == {"outbound"}

    rds = await proxy.step()
    assert rds.type_url == RDS, f"after LDS came {describe(rds)}"
    assert {(CDS, ALPHA), (CDS, BETA)} <= proxy.named(RDS)

    await client.expect_nothing(0.2)
    return proxy


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


# -- 1. wildcard CDS and ACK ----------------------------------------------------


async def test_wildcard_cds_gets_every_cluster_and_ack_settles(
    port: int, control_plane: cli.ControlPlane
) -> None:
    async with delta_stream(port, make_node("wildcard")) as client:
        await client.request(CDS)
        first = await client.recv()
        assert first.type_url == CDS
        assert first.nonce
        assert not first.removed_resources

        got = versions(first)
        assert set(got) == {ALPHA, BETA, INBOUND}
        assert set(got) == server_names(control_plane, CDS)
        for name, cluster in unpack(first).items():
            assert isinstance(cluster, cluster_pb2.Cluster)
            assert cluster.name == name

        await client.ack(first)
        await client.expect_nothing()

        state = only_connection(control_plane).types[CDS]
        assert state.wildcard
        assert not state.in_flight
        assert state.held.names == set(got)
        assert {r.name: r.version for r in state.held.resources} == got


# -- 2. one endpoint change -----------------------------------------------------


async def test_one_endpoint_change_sends_one_assignment(port: int, registry_dir: Path) -> None:
    async with delta_stream(port, make_node("one-change")) as client:
        proxy = await connect_proxy(client)
        before = len(proxy.log)

        write(registry_dir, "alpha.yaml", service_manifest("alpha", 9011))
        changed = await proxy.step()
        assert changed.type_url == EDS, describe(changed)
        assert endpoint_ports(changed) == {ALPHA: {9011}}, "not only the changed assignment"
        assert not changed.removed_resources
        assert changed.nonce not in {r.nonce for r in proxy.log[:before]}

        # Nothing else follows: no CDS, LDS or RDS, no second EDS.
        await client.expect_nothing()
        assert len(proxy.log) == before + 1


async def test_an_endpoints_ack_is_taken_without_waking_the_stream(
    port: int, registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    """Nothing else is due when endpoints go out, so their ACK is taken as
    it is read: the stream's task is not woken to look for more to send.
    The ACK counts all the same, and the next change goes out."""
    async with delta_stream(port, make_node("ack-alone")) as client:
        proxy = await connect_proxy(client)
        ads = control_plane.ads
        taken: list[tuple[str, str]] = []
        take_answer = ads._take_answer

        def noted(conn: server.Connection, request: Any) -> bool:
            took = take_answer(conn, request)
            if took:
                taken.append((request.type_url, request.response_nonce))
            return took

        ads._take_answer = noted  # type: ignore[method-assign]
        for port_now in (9011, 9012):
            write(registry_dir, "alpha.yaml", service_manifest("alpha", port_now))
            changed = await proxy.step()  # and ACKed
            assert endpoint_ports(changed) == {ALPHA: {port_now}}
            eds = only_connection(control_plane).types[EDS]

            def acked(
                state: server.TypeState = eds, version: str = changed.system_version_info
            ) -> bool:
                return state.acked_version == version and not state.in_flight

            await eventually(acked)
            assert (EDS, changed.nonce) in taken, "its ACK went through the stream's task"
            await client.expect_nothing()


async def test_an_updated_cluster_gets_its_endpoints_again(port: int, registry_dir: Path) -> None:
    """Envoy warms an updated cluster on a ClusterLoadAssignment and does
    not ask for one again (it is subscribed): without one it waits out the
    15 s initial fetch timeout. So the unchanged assignment follows the
    changed cluster."""
    async with delta_stream(port, make_node("cluster-update")) as client:
        proxy = await connect_proxy(client)
        outlier = (
            "\n  annotations: "
            "{shoal.io/outlier: 'consecutive-5xx=3, ejection=10s, max-ejection=50%'}"
        )
        write(
            registry_dir,
            "alpha.yaml",
            service_manifest("alpha", 9001).replace(
                "namespace: default", f"namespace: default{outlier}", 1
            ),
        )
        cds = await proxy.step()
        assert cds.type_url == CDS and set(versions(cds)) == {ALPHA}, describe(cds)
        eds = await proxy.step()
        assert eds.type_url == EDS, describe(eds)
        assert endpoint_ports(eds) == {ALPHA: {9001}}, "not the updated cluster's endpoints"
        await client.expect_nothing()


# -- 3. subscribe and unsubscribe by name ---------------------------------------


async def test_eds_subscribe_unsubscribe_and_absent_names(
    port: int, registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    nope = cluster_name("nope")
    async with delta_stream(port, make_node("names")) as client:
        await client.request(EDS, [ALPHA, BETA])
        both = await client.recv()
        assert endpoint_ports(both) == {ALPHA: {9001}, BETA: {9002}}
        assert not both.removed_resources
        alpha_version = versions(both)[ALPHA]
        await client.ack(both)
        await client.expect_nothing(0.2)

        # Unsubscribing needs no answer...
        await client.request(EDS, unsubscribe=[ALPHA])
        await client.expect_nothing(0.2)
        # ...and a change to what was unsubscribed is not sent.
        write(registry_dir, "alpha.yaml", service_manifest("alpha", 9011))
        conn = only_connection(control_plane)

        def alpha_changed() -> bool:
            snapshot = conn.snapshot
            found = snapshot.get(EDS, ALPHA) if snapshot is not None else None
            return found is not None and found.version != alpha_version

        await eventually(alpha_changed)
        await client.expect_nothing()

        # A name that does not exist is reported as removed, once.
        await client.request(EDS, [nope])
        absent = await client.recv()
        assert absent.type_url == EDS
        assert list(absent.removed_resources) == [nope]
        assert not absent.resources
        await client.ack(absent)
        await client.expect_nothing()

        # A change to what is still subscribed: that one only, and the
        # absent name is not reported again.
        write(registry_dir, "beta.yaml", service_manifest("beta", 9012))
        beta_changed = await client.recv()
        assert endpoint_ports(beta_changed) == {BETA: {9012}}
        assert not beta_changed.removed_resources
        await client.ack(beta_changed)
        await client.expect_nothing(0.2)

        # Subscribing again to what was dropped sends its current state.
        await client.request(EDS, [ALPHA])
        again = await client.recv()
        assert endpoint_ports(again) == {ALPHA: {9011}}
        await client.ack(again)
        await client.expect_nothing(0.2)

        # Even if it did not change meanwhile: the client forgot it.
        await client.request(EDS, unsubscribe=[BETA])
        await client.request(EDS, [BETA])
        resent = await client.recv()
        assert endpoint_ports(resent) == {BETA: {9012}}
        assert not resent.removed_resources
        await client.ack(resent)
        await client.expect_nothing(0.2)


# -- 4. deleting a Service ------------------------------------------------------


@pytest.mark.parametrize("subscribe_before_ack", [False, True], ids=["ack-first", "eds-first"])
async def test_deleted_service_is_removed_after_routes_stop_naming_it(
    port: int, registry_dir: Path, subscribe_before_ack: bool
) -> None:
    async with delta_stream(port, make_node("removal")) as client:
        proxy = await connect_proxy(client, subscribe_before_ack=subscribe_before_ack)
        start = len(proxy.log)

        (registry_dir / "beta.yaml").unlink()
        pushes = await proxy.until(lambda r: r.type_url == CDS and BETA in r.removed_resources)
        kinds = [describe(r) for r in pushes]

        # The cluster removal is the last push, alone: nothing was re-sent.
        removal = pushes[-1]
        assert list(removal.removed_resources) == [BETA], kinds
        assert not removal.resources, kinds
        assert all(r.type_url != CDS for r in pushes[:-1]), kinds

        # Its assignment was removed by name on EDS.
        assert any(r.type_url == EDS and BETA in r.removed_resources for r in pushes), kinds
        assert all(r.type_url != EDS or not r.resources for r in pushes), kinds

        # The routes lost beta before the cluster went (and every push on the
        # way kept routes resolvable: checked in handle).
        rds_index = next(
            (
                i
                for i, r in enumerate(pushes)
                if r.type_url == RDS
                and r.resources
                and all((CDS, BETA) not in refs.of(m) for m in unpack(r).values())
            ),
            None,
        )
        assert rds_index is not None, f"no route update without beta: {kinds}"
        assert rds_index < len(pushes) - 1, kinds
        assert (CDS, BETA) not in proxy.named(RDS)
        assert BETA not in proxy.clusters
        assert ALPHA in proxy.clusters
        assert proxy.eds == {ALPHA}
        assert BETA not in proxy.held[EDS]
        assert len(proxy.log) == start + len(pushes)

        # The client unsubscribed beta's endpoints (in handle); that needs
        # no answer, and nothing else is pending.
        last_two = [list(r.resource_names_unsubscribe) for r in client.sent[-2:]]
        assert [BETA] in last_two, last_two
        await client.expect_nothing(0.2)


# -- 5. reconnecting with initial_resource_versions -----------------------------


async def test_reconnect_with_initial_resource_versions(
    port: int, registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    async with delta_stream(port, make_node("before")) as client:
        await client.request(CDS)
        first = await client.recv()
        known = versions(first)
        await client.ack(first)
    assert set(known) == {ALPHA, BETA, INBOUND}

    # Everything current: nothing is sent.
    async with delta_stream(port, make_node("again")) as client:
        await client.request(CDS, initial=known)
        await client.expect_nothing()
        # Still subscribed (wildcard): a new cluster comes, alone.
        write(registry_dir, "gamma.yaml", service_manifest("gamma", 9003))
        added = await client.recv()
        assert added.type_url == CDS
        assert set(versions(added)) == {GAMMA}
        assert not added.removed_resources
        known.update(versions(added))
        await client.ack(added)

    (registry_dir / "beta.yaml").unlink()
    await eventually(lambda: all(k.name != "beta" for k in control_plane.controller.state.services))
    await eventually(lambda: not control_plane.ads.connections)

    # One stale version and one name the server no longer has.
    stale = {**known, ALPHA: "an-old-version"}
    async with delta_stream(port, make_node("outdated")) as client:
        await client.request(CDS, initial=stale)
        update = await client.recv()
        assert update.type_url == CDS
        assert versions(update) == {ALPHA: known[ALPHA]}
        assert list(update.removed_resources) == [BETA]
        await client.ack(update)
        await client.expect_nothing()


async def test_named_reconnect_and_subscribing_again(port: int) -> None:
    async with delta_stream(port, make_node("named-before")) as client:
        await client.request(EDS, [ALPHA, BETA])
        first = await client.recv()
        known = versions(first)
        await client.ack(first)
    assert set(known) == {ALPHA, BETA}

    async with delta_stream(port, make_node("named-again")) as client:
        # What a reconnecting client says it holds is not sent again...
        await client.request(EDS, [ALPHA, BETA], initial=known)
        await client.expect_nothing()
        # ...but a name subscribed to again later is, even unchanged: the
        # client may have forgotten it (xds_protocol.rst, "Subscribing to
        # Resources").
        await client.request(EDS, [ALPHA])
        again = await client.recv()
        assert versions(again) == {ALPHA: known[ALPHA]}
        assert not again.removed_resources
        await client.ack(again)
        await client.expect_nothing(0.2)


# -- 6. NACK --------------------------------------------------------------------


async def test_nack_is_not_answered_with_a_resend(
    port: int, registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    ads = control_plane.ads
    assert ads.nacks_total == 0
    async with delta_stream(port, make_node("nack")) as client:
        await client.request(CDS)
        rejected = await client.recv()
        assert rejected.resources
        await client.nack(rejected, "cluster is bad")
        await client.expect_nothing()
        assert ads.nacks_total == 1
        state = only_connection(control_plane).types[CDS]
        assert state.error == "cluster is bad"
        assert not state.in_flight

        write(registry_dir, "gamma.yaml", service_manifest("gamma", 9003))
        fixed = await client.recv()
        assert fixed.type_url == CDS
        assert fixed.nonce != rejected.nonce
        # Nothing was ACKed, so everything comes again, with gamma.
        assert set(versions(fixed)) == {ALPHA, BETA, GAMMA, INBOUND}
        assert ads.nacks_total == 1

        await client.ack(fixed)
        await client.expect_nothing(0.2)
        assert state.error == ""
        assert ads.nacks_total == 1


# -- 7. explicit wildcard -------------------------------------------------------


async def test_explicit_wildcard_subscribe_and_unsubscribe(
    port: int, registry_dir: Path, control_plane: cli.ControlPlane
) -> None:
    async with delta_stream(port, make_node("star")) as client:
        # Naming a cluster on the first request is not a wildcard.
        await client.request(CDS, [ALPHA])
        named = await client.recv()
        assert set(versions(named)) == {ALPHA}
        held = versions(named)
        await client.ack(named)
        await client.expect_nothing(0.2)

        await client.request(CDS, ["*"])
        rest = await client.recv()
        assert rest.type_url == CDS
        assert not rest.removed_resources
        held.update(versions(rest))
        assert set(held) == {ALPHA, BETA, INBOUND} == server_names(control_plane, CDS)
        await client.ack(rest)
        await client.expect_nothing(0.2)

        # Under the wildcard, a new cluster arrives unasked.
        write(registry_dir, "gamma.yaml", service_manifest("gamma", 9003))
        added = await client.recv()
        assert set(versions(added)) == {GAMMA}
        await client.ack(added)
        await client.expect_nothing(0.2)

        # Without it, only the named cluster is subscribed to: the server may
        # tell the client to drop what came from the wildcard, but it sends
        # nothing new and never removes the named one.
        await client.request(CDS, unsubscribe=["*"])
        while True:
            try:
                dropped = await client.recv(stream.QUIET)
            except TimeoutError:
                break
            assert dropped.type_url == CDS
            assert not dropped.resources, describe(dropped)
            assert ALPHA not in dropped.removed_resources, describe(dropped)
            await client.ack(dropped)
        assert not only_connection(control_plane).types[CDS].wildcard

        write(registry_dir, "delta.yaml", service_manifest("delta", 9004))
        await eventually(lambda: cluster_name("delta") in server_names(control_plane, CDS))
        await client.expect_nothing()


# -- 8. malformed requests ------------------------------------------------------


LONG = "n" * (server.MAX_NAME_LENGTH + 1)


@pytest.mark.parametrize(
    ("first_node", "subscribe", "unsubscribe", "initial", "message"),
    [
        pytest.param(None, [], [], None, "node.id", id="no-node"),
        pytest.param(base_pb2.Node(), [], [], None, "node.id", id="node-without-id"),
        pytest.param(make_node("x"), [LONG], [], None, "1025", id="long-subscribe"),
        pytest.param(make_node("x"), [], [LONG], None, "1025", id="long-unsubscribe"),
        pytest.param(make_node("x"), [], [], {LONG: "v"}, "1025", id="long-initial-version"),
    ],
)
async def test_malformed_request_is_invalid_argument(
    port: int,
    first_node: base_pb2.Node | None,
    subscribe: list[str],
    unsubscribe: list[str],
    initial: dict[str, str] | None,
    message: str,
) -> None:
    async with delta_stream(port, first_node) as client:
        await client.request(EDS, subscribe, unsubscribe, initial=initial)
        err = await client.status()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.details() or "")


async def test_long_name_after_a_good_start_ends_the_stream(port: int) -> None:
    async with delta_stream(port, make_node("long")) as client:
        await client.request(CDS)
        response = await client.recv()
        await client.ack(response)
        await client.request(EDS, [LONG])
        err = await client.status()
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def xds_security() -> str:
    """This suite speaks the xDS protocol with a bare client: plain text."""
    return "insecure"


async def test_a_long_subscription_is_read_once_while_a_stream_holds_it(
    bare_server: tuple[int, cache.SnapshotCache, server.AdsServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each sidecar subscribes to every cluster's endpoints in one request:
    read once, then found by its encoding. A request carrying more than
    the list (what a reconnecting client holds) is read the long way, and
    a subscription added to one already held is the union of both."""
    bound, snapshots, ads = bare_server
    reads = count_name_reads(monkeypatch, server._KEYED_BY_WIRE_FROM)
    async with contextlib.AsyncExitStack() as streams:
        for i, initial in enumerate([{}, {}, {MANY_NAMES[0]: "old"}]):
            n = make_node(f"delta-long-{i}")
            serve_assignments(snapshots, n, MANY_NAMES)
            client = await streams.enter_async_context(delta_stream(bound, n))
            await client.request(CDS)  # the node goes with this one
            await client.request(EDS, MANY_NAMES, initial=initial)
            response = await client.recv()
            assert set(versions(response)) == set(MANY_NAMES)
            await client.ack(response)
            (conn,) = (c for c in ads.connections.values() if c.node_id == n.id)
            assert conn.types[EDS].names == frozenset(MANY_NAMES)
        assert reads == [len(MANY_NAMES)] * 2, "read once, and once more with initial versions"

        n = make_node("delta-long-halves")
        more = [f"more-{i:03}" for i in range(len(MANY_NAMES))]
        serve_assignments(snapshots, n, [*MANY_NAMES, *more])
        client = await streams.enter_async_context(delta_stream(bound, n))
        await client.request(CDS)
        await client.request(EDS, MANY_NAMES)
        await client.ack(await client.recv())
        await client.request(EDS, more)
        response = await client.recv()
        assert set(versions(response)) == set(more), describe(response)
        (conn,) = (c for c in ads.connections.values() if c.node_id == n.id)
        assert conn.types[EDS].names == frozenset([*MANY_NAMES, *more])
