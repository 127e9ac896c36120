"""A small mesh state exercising every translation path."""

from __future__ import annotations

from shoal.model import mesh, proxy, routing


def state() -> mesh.MeshState:
    web = mesh.Service(
        "shop",
        "web",
        (mesh.Port(80, "http"), mesh.Port(9090, "grpc-api", mesh.Protocol.GRPC)),
        outlier=mesh.OutlierPolicy(consecutive_5xx=3, ejection_s=10.0),
    )
    web_v2 = mesh.Service("shop", "web-v2", (mesh.Port(80, "http"),))
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
    services = {s.key: s for s in (web, web_v2, db, empty, other)}
    canary = routing.ServiceRoute(
        web.key,
        (
            routing.RouteRule(
                (routing.Backend(web_v2.key),),
                (routing.HeaderMatch("x-user-group", routing.MatchKind.EXACT, "internal"),),
            ),
            routing.RouteRule((routing.Backend(web.key, 90), routing.Backend(web_v2.key, 10))),
        ),
        source="annotations",
        timeout_s=2.0,
        retry=routing.Retry(3, "5xx,reset"),
        fault=routing.Fault(abort_status=503, abort_percent=12.5, delay_s=0.2, delay_percent=50),
        mirror=routing.Mirror(empty.key, 25),
    )
    return mesh.MeshState(version=7, services=services, endpoints=eps, routes={web.key: canary})


def sidecar() -> proxy.Sidecar:
    return proxy.Sidecar(
        namespace="shop",
        service="web",
        service_account="web",
        app_port=8080,
        inbound_port=15006,
        outbound_port=15001,
    )
