"""HTTPRoute and GRPCRoute with Service parents: parsing, status, precedence,
and the Envoy routes they become (a golden file, checked by Envoy itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from shoal.model import mesh, routing
from shoal.registry import gatewayapi, manifests, store
from shoal.xds.translate import clusters, routes, sidecar
from tests.registry import parses
from tests.xds import fixtures
from tests.xds.test_envoy_validate import _bootstrap, validate
from tests.xds.test_translate import check_golden


def _service(name: str, ns: str = "shop", ports: tuple[int, ...] = (80, 8080)) -> str:
    listed = ", ".join(
        f"{{name: p{p}, port: {p}, appProtocol: {'grpc' if p == 7070 else 'http'}}}" for p in ports
    )
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec: {{ports: [{listed}]}}
"""


SERVICES = [
    _service("echo"),
    _service("echo-v1"),
    _service("echo-v2"),
    _service("grpc-echo", ports=(7070,)),
    _service("grpc-echo-v2", ports=(7070,)),
]

ROUTES = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
    - name: canary
      matches: [{path: {type: PathPrefix, value: /api/}}, {headers: [{name: X-Group, value: beta}]}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-set, value: a}]
            add: [{name: x-add, value: b}]
            remove: [x-gone]
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /v2}}
        - type: RequestMirror
          requestMirror: {backendRef: {name: echo-v2, port: 8080}, percent: 25}
      timeouts: {request: 10s, backendRequest: 2s}
      backendRefs:
        - {name: echo-v1, port: 80, weight: 90}
        - {name: echo-v2, port: 80, weight: 10}
        - {name: echo-gone, port: 80, weight: 5}
    - matches: [{path: {type: Exact, value: /old}, method: GET}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            scheme: https
            hostname: example.org
            statusCode: 301
            path: {type: ReplaceFullPath, replaceFullPath: /new}
    - matches: [{path: {type: PathPrefix, value: /strip}}]
      filters:
        - type: URLRewrite
          urlRewrite:
            hostname: in.example
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /}
      backendRefs: [{name: echo-v1, port: 8080}]
    - matches:
        - path: {type: RegularExpression, value: "/r/[0-9]+"}
          queryParams: [{name: q, value: "1"}]
      backendRefs: [{name: echo-v1, port: 80, weight: 0}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mine, namespace: caller, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: shop}]
  rules:
    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-consumer, value: caller}]}
      backendRefs: [{name: echo-v2, namespace: shop, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-echo, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc-echo}]
  rules:
    - matches: [{method: {service: echo.Echo, method: Hello}}, {method: {method: Bye}}]
      backendRefs: [{name: grpc-echo-v2, port: 7070}]
    - matches:
        - method: {type: RegularExpression, service: "echo\\\\..*"}
          headers: [{name: v, value: "2"}]
      backendRefs: [{name: grpc-echo, port: 7070}]
"""


def _built(*texts: str) -> tuple[mesh.MeshState, store.ObjectStore, list[str]]:
    objects = store.ObjectStore()
    items = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            obj = manifests.parse_object(doc)
            assert obj is not None
            items.append(store.Sourced(obj, "test.yaml"))
    objects.replace_source("test.yaml", items)
    state, found = objects.build()
    return state, objects, [str(p) for p in found]


def _put(objects: store.ObjectStore, text: str) -> tuple[mesh.MeshState, list[str]]:
    """One object put into a built store (as a watch event), then a build."""
    obj = manifests.parse_object(yaml.safe_load(text))
    assert obj is not None
    objects.put("test.yaml", store.Sourced(obj, "test.yaml"))
    state, found = objects.build()
    return state, [str(p) for p in found]


def _route_config(state: mesh.MeshState, caller: str) -> Any:
    return sidecar.outbound_routes(caller, state.sorted_services(), state)


def test_routes_translate_as_the_golden_file_says() -> None:
    state, _, found = _built(*SERVICES, ROUTES)
    assert any("echo-gone does not exist" in p for p in found), found
    check_golden("gateway_routes_shop", [_route_config(state, "shop")])
    check_golden("gateway_routes_caller", [_route_config(state, "caller")])


def test_envoy_accepts_the_routes(tmp_path: Path) -> None:
    state, _, _ = _built(*SERVICES, ROUTES)
    config = _bootstrap()
    config["static_resources"]["clusters"] += [
        json_format.MessageToDict(c)
        for svc in state.sorted_services()
        for c in clusters.outbound_for_service(svc)
    ] + [json_format.MessageToDict(c) for c in sidecar.own_clusters(fixtures.sidecar(), state)]
    table = _route_config(state, "shop")
    # As over RDS: a route to the missing backend's cluster is legal.
    table.validate_clusters.value = False
    out = []
    for listener in sidecar.own_listeners(fixtures.sidecar(), state):
        for chain in listener.filter_chains:
            for f in chain.filters:
                manager = hcm_pb2.HttpConnectionManager()
                if f.typed_config.Unpack(manager) and manager.HasField("rds"):
                    manager.route_config.CopyFrom(table)
                    f.typed_config.Pack(manager)
        out.append(json_format.MessageToDict(listener))
    config["static_resources"]["listeners"] = out
    result = validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_status_says_accepted_and_which_refs_did_not_resolve() -> None:
    _, objects, _ = _built(*SERVICES, ROUTES)
    (echo,) = objects.route_status[("HTTPRoute", "shop", "echo")]
    conditions = {c.type: c for c in echo.conditions}
    assert conditions["Accepted"].status and conditions["Accepted"].reason == "Accepted"
    assert not conditions["ResolvedRefs"].status
    assert conditions["ResolvedRefs"].reason == "BackendNotFound"
    assert "spec.rules[0].backendRefs[2]: Service shop/echo-gone does not exist" in (
        conditions["ResolvedRefs"].message
    )
    assert echo.parent_ref == {"group": "", "kind": "Service", "name": "echo", "port": 80}
    (grpc,) = objects.route_status[("GRPCRoute", "shop", "grpc-echo")]
    assert all(c.status for c in grpc.conditions)


def test_consumer_routes_replace_the_producers_for_their_namespace_only() -> None:
    state, _, _ = _built(*SERVICES, ROUTES)
    route = state.routes[mesh.ServiceKey("shop", "echo")]
    own = routing.attached_rules(route.attached, 80, "shop")
    theirs = routing.attached_rules(route.attached, 80, "caller")
    assert own is not None and theirs is not None
    assert len(theirs) == 1 and theirs[0].response_headers is not None
    assert all(r.response_headers is None for r in own)
    # The producer route names port 80: port 8080 keeps the Service's own routing.
    assert routing.attached_rules(route.attached, 8080, "shop") is None
    assert routing.attached_rules(route.attached, 8080, "caller") is not None


def test_precedence_exact_then_longest_prefix_then_method_headers_query_then_age() -> None:
    older = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-older, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /a}}]
      backendRefs: [{name: echo-v1, port: 80}]
"""
    newer = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-newer, namespace: shop, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
    - matches:
        - {path: {type: PathPrefix, value: /a}}
        - {path: {type: PathPrefix, value: /a}, queryParams: [{name: q, value: "1"}]}
        - {path: {type: PathPrefix, value: /a}, headers: [{name: h, value: "1"}]}
        - {path: {type: PathPrefix, value: /a}, method: POST}
        - {path: {type: PathPrefix, value: /a/b}}
        - {path: {type: Exact, value: /a}}
      backendRefs: [{name: echo-v2, port: 80}]
"""
    state, _, _ = _built(*SERVICES, newer, older)
    route = state.routes[mesh.ServiceKey("shop", "echo")]
    rules = routing.attached_rules(route.attached, 80, "shop")
    assert rules is not None
    shown = [
        (
            r.path.kind.value if r.path else "",
            r.path.value if r.path else "",
            r.method,
            len(r.headers),
            len(r.query),
            r.backends[0].service.name,
        )
        for r in rules
    ]
    assert shown == [
        ("exact", "/a", None, 0, 0, "echo-v2"),
        ("segments", "/a/b", None, 0, 0, "echo-v2"),
        ("segments", "/a", "POST", 0, 0, "echo-v2"),
        ("segments", "/a", None, 1, 0, "echo-v2"),
        ("segments", "/a", None, 0, 1, "echo-v2"),
        # A tie: the older route first, whatever the names say.
        ("segments", "/a", None, 0, 0, "echo-v1"),
        ("segments", "/a", None, 0, 0, "echo-v2"),
    ]


def _route(rules: str, parent: str = '{group: "", kind: Service, name: echo}') -> str:
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: shop}}
spec:
  parentRefs: [{parent}]
  rules:
{rules}"""


@pytest.mark.parametrize(
    ("rules", "parent", "message"),
    [
        (
            "    - matches: [{path: {type: RegularExpression, value: '(x'}}]\n",
            None,
            "spec.rules[0].matches[0].path.value: '(x' is not a valid RE2",
        ),
        (
            "    - matches: [{path: {type: Fuzzy, value: /x}}]\n",
            None,
            "spec.rules[0].matches[0].path.type: 'Fuzzy' is not Exact, PathPrefix",
        ),
        (
            "    - matches: [{path: {value: x/y}}]\n",
            None,
            "spec.rules[0].matches[0].path.value: 'x/y' is not an absolute, normalised path",
        ),
        (
            "    - matches: [{method: FETCH}]\n",
            None,
            "spec.rules[0].matches[0].method: 'FETCH' is not an HTTP method",
        ),
        (
            "    - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 304}}]\n",
            None,
            "statusCode: 304 is not 301, 302, 303, 307 or 308",
        ),
        (
            "    - filters: [{type: RequestRedirect, requestRedirect: {hostname: a}}]\n"
            "      backendRefs: [{name: echo-v1, port: 80}]\n",
            None,
            "spec.rules[0]: a RequestRedirect rule cannot have backendRefs",
        ),
        (
            "    - matches: [{path: {value: /a}}, {path: {value: /b}}]\n"
            "      filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, "
            "replacePrefixMatch: /c}}}]\n",
            None,
            "ReplacePrefixMatch needs a rule with exactly one match, a PathPrefix",
        ),
        (
            "    - filters:\n"
            "        - type: RequestHeaderModifier\n"
            "          requestHeaderModifier: {set: [{name: A, value: '1'}], remove: [a]}\n",
            None,
            "header 'a' is changed twice in one filter",
        ),
        (
            "    - timeouts: {request: 1.5s}\n",
            None,
            "spec.rules[0].timeouts.request: '1.5s' is not a Gateway API duration",
        ),
        (
            "    - timeouts: {request: 1s, backendRequest: 2s}\n",
            None,
            "timeouts.backendRequest is longer than timeouts.request",
        ),
        (
            "    - {name: same}\n    - {name: same}\n",
            None,
            "spec.rules[1].name: 'same' names two rules",
        ),
        (
            "    - backendRefs: [{name: echo-v1, port: 80, weight: -1}]\n",
            None,
            "spec.rules[0].backendRefs[0].weight must be a whole number from 0 to 1000000",
        ),
        (
            "    - backendRefs: [{name: echo-v1, port: 80}]\n",
            "{group: apps, kind: Deployment, name: echo}",
            "spec.parentRefs[0]: Deployment (apps) is not a Service or a Gateway",
        ),
    ],
)
def test_an_invalid_route_names_the_field_and_the_reason(
    rules: str, parent: str | None, message: str
) -> None:
    text = _route(rules, parent) if parent else _route(rules)
    _, objects, found = _built(*SERVICES, text)
    assert any(p.startswith("test.yaml: HTTPRoute shop/r: ") and message in p for p in found), (
        message,
        found,
    )
    (status,) = objects.route_status[("HTTPRoute", "shop", "r")] or (None,)
    if parent is None:
        assert status is not None and not status.conditions[0].status


def test_a_route_that_breaks_keeps_its_last_good_version() -> None:
    objects = store.ObjectStore()

    def put(route: str) -> tuple[mesh.MeshState, list[str]]:
        docs = [
            manifests.parse_object(d) for t in (*SERVICES, route) for d in yaml.safe_load_all(t)
        ]
        objects.replace_source("f", [store.Sourced(d, "f") for d in docs if d is not None])
        state, found = objects.build()
        return state, [str(p) for p in found]

    good = _route("    - backendRefs: [{name: echo-v1, port: 80}]\n")
    state, _ = put(good)
    before = state.routes[mesh.ServiceKey("shop", "echo")]
    state, found = put(_route("    - timeouts: {request: soon}\n"))
    assert state.routes[mesh.ServiceKey("shop", "echo")].attached == before.attached
    assert any("its last good configuration stays in force" in p for p in found), found


def test_gateway_parents_are_left_to_gateway_controllers() -> None:
    text = _route(
        "    - backendRefs: [{name: echo-v1, port: 80}]\n",
        "{name: public-gateway}",
    )
    state, objects, found = _built(*SERVICES, text)
    assert found == []
    assert mesh.ServiceKey("shop", "echo") not in state.routes
    assert objects.route_status[("HTTPRoute", "shop", "r")] == ()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0s", 0.0), ("10s", 10.0), ("500ms", 0.5), ("1h2m3s", 3723.0), ("1m30s250ms", 90.25)],
)
def test_durations_as_gep_2257_writes_them(text: str, seconds: float) -> None:
    assert gatewayapi.duration(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1.5s", "1d", "-1s", "s", "100000s", "1s2s3s4s5s", ""])
def test_durations_gep_2257_refuses(text: str) -> None:
    with pytest.raises(manifests.ManifestError):
        gatewayapi.duration(text, "x")


def test_rewrites_keep_the_gateway_api_slashes() -> None:
    import re

    cases = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
    ]
    for path, prefix, replacement, expected in cases:
        matched = routing.PathMatch(routing.MatchKind.SEGMENTS, prefix.rstrip("/") or "/")
        rewrite = routes._path_rewrite(routing.PathChange(False, replacement), matched)
        # RE2 and Python agree on these patterns; Envoy writes \\1 as Python's \\g<1>.
        substitution = rewrite.substitution.replace("\\1", "\\g<1>")
        got = re.sub(rewrite.pattern.regex, substitution, path)
        assert got == expected, (path, prefix, replacement, got)


def test_a_section_name_is_the_service_port_name() -> None:
    named = _route(
        "    - backendRefs: [{name: echo-v1, port: 80}]\n",
        '{group: "", kind: Service, name: echo, sectionName: p8080}',
    )
    state, _, found = _built(*SERVICES, named)
    assert found == []
    route = state.routes[mesh.ServiceKey("shop", "echo")]
    assert routing.attached_rules(route.attached, 8080, "shop") is not None
    assert routing.attached_rules(route.attached, 80, "shop") is None
    wrong = _route(
        "    - backendRefs: [{name: echo-v1, port: 80}]\n",
        '{group: "", kind: Service, name: echo, sectionName: grpc}',
    )
    _, _, found = _built(*SERVICES, wrong)
    assert any(
        "Accepted=NoMatchingParent: Service shop/echo has no port named 'grpc'" in p for p in found
    )


def test_a_match_another_route_already_has_is_reported_as_never_matching() -> None:
    def route(name: str, created: str, backend: str) -> str:
        return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: shop, creationTimestamp: "{created}"}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: x, value: "1"}}]}}]
      backendRefs: [{{name: {backend}, port: 80}}]
    - matches: [{{path: {{type: Exact, value: /only-{name}}}}}]
      backendRefs: [{{name: {backend}, port: 80}}]
"""

    second = route("second", "2026-03-01T00:00:00Z", "echo-v2")
    state, objects, found = _built(
        *SERVICES, route("first", "2026-01-01T00:00:00Z", "echo-v1"), second
    )
    assert found == [
        "test.yaml: HTTPRoute shop/second: spec.rules[0].matches[0] never matches on Service "
        "shop/echo: rule 0 of HTTPRoute shop/first has the same match and comes first "
        "(older, or first by name)"
    ], found
    # Both routes still apply: the older wins the shared match, each keeps its own.
    rules = routing.attached_rules(
        state.routes[mesh.ServiceKey("shop", "echo")].attached, 80, "shop"
    )
    assert rules is not None and len(rules) == 4
    # The younger route's match changes, then changes back: the report
    # follows, though the Service has as many routes as before.
    assert _put(objects, second.replace('value: "1"', 'value: "2"'))[1] == []
    assert _put(objects, second)[1] == found
    # Which route comes first is their age, not the order they are read in.
    _, _, found = _built(
        *SERVICES,
        route("a-newer", "2026-03-01T00:00:00Z", "echo-v2"),
        route("z-older", "2026-01-01T00:00:00Z", "echo-v1"),
    )
    assert len(found) == 1 and found[0].startswith(
        "test.yaml: HTTPRoute shop/a-newer: spec.rules[0].matches[0] never matches"
    ), found
    assert "rule 0 of HTTPRoute shop/z-older" in found[0]


def test_an_unreachable_grpc_backend_is_unavailable_not_an_internal_error() -> None:
    route = """apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: half, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc-echo}]
  rules:
    - backendRefs: [{name: grpc-echo-v2, port: 7070}, {name: grpc-gone, port: 7070}]
"""
    state, _, _ = _built(*SERVICES, route)
    table = _route_config(state, "shop")
    (vhost,) = [v for v in table.virtual_hosts if v.name.startswith("grpc-echo.shop")]
    action = vhost.routes[0].route
    assert action.cluster_not_found_response_code == action.SERVICE_UNAVAILABLE
    assert "shoal-invalid-backend" in [c.name for c in action.weighted_clusters.clusters]


def test_a_build_parses_again_only_the_routes_whose_objects_or_services_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, objects, _ = _built(*SERVICES, ROUTES)
    parsed = parses.recorded(monkeypatch, gatewayapi)

    def put(text: str) -> tuple[mesh.MeshState, list[str]]:
        parsed.clear()
        return _put(objects, text)

    # A Service no route names: no route is parsed again.
    put(_service("other"))
    assert parsed == []
    # A backend loses the port the routes send to: the two routes that name
    # it are parsed again, and say so; the GRPCRoute is not.
    _, found = put(_service("echo-v2", ports=(8080,)))
    assert sorted(parsed) == ["HTTPRoute caller/mine", "HTTPRoute shop/echo"]
    assert any("Service shop/echo-v2 has no port 80" in p for p in found), found
    (mine,) = objects.route_status[("HTTPRoute", "caller", "mine")]
    assert not {c.type: c for c in mine.conditions}["ResolvedRefs"].status
    # It gets the port back: they resolve again.
    _, found = put(_service("echo-v2"))
    assert sorted(parsed) == ["HTTPRoute caller/mine", "HTTPRoute shop/echo"]
    (mine,) = objects.route_status[("HTTPRoute", "caller", "mine")]
    assert {c.type: c for c in mine.conditions}["ResolvedRefs"].status
    # A route read again, equal (a file saved, a watch re-listed): not
    # parsed again; changed: parsed again.
    grpc_route = ROUTES.split("---\n")[2]
    put(grpc_route)
    assert parsed == []
    put(grpc_route.replace("Bye", "Ciao"))
    assert parsed == ["GRPCRoute shop/grpc-echo"]
