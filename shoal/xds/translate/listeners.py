"""Listeners of a local-mode sidecar: inbound (to the app) and outbound (to the mesh)."""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from shoal.model import mesh, proxy
from shoal.xds.translate import common, names, telemetry, tls

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
ROUTER = "envoy.filters.http.router"
RBAC = "envoy.filters.http.rbac"
NETWORK_RBAC = "envoy.filters.network.rbac"
FAULT = "envoy.filters.http.fault"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"


def _http_manager(
    stat_prefix: str,
    *,
    rds: str | None = None,
    route_config: route_pb2.RouteConfiguration | None = None,
    before_router: list[hcm_pb2.HttpFilter] | None = None,
    tell_caller: bool = False,
    observe: telemetry.Hcm | None = None,
) -> listener_components_pb2.Filter:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        # The router must be last: Envoy (and gRPC's xDS client) require it.
        http_filters=[
            *(before_router or []),
            hcm_pb2.HttpFilter(name=ROUTER, typed_config=common.typed(router_pb2.Router())),
        ],
        # One spelling per path, so routes (and later authorization rules)
        # see what the app will see.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
    )
    if tell_caller:
        # The app learns who called (x-forwarded-client-cert: ...;URI=spiffe://...),
        # and a caller cannot forge it: whatever it sent is replaced.
        manager.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
        manager.set_current_client_cert_details.uri = True
    if rds is not None:
        manager.rds.CopyFrom(hcm_pb2.Rds(config_source=common.ads(), route_config_name=rds))
    elif route_config is not None:
        manager.route_config.CopyFrom(route_config)
    if observe is not None:
        telemetry.apply(manager, observe)
    return listener_components_pb2.Filter(name=HCM, typed_config=common.typed(manager))


def _tcp_proxy(stat_prefix: str, cluster: str) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(
        name=TCP_PROXY,
        typed_config=common.typed(tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)),
    )


@dataclass(frozen=True)
class InboundSecurity:
    """Mutual TLS on the inbound listener, and who may call."""

    permissive: bool = False  # also accept plain text, for migration
    # SPIFFE IDs allowed to call; a trailing "*" matches a prefix. None: all.
    allow: tuple[str, ...] | None = None


def _rules(allow: tuple[str, ...]) -> rbac_pb2.RBAC:
    """Admit callers whose certificate's URI SAN is one of `allow` (a
    trailing "*" matches a prefix); with none listed, admit nobody: an ALLOW
    policy without policies denies every request and connection."""
    principals = []
    for pattern in allow:
        matcher = (
            string_pb2.StringMatcher(prefix=pattern[:-1])
            if pattern.endswith("*")
            else string_pb2.StringMatcher(exact=pattern)
        )
        principals.append(
            rbac_pb2.Principal(
                authenticated=rbac_pb2.Principal.Authenticated(principal_name=matcher)
            )
        )
    if not principals:
        return rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    return rbac_pb2.RBAC(
        action=rbac_pb2.RBAC.ALLOW,
        policies={
            "shoal.io/allow": rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)], principals=principals
            )
        },
    )


def _rbac(allow: tuple[str, ...]) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(
        name=RBAC, typed_config=common.typed(rbac_filter_pb2.RBAC(rules=_rules(allow)))
    )


def network_rbac(allow: tuple[str, ...], stat_prefix: str) -> listener_components_pb2.Filter:
    """The same callers for TCP: checked once per connection, before a byte
    reaches the app."""
    return listener_components_pb2.Filter(
        name=NETWORK_RBAC,
        typed_config=common.typed(
            network_rbac_pb2.RBAC(stat_prefix=stat_prefix, rules=_rules(allow))
        ),
    )


def inbound(
    sidecar: proxy.Sidecar,
    protocol: mesh.Protocol,
    route_config: route_pb2.RouteConfiguration,
    security: InboundSecurity | None = None,
    observe: telemetry.Hcm | None = None,
) -> listener_pb2.Listener:
    """Accept calls from the mesh and hand them to the app.

    With `security`, callers present a certificate of the mesh CA (TLS 1.3);
    in permissive mode, plain-text callers are served too, on a second
    filter chain chosen by sniffing the first bytes for a TLS handshake."""
    name = names.inbound_listener(sidecar.inbound_port)
    cluster = names.inbound_cluster(sidecar.app_port)
    allow = security.allow if security is not None else None
    chain_filters: list[listener_components_pb2.Filter]
    if protocol.is_http:
        chain_filters = [
            _http_manager(
                "inbound",
                route_config=route_config,
                before_router=[_rbac(allow)] if allow is not None else [],
                tell_caller=security is not None,
                observe=observe,
            )
        ]
    else:
        chain_filters = [
            *([network_rbac(allow, "inbound")] if allow is not None else []),
            _tcp_proxy("inbound", cluster),
        ]
    listener = listener_pb2.Listener(
        name=name,
        address=common.socket_address(sidecar.inbound_address, sidecar.inbound_port),
        traffic_direction=base_pb2.INBOUND,
    )
    if security is None:
        listener.filter_chains.append(listener_components_pb2.FilterChain(filters=chain_filters))
        return listener
    mtls = listener_components_pb2.FilterChain(
        name="inbound-mtls", filters=chain_filters, transport_socket=tls.downstream()
    )
    if not security.permissive:
        listener.filter_chains.append(mtls)
        return listener
    mtls.filter_chain_match.transport_protocol = "tls"
    listener.listener_filters.append(
        listener_components_pb2.ListenerFilter(
            name=TLS_INSPECTOR, typed_config=common.typed(tls_inspector_pb2.TlsInspector())
        )
    )
    listener.filter_chains.append(mtls)
    listener.default_filter_chain.CopyFrom(
        listener_components_pb2.FilterChain(name="inbound-plaintext", filters=chain_filters)
    )
    return listener


def outbound(sidecar: proxy.Sidecar, observe: telemetry.Hcm | None = None) -> listener_pb2.Listener:
    """The app's door to the mesh: HTTP on 127.0.0.1, routed by Host."""
    return listener_pb2.Listener(
        name=names.outbound_listener(sidecar.outbound_port),
        address=common.socket_address("127.0.0.1", sidecar.outbound_port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    _http_manager(
                        "outbound",
                        rds=names.OUTBOUND_ROUTE,
                        # Inert until a route carries a fault (shoal.io/fault).
                        before_router=[
                            hcm_pb2.HttpFilter(
                                name=FAULT, typed_config=common.typed(fault_pb2.HTTPFault())
                            )
                        ],
                        observe=observe,
                    )
                ]
            )
        ],
        traffic_direction=base_pb2.OUTBOUND,
    )
