"""SHL0305 SidecarMissing and SHL0306 InjectionNotInstalled: what a Pod's
JSON says of its sidecar (as the API server stores it, and as the
Kubernetes watch trims it), the analyzers on hand-built facts, and whether
every replica knows that the webhook configuration exists."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal import kube
from shoal.injector import bundle, patch, settings
from shoal.model import mesh
from shoal.observe.analysis import facts, injection, run
from shoal.registry import kubernetes, manifests
from tests.e2e.helpers import eventually
from tests.kube import objects
from tests.kube.emulator import KubeEmulator, running_emulator

HOME = "shoal-system"
WEBHOOK_YAML = Path(__file__).resolve().parents[3] / "examples" / "kubernetes" / "webhook.yaml"
LABELLED = {settings.INJECT_LABEL: settings.INJECT_ENABLED}


def _pod(namespace: str = "shop", name: str = "web", **changes: Any) -> dict[str, Any]:
    """A running Pod as a user writes it (no sidecar), status as kubelet reports it."""
    pod = objects.pod(namespace, name)
    pod["metadata"]["uid"] = f"uid-{name}"
    for path, value in changes.items():
        *parents, last = path.split("__")
        at = pod
        for p in parents:
            at = at.setdefault(p, {})
        at[last] = value
    return pod


def _injected(pod: dict[str, Any]) -> dict[str, Any]:
    """The Pod as shoal's webhook would have it stored."""
    done = patch.inject(pod, settings.Settings())
    assert isinstance(done, patch.Injected)
    return done.pod


def _model(pod: dict[str, Any]) -> mesh.Pod:
    obj = manifests.parse_object(pod)
    assert obj is not None
    return manifests.to_pod(obj)


def _watched(pod: dict[str, Any]) -> mesh.Pod:
    """As the Kubernetes registry reads it: trimmed for memory first."""
    pods = next(k for k in kubernetes.KINDS if k.type == manifests.POD)
    return _model(kubernetes.trimmed(pods, pod))


# -- what a Pod says ----------------------------------------------------------------------


def test_the_registry_names_the_sidecar_and_opt_out_as_the_injector_does() -> None:
    assert manifests.SIDECAR_CONTAINER == settings.PROXY_CONTAINER
    assert manifests.INJECT_ANNOTATION == settings.INJECT_ANNOTATION


@pytest.mark.parametrize("read", [_model, _watched], ids=["object", "watched"])
def test_a_pods_sidecar_opt_out_and_phase_are_read(read: Any) -> None:
    plain = read(_pod())
    assert (plain.sidecar, plain.opted_out, plain.finished) == (False, False, False)
    # Injected: the proxy is a native sidecar (an init container).
    assert read(_injected(_pod())).sidecar
    by_hand = _pod(spec__containers=[{"name": "app"}, {"name": settings.PROXY_CONTAINER}])
    assert read(by_hand).sidecar
    opted = _pod(metadata__annotations={settings.INJECT_ANNOTATION: " False "})
    assert read(opted).opted_out
    assert patch.skip_reason(opted, "shop") is not None, "the injector leaves it out too"
    assert not read(_pod(metadata__annotations={settings.INJECT_ANNOTATION: "true"})).opted_out
    on_node = _pod(spec__hostNetwork=True)
    assert read(on_node).opted_out and patch.skip_reason(on_node, "shop") is not None
    for phase, finished in (("Pending", False), ("Running", False), ("Succeeded", True)):
        assert read(_pod(status__phase=phase)).finished is finished
    assert read(_pod(status__phase="Failed")).finished


def test_the_watch_keeps_only_the_names_of_a_pods_containers() -> None:
    pods = next(k for k in kubernetes.KINDS if k.type == manifests.POD)
    kept = kubernetes.trimmed(pods, _injected(_pod()))
    assert kept["spec"]["containers"] == [{"name": "app"}]
    assert kept["spec"]["initContainers"] == [
        {"name": settings.INIT_CONTAINER},
        {"name": settings.PROXY_CONTAINER},
    ]
    assert kept["status"] == {"podIP": "127.0.0.1", "phase": "Running"}


# -- the analyzers ----------------------------------------------------------------------


def _state(*pods: mesh.Pod, labelled: tuple[str, ...] = ("shop",)) -> mesh.MeshState:
    names = {"shop", "outside", "kube-system", *labelled}
    return mesh.MeshState(
        namespaces={
            n: mesh.Namespace(n, labels=mesh.frozen_map(LABELLED if n in labelled else {}))
            for n in names
        },
        pods={(p.namespace, p.name): p for p in pods},
    )


PODS = (
    mesh.Pod("shop", "web", "u1"),
    mesh.Pod("shop", "reviews", "u2", sidecar=True),
    mesh.Pod("shop", "batch", "u3", opted_out=True),
    mesh.Pod("shop", "job-1", "u4", finished=True),
    mesh.Pod("outside", "plain", "u5"),
    mesh.Pod("kube-system", "dns", "u6"),
)


def _found(state: mesh.MeshState, webhook: bool | None) -> list[tuple[str, str]]:
    return [
        (p.code, p.subject)
        for p in injection.analyze(facts.Facts(state, live=True, injection_webhook=webhook))
    ]


def test_without_knowing_of_a_webhook_nothing_is_said() -> None:
    # A manifests folder, `shoal analyze -f`: Pods as written, before any
    # webhook ran.
    assert _found(_state(*PODS, labelled=("shop", "kube-system")), None) == []


def test_a_running_pod_without_a_sidecar_in_a_labelled_namespace_is_named() -> None:
    state = _state(*PODS, labelled=("shop", "kube-system"))
    assert _found(state, True) == [("SHL0305", "Pod shop/web")]
    [missing] = injection.analyze(facts.Facts(state, live=True, injection_webhook=True))
    assert missing.field == "spec.initContainers"
    assert "shoal.io/inject=enabled" in missing.reason and "shoal-proxy" in missing.reason
    assert "created before the label" in missing.reason
    assert "kubectl delete pod -n shop web" in missing.fix
    assert 'shoal.io/inject: "false"' in missing.fix


def test_a_labelled_namespace_without_the_webhook_is_named_with_its_pods() -> None:
    state = _state(*PODS, labelled=("shop", "kube-system"))
    assert _found(state, False) == [("SHL0306", "Namespace shop"), ("SHL0305", "Pod shop/web")]
    namespace, pod = injection.analyze(facts.Facts(state, live=True, injection_webhook=False))
    assert namespace.field == "metadata.labels[shoal.io/inject]"
    assert namespace.reason.endswith("start without a sidecar (1 run without one now)")
    assert "no injection webhook is installed (SHL0306)" in pod.reason
    assert pod.fix.startswith("Install the webhook")
    # A label on an empty namespace still injects nothing.
    assert _found(_state(labelled=("outside",)), False) == [("SHL0306", "Namespace outside")]
    # Another value than `enabled` is not what the webhook selects.
    other = mesh.MeshState(
        namespaces={"shop": mesh.Namespace("shop", mesh.frozen_map({"shoal.io/inject": "yes"}))},
        pods={("shop", "web"): PODS[0]},
    )
    assert _found(other, False) == []


def test_every_analyzer_run_includes_them_once() -> None:
    state = _state(*PODS)
    codes = [
        p.code
        for p in run.analyze(facts.Facts(state, live=True, injection_webhook=False))
        if p.code in ("SHL0305", "SHL0306")
    ]
    assert codes == ["SHL0306", "SHL0305"]  # errors first


# -- whether the webhook configuration exists, on every replica ------------------------


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


async def test_the_keeper_and_the_other_replicas_know_whether_the_webhook_is_installed(
    emu: KubeEmulator, api: kube.Api
) -> None:
    keepers = [
        bundle.CaBundle(api, lambda: b"roots", kube.Lease(api, HOME, bundle.LEASE, r), poll_s=0.05)
        for r in ("replica-a", "replica-b")
    ]
    assert [k.installed for k in keepers] == [None, None]
    tasks = [asyncio.create_task(k.run()) for k in keepers]
    try:

        async def known(value: bool) -> bool:
            return all(k.installed is value for k in keepers)

        await eventually(lambda: known(False))
        assert sum("keeps the caBundle" in k.last for k in keepers) == 1, "one keeper only"
        emu.create(copy.deepcopy(yaml.safe_load(WEBHOOK_YAML.read_text())))
        await eventually(lambda: known(True))
        emu.delete("mutatingwebhookconfigurations", bundle.CONFIGURATION)
        await eventually(lambda: known(False))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
