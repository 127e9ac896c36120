"""Policy analyzers on hand-built mesh states and sidecar counters (the
counter names are those real sidecars report: tests/e2e/test_analyze_policy.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from shoal.model import mesh, problems, proxy
from shoal.observe.analysis import evidence, facts, policy

TD = "spiffe://cluster.local/ns"
A = mesh.ServiceKey("default", "a")
B = mesh.ServiceKey("default", "b")
HID = mesh.ServiceKey("other", "hid")
B_INBOUND = 20001


def service(key: mesh.ServiceKey, **given: object) -> mesh.Service:
    return mesh.Service(key.namespace, key.name, (mesh.Port(80, "http"),), **given)  # type: ignore[arg-type]


def endpoint(account: str) -> mesh.Endpoint:
    return mesh.Endpoint("127.0.0.1", 8080, "http", service_account=account)


def state(
    *services: mesh.Service, namespaces: Mapping[str, mesh.Namespace] | None = None
) -> mesh.MeshState:
    return mesh.MeshState(
        services={s.key: s for s in services},
        endpoints={s.key: (endpoint(f"{s.name}-sa"),) for s in services},
        namespaces=dict(namespaces or {}),
    )


def sidecar(key: mesh.ServiceKey, inbound: int = 0, identity: bool = True) -> facts.ProxyFacts:
    account = f"{key.name}-sa"
    return facts.ProxyFacts(
        name=f"sidecar~{key.namespace}~{key.name}-1",
        identity=f"{TD}/{key.namespace}/sa/{account}" if identity else "",
        proxy=proxy.Sidecar(key.namespace, key.name, account, inbound_port=inbound or 20000),
        types=(),
        connected_at=0.0,
        admin_port=15000,
        peer="ipv4:127.0.0.1:40000",
    )


def live(
    s: mesh.MeshState,
    stats: Mapping[str, Mapping[str, float]],
    proxies: tuple[facts.ProxyFacts, ...] = (),
) -> facts.Facts:
    return facts.Facts(
        s,
        live=True,
        proxies=proxies or (sidecar(A), sidecar(B, B_INBOUND), sidecar(HID)),
        stats=stats,
    )


def requests(
    reporter: str,
    source: str,
    destination: str,
    code: int,
    source_identity: str = "",
    destination_identity: str = "",
) -> str:
    """A request metric's name, as Envoy's stats access logger makes it."""
    return (
        f"shoal.requests_total.reporter.{reporter}.source_workload.{source}"
        f".source_identity.{source_identity}.destination_service.{destination}"
        f".destination_identity.{destination_identity}.response_code.{code}.response_flags.-"
    )


def only(found: facts.Facts, code: str) -> list[problems.Problem]:
    return [p for p in policy.analyze(found) if p.code == code]


def test_a_healthy_mesh_has_no_policy_problem() -> None:
    s = state(
        service(A),
        service(B, allow=frozenset({("default", "a-sa")})),
        service(HID, export_to=frozenset(), dependencies=frozenset({("other", "*")})),
    )
    stats = {
        "sidecar~default~a-1": {
            requests("source", "a.default", "b.default", 200, f"{TD}/default/sa/a-sa"): 9.0,
        },
        "sidecar~default~b-1": {
            f"listener.127.0.0.1_{B_INBOUND}.ssl.handshake": 9.0,
            "http.inbound.rbac.allowed": 9.0,
            requests("destination", "unknown", "b.default", 200, f"{TD}/default/sa/a-sa"): 9.0,
        },
    }
    assert list(policy.analyze(live(s, stats))) == []
    assert list(policy.analyze(facts.Facts(s))) == []


# -- SHL0302 -------------------------------------------------------------------


def refused(count: float, **more: float) -> dict[str, dict[str, float]]:
    prefix = f"listener.127.0.0.1_{B_INBOUND}.ssl."
    return {
        "sidecar~default~b-1": {
            prefix + "connection_error": count,
            **{prefix + k: v for k, v in more.items()},
        }
    }


def test_plain_text_refused_by_a_strict_sidecar_is_named() -> None:
    p = only(live(state(service(A), service(B)), refused(2.0)), "SHL0302")
    assert len(p) == 1
    assert (p[0].subject, p[0].field, p[0].severity) == (
        "Service default/b",
        "",
        problems.Severity.ERROR,
    )
    assert "STRICT, the default" in p[0].reason
    assert f"sidecar~default~b-1 (inbound port {B_INBOUND}) refused 2 connections" in p[0].reason


def test_the_annotation_that_makes_it_strict_is_the_field() -> None:
    s = state(service(B, mtls="strict"))
    (p,) = only(live(s, refused(1.0)), "SHL0302")
    assert p.field == "metadata.annotations[shoal.io/mtls]" and "1 connection " in p.reason
    ns = {"default": mesh.Namespace("default", mtls="strict")}
    (p,) = only(live(state(service(B), namespaces=ns), refused(1.0)), "SHL0302")
    assert "Namespace default" in p.reason and p.field == ""


def test_permissive_takes_plain_text_and_is_no_problem() -> None:
    assert only(live(state(service(B, mtls="permissive")), refused(5.0)), "SHL0302") == []
    ns = {"default": mesh.Namespace("default", mtls="permissive")}
    assert only(live(state(service(B), namespaces=ns), refused(5.0)), "SHL0302") == []
    # The Service's own mode wins over its namespace's.
    s = state(service(B, mtls="strict"), namespaces=ns)
    assert len(only(live(s, refused(5.0)), "SHL0302")) == 1


def test_handshakes_failed_on_a_certificate_are_not_plain_text() -> None:
    s = state(service(A), service(B))
    # Another CA's certificate: the server's own check failed.
    assert only(live(s, refused(2.0, fail_verify_error=2.0)), "SHL0302") == []
    # The callers' sidecars refused b's certificate (an identity mismatch):
    # they abort, which b counts as a failed handshake too.
    stats = refused(3.0)
    stats["sidecar~default~a-1"] = {
        "cluster.outbound|80||b.default.svc.cluster.local.ssl.fail_verify_san": 3.0
    }
    assert only(live(s, stats), "SHL0302") == []


# -- SHL0303 -------------------------------------------------------------------


def guarded(*allow: tuple[str, str]) -> mesh.MeshState:
    c = mesh.ServiceKey("default", "c")
    return state(service(A), service(c), service(B, allow=frozenset(allow)))


def denied_at_b(identity: str, count: float, code: int = 403) -> dict[str, float]:
    return {requests("destination", "unknown", "b.default", code, identity): count}


def test_callers_an_allow_policy_denies_are_named() -> None:
    stats = {"sidecar~default~b-1": denied_at_b(f"{TD}/default/sa/c-sa", 4.0)}
    (p,) = only(live(guarded(("default", "a-sa")), stats), "SHL0303")
    assert (p.subject, p.field) == ("Service default/b", "metadata.annotations[shoal.io/allow]")
    assert "allows only default/a-sa" in p.reason
    assert f"denied {TD}/default/sa/c-sa (4 requests)" in p.reason and "403" in p.reason
    assert "Add default/c-sa to shoal.io/allow" in p.fix


def test_a_403_to_an_admitted_caller_is_the_apps_own() -> None:
    stats = {"sidecar~default~b-1": denied_at_b(f"{TD}/default/sa/a-sa", 4.0)}
    assert only(live(guarded(("default", "a-sa")), stats), "SHL0303") == []
    wildcard = {"sidecar~default~b-1": denied_at_b(f"{TD}/default/sa/c-sa", 4.0)}
    assert only(live(guarded(("default", "*")), wildcard), "SHL0303") == []


def test_both_ends_counting_the_same_requests_count_them_once() -> None:
    c = f"{TD}/default/sa/c-sa"
    stats = {
        "sidecar~default~b-1": denied_at_b(c, 4.0),
        "sidecar~default~c-1": {requests("source", "c.default", "b.default", 403, c): 4.0},
    }
    (p,) = only(live(guarded(("default", "a-sa")), stats), "SHL0303")
    # The caller's sidecar also names the workload behind the identity.
    assert f"{c} (4 requests, from default/c)" in p.reason
    # The caller's side alone (the callee on another host) tells it as well.
    del stats["sidecar~default~b-1"]
    (p,) = only(live(guarded(("default", "a-sa")), stats), "SHL0303")
    assert f"{c} (4 requests, from default/c)" in p.reason
    # The callee's side alone names the identity only.
    stats = {"sidecar~default~b-1": denied_at_b(c, 4.0)}
    (p,) = only(live(guarded(("default", "a-sa")), stats), "SHL0303")
    assert f"{c} (4 requests):" in p.reason


def test_plain_text_callers_of_a_permissive_service_are_denied_too() -> None:
    stats = {"sidecar~default~b-1": denied_at_b("", 2.0)}
    (p,) = only(live(guarded(("default", "a-sa")), stats), "SHL0303")
    assert "callers without a mesh certificate (2 requests)" in p.reason and p.fix == ""


def test_tcp_denials_name_nobody_and_count_when_nobody_got_in() -> None:
    stats = {"sidecar~default~b-1": {"inbound.rbac.denied": 3.0}}
    (p,) = only(live(guarded(("default", "a-sa")), stats), "SHL0303")
    assert "denied 3 requests or connections and allowed none" in p.reason
    stats["sidecar~default~b-1"]["inbound.rbac.allowed"] = 1.0
    assert only(live(guarded(("default", "a-sa")), stats), "SHL0303") == []


def test_an_allow_naming_no_known_identity_denies_everyone_offline() -> None:
    (p,) = only(facts.Facts(guarded(("default", "ghost"), ("nowhere", "*"))), "SHL0303")
    assert "allows only default/ghost and nowhere/*" in p.reason
    assert "no workload in the mesh runs as one of them" in p.reason
    # Known: an endpoint's account, a Pod's, a ServiceAccount object, a namespace with workloads.
    assert only(facts.Facts(guarded(("default", "c-sa"))), "SHL0303") == []
    assert only(facts.Facts(guarded(("default", "*"))), "SHL0303") == []
    with_pod = mesh.MeshState(
        services=guarded().services,
        pods={("ops", "job"): mesh.Pod("ops", "job", "u1", service_account="runner")},
        service_accounts=frozenset({("ops", "deployer")}),
    )
    allow_ops = mesh.MeshState(
        services={
            B: service(B, allow=frozenset({("ops", "runner"), ("ops", "deployer")})),
        },
        pods=with_pod.pods,
        service_accounts=with_pod.service_accounts,
    )
    assert only(facts.Facts(allow_ops), "SHL0303") == []


def test_a_connected_proxy_is_a_known_identity() -> None:
    s = guarded(("tools", "cli-sa"))
    tools = sidecar(mesh.ServiceKey("tools", "cli"))
    assert len(only(live(s, {}, (sidecar(B, B_INBOUND),)), "SHL0303")) == 1
    assert only(live(s, {}, (sidecar(B, B_INBOUND), tools)), "SHL0303") == []


def test_without_mutual_tls_no_allow_is_enforced_so_none_is_reported() -> None:
    insecure = (sidecar(A, identity=False), sidecar(B, B_INBOUND, identity=False))
    assert only(live(guarded(("default", "ghost")), {}, insecure), "SHL0303") == []


def test_a_malformed_allow_is_the_registrys_to_report() -> None:
    # It denies everyone (fails closed), and SHL0003 already says why.
    assert only(facts.Facts(guarded()), "SHL0303") == []


# -- SHL0304 -------------------------------------------------------------------


def unrouted(count: float) -> dict[str, dict[str, float]]:
    a = f"{TD}/default/sa/a-sa"
    return {"sidecar~default~a-1": {requests("source", "a.default", "", 404, a): count}}


def test_a_caller_namespace_that_gets_404s_for_a_hidden_service_is_named() -> None:
    s = state(service(A), service(HID, export_to=frozenset()))
    (p,) = only(live(s, unrouted(2.0)), "SHL0304")
    assert (p.subject, p.field) == ("Service other/hid", "metadata.annotations[shoal.io/export-to]")
    assert "is exported to its own namespace only, hiding it from namespace default" in p.reason
    assert "default/a got 2 answers 404" in p.reason
    assert "Add default to shoal.io/export-to" in p.fix


def test_404s_name_nothing_when_nothing_is_hidden_from_the_caller() -> None:
    s = state(service(A), service(HID, export_to=frozenset({"default"})))
    assert only(live(s, unrouted(2.0)), "SHL0304") == []
    # Its own namespace always sees it.
    s = state(service(A), service(mesh.ServiceKey("default", "own"), export_to=frozenset()))
    assert only(live(s, unrouted(2.0)), "SHL0304") == []


def test_no_404s_no_problem() -> None:
    s = state(service(A), service(HID, export_to=frozenset()))
    assert only(live(s, {}), "SHL0304") == []


def test_too_many_hidden_services_to_choose_from_is_no_diagnosis() -> None:
    hidden = [service(mesh.ServiceKey("other", f"h{i}"), export_to=frozenset()) for i in range(4)]
    assert only(live(state(service(A), *hidden), unrouted(2.0)), "SHL0304") == []


def test_a_declared_dependency_on_a_hidden_service_is_named_offline() -> None:
    s = state(
        service(A, dependencies=frozenset({("other", "hid")})),
        service(HID, export_to=frozenset({"ops"})),
    )
    (p,) = only(facts.Facts(s), "SHL0304")
    assert "is exported only to ops, hiding it from namespace default" in p.reason
    assert "Service default/a declares it calls it (shoal.io/dependencies)" in p.reason


def test_every_caller_namespace_is_named_with_its_own_evidence() -> None:
    ops = mesh.ServiceKey("ops", "cron")
    s = state(
        service(A),
        service(ops, dependencies=frozenset({("other", "hid")})),
        service(HID, export_to=frozenset()),
    )
    (p,) = only(live(s, unrouted(1.0), (sidecar(A), sidecar(ops), sidecar(HID))), "SHL0304")
    assert "hiding it from namespaces default and ops" in p.reason
    assert "(default: default/a got 1 answer 404" in p.reason
    assert "; ops: Service ops/cron declares it calls it" in p.reason
    assert p.fix.startswith("Add default and ops to shoal.io/export-to")


def test_request_metrics_are_read_with_empty_and_dotted_values() -> None:
    name = requests("source", "a.default", "", 404, f"{TD}/default/sa/a.v2")
    (r,) = evidence.requests({name: 3.0, "shoal.requests_total.bogus": 1.0})
    assert r == evidence.Requests(
        "source", "a.default", f"{TD}/default/sa/a.v2", "", "", 404, "-", 3.0
    )


def test_ten_thousand_services_with_policies_are_analyzed_in_one_pass() -> None:
    services = [
        service(
            mesh.ServiceKey(f"ns{i % 100}", f"svc{i}"),
            allow=frozenset({(f"ns{(i + 1) % 100}", f"svc{i + 1}-sa")}),
            export_to=frozenset() if i % 2 else frozenset({"*"}),
            dependencies=frozenset({(f"ns{(i + 3) % 100}", f"svc{i + 3}")}),
        )
        for i in range(10_000)
    ]
    found = facts.Facts(state(*services))
    started = time.perf_counter()
    out = list(policy.analyze(found))
    elapsed = time.perf_counter() - started
    # Every odd Service is hidden from the one that depends on it (svc1 has none).
    assert {p.code for p in out} == {"SHL0304", "SHL0303"}
    assert sum(p.code == "SHL0304" for p in out) == 4_999
    # svc9999 allows ns0/svc10000-sa, which no workload runs as.
    assert [p.subject for p in out if p.code == "SHL0303"] == ["Service ns99/svc9999"]
    assert elapsed < 10.0, elapsed
