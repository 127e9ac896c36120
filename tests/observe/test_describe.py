"""`shoal describe service`: one Service's endpoints, identities, proxies,
routing, policies and problems, from the mesh state and the proxies' status."""

from __future__ import annotations

import pytest

from shoal.model import mesh, proxy, routing
from shoal.observe import describe
from shoal.observe.analysis import facts
from shoal.xds import resources, status

TD = "cluster.local"
REVIEWS = mesh.ServiceKey("shop", "reviews")
REVIEWS_V2 = mesh.ServiceKey("shop", "reviews-v2")
WEB = mesh.ServiceKey("shop", "web")


def state() -> mesh.MeshState:
    reviews = mesh.Service(
        "shop",
        "reviews",
        (mesh.Port(80, "http"), mesh.Port(9090, "grpc", mesh.Protocol.GRPC)),
        annotations=mesh.frozen_map({"shoal.io/split": "reviews=90,reviews-v2=10", "other": "x"}),
        allow=frozenset({("shop", "web"), ("ops", "*")}),
        export_to=frozenset({".", "ops"}),
        outlier=mesh.OutlierPolicy(consecutive_5xx=3, ejection_s=10.0),
        limits=mesh.ConnectionLimits(max_connections=100),
    )
    v2 = mesh.Service("shop", "reviews-v2", (mesh.Port(80, "http"),), mtls="permissive")
    web = mesh.Service("shop", "web", (mesh.Port(80, "http"),))
    billing = mesh.Service("billing", "invoices", (mesh.Port(80, "http"),))
    ops = mesh.Service("ops", "console", (mesh.Port(80, "http"),))
    endpoints = {
        REVIEWS: (
            mesh.Endpoint("127.0.0.1", 16001, "http", service_account="reviews", pod="reviews-1"),
            mesh.Endpoint("127.0.0.1", 16002, "http", ready=False, service_account="reviews"),
        ),
        REVIEWS_V2: (mesh.Endpoint("127.0.0.1", 16003, "http", service_account="reviews"),),
    }
    route = routing.ServiceRoute(
        REVIEWS,
        (
            routing.RouteRule(
                (routing.Backend(REVIEWS_V2),),
                (routing.HeaderMatch("x-user-group", routing.MatchKind.EXACT, "internal"),),
            ),
            routing.RouteRule((routing.Backend(REVIEWS, 90), routing.Backend(REVIEWS_V2, 10))),
        ),
        source="annotations",
        timeout_s=0.2,
        retry=routing.Retry(3, "5xx"),
    )
    return mesh.MeshState(
        version=12,
        services={s.key: s for s in (reviews, v2, web, billing, ops)},
        endpoints=endpoints,
        namespaces={"shop": mesh.Namespace("shop", mtls="strict")},
        routes={REVIEWS: route},
    )


def types(*states: str) -> tuple[status.TypeStatus, ...]:
    kinds = (resources.CLUSTER, resources.ENDPOINT, resources.LISTENER, resources.ROUTE)
    return tuple(
        status.TypeStatus(t, s, "v", "v", "1", 0.0, 0.0, "", 1)
        for t, s in zip(kinds, states, strict=True)
    )


def sidecar(
    name: str, namespace: str, service: str, account: str, port: int, *states: str
) -> facts.ProxyFacts:
    return facts.ProxyFacts(
        name=name,
        identity=f"spiffe://{TD}/ns/{namespace}/sa/{account}",
        proxy=proxy.Sidecar(namespace, service, account, inbound_port=port),
        types=types(*(states or (status.SYNCED,) * 4)),
        connected_at=0.0,
    )


def proxies() -> tuple[facts.ProxyFacts, ...]:
    return (
        sidecar("sidecar~shop~reviews-1", "shop", "reviews", "reviews", 16001),
        # Bootstrapped as another account than its endpoints declare.
        sidecar(
            "sidecar~shop~reviews-2",
            "shop",
            "reviews",
            "default",
            16002,
            status.SYNCED,
            status.STALE,
            status.NACKED,
            status.STALE,
        ),
        sidecar("sidecar~shop~web-1", "shop", "web", "web", 17001),
        sidecar("sidecar~billing~invoices-1", "billing", "invoices", "invoices", 17002),
        sidecar("sidecar~ops~console-1", "ops", "console", "console", 17003),
    )


def test_endpoints_identities_and_the_proxies_serving_them() -> None:
    found = describe.service(state(), REVIEWS, proxies(), TD)
    assert found["service"] == "shop/reviews" and found["mesh_version"] == 12
    assert [(p["port"], p["protocol"], p["endpoints"]) for p in found["ports"]] == [
        (80, "http", 2),
        (9090, "grpc", 0),
    ]
    first, second = found["endpoints"]
    assert (first["port"], first["ready"], first["pod"]) == (16001, True, "reviews-1")
    assert first["identity"] == f"spiffe://{TD}/ns/shop/sa/reviews"
    assert first["proxies"] == ["sidecar~shop~reviews-1"]
    assert (second["port"], second["ready"]) == (16002, False)
    assert second["proxies"] == ["sidecar~shop~reviews-2"]
    assert found["identities"] == [f"spiffe://{TD}/ns/shop/sa/reviews"]
    serving = {p["name"]: p for p in found["proxies"]}
    assert set(serving) == {"sidecar~shop~reviews-1", "sidecar~shop~reviews-2"}
    assert serving["sidecar~shop~reviews-1"]["sync"] == "SYNCED"
    assert serving["sidecar~shop~reviews-1"]["verified"] is True
    assert serving["sidecar~shop~reviews-2"]["sync"] == "NACKED (LDS), STALE (EDS RDS)"
    assert serving["sidecar~shop~reviews-2"]["verified"] is False


def test_a_plain_text_mesh_has_no_identities_to_verify() -> None:
    found = describe.service(state(), REVIEWS, proxies(), None)
    assert found["identities"] is None
    assert found["endpoints"][0]["identity"] == ""
    assert {p["verified"] for p in found["proxies"]} == {None}
    assert found["policies"]["mtls"]["mode"] == "off"
    assert "plain-text mesh" in describe.text(found, [])


def test_routing_policies_and_who_may_call_it() -> None:
    found = describe.service(state(), REVIEWS, proxies(), TD)
    routing_found = found["routing"]
    assert routing_found["source"] == "annotations" and routing_found["timeout_s"] == 0.2
    assert [b["weight"] for b in routing_found["rules"][1]["backends"]] == [90, 10]
    policies = found["policies"]
    assert policies["mtls"] == {"mode": "strict", "from": "namespace shop's shoal.io/mtls"}
    assert [(a["namespace"], a["service_account"]) for a in policies["allow"]] == [
        ("ops", "*"),
        ("shop", "web"),
    ]
    assert policies["allow"][1]["identity"] == f"spiffe://{TD}/ns/shop/sa/web"
    assert policies["export_to"] == [".", "ops"]
    assert policies["outlier"] == {
        "consecutive_5xx": 3,
        "ejection_s": 10.0,
        "max_ejection_percent": 50,
    }
    assert policies["limits"] == {"max_connections": 100}
    callers = {c["name"]: c for c in found["callers"]}
    assert set(callers) == {
        "sidecar~shop~web-1",
        "sidecar~billing~invoices-1",
        "sidecar~ops~console-1",
    }
    assert callers["sidecar~shop~web-1"] | {} == {
        "name": "sidecar~shop~web-1",
        "identity": "shop/web",
        "sees": True,
        "allowed": True,
    }
    # billing is not exported to, and not allowed either.
    assert (
        callers["sidecar~billing~invoices-1"]["sees"],
        callers["sidecar~billing~invoices-1"]["allowed"],
    ) == (False, False)
    assert (
        callers["sidecar~ops~console-1"]["sees"],
        callers["sidecar~ops~console-1"]["allowed"],
    ) == (True, True)
    assert found["annotations"] == {"shoal.io/split": "reviews=90,reviews-v2=10"}
    # reviews-v2 is called through reviews' route, and says so.
    v2 = describe.service(state(), REVIEWS_V2, proxies(), TD)
    assert v2["routed_from"] == ["shop/reviews"]
    assert v2["policies"]["mtls"] == {"mode": "permissive", "from": "the Service's shoal.io/mtls"}
    assert v2["policies"]["allow"] is None and v2["routing"] is None
    web = describe.service(state(), WEB, proxies(), TD)
    assert {c["name"]: c["allowed"] for c in web["callers"]}["sidecar~shop~reviews-2"] is True


def test_the_screen_says_it_all() -> None:
    found = describe.service(state(), REVIEWS, proxies(), TD)
    problem = {
        "code": "SHL0301",
        "severity": "Error",
        "object": "Service shop/reviews",
        "field": "",
        "reason": "proxy sidecar~shop~reviews-2 serves it as spiffe://cluster.local/ns/shop/sa/default",
        "fix": "Bootstrap the sidecar with --service-account reviews.",
    }
    out = describe.text(found, [problem])
    shown = {" ".join(line.split()) for line in out.splitlines()}
    for line in (
        "Name:         reviews",
        "Namespace:    shop",
        "Ports:        http 80/http (2 endpoints), grpc 9090/grpc (0 endpoints)",
        "Endpoints:    1 ready of 2",
        "Identities:   callers accept spiffe://cluster.local/ns/shop/sa/reviews",
        "  sidecar~shop~reviews-1  spiffe://cluster.local/ns/shop/sa/reviews  SYNCED",
        "Routing:      from annotations, first match wins",
        "  1. header x-user-group exact internal -> shop/reviews-v2 weight 100 (100%)",
        "  2. every request -> shop/reviews weight 90 (90%), shop/reviews-v2 weight 10 (10%)",
        "  for every rule: timeout 200ms; retries 3 on 5xx",
        "  mTLS:        strict (from namespace shop's shoal.io/mtls)",
        "  May call it: ops/*, shop/web",
        "  Visible to:  shop, ops only",
        "  Outlier:     eject after 3 consecutive 5xx for 10s, at most 50% of endpoints",
        "  sidecar~billing~invoices-1  billing/invoices  does not see it (export-to, or its own "
        "dependencies)",
        "Problems:     1",
        "  Error [SHL0301] Service shop/reviews",
        "    fix: Bootstrap the sidecar with --service-account reviews.",
    ):
        # Columns are aligned: compared word by word.
        assert " ".join(line.split()) in shown, (line, out)
    assert any(
        line.startswith("  127.0.0.1:16002 (http)  NOT READY") for line in out.splitlines()
    ), out
    assert any(
        "sidecar~shop~reviews-2" in line and "CALLERS REFUSE" in line for line in out.splitlines()
    )


def test_problems_that_name_the_service_and_only_those() -> None:
    def problem(obj: str, reason: str = "") -> dict[str, str]:
        return {"object": obj, "reason": reason}

    assert describe.concerns(problem("Service shop/reviews"), REVIEWS)
    assert describe.concerns(
        problem("TrafficRoute shop/canary", "backend shop/reviews:81"), REVIEWS
    )
    assert describe.concerns(
        problem("HTTPRoute shop/x", "parent reviews.shop.svc.cluster.local"), REVIEWS
    )
    assert not describe.concerns(problem("Service shop/reviews-v2"), REVIEWS)
    assert not describe.concerns(problem("Service other/shop/reviewsx"), REVIEWS)
    assert not describe.concerns(problem("Service myshop/reviews"), REVIEWS)


def test_an_unknown_service_is_named_with_the_close_ones() -> None:
    with pytest.raises(
        describe.UnknownService, match=r"no Service shop/reveiws .*did you mean shop/reviews"
    ):
        describe.service(state(), mesh.ServiceKey("shop", "reveiws"), (), TD)
    with pytest.raises(ValueError, match=r"did you mean shop/web\?$"):
        describe.service_of(state(), {"service": "web"}, (), TD)
    assert describe.suggestions(state(), mesh.ServiceKey("shop", "reveiws")) == [
        "shop/reviews",
        "shop/reviews-v2",
    ]
    assert describe.suggestions(state(), mesh.ServiceKey("other", "invoice")) == [
        "billing/invoices"
    ]
    with pytest.raises(ValueError, match=r"no Service default/zzz in the mesh \(version 12\)$"):
        describe.service_of(state(), {"service": "zzz"}, (), TD)
    with pytest.raises(ValueError, match="name a Service"):
        describe.service_of(state(), {}, (), TD)
    found = describe.service_of(state(), {"service": "reviews", "namespace": "shop"}, (), TD)
    assert found["service"] == "shop/reviews" and found["proxies"] == []
