"""The cache: pre-encoded bytes are exactly what protobuf would produce."""

from __future__ import annotations

import asyncio
import gc

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from shoal.xds import cache, memo, resources, wire


def _cluster(name: str, timeout_s: int = 1) -> cache.Resource:
    c = cluster_pb2.Cluster(name=name)
    c.connect_timeout.seconds = timeout_s
    return cache.Resource.from_message(resources.CLUSTER, name, c)


def test_preencoded_response_parses_as_a_discovery_response() -> None:
    view = cache.make_view([_cluster("b"), _cluster("a")])
    body = (
        wire.length_delimited(1, view.version.encode())
        + view.encoded
        + wire.length_delimited(4, resources.CLUSTER.encode())
        + wire.length_delimited(5, b"7")
    )
    response = discovery_pb2.DiscoveryResponse.FromString(body)
    assert response.version_info == view.version
    assert response.type_url == resources.CLUSTER
    assert response.nonce == "7"
    names = []
    for item in response.resources:
        c = cluster_pb2.Cluster()
        assert item.Unpack(c)
        names.append(c.name)
    assert names == ["a", "b"]
    # And byte for byte what protobuf itself would write.
    expected = discovery_pb2.DiscoveryResponse(
        version_info=view.version,
        resources=[r.as_any() for r in view.resources],
        type_url=resources.CLUSTER,
        nonce="7",
    )
    assert body == expected.SerializeToString()


def test_a_resource_in_pieces_is_sent_as_protobuf_writes_it_whole() -> None:
    """A route table is kept in the pieces it is assembled from; its
    response fields are joined from them and must be the bytes protobuf
    writes for the whole message (lengths of one to three varint bytes, and
    an empty message, whose Any has no value field)."""
    for pieces in [(), (b"",), (b"\x0a\x03abc",), (b"x" * 100, b"y" * 300), (b"z" * 70_000, b"w")]:
        whole = b"".join(pieces)
        resource = cache.Resource(resources.ROUTE, "outbound", pieces, "v1")
        assert resource.body == whole
        assert resource.size == len(whole)
        expected = cache.Resource(resources.ROUTE, "outbound", whole, "v1")
        message = any_pb2.Any(type_url=resources.ROUTE, value=whole)
        sotw = discovery_pb2.DiscoveryResponse(resources=[message]).SerializeToString()
        assert resource.sotw_field == expected.sotw_field == sotw
        delta = discovery_pb2.DeltaDiscoveryResponse(
            resources=[discovery_pb2.Resource(version="v1", resource=message, name="outbound")]
        ).SerializeToString()
        assert resource.delta_field == expected.delta_field == delta


def test_versions_are_content_hashes() -> None:
    assert _cluster("a").version == _cluster("a").version
    assert _cluster("a").version != _cluster("a", timeout_s=2).version
    v1 = cache.make_view([_cluster("a"), _cluster("b")]).version
    v2 = cache.make_view([_cluster("b"), _cluster("a")]).version
    assert v1 == v2
    assert v1 != cache.make_view([_cluster("a")]).version


def test_views_are_shared_between_equal_subscriptions_while_one_is_held() -> None:
    """The server interns subscriptions: streams asking for the same names
    hold one set, and share one view of it, for as long as one holds it."""
    intern: memo.Interned[frozenset[str]] = memo.Interned()
    group = cache.ResourceGroup([_cluster("a"), _cluster("b"), _cluster("c")])
    held = intern(frozenset({"a", "b"}))
    one = group.view(held)
    two = group.view(intern(frozenset({"b", "a"})))
    assert one is two
    assert [r.name for r in one.resources] == ["a", "b"]
    assert [r.name for r in group.view(None).resources] == ["a", "b", "c"]
    # Nobody holds the subscription any more: nothing is kept for it.
    assert len(intern) == 1
    del held
    gc.collect()
    assert len(intern) == 0
    assert group.view(intern(frozenset({"a", "b"}))) is not one


async def test_watches_fire_on_their_key_only() -> None:
    snapshots = cache.SnapshotCache(lambda client: str(client.node))
    mine, other = asyncio.Event(), asyncio.Event()
    w = snapshots.watch(cache.Client("k1"), mine)
    snapshots.watch(cache.Client("k2"), other)
    assert not mine.is_set()
    snap = cache.Snapshot({resources.CLUSTER: (cache.ResourceGroup([_cluster("a")]),)})
    snapshots.set_snapshot("k1", snap)
    assert mine.is_set() and not other.is_set()
    assert w.snapshot is snap
    idle: list[str] = []
    snapshots.on_idle = idle.append
    snapshots.cancel(w)
    assert idle == ["k1"]


def test_a_group_with_some_resources_replaced_keeps_its_order() -> None:
    group = cache.ResourceGroup([_cluster("a"), _cluster("b"), _cluster("c")])
    b2 = _cluster("b", timeout_s=2)
    replaced = group.replaced({"b": b2})
    assert replaced is not None and replaced is not group
    assert [r.name for r in replaced] == ["a", "b", "c"]
    assert replaced.get("b") is b2 and replaced.get("a") is group.get("a")
    assert group.get("b") is not b2, "the group itself is unchanged"
    assert group.replaced({"d": _cluster("d")}) is None, "a name it lacks is not a replacement"
