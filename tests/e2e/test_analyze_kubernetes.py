"""The injection problems on Kubernetes, end to end: `shoal serve
--kubernetes` (in this process, its injection webhook served) against the API
emulator, a user typing the real kubectl, the emulator calling the webhook
over HTTPS as kube-apiserver does.

SHL0306 InjectionNotInstalled: a namespace labelled for injection while
shoal's MutatingWebhookConfiguration is not installed. SHL0305
SidecarMissing: a Pod created in that namespace meanwhile, which starts
without a sidecar. Each is seen as a user sees it (`kubectl get pod`, `kubectl
get events`, `kubectl describe pod`), named by `shoal analyze`, fixed as its
fix says, and cleared.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shoal import cli
from shoal.injector import bundle, settings
from tests.e2e import diagnosis
from tests.e2e.helpers import eventually
from tests.kube import serving
from tests.kube.emulator import KubeEmulator
from tests.kube.kubectl import Kubectl

pytestmark = pytest.mark.timeout(180)

WEBHOOK_YAML = Path(__file__).resolve().parents[2] / "examples" / "kubernetes" / "webhook.yaml"
SHOP = "shop"
# As a user writes them: no sidecar.
WEB = f"""apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: {SHOP}, labels: {{app: web}}}}
spec:
  containers: [{{name: web, image: python:3.11-slim, ports: [{{containerPort: 8080}}]}}]
"""
BATCH = f"""apiVersion: v1
kind: Pod
metadata:
  name: batch
  namespace: {SHOP}
  annotations: {{{settings.INJECT_ANNOTATION}: "false"}}
spec:
  containers: [{{name: batch, image: busybox, command: [sleep, "3600"]}}]
"""


@dataclass
class Cluster:
    emu: KubeEmulator
    cp: cli.ControlPlane
    kubectl: Kubectl

    async def label_for_injection(self) -> float:
        """The user's step that asks for sidecars; when it was taken."""
        await self.kubectl.arun(
            "apply",
            "-f",
            "-",
            stdin=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {SHOP}}}\n",
        )
        await self.kubectl.arun("label", "namespace", SHOP, f"{settings.INJECT_LABEL}=enabled")
        return asyncio.get_running_loop().time()

    async def install_webhook(self) -> None:
        """What the fix says, and then until the API server can call the
        webhook: shoal has written its roots into the configuration."""
        await self.kubectl.arun("apply", "-f", str(WEBHOOK_YAML))

        async def trusted() -> bool:
            found = self.emu.get("mutatingwebhookconfigurations", bundle.CONFIGURATION)
            return bool(found and found["webhooks"][0]["clientConfig"].get("caBundle"))

        await eventually(trusted)

    async def start_pod(self, manifest: str, name: str) -> dict[str, Any]:
        """`kubectl apply`, then what kubelet reports once it runs."""
        await self.kubectl.arun("apply", "-f", "-", stdin=manifest)
        await self.emu.apatch(
            "pods", name, {"status": {"phase": "Running", "podIP": "10.1.0.7"}}, namespace=SHOP
        )
        pod: dict[str, Any] = await self.kubectl.ajson("get", "pod", name)
        return pod

    async def events_on(self, kind: str, name: str, namespace: str) -> list[dict[str, Any]]:
        listed = await self.kubectl.ajson(
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            f"involvedObject.kind={kind},involvedObject.name={name}",
        )
        items: list[dict[str, Any]] = listed["items"]
        return items


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    emu = KubeEmulator()
    await emu.start()
    try:
        await emu.acreate(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": serving.HOME}}
        )
        options = serving.options(emu, tmp_path, webhook_address="127.0.0.1:0")
        async with cli.control_plane(options) as cp:
            # examples/kubernetes/webhook.yaml names the Service shoal:443.
            emu.map_service(serving.HOME, "shoal", 443, f"127.0.0.1:{cp.webhook_port}")
            yield Cluster(emu, cp, Kubectl.for_emulator(emu, tmp_path / "kubectl", SHOP))
    finally:
        await emu.stop()


def _containers(pod: dict[str, Any]) -> list[str]:
    spec = pod["spec"]
    return [c["name"] for c in [*spec.get("initContainers", ()), *spec["containers"]]]


async def test_a_namespace_labelled_without_the_webhook_is_named_until_it_is_installed(
    cluster: Cluster,
) -> None:
    labelled = await cluster.label_for_injection()

    found = await diagnosis.diagnosed(cluster.cp, "SHL0306", f"Namespace {SHOP}", since=labelled)
    assert found["severity"] == "Error"
    assert found["field"] == "metadata.labels[shoal.io/inject]"
    assert "MutatingWebhookConfiguration is not installed" in found["reason"]
    shown = await asyncio.to_thread(diagnosis.analyze_cli, cluster.cp)
    assert shown.returncode == 1, shown.stdout
    assert f"Error [SHL0306] Namespace {SHOP} (metadata.labels[shoal.io/inject])" in shown.stdout

    # Where a Kubernetes user looks: an Event on the Namespace (in
    # "default", as Events on cluster-scoped objects are).
    async def event() -> bool:
        return bool(await cluster.events_on("Namespace", SHOP, "default"))

    await eventually(event)
    [on_namespace] = await cluster.events_on("Namespace", SHOP, "default")
    assert (on_namespace["type"], on_namespace["reason"]) == ("Warning", "InjectionNotInstalled")
    assert on_namespace["message"].startswith("SHL0306 ")
    assert "Fix: Install the webhook" in on_namespace["message"]

    await cluster.install_webhook()
    await diagnosis.cleared(cluster.cp, "SHL0306")
    shown = await asyncio.to_thread(diagnosis.analyze_cli, cluster.cp)
    assert shown.returncode == 0 and "SHL0306" not in shown.stdout, shown.stdout


async def test_a_pod_started_without_its_sidecar_is_named_until_it_is_recreated(
    cluster: Cluster,
) -> None:
    await cluster.label_for_injection()
    started = asyncio.get_running_loop().time()
    web = await cluster.start_pod(WEB, "web")
    await cluster.start_pod(BATCH, "batch")
    # The symptom: the Pod runs its app alone, nothing captures its traffic.
    assert _containers(web) == ["web"]
    assert settings.STATUS_ANNOTATION not in web["metadata"].get("annotations", {})

    found = await diagnosis.diagnosed(cluster.cp, "SHL0305", f"Pod {SHOP}/web", since=started)
    assert found["severity"] == "Warning"
    assert "runs without the shoal-proxy container" in found["reason"]
    assert "no injection webhook is installed (SHL0306)" in found["reason"]
    assert found["fix"].startswith("Install the webhook")
    assert f"kubectl delete pod -n {SHOP} web" in found["fix"]
    everything = await diagnosis.problems(cluster.cp)
    # Left out on purpose: not a problem.
    assert not diagnosis.of_code(everything, "SHL0305", "batch")
    shown = await asyncio.to_thread(diagnosis.analyze_cli, cluster.cp)
    assert f"Warning [SHL0305] Pod {SHOP}/web (spec.initContainers)" in shown.stdout

    async def event() -> bool:
        return bool(await cluster.events_on("Pod", "web", SHOP))

    await eventually(event)
    [on_pod] = await cluster.events_on("Pod", "web", SHOP)
    assert on_pod["involvedObject"]["uid"] == web["metadata"]["uid"]
    assert (on_pod["type"], on_pod["reason"]) == ("Warning", "SidecarMissing")
    # And in the Pod's own description, as `kubectl describe` lists its Events.
    described = await cluster.kubectl.arun("describe", "pod", "web")
    assert "SidecarMissing" in described and "SHL0305" in described, described
    assert not await cluster.events_on("Pod", "batch", SHOP)

    # The fix: the webhook, then the Pod made anew, which gets its sidecar.
    await cluster.install_webhook()
    await cluster.kubectl.arun("delete", "pod", "web", "--wait=false")
    web = await cluster.start_pod(WEB, "web")
    assert _containers(web) == [settings.INIT_CONTAINER, settings.PROXY_CONTAINER, "web"]

    async def seen() -> bool:
        # The mesh has the new Pod (not merely no Pod) when the problem clears.
        now = cluster.cp.registry.state.pods.get((SHOP, "web"))
        return now is not None and now.uid == web["metadata"]["uid"]

    await eventually(seen)
    await diagnosis.cleared(cluster.cp, "SHL0305")
    # The new Pod has no Event of it; the old Pod's stays as history.
    assert [e["involvedObject"]["uid"] for e in await cluster.events_on("Pod", "web", SHOP)] == [
        on_pod["involvedObject"]["uid"]
    ]
