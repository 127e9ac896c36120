"""The object builders make what the shoal registry accepts, as the API serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from shoal.model import mesh
from shoal.registry import manifests, trafficroute
from tests.kube import objects
from tests.kube.emulator import KubeEmulator


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    emulator = KubeEmulator()
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


async def served(emu: KubeEmulator, obj: dict[str, Any]) -> manifests.KubeObject:
    """Create it, read it back over HTTP, and parse it as the registry does."""
    created = emu.create(obj)
    kind = emu.kind_of(obj)
    meta = created["metadata"]
    ns = f"/namespaces/{meta['namespace']}" if kind.namespaced else ""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{emu.url}{kind.prefix}{ns}/{kind.plural}/{meta['name']}") as response,
    ):
        assert response.status == 200
        parsed = manifests.parse_object(await response.json())
    assert parsed is not None
    manifests.check(parsed)
    return parsed


async def test_the_builders_make_objects_the_registry_accepts(emu: KubeEmulator) -> None:
    ns = await served(emu, objects.namespace("shop", labels={"team": "a"}))
    assert manifests.to_namespace(ns).labels["team"] == "a"
    await served(emu, objects.service_account("shop", "reviews"))

    svc = manifests.to_service(
        await served(
            emu,
            objects.service(
                "shop", "reviews", annotations={"shoal.io/timeout": "2s"}, selector={"app": "r"}
            ),
        )
    )
    assert svc.ports == (mesh.Port(80, "http", target_port=80),)
    assert svc.annotations["shoal.io/timeout"] == "2s" and svc.cluster_ip
    multi = objects.service("shop", "api", ports=[80, ("grpc", 9090)], cluster_ip="None")
    assert [p.name for p in manifests.to_service(await served(emu, multi)).ports] == [
        "http-80",
        "grpc",
    ]

    pod = await served(
        emu, objects.pod("shop", "reviews-1", labels={"version": "v1"}, service_account="reviews")
    )
    info = manifests.to_pod(pod)
    assert info.service_account == "reviews"

    slice_ = await served(
        emu,
        objects.endpoint_slice(
            "shop",
            "reviews",
            addresses=["10.0.0.1", "10.0.0.2"],
            ports=[9080],
            ready=[True, False],
            pods=["reviews-1", None],
        ),
    )
    assert manifests.slice_service(slice_) == "reviews"
    first, second = manifests.to_endpoints(slice_, {("shop", "reviews-1"): info})
    assert (first.address, first.port, first.port_name, first.ready) == (
        "10.0.0.1",
        9080,
        "http",
        True,
    )
    assert (first.pod, first.service_account, first.labels["version"]) == (
        "reviews-1",
        "reviews",
        "v1",
    )
    assert (second.ready, second.pod) == (False, None)

    spec = {"service": "reviews", "rules": [{"backends": [{"service": "reviews", "weight": 100}]}]}
    route = await served(emu, objects.traffic_route("shop", "reviews", spec))
    known = {mesh.ServiceKey("shop", "reviews"): svc}
    assert trafficroute.parse(route, known).route.service == mesh.ServiceKey("shop", "reviews")
