"""`shoal agent` as a Pod runs it, against a real control plane (`shoal serve
--kubernetes` on the API emulator, whose TokenReview checks the Pod's token)
and a real Envoy, on free ports of 127.0.0.1 (no capture here: see
test_iptables.py for the rules)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from shoal import cli, envoy
from shoal.agent import identity
from shoal.sds import ca
from shoal.xds import status
from tests.agent.helpers import AgentProcess, work_dir
from tests.e2e.helpers import eventually
from tests.kube import objects, serving
from tests.kube.emulator import KubeEmulator, running_emulator

NS = "shop"
HOME = "shoal-system"
POD = "web-1"
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
# Short, so a renewal (at about half) happens within the test.
AGENT_TTL = datetime.timedelta(seconds=4)


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with running_emulator(bookmark_interval=0.5, token="cp-token") as emulator:
        for ns in (NS, HOME):
            emulator.create(objects.namespace(ns))
        emulator.create(
            objects.pod(NS, POD, service_account="web", ip="10.1.0.7", labels={"app": "web"})
        )
        yield emulator


@pytest.fixture
async def kube_cp(emu: KubeEmulator, tmp_path: Path) -> AsyncIterator[cli.ControlPlane]:
    async with cli.control_plane(serving.options(emu, tmp_path, agent_ttl=AGENT_TTL)) as cp:
        yield cp


@pytest.fixture
async def app() -> AsyncIterator[int]:
    """The Pod's app: /ok is healthy, /sick is not, /moved redirects."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=f"ok {request.headers.get('X-Probe', '')}")

    async def sick(_: web.Request) -> web.Response:
        return web.Response(status=503, text="sick")

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    application = web.Application()
    application.router.add_get("/ok", ok)
    application.router.add_get("/sick", sick)
    application.router.add_get("/moved", moved)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    port = envoy.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


def _probes(app_port: int) -> str:
    def get(path: str) -> dict[str, object]:
        return {
            "httpGet": {
                "path": path,
                "port": app_port,
                "scheme": "HTTP",
                "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}],
            },
            "timeoutSeconds": 2,
        }

    return json.dumps(
        {
            "/app-health/web/readyz": get("/ok"),
            "/app-health/web/livez": get("/sick"),
            "/app-health/web/startupz": get("/moved"),
        }
    )


def _pod_env(emu: KubeEmulator, app_port: int = 1) -> dict[str, str]:
    pod = emu.get("pods", POD, namespace=NS)
    assert pod is not None
    return {
        "POD_NAME": POD,
        "POD_NAMESPACE": NS,
        "POD_UID": pod["metadata"]["uid"],
        "POD_IP": "10.1.0.7",
        "SERVICE_ACCOUNT": "web",
        "SHOAL_WORKLOAD": "web",
        "SHOAL_APP_PROBES": _probes(app_port),
    }


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


async def _envoy_serials(admin: int) -> set[int]:
    """Serials of the certificates Envoy holds now (admin /certs)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin}/certs") as r,
    ):
        data = await r.json()
    return {
        int(c["serial_number"], 16)
        for entry in data.get("certificates", [])
        for c in entry.get("cert_chain", [])
    }


async def test_the_agent_certifies_runs_envoy_renews_and_drains(
    emu: KubeEmulator, kube_cp: cli.ControlPlane, app: int, tmp_path: Path
) -> None:
    assert kube_cp.authority is not None
    token_path = tmp_path / "token"
    token = emu.token_for_pod(NS, POD)
    token_path.write_text(token)
    with work_dir() as work:
        agent = AgentProcess(
            work=work,
            log=tmp_path / "agent.log",
            xds_port=kube_cp.xds_port,
            ca_port=kube_cp.join_port,
            root_pem=kube_cp.authority.root_pem,
            token_path=token_path,
            env=_pod_env(emu, app),
        )
        try:
            started = time.monotonic()
            await agent.start()

            async def ready() -> bool:
                code, _ = await agent.get("/healthz/ready")
                return code == 200

            await eventually(ready)
            print(f"agent start to first ready: {time.monotonic() - started:.2f}s")

            # The key stayed in the work dir, readable by the proxy's user only.
            client_sds = work / identity.SDS_DIR / identity.CLIENT_SDS
            assert stat.S_IMODE(client_sds.stat().st_mode) == 0o600
            assert client_sds.stat().st_uid == 1337, "Envoy runs as 1337 and reads it"
            first = (work / identity.CERT).read_bytes()
            cert = x509.load_pem_x509_certificate(first)
            assert ca.spiffe_ids(cert) == [WEB_ID]

            # The control plane sees it, by its certificate's identity.
            def connected() -> list[dict[str, object]]:
                return [p for p in status.proxies(kube_cp.ads) if POD in str(p["id"])]

            async def seen() -> bool:
                return bool(connected())

            await eventually(seen)
            (proxy,) = connected()
            assert proxy["identity"] == "shop/web"
            assert proxy["id"] == f"sidecar~10.1.0.7~{POD}.{NS}"
            assert all(t["status"] != "NACKED" for t in proxy["types"])  # type: ignore[attr-defined]
            envoy_pids = agent.envoy_pids()
            assert len(envoy_pids) == 1
            assert os.stat(f"/proc/{envoy_pids[0]}").st_uid == 1337, "Envoy runs as 1337"

            # Rewritten probes reach the app, and only those.
            assert await agent.get("/app-health/web/readyz") == (200, "ok kubelet")
            assert (await agent.get("/app-health/web/livez"))[0] == 503
            assert (await agent.get("/app-health/web/startupz"))[0] == 200
            assert (await agent.get("/app-health/other/readyz"))[0] == 404

            # A renewal (at about half of the 4 s lifetime) reaches the
            # running Envoy through its SDS directory watch: no restart.
            async def renewed() -> bool:
                serial = _serial((work / identity.CERT).read_bytes())
                return serial != cert.serial_number and serial in await _envoy_serials(
                    agent.ports.admin
                )

            await eventually(renewed)
            assert agent.envoy_pids() == envoy_pids, "Envoy was not restarted"
            # Once the first certificate has expired, the control plane ends
            # the stream it authenticated (as its periodic check does); Envoy
            # reconnects with the renewed one and stays ready.
            await asyncio.sleep(
                max(0.0, (cert.not_valid_after_utc - ca.utcnow()).total_seconds() + 0.1)
            )
            kube_cp.ads.recheck()

            async def reconnected_with_a_renewed_certificate() -> bool:
                conns = [c for c in kube_cp.ads.connections.values() if POD in c.node_id]
                return bool(conns) and all(
                    _serial(c.certificate) != cert.serial_number for c in conns
                )

            await eventually(reconnected_with_a_renewed_certificate)
            await eventually(ready)
            assert agent.envoy_pids() == envoy_pids

            # Envoy dies: the agent starts it again.
            os.kill(envoy_pids[0], signal.SIGKILL)

            async def restarted() -> bool:
                pids = agent.envoy_pids()
                return (
                    bool(pids)
                    and pids != envoy_pids
                    and (await agent.get("/healthz/ready"))[0] == 200
                )

            await eventually(restarted)

            # SIGTERM: not ready at once, Envoy drained and stopped, exit 0.
            agent.signal(signal.SIGTERM)

            async def draining() -> bool:
                code, _ = await agent.get("/healthz/ready")
                return code in (0, 503)

            await eventually(draining)
            assert await agent.wait() == 0
            assert agent.envoy_pids() == []
        finally:
            await agent.stop()
    log = agent.output
    assert "certified as spiffe://cluster.local/ns/shop/sa/web" in log
    assert f"Pod {NS}/{POD}" in log
    assert token not in log, "the token must never be logged"
    assert "PRIVATE KEY" not in log


async def test_an_agent_whose_pod_is_gone_is_refused_and_never_ready(
    emu: KubeEmulator, kube_cp: cli.ControlPlane, tmp_path: Path
) -> None:
    assert kube_cp.authority is not None
    token_path = tmp_path / "token"
    token = emu.token_for_pod(NS, POD)
    token_path.write_text(token)
    env = _pod_env(emu)
    emu.delete("pods", POD, namespace=NS)
    with work_dir() as work:
        agent = AgentProcess(
            work=work,
            log=tmp_path / "agent.log",
            xds_port=kube_cp.xds_port,
            ca_port=kube_cp.join_port,
            root_pem=kube_cp.authority.root_pem,
            token_path=token_path,
            env=env,
        )
        try:
            await agent.start()

            async def refused() -> bool:
                return "PERMISSION_DENIED" in agent.output

            await eventually(refused)
            assert (await agent.get("/healthz/ready"))[0] == 503
            assert agent.envoy_pids() == []
            assert not (work / identity.CERT).exists()
            agent.signal(signal.SIGTERM)
            assert await agent.wait() == 0
        finally:
            await agent.stop()
    assert token not in agent.output
    assert f"Pod {NS}/{POD}" in agent.output
