"""`shoal proxy-status PROXY`: what a proxy holds against what it should hold."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from shoal.sds import ca
from shoal.xds import cache, proxydiff, resources, server, shared, status
from shoal.xds.translate import secrets

KEY = "sidecar|shop|web"
NODE = "sidecar~shop~web-1"


def cluster(name: str, timeout_s: int = 1) -> cache.Resource:
    return shared.resource(
        resources.CLUSTER,
        cluster_pb2.Cluster(name=name, connect_timeout={"seconds": timeout_s}),
    )


def route_table(weights: dict[str, int], name: str = "outbound") -> cache.Resource:
    """One virtual host splitting between clusters by weight."""
    split = route_components_pb2.WeightedCluster(
        clusters=[
            route_components_pb2.WeightedCluster.ClusterWeight(name=c, weight={"value": w})
            for c, w in weights.items()
        ]
    )
    return shared.resource(
        resources.ROUTE,
        route_pb2.RouteConfiguration(
            name=name,
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name="reviews",
                    domains=["reviews"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"),
                            route=route_components_pb2.RouteAction(weighted_clusters=split),
                        )
                    ],
                )
            ],
        ),
    )


def snapshot(*items: cache.Resource) -> cache.Snapshot:
    by_type: dict[str, list[cache.Resource]] = {}
    for r in items:
        by_type.setdefault(r.type_url, []).append(r)
    return cache.Snapshot(
        {t: (cache.ResourceGroup(rs),) for t, rs in by_type.items()}, label="mesh version 9"
    )


def connection(
    wanted: cache.Snapshot | None, held: dict[str, tuple[cache.Resource, ...]]
) -> server.Connection:
    """A stream that last ACKed `held`, whose proxy should now have `wanted`."""
    snapshots = cache.SnapshotCache(lambda _: KEY)
    conn = server.Connection(1, NODE, "web.shop", KEY, "127.0.0.1:5000", False, 0.0)
    conn.identity = "spiffe://cluster.local/ns/shop/sa/web"
    if wanted is not None:
        snapshots.set_snapshot(KEY, wanted)
    conn.watch = cache.Watch(snapshots, KEY, asyncio.Event())
    for type_url, rs in held.items():
        view = cache.make_view(rs)
        wildcard = type_url in resources.WILDCARD
        state = server.TypeState(type_url, wildcard, names=frozenset(r.name for r in rs))
        if not wildcard and wanted is not None:
            state.names = frozenset(r.name for r in wanted.resources(type_url)) | state.names
        state.held = view
        state.sent_version = state.acked_version = view.version
        conn.types[type_url] = state
    return conn


def report(conn: server.Connection, now: float | None = None) -> dict[str, Any]:
    """What `/debug/proxy_diff` answers, as JSON would carry it."""
    found: dict[str, Any] = proxydiff.diff(conn, now).as_dict()
    return found


def types_of(found: dict[str, Any]) -> dict[str, Any]:
    return {t["type"]: t for t in found["types"]}


def test_a_proxy_holding_what_it_should_matches_everywhere() -> None:
    held = (cluster("a"), cluster("b"))
    routes = (route_table({"a": 90, "b": 10}),)
    conn = connection(
        snapshot(*held, *routes),
        {resources.CLUSTER: held, resources.ROUTE: routes, resources.LISTENER: ()},
    )
    found = report(conn)
    assert found["match"] is True
    by_type = types_of(found)
    assert by_type["CDS"]["match"] and by_type["CDS"]["status"] == status.SYNCED
    assert by_type["EDS"]["asked"] is False
    out = proxydiff.text(found)
    assert "Clusters (CDS) Match" in out and "Routes (RDS) Match" in out
    assert "Endpoints (EDS): not asked for on this stream" in out
    assert out.endswith(
        "Everything matches: the proxy holds what the control plane wants it to have."
    )


def test_a_changed_route_shows_a_content_diff_and_the_clusters_added_and_removed() -> None:
    before = route_table({"reviews": 90, "reviews-v2": 10})
    after = route_table({"reviews": 50, "reviews-v2": 50})
    conn = connection(
        snapshot(cluster("reviews"), cluster("reviews-v3"), after),
        {
            resources.CLUSTER: (cluster("reviews"), cluster("reviews-v2")),
            resources.ROUTE: (before,),
        },
    )
    found = report(conn)
    assert found["match"] is False
    by_type = types_of(found)
    cds = by_type["CDS"]
    assert [c["name"] for c in cds["added"]] == ["reviews-v3"]
    assert [c["name"] for c in cds["removed"]] == ["reviews-v2"]
    assert cds["changed"] == [] and cds["status"] == status.STALE
    rds = by_type["RDS"]
    (changed,) = rds["changed"]
    assert changed["held"] == proxydiff.short(before.version)
    assert changed["wanted"] == proxydiff.short(after.version)
    diff = changed["detail"]
    assert diff[0].startswith("--- held ") and diff[1].startswith("+++ wanted ")
    assert any(line.startswith("-") and '"weight": 90' in line for line in diff), diff
    assert any(line.startswith("+") and '"weight": 50' in line for line in diff), diff
    out = proxydiff.text(found)
    assert "Clusters (CDS) Don't Match" in out and "Routes (RDS) Don't Match" in out
    assert "  + reviews-v3  (added, " in out and "  - reviews-v2  (removed, was " in out
    assert f"  ~ outbound  {changed['held']} -> {changed['wanted']}" in out
    assert "Everything matches" not in out


def test_a_version_in_flight_is_said_with_its_age() -> None:
    old, new = cluster("a", 1), cluster("a", 2)
    conn = connection(snapshot(new), {resources.CLUSTER: (old,)})
    state = conn.types[resources.CLUSTER]
    state.pending = cache.make_view((new,))
    state.sent_version = state.pending.version
    state.sent_at = 100.0
    found = report(conn, now=103.5)
    cds = types_of(found)["CDS"]
    assert cds["status"] == status.STALE
    assert cds["in_flight"] == proxydiff.short(state.pending.version)
    assert cds["in_flight_s"] == 3.5
    assert "sent 3.5s ago, not acknowledged yet" in proxydiff.text(found)


def test_a_nack_says_envoys_error_and_what_the_rejected_version_would_change() -> None:
    good, bad = cluster("a", 1), cluster("a", 2)
    wanted = snapshot(bad, cluster("b"))
    conn = connection(wanted, {resources.CLUSTER: (good,)})
    state = conn.types[resources.CLUSTER]
    rejected = wanted.view(resources.CLUSTER, None).version
    state.sent_version = state.nacked_version = rejected
    state.error = "cluster a: bad connect_timeout\x1b[2J"
    found = report(conn)
    cds = types_of(found)["CDS"]
    assert cds["status"] == status.NACKED and cds["match"] is False
    assert cds["rejected"] == proxydiff.short(rejected) and cds["rejected_is_wanted"] is True
    assert [c["name"] for c in cds["added"]] == ["b"]
    assert [c["name"] for c in cds["changed"]] == ["a"]
    out = proxydiff.text(found)
    assert f"NACKED version {proxydiff.short(rejected)}: cluster a: bad connect_timeout" in out
    assert "\x1b" not in out  # Envoy's text cannot drive the terminal
    assert "what the rejected version would change:" in out


def test_after_a_nack_the_mesh_may_have_moved_on() -> None:
    good, bad, fixed = cluster("a", 1), cluster("a", 2), cluster("a", 3)
    conn = connection(snapshot(fixed), {resources.CLUSTER: (good,)})
    state = conn.types[resources.CLUSTER]
    state.sent_version = state.nacked_version = cache.make_view((bad,)).version
    state.error = "cluster a: bad connect_timeout"
    cds = types_of(report(conn))["CDS"]
    assert cds["rejected_is_wanted"] is False
    assert "the control plane has moved on since" in proxydiff.text(report(conn))


def _workload_secret(authority: ca.Authority) -> tuple[cache.Resource, bytes]:
    pair = authority.workload("shop", "web")
    return shared.resource(resources.SECRET, secrets.workload(pair.cert_pem, pair.key_pem)), (
        pair.key_pem
    )


def test_secrets_are_compared_by_certificate_serial_and_never_show_a_key() -> None:
    authority = ca.Authority(ca.new_root("cluster.local"))
    (old, old_key), (new, new_key) = _workload_secret(authority), _workload_secret(authority)
    bundle = shared.resource(resources.SECRET, secrets.trust_bundle(authority.trust_bundle))
    conn = connection(snapshot(new, bundle), {resources.SECRET: (old,)})
    conn.types[resources.SECRET].names = frozenset({"default", "ROOTCA"})
    found = report(conn)
    sds = types_of(found)["SDS"]
    (changed,) = sds["changed"]
    old_serial = proxydiff.certificates_of(old.body).split()[2]
    new_serial = proxydiff.certificates_of(new.body).split()[2]
    assert old_serial != new_serial
    assert changed["detail"][0].startswith(f"held: certificate serial {old_serial} until ")
    assert changed["detail"][1].startswith(f"wanted: certificate serial {new_serial} until ")
    (added,) = sds["added"]
    assert added["name"] == "ROOTCA" and added["detail"][0].startswith("trusted root serial ")
    shown = json.dumps(found) + proxydiff.text(found)
    for key in (old_key, new_key):
        # Neither the PEM, nor the PEM as JSON carries bytes (base64).
        pem_body = b"".join(key.splitlines()[1:-1]).decode()
        assert pem_body[:40] not in shown
        assert base64.b64encode(key).decode()[:40] not in shown
    assert "PRIVATE KEY" not in shown
    # Even asked directly, content is never diffed for a secret.
    assert proxydiff.content_diff(old, new)[0] == ()


def test_a_delta_proxy_that_announced_its_versions_has_no_content_to_diff() -> None:
    wanted = cluster("a", 2)
    announced = cache.Resource(resources.CLUSTER, "a", b"", "0123456789abcdef")
    conn = connection(snapshot(wanted), {resources.CLUSTER: (announced,)})
    (changed,) = types_of(report(conn))["CDS"]["changed"]
    assert changed["detail"] == [] and "content unknown" in changed["note"]


def test_what_is_shown_is_bounded() -> None:
    many = proxydiff.MAX_LISTED + 10
    held = tuple(cluster(f"c{i:03}", 1) for i in range(many))
    wanted = tuple(cluster(f"c{i:03}", 2) for i in range(many))
    long_before = route_table({f"backend-{i}": 1 for i in range(200)})
    long_after = route_table({f"backend-{i}": 2 for i in range(200)})
    conn = connection(
        snapshot(*wanted, long_after),
        {resources.CLUSTER: held, resources.ROUTE: (long_before,)},
    )
    found = report(conn)
    by_type = types_of(found)
    cds = by_type["CDS"]
    assert cds["changed_total"] == many and len(cds["changed"]) == proxydiff.MAX_LISTED
    with_content = [c for c in cds["changed"] if c["detail"]]
    assert len(with_content) == proxydiff.MAX_CONTENT_DIFFS
    (rds,) = by_type["RDS"]["changed"]
    assert len(rds["detail"]) == proxydiff.MAX_DIFF_LINES + 1
    assert rds["detail"][-1].endswith("more lines")
    assert f"... and {many - proxydiff.MAX_LISTED} more changed" in proxydiff.text(found)


def test_before_any_snapshot_nothing_is_called_wrong() -> None:
    conn = connection(None, {resources.CLUSTER: (cluster("a"),)})
    found = report(conn)
    assert found["match"] is False and types_of(found)["CDS"]["added"] == []
    assert "no configuration for this proxy yet" in proxydiff.text(found)


def test_the_admin_query_finds_the_proxy_or_says_why_not() -> None:
    conn = connection(snapshot(cluster("a")), {resources.CLUSTER: (cluster("a"),)})
    ads = server.AdsServer(cache.SnapshotCache(lambda _: KEY))
    ads.connections[conn.stream_id] = conn
    found = proxydiff.diff_of(ads, {"proxy": "web-1"})
    assert found is not None and found["id"] == NODE and found["identity"] == "shop/web"
    assert proxydiff.diff_of(ads, {"proxy": "nobody"}) is None
    assert proxydiff.diff_of(ads, {"proxy": "web-1", "identity": "shop/other"}) is None
    with pytest.raises(ValueError, match="name a proxy"):
        proxydiff.diff_of(ads, {})


def test_a_resource_of_an_unknown_type_is_named_not_decoded() -> None:
    held = cache.Resource("type.googleapis.com/example.Unknown", "x", b"\x08\x01", "aaaa")
    wanted = cache.Resource("type.googleapis.com/example.Unknown", "x", b"\x08\x02", "bbbb")
    detail, note = proxydiff.content_diff(held, wanted)
    assert detail == () and note == "not a type this control plane can show"
