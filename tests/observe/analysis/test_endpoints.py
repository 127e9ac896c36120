"""Endpoint analyzers on hand-built mesh states and sidecar counters."""

from __future__ import annotations

import time
from collections.abc import Mapping

from shoal.model import mesh, problems, proxy, routing
from shoal.observe.analysis import endpoints, evidence, facts, run

WEB = mesh.ServiceKey("shop", "web")
FRONT = mesh.ServiceKey("shop", "front")
HTTP = mesh.Port(80, "http")


def service(key: mesh.ServiceKey, *ports: mesh.Port) -> mesh.Service:
    return mesh.Service(key.namespace, key.name, ports or (HTTP,))


def endpoint(port: int, name: str = "http", ready: bool = True) -> mesh.Endpoint:
    return mesh.Endpoint("10.0.0.1", port, name, ready=ready, pod=f"pod-{port}")


def state(
    services: list[mesh.Service],
    eps: Mapping[mesh.ServiceKey, tuple[mesh.Endpoint, ...]] | None = None,
    routes: Mapping[mesh.ServiceKey, routing.ServiceRoute] | None = None,
) -> mesh.MeshState:
    return mesh.MeshState(
        services={s.key: s for s in services}, endpoints=dict(eps or {}), routes=dict(routes or {})
    )


def caller(name: str = "front-1", service: str = "front") -> facts.ProxyFacts:
    return facts.ProxyFacts(
        name=f"sidecar~shop~{name}",
        identity=f"spiffe://cluster.local/ns/shop/sa/{service}",
        proxy=proxy.Sidecar("shop", service, service),
        types=(),
        connected_at=0.0,
        admin_port=15000,
        peer="ipv4:127.0.0.1:40000",
    )


def live(s: mesh.MeshState, stats: Mapping[str, Mapping[str, float]] | None = None) -> facts.Facts:
    return facts.Facts(s, live=True, proxies=(caller(),), stats=stats or {})


def codes(found: facts.Facts) -> list[tuple[str, str, str]]:
    return [(p.code, p.subject, p.field) for p in endpoints.analyze(found)]


def one(found: facts.Facts) -> problems.Problem:
    out = list(endpoints.analyze(found))
    assert len(out) == 1, out
    return out[0]


def web_cluster(stat: str, port: int = 80) -> str:
    return f"cluster.outbound|{port}||web.shop.svc.cluster.local.{stat}"


# -- a healthy mesh -------------------------------------------------------------


def test_a_healthy_mesh_with_traffic_has_no_endpoint_problem() -> None:
    two = service(WEB, HTTP, mesh.Port(9090, "metrics"))
    s = state(
        [two, service(FRONT)],
        {
            WEB: (endpoint(8080), endpoint(8081, ready=False), endpoint(9091, "metrics")),
            FRONT: (endpoint(7070),),
        },
        {FRONT: routing.ServiceRoute(FRONT, (routing.RouteRule((routing.Backend(WEB),)),))},
    )
    stats = {"sidecar~shop~front-1": {web_cluster("upstream_rq_total"): 40.0}}
    assert codes(live(s, stats)) == []
    assert run.analyze(live(s, stats)) == []


def test_an_idle_service_without_endpoints_is_not_reported() -> None:
    # Scaled to zero, or not deployed yet: nothing calls it, nothing breaks.
    assert codes(live(state([service(WEB)]))) == []
    assert codes(facts.Facts(state([service(WEB)]))) == []


# -- SHL0201 -------------------------------------------------------------------


def test_a_port_whose_endpoints_are_all_not_ready_is_named_with_its_callers() -> None:
    s = state([service(WEB)], {WEB: (endpoint(8080, ready=False), endpoint(8081, ready=False))})
    stats = {
        "sidecar~shop~front-1": {
            web_cluster("upstream_rq_503"): 7.0,
            web_cluster("upstream_cx_none_healthy"): 7.0,
            # The same requests, counted again under `external.`: not twice.
            web_cluster("external.upstream_rq_503"): 7.0,
        }
    }
    p = one(live(s, stats))
    assert (p.code, p.subject, p.severity) == (
        "SHL0201",
        "Service shop/web",
        problems.Severity.ERROR,
    )
    assert "none of its 2 endpoints is ready" in p.reason
    assert "10.0.0.1:8080 (Pod pod-8080)" in p.reason and "503" in p.reason
    assert "called by shop/front (7 requests answered 503)" in p.reason


def test_not_ready_is_judged_per_port() -> None:
    two = service(WEB, HTTP, mesh.Port(9090, "metrics"))
    s = state([two], {WEB: (endpoint(8080), endpoint(9091, "metrics", ready=False))})
    p = one(facts.Facts(s))
    assert p.code == "SHL0201" and p.reason.startswith("port 9090 (metrics):")


def test_one_ready_endpoint_is_enough() -> None:
    s = state([service(WEB)], {WEB: (endpoint(8080, ready=False), endpoint(8081))})
    assert codes(facts.Facts(s)) == []


# -- SHL0202 -------------------------------------------------------------------


def test_a_port_named_unlike_the_slices_is_traced_to_its_name() -> None:
    s = state([service(WEB)], {WEB: (endpoint(8080, "web"), endpoint(8081, "web"))})
    stats = {"sidecar~shop~front-1": {web_cluster("upstream_rq_503"): 3.0}}
    p = one(live(s, stats))
    assert (p.code, p.field) == ("SHL0202", "spec.ports[0].name")
    assert "port 80 is named 'http'" in p.reason and "'web'" in p.reason
    assert "called by shop/front (3 requests answered 503)" in p.reason
    assert "'http'" in p.fix and "'web'" in p.fix


def test_the_mismatched_port_of_several_is_the_one_named() -> None:
    two = service(WEB, HTTP, mesh.Port(9090, "metrics"))
    s = state([two], {WEB: (endpoint(8080), endpoint(9091, "metric"))})
    assert codes(facts.Facts(s)) == [("SHL0202", "Service shop/web", "spec.ports[1].name")]


def test_a_port_without_endpoints_is_no_mismatch_when_every_slice_port_is_matched() -> None:
    # The slices serve `http` only: nothing was misnamed, `metrics` is simply not served.
    two = service(WEB, HTTP, mesh.Port(9090, "metrics"))
    assert codes(facts.Facts(state([two], {WEB: (endpoint(8080),)}))) == []


def test_an_unnamed_service_port_matches_unnamed_slice_ports_only() -> None:
    bare = service(WEB, mesh.Port(80))
    assert codes(facts.Facts(state([bare], {WEB: (endpoint(8080, ""),)}))) == []
    assert codes(facts.Facts(state([bare], {WEB: (endpoint(8080, "http"),)}))) == [
        ("SHL0202", "Service shop/web", "spec.ports[0].name")
    ]


# -- SHL0204 -------------------------------------------------------------------


def test_a_service_without_endpoints_that_a_route_sends_to_is_named_offline() -> None:
    route = routing.ServiceRoute(
        FRONT,
        (
            routing.RouteRule(
                (routing.Backend(FRONT, 90), routing.Backend(WEB, 10)),
            ),
        ),
    )
    s = state([service(WEB), service(FRONT)], {FRONT: (endpoint(7070),)}, {FRONT: route})
    p = one(facts.Facts(s))
    assert (p.code, p.subject, p.severity) == (
        "SHL0204",
        "Service shop/web",
        problems.Severity.WARNING,
    )
    assert "has no endpoints" in p.reason and "routed to by Service shop/front" in p.reason


def test_a_service_without_endpoints_that_callers_call_names_them() -> None:
    stats = {
        "sidecar~shop~front-1": {web_cluster("upstream_rq_503"): 2.0},
        "sidecar~shop~front-2": {web_cluster("upstream_cx_none_healthy"): 1.0},
    }
    found = facts.Facts(
        state([service(WEB)]),
        live=True,
        proxies=(caller("front-1"), caller("front-2", "cart")),
        stats=stats,
    )
    p = one(found)
    assert p.code == "SHL0204"
    assert "called by shop/cart and shop/front (2 requests answered 503)" in p.reason


def test_a_split_parent_without_endpoints_of_its_own_is_no_problem() -> None:
    # `reviews` routes every call to v1 and v2: its own cluster is never used.
    reviews, v1 = mesh.ServiceKey("shop", "reviews"), mesh.ServiceKey("shop", "reviews-v1")
    route = routing.ServiceRoute(reviews, (routing.RouteRule((routing.Backend(v1),)),))
    s = state([service(reviews), service(v1)], {v1: (endpoint(8080),)}, {reviews: route})
    assert codes(live(s)) == []


def test_a_mirror_target_without_endpoints_breaks_no_caller() -> None:
    shadow = mesh.ServiceKey("shop", "shadow")
    route = routing.ServiceRoute(
        WEB, (routing.RouteRule((routing.Backend(WEB),)),), mirror=routing.Mirror(shadow)
    )
    s = state([service(WEB), service(shadow)], {WEB: (endpoint(8080),)}, {WEB: route})
    assert codes(facts.Facts(s)) == []


def test_outbound_counters_are_read_per_service_port_and_subset() -> None:
    stats = {
        "cluster.outbound|80|version=v2|web.shop.svc.cluster.local.upstream_rq_total": 4.0,
        "cluster.outbound|80||web.shop.svc.cluster.local.external.upstream_rq_503": 1.0,
        "cluster.outbound|9090||db.data.svc.cluster.local.ssl.fail_verify_san": 2.0,
        "cluster.inbound|8080||.upstream_rq_total": 9.0,
    }
    got = {(c.service, c.port, c.stat, c.value) for c in evidence.outbound(stats)}
    assert got == {
        (WEB, 80, "upstream_rq_total", 4.0),
        (WEB, 80, "external.upstream_rq_503", 1.0),
        (mesh.ServiceKey("data", "db"), 9090, "ssl.fail_verify_san", 2.0),
    }


def test_ten_thousand_services_are_analyzed_in_one_linear_pass() -> None:
    services = [service(mesh.ServiceKey(f"ns{i % 100}", f"svc{i}")) for i in range(10_000)]
    eps = {s.key: (endpoint(8000 + i % 1000),) for i, s in enumerate(services)}
    broken = services[5000].key
    eps[broken] = (endpoint(8080, "web"),)
    routes = {
        s.key: routing.ServiceRoute(
            s.key, (routing.RouteRule((routing.Backend(services[i - 1].key),)),)
        )
        for i, s in enumerate(services)
        if i % 10 == 0
    }
    found = facts.Facts(state(services, eps, routes))
    started = time.perf_counter()
    out = list(endpoints.analyze(found))
    elapsed = time.perf_counter() - started
    assert [(p.code, p.subject) for p in out] == [("SHL0202", f"Service {broken}")]
    # A quadratic pass over 10,000 Services takes minutes; this one well
    # under a second on a laptop. The bound only catches the former.
    assert elapsed < 10.0, elapsed
