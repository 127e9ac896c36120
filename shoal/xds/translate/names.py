"""Names of generated resources. They show up in Envoy stats and config dumps,
so they follow Istio's shapes, which operators already know how to read."""

from __future__ import annotations

from shoal.model import mesh

OUTBOUND_ROUTE = "outbound"
INBOUND_ROUTE = "inbound"


def subset_name(labels: mesh.FrozenMap) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def outbound_cluster(
    key: mesh.ServiceKey, port: mesh.Port, subset: mesh.FrozenMap | None = None
) -> str:
    """`outbound|80||reviews.ns.svc.cluster.local`; a label subset goes in
    the third field (`outbound|80|version=v2|...`), as Istio's subsets do."""
    return f"outbound|{port.port}|{subset_name(subset) if subset else ''}|{key.fqdn}"


def inbound_cluster(app_port: int) -> str:
    return f"inbound|{app_port}||"


def inbound_listener(port: int) -> str:
    return f"inbound|{port}"


def outbound_listener(port: int) -> str:
    return f"outbound|{port}"


def host_names(key: mesh.ServiceKey) -> tuple[str, ...]:
    """Every spelling of a Service's host a caller in the mesh may use."""
    return (
        key.name,
        f"{key.name}.{key.namespace}",
        f"{key.name}.{key.namespace}.svc",
        key.fqdn,
    )


# Captured (iptables) sidecars: one listener each way, named as Istio's.
VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
# Where traffic to an address the mesh does not know goes: on to that address.
PASSTHROUGH_CLUSTER = "PassthroughCluster"
# Where the share of a route's backend that cannot be reached "goes": no
# such cluster exists, and the route answers 500 for it.
INVALID_BACKEND_CLUSTER = "shoal-invalid-backend"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
# The catch-all virtual host of a port's route table (Istio's ALLOW_ANY mode).
ALLOW_ANY = "allow_any"
# In the subset field, so tools that split Istio names on "|" still read it;
# label subsets always contain "=", so it cannot collide with one.
ORIGINAL_DST_SUBSET = "original-dst"


def port_route(port: int) -> str:
    """The route table of one outbound port of a captured sidecar: `80`."""
    return str(port)


def original_dst_cluster(key: mesh.ServiceKey, port: mesh.Port) -> str:
    """`outbound|5432|original-dst|db.ns.svc.cluster.local`: a headless
    Service's port, reached at whatever Pod address the caller dialled.

    Not the EDS cluster's name: routes may still send to that one, and an
    ORIGINAL_DST cluster behind an HTTP route would dial the address of the
    Service the caller meant, not this one."""
    return f"outbound|{port.port}|{ORIGINAL_DST_SUBSET}|{key.fqdn}"
