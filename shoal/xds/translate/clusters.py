"""Clusters: one EDS cluster per Service port, one static cluster per app port,
and ORIGINAL_DST ones where captured traffic goes on to the address it was sent to."""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import wrappers_pb2

from shoal.model import capture, mesh, proxy
from shoal.xds.translate import common, names, telemetry, tls

CONNECT_TIMEOUT_S = 5.0
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# Envoy's defaults (1024 connections/requests per cluster) turn a busy service
# into 503 overflows that look like app failures; the mesh should not be the
# tightest limit. Users lower them per Service when they mean it.
_UNLIMITED = 2**32 - 1


def _thresholds(limits: mesh.ConnectionLimits | None = None) -> circuit_breaker_pb2.CircuitBreakers:
    big = wrappers_pb2.UInt32Value(value=_UNLIMITED)

    def limit(value: int | None) -> wrappers_pb2.UInt32Value:
        return big if value is None else wrappers_pb2.UInt32Value(value=value)

    limits = limits or mesh.ConnectionLimits()
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                max_connections=limit(limits.max_connections),
                max_pending_requests=limit(limits.max_pending_requests),
                max_requests=limit(limits.max_requests),
                # Envoy's default allows 3 retries in flight per cluster: under
                # load, shoal.io/retries would silently stop retrying.
                max_retries=big,
            )
        ]
    )


def _protocol_options(protocol: mesh.Protocol) -> dict[str, object]:
    if protocol not in (mesh.Protocol.HTTP2, mesh.Protocol.GRPC):
        return {}
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    return {HTTP_PROTOCOL_OPTIONS: common.typed(options)}


def outbound(
    service: mesh.Service,
    port: mesh.Port,
    peers: frozenset[str] | None = None,
    subset: mesh.FrozenMap | None = None,
) -> cluster_pb2.Cluster:
    """An EDS cluster for one port of a Service; endpoints come from EDS.

    With `peers` (the SPIFFE IDs behind the Service), calls are mutual TLS
    and the server must prove one of those identities."""
    name = names.outbound_cluster(service.key, port, subset)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=common.ads(), service_name=name
        ),
        connect_timeout=common.duration(CONNECT_TIMEOUT_S),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        circuit_breakers=_thresholds(service.limits),
        typed_extension_protocol_options=_protocol_options(port.protocol),
    )
    telemetry.name_destination(cluster, telemetry.service_name(service.key))
    if peers is not None:
        cluster.transport_socket.CopyFrom(tls.upstream(service.key.fqdn, peers))
    if service.outlier is not None:
        cluster.outlier_detection.CopyFrom(_outlier(service.outlier))
    return cluster


def _outlier(policy: mesh.OutlierPolicy) -> outlier_detection_pb2.OutlierDetection:
    return outlier_detection_pb2.OutlierDetection(
        consecutive_5xx=wrappers_pb2.UInt32Value(value=policy.consecutive_5xx),
        # Checked every second: an endpoint failing now is out within one.
        interval=common.duration(1.0),
        base_ejection_time=common.duration(policy.ejection_s),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=policy.max_ejection_percent),
        # Only consecutive 5xx decides; the success-rate heuristics stay off.
        enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
    )


def outbound_for_service(
    service: mesh.Service,
    peers: frozenset[str] | None = None,
    subsets: tuple[mesh.FrozenMap, ...] = (),
) -> list[cluster_pb2.Cluster]:
    """A cluster per port, and per port and label subset routes ask for."""
    return [
        outbound(service, port, peers, subset)
        for port in service.ports
        for subset in (None, *subsets)
    ]


def inbound(sidecar: proxy.Sidecar, protocol: mesh.Protocol) -> cluster_pb2.Cluster:
    """The app next to the sidecar, at a fixed local address."""
    return inbound_port(sidecar.app_port, protocol)


def inbound_port(app_port: int, protocol: mesh.Protocol) -> cluster_pb2.Cluster:
    """One port of the app next to the sidecar, on 127.0.0.1."""
    name = names.inbound_cluster(app_port)
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=common.socket_address("127.0.0.1", app_port)
        )
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=common.duration(CONNECT_TIMEOUT_S),
        circuit_breakers=_thresholds(),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
        typed_extension_protocol_options=_protocol_options(protocol),
    )


def _original_dst_shape(name: str, limits: mesh.ConnectionLimits | None) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        # The only policy Envoy accepts here: the connection names its host.
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=common.duration(CONNECT_TIMEOUT_S),
        circuit_breakers=_thresholds(limits),
    )


def passthrough(name: str) -> cluster_pb2.Cluster:
    """On to the address the app dialled, in plain text: traffic the mesh
    does not know keeps working as if there were no sidecar."""
    cluster = _original_dst_shape(name, None)
    telemetry.name_destination(cluster, name)
    return cluster


def inbound_passthrough(name: str) -> cluster_pb2.Cluster:
    """On to the app at the address the caller dialled (the Pod's IP), from
    capture.INBOUND_PASSTHROUGH_SOURCE: the one source iptables does not
    send back to the sidecar's inbound port."""
    cluster = _original_dst_shape(name, None)
    source = cluster.upstream_bind_config.source_address
    source.address = capture.INBOUND_PASSTHROUGH_SOURCE
    source.port_value = 0
    return cluster


def original_dst(
    service: mesh.Service, port: mesh.Port, peers: frozenset[str] | None = None
) -> cluster_pb2.Cluster:
    """One port of a headless Service: callers pick the Pod (by DNS), the
    sidecar keeps their choice and adds mutual TLS like any outbound cluster."""
    cluster = _original_dst_shape(names.original_dst_cluster(service.key, port), service.limits)
    telemetry.name_destination(cluster, telemetry.service_name(service.key))
    if peers is not None:
        cluster.transport_socket.CopyFrom(tls.upstream(service.key.fqdn, peers))
    return cluster
