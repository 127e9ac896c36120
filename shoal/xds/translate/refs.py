"""What an Envoy resource names: the edges that must resolve before it is sent."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf.message import Message

from shoal.xds import resources
from shoal.xds.translate import names

Ref = tuple[str, str]


def _route_refs(config: route_pb2.RouteConfiguration) -> Iterator[Ref]:
    return virtual_host_refs(config.virtual_hosts)


def virtual_host_refs(vhosts: Iterable[route_components_pb2.VirtualHost]) -> Iterator[Ref]:
    """What the routes of some virtual hosts name (a route table's are
    theirs, one Service's hosts at a time)."""
    for vhost in vhosts:
        for route in vhost.routes:
            if not route.HasField("route"):
                continue
            action = route.route
            # The cluster of a backend that cannot be reached is missing on
            # purpose: its share is answered 500.
            if action.cluster and action.cluster != names.INVALID_BACKEND_CLUSTER:
                yield (resources.CLUSTER, action.cluster)
            for weighted in action.weighted_clusters.clusters:
                if weighted.name != names.INVALID_BACKEND_CLUSTER:
                    yield (resources.CLUSTER, weighted.name)
            for mirror in action.request_mirror_policies:
                yield (resources.CLUSTER, mirror.cluster)


def _secret_refs(socket: object) -> Iterator[Ref]:
    """SDS secrets a TLS transport socket names."""
    typed = getattr(socket, "typed_config", None)
    if typed is None:
        return
    for kind in (tls_pb2.UpstreamTlsContext, tls_pb2.DownstreamTlsContext):
        if typed.Is(kind.DESCRIPTOR):
            context = kind()
            typed.Unpack(context)
            common = context.common_tls_context
            for sds in common.tls_certificate_sds_secret_configs:
                yield (resources.SECRET, sds.name)
            if common.HasField("validation_context_sds_secret_config"):
                yield (resources.SECRET, common.validation_context_sds_secret_config.name)
            combined = common.combined_validation_context
            if combined.HasField("validation_context_sds_secret_config"):
                yield (resources.SECRET, combined.validation_context_sds_secret_config.name)


def _listener_refs(listener: listener_pb2.Listener) -> Iterator[Ref]:
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        if chain.HasField("transport_socket"):
            yield from _secret_refs(chain.transport_socket)
        for f in chain.filters:
            if f.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                manager = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(manager)
                if manager.HasField("rds"):
                    yield (resources.ROUTE, manager.rds.route_config_name)
                elif manager.HasField("route_config"):
                    yield from _route_refs(manager.route_config)
            elif f.typed_config.Is(tcp_proxy_pb2.TcpProxy.DESCRIPTOR):
                proxy = tcp_proxy_pb2.TcpProxy()
                f.typed_config.Unpack(proxy)
                if proxy.cluster:
                    yield (resources.CLUSTER, proxy.cluster)
    if listener.HasField("api_listener"):
        manager = hcm_pb2.HttpConnectionManager()
        if listener.api_listener.api_listener.Unpack(manager) and manager.HasField("rds"):
            yield (resources.ROUTE, manager.rds.route_config_name)


def _cluster_refs(cluster: cluster_pb2.Cluster) -> Iterator[Ref]:
    if cluster.HasField("transport_socket"):
        yield from _secret_refs(cluster.transport_socket)
    if cluster.type == cluster_pb2.Cluster.EDS:
        yield (resources.ENDPOINT, cluster.eds_cluster_config.service_name or cluster.name)


def of(message: Message) -> frozenset[Ref]:
    if isinstance(message, listener_pb2.Listener):
        return frozenset(_listener_refs(message))
    if isinstance(message, route_pb2.RouteConfiguration):
        return frozenset(_route_refs(message))
    if isinstance(message, cluster_pb2.Cluster):
        return frozenset(_cluster_refs(message))
    return frozenset()
