"""Sidecars whose Pod's traffic iptables captures: golden files, Envoy's own
check, and the rules (unique chain matches, passthrough, who the proxy is)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import json_format, struct_pb2

from shoal.model import mesh, proxy, routing
from shoal.sds import ca
from shoal.xds import cache, controller, debounce, node, resources
from shoal.xds.translate import (
    bootstrap,
    capture,
    clusters,
    listeners,
    names,
    routes,
    secrets,
)
from tests.xds import test_envoy_validate
from tests.xds.test_translate import check_golden

TRUST_DOMAIN = "cluster.local"
WEB = mesh.ServiceKey("shop", "web")
WEB_V2 = mesh.ServiceKey("shop", "web-v2")


def state() -> mesh.MeshState:
    """Two namespaces: HTTP with a canary and a header route, TCP, headless,
    and TCP and HTTP sharing port 80; Pod web-1 serves two ports."""
    web = mesh.Service(
        "shop",
        "web",
        (
            mesh.Port(80, "http", target_port=8080),
            mesh.Port(9090, "grpc-api", mesh.Protocol.GRPC, target_port=9000),
        ),
        cluster_ip="10.96.0.10",
        allow=frozenset({("shop", "frontend"), ("billing", "*")}),
    )
    web_v2 = mesh.Service(
        "shop", "web-v2", (mesh.Port(80, "http", target_port=8080),), cluster_ip="10.96.0.11"
    )
    db = mesh.Service(
        "shop", "db", (mesh.Port(5432, "tcp-db", mesh.Protocol.TCP),), cluster_ip="10.96.0.20"
    )
    cache = mesh.Service(
        "shop", "cache", (mesh.Port(6379, "tcp-redis", mesh.Protocol.TCP),), cluster_ip="None"
    )
    invoices = mesh.Service(
        "billing", "invoices", (mesh.Port(80, "http", target_port=8000),), cluster_ip="10.96.1.10"
    )
    ledger = mesh.Service(
        "billing",
        "ledger",
        (mesh.Port(80, "tcp-ledger", mesh.Protocol.TCP, target_port=7000),),
        cluster_ip="10.96.1.20",
    )
    eps = {
        web.key: tuple(
            mesh.Endpoint(ip, port, name, service_account="web", pod=pod)
            for ip, pod in (("10.0.0.1", "web-1"), ("10.0.0.2", "web-2"))
            for port, name in ((8080, "http"), (9000, "grpc-api"))
        ),
        web_v2.key: (
            mesh.Endpoint("10.0.0.3", 8080, "http", service_account="web", pod="web-v2-1"),
        ),
        db.key: (mesh.Endpoint("10.0.1.1", 5432, "tcp-db", service_account="db", pod="db-1"),),
        cache.key: (
            mesh.Endpoint("10.0.2.1", 6379, "tcp-redis", service_account="cache", pod="cache-0"),
            mesh.Endpoint("10.0.2.2", 6379, "tcp-redis", service_account="cache", pod="cache-1"),
            mesh.Endpoint("10.0.2.3", 6379, "tcp-redis", ready=False, pod="cache-2"),
        ),
        invoices.key: (mesh.Endpoint("10.0.3.1", 8000, "http", pod="invoices-1"),),
        ledger.key: (mesh.Endpoint("10.0.3.2", 7000, "tcp-ledger", pod="ledger-1"),),
    }
    canary = routing.ServiceRoute(
        web.key,
        (
            routing.RouteRule(
                (routing.Backend(web_v2.key),),
                (routing.HeaderMatch("x-user-group", routing.MatchKind.EXACT, "internal"),),
            ),
            routing.RouteRule((routing.Backend(web.key, 90), routing.Backend(web_v2.key, 10))),
        ),
        source="annotations",
        retry=routing.Retry(3, "5xx,reset"),
    )
    pods = {
        ("shop", "web-1"): mesh.Pod("shop", "web-1", "uid-web-1", "10.0.0.1", "web"),
        ("shop", "db-1"): mesh.Pod("shop", "db-1", "uid-db-1", "10.0.1.1", "db"),
    }
    services = {s.key: s for s in (web, web_v2, db, cache, invoices, ledger)}
    return mesh.MeshState(
        version=3, services=services, endpoints=eps, routes={web.key: canary}, pods=pods
    )


def web_1() -> proxy.CapturedSidecar:
    return proxy.CapturedSidecar("shop", "web-1", "uid-web-1", "web", "10.0.0.1")


def _peers(svc: mesh.Service, s: mesh.MeshState) -> frozenset[str]:
    accounts = {e.service_account for e in s.endpoints.get(svc.key, ())} or {"default"}
    return frozenset(f"spiffe://{TRUST_DOMAIN}/ns/{svc.namespace}/sa/{a}" for a in accounts)


def _listeners(s: mesh.MeshState) -> list[listener_pb2.Listener]:
    sidecar = web_1()
    strict = capture.virtual_inbound(sidecar, s, capture.security(sidecar, s, TRUST_DOMAIN))
    permissive = capture.virtual_inbound(sidecar, s, listeners.InboundSecurity(permissive=True))
    return [capture.virtual_outbound(s.sorted_services(), s), strict, permissive]


def _clusters(s: mesh.MeshState) -> list[cluster_pb2.Cluster]:
    headless = [
        c for svc in s.sorted_services() for c in capture.headless_clusters(svc, _peers(svc, s))
    ]
    return [*capture.own_clusters(web_1(), s), *headless]


# -- golden files -------------------------------------------------------------


def test_golden_listeners() -> None:
    check_golden("capture_listeners", list(_listeners(state())))


def test_golden_routes() -> None:
    s = state()
    check_golden("capture_routes", list(capture.route_configs(s.sorted_services(), "shop", s)))


def test_golden_clusters() -> None:
    check_golden("capture_clusters", list(_clusters(state())))


# -- Envoy's own check ----------------------------------------------------------


def _bootstrap() -> dict[str, Any]:
    return bootstrap.captured_sidecar(
        web_1(),
        node_id="sidecar~10.0.0.1~web-1.shop",
        xds_host="shoal.shoal-system",
        xds_port=15010,
    )


def _inline_routes(
    listener: listener_pb2.Listener, configs: dict[str, Any]
) -> listener_pb2.Listener:
    """RDS is served over ADS at run time; inline it so Envoy checks the
    routes, and that every cluster they name exists, too."""
    for chain in listener.filter_chains:
        for f in chain.filters:
            manager = hcm_pb2.HttpConnectionManager()
            if f.typed_config.Unpack(manager) and manager.HasField("rds"):
                manager.route_config.CopyFrom(configs[manager.rds.route_config_name])
                f.typed_config.Pack(manager)
    return listener


def _static_secrets(config: Any) -> Any:
    """SDS references without a source name bootstrap secrets. Envoy 1.40
    crashes on a bootstrap ORIGINAL_DST cluster whose TLS waits for SDS over
    ADS (envoyproxy/envoy#29423); over CDS, as at run time, it is fine."""
    if isinstance(config, dict):
        if "name" in config and "sdsConfig" in config:
            del config["sdsConfig"]
        for value in config.values():
            _static_secrets(value)
    elif isinstance(config, list):
        for value in config:
            _static_secrets(value)
    return config


def test_captured_sidecar_config_is_valid_envoy_config(tmp_path: Path) -> None:
    s = state()
    configs = {rc.name: rc for rc in capture.route_configs(s.sorted_services(), "shop", s)}
    outbound, strict, permissive = _listeners(s)
    permissive.name += "-permissive"
    permissive.address.socket_address.port_value += 1
    all_clusters = [
        c for svc in s.sorted_services() for c in clusters.outbound_for_service(svc, _peers(svc, s))
    ] + _clusters(s)
    authority = ca.Authority(ca.new_root(TRUST_DOMAIN))
    pair = authority.workload("shop", "web")
    config = _bootstrap()
    config["static_resources"]["clusters"] += [json_format.MessageToDict(c) for c in all_clusters]
    config["static_resources"]["listeners"] += [
        json_format.MessageToDict(item)
        for item in (_inline_routes(outbound, configs), strict, permissive)
    ]
    config["static_resources"]["secrets"] = [
        json_format.MessageToDict(secrets.workload(pair.cert_pem, pair.key_pem)),
        json_format.MessageToDict(secrets.trust_bundle(authority.trust_bundle)),
    ]
    result = test_envoy_validate.validate(_static_secrets(config), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_plain_text_inbound_is_valid_envoy_config(tmp_path: Path) -> None:
    # Without a CA there is no mTLS anywhere: no SDS names, no TLS inspector.
    s = state()
    config = _bootstrap()
    config["static_resources"]["clusters"] += [
        json_format.MessageToDict(c) for c in capture.own_clusters(web_1(), s)
    ]
    config["static_resources"]["listeners"].append(
        json_format.MessageToDict(capture.virtual_inbound(web_1(), s))
    )
    result = test_envoy_validate.validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -- outbound -----------------------------------------------------------------


def _match_key(chain: listener_components_pb2.FilterChain) -> bytes:
    return chain.filter_chain_match.SerializeToString(deterministic=True)


def _cluster_of(chain: listener_components_pb2.FilterChain) -> str:
    # The terminal filter, after any RBAC.
    proxy_config = tcp_proxy_pb2.TcpProxy()
    assert chain.filters[-1].typed_config.Unpack(proxy_config)
    return proxy_config.cluster


def _by_match(listener: listener_pb2.Listener) -> dict[tuple[int, str], Any]:
    return {
        (
            c.filter_chain_match.destination_port.value,
            ",".join(
                f"{r.address_prefix}/{r.prefix_len.value}"
                for r in c.filter_chain_match.prefix_ranges
            ),
        ): c
        for c in listener.filter_chains
    }


def test_filter_chain_matches_are_unique() -> None:
    s = state()
    # A second headless Service selecting the same Pods: same IP and port.
    cache = s.services[mesh.ServiceKey("shop", "cache")]
    twin = dataclasses.replace(cache, name="cache-twin")
    s = dataclasses.replace(
        s,
        services={**s.services, twin.key: twin},
        endpoints={**s.endpoints, twin.key: s.endpoints[cache.key]},
    )
    listener = capture.virtual_outbound(s.sorted_services(), s)
    matches = [_match_key(c) for c in listener.filter_chains]
    assert len(matches) == len(set(matches))
    # The first Service (by name) keeps the address.
    chains = _by_match(listener)
    assert _cluster_of(chains[(6379, "10.0.2.1/32")]) == (
        "outbound|6379|original-dst|cache.shop.svc.cluster.local"
    )


def test_services_sharing_a_port_share_one_http_chain_and_tcp_is_more_specific() -> None:
    s = state()
    chains = _by_match(capture.virtual_outbound(s.sorted_services(), s))
    # web, web-v2 and invoices all use 80: one chain, routed by Host.
    http = chains[(80, "")]
    manager = hcm_pb2.HttpConnectionManager()
    assert http.filters[0].typed_config.Unpack(manager)
    assert manager.rds.route_config_name == "80"
    assert [f.name for f in manager.http_filters] == [listeners.FAULT, listeners.ROUTER]
    # ledger is TCP on 80 too: its ClusterIP wins over the port-only chain.
    assert _cluster_of(chains[(80, "10.96.1.20/32")]) == (
        "outbound|80||ledger.billing.svc.cluster.local"
    )
    assert _cluster_of(chains[(5432, "10.96.0.20/32")]) == (
        "outbound|5432||db.shop.svc.cluster.local"
    )
    assert (9090, "") in chains
    assert set(chains) == {
        (80, ""),
        (9090, ""),
        (80, "10.96.1.20/32"),
        (5432, "10.96.0.20/32"),
        (6379, "10.0.2.1/32"),
        (6379, "10.0.2.2/32"),
    }


def test_tcp_and_http_on_one_port_number_of_one_service_ip() -> None:
    both = mesh.Service(
        "ns",
        "both",
        (mesh.Port(80, "http"), mesh.Port(81, "tcp-raw", mesh.Protocol.TCP)),
        cluster_ip="10.96.9.9",
    )
    other = mesh.Service(
        "ns",
        "other",
        (mesh.Port(81, "http-alt"), mesh.Port(80, "tcp", mesh.Protocol.TCP)),
        cluster_ip="10.96.9.8",
    )
    s = mesh.MeshState(services={both.key: both, other.key: other})
    listener = capture.virtual_outbound(s.sorted_services(), s)
    matches = [_match_key(c) for c in listener.filter_chains]
    assert len(matches) == len(set(matches))
    assert set(_by_match(listener)) == {
        (80, ""),
        (81, ""),
        (81, "10.96.9.9/32"),
        (80, "10.96.9.8/32"),
    }


def test_unknown_destinations_pass_through() -> None:
    s = state()
    listener = capture.virtual_outbound(s.sorted_services(), s)
    assert listener.name == names.VIRTUAL_OUTBOUND == "virtualOutbound"
    assert listener.address.socket_address.port_value == 15001
    assert [f.name for f in listener.listener_filters] == [capture.ORIGINAL_DST]
    assert _cluster_of(listener.default_filter_chain) == "PassthroughCluster"
    own = {c.name: c for c in capture.own_clusters(web_1(), s)}
    for name in ("PassthroughCluster", "InboundPassthroughCluster"):
        assert own[name].type == cluster_pb2.Cluster.ORIGINAL_DST
        assert own[name].lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
        assert not own[name].HasField("transport_socket")
    # An unknown Host on a known port, too.
    for config in capture.route_configs(s.sorted_services(), "shop", s):
        last = config.virtual_hosts[-1]
        assert list(last.domains) == ["*"]
        assert last.routes[0].route.cluster == "PassthroughCluster"


def test_headless_services_reach_the_pod_dialled_with_mtls() -> None:
    s = state()
    cache = s.services[mesh.ServiceKey("shop", "cache")]
    assert cache.headless and not s.services[WEB].headless
    chains = _by_match(capture.virtual_outbound(s.sorted_services(), s))
    # Not-ready cache-2 (10.0.2.3) gets no chain.
    assert sorted(k for k in chains if k[0] == 6379) == [
        (6379, "10.0.2.1/32"),
        (6379, "10.0.2.2/32"),
    ]
    (cluster,) = capture.headless_clusters(cache, _peers(cache, s))
    assert cluster.name == _cluster_of(chains[(6379, "10.0.2.1/32")])
    assert cluster.type == cluster_pb2.Cluster.ORIGINAL_DST
    assert cluster.lb_policy == cluster_pb2.Cluster.CLUSTER_PROVIDED
    eds = clusters.outbound(cache, cache.ports[0], _peers(cache, s))
    assert cluster.transport_socket == eds.transport_socket
    assert capture.headless_clusters(s.services[WEB]) == []


# -- routes -------------------------------------------------------------------


def test_port_routes_answer_every_host_spelling_and_the_cluster_ip() -> None:
    s = state()
    config = capture.port_routes(80, s.sorted_services(), "shop", s)
    assert config.name == "80"
    vhosts = {vh.name: vh for vh in config.virtual_hosts}
    assert list(vhosts) == [
        "invoices.billing.svc.cluster.local:80",
        "web.shop.svc.cluster.local:80",
        "web-v2.shop.svc.cluster.local:80",
        "allow_any",
    ]
    assert set(vhosts["web.shop.svc.cluster.local:80"].domains) == {
        "web",
        "web:80",
        "web.shop",
        "web.shop:80",
        "web.shop.svc",
        "web.shop.svc:80",
        "web.shop.svc.cluster.local",
        "web.shop.svc.cluster.local:80",
        "10.96.0.10",
        "10.96.0.10:80",
    }
    # The short name means the caller's namespace, as Kubernetes DNS does.
    invoices = set(vhosts["invoices.billing.svc.cluster.local:80"].domains)
    assert "invoices" not in invoices and "invoices.billing:80" in invoices
    every = [d for vh in config.virtual_hosts for d in vh.domains]
    assert len(every) == len(set(every))
    # TCP ledger on 80 has no virtual host; it has its own chain.
    assert not any("ledger" in name for name in vhosts)


def test_port_routes_route_exactly_as_local_mode() -> None:
    s = state()
    web = s.services[WEB]
    (local,) = [vh for vh in routes.virtual_hosts(web, "shop", s) if vh.name.endswith(":80")]
    config = capture.port_routes(80, s.sorted_services(), "shop", s)
    captured = {vh.name: vh for vh in config.virtual_hosts}[local.name]
    assert list(captured.routes) == list(local.routes)
    # First the header route, then the 90/10 canary split.
    assert captured.routes[0].route.cluster == "outbound|80||web-v2.shop.svc.cluster.local"
    split = captured.routes[1].route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in split] == [
        ("outbound|80||web.shop.svc.cluster.local", 90),
        ("outbound|80||web-v2.shop.svc.cluster.local", 10),
    ]


def test_duplicate_cluster_ips_do_not_repeat_a_domain() -> None:
    a = mesh.Service("ns", "a", (mesh.Port(80, "http"),), cluster_ip="10.96.0.1")
    b = dataclasses.replace(a, name="b")
    s = mesh.MeshState(services={a.key: a, b.key: b})
    config = capture.port_routes(80, s.sorted_services(), "ns", s)
    every = [d for vh in config.virtual_hosts for d in vh.domains]
    assert len(every) == len(set(every))
    assert "10.96.0.1" in config.virtual_hosts[0].domains


# -- inbound ------------------------------------------------------------------


def _inbound_chains(listener: listener_pb2.Listener) -> dict[str, Any]:
    return {c.name: c for c in listener.filter_chains}


def test_inbound_serves_the_pods_ports_with_mtls_and_callers() -> None:
    s = state()
    sidecar = web_1()
    assert capture.inbound_ports(sidecar, s) == (
        (8080, mesh.Protocol.HTTP),
        (9000, mesh.Protocol.GRPC),
    )
    listener = capture.virtual_inbound(sidecar, s, capture.security(sidecar, s, TRUST_DOMAIN))
    assert listener.name == "virtualInbound"
    assert listener.address.socket_address.port_value == 15006
    chains = _inbound_chains(listener)
    assert set(chains) == {"inbound|8080|mtls", "inbound|9000|mtls"}
    for port, chain in ((8080, chains["inbound|8080|mtls"]), (9000, chains["inbound|9000|mtls"])):
        assert chain.filter_chain_match.destination_port.value == port
        assert chain.HasField("transport_socket")
        manager = hcm_pb2.HttpConnectionManager()
        assert chain.filters[0].typed_config.Unpack(manager)
        assert manager.forward_client_cert_details == manager.SANITIZE_SET
        rbac = rbac_pb2.RBAC()
        assert manager.http_filters[0].typed_config.Unpack(rbac)
        principals = rbac.rules.policies["shoal.io/allow"].principals
        assert {
            p.authenticated.principal_name.exact or p.authenticated.principal_name.prefix
            for p in principals
        } == {
            "spiffe://cluster.local/ns/shop/sa/frontend",
            "spiffe://cluster.local/ns/billing/sa/",
        }
        assert manager.route_config.virtual_hosts[0].routes[0].route.cluster == f"inbound|{port}||"
    # Strict everywhere: nothing needs to sniff for TLS.
    assert [f.name for f in listener.listener_filters] == [capture.ORIGINAL_DST]
    assert _cluster_of(listener.default_filter_chain) == "InboundPassthroughCluster"
    own = {c.name: c for c in capture.own_clusters(sidecar, s)}
    assert (
        own["inbound|8080||"].load_assignment
        == clusters.inbound_port(8080, mesh.Protocol.HTTP).load_assignment
    )
    assert own["inbound|9000||"].typed_extension_protocol_options  # HTTP/2 to the gRPC app


def test_permissive_ports_also_serve_plain_text_and_only_they_sniff() -> None:
    s = state()
    security = {8080: listeners.InboundSecurity(permissive=True)}
    listener = capture.virtual_inbound(web_1(), s, security)
    chains = _inbound_chains(listener)
    assert set(chains) == {"inbound|8080|mtls", "inbound|8080|plaintext", "inbound|9000|mtls"}
    assert chains["inbound|8080|mtls"].filter_chain_match.transport_protocol == "tls"
    assert not chains["inbound|8080|plaintext"].HasField("transport_socket")
    assert not chains["inbound|9000|mtls"].filter_chain_match.transport_protocol
    inspector = listener.listener_filters[1]
    assert inspector.name == listeners.TLS_INSPECTOR
    disabled = inspector.filter_disabled.not_match.destination_port_range
    assert (disabled.start, disabled.end) == (8080, 8081)
    assert listener.continue_on_listener_filters_timeout
    matches = [_match_key(c) for c in listener.filter_chains]
    assert len(matches) == len(set(matches))


def test_plain_text_inbound_without_a_ca() -> None:
    listener = capture.virtual_inbound(web_1(), state())
    chains = _inbound_chains(listener)
    assert set(chains) == {"inbound|8080|plaintext", "inbound|9000|plaintext"}
    assert not any(c.HasField("transport_socket") for c in chains.values())


def test_tcp_ports_are_proxied_and_tcp_wins_a_protocol_disagreement() -> None:
    s = state()
    db = proxy.CapturedSidecar("shop", "db-1", "uid-db-1", "db", "10.0.1.1")
    (chain,) = capture.virtual_inbound(db, s, listeners.InboundSecurity()).filter_chains
    assert _cluster_of(chain) == "inbound|5432||"
    # A second Service calls the same Pod port HTTP: bytes still pass as TCP.
    admin = mesh.Service("shop", "db-admin", (mesh.Port(5432, "http"),), cluster_ip="10.96.0.21")
    s = dataclasses.replace(
        s,
        services={**s.services, admin.key: admin},
        endpoints={
            **s.endpoints,
            admin.key: (mesh.Endpoint("10.0.1.1", 5432, "http", pod="db-1"),),
        },
    )
    assert capture.inbound_ports(db, s) == ((5432, mesh.Protocol.TCP),)


def test_only_this_pods_endpoints_count() -> None:
    s = state()
    other = mesh.Service("billing", "web", (mesh.Port(80, "http"),), cluster_ip="10.96.1.30")
    s = dataclasses.replace(
        s,
        services={**s.services, other.key: other},
        # Same Pod name, other namespace: another Pod.
        endpoints={
            **s.endpoints,
            other.key: (mesh.Endpoint("10.0.4.1", 7070, "http", pod="web-1"),),
        },
    )
    assert [p for p, _ in capture.inbound_ports(web_1(), s)] == [8080, 9000]
    lonely = proxy.CapturedSidecar("shop", "job-1", "uid-job-1")
    assert capture.inbound_ports(lonely, s) == ()
    listener = capture.virtual_inbound(lonely, s, listeners.InboundSecurity())
    assert len(listener.filter_chains) == 0
    assert _cluster_of(listener.default_filter_chain) == "InboundPassthroughCluster"


def test_a_port_of_several_services_is_as_strict_as_the_strictest() -> None:
    s = state()
    alias = mesh.Service(
        "shop",
        "web-alias",
        (mesh.Port(80, "http"),),
        cluster_ip="10.96.0.12",
        mtls="permissive",
        allow=frozenset({("ops", "*")}),
    )
    web = dataclasses.replace(s.services[WEB], mtls="permissive")
    s = dataclasses.replace(
        s,
        services={**s.services, WEB: web, alias.key: alias},
        endpoints={
            **s.endpoints,
            alias.key: (mesh.Endpoint("10.0.0.1", 8080, "http", pod="web-1"),),
        },
    )
    found = capture.security(web_1(), s, TRUST_DOMAIN)
    assert found[8080].permissive  # both Services say permissive
    assert found[8080].allow == (
        "spiffe://cluster.local/ns/billing/sa/*",
        "spiffe://cluster.local/ns/ops/sa/*",
        "spiffe://cluster.local/ns/shop/sa/frontend",
    )
    alias_strict = dataclasses.replace(alias, mtls="strict", allow=None)
    s = dataclasses.replace(s, services={**s.services, alias.key: alias_strict})
    found = capture.security(web_1(), s, TRUST_DOMAIN)
    assert not found[8080].permissive
    assert found[8080].allow is None  # web-alias admits everyone
    assert found[9000].permissive  # only web serves it


# -- who the proxy is -----------------------------------------------------------


def _node(**metadata: Any) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            node.INTERCEPTION_MODE: "REDIRECT",
            node.NAMESPACE: "shop",
            node.POD_NAME: "web-1",
            node.POD_UID: "uid-web-1",
            node.POD_IP: "10.0.0.1",
            node.SERVICE_ACCOUNT: "web",
            **metadata,
        }
    )
    return base_pb2.Node(id="sidecar~10.0.0.1~web-1.shop", metadata=meta)


def test_node_metadata_of_a_captured_sidecar() -> None:
    assert node.parse(_node()) == web_1()
    found = node.parse(_node(), "spiffe://cluster.local/ns/shop/sa/web")
    assert found == web_1()
    assert found.identity == mesh.Identity("shop", "web")
    assert node.parse(_node(INBOUND_PORT=16006)) == dataclasses.replace(web_1(), inbound_port=16006)
    assert node.key(found) != node.key(dataclasses.replace(found, pod_uid="uid-web-1-again"))


@pytest.mark.parametrize(
    "identity",
    ["spiffe://cluster.local/ns/shop/sa/db", "spiffe://cluster.local/ns/billing/sa/web"],
)
def test_a_claim_other_than_the_certificate_is_refused(identity: str) -> None:
    with pytest.raises(PermissionError):
        node.parse(_node(), identity)


@pytest.mark.parametrize(
    ("metadata", "says"),
    [
        ({node.INTERCEPTION_MODE: "TPROXY"}, "INTERCEPTION_MODE"),
        ({node.POD_IP: "web-1"}, "POD_IP"),
        ({node.POD_UID: ""}, "POD_UID"),
        ({node.OUTBOUND_PORT: 0}, "OUTBOUND_PORT"),
        # int() refuses "\u00b2" (str.isdigit() takes it) and takes Arabic-Indic digits.
        ({node.OUTBOUND_PORT: "\u00b2"}, "OUTBOUND_PORT"),
        ({node.OUTBOUND_PORT: "\u0661\u0665\u0660\u0660\u0661"}, "OUTBOUND_PORT"),
    ],
)
def test_bad_captured_metadata_names_the_key(metadata: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        node.parse(_node(**metadata))


def test_pod_problem() -> None:
    s = state()
    assert capture.pod_problem(web_1(), s) is None
    unknown = dataclasses.replace(web_1(), pod="web-9")
    assert "not known" in (capture.pod_problem(unknown, s) or "")
    recreated = dataclasses.replace(web_1(), pod_uid="uid-old")
    assert "uid" in (capture.pod_problem(recreated, s) or "")
    other_account = dataclasses.replace(web_1(), service_account="db")
    assert "service account" in (capture.pod_problem(other_account, s) or "")
    other_ip = dataclasses.replace(web_1(), ip="10.0.0.9")
    assert "IP" in (capture.pod_problem(other_ip, s) or "")


# -- bootstrap ----------------------------------------------------------------


def _parsed_node(config: dict[str, Any]) -> proxy.Proxy:
    message = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(config, message)
    return node.parse(message.node, "spiffe://cluster.local/ns/shop/sa/web")


def test_bootstrap_metadata_parses_back_to_the_sidecar() -> None:
    assert _parsed_node(_bootstrap()) == web_1()


def test_pod_overlay_completes_a_bootstrap_written_before_the_pod_ran() -> None:
    # What `envoy -c FILE --config-yaml OVERLAY` does: a proto merge.
    placeholder = proxy.CapturedSidecar("shop", "$(POD_NAME)", "$(POD_UID)", "web", "$(POD_IP)")
    config = bootstrap.captured_sidecar(
        placeholder, node_id="$(POD_NAME)", xds_host="127.0.0.1", xds_port=15010
    )
    merged = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(config, merged)
    overlay = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(
        bootstrap.pod_overlay(
            node_id="web-1.shop", pod="web-1", pod_uid="uid-web-1", ip="10.0.0.1"
        ),
        overlay,
    )
    merged.MergeFrom(overlay)
    assert merged.node.id == "web-1.shop"
    assert node.parse(merged.node, "spiffe://cluster.local/ns/shop/sa/web") == web_1()


# -- the controller serves captured sidecars -----------------------------------


async def test_the_controller_serves_a_captured_pod_and_refuses_a_stranger() -> None:
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.01, 0.1))
    ctl.update(state())
    ctl.rebuild()
    woken = asyncio.Event()
    good = snapshots.watch(cache.Client(_node()), woken)
    stranger = snapshots.watch(cache.Client(_node(POD_UID="uid-of-another-pod")), woken)
    try:
        snapshot = good.snapshot
        assert snapshot is not None
        listeners_ = {r.name for r in snapshot.resources(resources.LISTENER)}
        assert listeners_ == {names.VIRTUAL_OUTBOUND, names.VIRTUAL_INBOUND}
        clusters_ = {r.name for r in snapshot.resources(resources.CLUSTER)}
        assert names.PASSTHROUGH_CLUSTER in clusters_
        assert any("original-dst" in n for n in clusters_), "headless Services' clusters"
        assert controller.unresolved(snapshot) == []
        assert stranger.snapshot is None, "a proxy of another Pod gets nothing"
        assert any("uid-of-another-pod" in str(p) for p in ctl.problems), ctl.problems
    finally:
        snapshots.cancel(good)
        snapshots.cancel(stranger)
