"""What every sidecar connection manager traces and logs.

Tracing is Envoy's Zipkin tracer, served over xDS in each HTTP connection
manager's `tracing.provider`, so sampling, tags and where spans go change
without a new bootstrap. It propagates B3 and W3C `traceparent` both
(`trace_context_option: USE_B3_WITH_W3C_PROPAGATION`: extract B3 first,
else `traceparent`; inject both), and every connection manager reports its
own span (`shared_span_context: false`), so a client span and the server
span it caused are parent and child, not one span told twice.

Spans go to the control plane's embedded collector, through the static
cluster `COLLECTOR_CLUSTER` that every bootstrap has (mutual TLS with the
sidecar's xDS client certificate, which only the bootstrap holds), or, with
`shoal serve --tracing URL`, to an external Zipkin-protocol endpoint
through `EXTERNAL_CLUSTER`, served over CDS like any other cluster.

Access logs are Envoy's stdout logger writing one JSON object per request to
the proxy's stdout (`kubectl logs POD -c shoal-proxy`, or the sidecar's log
file in local mode). Not the file logger on `/dev/stdout`: that reopens the
descriptor by path, which a proxy running as another user than the one who
opened it (Envoy as UID 1337 under a root agent, its stdout the agent's)
may not do, and Envoy then rejects the whole listener.

Request metrics (a counter and a duration histogram per source and
destination) are Envoy's stats access logger in every connection manager,
whatever the access-log switch.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, substitution_format_string_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.config.trace.v3 import http_tracer_pb2, zipkin_pb2
from envoy.extensions.access_loggers.stats.v3 import stats_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from shoal.model import mesh
from shoal.xds.translate import bootstrap, common

# The embedded collector's cluster: static, in every sidecar's bootstrap.
COLLECTOR_CLUSTER = bootstrap.COLLECTOR_CLUSTER
# An external endpoint's cluster (`shoal serve --tracing URL`), over CDS.
EXTERNAL_CLUSTER = "shoal-tracing"
SPANS_PATH = "/api/v2/spans"
ZIPKIN = "envoy.tracers.zipkin"
STDOUT_LOG = "envoy.access_loggers.stdout"
STATS_LOG = "envoy.access_loggers.stats"

# Span tags a mesh knows (Envoy adds its own standard ones: upstream_cluster,
# http.status_code, response_flags, guid:x-request-id, ...).
SOURCE_SERVICE = "shoal.source.service"
SOURCE_IDENTITY = "shoal.source.identity"
DESTINATION_SERVICE = "shoal.destination.service"
DESTINATION_IDENTITY = "shoal.destination.identity"
ROUTE = "shoal.route"


@dataclass(frozen=True)
class Hcm:
    """What one connection manager traces and logs, and who it speaks for.

    `service` and `identity` are the proxy's own workload ("" when it has
    none): the source of what goes out, the destination of what comes in."""

    direction: str  # "inbound" or "outbound"
    settings: mesh.Telemetry
    sampling: float
    access_log: bool
    service: str = ""
    identity: str = ""


def service_name(key: mesh.ServiceKey) -> str:
    """How a Service is named in tags and log lines (and in the node's
    cluster, which Envoy's Zipkin tracer takes as the span's service)."""
    return f"{key.name}.{key.namespace}"


def provider(settings: mesh.Telemetry) -> http_tracer_pb2.Tracing.Http:
    zipkin = zipkin_pb2.ZipkinConfig(
        collector_endpoint_version=zipkin_pb2.ZipkinConfig.HTTP_JSON,
        trace_id_128bit=True,
        shared_span_context=common.bool_value(False),
        trace_context_option=zipkin_pb2.ZipkinConfig.USE_B3_WITH_W3C_PROPAGATION,
    )
    external = settings.external
    if external is None:
        zipkin.collector_cluster = COLLECTOR_CLUSTER
        zipkin.collector_endpoint = SPANS_PATH
    else:
        zipkin.collector_cluster = EXTERNAL_CLUSTER
        zipkin.collector_endpoint = external.path
        zipkin.collector_hostname = external.host
    return http_tracer_pb2.Tracing.Http(name=ZIPKIN, typed_config=common.typed(zipkin))


def _literal(tag: str, value: str) -> custom_tag_pb2.CustomTag:
    return custom_tag_pb2.CustomTag(tag=tag, literal=custom_tag_pb2.CustomTag.Literal(value=value))


def _sampling(percent: float) -> percent_pb2.Percent:
    return percent_pb2.Percent(value=percent)


def tracing(hcm: Hcm) -> hcm_pb2.HttpConnectionManager.Tracing:
    """The connection manager's tracing: its sampling and the tags known now.

    Outbound, the proxy's workload is the source (the destination Service is
    tagged by the route, `route_tracing`); inbound, it is the destination,
    and the caller is the identity in its client certificate."""
    own = "source" if hcm.direction == "outbound" else "destination"
    tags = []
    if hcm.service:
        tags.append(_literal(f"shoal.{own}.service", hcm.service))
    if hcm.identity:
        tags.append(_literal(f"shoal.{own}.identity", hcm.identity))
    peer = "%UPSTREAM_PEER_URI_SAN%" if hcm.direction == "outbound" else "%DOWNSTREAM_PEER_URI_SAN%"
    other = "destination" if hcm.direction == "outbound" else "source"
    tags.append(custom_tag_pb2.CustomTag(tag=f"shoal.{other}.identity", value=peer))
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=_sampling(hcm.sampling),
        # Envoy's own default, said here: everything that reaches a sidecar
        # is counted (client_sampling only matters for x-client-trace-id).
        overall_sampling=_sampling(100.0),
        custom_tags=tags,
        provider=provider(hcm.settings),
    )


def route_tracing(
    service: mesh.Service, route_name: str, mesh_sampling: float
) -> route_components_pb2.Tracing:
    """On every route to a Service: the destination's tags and the sampling
    for requests that start a trace on the way to it, its own
    (`shoal.io/trace-sampling`) or the mesh's. Always set: a route's tracing
    without a sampling samples 100 %, whatever the connection manager says."""
    out = route_components_pb2.Tracing(
        custom_tags=[_literal(DESTINATION_SERVICE, service_name(service.key))]
    )
    if route_name:
        out.custom_tags.append(_literal(ROUTE, route_name))
    sampling = service.trace_sampling if service.trace_sampling is not None else mesh_sampling
    out.random_sampling.CopyFrom(_fraction(sampling))
    return out


def _fraction(percent: float) -> percent_pb2.FractionalPercent:
    # Per ten thousand, not per million: Envoy draws a request's sampling
    # number as its x-request-id modulo 10,000, so over a million every
    # request below 1 % of a million (10,000) is sampled: 1 % was 100 %.
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 100), denominator=percent_pb2.FractionalPercent.TEN_THOUSAND
    )


def _log_format(hcm: Hcm) -> dict[str, str]:
    own = "source" if hcm.direction == "outbound" else "destination"
    fields = {
        "start_time": "%START_TIME%",
        "direction": hcm.direction,
        "trace_id": "%TRACE_ID%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "authority": "%REQ(:AUTHORITY)%",
        "protocol": "%PROTOCOL%",
        "route_name": "%ROUTE_NAME%",
        f"{own}_service": hcm.service or "-",
        f"{own}_identity": hcm.identity or "-",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%",
        "upstream_service_time_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "user_agent": "%REQ(USER-AGENT)%",
    }
    if hcm.direction == "outbound":
        fields["destination_identity"] = "%UPSTREAM_PEER_URI_SAN%"
    else:
        fields["source_identity"] = "%DOWNSTREAM_PEER_URI_SAN%"
    return dict(sorted(fields.items()))


def access_logs(hcm: Hcm) -> list[accesslog_pb2.AccessLog]:
    if not hcm.access_log:
        return []
    json_format = struct_pb2.Struct()
    json_format.update(_log_format(hcm))
    # Writes to the descriptor Envoy inherited: no path opened (see above).
    logger = stream_pb2.StdoutAccessLog(
        log_format=substitution_format_string_pb2.SubstitutionFormatString(json_format=json_format),
    )
    return [accesslog_pb2.AccessLog(name=STDOUT_LOG, typed_config=common.typed(logger))]


# Request metrics: Envoy's stats access logger (no Wasm) counts each request
# and its duration, tagged by who called whom, in every sidecar connection
# manager whatever the access-log switch. Envoy's Prometheus output renders
# them as envoy_shoal_requests_total and envoy_shoal_request_duration_
# milliseconds_{bucket,sum,count} (README, "Request metrics").
STAT_PREFIX = "shoal"
REQUESTS = "requests_total"
DURATION = "request_duration_milliseconds"
UNKNOWN = "unknown"


# Where an outbound cluster says which Service it reaches, for the request
# metrics' destination_service: Envoy's formatter reads a cluster's metadata
# but cannot take a cluster's name apart.
METADATA = "shoal"
DESTINATION_KEY = "service"


def name_destination(cluster: cluster_pb2.Cluster, name: str) -> None:
    """Mark `cluster` as reaching `name` (a Service, `reviews.shop`)."""
    cluster.metadata.filter_metadata[METADATA].update({DESTINATION_KEY: name})


def _metric_tags(hcm: Hcm) -> list[stats_pb2.Config.Tag]:
    """Every tag's value is bounded by the mesh, never by what a caller
    sends: literals, Envoy's own clusters, certificate identities the mesh
    CA signed, response codes and flags. (A header would let any caller
    mint series.)"""
    own_service = hcm.service or UNKNOWN
    own_identity = hcm.identity or UNKNOWN
    if hcm.direction == "outbound":
        values = {
            "reporter": "source",
            "source_workload": own_service,
            "source_identity": own_identity,
            # The Service the route's cluster belongs to, named as the
            # callee's own sidecar names it: one series per pair from both ends.
            "destination_service": f"%CLUSTER_METADATA({METADATA}:{DESTINATION_KEY})%",
            "destination_identity": "%UPSTREAM_PEER_URI_SAN%",
        }
    else:
        values = {
            "reporter": "destination",
            # Only the caller's certificate is known here, not its Service.
            "source_workload": UNKNOWN,
            "source_identity": "%DOWNSTREAM_PEER_URI_SAN%",
            "destination_service": own_service,
            "destination_identity": own_identity,
        }
    values["response_code"] = "%RESPONSE_CODE%"
    values["response_flags"] = "%RESPONSE_FLAGS%"
    return [stats_pb2.Config.Tag(name=k, value_format=v) for k, v in values.items()]


def request_metrics(hcm: Hcm) -> accesslog_pb2.AccessLog:
    """A counter and a duration histogram per request, tagged by source,
    destination, response code and flags."""
    tags = _metric_tags(hcm)
    config = stats_pb2.Config(
        # Envoy 1.40 deprecates stat_prefix for stats_scope, which the
        # protobuf bindings shoal builds with do not have yet; Envoy needs
        # one of the two, and accepts this with a warning at start.
        stat_prefix=STAT_PREFIX,
        counters=[
            stats_pb2.Config.Counter(
                stat=stats_pb2.Config.Stat(name=REQUESTS, tags=tags),
                value_fixed=wrappers_pb2.UInt64Value(value=1),
            )
        ],
        histograms=[
            stats_pb2.Config.Histogram(
                stat=stats_pb2.Config.Stat(name=DURATION, tags=tags),
                unit=stats_pb2.Config.Histogram.Milliseconds,
                value_format="%DURATION%",
            )
        ],
    )
    return accesslog_pb2.AccessLog(name=STATS_LOG, typed_config=common.typed(config))


def apply(manager: hcm_pb2.HttpConnectionManager, hcm: Hcm) -> None:
    """Tracing and access logs on one connection manager."""
    # An x-request-id for every request (Envoy also keeps the sampling
    # decision in it), so log lines and spans of one request can be joined.
    manager.generate_request_id.CopyFrom(common.bool_value(True))
    manager.tracing.CopyFrom(tracing(hcm))
    manager.access_log.append(request_metrics(hcm))
    manager.access_log.extend(access_logs(hcm))


# -- which settings apply ------------------------------------------------------


def access_log_of(
    services: tuple[mesh.Service, ...], namespace: str, state: mesh.MeshState
) -> bool:
    """The access-log switch of a workload serving `services`: a Service's
    annotation, else its Namespace's, else the mesh's. A workload behind
    several Services logs if any of them wants it."""
    ns = state.namespaces.get(namespace)
    default = (
        ns.access_log
        if ns is not None and ns.access_log is not None
        else state.telemetry.access_log
    )
    if not services:
        return default
    return any(default if s.access_log is None else s.access_log for s in services)


def sampling_of(services: tuple[mesh.Service, ...], state: mesh.MeshState) -> float:
    """Inbound sampling of a workload serving `services`: the highest any of
    them asks for, else the mesh's."""
    asked = [s.trace_sampling for s in services if s.trace_sampling is not None]
    return max(asked) if asked else state.telemetry.trace_sampling


# -- where spans go ------------------------------------------------------------


def external_clusters(settings: mesh.Telemetry) -> list[cluster_pb2.Cluster]:
    """The cluster of an external Zipkin-protocol endpoint, if one is set."""
    external = settings.external
    if external is None:
        return []
    try:
        ipaddress.ip_address(external.host)
        kind = cluster_pb2.Cluster.STATIC
    except ValueError:
        kind = cluster_pb2.Cluster.STRICT_DNS
    cluster = cluster_pb2.Cluster(
        name=EXTERNAL_CLUSTER,
        type=kind,
        connect_timeout=common.duration(1.0),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=EXTERNAL_CLUSTER,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=common.socket_address(external.host, external.port)
                            )
                        )
                    ]
                )
            ],
        ),
    )
    if external.tls:
        context = tls_pb2.UpstreamTlsContext(
            sni=external.host,
            common_tls_context=common_pb2.CommonTlsContext(
                validation_context=common_pb2.CertificateValidationContext(
                    # The machine's public roots: an external collector is
                    # not the mesh's, and its certificate is not ours.
                    trusted_ca=base_pb2.DataSource(filename=SYSTEM_ROOTS)
                )
            ),
        )
        cluster.transport_socket.name = "envoy.transport_sockets.tls"
        cluster.transport_socket.typed_config.Pack(context)
    return [cluster]


SYSTEM_ROOTS = "/etc/ssl/certs/ca-certificates.crt"
