"""A local mesh of apps and Envoy sidecars on 127.0.0.1 (demo and tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
from aiohttp import web

from shoal import envoy, sidecar_files
from shoal.demo import apps
from shoal.model import proxy
from shoal.sds import ca


@dataclass
class Workload:
    sidecar: proxy.Sidecar
    app: apps.App
    envoy: envoy.EnvoyProcess
    runner: web.AppRunner | None = None
    grpc_server: grpc.aio.Server | None = None

    @property
    def outbound(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.outbound_port}"


class LocalMesh:
    """Starts workloads (app + sidecar) and stops every one of them."""

    def __init__(
        self,
        workdir: Path,
        xds_port: int,
        *,
        delta: bool = False,
        authority: ca.Authority | None = None,
        collector_port: int | None = None,
    ) -> None:
        self.workdir = workdir
        # The control plane's trace collector (None: the default port).
        self.collector_port = collector_port
        self.xds_port = xds_port
        self.delta = delta
        self.authority = authority
        self.workloads: dict[str, Workload] = {}

    async def add(
        self,
        name: str,
        *,
        namespace: str,
        service: str,
        inbound_port: int,
        service_account: str = "default",
        version: str = "v1",
        calls: tuple[str, ...] = (),
        wait: bool = True,
        grpc_app: bool = False,
    ) -> Workload:
        s = proxy.Sidecar(
            namespace=namespace,
            service=service,
            service_account=service_account,
            app_port=envoy.free_port(),
            inbound_port=inbound_port,
            outbound_port=envoy.free_port(),
        )
        admin_port = envoy.free_port()
        path = sidecar_files.write(
            self.workdir / name,
            s,
            xds_host="127.0.0.1",
            xds_port=self.xds_port,
            admin_port=admin_port,
            node_id=f"sidecar~{namespace}~{name}",
            delta=self.delta,
            authority=self.authority,
            collector=("127.0.0.1", self.collector_port) if self.collector_port else None,
        )
        app = apps.App(service, name, version, calls, s.outbound_port, namespace=namespace)
        w = Workload(s, app, envoy.EnvoyProcess(path, admin_port))
        self.workloads[name] = w
        if grpc_app:
            w.grpc_server = await apps.start_grpc(app, s.app_port)
        else:
            w.runner = await apps.start(app, s.app_port)
        await w.envoy.start()
        if wait:
            await w.envoy.wait_ready()
        return w

    async def stop(self, name: str) -> None:
        w = self.workloads.pop(name)
        await w.envoy.stop()
        if w.runner is not None:
            await w.runner.cleanup()
        if w.grpc_server is not None:
            await w.grpc_server.stop(grace=None)

    async def close(self) -> None:
        for name in list(self.workloads):
            await self.stop(name)

    def kill_all(self) -> None:
        for w in self.workloads.values():
            w.envoy.kill_now()


async def get(
    session: aiohttp.ClientSession,
    via: Workload,
    host: str,
    path: str = "/",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, object] | str]:
    """A request from `via`'s app through its sidecar to `host`."""
    async with session.get(f"{via.outbound}{path}", headers={"Host": host, **(headers or {})}) as r:
        if r.content_type == "application/json":
            return r.status, await r.json()
        return r.status, await r.text()
