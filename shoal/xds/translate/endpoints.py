"""ClusterLoadAssignments: the ready endpoints of each Service port."""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from shoal.model import mesh


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
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name)
    # Filled in place: building each endpoint's messages and copying them
    # into their parents costs four times as much, at a hundred thousand
    # endpoints.
    for zone in sorted(by_zone):
        members = sorted(by_zone[zone], key=lambda e: (e.address, e.port))
        locality = cla.endpoints.add()
        locality.locality.SetInParent()
        locality.locality.zone = zone
        # gRPC's xDS client drops a locality without a weight.
        locality.load_balancing_weight.value = len(members)
        for e in members:
            lb = locality.lb_endpoints.add()
            address = lb.endpoint.address.socket_address
            address.address = e.address
            address.port_value = e.port
            lb.health_status = health_check_pb2.HEALTHY
    return cla
