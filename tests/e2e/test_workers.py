"""`shoal serve --workers N`: several processes serve xDS on one port, each
translating on its own, worker 0 seeing every stream; real Envoys, real mTLS,
the real `shoal` commands a user types."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client.parser import text_string_to_metric_families

from shoal import envoy
from shoal.demo import mesh
from shoal.sds import ca, roots
from shoal.xds import resources
from tests import manifests
from tests.conftest import write
from tests.e2e import test_kubernetes as kube_tests
from tests.e2e.helpers import ServeProcess, eventually, rotate_root, who_answers
from tests.kube import objects
from tests.kube.emulator import KubeEmulator
from tests.xds.test_ads_protocol import AdsClient, make_node, unpack_all, unpack_clusters

pytestmark = pytest.mark.timeout(300)

# The Kubernetes tests' API server emulator, with their namespaces.
emu = kube_tests.emu

CDS = resources.CLUSTER
SDS = resources.SECRET
# Streams opened, at most, for both workers to serve some: the kernel picks
# a worker's socket by a hash of each connection's ports, so with 40 the
# chance that one worker gets none is 2**-39.
MAX_STREAMS = 40


class RawProxy:
    """One ADS stream on a connection of its own, acking what it is sent."""

    def __init__(self, port: int, pair: ca.KeyPair, trust: bytes, name: str) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=trust, private_key=pair.key_pem, certificate_chain=pair.cert_pem
        )
        # A subchannel pool of its own: a connection of its own.
        self.channel = grpc.aio.secure_channel(
            f"127.0.0.1:{port}", creds, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.name = name
        self.client = AdsClient(self.channel, make_node(name))
        self.last: dict[str, discovery_pb2.DiscoveryResponse] = {}

    async def subscribe(self, type_url: str, names: tuple[str, ...] = ()) -> None:
        await self.client.request(type_url, names)
        await self.take(type_url, names)

    async def take(
        self, type_url: str, names: tuple[str, ...] = ()
    ) -> discovery_pb2.DiscoveryResponse:
        """The next response (of `type_url`), acked."""
        while True:
            response = await self.client.recv()
            await self.client.ack(response, names)
            self.last[response.type_url] = response
            if response.type_url == type_url:
                return response

    async def keep_taking(self, type_url: str, names: tuple[str, ...]) -> None:
        while True:
            await self.take(type_url, names)

    async def close(self) -> None:
        await self.client.close()
        await self.channel.close()


def shoal_cli() -> list[str]:
    return [sys.executable, "-m", "shoal.cli"]


def analyze(*args: str) -> list[dict[str, str]]:
    """`shoal analyze`, which exits 1 when it finds an error."""
    done = subprocess.run(
        [*shoal_cli(), "analyze", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode in (0, 1), done.stderr
    found = json.loads(done.stdout)
    assert isinstance(found, list)
    return found


def shoal_command(*args: str) -> str:
    done = subprocess.run([*shoal_cli(), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def admin_get(state: Path, path: str) -> str:
    """A GET of worker 0's admin socket, with curl."""
    return subprocess.run(
        ["curl", "-sf", "--unix-socket", str(state / "admin.sock"), f"http://x{path}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def proxy_status(state: Path) -> list[dict[str, object]]:
    """What `shoal proxy-status` reads: worker 0's /debug/syncz."""
    found = json.loads(admin_get(state, "/debug/syncz"))
    assert isinstance(found, list)
    return found


def promtool_problems(exposition: str) -> str:
    """What `promtool check metrics` (Prometheus's own) finds wrong."""
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return "" if checked.returncode == 0 else checked.stdout + checked.stderr


def samples(text: str, name: str) -> dict[str, float]:
    """A gauge's value by worker."""
    return {
        s.labels["worker"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def worker_pids(serve: ServeProcess) -> list[int]:
    """The processes worker 0 started."""
    assert serve.proc is not None
    pid = serve.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # A zombie (exited, not yet reaped) is not serving.
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def stop(serve: ServeProcess, workers: list[int]) -> None:
    """Worker 0 asked to stop, as an operator would, so that it stops the
    others; any left (the test failed half-way) killed."""
    if serve.proc is not None and serve.proc.returncode is None:
        serve.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(serve.proc.wait(), 30)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await serve.stop()


def serving(serve: ServeProcess, raws: list[RawProxy]) -> set[object]:
    """The workers serving these streams."""
    names = {r.name for r in raws}
    return {p["worker"] for p in proxy_status(serve.state_dir) if p["id"] in names}


@contextlib.asynccontextmanager
async def raw_proxies(
    serve: ServeProcess,
    xds: int,
    subscribe: tuple[str, ...] = (CDS,),
    names: tuple[str, ...] = (),
    authority: ca.Authority | None = None,
) -> AsyncIterator[list[RawProxy]]:
    """Streams opened one by one until both workers serve some."""
    authority = authority or serve.authority()
    pair = authority.workload("default", "default")
    opened: list[RawProxy] = []
    try:
        for k in range(MAX_STREAMS):
            raw = RawProxy(xds, pair, authority.xds_trust, f"raw-{k}")
            opened.append(raw)
            for type_url in subscribe:
                await raw.subscribe(type_url, names)
            if serving(serve, opened) == {0, 1}:
                break
        assert serving(serve, opened) == {0, 1}
        yield opened
    finally:
        for raw in opened:
            await raw.close()


async def test_two_workers_serve_one_port_and_both_push(registry_dir: Path, tmp_path: Path) -> None:
    xds = envoy.free_port()
    a_in, b1_in, b2_in = (envoy.free_port() for _ in range(3))
    write(registry_dir, "a.yaml", manifests.service_with_endpoints("a", [a_in]))
    write(registry_dir, "b.yaml", manifests.service_with_endpoints("b", [b1_in], slice_name="b1"))
    state = tmp_path / "state"
    serve = ServeProcess(registry_dir, xds, state, extra=("--workers", "2"))
    local = mesh.LocalMesh(tmp_path / "sidecars", xds)
    seen: list[int] = []
    try:
        await serve.start()
        assert "2 workers" in serve.banner
        (worker,) = seen = worker_pids(serve)
        local.authority = serve.authority()
        a = await local.add("a-1", namespace="default", service="a", inbound_port=a_in)
        await local.add("b-1", namespace="default", service="b", inbound_port=b1_in)
        async with raw_proxies(serve, xds) as raws, aiohttp.ClientSession() as session:
            assert set(await who_answers(session, a, "b", 5)) == {"b-1"}

            # Ready: worker 0 and every other worker.
            assert admin_get(state, "/ready").strip() != ""
            # Every stream shows in worker 0's proxy-status, with its worker.
            table = shoal_command("proxy-status", "--admin", str(state / "admin.sock"))
            assert table.splitlines()[0].split()[-1] == "WORKER"
            served = {str(p["id"]): p["worker"] for p in proxy_status(state)}
            assert {r.name for r in raws} | {"a-1", "b-1"} <= {n.split("~")[-1] for n in served}
            # A proxy worker 1 serves: its config dump, through worker 0.
            on_one = next(name for name, w in served.items() if w == 1)
            dump = json.loads(
                shoal_command("config-dump", on_one, "--admin", str(state / "admin.sock"))
            )
            assert dump["id"] == on_one and "CDS" in dump["types"]
            # /metrics: every worker's, each sample labelled with its worker,
            # and what Prometheus's own checker accepts.
            exposition = admin_get(state, "/metrics")
            assert promtool_problems(exposition) == ""
            streams = samples(exposition, "shoal_xds_connected_streams")
            assert set(streams) == {"0", "1"} and all(v > 0 for v in streams.values())

            async def counted_alike() -> bool:
                text = await asyncio.to_thread(admin_get, state, "/metrics")
                listed = await asyncio.to_thread(proxy_status, state)
                return sum(samples(text, "shoal_xds_connected_streams").values()) == len(listed)

            await eventually(counted_alike, 30.0)

            # A proxy of worker 1 rejects its clusters: `shoal analyze`, on
            # worker 0, says so, naming it.
            nacker = next(r for r in raws if served.get(r.name) == 1)
            cds = nacker.last[CDS]
            await nacker.client.request(
                CDS, version=cds.version_info, nonce=cds.nonce, error="rejected by the test"
            )

            async def analyzed() -> bool:
                found = await asyncio.to_thread(
                    analyze, "--output", "json", "--admin", str(state / "admin.sock")
                )
                return any(p["code"] == "SHL0401" and nacker.name in p["reason"] for p in found)

            await eventually(analyzed, 30.0)

            # Both workers translate a change and push it to their streams.
            write(registry_dir, "c.yaml", manifests.service_with_endpoints("c", [b2_in]))
            c_cluster = "outbound|80||c.default.svc.cluster.local"
            pushed = await asyncio.gather(*(r.take(CDS) for r in raws))
            for response in pushed:
                assert c_cluster in {c.name for c in unpack_clusters(response)}
            # ...and so do the Envoys, wherever they are served.
            write(
                registry_dir,
                "b.yaml",
                manifests.service_with_endpoints("b", [b2_in], slice_name="b2"),
            )
            await local.add("b-2", namespace="default", service="b", inbound_port=b2_in)

            async def moved() -> bool:
                return set(await who_answers(session, a, "b", 4)) == {"b-2"}

            await eventually(moved, 60.0)

            # A worker that dies is started again; its proxies come back.
            os.kill(worker, signal.SIGKILL)

            async def restarted() -> bool:
                pids = worker_pids(serve)
                return len(pids) == 1 and pids[0] != worker and alive(pids[0])

            await eventually(restarted, 60.0)
            (worker,) = worker_pids(serve)
            seen.append(worker)
            assert any("xDS worker 1 (pid" in line for line in serve.output)

            # New streams land on it again.
            async with raw_proxies(serve, xds):
                pass

        # When worker 0 goes, however it goes, the others do too.
        serve.kill()

        async def gone() -> bool:
            return not alive(worker)

        await eventually(gone, 30.0)
        await serve.wait()
    finally:
        await stop(serve, seen)
        await local.close()
        local.kill_all()


def _secrets(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    return {s.name: s for s in unpack_all(response, secret_pb2.Secret)}


async def test_a_root_rotation_reaches_the_proxies_of_every_worker(
    registry_dir: Path, tmp_path: Path
) -> None:
    """In files mode the workers follow the rotation through a record in the
    state directory, as replicas follow the Secret on Kubernetes."""
    write(registry_dir, "web.yaml", manifests.service_with_endpoints("web", [envoy.free_port()]))
    xds = envoy.free_port()
    state = tmp_path / "state"
    serve = ServeProcess(registry_dir, xds, state, extra=("--workers", "2"))
    secrets = ("ROOTCA", "default")
    seen: list[int] = []
    try:
        await serve.start()
        seen = worker_pids(serve)
        old_root = serve.authority().signer.cert
        async with raw_proxies(serve, xds, subscribe=(SDS,), names=secrets) as raws:
            pumps = [asyncio.create_task(r.keep_taking(SDS, secrets)) for r in raws]
            try:
                await rotate_root(str(state / "admin.sock"), 120.0)
                new_root = serve.authority().signer.cert
                assert new_root.serial_number != old_root.serial_number

                def current(raw: RawProxy) -> bool:
                    held = _secrets(raw.last[SDS])
                    bundle = held["ROOTCA"].validation_context.trusted_ca.inline_bytes
                    chain = held["default"].tls_certificate.certificate_chain.inline_bytes
                    leaf = x509.load_pem_x509_certificates(chain)[0]
                    try:
                        leaf.verify_directly_issued_by(new_root)
                    except (ValueError, TypeError, InvalidSignature):
                        return False
                    return x509.load_pem_x509_certificates(bundle) == [new_root]

                async def everyone_moved() -> bool:
                    return all(current(r) for r in raws)

                # The rotation waits on worker 0's proxies, and gives the
                # others the time to read each phase; all end on the new root.
                await eventually(everyone_moved, 30.0)
                # `shoal ca status` shows who holds what, on every worker.
                status = json.loads(
                    shoal_command("ca", "status", "--json", "--admin", str(state / "admin.sock"))
                )
                holders = {p: w["worker"] for w in status["workloads"] for p in w["proxies"]}
                assert {r.name for r in raws} <= {h.split(" ")[0] for h in holders}
                assert set(holders.values()) == {0, 1}
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        # On disk, for the next start, with one worker or more.
        on_disk, _ = ca.load_or_create(state, "cluster.local")
        assert on_disk.cert.serial_number == new_root.serial_number
        assert [r.cert.serial_number for r in ca.load_retired(state)] == [old_root.serial_number]
        # The record, with its keys, is there only while the workers run.
        assert (state / "ca" / roots.FOLDER_RECORD).exists()
        await stop(serve, seen)
        assert serve.proc is not None and serve.proc.returncode == 0
        assert not (state / "ca" / roots.FOLDER_RECORD).exists()
        assert not any(alive(pid) for pid in seen)
    finally:
        await stop(serve, seen)


async def test_on_kubernetes_every_worker_watches_the_api_server(
    emu: KubeEmulator, tmp_path: Path
) -> None:
    """Each worker lists and watches the API server, so a Service created
    later reaches the proxies of both; the root is the Secret's."""
    emu.create(objects.service(kube_tests.SHOP, "web", ports=[("http", 80)]))
    xds = envoy.free_port()
    serve = ServeProcess(
        None,
        xds,
        tmp_path / "state",
        kubeconfig=emu.write_kubeconfig(tmp_path / "kubeconfig", namespace=kube_tests.HOME),
        extra=("--workers", "2", "--webhook-address", f"127.0.0.1:{envoy.free_port()}"),
    )
    seen: list[int] = []
    try:
        await serve.start()
        seen = worker_pids(serve)
        authority = kube_tests._authority(emu)
        async with raw_proxies(serve, xds, authority=authority) as raws:
            emu.create(objects.service(kube_tests.SHOP, "late", ports=[("http", 80)]))
            late = "outbound|80||late.shop.svc.cluster.local"

            async def has_late(raw: RawProxy) -> None:
                while late not in {c.name for c in unpack_clusters(raw.last[CDS])}:
                    await raw.take(CDS)

            await asyncio.wait_for(asyncio.gather(*(has_late(r) for r in raws)), 60)
    finally:
        await stop(serve, seen)
