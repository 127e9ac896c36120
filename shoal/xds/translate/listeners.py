"""Listeners of a local-mode sidecar: inbound (to the app) and outbound (to the mesh)."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from shoal.model import mesh, proxy
from shoal.xds.translate import common, names

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
ROUTER = "envoy.filters.http.router"


def _http_manager(
    stat_prefix: str,
    *,
    rds: str | None = None,
    route_config: route_pb2.RouteConfiguration | None = None,
) -> listener_components_pb2.Filter:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        # The router must be last: Envoy (and gRPC's xDS client) require it.
        http_filters=[
            hcm_pb2.HttpFilter(name=ROUTER, typed_config=common.typed(router_pb2.Router()))
        ],
        # One spelling per path, so routes (and later authorization rules)
        # see what the app will see.
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
    )
    if rds is not None:
        manager.rds.CopyFrom(hcm_pb2.Rds(config_source=common.ads(), route_config_name=rds))
    elif route_config is not None:
        manager.route_config.CopyFrom(route_config)
    return listener_components_pb2.Filter(name=HCM, typed_config=common.typed(manager))


def _tcp_proxy(stat_prefix: str, cluster: str) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(
        name=TCP_PROXY,
        typed_config=common.typed(tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)),
    )


def inbound(
    sidecar: proxy.Sidecar, protocol: mesh.Protocol, route_config: route_pb2.RouteConfiguration
) -> listener_pb2.Listener:
    """Accept calls from the mesh and hand them to the app."""
    name = names.inbound_listener(sidecar.inbound_port)
    cluster = names.inbound_cluster(sidecar.app_port)
    chain_filter = (
        _http_manager("inbound", route_config=route_config)
        if protocol.is_http
        else _tcp_proxy("inbound", cluster)
    )
    return listener_pb2.Listener(
        name=name,
        address=common.socket_address(sidecar.inbound_address, sidecar.inbound_port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[chain_filter])],
        traffic_direction=base_pb2.INBOUND,
    )


def outbound(sidecar: proxy.Sidecar) -> listener_pb2.Listener:
    """The app's door to the mesh: HTTP on 127.0.0.1, routed by Host."""
    return listener_pb2.Listener(
        name=names.outbound_listener(sidecar.outbound_port),
        address=common.socket_address("127.0.0.1", sidecar.outbound_port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[_http_manager("outbound", rds=names.OUTBOUND_ROUTE)]
            )
        ],
        traffic_direction=base_pb2.OUTBOUND,
    )
