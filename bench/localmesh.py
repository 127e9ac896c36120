"""What the benchmarks that send real requests share: a control plane on a
manifests folder, on free ports, loaded, with LocalMesh sidecars for some of
its Services."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from shoal import cli
from shoal.demo import mesh


@contextlib.asynccontextmanager
async def control_plane(
    registry: Path, work: Path, services: int, **options: Any
) -> AsyncIterator[cli.ControlPlane]:
    """`shoal serve --registry` on free ports, once its first load holds
    `services` Services."""
    settings: dict[str, Any] = {
        "registry": registry,
        "xds_address": "127.0.0.1:0",
        "admin_address": "127.0.0.1:0",
        "state_dir": work / "state",
        "join_address": "127.0.0.1:0",
        "collector_address": "127.0.0.1:0",
    }
    async with cli.control_plane(cli.ServeOptions(**{**settings, **options})) as cp:
        deadline = time.monotonic() + 60
        while len(cp.controller.state.services) < services:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the control plane did not load {services} Services")
            await asyncio.sleep(0.05)
        yield cp


def local_mesh(cp: cli.ControlPlane, work: Path, delta: bool = False) -> mesh.LocalMesh:
    """Envoy sidecars of `cp` (its xDS port, CA and collector), under WORK/sidecars."""
    return mesh.LocalMesh(
        work / "sidecars",
        cp.xds_port,
        delta=delta,
        authority=cp.authority,
        collector_port=cp.collector_port,
    )


async def sidecars(local: mesh.LocalMesh, ports: Mapping[str, int]) -> dict[str, mesh.Workload]:
    """One workload of each Service in `ports` (name -> inbound port), its
    service account NAME-sa, in the default namespace."""
    return {
        name: await local.add(
            f"{name}-1",
            namespace="default",
            service=name,
            inbound_port=port,
            service_account=f"{name}-sa",
        )
        for name, port in ports.items()
    }
