"""Route analyzers on hand-built mesh states: rules an earlier rule makes
unreachable, backends with no port to stand in, routing where the protocol
is TCP, and endpoints that serve two protocols."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from shoal.model import mesh, problems, routing
from shoal.observe.analysis import facts, routes
from shoal.registry import annotations, manifests, trafficroute

NS = "shop"
HTTP = mesh.Port(80, "http")
GRPC = mesh.Port(7070, "grpc", mesh.Protocol.GRPC)
TCP = mesh.Port(5432, "tcp-db", mesh.Protocol.TCP)
WEB = mesh.ServiceKey(NS, "web")


def service(name: str, *ports: mesh.Port, notes: Mapping[str, str] | None = None) -> mesh.Service:
    return mesh.Service(NS, name, ports or (HTTP,), annotations=mesh.frozen_map(notes or {}))


def state(
    *services: mesh.Service,
    eps: Mapping[mesh.ServiceKey, tuple[mesh.Endpoint, ...]] | None = None,
    traffic_routes: tuple[str, ...] = (),
) -> mesh.MeshState:
    """A mesh of `services`, routed by their annotations and by the
    TrafficRoutes (YAML) given, as the registry routes them."""
    known = {s.key: s for s in services}
    out: dict[mesh.ServiceKey, routing.ServiceRoute] = {}
    for svc in services:
        route = annotations.service_route(svc, known)
        if route is not None:
            out[svc.key] = route
    for text in traffic_routes:
        obj = manifests.parse_object(yaml.safe_load(text))
        assert obj is not None
        parsed = trafficroute.parse(obj, known)
        out[parsed.route.service] = parsed.route
    return mesh.MeshState(services=known, endpoints=dict(eps or {}), routes=out)


def found(s: mesh.MeshState) -> list[problems.Problem]:
    return sorted(routes.analyze(facts.Facts(s)), key=problems.sort_key)


def traffic_route(*rules: Mapping[str, Any], service: str = "web") -> str:
    body = {
        "apiVersion": "shoal.io/v1alpha1",
        "kind": "TrafficRoute",
        "metadata": {"name": "web-rules", "namespace": NS},
        "spec": {"service": service, "rules": list(rules)},
    }
    return yaml.safe_dump(body)


def to(backend: str, **match: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"backends": [{"service": backend}]}
    if match:
        rule["match"] = match
    return rule


VERSIONS = (service("web-v1"), service("web-v2"))


def test_a_healthy_mesh_has_no_routing_problems() -> None:
    web = service(
        "web",
        notes={
            annotations.SPLIT: "web-v1=90,web-v2=10",
            annotations.ROUTE_HEADERS: "x-group=beta -> web-v2; x-group~=gam+a -> web-v1",
            annotations.MIRROR: "web-v2@10%",
        },
    )
    api = service("api")
    rules = traffic_route(
        to("web-v2", path={"prefix": "/api/v2"}),
        to("web-v1", path={"prefix": "/api"}),
        to("web-v2", headers=[{"name": "x-group", "exact": "beta"}]),
        to("web-v1"),
        service="api",
    )
    shared = mesh.Endpoint("10.0.0.1", 8080, "http")
    s = state(
        web,
        api,
        *VERSIONS,
        eps={WEB: (shared,), mesh.ServiceKey(NS, "web-v1"): (shared,)},
        traffic_routes=(rules,),
    )
    assert found(s) == []


def test_a_header_route_an_earlier_regex_takes_is_shadowed() -> None:
    web = service(
        "web",
        notes={annotations.ROUTE_HEADERS: "x-group~=beta|gamma -> web-v2; x-group=gamma -> web-v1"},
    )
    (p,) = found(state(web, *VERSIONS))
    assert (p.code, p.subject, p.field) == (
        "SHL0104",
        "Service shop/web",
        "metadata.annotations[shoal.io/route-headers]",
    )
    assert p.reason == (
        "header route 'x-group=gamma -> web-v1' never matches on Service shop/web: header route "
        "'x-group~=beta|gamma -> web-v2' comes first and matches all of them, so the requests "
        "meant for web-v1 go to web-v2"
    )


@pytest.mark.parametrize(
    "headers",
    [
        # The exact route first: both can match.
        "x-group=gamma -> web-v1; x-group~=beta|gamma -> web-v2",
        # RE2 matches the whole value, as Envoy does: "gam" does not take "gamma".
        "x-group~=gam -> web-v2; x-group=gamma -> web-v1",
        # Another header.
        "x-user=gamma -> web-v2; x-group=gamma -> web-v1",
        # Two regular expressions are not compared: nothing is certain.
        "x-group~=.* -> web-v2; x-group~=gamma -> web-v1",
    ],
)
def test_header_routes_that_can_both_match_are_not_reported(headers: str) -> None:
    web = service("web", notes={annotations.ROUTE_HEADERS: headers})
    assert found(state(web, *VERSIONS)) == []


def test_the_same_header_route_twice_is_shadowed() -> None:
    web = service(
        "web",
        notes={annotations.ROUTE_HEADERS: "x-a=1 -> web-v1; x-b=2 -> web-v1; x-a=1 -> web-v2"},
    )
    (p,) = found(state(web, *VERSIONS))
    assert p.code == "SHL0104" and "'x-a=1 -> web-v2' never matches" in p.reason
    assert "header route 'x-a=1 -> web-v1' comes first" in p.reason


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        ({}, {"path": {"prefix": "/api"}}, True),
        ({"path": {"prefix": "/"}}, {"method": "GET"}, True),
        ({"path": {"prefix": "/api"}}, {"path": {"prefix": "/api/v2"}}, True),
        ({"path": {"prefix": "/api/v2"}}, {"path": {"prefix": "/api"}}, False),
        ({"path": {"prefix": "/api"}}, {"path": {"exact": "/api/x"}}, True),
        ({"path": {"exact": "/api"}}, {"path": {"prefix": "/api"}}, False),
        ({"path": {"exact": "/api"}}, {"path": {"exact": "/api"}}, True),
        ({"path": {"regex": "/r/[0-9]+"}}, {"path": {"exact": "/r/12"}}, True),
        ({"path": {"regex": "/r/[0-9]+"}}, {"path": {"exact": "/r/x"}}, False),
        ({"path": {"regex": "/r/.*"}}, {"path": {"prefix": "/r/"}}, False),
        ({"path": {"prefix": "/api"}}, {"path": {"regex": "/api/.*"}}, False),
        ({"path": {"prefix": "/api"}}, {}, False),
        ({"method": "GET"}, {"method": "GET", "path": {"prefix": "/a"}}, True),
        ({"method": "GET"}, {"path": {"prefix": "/a"}}, False),
        ({"method": "GET"}, {"method": "POST"}, False),
        (
            {"headers": [{"name": "x", "exact": "a"}]},
            {"headers": [{"name": "y", "present": True}, {"name": "X", "exact": "a"}]},
            True,
        ),
        (
            {"headers": [{"name": "x", "exact": "a"}, {"name": "y", "present": True}]},
            {"headers": [{"name": "x", "exact": "a"}]},
            False,
        ),
        (
            {"headers": [{"name": "x", "present": True}]},
            {"headers": [{"name": "x", "regex": "a.*"}]},
            True,
        ),
        (
            {"headers": [{"name": "x", "prefix": "be"}]},
            {"headers": [{"name": "x", "exact": "beta"}]},
            True,
        ),
        (
            {"headers": [{"name": "x", "prefix": "be"}]},
            {"headers": [{"name": "x", "prefix": "beta"}]},
            True,
        ),
        (
            {"headers": [{"name": "x", "prefix": "beta"}]},
            {"headers": [{"name": "x", "prefix": "be"}]},
            False,
        ),
        (
            {"headers": [{"name": "x", "exact": "a"}]},
            {"headers": [{"name": "x", "present": True}]},
            False,
        ),
        (
            {"queryParams": [{"name": "debug", "exact": "1"}]},
            {"queryParams": [{"name": "debug", "exact": "1"}], "path": {"prefix": "/a"}},
            True,
        ),
        # Query parameter names are case-sensitive, unlike header names.
        (
            {"queryParams": [{"name": "debug", "exact": "1"}]},
            {"queryParams": [{"name": "Debug", "exact": "1"}]},
            False,
        ),
        (
            {"headers": [{"name": "debug", "exact": "1"}]},
            {"queryParams": [{"name": "debug", "exact": "1"}]},
            False,
        ),
    ],
)
def test_a_traffic_route_rule_is_shadowed_only_when_an_earlier_one_takes_all_its_requests(
    earlier: dict[str, Any], later: dict[str, Any], shadowed: bool
) -> None:
    rules = traffic_route(to("web-v1", **earlier), to("web-v2", **later))
    got = found(state(service("web"), *VERSIONS, traffic_routes=(rules,)))
    if not shadowed:
        assert got == []
        return
    (p,) = got
    assert (p.code, p.subject, p.field) == (
        "SHL0104",
        "TrafficRoute shop/web-rules",
        "spec.rules[1].match",
    )
    assert p.reason.startswith("spec.rules[1] never matches on Service shop/web: spec.rules[0]")
    assert p.reason.endswith("so the requests meant for web-v2 go to web-v1")


def test_every_rule_after_a_catch_all_is_shadowed_by_it() -> None:
    rules = traffic_route(
        to("web-v1"),
        to("web-v2", path={"prefix": "/a"}),
        to("web-v2", headers=[{"name": "x", "exact": "1"}]),
    )
    got = found(state(service("web"), *VERSIONS, traffic_routes=(rules,)))
    assert [(p.code, p.field) for p in got] == [
        ("SHL0104", "spec.rules[1].match"),
        ("SHL0104", "spec.rules[2].match"),
    ]
    assert all("spec.rules[0] comes first and matches every request" in p.reason for p in got)


def test_a_backend_with_no_port_to_stand_in_is_named_with_its_field() -> None:
    db = service("db", TCP)
    web = service("web", notes={annotations.SPLIT: "web-v1=50,db=50"})
    (p,) = found(state(web, db, *VERSIONS))
    assert (p.code, p.subject, p.field) == (
        "SHL0102",
        "Service shop/web",
        "metadata.annotations[shoal.io/split]",
    )
    assert p.reason == (
        "backend Service shop/db has no port to stand in for port 80 (http) of Service shop/web "
        "(none of that number or name, and no HTTP port): its share of those calls fails "
        "(503, no cluster)"
    )
    rules = traffic_route(
        {"backends": [{"service": "web-v1"}], "mirror": {"service": "db", "percent": 5}}
    )
    (p,) = found(state(service("web"), db, *VERSIONS, traffic_routes=(rules,)))
    assert (p.code, p.field) == ("SHL0102", "spec.rules[0].mirror.service")
    assert p.reason.endswith("copies of those calls are not mirrored")


def test_a_backend_port_of_another_number_but_the_same_name_stands_in() -> None:
    other = service("other", mesh.Port(8080, "http"))
    grpc_only = service("rpc", mesh.Port(9090, "grpc-api", mesh.Protocol.GRPC))
    web = service("web", notes={annotations.SPLIT: "other=50,rpc=50"})
    assert found(state(web, other, grpc_only)) == []


def test_routing_on_a_service_whose_ports_are_all_tcp_is_named() -> None:
    db = service("db", TCP, notes={annotations.SPLIT: "db-v1=90,db-v2=10"})
    versions = (service("db-v1", HTTP, TCP), service("db-v2", HTTP, TCP))
    (p,) = found(state(db, *versions))
    assert (p.code, p.subject, p.field) == (
        "SHL0203",
        "Service shop/db",
        "metadata.annotations[shoal.io/split]",
    )
    assert p.reason.startswith("routes Service shop/db, but its only port 5432 (tcp-db) is TCP:")
    rules = traffic_route(to("db-v1"), service="db")
    (p,) = found(state(service("db", TCP), *versions, traffic_routes=(rules,)))
    assert (p.code, p.subject, p.field) == (
        "SHL0203",
        "TrafficRoute shop/web-rules",
        "spec.service",
    )
    # One HTTP port is enough for the routing to apply there.
    both = service("db", HTTP, TCP, notes={annotations.SPLIT: "db-v1=90,db-v2=10"})
    assert found(state(both, *versions)) == []


def test_one_endpoint_serving_http1_and_http2_ports_is_a_protocol_conflict() -> None:
    web, rpc = service("web"), service("web-rpc", GRPC)
    shared = [mesh.Endpoint("10.0.0.1", 8080, "http"), mesh.Endpoint("10.0.0.2", 8080, "http")]
    eps = {
        web.key: tuple(shared),
        rpc.key: tuple(mesh.Endpoint(e.address, e.port, "grpc") for e in shared),
    }
    (p,) = found(state(web, rpc, eps=eps))
    assert (p.code, p.subject, p.field) == ("SHL0203", "Service shop/web", "spec.ports[0]")
    assert p.reason.startswith(
        "port 80 (http) is HTTP/1.1 but port 7070 (grpc) of Service shop/web-rpc is gRPC "
        "(HTTP/2), and both are served at endpoint 10.0.0.1:8080 and 1 more:"
    )


@pytest.mark.parametrize(
    ("ports", "addresses"),
    [
        ((HTTP, GRPC), ("10.0.0.1", "10.0.0.9")),  # no endpoint is shared
        ((HTTP, TCP), ("10.0.0.1", "10.0.0.1")),  # TCP beside HTTP: the bytes pass
        ((mesh.Port(81, "h2", mesh.Protocol.HTTP2), GRPC), ("10.0.0.1", "10.0.0.1")),
        # With a TCP port there too, a captured Pod's proxy passes the bytes.
        ((HTTP, GRPC, TCP), ("10.0.0.1", "10.0.0.1", "10.0.0.1")),
    ],
)
def test_endpoints_that_do_not_mix_http1_and_http2_are_no_conflict(
    ports: tuple[mesh.Port, ...], addresses: tuple[str, ...]
) -> None:
    services = [service(f"s{i}", port) for i, port in enumerate(ports)]
    eps = {
        svc.key: (mesh.Endpoint(address, 8080, port.name),)
        for svc, port, address in zip(services, ports, addresses, strict=True)
    }
    assert found(state(*services, eps=eps)) == []


def test_ten_thousand_routed_services_take_one_pass() -> None:
    """Each Service is routed to the next and shares an endpoint with it:
    a check that compared Services with Services would take minutes."""
    count = 10_000
    services = [
        service(f"s{i}", notes={annotations.SPLIT: f"s{(i + 1) % count}=100"}) for i in range(count)
    ]
    known = {s.key: s for s in services}
    routed = {s.key: annotations.service_route(s, known) for s in services}
    eps = {
        s.key: (mesh.Endpoint("10.0.0.1", 8000 + i // 2, "http"),) for i, s in enumerate(services)
    }
    s = mesh.MeshState(
        services=known,
        endpoints=eps,
        routes={k: r for k, r in routed.items() if r is not None},
    )
    started = time.process_time()
    assert found(s) == []
    # Generous for a loaded machine: one pass takes well under a second.
    assert time.process_time() - started < 10.0
