"""Proxy and certificate analyzers on hand-built facts: NACKs traced to the
object and field that made the resource, stale proxies, late certificates,
skewed clocks; and the clock readings the trace collector keeps.

Envoy's errors here are as real Envoys (1.40) sent them in the end-to-end
tests; the mesh states are built from manifests, as the registry builds them."""

from __future__ import annotations

import time

import yaml

from shoal.model import mesh, problems, proxy
from shoal.observe import traces
from shoal.observe.analysis import facts, proxies, run
from shoal.registry import manifests, store
from shoal.xds import resources, status

NOW = 1_800_000_000.0
NS = "shop"


def service(name: str, notes: str = "", ports: str = "[{name: http, port: 80}]") -> str:
    meta = f"{{name: {name}, namespace: {NS}"
    meta += f", annotations: {{{notes}}}}}" if notes else "}"
    return f"apiVersion: v1\nkind: Service\nmetadata: {meta}\nspec: {{ports: {ports}}}\n"


def built(*texts: str) -> mesh.MeshState:
    objects = store.ObjectStore()
    items = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            obj = manifests.parse_object(doc)
            assert obj is not None
            items.append(store.Sourced(obj, "test.yaml"))
    objects.replace_source("test.yaml", items)
    state, found = objects.build()
    assert found == [], found
    return state


def http_route(name: str, rules: str, parent: str = "web") -> str:
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {NS}}}
spec:
  parentRefs: [{{group: "", kind: Service, name: {parent}}}]
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


def kind_status(
    type_url: str,
    state: str,
    *,
    sent: str = "v2",
    acked: str = "v1",
    sent_at: float = NOW - 1,
    acked_at: float = NOW - 100,
    error: str = "",
) -> status.TypeStatus:
    return status.TypeStatus(type_url, state, sent, acked, "7", sent_at, acked_at, error, 1)


def synced(type_url: str) -> status.TypeStatus:
    return kind_status(type_url, status.SYNCED, sent="v1", acked="v1", acked_at=NOW - 99)


def nacked(type_url: str, error: str) -> status.TypeStatus:
    return kind_status(type_url, status.NACKED, error=error)


def sidecar(
    name: str = "front-1",
    *types: status.TypeStatus,
    namespace: str = NS,
    certificate: facts.HeldCertificate | None = None,
) -> facts.ProxyFacts:
    return facts.ProxyFacts(
        name=f"sidecar~{namespace}~{name}",
        identity=f"spiffe://cluster.local/ns/{namespace}/sa/front",
        proxy=proxy.Sidecar(namespace, "front", "front"),
        types=types or tuple(synced(t) for t in resources.PUSH_ORDER),
        connected_at=NOW - 200,
        certificate=certificate,
    )


def live(
    state: mesh.MeshState | None = None,
    *ps: facts.ProxyFacts,
    changed_at: float = 0.0,
    offsets: dict[str, float] | None = None,
    stats: dict[str, dict[str, float]] | None = None,
) -> facts.Facts:
    return facts.Facts(
        state or mesh.MeshState(),
        live=True,
        proxies=ps,
        now=NOW,
        debounce_max_s=1.0,
        changed_at=changed_at,
        clock_offsets=offsets or {},
        stats=stats or {},
    )


def found(f: facts.Facts) -> list[problems.Problem]:
    return list(proxies.analyze(f))


def one(f: facts.Facts, code: str = "") -> problems.Problem:
    out = [p for p in found(f) if not code or p.code == code]
    assert len(out) == 1, out
    return out[0]


def too_large(regex: str, size: int = 63, limit: int = 50) -> str:
    return (
        f"regex '{regex}' RE2 program size of {size} > max program size of {limit} set for the "
        "error level threshold. Increase configured max program size if necessary."
    )


BACKDATE = 300.0  # the CA starts a certificate's validity this early


def cert(age: float, lifetime: float, serial: str = "1a") -> facts.HeldCertificate:
    """A workload certificate issued `age` seconds ago, as the CA issues it."""
    issued = NOW - age
    return facts.HeldCertificate(serial, issued - BACKDATE, issued + lifetime)


NOT_MODIFIABLE = ":-prefixed or host headers may not be modified"
REGEX = "/items/[a-z]{1,30}"


# -- a healthy mesh -------------------------------------------------------------


def test_synced_proxies_with_fresh_certificates_and_true_clocks_have_no_problem() -> None:
    fresh = cert(age=100, lifetime=3600)
    f = live(
        built(service("web")),
        sidecar("front-1", certificate=fresh),
        sidecar("front-2", certificate=fresh),
        offsets={"sidecar~shop~front-1": 4.5, "sidecar~shop~front-2": -3.0},
    )
    assert found(f) == []
    assert run.analyze(f) == []


# -- SHL0106: a regular expression over Envoy's RE2 limit -------------------------


def test_a_regex_envoy_refuses_names_the_httproute_rule_and_match_that_holds_it() -> None:
    state = built(
        service("web"),
        service("web-v2"),
        http_route(
            "search",
            "    - matches: [{path: {type: PathPrefix, value: /api}}]\n"
            "      backendRefs: [{name: web, port: 80}]\n"
            "    - matches:\n"
            "        - {path: {type: PathPrefix, value: /v2}}\n"
            f"        - {{path: {{type: RegularExpression, value: '{REGEX}'}}}}\n"
            "      backendRefs: [{name: web-v2, port: 80}]\n",
        ),
    )
    error = too_large(REGEX)
    f = live(state, sidecar("front-1", nacked(resources.ROUTE, error)))
    p = one(f)
    assert (p.code, p.subject, p.field) == (
        "SHL0106",
        "HTTPRoute shop/search",
        "spec.rules[1].matches[1].path.value",
    )
    assert p.kind.name == "RegexRejected"
    assert p.reason.startswith(
        "proxy sidecar~shop~front-1 rejected RDS version v2 (its routes to Service shop/web): "
        "Envoy says \"regex '/items/[a-z]{1,30}' RE2 program size of 63 > max program size of 50"
    )
    assert p.reason.endswith(
        "it keeps RDS version v1 and gets no RDS change until this is corrected"
    )


def test_a_rejected_regex_in_a_trafficroute_header_or_an_annotation_names_that_field() -> None:
    header = "x-user-[a-z]{1,30}"
    state = built(
        service("web"),
        service("web-v2"),
        service("api", notes=f'shoal.io/route-headers: "x-group~={REGEX} -> web-v2"'),
        traffic_route(
            "    - match: {headers: [{name: x-env, exact: prod}, "
            f"{{name: x-user, regex: '{header}'}}]}}\n"
            "      backends: [{service: web-v2}]\n"
            "    - backends: [{service: web}]\n"
        ),
    )
    by_trafficroute = one(live(state, sidecar("f", nacked(resources.ROUTE, too_large(header)))))
    assert (by_trafficroute.subject, by_trafficroute.field) == (
        "TrafficRoute shop/web-rules",
        "spec.rules[0].match.headers[1].regex",
    )
    by_annotation = one(live(state, sidecar("f", nacked(resources.ROUTE, too_large(REGEX)))))
    assert (by_annotation.subject, by_annotation.field) == (
        "Service shop/api",
        "metadata.annotations[shoal.io/route-headers]",
    )


def test_a_grpcroute_method_regex_is_named_by_its_method_match() -> None:
    grpc = "[{name: grpc, port: 7070, appProtocol: grpc}]"
    state = built(
        service("rpc", ports=grpc),
        """apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: rpc}]
  rules:
    - matches:
        - method: {type: RegularExpression, service: "[a-z]{1,30}", method: "[A-Z][a-z]{1,30}"}
      backendRefs: [{name: rpc, port: 7070}]
""",
    )
    combined = "/[a-z]{1,30}/[A-Z][a-z]{1,30}"
    p = one(live(state, sidecar("f", nacked(resources.ROUTE, too_large(combined, 131, 100)))))
    assert (p.code, p.subject, p.field) == (
        "SHL0106",
        "GRPCRoute shop/rpc",
        "spec.rules[0].matches[0].method",
    )


def test_every_proxy_rejecting_one_regex_is_one_problem_that_counts_them() -> None:
    state = built(
        service("web"),
        http_route(
            "search",
            f"    - matches: [{{path: {{type: RegularExpression, value: '{REGEX}'}}}}]\n"
            "      backendRefs: [{name: web, port: 80}]\n",
        ),
    )
    error = too_large(REGEX)
    many = [sidecar(f"front-{i:04}", nacked(resources.ROUTE, error)) for i in range(1000)]
    started = time.perf_counter()
    (p,) = found(live(state, *many))
    # Traced once per error and namespace, not once per proxy.
    assert time.perf_counter() - started < 1.0
    assert p.reason.startswith(
        "proxies sidecar~shop~front-0000, sidecar~shop~front-0001, sidecar~shop~front-0002 "
        "and 997 more rejected RDS version v2"
    )
    assert "they keep RDS version v1 and get no RDS change" in p.reason


# -- SHL0401: any other rejection, traced to its object --------------------------


def test_a_header_envoy_may_not_modify_names_the_httproute_filter() -> None:
    state = built(
        service("web"),
        http_route(
            "search",
            "    - filters:\n"
            "        - type: RequestHeaderModifier\n"
            "          requestHeaderModifier: {set: [{name: Host, value: search.internal}]}\n"
            "      backendRefs: [{name: web, port: 80}]\n",
        ),
    )
    p = one(live(state, sidecar("front-1", nacked(resources.ROUTE, NOT_MODIFIABLE))))
    assert (p.code, p.subject, p.field) == (
        "SHL0401",
        "HTTPRoute shop/search",
        "spec.rules[0].filters[].requestHeaderModifier",
    )
    assert f"Envoy says {NOT_MODIFIABLE!r}" in p.reason


def _dump_error(route_name: str) -> str:
    """Envoy's proto validation error for the second virtual host's first
    route of an outbound route configuration, as Envoy 1.40 words it: the
    resource, then what failed."""
    return (
        'goo.gle/debugonly   \nname: "outbound"\nvirtual_hosts {\n'
        '  name: "api.shop.svc.cluster.local:80"\n  domains: "api"\n  routes {\n'
        '    match {\n      prefix: "/"\n    }\n    name: "api.shop:80#0"\n  }\n}\n'
        'virtual_hosts {\n  name: "web.shop.svc.cluster.local:80"\n  domains: "web"\n'
        '  routes {\n    match {\n      prefix: "/"\n    }\n    request_headers_to_add {\n'
        '      header {\n        key: "x-a"\n        value: "a\\nb"\n      }\n    }\n'
        f'    name: "{route_name}"\n  }}\n  routes {{\n    name: "web.shop:80#unmatched"\n'
        "  }\n}\n: Proto constraint validation failed (RouteConfigurationValidationError."
        "VirtualHosts[1]: embedded message failed validation | caused by VirtualHostValidationError"
        ".Routes[0]: embedded message failed validation | caused by RouteValidationError."
        "RequestHeadersToAdd[0]: embedded message failed validation | caused by "
        'HeaderValueValidationError.Value: value does not match regex pattern "^[^\\x00\\n\\r]*$")'
    )


def test_a_validation_error_is_traced_through_the_route_it_points_at() -> None:
    state = built(
        service("api"),
        service("web"),
        service("web-v2"),
        http_route(
            "canary",
            "    - matches: [{headers: [{name: x-canary, value: "
            '"yes"}]}, {path: {type: Exact, value: /beta}}]\n'
            "      filters:\n"
            "        - type: RequestHeaderModifier\n"
            '          requestHeaderModifier: {set: [{name: x-a, value: "a\\nb"}]}\n'
            "      backendRefs: [{name: web-v2, port: 80}]\n"
            "    - backendRefs: [{name: web, port: 80}]\n",
        ),
    )
    # Route 0 of web's port 80 is the HTTPRoute's most specific match: the
    # exact path (rule 0, match 1) before the header (rule 0, match 0).
    p = one(live(state, sidecar("front-1", nacked(resources.ROUTE, _dump_error("web.shop:80#0")))))
    assert (p.code, p.subject, p.field) == (
        "SHL0401",
        "HTTPRoute shop/canary",
        "spec.rules[0].matches[1]",
    )
    assert "rejected RDS version v2 (route web.shop:80#0)" in p.reason
    # What failed is quoted, not the dump of the whole configuration.
    assert "Envoy says 'Proto constraint validation failed (RouteConfigurationValidation" in (
        p.reason
    )
    assert "domains" not in p.reason


def test_a_trafficroute_rule_and_an_annotation_split_are_traced_by_route_name() -> None:
    state = built(
        service("api", notes='shoal.io/split: "api=100"'),
        service("web"),
        service("web-v2"),
        traffic_route(
            "    - match: {path: {prefix: /v2}}\n"
            "      backends: [{service: web-v2}]\n"
            "    - backends: [{service: web}]\n"
        ),
    )
    by_rule = one(live(state, sidecar("f", nacked(resources.ROUTE, _dump_error("web.shop:80#1")))))
    assert (by_rule.subject, by_rule.field) == ("TrafficRoute shop/web-rules", "spec.rules[1]")
    split = "Error: route api.shop:80#0 cannot be used"
    by_split = one(live(state, sidecar("f", nacked(resources.ROUTE, split))))
    assert (by_split.subject, by_split.field) == (
        "Service shop/api",
        "metadata.annotations[shoal.io/split]",
    )


def test_a_rejected_cluster_names_its_service_and_an_unknown_error_its_proxy() -> None:
    state = built(service("web"))
    error = (
        "Error adding/updating cluster(s) outbound|80||web.shop.svc.cluster.local: "
        "outlier detection interval too large"
    )
    by_cluster = one(live(state, sidecar("front-1", nacked(resources.CLUSTER, error))))
    assert (by_cluster.code, by_cluster.subject, by_cluster.field) == (
        "SHL0401",
        "Service shop/web",
        "",
    )
    assert "rejected CDS version v2 (cluster outbound|80||web.shop.svc.cluster.local)" in (
        by_cluster.reason
    )
    # Nothing in the error leads to an object: the proxy is all there is.
    unknown = one(live(state, sidecar("front-1", nacked(resources.LISTENER, "bad listener"))))
    assert (unknown.code, unknown.subject) == ("SHL0401", "Proxy sidecar~shop~front-1")
    # A Service the mesh does not have is not a culprit.
    gone = "Error adding/updating cluster(s) outbound|80||old.shop.svc.cluster.local: x"
    assert one(live(state, sidecar("f", nacked(resources.CLUSTER, gone)))).subject == (
        "Proxy sidecar~shop~f"
    )


def test_a_rejected_certificate_is_a_certificate_problem_not_a_config_one() -> None:
    fresh = cert(age=100, lifetime=3600)
    error = "Failed to load certificate chain from <inline>"
    p = one(live(None, sidecar("f", nacked(resources.SECRET, error), certificate=fresh)))
    assert p.code == "SHL0403"
    assert "it rejected the renewed one (SDS version v2)" in p.reason


# -- SHL0402: stale proxies -----------------------------------------------------


def test_a_proxy_that_has_not_acknowledged_for_too_long_is_stale_and_says_how_long() -> None:
    behind = kind_status(resources.CLUSTER, status.STALE, sent_at=NOW - 42)
    p = one(live(None, sidecar("front-1", synced(resources.SECRET), behind)))
    assert (p.code, p.subject, p.field) == ("SHL0402", "Proxy sidecar~shop~front-1", "")
    assert p.reason == (
        "proxy sidecar~shop~front-1 has been behind for 42 s (debounce maximum 1 s): it was sent "
        "CDS 42 s ago and has not acknowledged it, so it routes by an older mesh"
    )


def test_a_proxy_not_sent_the_current_version_is_stale_from_the_mesh_change() -> None:
    waiting = kind_status(
        resources.LISTENER,
        status.STALE,
        sent="v1",
        acked="v1",
        sent_at=NOW - 900,
        acked_at=NOW - 900,
    )
    late = live(None, sidecar("front-1", waiting), changed_at=NOW - 300)
    assert "has been behind for 5 min" in one(late).reason
    assert "it has not been sent the current LDS yet" in one(late).reason
    # What is on its way and what waits for it are both said.
    sent = kind_status(resources.CLUSTER, status.STALE, sent_at=NOW - 100)
    both = one(live(None, sidecar("front-1", sent, waiting), changed_at=NOW - 300))
    assert both.reason.endswith(
        "it was sent CDS 100 s ago and has not acknowledged it; it has not been sent the "
        "current LDS yet, so it routes by an older mesh"
    )
    # Just changed: the push is still within the debounce window and margin.
    assert found(live(None, sidecar("front-1", waiting), changed_at=NOW - 3)) == []


def test_a_proxy_answering_within_the_debounce_and_margin_is_not_stale() -> None:
    in_flight = kind_status(resources.ROUTE, status.STALE, sent_at=NOW - 5.9)
    assert found(live(None, sidecar("front-1", in_flight))) == []


# -- SHL0403: certificates ------------------------------------------------------


def test_a_certificate_with_under_a_quarter_of_its_life_left_and_no_ack_is_named() -> None:
    late = cert(age=90, lifetime=100)
    sds = kind_status(resources.SECRET, status.STALE, sent_at=NOW - 40)
    f = live(None, sidecar("front-1", sds, certificate=late))
    p = one(f, "SHL0403")
    assert p.subject == "Proxy sidecar~shop~front-1"
    # Its renewal is also a push it has not acknowledged.
    assert one(f, "SHL0402").subject == p.subject
    assert "expires in 10 s, 10% of its 100 s lifetime left" in p.reason
    assert "the renewed one was sent 40 s ago and not acknowledged" in p.reason


def test_an_expired_certificate_the_control_plane_did_not_renew_says_so() -> None:
    expired = cert(age=4200, lifetime=3600)
    p = one(live(None, sidecar("front-1", synced(resources.SECRET), certificate=expired)))
    assert "expired 10 min ago" in p.reason
    assert "the control plane has not sent it a renewed one" in p.reason


def test_a_certificate_with_more_than_a_quarter_left_is_fine() -> None:
    held = cert(age=70, lifetime=100)
    assert found(live(None, sidecar("front-1", certificate=held))) == []


# -- SHL0404: clocks ------------------------------------------------------------


def test_a_clock_far_ahead_makes_peers_certificates_look_expired() -> None:
    held = cert(age=300, lifetime=900)
    name = "sidecar~shop~front-1"
    stats = {name: {"cluster.outbound|80||web.shop.svc.cluster.local.ssl.fail_verify_error": 7.0}}
    p = one(live(None, sidecar(certificate=held), offsets={name: 7200.0}, stats=stats))
    assert (p.code, p.subject) == ("SHL0404", "Proxy sidecar~shop~front-1")
    assert p.reason == (
        "proxy sidecar~shop~front-1's clock is 2 h ahead of the control plane's (by the "
        "spans it reports): workload certificates live 15 min, so every one looks expired to it "
        "and all its mutual-TLS handshakes fail; it has already failed 7 certificate checks"
    )


def test_a_clock_behind_makes_new_certificates_look_not_yet_valid() -> None:
    held = cert(age=600, lifetime=86_400)
    name = "sidecar~shop~front-1"

    def reason(offset: float) -> str:
        return one(live(None, sidecar(certificate=held), offsets={name: offset})).reason

    assert "clock is 15 min behind the control plane's" in reason(-900.0)
    assert reason(-900.0).endswith(
        "a certificate looks not yet valid to it for 10 min after it is issued, so its "
        "mutual-TLS handshakes with freshly renewed proxies fail"
    )
    assert "certificates still look valid to it (their validity starts 5 min before" in (
        reason(-240.0)
    )
    assert "every one looks not yet valid to it" in reason(-2 * 86_400.0)


def test_a_clock_ahead_by_half_a_lifetime_fails_the_older_certificates() -> None:
    held = cert(age=60, lifetime=3600)
    p = one(live(None, sidecar(certificate=held), offsets={"sidecar~shop~front-1": 2400.0}))
    assert "so those older than 20 min look expired to it" in p.reason
    small = one(live(None, sidecar(certificate=held), offsets={"sidecar~shop~front-1": 600.0}))
    assert "certificates look expired to it 10 min early" in small.reason


def test_a_clock_within_what_span_delays_explain_is_not_skewed() -> None:
    within = proxies.SKEW_THRESHOLD_S - 1
    assert found(live(None, sidecar(), offsets={"sidecar~shop~front-1": -within})) == []
    assert found(live(None, sidecar(), offsets={"sidecar~shop~front-1": within})) == []


def test_proxies_sharing_a_node_id_are_found_by_it() -> None:
    shared = sidecar()
    renamed = facts.ProxyFacts(
        name=f"{shared.name} [shop/front]",
        identity=shared.identity,
        proxy=shared.proxy,
        types=shared.types,
        connected_at=shared.connected_at,
    )
    p = one(live(None, renamed, offsets={shared.name: 300.0}))
    assert p.reason == (
        "proxy sidecar~shop~front-1 [shop/front]'s clock is 5 min ahead of the control plane's "
        "(by the spans it reports): certificates may look expired to it"
    )


# -- the collector's clock readings ---------------------------------------------


def span(node: str, end_s: float, span_id: int = 1, duration_us: int = 2_000) -> dict[str, object]:
    return {
        "traceId": "0" * 31 + "1",
        "id": f"{span_id:016x}",
        "kind": "CLIENT",
        "timestamp": int(end_s * 1e6) - duration_us,
        "duration": duration_us,
        "localEndpoint": {"serviceName": "front.shop"},
        "tags": {"node_id": node},
    }


def test_a_proxys_offset_is_its_freshest_spans_end_against_the_reports_arrival() -> None:
    spans = traces.SpanStore()
    report = [
        span("ahead", NOW + 3600 - 4.0, 1),  # waited 4 s in Envoy's buffer
        span("ahead", NOW + 3600 - 0.5, 2),
        span("true", NOW - 2.0, 3),
        {"traceId": "0" * 31 + "2", "id": "0" * 15 + "4", "tags": {"node_id": "no-time"}},
    ]
    assert spans.add(report, arrived_at=NOW) == 4
    offsets = spans.clock_offsets(now=NOW)
    assert offsets.keys() == {"ahead", "true"}
    assert abs(offsets["ahead"] - 3599.5) < 1e-3 and abs(offsets["true"] + 2.0) < 1e-3
    # A later report replaces the reading: a clock set right shows at once.
    spans.add([span("ahead", NOW + 9.0, 5)], arrived_at=NOW + 10)
    assert abs(spans.clock_offsets(now=NOW + 10)["ahead"] + 1.0) < 1e-3
    # A reading too old to say anything about the clock now is forgotten.
    later = NOW + 10 + traces.CLOCK_MEMORY_S + 1
    assert spans.clock_offsets(now=later) == {}


def test_clock_readings_are_bounded() -> None:
    spans = traces.SpanStore()
    for i in range(traces.MAX_CLOCKS + 5):
        spans.add([span(f"node-{i}", NOW, i + 1)], arrived_at=NOW)
    offsets = spans.clock_offsets(now=NOW)
    assert len(offsets) == traces.MAX_CLOCKS and "node-0" not in offsets
