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

# The types each type's resources may name (translate/refs.py reads them):
# endpoints and secrets name nothing.
NAMES = {
    LISTENER: frozenset({ROUTE, CLUSTER, SECRET}),
    ROUTE: frozenset({CLUSTER}),
    CLUSTER: frozenset({ENDPOINT, SECRET}),
    ENDPOINT: frozenset[str](),
    SECRET: frozenset[str](),
}

# For each type, the types pushed after it whose resources may name one of
# it: what a wildcard type must keep for them (make before break) depends on
# what the proxy holds of these and of no other.
NAMED_LATER_BY = {
    t: tuple(later for later in PUSH_ORDER[i + 1 :] if t in NAMES[later])
    for i, t in enumerate(PUSH_ORDER)
}

# State-of-the-world types where a response carries the complete set and a
# missing name means deleted; the others are asked for by name.
WILDCARD = frozenset({CLUSTER, LISTENER})

# For each type, the types pushed before it that a proxy must have asked
# for by name before it is sent: those a type pushed earlier still names
# (a cluster's endpoints, before listeners and routes), wildcard types aside.
ASKED_BEFORE = {
    t: tuple(
        e
        for i, e in enumerate(PUSH_ORDER[: PUSH_ORDER.index(t)])
        if e not in WILDCARD and any(e in NAMES[n] for n in PUSH_ORDER[:i])
    )
    for t in PUSH_ORDER
}

# Types whose ACK another type's next send depends on only through the
# subscription check before it (ASKED_BEFORE): they name nothing, so no
# wildcard type keeps resources for them, and they are not wildcard
# themselves. When nothing else is due, their ACK needs no look at the
# stream's other types (server._take_answer).
ANSWERED_ALONE = frozenset(t for t in PUSH_ORDER if not NAMES[t] and t not in WILDCARD)

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
