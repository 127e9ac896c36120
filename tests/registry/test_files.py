"""The manifests folder: parsing, errors with file/document/reason, last good kept."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from shoal.model import mesh
from shoal.registry import files
from tests import manifests
from tests.conftest import write

WEB = mesh.ServiceKey("default", "web")


def _load(folder: Path) -> files.FolderRegistry:
    registry = files.FolderRegistry(folder)
    registry.load()
    return registry


def test_service_and_endpoint_slices_join_by_label(registry_dir: Path) -> None:
    write(registry_dir, "web.yaml", manifests.service("web"))
    write(registry_dir, "web-eps.yml", manifests.endpoint_slice("web", "web", [9001, 9002]))
    registry = _load(registry_dir)
    state = registry.state
    assert registry.problems == []
    assert state.services[WEB].ports == (mesh.Port(80, "http", mesh.Protocol.HTTP),)
    eps = state.endpoints[WEB]
    assert sorted(e.port for e in eps) == [9001, 9002]
    assert all(e.ready and e.port_name == "http" for e in eps)


def test_multi_document_files_and_nested_folders(registry_dir: Path) -> None:
    (registry_dir / "team").mkdir()
    write(
        registry_dir / "team",
        "all.yaml",
        manifests.service("a", "shop") + "---\n" + manifests.service("b", "shop"),
    )
    state = _load(registry_dir).state
    assert set(state.services) == {mesh.ServiceKey("shop", "a"), mesh.ServiceKey("shop", "b")}


def test_namespace_and_service_account(registry_dir: Path) -> None:
    write(
        registry_dir,
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: x}}\n---\n"
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: cart, namespace: shop}\n",
    )
    state = _load(registry_dir).state
    assert state.namespaces["shop"].labels == {"team": "x"}
    assert ("shop", "cart") in state.service_accounts


def test_pod_gives_endpoints_labels_and_service_account(registry_dir: Path) -> None:
    write(registry_dir, "web.yaml", manifests.service("web"))
    write(
        registry_dir,
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, labels: {version: v2}}\n"
        "spec: {serviceAccountName: web-sa}\n",
    )
    write(
        registry_dir,
        "slice.yaml",
        manifests.endpoint_slice("web", "web", [9001]).replace(
            "conditions:", "targetRef: {kind: Pod, name: web-1}\n    conditions:"
        ),
    )
    (ep,) = _load(registry_dir).state.endpoints[WEB]
    assert ep.labels == {"version": "v2"}
    assert ep.service_account == "web-sa"
    assert ep.pod == "web-1"


def test_a_pod_edit_rejoins_its_endpoints_and_leaves_the_rest_as_they_were(
    registry_dir: Path,
) -> None:
    """Conversions are memoized per object; a changed Pod must still reach
    the endpoints of the unchanged slice that names it."""
    pod = (
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-1, labels: {{version: {v}}}}}\n"
        "spec: {{serviceAccountName: web-sa}}\n"
    )
    write(registry_dir, "web.yaml", manifests.service("web"))
    write(registry_dir, "api.yaml", manifests.service("api"))
    write(registry_dir, "pod.yaml", pod.format(v="v1"))
    write(
        registry_dir,
        "slice.yaml",
        manifests.endpoint_slice("web", "web", [9001]).replace(
            "conditions:", "targetRef: {kind: Pod, name: web-1}\n    conditions:"
        ),
    )
    registry = _load(registry_dir)
    before = registry.state
    write(registry_dir, "pod.yaml", pod.format(v="v2"))
    after = registry.reload({registry_dir / "pod.yaml"})
    (ep,) = after.endpoints[WEB]
    assert ep.labels == {"version": "v2"}
    api = mesh.ServiceKey("default", "api")
    assert after.services[api] is before.services[api], "unchanged objects are not redone"
    (registry_dir / "pod.yaml").unlink()
    (ep,) = registry.reload({registry_dir / "pod.yaml"}).endpoints[WEB]
    assert ep.labels == {} and ep.service_account == "default"


def test_not_ready_endpoints_are_kept_but_marked(registry_dir: Path) -> None:
    write(registry_dir, "web.yaml", manifests.service("web"))
    write(registry_dir, "s.yaml", manifests.endpoint_slice("web", "web", [9001], ready=False))
    (ep,) = _load(registry_dir).state.endpoints[WEB]
    assert not ep.ready


def test_other_kinds_are_ignored_with_a_log_line(
    registry_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(
        registry_dir,
        "deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\n"
        + manifests.service("web"),
    )
    with caplog.at_level(logging.INFO):
        registry = _load(registry_dir)
    assert registry.problems == []
    assert WEB in registry.state.services
    lines = [r.getMessage() for r in caplog.records if "Deployment" in r.getMessage()]
    assert len(lines) == 1 and "deploy.yaml#0" in lines[0]


BROKEN = [
    (
        "bad yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
        "#0",
        "invalid YAML at line",
    ),
    (
        "missing name",
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: default}\n"
        "spec: {ports: [{port: 80}]}\n",
        "#0",
        "missing metadata.name",
    ),
    (
        "port not an integer",
        manifests.service("web").replace("port: 80", "port: eighty"),
        "#0",
        "spec.ports[0].port must be an integer, got 'eighty'",
    ),
    (
        "port out of range",
        manifests.service("web").replace("port: 80", "port: 70000"),
        "#0",
        "spec.ports[0].port 70000 is out of range",
    ),
    (
        "bad name",
        manifests.service("Web_1"),
        "#0",
        "metadata.name 'Web_1' is not a valid DNS name",
    ),
    (
        # Found by fuzzing: Kubernetes' 63-character limit was not applied,
        # and the proxies of such a namespace could never connect.
        "namespace longer than a DNS label",
        manifests.service("web", namespace="a" * 64),
        "#0",
        f"metadata.namespace {'a' * 64!r} is not a valid DNS label",
    ),
    (
        "service name longer than a DNS label",
        manifests.service("w" * 64),
        "#0",
        "is not a valid DNS name",
    ),
    (
        # `$` in a pattern also matches before a final newline.
        "name with a newline",
        manifests.service("web").replace("name: web", 'name: "web\\n"', 1),
        "#0",
        "is not a valid DNS name",
    ),
    (
        "slice without service label",
        manifests.endpoint_slice("web", "web", [9001]).replace(
            "kubernetes.io/service-name: web", "app: web"
        ),
        "#0",
        "missing label kubernetes.io/service-name",
    ),
    (
        "slice address not an IP",
        manifests.endpoint_slice("web", "web", [9001], address="not-an-ip"),
        "#0",
        "'not-an-ip' is not an IPv4",
    ),
    ("not a mapping", "- just\n- a list\n", "#0", "expected a mapping"),
]


@pytest.mark.parametrize(("case", "text", "where", "reason"), BROKEN, ids=[b[0] for b in BROKEN])
def test_errors_name_file_document_and_reason(
    registry_dir: Path, case: str, text: str, where: str, reason: str
) -> None:
    write(registry_dir, "good.yaml", manifests.service("other"))
    write(registry_dir, "broken.yaml", text)
    registry = _load(registry_dir)
    (problem,) = registry.problems
    assert str(problem).startswith("broken.yaml" + where), str(problem)
    assert reason in str(problem)
    # The rest of the folder still applies.
    assert mesh.ServiceKey("default", "other") in registry.state.services


def test_slice_for_unknown_service_is_reported_and_the_rest_applies(registry_dir: Path) -> None:
    write(registry_dir, "web.yaml", manifests.service("web"))
    write(registry_dir, "ghost.yaml", manifests.endpoint_slice("ghost", "ghost", [9001]))
    write(registry_dir, "eps.yaml", manifests.endpoint_slice("web", "web", [9002]))
    registry = _load(registry_dir)
    (problem,) = registry.problems
    assert str(problem) == (
        "ghost.yaml#0: EndpointSlice default/ghost-0: its Service default/ghost does not exist"
    )
    assert [e.port for e in registry.state.endpoints[WEB]] == [9002]


def test_a_broken_edit_keeps_the_files_last_good_objects(registry_dir: Path) -> None:
    write(registry_dir, "web.yaml", manifests.service("web", port=80))
    write(registry_dir, "api.yaml", manifests.service("api", port=80))
    registry = _load(registry_dir)
    # One good change and one broken document in the same file: the file is a unit.
    path = write(
        registry_dir,
        "web.yaml",
        manifests.service("web", port=81)
        + "---\n"
        + manifests.service("web2").replace("port: 80", "port: x"),
    )
    write(registry_dir, "api.yaml", manifests.service("api", port=90))
    state = registry.reload({path, registry_dir / "api.yaml"})
    assert state.services[WEB].ports[0].port == 80
    assert state.services[mesh.ServiceKey("default", "api")].ports[0].port == 90
    assert [str(p) for p in registry.problems] == [
        "web.yaml#1: Service default/web2: spec.ports[0].port must be an integer, got 'x'; "
        "the file's last good version stays in force"
    ]
    # Fixed: applies, and the problem is gone.
    write(registry_dir, "web.yaml", manifests.service("web", port=82))
    state = registry.reload({path})
    assert state.services[WEB].ports[0].port == 82
    assert registry.problems == []


def test_deleting_a_file_removes_its_objects(registry_dir: Path) -> None:
    path = write(registry_dir, "web.yaml", manifests.service("web"))
    registry = _load(registry_dir)
    path.unlink()
    assert WEB not in registry.reload({path}).services


def test_same_object_in_two_files_is_reported(registry_dir: Path) -> None:
    write(registry_dir, "a.yaml", manifests.service("web", port=80))
    write(registry_dir, "b.yaml", manifests.service("web", port=81))
    registry = _load(registry_dir)
    assert registry.state.services[WEB].ports[0].port == 80
    assert [str(p) for p in registry.problems] == [
        "b.yaml#0: Service default/web: also defined in a.yaml#0; that one is used"
    ]


async def test_the_folder_is_watched_and_an_edit_goes_live(
    registry_dir: Path,
) -> None:
    registry = files.FolderRegistry(registry_dir)
    registry.load()
    seen: asyncio.Queue[mesh.MeshState] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(seen.put_nowait, stop))
    try:
        await asyncio.wait_for(registry.armed.wait(), 30)
        write(registry_dir, "web.yaml", manifests.service("web"))
        while True:
            state = await asyncio.wait_for(seen.get(), 30)
            if WEB in state.services:
                break
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_a_file_written_before_the_watcher_is_armed_is_not_missed(
    registry_dir: Path,
) -> None:
    """Between the first load and the moment the watcher is armed, a change
    raises no event: the folder is read again once it is armed."""
    registry = files.FolderRegistry(registry_dir)
    registry.load()
    write(registry_dir, "web.yaml", manifests.service("web"))
    seen: asyncio.Queue[mesh.MeshState] = asyncio.Queue()
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(seen.put_nowait, stop))
    try:
        await asyncio.wait_for(registry.armed.wait(), 30)
        assert WEB in (await asyncio.wait_for(seen.get(), 30)).services
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_arming_the_watcher_pushes_nothing_when_nothing_changed(
    registry_dir: Path,
) -> None:
    write(registry_dir, "web.yaml", manifests.service("web"))
    registry = files.FolderRegistry(registry_dir)
    registry.load()
    seen: list[mesh.MeshState] = []
    stop = asyncio.Event()
    task = asyncio.create_task(registry.watch(seen.append, stop))
    try:
        await asyncio.wait_for(registry.armed.wait(), 30)
        assert seen == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


def test_a_problem_is_logged_when_it_comes_and_when_it_goes_not_on_every_build(
    registry_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    timeout = '\n  annotations:\n    shoal.io/timeout: "{}"'
    bad = write(registry_dir, "web.yaml", manifests.service("web", extra=timeout.format("soon")))
    with caplog.at_level(logging.INFO, logger="shoal.registry.files"):
        registry = _load(registry_dir)
        # Builds for other reasons: a Service comes, then its file is read again.
        other = write(registry_dir, "db.yaml", manifests.service("db"))
        registry.reload({other})
        registry.reload({other})
        assert len(registry.problems) == 1
        said = [r for r in caplog.records if "soon" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.WARNING], said
        assert said[0].getMessage().startswith("manifest error: ")
        write(registry_dir, "web.yaml", manifests.service("web", extra=timeout.format("2s")))
        registry.reload({bad})
    assert registry.problems == []
    said = [r for r in caplog.records if "soon" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.INFO], said
    assert "cleared" in said[1].getMessage()
