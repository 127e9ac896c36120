"""Per-proxy scope: a proxy gets only what it may call, shared with its peers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from shoal.model import mesh as model
from shoal.registry import files
from shoal.xds import cache, controller, debounce, node, resources
from tests import manifests
from tests.conftest import write


def _node(namespace: str, service: str, outbound: int) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            node.NAMESPACE: namespace,
            node.SERVICE: service,
            node.APP_PORT: 8080,
            node.INBOUND_PORT: 15006,
            node.OUTBOUND_PORT: outbound,
        }
    )
    return base_pb2.Node(id=f"{service}-{outbound}", metadata=meta)


def _note(key: str, value: str) -> str:
    return f'\n  annotations:\n    {key}: "{value}"'


class Mesh:
    def __init__(self, folder: Path) -> None:
        self.registry = files.FolderRegistry(folder)
        self.snapshots = cache.SnapshotCache(controller.Controller.key_of)
        self.ctl = controller.Controller(self.snapshots, debounce.Debouncer(0.1, 1.0))
        self.ctl.update(self.registry.load())
        self.ctl.rebuild()

    def proxy(self, namespace: str, service: str, outbound: int = 15001) -> cache.Snapshot:
        w = self.snapshots.watch(cache.Client(_node(namespace, service, outbound)), asyncio.Event())
        snap = self.snapshots.get(w.key)
        assert snap is not None
        return snap


def _write_private(registry_dir: Path, file: str) -> None:
    """team-a's Service "private", seen from its own namespace only."""
    write(
        registry_dir,
        file,
        manifests.service("private", "team-a", extra=_note("shoal.io/export-to", ".")),
    )


def mesh_key(namespace: str, name: str) -> model.ServiceKey:
    return model.ServiceKey(namespace, name)


def services_in(snap: cache.Snapshot) -> set[str]:
    return {
        r.name.split("||")[1].removesuffix(".svc.cluster.local")
        for r in snap.resources(resources.CLUSTER)
        if r.name.startswith("outbound|")
    }


async def test_export_to_limits_who_sees_a_service(registry_dir: Path) -> None:
    write(registry_dir, "a.yaml", manifests.service("public", "team-a"))
    _write_private(registry_dir, "b.yaml")
    write(
        registry_dir,
        "c.yaml",
        manifests.service("partner", "team-a", extra=_note("shoal.io/export-to", "team-b")),
    )
    write(registry_dir, "d.yaml", manifests.service("web", "team-b"))
    write(registry_dir, "e.yaml", manifests.service("web", "team-c"))
    mesh = Mesh(registry_dir)
    assert services_in(mesh.proxy("team-a", "public")) == {
        "public.team-a",
        "private.team-a",
        "partner.team-a",
        "web.team-b",
        "web.team-c",
    }
    assert services_in(mesh.proxy("team-b", "web")) == {
        "public.team-a",
        "partner.team-a",
        "web.team-b",
        "web.team-c",
    }
    assert services_in(mesh.proxy("team-c", "web")) == {"public.team-a", "web.team-b", "web.team-c"}


async def test_dependencies_narrow_the_scope_and_routes_follow(registry_dir: Path) -> None:
    write(
        registry_dir,
        "front.yaml",
        manifests.service("front", "shop", extra=_note("shoal.io/dependencies", "cart, billing/*")),
    )
    write(
        registry_dir,
        "cart.yaml",
        manifests.service("cart", "shop", extra=_note("shoal.io/split", "cart=90,cart-v2=10")),
    )
    write(registry_dir, "cart2.yaml", manifests.service("cart-v2", "shop"))
    write(registry_dir, "other.yaml", manifests.service("search", "shop"))
    write(registry_dir, "bill.yaml", manifests.service("invoices", "billing"))
    mesh = Mesh(registry_dir)
    snap = mesh.proxy("shop", "front")
    # cart-v2 is in because the visible route to cart sends traffic there.
    assert services_in(snap) == {"cart.shop", "cart-v2.shop", "invoices.billing"}
    (routes,) = snap.resources(resources.ROUTE)
    assert {t for t, _ in routes.refs} == {resources.CLUSTER}
    assert {n for _, n in routes.refs} == {
        "outbound|80||cart.shop.svc.cluster.local",
        "outbound|80||cart-v2.shop.svc.cluster.local",
        "outbound|80||invoices.billing.svc.cluster.local",
    }
    # Without a dependency list, the whole namespace and all exports.
    assert "search.shop" in services_in(mesh.proxy("shop", "search"))


async def test_proxies_with_the_same_scope_share_serialized_resources(registry_dir: Path) -> None:
    write(registry_dir, "a.yaml", manifests.service("a", "shop"))
    write(registry_dir, "b.yaml", manifests.service("b", "shop"))
    mesh = Mesh(registry_dir)
    one = mesh.proxy("shop", "a", outbound=20001)
    two = mesh.proxy("shop", "b", outbound=20002)
    assert one is not two
    assert one.groups[resources.CLUSTER][0] is two.groups[resources.CLUSTER][0]
    assert one.groups[resources.ENDPOINT][0] is two.groups[resources.ENDPOINT][0]
    assert one.groups[resources.ROUTE][0] is two.groups[resources.ROUTE][0]
    # Their own listeners differ (ports), and only those.
    assert one.groups[resources.LISTENER][0] is not two.groups[resources.LISTENER][0]


async def test_namespaces_that_see_the_same_services_share_one_scope(registry_dir: Path) -> None:
    """Equal scopes are one object, so that what is kept per scope is found
    by identity, not by comparing every Service of the mesh per proxy."""
    _write_private(registry_dir, "a.yaml")
    write(registry_dir, "b.yaml", manifests.service("web", "team-b"))
    write(registry_dir, "c.yaml", manifests.service("web", "team-c"))
    mesh = Mesh(registry_dir)
    one, two = mesh.proxy("team-b", "web", 20001), mesh.proxy("team-c", "web", 20002)
    shared = mesh.ctl._shared
    assert shared is not None
    b, c = shared.scope("team-b", None), shared.scope("team-c", None)
    assert b is not None and b == {mesh_key("team-b", "web"), mesh_key("team-c", "web")}
    assert b is c
    assert one.groups[resources.ENDPOINT][0] is two.groups[resources.ENDPOINT][0]
