"""Bad clients are handled on their own stream and never slow the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc

from shoal import cli
from shoal.observe import metrics
from shoal.xds import budget, cache, controller, resources, server, status
from tests.conftest import write
from tests.e2e.helpers import eventually
from tests.xds.conftest import serving
from tests.xds.test_ads_protocol import (
    CDS,
    Request,
    ads_stream,
    make_node,
    service_manifest,
)


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "registry"
    folder.mkdir()
    write(folder, "alpha.yaml", service_manifest("alpha", 9001))
    return folder


async def test_an_unserved_type_is_ignored_and_the_stream_goes_on(
    control_plane: cli.ControlPlane,
) -> None:
    async with ads_stream(control_plane.xds_port, make_node("curious")) as client:
        await client.request("type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig")
        await client.expect_nothing(0.3)
        await client.request(CDS)
        response = await client.recv()
        assert response.type_url == CDS


async def test_a_client_that_never_acks_holds_only_itself(
    control_plane: cli.ControlPlane, registry_dir: Path
) -> None:
    port = control_plane.xds_port
    async with (
        ads_stream(port, make_node("mute")) as mute,
        ads_stream(port, make_node("good")) as good,
    ):
        await mute.request(CDS)
        await mute.recv()  # and never answered
        await good.request(CDS)
        await good.ack(await good.recv())

        write(registry_dir, "beta.yaml", service_manifest("beta", 9002))
        update = await good.recv()
        assert any("beta" in r.value.decode(errors="replace") for r in update.resources)
        await mute.expect_nothing(0.5)
        (conn,) = [c for c in control_plane.ads.connections.values() if c.node_id == "mute"]
        assert status.type_status(conn, CDS).status == status.STALE


# Long, so that a push that waited for the stuck stream cannot be mistaken
# for one slowed by a busy machine.
STUCK_WRITE_TIMEOUT = 20.0


def _stalled_gauge(ads: server.AdsServer) -> float:
    """What a scrape of shoal_xds_stalled_streams reads."""
    collector = metrics.ProxyMetrics(ads, lambda key: "sidecar")
    (family,) = [f for f in collector.collect() if f.name == "shoal_xds_stalled_streams"]
    (sample,) = family.samples
    return float(sample.value)


def _publish_megabytes(
    snapshots: cache.SnapshotCache, generation: int, clusters: int = 4_000
) -> None:
    """About 0.8 MB of clusters per thousand, for every proxy."""
    key = controller.Controller.key_of(cache.Client(make_node("any")))
    group = cache.ResourceGroup(
        cache.Resource.from_message(
            CDS, f"c{i}", cluster_pb2.Cluster(name=f"c{i}-{generation}" + "x" * 800)
        )
        for i in range(clusters)
    )
    snapshots.set_snapshot(key, cache.Snapshot({resources.CLUSTER: (group,)}))


@pytest.fixture(params=["default budget", "budget under one response"])
async def slow_server(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[int, cache.SnapshotCache, server.AdsServer]]:
    """With a write budget smaller than one response, the stuck stream holds
    all of it: a healthy one must still be answered (the grant stops
    counting after its stall time, far below the write timeout)."""
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    spent = budget.WriteBudget(1 << 20) if request.param != "default budget" else None
    ads = server.AdsServer(snapshots, write_timeout=STUCK_WRITE_TIMEOUT, write_budget=spent)
    async with serving(ads) as port:
        yield port, snapshots, ads


async def test_a_client_that_stops_reading_holds_one_response_at_most(
    slow_server: tuple[int, cache.SnapshotCache, server.AdsServer],
) -> None:
    """Nothing is queued per stream beyond the one response awaiting its ACK:
    a client that stops reading costs one response of memory, however many
    changes follow, and healthy streams are not slowed."""
    port, snapshots, ads = slow_server

    def publish(generation: int) -> None:
        _publish_megabytes(snapshots, generation)  # more than flow control lets through unread

    publish(0)
    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stuck = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await stuck.write(Request(node=make_node("stuck"), type_url=CDS))  # and never reads

        async def stuck_sent() -> bool:
            return any(
                c.node_id == "stuck" and CDS in c.types and c.types[CDS].in_flight
                for c in ads.connections.values()
            )

        await eventually(stuck_sent)
        async with ads_stream(port, make_node("healthy")) as healthy:
            await healthy.request(CDS)
            first = await healthy.recv()
            for generation in (1, 2, 3):
                await healthy.ack(first)
                publish(generation)
                loop = asyncio.get_running_loop()
                started = loop.time()
                first = await healthy.recv()
                # Waiting behind the stuck stream would take its write timeout.
                took = loop.time() - started
                assert took < STUCK_WRITE_TIMEOUT / 2, (
                    f"a stuck stream slowed a healthy one ({took})"
                )
            (conn,) = [c for c in ads.connections.values() if c.node_id == "stuck"]
            assert conn.types[CDS].nonce == "1", "more than one response queued for it"
            assert conn.types[CDS].in_flight
        stuck.cancel()


WRITE_STUCK_CLUSTERS = 20_000


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    """The server gives its stream up once a write has waited the write
    timeout (UNAVAILABLE, kept among the refusals), and goes on serving.
    The client is not told: grpc.aio cannot end a call whose write is still
    queued in gRPC's core, which keeps it until the client goes; the
    stream counts as stalled (and against its identity) until then."""
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ads = server.AdsServer(snapshots, write_timeout=1.0)
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((ads.handler(),))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    # More than the client's transport takes in unread (its windows grow
    # to a few MB): the write waits.
    _publish_megabytes(snapshots, 0, clusters=20_000)
    options = [("grpc.max_receive_message_length", -1)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            stuck = stub.StreamAggregatedResources()
            await stuck.write(Request(node=make_node("stuck"), type_url=CDS))  # never reads

            async def dropped() -> bool:
                return any("not reading its responses for 1s" in m for _, m in ads.refusals)

            await eventually(dropped)
            assert not ads.connections
            assert ads.stalled_streams == 1, "its call lives on in gRPC, and counts"
            assert _stalled_gauge(ads) == 1.0
            stuck.cancel()

            async def let_go() -> bool:
                return ads.stalled_streams == 0

            await eventually(let_go)
            assert _stalled_gauge(ads) == 0.0
        _publish_megabytes(snapshots, 1)
        async with ads_stream(port, make_node("healthy")) as healthy:
            await healthy.request(CDS)
            assert len((await healthy.recv()).resources) == 4_000, "and the server goes on"
    finally:
        await grpc_server.stop(grace=None)


@pytest.fixture
def xds_security() -> str:
    """This suite speaks the xDS protocol with a bare client: plain text."""
    return "insecure"
