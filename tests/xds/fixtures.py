"""A small mesh state exercising every translation path."""

from __future__ import annotations

from shoal.model import mesh, proxy


def state() -> mesh.MeshState:
    web = mesh.Service(
        "shop",
        "web",
        (mesh.Port(80, "http"), mesh.Port(9090, "grpc-api", mesh.Protocol.GRPC)),
    )
    db = mesh.Service("shop", "db", (mesh.Port(5432, "tcp-pg", mesh.Protocol.TCP),))
    empty = mesh.Service("shop", "empty", (mesh.Port(8080, "web"),))
    other = mesh.Service("billing", "invoices", (mesh.Port(80, "http"),))
    eps = {
        web.key: (
            mesh.Endpoint("10.0.0.2", 8080, "http", zone="z1"),
            mesh.Endpoint("10.0.0.1", 8080, "http", zone="z1"),
            mesh.Endpoint("10.0.0.3", 8080, "http", zone="z2"),
            mesh.Endpoint("10.0.0.4", 8080, "http", ready=False),
            mesh.Endpoint("10.0.0.1", 9000, "grpc-api", zone="z1"),
        ),
        db.key: (mesh.Endpoint("10.0.1.1", 5432, "tcp-pg"),),
        other.key: (mesh.Endpoint("10.0.2.1", 8000, "http"),),
    }
    services = {s.key: s for s in (web, db, empty, other)}
    return mesh.MeshState(version=7, services=services, endpoints=eps)


def sidecar() -> proxy.Sidecar:
    return proxy.Sidecar(
        namespace="shop",
        service="web",
        service_account="web",
        app_port=8080,
        inbound_port=15006,
        outbound_port=15001,
    )
