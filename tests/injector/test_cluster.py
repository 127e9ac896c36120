"""The injector in a cluster: the control plane keeps the caBundle of its
MutatingWebhookConfiguration current (under its Lease), and the API server
(the emulator, calling webhooks over HTTPS as kube-apiserver does) injects
Pods created in a labelled namespace. The webhook is never called
in-process: only the API server calls it."""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from shoal import cli, kube
from shoal.injector import bundle, settings
from tests.e2e.helpers import eventually
from tests.injector import shapes
from tests.kube import objects, serving
from tests.kube.emulator import KubeEmulator, running_emulator

HOME = "shoal-system"
CONFIGURATION = Path(__file__).resolve().parents[2] / "examples" / "kubernetes" / "webhook.yaml"
RESOURCE = "mutatingwebhookconfigurations"


def _configuration() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(CONFIGURATION.read_text())
    return found


def _bundle(emu: KubeEmulator) -> bytes:
    found = emu.get(RESOURCE, bundle.CONFIGURATION)
    assert found is not None
    return base64.b64decode(found["webhooks"][0]["clientConfig"].get("caBundle", ""))


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with running_emulator(bookmark_interval=0.5) as emulator:
        emulator.create(objects.namespace(HOME))
        yield emulator


@pytest.fixture
async def api(emu: KubeEmulator, tmp_path: Path) -> AsyncIterator[kube.Api]:
    client = kube.Api(kube.connect(str(emu.write_kubeconfig(tmp_path / "kubeconfig", HOME)), None))
    try:
        yield client
    finally:
        await client.close()


async def test_the_bundle_is_written_once_and_again_after_the_roots_change(
    emu: KubeEmulator, api: kube.Api
) -> None:
    emu.create(_configuration())
    roots = [b"-----BEGIN CERTIFICATE-----\nONE\n-----END CERTIFICATE-----\n"]
    keeper = bundle.CaBundle(api, lambda: roots[0], None)
    assert await keeper.sync() is True
    assert _bundle(emu) == roots[0]
    emu.clear_requests()
    assert await keeper.sync() is False
    assert emu.count(method="PUT") == 0, "an unchanged bundle is not written again"
    # Someone labels the configuration in between: their edit stays.
    current = emu.get(RESOURCE, bundle.CONFIGURATION)
    assert current is not None
    current["metadata"]["labels"]["team"] = "platform"
    emu.update(current)
    roots[0] = b"-----BEGIN CERTIFICATE-----\nTWO\n-----END CERTIFICATE-----\n"
    assert await keeper.sync() is True
    after = emu.get(RESOURCE, bundle.CONFIGURATION)
    assert after is not None
    assert after["metadata"]["labels"]["team"] == "platform"
    assert _bundle(emu) == roots[0]


async def test_a_missing_configuration_is_said_once_and_changes_nothing(api: kube.Api) -> None:
    keeper = bundle.CaBundle(api, lambda: b"x", None)
    assert await keeper.sync() is False
    assert (
        keeper.last
        == f"MutatingWebhookConfiguration {bundle.CONFIGURATION} not found: nothing to keep"
    )


async def test_only_the_lease_holder_writes(emu: KubeEmulator, api: kube.Api) -> None:
    emu.create(_configuration())
    first = bundle.CaBundle(
        api, lambda: b"first", kube.Lease(api, HOME, bundle.LEASE, "replica-a"), poll_s=0.05
    )
    second = bundle.CaBundle(
        api, lambda: b"second", kube.Lease(api, HOME, bundle.LEASE, "replica-b"), poll_s=0.05
    )
    # The first takes the Lease (and keeps renewing it) before the second looks.
    assert await kube.Lease(api, HOME, bundle.LEASE, "replica-a").acquire() is None
    tasks = [asyncio.create_task(k.run()) for k in (first, second)]
    try:

        async def settled() -> bool:
            return _bundle(emu) == b"first" and "replica-a keeps" in second.last

        await eventually(settled)
        assert _bundle(emu) == b"first"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def control_plane(emu: KubeEmulator, tmp_path: Path) -> AsyncIterator[cli.ControlPlane]:
    options = serving.options(emu, tmp_path, webhook_address="127.0.0.1:0")
    async with cli.control_plane(options) as cp:
        yield cp


async def test_the_api_server_injects_pods_of_labelled_namespaces_through_the_webhook(
    emu: KubeEmulator, control_plane: cli.ControlPlane
) -> None:
    assert control_plane.authority is not None and control_plane.webhook_port
    emu.map_service(HOME, "shoal", 443, f"127.0.0.1:{control_plane.webhook_port}")
    emu.create(_configuration())
    # No caBundle in the manifest: the control plane writes the mesh's roots.
    trust = control_plane.authority.xds_trust

    async def written() -> bool:
        return _bundle(emu) == trust

    await eventually(written)
    x509.load_pem_x509_certificates(_bundle(emu))

    emu.create(objects.namespace("shop", labels={settings.INJECT_LABEL: settings.INJECT_ENABLED}))
    emu.create(objects.namespace("plain"))
    pod = shapes.load("named_probe_ports")
    # Off the test's loop, which serves the webhook the API server calls.
    created = await asyncio.to_thread(emu.create, copy.deepcopy(pod))
    names = [c["name"] for c in created["spec"]["initContainers"]]
    assert names == [settings.INIT_CONTAINER, settings.PROXY_CONTAINER]
    env = {e["name"]: e.get("value") for e in created["spec"]["initContainers"][1]["env"]}
    # The roots the sidecar will verify the control plane by are the mesh's.
    assert env["SHOAL_CA_ROOT_PEM"] == control_plane.authority.xds_trust.decode()
    (call,) = emu.admission_calls()
    assert call.webhook == "inject.shoal.io"

    # Not labelled: the API server does not even call.
    other = copy.deepcopy(pod)
    other["metadata"]["namespace"] = "plain"
    assert "initContainers" not in (await asyncio.to_thread(emu.create, other))["spec"]
    # Opted out: called, allowed, untouched.
    opted = shapes.load("opt_out")
    assert "initContainers" not in (await asyncio.to_thread(emu.create, opted))["spec"]
    assert len(emu.admission_calls()) == 2
