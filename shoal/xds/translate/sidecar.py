"""The per-proxy part of a local-mode sidecar's configuration.

Everything shared by all proxies of a scope (clusters, endpoints, the
outbound routes of a namespace) is translated once per Service by the
controller; this module adds what only this sidecar has.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from shoal import spiffe
from shoal.model import mesh, proxy
from shoal.xds.translate import clusters, listeners, names, routes, telemetry


def inbound_protocol(sidecar: proxy.Sidecar, state: mesh.MeshState) -> mesh.Protocol:
    """The sidecar's own Service decides whether inbound speaks HTTP or TCP."""
    service = state.services.get(sidecar.service_key)
    if service is None:
        return mesh.Protocol.HTTP
    port = routes.default_port(service) or service.ports[0]
    return port.protocol


def own_clusters(sidecar: proxy.Sidecar, state: mesh.MeshState) -> list[cluster_pb2.Cluster]:
    return [
        clusters.inbound(sidecar, inbound_protocol(sidecar, state)),
        *telemetry.external_clusters(state.telemetry),
    ]


def observe(
    sidecar: proxy.Sidecar, state: mesh.MeshState, trust_domain: str | None
) -> tuple[telemetry.Hcm, telemetry.Hcm]:
    """What its inbound and outbound connection managers trace and log: its
    Service's switches, else its namespace's, else the mesh's."""
    service = state.services.get(sidecar.service_key)
    own = (service,) if service is not None else ()
    identity = sidecar.identity
    spiffe_id = (
        spiffe.workload_id(trust_domain, identity.namespace, identity.service_account)
        if trust_domain is not None
        else ""
    )
    log = telemetry.access_log_of(own, sidecar.namespace, state)
    name = telemetry.service_name(sidecar.service_key)
    return (
        telemetry.Hcm(
            "inbound",
            state.telemetry,
            telemetry.sampling_of(own, state),
            log,
            name,
            spiffe_id,
        ),
        telemetry.Hcm(
            "outbound", state.telemetry, state.telemetry.trace_sampling, log, name, spiffe_id
        ),
    )


def security(
    sidecar: proxy.Sidecar, state: mesh.MeshState, trust_domain: str
) -> listeners.InboundSecurity:
    """mTLS mode (the Service's, else its namespace's, else strict) and the
    callers its Service admits."""
    service = state.services.get(sidecar.service_key)
    mode = service.mtls if service is not None else None
    if mode is None:
        namespace = state.namespaces.get(sidecar.namespace)
        mode = (namespace.mtls if namespace is not None else None) or "strict"
    allow = None
    if service is not None and service.allow is not None:
        allow = tuple(
            sorted(spiffe.workload_id(trust_domain, ns, account) for ns, account in service.allow)
        )
    return listeners.InboundSecurity(permissive=mode == "permissive", allow=allow)


def own_listeners(
    sidecar: proxy.Sidecar,
    state: mesh.MeshState,
    inbound_security: listeners.InboundSecurity | None = None,
    observed: tuple[telemetry.Hcm, telemetry.Hcm] | None = None,
) -> list[listener_pb2.Listener]:
    protocol = inbound_protocol(sidecar, state)
    inbound_routes = routes.inbound(names.inbound_cluster(sidecar.app_port))
    inbound_observe, outbound_observe = observed if observed is not None else (None, None)
    return [
        listeners.inbound(sidecar, protocol, inbound_routes, inbound_security, inbound_observe),
        listeners.outbound(sidecar, outbound_observe),
    ]


def outbound_routes(
    namespace: str, visible: Iterable[mesh.Service], state: mesh.MeshState
) -> route_pb2.RouteConfiguration:
    """The outbound route table as seen from `namespace`, for the Services
    in scope."""
    vhosts = [vh for svc in visible for vh in routes.virtual_hosts(svc, namespace, state)]
    return routes.outbound(vhosts)
