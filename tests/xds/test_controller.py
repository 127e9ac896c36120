"""The controller: debounce, serialize-once, and the consistency gate."""

from __future__ import annotations

import asyncio
import collections
import dataclasses

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from shoal.model import mesh
from shoal.xds import cache, controller, debounce, node, resources
from shoal.xds.translate import refs
from tests.xds import fixtures


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


async def test_debounce_waits_for_quiet() -> None:
    t = FakeTime()
    d = debounce.Debouncer(0.1, 1.0, clock=t.clock, sleep=t.sleep)
    d.touch()
    t.now = 0.05
    d.touch()
    await d.settled()
    assert abs(t.now - 0.15) < 1e-9


async def test_debounce_never_waits_past_max_delay() -> None:
    t = FakeTime()
    d = debounce.Debouncer(0.1, 1.0, clock=t.clock, sleep=t.sleep)

    async def keep_touching() -> None:
        while True:
            d.touch()
            await asyncio.sleep(0)

    d.touch()
    toucher = asyncio.create_task(keep_touching())
    try:
        await d.settled()
    finally:
        toucher.cancel()
    assert 1.0 <= t.now < 1.1


def _node(outbound_port: int) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            node.NAMESPACE: "shop",
            node.SERVICE: "web",
            node.APP_PORT: 8080,
            node.INBOUND_PORT: 15006,
            node.OUTBOUND_PORT: outbound_port,
        }
    )
    return base_pb2.Node(id=f"p{outbound_port}", metadata=meta)


async def test_one_endpoint_change_serializes_one_resource_whatever_the_proxy_count() -> None:
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.1, 1.0))
    state = fixtures.state()
    ctl.update(state)
    ctl.rebuild()
    watches = [snapshots.watch(cache.Client(_node(20000 + i)), asyncio.Event()) for i in range(20)]
    assert len(snapshots.keys()) == 20
    before = {w.key: snapshots.get(w.key) for w in watches}

    web = mesh.ServiceKey("shop", "web")
    eps = (*state.endpoints[web][:-1], mesh.Endpoint("10.9.9.9", 9000, "grpc-api"))
    changed = dataclasses.replace(
        state, version=state.version + 1, endpoints={**state.endpoints, web: eps}
    )
    count = cache.serialization_count()
    ctl.update(changed)
    ctl.rebuild()
    # One ClusterLoadAssignment changed: one serialization, not one per proxy.
    assert cache.serialization_count() - count == 1
    shared = {id(snapshots.get(w.key).groups[resources.ENDPOINT][0]) for w in watches}  # type: ignore[union-attr]
    assert len(shared) == 1, "every proxy shares one endpoint group"
    for w in watches:
        new = snapshots.get(w.key)
        assert new is not None and new is not before[w.key]


async def test_resources_name_only_the_types_the_push_order_expects() -> None:
    """The server decides what a type's ACK can change from
    resources.NAMES; a translation that named another type would make it
    skip a look it needs."""
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.1, 1.0))
    ctl.update(fixtures.state())
    ctl.rebuild()
    snapshots.watch(cache.Client(_node(20000)), asyncio.Event())
    (key,) = snapshots.keys()
    snapshot = snapshots.get(key)
    assert snapshot is not None
    named: set[tuple[str, str]] = set()
    for type_url in snapshot.groups:
        for r in snapshot.resources(type_url):
            named |= {(type_url, t) for t, _ in r.refs}
    assert {(resources.LISTENER, resources.ROUTE), (resources.CLUSTER, resources.ENDPOINT)} <= named
    for type_url, target in named:
        assert target in resources.NAMES[type_url], (type_url, target)


def _cluster(name: str, eds: bool) -> cache.Resource:
    c = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.EDS if eds else cluster_pb2.Cluster.STATIC
    )
    return cache.Resource.from_message(resources.CLUSTER, name, c, refs.of(c))


def test_an_inconsistent_snapshot_is_not_published_and_is_reported() -> None:
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.1, 1.0))
    good = cache.Snapshot({resources.CLUSTER: (cache.ResourceGroup([_cluster("s", False)]),)})
    assert ctl.publish("k", good)
    bad = cache.Snapshot(
        {
            resources.CLUSTER: (cache.ResourceGroup([_cluster("e", True)]),),
            resources.ENDPOINT: (cache.ResourceGroup(),),
        }
    )
    assert not ctl.publish("k", bad)
    assert snapshots.get("k") is good
    (problem,) = ctl.problems
    assert "refers to missing EDS e" in str(problem)


async def test_debounce_says_why_a_burst_is_pushed() -> None:
    t = FakeTime()
    d = debounce.Debouncer(0.1, 1.0, clock=t.clock, sleep=t.sleep)
    d.touch(controller.MESH_CHANGED)
    d.touch(controller.MESH_CHANGED)
    d.touch("certificates of 2 identities renewed")
    reasons = await d.settled()
    assert reasons == {controller.MESH_CHANGED: 2, "certificates of 2 identities renewed": 1}
    assert debounce.describe(reasons) == ("certificates of 2 identities renewed, mesh state x2")
    d.touch()
    assert await d.settled() == {"change": 1}, "each burst has its own reasons"


def test_a_push_says_what_changed_and_why() -> None:
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.1, 1.0))
    state = fixtures.state()
    ctl.update(state)
    ctl.rebuild()
    first = ctl.recent_pushes[-1]
    assert first.changes.services == frozenset(state.services), "everything is new at first"

    web = mesh.ServiceKey("shop", "web")
    eps = (*state.endpoints[web][:-1], mesh.Endpoint("10.9.9.9", 9000, "grpc-api"))
    ctl.update(
        dataclasses.replace(
            state, version=state.version + 1, endpoints={**state.endpoints, web: eps}
        )
    )
    ctl.rebuild(collections.Counter({controller.MESH_CHANGED: 3}))
    push = ctl.recent_pushes[-1]
    assert push.number == first.number + 1
    assert push.changes.endpoints == {web} and not push.changes.services
    assert str(push).startswith(
        f"push {push.number} (mesh version {state.version + 1}, mesh state x3): "
        "endpoints of shop/web; "
    )
    assert push.as_dict()["changed"] == "endpoints of shop/web"


def test_memos_follow_the_mesh_not_its_history() -> None:
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.1, 1.0))
    state = fixtures.state()
    many = {
        mesh.ServiceKey("bulk", f"s{i}"): mesh.Service(
            "bulk", f"s{i}", ports=(mesh.Port(80, "http"),)
        )
        for i in range(200)
    }
    ctl.update(dataclasses.replace(state, services={**state.services, **many}))
    ctl.rebuild()
    memos = ctl._memos
    assert memos.built is not None
    assert len(memos.built.entries) >= 200
    # Rebuilds without them: what was made for them is gone with them.
    for version in (1, 2):
        ctl.update(dataclasses.replace(state, version=state.version + version))
        ctl.rebuild()
    assert len(memos.built.entries) == len(state.services)
    # As much as a controller that never saw them.
    fresh = controller.Controller(
        cache.SnapshotCache(controller.Controller.key_of), debounce.Debouncer(0.1, 1.0)
    )
    fresh.update(state)
    fresh.rebuild()
    assert fresh._memos.built is not None
    assert len(memos.service_clusters) == len(fresh._memos.service_clusters)
    assert len(memos.virtual_hosts) == len(fresh._memos.virtual_hosts)
    assert len(memos.groups) == len(fresh._memos.groups)
