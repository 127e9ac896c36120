"""Translation: golden files of the generated Envoy JSON, and its rules."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from shoal.model import mesh
from shoal.xds.translate import clusters, endpoints, listeners, names, routes, sidecar
from tests.xds import fixtures

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def as_json(messages: list[Message]) -> list[dict[str, Any]]:
    return [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages]


def check_golden(name: str, messages: list[Message]) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(as_json(messages), indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from {path}; UPDATE_GOLDEN=1 rewrites it"


def _all_clusters(state: mesh.MeshState) -> list[Message]:
    out: list[Message] = []
    for svc in state.sorted_services():
        out += clusters.outbound_for_service(svc)
    return out + sidecar.own_clusters(fixtures.sidecar(), state)


def _all_endpoints(state: mesh.MeshState) -> list[Message]:
    out: list[Message] = []
    for svc in state.sorted_services():
        out += [_assignment(state, svc, port) for port in svc.ports]
    return out


def _assignment(state: mesh.MeshState, svc: mesh.Service, port: mesh.Port) -> Message:
    return endpoints.load_assignment(
        names.outbound_cluster(svc.key, port), state.endpoints_of(svc.key, port)
    )


def test_golden_clusters() -> None:
    check_golden("local_clusters", _all_clusters(fixtures.state()))


def test_golden_endpoints() -> None:
    check_golden("local_endpoints", _all_endpoints(fixtures.state()))


def test_golden_listeners() -> None:
    state = fixtures.state()
    check_golden("local_listeners", list(sidecar.own_listeners(fixtures.sidecar(), state)))


def test_golden_routes() -> None:
    check_golden("local_routes", [_routes("shop")])


def _routes(namespace: str) -> Message:
    state = fixtures.state()
    return sidecar.outbound_routes(namespace, state.sorted_services(), state)


def test_translation_is_deterministic() -> None:
    a = [m.SerializeToString(deterministic=True) for m in _all_endpoints(fixtures.state())]
    b = [m.SerializeToString(deterministic=True) for m in _all_endpoints(fixtures.state())]
    assert a == b


def test_hosts_with_and_without_port_route_to_the_cluster() -> None:
    config = _routes("shop")
    web = {vh.name: vh for vh in config.virtual_hosts}["web.shop.svc.cluster.local:80"]
    assert set(web.domains) == {
        "web",
        "web.shop",
        "web.shop.svc",
        "web.shop.svc.cluster.local",
        "web:80",
        "web.shop:80",
        "web.shop.svc:80",
        "web.shop.svc.cluster.local:80",
    }
    # First the header rule, last the 90/10 split, which catches everything else.
    assert web.routes[0].route.cluster == "outbound|80||web-v2.shop.svc.cluster.local"
    split = web.routes[-1].route.weighted_clusters.clusters
    assert [(c.name.split("||")[1], c.weight.value) for c in split] == [
        ("web.shop.svc.cluster.local", 90),
        ("web-v2.shop.svc.cluster.local", 10),
    ]
    plain = {vh.name: vh for vh in config.virtual_hosts}["invoices.billing.svc.cluster.local:80"]
    assert plain.routes[0].route.cluster == "outbound|80||invoices.billing.svc.cluster.local"


def test_short_names_only_within_the_callers_namespace() -> None:
    config = _routes("shop")
    domains = {d for vh in config.virtual_hosts for d in vh.domains}
    assert "invoices.billing" in domains
    assert "invoices" not in domains
    # And every domain appears once: Envoy rejects duplicates.
    all_domains = [d for vh in config.virtual_hosts for d in vh.domains]
    assert len(all_domains) == len(set(all_domains))


def test_tcp_ports_get_no_http_route_and_unknown_hosts_get_a_clear_404() -> None:
    config = _routes("shop")
    assert not any("db" in vh.name for vh in config.virtual_hosts)
    last = config.virtual_hosts[-1]
    assert list(last.domains) == ["*"]
    assert last.routes[0].direct_response.status == 404


def test_a_service_without_ready_endpoints_gets_an_empty_assignment() -> None:
    state = fixtures.state()
    svc = state.services[mesh.ServiceKey("shop", "empty")]
    cla = _assignment(state, svc, svc.ports[0])
    assert cla.cluster_name == names.outbound_cluster(svc.key, svc.ports[0])
    assert len(cla.endpoints) == 0


def test_not_ready_endpoints_are_left_out_and_localities_are_weighted() -> None:
    state = fixtures.state()
    svc = state.services[mesh.ServiceKey("shop", "web")]
    http = _assignment(state, svc, svc.ports[0])
    addresses = [
        lb.endpoint.address.socket_address.address
        for loc in http.endpoints
        for lb in loc.lb_endpoints
    ]
    assert addresses == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert [loc.load_balancing_weight.value for loc in http.endpoints] == [2, 1]


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ([mesh.Port(8080, "web"), mesh.Port(80, "x")], 80),
        ([mesh.Port(8080, "web"), mesh.Port(9000, "http")], 9000),
        ([mesh.Port(5432, "tcp", mesh.Protocol.TCP), mesh.Port(8080, "a")], 8080),
    ],
)
def test_default_port_for_a_bare_host(ports: list[mesh.Port], expected: int) -> None:
    port = routes.default_port(mesh.Service("ns", "s", tuple(ports)))
    assert port is not None and port.port == expected


PEERS = frozenset({"spiffe://cluster.local/ns/shop/sa/web"})


def _mtls_listeners(permissive: bool, allow: tuple[str, ...] | None) -> list[Message]:
    security = listeners.InboundSecurity(permissive=permissive, allow=allow)
    return list(sidecar.own_listeners(fixtures.sidecar(), fixtures.state(), security))


def test_golden_mtls_listeners_and_clusters() -> None:
    check_golden(
        "mtls_listeners",
        _mtls_listeners(False, ("spiffe://cluster.local/ns/shop/sa/*",))
        + _mtls_listeners(True, None)[:1],
    )
    web = fixtures.state().services[mesh.ServiceKey("shop", "web")]
    check_golden("mtls_clusters", list(clusters.outbound_for_service(web, PEERS)))


def test_permissive_comes_from_the_service_else_its_namespace() -> None:
    state = fixtures.state()
    s = fixtures.sidecar()
    assert not sidecar.security(s, state, "cluster.local").permissive
    namespaces = {"shop": mesh.Namespace("shop", mtls="permissive")}
    in_permissive_ns = dataclasses.replace(state, namespaces=namespaces)
    assert sidecar.security(s, in_permissive_ns, "cluster.local").permissive
    web = mesh.ServiceKey("shop", "web")
    strict_web = dataclasses.replace(state.services[web], mtls="strict")
    overridden = dataclasses.replace(in_permissive_ns, services={**state.services, web: strict_web})
    assert not sidecar.security(s, overridden, "cluster.local").permissive
