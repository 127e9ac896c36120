"""The Kubernetes registry against the API emulator, over real HTTP: list,
watch, resume, 410 relist, bookmarks, backoff and readiness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal import kube
from shoal.model import mesh
from shoal.registry import kubernetes
from tests.e2e.helpers import eventually
from tests.kube import objects, retries
from tests.kube.emulator import KINDS, KubeEmulator, running_emulator

WEB = mesh.ServiceKey("shop", "web")


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with running_emulator(bookmark_interval=0.2, token="t0ken") as emulator:
        emulator.create(objects.namespace("shop"))
        yield emulator


class Running:
    """A registry watching the emulator, with every state it handed on."""

    def __init__(self, registry: kubernetes.KubernetesRegistry) -> None:
        self.registry = registry
        self.states: list[mesh.MeshState] = []

    @property
    def state(self) -> mesh.MeshState:
        return self.states[-1] if self.states else mesh.MeshState()

    async def until(self, check: Callable[[mesh.MeshState], bool], timeout: float = 30.0) -> float:
        started = time.monotonic()
        while not check(self.state):
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not reached within {timeout}s; last state {self.state}")
            await asyncio.sleep(0.02)
        return time.monotonic() - started


def _registry(emu: KubeEmulator, **options: Any) -> kubernetes.KubernetesRegistry:
    backoff = options.pop("backoff", None) or kube.Backoff(initial=0.05, maximum=0.5)
    token = f"Bearer {emu.token}" if emu.token else None
    api = kube.Api(kube.ApiServer(emu.url, False, lambda: token), backoff)
    options.setdefault("ready_grace", 1.0)
    return kubernetes.KubernetesRegistry(api, **options)


@pytest.fixture
async def watching(emu: KubeEmulator) -> AsyncIterator[Running]:
    registry = _registry(emu)
    running = Running(registry)
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(running.states.append, stop))
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await registry.api.close()


def _web_endpoints(state: mesh.MeshState) -> list[str]:
    return sorted(e.address for e in state.endpoints.get(WEB, ()))


async def test_list_then_watch_creates_patches_and_deletes(
    emu: KubeEmulator, watching: Running
) -> None:
    emu.create(objects.service("shop", "web"))
    emu.create(objects.endpoint_slice("shop", "web", addresses=["10.0.0.1"], name="web-1"))
    await watching.until(lambda s: _web_endpoints(s) == ["10.0.0.1"])
    assert watching.registry.stats.lists == len(watching.registry.reflectors), "one list each"

    # `kubectl annotate` sends a merge patch of the annotations.
    emu.patch(
        "services",
        "web",
        {"metadata": {"annotations": {"shoal.io/timeout": "2s"}}},
        namespace="shop",
    )
    await watching.until(lambda s: WEB in s.routes and s.routes[WEB].timeout_s == 2.0)
    emu.create(objects.endpoint_slice("shop", "web", addresses=["10.0.0.2"], name="web-2"))
    await watching.until(lambda s: _web_endpoints(s) == ["10.0.0.1", "10.0.0.2"])
    emu.delete("endpointslices", "web-1", namespace="shop")
    await watching.until(lambda s: _web_endpoints(s) == ["10.0.0.2"])
    emu.delete("services", "web", namespace="shop")
    await watching.until(lambda s: WEB not in s.services)
    assert watching.registry.stats.relists_after_expiry == 0


async def test_a_dropped_watch_resumes_where_it_was_and_loses_nothing(
    emu: KubeEmulator, watching: Running
) -> None:
    emu.create(objects.service("shop", "web"))
    await watching.until(lambda s: WEB in s.services)
    lists = emu.count(verb="list")
    assert emu.close_watches() >= len(watching.registry.reflectors)
    # Changes while no watch is open are delivered on resume.
    emu.create(objects.endpoint_slice("shop", "web", addresses=["10.0.0.7"], name="web-1"))
    emu.create(objects.service("shop", "api"))
    await watching.until(
        lambda s: _web_endpoints(s) == ["10.0.0.7"] and mesh.ServiceKey("shop", "api") in s.services
    )
    assert emu.count(verb="list") == lists, "resumed from its resourceVersion, no relist"
    resumed = [
        r
        for r in emu.requests(verb="watch", resource="endpointslices")
        if r.query.get("resourceVersion")
    ]
    assert len(resumed) >= 2
    assert all(r.query.get("allowWatchBookmarks") == "true" for r in resumed)
    assert all(int(r.query["timeoutSeconds"]) > 0 for r in resumed), "server-side watch timeouts"


async def test_410_relists_exactly_once_and_reconciles_deletions(
    emu: KubeEmulator, watching: Running
) -> None:
    emu.create(objects.service("shop", "web"))
    emu.create(objects.service("shop", "old"))
    emu.create(objects.endpoint_slice("shop", "web", addresses=["10.0.0.1"], name="web-1"))
    await watching.until(lambda s: mesh.ServiceKey("shop", "old") in s.services)
    registry = watching.registry
    lists_before = emu.count(verb="list", resource="services")
    # While the watches are down: one deletion, one creation, then the
    # history that would replay them is compacted away.
    emu.close_watches()
    emu.delete("services", "old", namespace="shop")
    emu.create(objects.service("shop", "new"))
    emu.compact()
    await watching.until(
        lambda s: (
            mesh.ServiceKey("shop", "old") not in s.services
            and mesh.ServiceKey("shop", "new") in s.services
        )
    )
    await asyncio.sleep(0.5)
    assert emu.count(verb="list", resource="services") == lists_before + 1, "exactly one relist"
    assert registry.stats.relists_after_expiry == len(registry.reflectors)
    assert _web_endpoints(watching.state) == ["10.0.0.1"], "unchanged objects survive a relist"
    emu.create(objects.service("shop", "later"))
    await watching.until(lambda s: mesh.ServiceKey("shop", "later") in s.services)


async def test_bookmarks_keep_a_quiet_watch_resumable(emu: KubeEmulator) -> None:
    """Watching only `shop`, a busy `other` namespace moves the resourceVersion
    on without any event for us; bookmarks carry it, so after compaction the
    watch resumes instead of answering 410."""
    emu.create(objects.namespace("other"))
    registry = _registry(emu, namespaces=["shop"])
    running = Running(registry)
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(running.states.append, stop))
    try:
        emu.create(objects.service("shop", "web"))
        await running.until(lambda s: WEB in s.services)
        for i in range(20):
            emu.create(objects.service("other", f"noise-{i}"))
        target = int(emu.resource_version)
        services = next(r for r in registry.reflectors if r.kind.plural == "services")
        deadline = time.monotonic() + 30
        while int(services.resource_version or 0) < target:
            assert time.monotonic() < deadline, "no bookmark moved the resourceVersion on"
            await asyncio.sleep(0.05)
        emu.compact()
        emu.close_watches()
        emu.create(objects.service("shop", "api"))
        await running.until(lambda s: mesh.ServiceKey("shop", "api") in s.services)
        assert registry.stats.relists_after_expiry == 0
        assert mesh.ServiceKey("other", "noise-0") not in running.state.services, "--namespaces"
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await registry.api.close()


async def test_an_unreachable_api_server_is_retried_with_backoff_not_a_loop(
    emu: KubeEmulator, watching: Running
) -> None:
    emu.create(objects.service("shop", "web"))
    await watching.until(lambda s: WEB in s.services)
    registry = watching.registry
    assert registry.ready() == (True, "ready")
    # Connections are accepted and reset, so the emulator counts each try.
    emu.pause(reset=True)
    started = time.monotonic()

    async def retried() -> bool:
        return emu.dropped_connections >= 8

    await eventually(retried)
    await asyncio.sleep(1.0)
    tries = emu.dropped_connections
    outage = time.monotonic() - started
    # Backoff 0.05 s doubling to 0.5 s, shared by all six reflectors: each
    # cut watch's own first try, then one probe at a time, no more than its
    # schedule allows over the outage as it really lasted (about ten tries
    # in 3 s). Without the shared backoff each reflector would try on its
    # own (six times that); a loop, thousands.
    assert tries <= retries.most_attempts(registry.api.backoff, outage), (tries, outage)
    ok, reason = registry.ready()
    assert not ok and "unreachable" in reason and "serving the last state" in reason
    assert WEB in watching.state.services, "the last state stays"
    emu.resume()
    emu.create(objects.service("shop", "api"))
    await watching.until(lambda s: mesh.ServiceKey("shop", "api") in s.services, timeout=30)
    assert registry.ready()[0]


async def test_not_ready_and_no_state_until_every_kind_is_listed(emu: KubeEmulator) -> None:
    emu.fail_next(3, status=503, resource="pods")
    registry = _registry(emu)
    running = Running(registry)
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(running.states.append, stop))
    try:
        emu.create(objects.service("shop", "web"))
        ok, reason = registry.ready()
        assert not ok and "waiting for the first list" in reason
        await running.until(lambda s: WEB in s.services)
        assert registry.ready()[0]
        assert all(WEB in s.services or not s.services for s in running.states)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await registry.api.close()


async def test_a_cluster_without_the_crd_still_syncs() -> None:
    kinds = [k for k in KINDS if k.plural != "trafficroutes"]
    emulator = KubeEmulator(kinds=kinds, bookmark_interval=0.2)
    await emulator.start()
    registry = _registry(emulator)
    running = Running(registry)
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(running.states.append, stop))
    try:
        deadline = time.monotonic() + 30
        while not registry.synced:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert registry.ready()[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await registry.api.close()
        await emulator.stop()


async def test_a_bad_update_keeps_the_last_good_object_and_says_why(
    emu: KubeEmulator, watching: Running
) -> None:
    emu.create(objects.service("shop", "web", ports=[80]))
    await watching.until(lambda s: WEB in s.services)
    emu.patch(
        "services",
        "web",
        {"spec": {"ports": [{"name": "http", "port": 80, "protocol": "UDP"}]}},
        namespace="shop",
    )
    deadline = time.monotonic() + 30
    while not watching.registry.problems:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    (problem,) = watching.registry.problems
    assert "Service shop/web" in str(problem) and "UDP" in str(problem)
    assert "last good version stays in force" in str(problem)
    assert watching.state.services[WEB].ports[0].port == 80


def test_backoff_doubles_with_jitter_and_caps() -> None:
    import random

    backoff = kube.Backoff(initial=0.5, maximum=4, rng=random.Random(1))
    delays = []
    for _ in range(10):
        backoff.failed("down")
        delays.append(backoff.delay())
    assert all(d <= 4 for d in delays)
    assert 0.4 <= delays[0] <= 0.5 and delays[-1] >= 3.2
    assert delays[1] > delays[0] and delays[2] > delays[1], "doubling"
    assert not backoff.up
    backoff.succeeded()
    assert backoff.up and backoff.delay() <= 0.5


def test_in_cluster_configuration(tmp_path: Path) -> None:
    """In a Pod: the API server from KUBERNETES_SERVICE_HOST/PORT over TLS
    verified by the service account's CA, its token, its namespace."""
    import ssl

    from shoal.sds import ca

    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token-1")
    (account / "ca.crt").write_bytes(ca.new_root("cluster.local").cert_pem)
    (account / "namespace").write_text("shoal-system")
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    server = kube.connect(environ=environ, service_account_dir=str(account))
    assert server.url == "https://10.96.0.1:443"
    assert (server.authorization() or "").lower() == "bearer token-1"  # schemes ignore case
    assert server.namespace == "shoal-system"
    assert isinstance(server.ssl, ssl.SSLContext)
    assert server.ssl.verify_mode == ssl.CERT_REQUIRED
    assert len(server.ssl.get_ca_certs()) == 1
    # The Deployment's downward API names the namespace too, and wins.
    again = kube.connect(
        environ={**environ, "POD_NAMESPACE": "mesh"}, service_account_dir=str(account)
    )
    assert again.namespace == "mesh"


def test_kubeconfig_with_a_context(emu: KubeEmulator, tmp_path: Path) -> None:
    path = emu.write_kubeconfig(tmp_path / "config", namespace="shop")
    server = kube.connect(str(path), "emulator", environ={})
    assert server.url == emu.url
    assert server.authorization() == "Bearer t0ken"
    assert server.namespace == "shop"
    assert server.ssl is False


async def test_a_refused_token_is_reported_not_retried_in_a_loop(emu: KubeEmulator) -> None:
    api = kube.Api(
        kube.ApiServer(emu.url, False, lambda: "Bearer not-the-token"),
        kube.Backoff(initial=0.05, maximum=0.5),
    )
    registry = kubernetes.KubernetesRegistry(api, ready_grace=0.2)
    stop = asyncio.Event()
    before = emu.count()
    started = time.monotonic()
    task = asyncio.create_task(registry.watch(lambda _: None, stop))
    try:

        async def refused() -> bool:
            return "401" in registry.health()["last_error"]

        await eventually(refused)
        await asyncio.sleep(1.5)
        requests = emu.count() - before
        elapsed = time.monotonic() - started
        ok, reason = registry.ready()
        assert not ok and "waiting for the first list" in reason
        assert "401" in registry.health()["last_error"]
        # Backed off as for an outage: the six reflectors' first lists, then
        # the shared schedule over the time that really passed.
        assert requests <= retries.most_attempts(api.backoff, elapsed), (requests, elapsed)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await api.close()
