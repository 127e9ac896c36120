"""ClusterLoadAssignments: the ready endpoints of each Service port."""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import wrappers_pb2

from shoal.model import mesh
from shoal.xds.translate import common


def load_assignment(
    cluster_name: str, endpoints: Iterable[mesh.Endpoint]
) -> endpoint_pb2.ClusterLoadAssignment:
    """Ready endpoints grouped by zone.

    A cluster with no ready endpoint still gets an (empty) assignment: Envoy
    keeps a new cluster warming until its first assignment arrives, which
    would hold up every listener for the initial-fetch timeout.
    """
    by_zone: dict[str, list[mesh.Endpoint]] = {}
    for e in endpoints:
        if e.ready:
            by_zone.setdefault(e.zone or "", []).append(e)
    localities = []
    for zone in sorted(by_zone):
        members = sorted(by_zone[zone], key=lambda e: (e.address, e.port))
        localities.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone=zone),
                # gRPC's xDS client drops a locality without a weight.
                load_balancing_weight=wrappers_pb2.UInt32Value(value=len(members)),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=common.socket_address(e.address, e.port)
                        ),
                        health_status=health_check_pb2.HEALTHY,
                    )
                    for e in members
                ],
            )
        )
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name, endpoints=localities)
