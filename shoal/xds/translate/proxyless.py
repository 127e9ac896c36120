"""Configuration for proxyless gRPC clients (grpcio's built-in xDS support).

A client dialing `xds:///reviews` asks LDS for the listener `reviews`: each
Service port gets an API listener under every name a caller may dial, and a
route configuration of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from shoal.model import mesh
from shoal.xds.translate import common, names, routes


def route_name(key: mesh.ServiceKey, port: mesh.Port) -> str:
    return f"{key.fqdn}:{port.port}"


def _dial_names(service: mesh.Service, port: mesh.Port, caller_namespace: str) -> list[str]:
    hosts = list(names.host_names(service.key))
    if caller_namespace != service.namespace:
        hosts = hosts[1:]
    out = [f"{h}:{port.port}" for h in hosts]
    if port == routes.default_port(service):
        out += hosts
    return out


def listeners(
    visible: Iterable[mesh.Service], caller_namespace: str
) -> list[listener_pb2.Listener]:
    out = []
    for service in visible:
        for port in service.ports:
            if not port.protocol.is_http:
                continue
            manager = hcm_pb2.HttpConnectionManager(
                rds=hcm_pb2.Rds(
                    config_source=common.ads(), route_config_name=route_name(service.key, port)
                ),
                # gRPC requires the router, and requires it last.
                http_filters=[
                    hcm_pb2.HttpFilter(
                        name="envoy.filters.http.router",
                        typed_config=common.typed(router_pb2.Router()),
                    )
                ],
            )
            for dial in _dial_names(service, port, caller_namespace):
                out.append(
                    listener_pb2.Listener(
                        name=dial,
                        api_listener=api_listener_pb2.ApiListener(
                            api_listener=common.typed(manager)
                        ),
                    )
                )
    return out


def route_configs(
    visible: Iterable[mesh.Service], state: mesh.MeshState
) -> list[route_pb2.RouteConfiguration]:
    out = []
    for service in visible:
        route = state.routes.get(service.key)
        for port in service.ports:
            if not port.protocol.is_http:
                continue
            name = route_name(service.key, port)
            out.append(
                route_pb2.RouteConfiguration(
                    name=name,
                    virtual_hosts=[
                        route_components_pb2.VirtualHost(
                            name=name,
                            domains=["*"],
                            routes=routes.service_routes(
                                service,
                                port,
                                route,
                                state.services,
                                state.telemetry.trace_sampling,
                            ),
                        )
                    ],
                )
            )
    return out
