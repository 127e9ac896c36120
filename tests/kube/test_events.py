"""Problems as Events on the Kubernetes objects they name
(shoal/registry/events.py), written to the API emulator: one Event per
object and code, bumped rather than repeated, bounded, written by the
replica holding the Lease only; and the emulator's Event validation, which
is kube-apiserver's."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from shoal import kube
from shoal.model import problems
from shoal.registry import events, kubernetes
from tests.e2e.helpers import eventually
from tests.kube import objects
from tests.kube.emulator import KubeEmulator, KubeError, running_emulator

HOME = "shoal-system"
SIDECAR_MISSING = problems.Problem(
    "", "Pod shop/web", "it runs without the shoal-proxy container", "SHL0305", "spec.x"
)
NOT_INSTALLED = problems.Problem(
    "", "Namespace shop", "labelled, no webhook", "SHL0306", "metadata.labels[shoal.io/inject]"
)
# Names no Kubernetes object: no Event.
IN_A_FILE = problems.Problem("mesh/web.yaml", "document 2", "cannot be read", "SHL0001")
OF_A_PROXY = problems.Problem("proxy", "sidecar~shop~web-1", "rejected", "SHL0401")


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with running_emulator() as emulator:
        for name in (HOME, "shop"):
            emulator.create(objects.namespace(name))
        emulator.create(objects.pod("shop", "web"))
        yield emulator


@pytest.fixture
async def api(emu: KubeEmulator, tmp_path: Path) -> AsyncIterator[kube.Api]:
    client = kube.Api(kube.connect(str(emu.write_kubeconfig(tmp_path / "kubeconfig", HOME)), None))
    try:
        yield client
    finally:
        await client.close()


class Clock:
    """The writer's time, moved by the test: no sleeping through gaps."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def __call__(self) -> float:
        return self.t

    def now(self) -> datetime.datetime:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.wall += datetime.timedelta(seconds=seconds)


def _writer(
    api: kube.Api,
    current: list[problems.Problem],
    clock: Clock,
    lease: kube.Lease | None = None,
    **options: Any,
) -> events.ProblemEvents:
    async def found() -> Sequence[problems.Problem]:
        return list(current)

    return events.ProblemEvents(
        api,
        found,
        lease,
        instance="replica-a",
        now=clock.now,
        clock=clock,
        **{"refresh_s": 600.0, "min_gap_s": 60.0, **options},
    )


def _events(emu: KubeEmulator, namespace: str | None = None) -> list[dict[str, Any]]:
    return emu.list("events", namespace=namespace)


def _writes(emu: KubeEmulator) -> int:
    return sum(emu.count(resource="events", method=m) for m in ("POST", "PATCH", "PUT"))


# -- what an Event says, and of what ----------------------------------------------------


def test_a_problems_subject_names_the_object_of_its_event() -> None:
    pod = events.target_of("Pod shop/web")
    assert pod is not None and (pod.kind.kind, pod.namespace, pod.name) == ("Pod", "shop", "web")
    assert pod.event_namespace == "shop"
    namespace = events.target_of("Namespace shop")
    assert namespace is not None and (namespace.namespace, namespace.name) == ("", "shop")
    # An Event on a cluster-scoped object lives in "default", as client-go puts it.
    assert namespace.event_namespace == "default"
    route = events.target_of("HTTPRoute shop/canary")
    assert route is not None and route.kind.api_version == "gateway.networking.k8s.io/v1"
    for kind in kubernetes.KINDS:
        subject = f"{kind.kind} shop/x" if kind.namespaced else f"{kind.kind} x"
        assert events.target_of(subject) is not None, subject
    for subject in (
        "document 2",
        "sidecar~shop~web-1",
        "Service web",  # namespaced without a namespace
        "Namespace a/b",
        "Pod shop/web/extra",
        "Deployment shop/web",
        "Service shop/web (port 80)",
        "file",
    ):
        assert events.target_of(subject) is None, subject


def test_the_message_has_the_code_reason_field_and_fix_within_the_limit() -> None:
    text = events.message([SIDECAR_MISSING])
    assert text == (
        f"SHL0305 it runs without the shoal-proxy container (spec.x). Fix: "
        f"{problems.BY_ID['SHL0305'].fix}"
    )
    second = problems.Problem("", "Pod shop/web", "another", "SHL0305", fix="Do this.")
    both = events.message([second, SIDECAR_MISSING])
    assert both.startswith("SHL0305 another. Fix: Do this.")
    assert both.endswith(" (and 1 more SHL0305 on it: shoal analyze)")
    # First in order (severity, code, object, reason), and too long: cut,
    # within the limit in bytes, as the API server counts.
    long = problems.Problem("", "Pod shop/web", "0" + "ä" * 5000, "SHL0305")
    clipped = events.message([long, second])
    assert clipped.startswith("SHL0305 0ää")
    assert len(clipped.encode()) <= events.MESSAGE_LIMIT and clipped.endswith(
        "… (and 1 more SHL0305 on it: shoal analyze)"
    )


def test_the_event_name_is_the_same_for_the_same_problem_and_a_valid_name() -> None:
    pod = events.target_of("Pod shop/web")
    assert pod is not None
    name = events.event_name(pod, "uid-1", "SHL0305")
    assert name == events.event_name(pod, "uid-1", "SHL0305")
    assert name.startswith("web.")
    others = {
        events.event_name(pod, "uid-2", "SHL0305"),  # the Pod made anew
        events.event_name(pod, "uid-1", "SHL0301"),
    }
    assert name not in others and len(others) == 2
    longest = events.target_of(f"Pod shop/{'a' * 250}-{'b' * 2}")
    assert longest is not None
    cut = events.event_name(longest, "u", "SHL0305")
    assert len(cut) <= 253 and cut.split(".")[0][-1].isalnum()


# -- writing them -----------------------------------------------------------------------


async def test_each_problem_on_an_object_gets_one_warning_event_once(
    emu: KubeEmulator, api: kube.Api
) -> None:
    clock = Clock()
    current = [SIDECAR_MISSING, NOT_INSTALLED, IN_A_FILE, OF_A_PROXY]
    writer = _writer(api, current, clock)
    assert await writer.sync() == 2
    [on_pod] = _events(emu, "shop")
    pod = emu.get("pods", "web", namespace="shop")
    assert pod is not None
    assert on_pod["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "shop",
        "name": "web",
        "uid": pod["metadata"]["uid"],
    }
    assert (on_pod["type"], on_pod["reason"], on_pod["count"]) == ("Warning", "SidecarMissing", 1)
    assert on_pod["message"] == events.message([SIDECAR_MISSING])
    assert on_pod["source"] == {"component": "shoal"}
    assert on_pod["reportingInstance"] == "replica-a"
    assert on_pod["firstTimestamp"] == on_pod["lastTimestamp"] == "2026-01-01T00:00:00Z"
    [on_namespace] = _events(emu, "default")
    assert on_namespace["involvedObject"]["kind"] == "Namespace"
    assert "namespace" not in on_namespace["involvedObject"]
    assert on_namespace["reason"] == "InjectionNotInstalled"

    # Nothing new: nothing written, however often it is asked.
    emu.clear_requests()
    clock.advance(120)
    for _ in range(3):
        await writer.sync()
    assert _writes(emu) == 0


async def test_a_problem_that_comes_back_bumps_its_event_at_most_every_gap(
    emu: KubeEmulator, api: kube.Api
) -> None:
    clock = Clock()
    current = [SIDECAR_MISSING]
    writer = _writer(api, current, clock)
    await writer.sync()
    [first] = _events(emu, "shop")

    # Gone, back within the gap: the bump waits for the gap.
    current.clear()
    await writer.sync()
    current.append(SIDECAR_MISSING)
    clock.advance(10)
    await writer.sync()
    assert _events(emu, "shop")[0]["count"] == 1
    clock.advance(50)
    await writer.sync()
    [again] = _events(emu, "shop")
    assert again["metadata"]["name"] == first["metadata"]["name"], "the same Event"
    assert (again["count"], again["firstTimestamp"]) == (2, first["firstTimestamp"])
    assert again["lastTimestamp"] == "2026-01-01T00:01:00Z"

    # A new reason is news too.
    current[0] = problems.Problem("", "Pod shop/web", "another reason", "SHL0305")
    clock.advance(60)
    await writer.sync()
    [changed] = _events(emu, "shop")
    assert changed["count"] == 3 and changed["message"].startswith("SHL0305 another reason.")

    # Still there: renewed before the API server's TTL would take it, its
    # count unchanged.
    emu.clear_requests()
    clock.advance(599)
    await writer.sync()
    assert _writes(emu) == 0
    clock.advance(1)
    await writer.sync()
    [renewed] = _events(emu, "shop")
    assert renewed["count"] == 3 and renewed["lastTimestamp"] == "2026-01-01T00:12:00Z"
    assert len(_events(emu)) == 1


async def test_a_round_looks_at_a_bounded_number_of_objects(
    emu: KubeEmulator, api: kube.Api
) -> None:
    for i in range(7):
        emu.create(objects.service("shop", f"svc-{i}"))
    current = [
        problems.Problem("", f"Service shop/svc-{i}", "no endpoint is ready", "SHL0201")
        for i in range(7)
    ]
    writer = _writer(api, current, Clock(), max_per_round=3)
    assert [await writer.sync() for _ in range(4)] == [3, 3, 1, 0]
    assert len(_events(emu, "shop")) == 7


async def test_an_object_gone_or_made_anew_is_never_confused_with_the_old_one(
    emu: KubeEmulator, api: kube.Api
) -> None:
    clock = Clock()
    gone = problems.Problem("", "Service shop/gone", "no endpoint is ready", "SHL0201")
    current = [SIDECAR_MISSING, gone]
    writer = _writer(api, current, clock)
    await writer.sync()
    assert [e["involvedObject"]["name"] for e in _events(emu)] == ["web"]

    old_uid = _events(emu, "shop")[0]["involvedObject"]["uid"]
    emu.delete("pods", "web", namespace="shop")
    emu.create(objects.pod("shop", "web"))
    current.clear()
    await writer.sync()
    current.append(SIDECAR_MISSING)
    clock.advance(60)
    await writer.sync()
    by_uid = {e["involvedObject"]["uid"]: e for e in _events(emu, "shop")}
    assert len(by_uid) == 2 and by_uid[old_uid]["count"] == 1
    [new] = [e for uid, e in by_uid.items() if uid != old_uid]
    assert new["count"] == 1


async def test_another_replica_carries_on_the_events_written_before(
    emu: KubeEmulator, api: kube.Api
) -> None:
    clock = Clock()
    await _writer(api, [SIDECAR_MISSING, NOT_INSTALLED], clock).sync()
    emu.clear_requests()
    # A replica that takes over (or this one, restarted) soon after: the
    # Events are current, nothing is written.
    clock.advance(30)
    successor = _writer(api, [SIDECAR_MISSING, NOT_INSTALLED], clock)
    await successor.sync()
    assert _writes(emu) == 0
    # Another reason for one of them: that one is bumped, not written anew.
    changed = problems.Problem("", "Namespace shop", "changed", "SHL0306")
    clock.advance(30)
    await _writer(api, [SIDECAR_MISSING, changed], clock).sync()
    assert _writes(emu) == 1
    [on_namespace] = _events(emu, "default")
    assert on_namespace["count"] == 2 and on_namespace["message"].startswith("SHL0306 changed.")
    assert len(_events(emu)) == 2


async def test_only_the_lease_holder_writes_and_a_failed_analysis_is_survived(
    emu: KubeEmulator, api: kube.Api
) -> None:
    failing = [True]

    async def found() -> Sequence[problems.Problem]:
        if failing[0]:
            raise RuntimeError("an analyzer's bug")
        return [SIDECAR_MISSING]

    def writer(name: str) -> events.ProblemEvents:
        return events.ProblemEvents(
            api,
            found,
            kube.Lease(api, HOME, events.LEASE, name),
            instance=name,
            poll_s=0.05,
        )

    # The first takes the Lease before the second looks.
    assert await kube.Lease(api, HOME, events.LEASE, "replica-a").acquire() is None
    writers = [writer("replica-a"), writer("replica-b")]
    tasks = [asyncio.create_task(w.run()) for w in writers]
    try:

        async def failed() -> bool:
            return "an analyzer's bug" in writers[0].last

        await eventually(failed)
        failing[0] = False

        async def written() -> bool:
            return len(_events(emu, "shop")) == 1 and "replica-a writes" in writers[1].last

        await eventually(written)
        assert _events(emu, "shop")[0]["reportingInstance"] == "replica-a"
        assert writers[0].last == "problems' Events are current"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- the emulator validates Events as kube-apiserver does -------------------------------


def _event(namespace: str, involved: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "e", "namespace": namespace},
        "involvedObject": involved,
        "reason": "Test",
        "message": "m",
        **extra,
    }


def test_an_event_is_in_its_objects_namespace(emu: KubeEmulator) -> None:
    pod = {"kind": "Pod", "namespace": "shop", "name": "web"}
    with pytest.raises(KubeError) as refused:
        emu.create(_event(HOME, pod))
    assert refused.value.code == 422
    assert "involvedObject.namespace" in str(refused.value)
    emu.create(_event("shop", pod))
    cluster_scoped = {"kind": "Namespace", "name": "shop"}
    with pytest.raises(KubeError):
        emu.create(_event("shop", cluster_scoped))
    emu.create(_event("default", cluster_scoped))
    # Patched to another object's namespace: refused as well.
    with pytest.raises(KubeError):
        emu.patch("events", "e", {"involvedObject": {"namespace": HOME}}, namespace="shop")


def test_an_event_with_event_time_names_its_reporter(emu: KubeEmulator) -> None:
    pod = {"kind": "Pod", "namespace": "shop", "name": "web"}
    new_style = {"eventTime": "2026-01-01T00:00:00.000000Z", "action": "Check"}
    with pytest.raises(KubeError) as refused:
        emu.create(_event("shop", pod, **new_style))
    assert "reportingComponent" in str(refused.value)
    reporter = {"reportingComponent": "shoal", "reportingInstance": "replica-a"}
    with pytest.raises(KubeError) as refused:
        emu.create(_event("shop", pod, **new_style, **reporter, message="x" * 1025))
    assert "message" in str(refused.value)
    emu.create(_event("shop", pod, **new_style, **reporter))
