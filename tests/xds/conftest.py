"""Fixtures of the xDS suites."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from shoal.xds import cache, controller, server


@contextlib.asynccontextmanager
async def serving(ads: server.AdsServer) -> AsyncIterator[int]:
    """`ads` on a gRPC server of its own on 127.0.0.1; its port."""
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((ads.handler(),))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield port
    finally:
        await grpc_server.stop(grace=None)


@pytest.fixture
async def bare_server() -> AsyncIterator[tuple[int, cache.SnapshotCache, server.AdsServer]]:
    """An AdsServer over a cache the test fills by hand: no registry, no controller."""
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ads = server.AdsServer(snapshots)
    async with serving(ads) as port:
        yield port, snapshots, ads
