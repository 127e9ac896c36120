"""SHL0301 on hand-built facts: which proxies serve a Service as whom."""

from __future__ import annotations

from shoal.model import mesh, proxy
from shoal.observe.analysis import facts, identity

KEY = mesh.ServiceKey("shop", "inventory")
SERVICE = mesh.Service("shop", "inventory", (mesh.Port(80, "http"),))


def _facts(
    declared: str, proven: str, *, stats: dict[str, dict[str, float]] | None = None
) -> facts.Facts:
    state = mesh.MeshState(
        services={KEY: SERVICE},
        endpoints={KEY: (mesh.Endpoint("127.0.0.1", 16001, "http", service_account=declared),)},
    )
    sidecar = proxy.Sidecar("shop", "inventory", service_account=proven, inbound_port=16001)
    return facts.Facts(
        state,
        live=True,
        proxies=(
            facts.ProxyFacts(
                name="sidecar~shop~inventory-1",
                identity=f"spiffe://cluster.local/ns/shop/sa/{proven}",
                proxy=sidecar,
                types=(),
                connected_at=0.0,
            ),
        ),
        stats=stats or {},
    )


def test_a_proxy_proving_the_declared_account_is_not_a_problem() -> None:
    assert list(identity.analyze(_facts("inventory", "inventory"))) == []


def test_a_proxy_proving_another_account_than_declared_is_named_with_the_fix() -> None:
    [found] = identity.analyze(_facts("default", "inventory"))
    assert found.code == "SHL0301" and found.subject == "Service shop/inventory"
    assert found.reason == (
        "proxy sidecar~shop~inventory-1 serves it at 127.0.0.1:16001 as "
        "spiffe://cluster.local/ns/shop/sa/inventory, but callers expect "
        "spiffe://cluster.local/ns/shop/sa/default (its EndpointSlice declares no service "
        "account, so 'default'); every call to it fails that check (503, ssl.fail_verify_san)"
    )
    assert "shoal.io/service-account: inventory" in found.fix


def test_failed_checks_counted_by_callers_are_cited() -> None:
    stats = {
        "sidecar~shop~storefront-1": {
            "cluster.outbound|80||inventory.shop.svc.cluster.local.ssl.fail_verify_san": 7.0,
            "cluster.outbound|80||other.shop.svc.cluster.local.ssl.fail_verify_san": 100.0,
        }
    }
    [found] = identity.analyze(_facts("default", "inventory", stats=stats))
    assert "7 connections already failed that check" in found.reason


def test_a_proxy_not_serving_an_endpoint_of_its_service_is_left_alone() -> None:
    found = _facts("default", "inventory")
    moved = mesh.MeshState(
        services={KEY: SERVICE},
        endpoints={KEY: (mesh.Endpoint("127.0.0.1", 16002, "http"),)},
    )
    assert list(identity.analyze(facts.Facts(moved, proxies=found.proxies))) == []


def test_offline_there_are_no_proxies_and_nothing_to_say() -> None:
    assert list(identity.analyze(facts.Facts(_facts("default", "x").state))) == []
