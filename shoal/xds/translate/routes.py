"""Route configurations: which Host goes to which cluster."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import wrappers_pb2

from shoal.model import mesh, routing
from shoal.xds.translate import common, names

# Retries that are always safe: the request never reached the app. They hide
# the moment between an endpoint going away and every sidecar hearing of it.
SAFE_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
SAFE_RETRIES = 2


def default_port(service: mesh.Service) -> mesh.Port | None:
    """The port a bare `Host: web` means: `http`, else 80, else the first HTTP port."""
    http = [p for p in service.ports if p.protocol.is_http]
    for p in http:
        if p.name == "http":
            return p
    for p in http:
        if p.port == 80:
            return p
    return http[0] if http else None


def backend_port(backend: mesh.Service, port: mesh.Port) -> mesh.Port | None:
    """The port of a backend that stands in for `port` of the routed Service:
    the same number, else the same name, else its default port."""
    for p in backend.ports:
        if p.port == port.port:
            return p
    named = backend.port_named(port.name) if port.name else None
    return named or default_port(backend)


def _action(
    rule: routing.RouteRule, port: mesh.Port, services: Mapping[mesh.ServiceKey, mesh.Service]
) -> route_components_pb2.RouteAction:
    targets: list[tuple[str, int]] = []
    for b in rule.backends:
        backend = services[b.service]
        bport = backend_port(backend, port) or port
        targets.append((names.outbound_cluster(b.service, bport), b.weight))
    action = route_components_pb2.RouteAction(
        # No blanket timeout: streams and long polls are the app's business
        # until the user sets one.
        timeout=common.duration(0),
        retry_policy=route_components_pb2.RetryPolicy(
            retry_on=SAFE_RETRY_ON,
            num_retries=wrappers_pb2.UInt32Value(value=SAFE_RETRIES),
        ),
    )
    if len(targets) == 1:
        action.cluster = targets[0][0]
    else:
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=name, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for name, weight in targets
                    if weight > 0
                ]
            )
        )
    return action


def _header(match: routing.HeaderMatch) -> route_components_pb2.HeaderMatcher:
    out = route_components_pb2.HeaderMatcher(name=match.name)
    if match.kind is routing.MatchKind.EXACT:
        out.string_match.exact = match.value
    elif match.kind is routing.MatchKind.PREFIX:
        out.string_match.prefix = match.value
    elif match.kind is routing.MatchKind.REGEX:
        out.string_match.safe_regex.regex = match.value
    else:
        out.present_match = True
    return out


def service_routes(
    service: mesh.Service,
    port: mesh.Port,
    route: routing.ServiceRoute | None,
    services: Mapping[mesh.ServiceKey, mesh.Service],
) -> list[route_components_pb2.Route]:
    """Routes for calls to one port of a Service, first match wins."""
    rules = (
        route.rules if route is not None else (routing.RouteRule((routing.Backend(service.key),)),)
    )
    return [
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(
                prefix="/", headers=[_header(h) for h in rule.headers]
            ),
            route=_action(rule, port, services),
        )
        for rule in rules
    ]


def virtual_hosts(
    service: mesh.Service, caller_namespace: str, state: mesh.MeshState
) -> list[route_components_pb2.VirtualHost]:
    """One virtual host per HTTP port of a Service.

    The short name `web` is only offered to callers in the Service's own
    namespace, as Kubernetes DNS search paths do; across namespaces it would
    be ambiguous.
    """
    hosts = names.host_names(service.key)
    if caller_namespace != service.namespace:
        hosts = hosts[1:]
    bare = default_port(service)
    route = state.routes.get(service.key)
    out = []
    for port in service.ports:
        if not port.protocol.is_http:
            continue
        domains = [f"{h}:{port.port}" for h in hosts]
        if port == bare:
            domains = [*hosts, *domains]
        out.append(
            route_components_pb2.VirtualHost(
                name=f"{service.key.fqdn}:{port.port}",
                domains=domains,
                routes=service_routes(service, port, route, state.services),
            )
        )
    return out


def not_found_host() -> route_components_pb2.VirtualHost:
    """Say plainly that the mesh has no such Service, instead of a bare 404."""
    return route_components_pb2.VirtualHost(
        name="not-in-mesh",
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=route_components_pb2.DirectResponseAction(
                    status=404,
                    body=base_pb2.DataSource(
                        inline_string="shoal: no service in the mesh matches this Host\n"
                    ),
                ),
            )
        ],
    )


def outbound(
    vhosts: Iterable[route_components_pb2.VirtualHost],
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=names.OUTBOUND_ROUTE,
        virtual_hosts=[*vhosts, not_found_host()],
    )


def inbound(cluster: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=names.INBOUND_ROUTE,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="inbound",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(
                            cluster=cluster, timeout=common.duration(0)
                        ),
                    )
                ],
            )
        ],
    )
