"""What the registry finds wrong with routes while it reads them: each
problem's code, the object and the field at fault, and what it does to
traffic (model.problems has the catalogue)."""

from __future__ import annotations

import yaml

from shoal.model import mesh, problems, routing
from shoal.registry import manifests, store

NS = "shop"


def service(name: str, ports: str = "[{name: http, port: 80}]", notes: str = "") -> str:
    meta = f"{{name: {name}, namespace: {NS}"
    meta += f", annotations: {{{notes}}}}}" if notes else "}"
    return f"apiVersion: v1\nkind: Service\nmetadata: {meta}\nspec: {{ports: {ports}}}\n"


SERVICES = [service("web"), service("web-v1"), service("web-v2")]


def http_route(rules: str, parent: str = "{group: '', kind: Service, name: web}") -> str:
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: split, namespace: {NS}}}
spec:
  parentRefs: [{parent}]
  rules:
{rules}"""


def traffic_route(rules: str) -> str:
    return f"""apiVersion: shoal.io/v1alpha1
kind: TrafficRoute
metadata: {{name: web-rules, namespace: {NS}}}
spec:
  service: web
  rules:
{rules}"""


def built(*texts: str) -> tuple[mesh.MeshState, list[problems.Problem]]:
    objects = store.ObjectStore()
    items = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            obj = manifests.parse_object(doc)
            assert obj is not None
            items.append(store.Sourced(obj, "test.yaml"))
    objects.replace_source("test.yaml", items)
    return objects.build()


def shown(found: list[problems.Problem]) -> list[tuple[str, str, str]]:
    return [(p.code, p.subject, p.field) for p in found]


def test_healthy_routes_have_no_problems() -> None:
    _, found = built(
        service("web", notes='shoal.io/split: "web-v1=90,web-v2=10"'),
        service("web-v1"),
        service("web-v2"),
        service("api"),
        http_route(
            "    - backendRefs: [{name: web-v1, port: 80, weight: 0}, {name: web-v2, port: 80}]\n",
            "{group: '', kind: Service, name: api, port: 80}",
        ),
    )
    assert found == []


def test_an_unknown_backend_in_an_annotation_names_the_annotation() -> None:
    _, found = built(service("web", notes='shoal.io/split: "web-v1=50,web-v3=50"'), *SERVICES[1:])
    (p,) = found
    assert shown(found) == [("SHL0101", "Service shop/web", "metadata.annotations[shoal.io/split]")]
    assert p.reason.startswith(
        "annotation shoal.io/split: backend Service shop/web-v3 does not exist; none of the "
        "Service's routing annotations"
    )
    _, found = built(
        service("web", notes='shoal.io/route-headers: "x-a=1 -> web-v3"'), *SERVICES[1:]
    )
    assert shown(found) == [
        ("SHL0101", "Service shop/web", "metadata.annotations[shoal.io/route-headers]")
    ]
    _, found = built(service("web", notes='shoal.io/mirror: "web-v3@5%"'), *SERVICES[1:])
    assert shown(found) == [
        ("SHL0101", "Service shop/web", "metadata.annotations[shoal.io/mirror]")
    ]


def test_an_unknown_backend_in_a_traffic_route_names_its_field() -> None:
    _, found = built(
        *SERVICES,
        traffic_route(
            "    - backends: [{service: web-v1}]\n"
            "    - backends: [{service: web-v1, weight: 50}, {service: web-v3, weight: 50}]\n"
        ),
    )
    (p,) = found
    assert shown(found) == [
        ("SHL0101", "TrafficRoute shop/web-rules", "spec.rules[1].backends[1].service")
    ]
    assert "Service shop/web-v3 does not exist" in p.reason
    _, found = built(
        *SERVICES,
        traffic_route("    - backends: [{service: web-v1}]\n      mirror: {service: web-v3}\n"),
    )
    assert shown(found) == [
        ("SHL0101", "TrafficRoute shop/web-rules", "spec.rules[0].mirror.service")
    ]


def test_unknown_backends_and_ports_of_an_httproute_each_name_their_field() -> None:
    _, found = built(
        *SERVICES,
        http_route(
            "    - backendRefs:\n"
            "        - {name: web-v1, port: 80}\n"
            "        - {name: web-v3, port: 80}\n"
            "        - {name: web-v2, port: 81}\n"
            "      filters:\n"
            "        - type: RequestMirror\n"
            "          requestMirror: {backendRef: {name: web-gone, port: 80}}\n"
        ),
    )
    subject = "HTTPRoute shop/split"
    assert sorted(shown(found)) == [
        ("SHL0101", subject, "spec.rules[0].backendRefs[1]"),
        ("SHL0101", subject, "spec.rules[0].filters[0].requestMirror.backendRef"),
        ("SHL0102", subject, "spec.rules[0].backendRefs[2].port"),
    ]
    reasons = {p.field: p.reason for p in found}
    assert reasons["spec.rules[0].backendRefs[1]"] == (
        "on Service web: ResolvedRefs=BackendNotFound: spec.rules[0].backendRefs[1]: Service "
        "shop/web-v3 does not exist; its share of the rule's requests is answered 500"
    )
    assert reasons["spec.rules[0].backendRefs[2].port"].endswith(
        "Service shop/web-v2 has no port 81; its share of the rule's requests is answered 500"
    )
    assert reasons["spec.rules[0].filters[0].requestMirror.backendRef"].endswith(
        "requests are not mirrored there"
    )


def test_a_parent_port_or_section_the_service_lacks_is_an_unknown_port() -> None:
    rules = "    - backendRefs: [{name: web-v1, port: 80}]\n"
    _, found = built(
        *SERVICES, http_route(rules, "{group: '', kind: Service, name: web, port: 81}")
    )
    (p,) = found
    assert shown(found) == [("SHL0102", "HTTPRoute shop/split", "spec.parentRefs[0].port")]
    assert p.reason == "on Service web: Accepted=NoMatchingParent: Service shop/web has no port 81"
    _, found = built(
        *SERVICES, http_route(rules, "{group: '', kind: Service, name: web, sectionName: grpc}")
    )
    assert shown(found) == [("SHL0102", "HTTPRoute shop/split", "spec.parentRefs[0].sectionName")]
    _, found = built(*SERVICES, http_route(rules, "{group: '', kind: Service, name: nope}"))
    assert shown(found) == [("SHL0101", "HTTPRoute shop/split", "spec.parentRefs[0].name")]


def test_a_rule_whose_backends_all_weigh_nothing_answers_500_and_says_so() -> None:
    state, found = built(
        *SERVICES,
        http_route(
            "    - matches: [{path: {type: PathPrefix, value: /old}}]\n"
            "      backendRefs: [{name: web-v1, port: 80, weight: 0}, "
            "{name: web-v2, port: 80, weight: 0}]\n"
            "    - backendRefs: [{name: web-v1, port: 80}]\n"
        ),
    )
    (p,) = found
    assert shown(found) == [("SHL0103", "HTTPRoute shop/split", "spec.rules[0].backendRefs")]
    assert p.reason == (
        "on Service web: every backendRef of spec.rules[0] has weight 0: it answers 500 to "
        "every request it matches"
    )
    # As the translation does: the rule answers 500 itself.
    route = state.routes[mesh.ServiceKey(NS, "web")]
    rules = routing.attached_rules(route.attached, 80, NS)
    assert rules is not None and rules[0].status == 500
    _, found = built(*SERVICES, http_route("    - matches: [{path: {value: /x}}]\n"))
    (p,) = found
    assert (p.code, p.field) == ("SHL0103", "spec.rules[0].backendRefs")
    assert "has no backendRefs and no redirect: it answers 500" in p.reason


def test_a_grpc_rule_with_no_weight_is_unavailable() -> None:
    grpc = "[{name: grpc, port: 7070, appProtocol: grpc}]"
    _, found = built(
        service("rpc", grpc),
        service("rpc-v1", grpc),
        """apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: rpc}]
  rules:
    - backendRefs: [{name: rpc-v1, port: 7070, weight: 0}]
""",
    )
    (p,) = found
    assert (p.code, p.field) == ("SHL0103", "spec.rules[0].backendRefs")
    assert "it answers UNAVAILABLE (503)" in p.reason


def test_an_httproute_on_a_tcp_port_routes_nothing_and_says_so() -> None:
    ports = "[{name: http, port: 80}, {name: db, port: 5432, appProtocol: tcp}]"
    rules = "    - backendRefs: [{name: web-v1, port: 80}]\n"
    _, found = built(
        service("web", ports),
        *SERVICES[1:],
        http_route(rules, "{group: '', kind: Service, name: web, port: 5432}"),
    )
    (p,) = found
    assert shown(found) == [("SHL0203", "HTTPRoute shop/split", "spec.parentRefs[0].port")]
    assert p.reason.startswith("on Service web: port 5432 (db) is TCP: the HTTPRoute's rules")
    _, found = built(
        service("web", "[{name: tcp-web, port: 80}]"), *SERVICES[1:], http_route(rules)
    )
    assert shown(found) == [("SHL0203", "HTTPRoute shop/split", "spec.parentRefs[0]")]
    assert found[0].reason.startswith("on Service web: its only port 80 (tcp-web) is TCP")
    # On the HTTP port, or on every port of a Service with one: nothing to say.
    _, found = built(service("web", ports), *SERVICES[1:], http_route(rules))
    assert found == []


def test_conflicts_name_both_objects_and_the_field() -> None:
    split = 'shoal.io/split: "web-v1=90,web-v2=10"'
    tr = traffic_route("    - backends: [{service: web-v2}]\n")
    _, found = built(service("web", notes=split), *SERVICES[1:], tr)
    (p,) = found
    assert shown(found) == [("SHL0105", "TrafficRoute shop/web-rules", "spec.service")]
    assert p.reason == (
        "takes precedence over the routing annotations of Service shop/web "
        "(metadata.annotations[shoal.io/split]), which are ignored"
    )
    second = tr.replace("name: web-rules", "name: web-rules-2")
    _, found = built(*SERVICES, tr, second)
    (p,) = found
    assert shown(found) == [("SHL0105", "TrafficRoute shop/web-rules-2", "spec.service")]
    assert p.reason.startswith("TrafficRoute shop/web-rules already routes Service shop/web")
    route = http_route(
        "    - backendRefs: [{name: web-v1, port: 80}]\n",
        "{kind: Gateway, name: edge}, {group: '', kind: Service, name: web}",
    )
    _, found = built(service("web", notes=split), *SERVICES[1:], route)
    (p,) = found
    assert shown(found) == [("SHL0105", "HTTPRoute shop/split", "spec.parentRefs[1]")]
    assert p.reason.startswith(
        "routes Service shop/web where it applies, instead of the rules of its annotations "
        "(metadata.annotations[shoal.io/split])"
    )


def test_a_shadowed_httproute_match_names_its_field() -> None:
    rules = (
        "    - matches: [{path: {type: PathPrefix, value: /a}}]\n"
        "      backendRefs: [{name: web-v1, port: 80}]\n"
        "    - matches: [{path: {type: PathPrefix, value: /a}}]\n"
        "      backendRefs: [{name: web-v2, port: 80}]\n"
    )
    _, found = built(*SERVICES, http_route(rules))
    assert shown(found) == [("SHL0104", "HTTPRoute shop/split", "spec.rules[1].matches[0]")]
