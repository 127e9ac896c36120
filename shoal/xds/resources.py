"""Envoy type URLs and the order pushes follow."""

from __future__ import annotations

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Make before break: a secret before what uses it, a cluster before its
# endpoints, both before a listener or route can point at them.
PUSH_ORDER = (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)

# Types that only complete what is warming (a cluster's endpoints, a
# certificate). Envoy may hold its CDS ACK until new clusters have warmed,
# so these must flow while a CDS response is still unacknowledged.
WARMING = frozenset({SECRET, ENDPOINT})

# State-of-the-world types where a response carries the complete set and a
# missing name means deleted; the others are asked for by name.
WILDCARD = frozenset({CLUSTER, LISTENER})

SHORT = {
    LISTENER: "LDS",
    ROUTE: "RDS",
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    SECRET: "SDS",
}


def short(type_url: str) -> str:
    return SHORT.get(type_url, type_url.removeprefix(_PREFIX))


def earlier_than(type_url: str) -> tuple[str, ...]:
    return PUSH_ORDER[: PUSH_ORDER.index(type_url)]


def later_than(type_url: str) -> tuple[str, ...]:
    return PUSH_ORDER[PUSH_ORDER.index(type_url) + 1 :]
