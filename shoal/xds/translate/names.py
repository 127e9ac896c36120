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
