"""The Kubernetes API emulator, over real HTTP, against the API Concepts rules."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client as http_client
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kube import objects
from tests.kube.emulator import KubeEmulator, running_emulator

JSON = dict[str, Any]
SERVICES = "/api/v1/namespaces/default/services"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/default/leases"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    """An emulator in the test's own event loop."""
    emulator = KubeEmulator(bookmark_interval=0.1)
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()


@pytest.fixture
def threaded() -> Iterator[KubeEmulator]:
    """An emulator in its own thread, for blocking clients."""
    with running_emulator(bookmark_interval=0.1) as emulator:
        yield emulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Stream:
    """The events of one watch response, read line by line."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = 30.0, *, bookmarks: bool = False) -> JSON:
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not line:
                raise EOFError("the watch ended")
            event: JSON = json.loads(line)
            if bookmarks or event["type"] != "BOOKMARK":
                return event

    async def take(self, n: int) -> list[JSON]:
        return [await self.next() for _ in range(n)]

    async def quiet(self, seconds: float = 0.3) -> None:
        """Nothing but bookmarks for a while."""
        with contextlib.suppress(TimeoutError):
            event = await self.next(seconds)
            raise AssertionError(f"unexpected event {event['type']}")


@contextlib.asynccontextmanager
async def watching(
    http: aiohttp.ClientSession, url: str, path: str = SERVICES, **params: str
) -> AsyncIterator[Stream]:
    async with http.get(url + path, params={"watch": "true", **params}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        yield Stream(response)


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    content_type: str = "application/json",
    **params: str,
) -> tuple[int, JSON]:
    data = json.dumps(body) if body is not None else None
    headers = {"Content-Type": content_type}
    async with http.request(method, url, data=data, headers=headers, params=params) as response:
        return response.status, await response.json()


def names(listed: JSON) -> list[str]:
    return [item["metadata"]["name"] for item in listed["items"]]


def summary(events: list[JSON]) -> list[tuple[str, str]]:
    return [(e["type"], e["object"]["metadata"]["name"]) for e in events]


# ----------------------------------------------------------------------- writes


async def test_create_is_201_and_a_duplicate_is_409(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    status, created = await call(
        http, "POST", emu.url + SERVICES, objects.service("default", "web")
    )
    assert status == 201
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert meta["resourceVersion"] == emu.resource_version
    assert created["spec"]["clusterIP"]  # allocated, as the API server does

    status, again = await call(http, "POST", emu.url + SERVICES, objects.service("default", "web"))
    assert status == 409
    assert again["kind"] == "Status" and again["status"] == "Failure"
    assert again["reason"] == "AlreadyExists" and again["code"] == 409
    assert again["message"] == 'services "web" already exists'

    status, missing = await call(http, "GET", emu.url + SERVICES + "/nope")
    assert (status, missing["reason"], missing["details"]["name"]) == (404, "NotFound", "nope")

    # generateName; a namespace that does not exist; a name that is not a DNS label.
    body = objects.service("default", "")
    body["metadata"] = {"generateName": "web-"}
    status, generated = await call(http, "POST", emu.url + SERVICES, body)
    assert status == 201 and generated["metadata"]["name"].startswith("web-")
    status, err = await call(http, "POST", emu.url + "/api/v1/namespaces/nope/services", body)
    assert (status, err["message"]) == (404, 'namespaces "nope" not found')
    status, err = await call(http, "POST", emu.url + SERVICES, objects.service("default", "Web_1"))
    assert (status, err["reason"]) == (422, "Invalid")


async def test_a_stale_put_is_409_conflict(emu: KubeEmulator, http: aiohttp.ClientSession) -> None:
    lease: JSON = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "leader", "namespace": "default"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
    }
    # A Lease may be created by PUT.
    status, first = await call(http, "PUT", emu.url + LEASES + "/leader", lease)
    assert status == 201

    mine = dict(first, spec={**first["spec"], "holderIdentity": "b"})
    status, second = await call(http, "PUT", emu.url + LEASES + "/leader", mine)
    assert status == 200 and second["spec"]["holderIdentity"] == "b"
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])

    # Another replica still holds the first version: it loses.
    theirs = copy.deepcopy(first)
    theirs["spec"]["holderIdentity"] = "c"
    status, err = await call(http, "PUT", emu.url + LEASES + "/leader", theirs)
    assert (status, err["reason"]) == (409, "Conflict")
    assert "the object has been modified" in err["message"]
    assert emu.get("leases", "leader", namespace="default")["spec"]["holderIdentity"] == "b"  # type: ignore[index]

    # Leases refuse unconditional updates; Services take them.
    del theirs["metadata"]["resourceVersion"]
    status, err = await call(http, "PUT", emu.url + LEASES + "/leader", theirs)
    assert (status, err["reason"]) == (422, "Invalid")
    emu.create(objects.service("default", "web"))
    status, _ = await call(
        http, "PUT", emu.url + SERVICES + "/web", objects.service("default", "web")
    )
    assert status == 200
    status, _ = await call(
        http, "PUT", emu.url + SERVICES + "/gone", objects.service("default", "gone")
    )
    assert status == 404

    # A write that changes nothing makes no new version and no event.
    before = emu.resource_version
    status, same = await call(http, "PUT", emu.url + LEASES + "/leader", second)
    assert (
        status == 200
        and same["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]
    )
    assert emu.resource_version == before

    # DELETE: preconditions are checked too, then 200 with the object, then 404.
    stale = {"preconditions": {"resourceVersion": first["metadata"]["resourceVersion"]}}
    status, err = await call(http, "DELETE", emu.url + LEASES + "/leader", stale)
    assert (status, err["reason"]) == (409, "Conflict")
    status, deleted = await call(http, "DELETE", emu.url + LEASES + "/leader")
    assert status == 200 and deleted["metadata"]["name"] == "leader"
    status, _ = await call(http, "DELETE", emu.url + LEASES + "/leader")
    assert status == 404


async def test_merge_patch_of_annotations(emu: KubeEmulator, http: aiohttp.ClientSession) -> None:
    emu.create(objects.service("default", "web", annotations={"keep": "yes", "drop": "me"}))
    url = emu.url + SERVICES + "/web"
    # What `kubectl annotate` sends.
    patch = {"metadata": {"annotations": {"shoal.io/timeout": "2s", "drop": None}}}
    status, patched = await call(http, "PATCH", url, patch, MERGE)
    assert status == 200
    assert patched["metadata"]["annotations"] == {"keep": "yes", "shoal.io/timeout": "2s"}
    assert patched["metadata"]["generation"] == 1  # metadata only

    # Strategic merge patch merges maps the same way.
    patch = {"metadata": {"labels": {"app": "web"}}, "spec": {"selector": {"app": "web"}}}
    status, patched = await call(
        http, "PATCH", url, patch, "application/strategic-merge-patch+json"
    )
    assert status == 200 and patched["metadata"]["labels"] == {"app": "web"}
    assert patched["metadata"]["generation"] == 2  # the spec changed

    # A resourceVersion in the patch makes it conditional.
    patch = {"metadata": {"resourceVersion": "1", "annotations": {"x": "y"}}}
    status, err = await call(http, "PATCH", url, patch, MERGE)
    assert (status, err["reason"]) == (409, "Conflict")
    status, err = await call(http, "PATCH", emu.url + SERVICES + "/nope", {}, MERGE)
    assert status == 404


async def test_json_patch(emu: KubeEmulator, http: aiohttp.ClientSession) -> None:
    emu.create(objects.service("default", "web", ports=[80]))
    url = emu.url + SERVICES + "/web"
    ops = [
        {"op": "add", "path": "/metadata/labels", "value": {"tier": "front"}},
        {"op": "replace", "path": "/spec/ports/0/port", "value": 8080},
    ]
    status, patched = await call(http, "PATCH", url, ops, JSON_PATCH)
    assert status == 200
    assert patched["metadata"]["labels"] == {"tier": "front"}
    assert patched["spec"]["ports"][0]["port"] == 8080

    failing = [{"op": "test", "path": "/spec/ports/0/port", "value": 80}]
    status, err = await call(http, "PATCH", url, failing, JSON_PATCH)
    assert (status, err["kind"]) == (422, "Status")
    status, _ = await call(http, "PATCH", url, {"op": "add"}, JSON_PATCH)
    assert status == 400

    # Custom resources take no strategic merge patch.
    emu.create(objects.traffic_route("default", "web", {"service": "web"}))
    route = emu.url + "/apis/shoal.io/v1alpha1/namespaces/default/trafficroutes/web"
    status, _ = await call(
        http, "PATCH", route, {"spec": {}}, "application/strategic-merge-patch+json"
    )
    assert status == 415
    status, _ = await call(http, "PATCH", route, {"spec": {"service": "api"}}, MERGE)
    assert status == 200


# ----------------------------------------------------------------------- lists


async def test_list_with_label_and_field_selectors(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    emu.create(objects.namespace("other"))
    emu.create(objects.service("default", "a", labels={"app": "web", "tier": "front"}))
    emu.create(objects.service("default", "b", labels={"app": "web", "tier": "back"}))
    emu.create(objects.service("default", "c", labels={"app": "db"}))
    emu.create(objects.service("default", "d"))
    emu.create(objects.service("other", "a", labels={"app": "web", "tier": "front"}))

    async def selected(path: str = SERVICES, **params: str) -> list[str]:
        status, listed = await call(http, "GET", emu.url + path, **params)
        assert status == 200, listed
        return names(listed)

    assert await selected() == ["a", "b", "c", "d"]
    assert await selected(labelSelector="app=web") == ["a", "b"]
    assert await selected(labelSelector="app==web") == ["a", "b"]
    assert await selected(labelSelector="app!=web") == ["c", "d"]
    assert await selected(labelSelector="tier in (front, back)") == ["a", "b"]
    assert await selected(labelSelector="tier notin (front)") == ["b", "c", "d"]
    assert await selected(labelSelector="tier") == ["a", "b"]
    assert await selected(labelSelector="!tier") == ["c", "d"]
    assert await selected(labelSelector="app=web,tier!=back") == ["a"]
    assert await selected(fieldSelector="metadata.name=b") == ["b"]
    assert await selected(fieldSelector="metadata.name!=b,metadata.name!=c") == ["a", "d"]
    everywhere = "/api/v1/services"
    assert await selected(everywhere, fieldSelector="metadata.name==a") == ["a", "a"]
    assert await selected(everywhere, fieldSelector="metadata.namespace=other") == ["a"]
    assert await selected(
        everywhere, labelSelector="app=web", fieldSelector="metadata.namespace!=other"
    ) == ["a", "b"]

    status, listed = await call(http, "GET", emu.url + everywhere)
    assert listed["kind"] == "ServiceList" and listed["apiVersion"] == "v1"
    assert listed["metadata"]["resourceVersion"] == emu.resource_version
    # Items of a built-in list carry no kind/apiVersion, as kube-apiserver's.
    assert "kind" not in listed["items"][0]
    status, err = await call(http, "GET", emu.url + SERVICES, labelSelector="app in web")
    assert (status, err["reason"]) == (400, "BadRequest")
    status, err = await call(http, "GET", emu.url + SERVICES, fieldSelector="spec.foo=bar")
    assert (status, err["message"]) == (400, "field label not supported: spec.foo")
    # The cluster's own namespaces are there, labelled with their names.
    status, listed = await call(
        http, "GET", emu.url + "/api/v1/namespaces", labelSelector="kubernetes.io/metadata.name"
    )
    assert set(names(listed)) == {
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "other",
    }


async def test_pagination_is_a_consistent_snapshot(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    for i in range(5):
        emu.create(objects.service("default", f"s{i}"))
    status, page = await call(http, "GET", emu.url + SERVICES, limit="2")
    rv = page["metadata"]["resourceVersion"]
    assert names(page) == ["s0", "s1"] and page["metadata"]["remainingItemCount"] == 3
    token = page["metadata"]["continue"]

    # Changes after the first page do not show in the next ones.
    emu.create(objects.service("default", "s5"))
    emu.patch("services", "s3", {"metadata": {"labels": {"new": "yes"}}}, namespace="default")
    emu.delete("services", "s4", namespace="default")
    seen = names(page)
    while token:
        status, page = await call(http, "GET", emu.url + SERVICES, limit="2", **{"continue": token})
        assert status == 200 and page["metadata"]["resourceVersion"] == rv
        assert all("labels" not in item["metadata"] for item in page["items"])
        seen += names(page)
        token = page["metadata"].get("continue", "")
    assert seen == ["s0", "s1", "s2", "s3", "s4"]

    # limit with resourceVersion is an exact read at that version.
    status, exact = await call(http, "GET", emu.url + SERVICES, limit="10", resourceVersion=rv)
    assert (
        names(exact) == ["s0", "s1", "s2", "s3", "s4"]
        and exact["metadata"]["resourceVersion"] == rv
    )
    status, page = await call(http, "GET", emu.url + SERVICES, limit="2")
    token = page["metadata"]["continue"]
    # A continue token older than the history is 410 Expired.
    emu.create(objects.service("default", "s6"))
    emu.compact()
    status, err = await call(http, "GET", emu.url + SERVICES, limit="2", **{"continue": token})
    assert (status, err["reason"], err["code"]) == (410, "Expired", 410)
    status, err = await call(http, "GET", emu.url + SERVICES, limit="2", resourceVersion=rv)
    assert status == 410


# ----------------------------------------------------------------------- watches


async def test_a_watch_from_a_lists_version_sees_later_changes_only(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    emu.create(objects.service("default", "a"))
    emu.create(objects.service("default", "b"))
    _, listed = await call(http, "GET", emu.url + SERVICES)
    rv = listed["metadata"]["resourceVersion"]
    emu.create(objects.service("default", "c"))
    emu.patch("services", "a", {"metadata": {"annotations": {"x": "1"}}}, namespace="default")
    emu.delete("services", "b", namespace="default")
    emu.create(objects.pod("default", "p"))  # another kind: not in this watch

    async with watching(http, emu.url, resourceVersion=rv) as stream:
        events = await stream.take(3)
        assert summary(events) == [("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "b")]
        versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert sorted(versions) == versions and versions[0] > int(rv)
        assert events[0]["object"]["kind"] == "Service"  # watch objects carry their kind
        # Live changes follow.
        emu.create(objects.service("default", "d"))
        assert summary([await stream.next()]) == [("ADDED", "d")]
        await stream.quiet()


async def test_a_watch_without_version_starts_with_the_state(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    emu.create(objects.service("default", "a"))
    emu.create(objects.service("default", "b"))
    for rv in ("", "0"):
        async with watching(http, emu.url, resourceVersion=rv) as stream:
            assert summary(await stream.take(2)) == [("ADDED", "a"), ("ADDED", "b")]
            await stream.quiet(0.2)


async def test_resuming_from_mid_stream_gets_exactly_the_missed_events(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    start = emu.resource_version
    for name in ("a", "b", "c", "d"):
        emu.create(objects.service("default", name))
    async with watching(http, emu.url, resourceVersion=start) as stream:
        first = await stream.take(2)
    resume = first[-1]["object"]["metadata"]["resourceVersion"]
    emu.delete("services", "a", namespace="default")  # while disconnected

    async with watching(http, emu.url, resourceVersion=resume) as stream:
        assert summary(await stream.take(3)) == [("ADDED", "c"), ("ADDED", "d"), ("DELETED", "a")]
        await stream.quiet()


async def test_a_compacted_version_is_410_as_a_watch_event(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    _, listed = await call(http, "GET", emu.url + SERVICES)
    old = listed["metadata"]["resourceVersion"]
    emu.create(objects.service("default", "a"))
    point = emu.compact()
    async with watching(http, emu.url, resourceVersion=old) as stream:
        error = await stream.next()
        assert error["type"] == "ERROR"
        status = error["object"]
        assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
        with pytest.raises(EOFError):
            await stream.next()
    # From the compaction point on, nothing was lost.
    async with watching(http, emu.url, resourceVersion=point) as stream:
        emu.create(objects.service("default", "b"))
        assert summary([await stream.next()]) == [("ADDED", "b")]


async def test_a_version_not_reached_yet_waits_then_fails_with_504(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    # Room for the writer below however busy the machine; the 504 is checked
    # with a short wait.
    emu.too_large_wait = 10.0
    now = int(emu.resource_version)

    async def writes() -> None:
        await asyncio.sleep(0.1)
        emu.create(objects.service("default", "a"))  # reaches now + 1: not sent
        emu.create(objects.service("default", "b"))

    writer = asyncio.create_task(writes())
    async with watching(http, emu.url, resourceVersion=str(now + 1)) as stream:
        assert summary(await stream.take(1)) == [("ADDED", "b")]
    await writer
    emu.too_large_wait = 0.3
    async with watching(http, emu.url, resourceVersion=str(now + 100)) as stream:
        error = (await stream.next())["object"]
        assert (error["code"], error["details"]["causes"][0]["reason"]) == (
            504,
            "ResourceVersionTooLarge",
        )
    status, err = await call(http, "GET", emu.url + SERVICES, resourceVersion=str(now + 100))
    assert (status, err["reason"]) == (504, "Timeout")


async def test_the_history_window_is_bounded(http: aiohttp.ClientSession) -> None:
    emu = KubeEmulator(history_limit=3)
    await emu.start()
    try:
        start = emu.resource_version
        for i in range(4):
            emu.create(objects.service("default", f"s{i}"))
        async with watching(http, emu.url, resourceVersion=start) as stream:
            assert (await stream.next())["object"]["code"] == 410
        async with watching(http, emu.url, resourceVersion=str(int(start) + 1)) as stream:
            assert summary(await stream.take(3)) == [
                ("ADDED", "s1"),
                ("ADDED", "s2"),
                ("ADDED", "s3"),
            ]
    finally:
        await emu.stop()


async def test_bookmarks_carry_the_latest_version(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    rv = emu.resource_version
    async with watching(http, emu.url, resourceVersion=rv, allowWatchBookmarks="true") as stream:
        bookmark = await stream.next(bookmarks=True)
        assert bookmark == {
            "type": "BOOKMARK",
            "object": {"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": rv}},
        }
        emu.create(objects.pod("default", "p"))  # progress in another kind
        while (event := await stream.next(bookmarks=True))["object"]["metadata"][
            "resourceVersion"
        ] == rv:
            pass
        assert event["type"] == "BOOKMARK"
        assert event["object"]["metadata"]["resourceVersion"] == emu.resource_version
    async with watching(http, emu.url, resourceVersion=rv) as stream:
        await stream.quiet(0.3)  # not asked for, none sent: quiet() would see them


async def test_timeout_seconds_ends_the_watch_cleanly(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    started = time.monotonic()
    async with watching(http, emu.url, timeoutSeconds="1") as stream:
        # Ended by the server (EOF), not by our own wait running out.
        with pytest.raises(EOFError):
            await stream.next(timeout=30)
    assert time.monotonic() - started > 0.9, "not before the second asked for"


async def test_watch_selectors_turn_matching_changes_into_added_and_deleted(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    emu.create(objects.service("default", "a", labels={"app": "web"}))
    emu.create(objects.service("default", "b", labels={"app": "db"}))
    async with watching(http, emu.url, labelSelector="app=web") as stream:
        assert summary([await stream.next()]) == [("ADDED", "a")]
        emu.patch("services", "a", {"metadata": {"labels": {"app": "api"}}}, namespace="default")
        emu.patch("services", "b", {"metadata": {"labels": {"app": "web"}}}, namespace="default")
        emu.patch("services", "b", {"metadata": {"annotations": {"n": "1"}}}, namespace="default")
        gone, came, changed = await stream.take(3)
        assert summary([gone, came, changed]) == [
            ("DELETED", "a"),
            ("ADDED", "b"),
            ("MODIFIED", "b"),
        ]
        # The last state that matched, at the version of the change.
        assert gone["object"]["metadata"]["labels"] == {"app": "web"}
        assert (
            gone["object"]["metadata"]["resourceVersion"]
            < came["object"]["metadata"]["resourceVersion"]
        )
    # A watch on one object's URL, and the namespaced path limits the namespace.
    emu.create(objects.namespace("other"))
    emu.create(objects.service("other", "b"))
    async with watching(http, emu.url, SERVICES + "/b") as stream:
        assert summary(await stream.take(1)) == [("ADDED", "b")]
        await stream.quiet(0.2)


async def test_deleting_a_namespace_deletes_what_is_in_it(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    emu.create(objects.namespace("shop"))
    emu.create(objects.service("shop", "web"))
    path = "/api/v1/namespaces/shop/services"
    async with watching(http, emu.url, path, resourceVersion=emu.resource_version) as stream:
        status, deleted = await call(http, "DELETE", emu.url + "/api/v1/namespaces/shop")
        assert status == 200 and deleted["kind"] == "Namespace"
        assert summary([await stream.next()]) == [("DELETED", "web")]
    assert emu.list("services", namespace="shop") == []


# ----------------------------------------------------------------------- outages and faults


async def test_pause_refuses_connections_and_resume_keeps_port_and_state(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    emu.create(objects.service("default", "a"))
    emu.create(objects.service("default", "b"))
    port = emu.port
    async with watching(http, emu.url) as stream:
        events = await stream.take(2)
        last = events[-1]["object"]["metadata"]["resourceVersion"]
        await emu.apause()
        # The open watch is cut, not ended cleanly.
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream.next()
    assert emu.open_watches() == 0
    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        await call(http, "GET", emu.url + SERVICES)
    assert isinstance(refused.value.os_error, ConnectionRefusedError)

    # The outage does not stop changes made behind the API server's back.
    emu.delete("services", "a", namespace="default")
    emu.create(objects.service("default", "c"))

    await emu.aresume()
    assert emu.port == port
    _, listed = await call(http, "GET", emu.url + SERVICES)
    assert names(listed) == ["b", "c"]
    async with watching(http, emu.url, resourceVersion=last) as stream:
        assert summary(await stream.take(2)) == [("DELETED", "a"), ("ADDED", "c")]


async def test_pause_with_reset_counts_the_attempts(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    await emu.apause(reset=True)
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
        writer.write(b"GET /api/v1/services HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            assert await reader.read() == b""  # reset or closed: no answer
        writer.close()
    assert emu.dropped_connections == 3
    await emu.aresume()
    status, _ = await call(http, "GET", emu.url + SERVICES)
    assert status == 200


def test_pause_and_resume_from_another_thread(threaded: KubeEmulator) -> None:
    threaded.create(objects.service("default", "a"))
    url = threaded.url + SERVICES
    threaded.pause()
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert isinstance(refused.value.reason, ConnectionRefusedError)
    threaded.delete("services", "a", namespace="default")
    threaded.resume()
    with urllib.request.urlopen(url, timeout=30) as response:
        assert json.loads(response.read())["items"] == []


async def test_requests_are_counted_and_faults_injected(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    emu.clear_requests()
    since = time.monotonic()
    for _ in range(3):
        await call(http, "GET", emu.url + SERVICES)
    await call(http, "GET", emu.url + "/api/v1/pods")
    assert emu.count(verb="list", resource="services", since=since) == 3
    assert emu.count(verb="list") == 4 and emu.count(method="POST") == 0
    record = emu.requests(resource="pods")[0]
    assert (record.path, record.status, record.namespace) == ("/api/v1/pods", 200, None)

    emu.fail_next(2, 503, resource="services", verb="list", retry_after=1)
    for _ in range(2):
        async with http.get(emu.url + SERVICES) as response:
            assert response.status == 503 and response.headers["Retry-After"] == "1"
            assert (await response.json())["reason"] == "ServiceUnavailable"
    status, _ = await call(http, "GET", emu.url + "/api/v1/pods")  # another resource: untouched
    assert status == 200
    status, _ = await call(http, "GET", emu.url + SERVICES)
    assert status == 200
    assert [r.status for r in emu.requests(resource="services") if r.fault] == [503, 503]

    # A watch failed with 410 gets it as kube-apiserver sends it: an event in a 200.
    emu.fail_next(1, 410, verb="watch")
    async with watching(http, emu.url) as stream:
        assert (await stream.next())["object"]["code"] == 410
    # (urllib: aiohttp's client retries an idempotent request on a new connection.)
    emu.reset_next(1, verb="get")
    with pytest.raises((ConnectionError, urllib.error.URLError, http_client.HTTPException)):
        await asyncio.to_thread(urllib.request.urlopen, emu.url + SERVICES + "/a", timeout=30)

    # close_watches() cuts open watches while the server stays up.
    async with watching(http, emu.url) as stream:
        await emu.until(lambda: emu.open_watches("services") == 1)
        assert emu.close_watches() == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream.next()
    assert emu.count(verb="watch") == 2


async def test_discovery(emu: KubeEmulator, http: aiohttp.ClientSession) -> None:
    _, version = await call(http, "GET", emu.url + "/version")
    assert version["major"] == "1"
    _, api = await call(http, "GET", emu.url + "/api")
    assert api["versions"] == ["v1"]
    _, groups = await call(http, "GET", emu.url + "/apis")
    assert "discovery.k8s.io" in {g["name"] for g in groups["groups"]}
    _, resources = await call(http, "GET", emu.url + "/apis/discovery.k8s.io/v1")
    assert [r["name"] for r in resources["resources"]] == ["endpointslices"]
    _, core = await call(http, "GET", emu.url + "/api/v1")
    assert {"namespaces", "services", "pods", "secrets", "events"} <= {
        r["name"] for r in core["resources"]
    }
    status, err = await call(http, "GET", emu.url + "/apis/apps/v1/deployments")
    assert (status, err["reason"]) == (404, "NotFound")


# ----------------------------------------------------------------------- the official client


def test_the_official_kubernetes_client_is_happy(threaded: KubeEmulator, tmp_path: Path) -> None:
    from kubernetes import client, config, watch

    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(threaded.write_kubeconfig(tmp_path / "kubeconfig")),
        client_configuration=configuration,
    )
    assert configuration.host == threaded.url
    with client.ApiClient(configuration) as api:
        core = client.CoreV1Api(api)
        created = core.create_namespaced_service(
            "default", objects.service("default", "web", labels={"app": "web"})
        )
        assert created.metadata.name == "web" and created.spec.ports[0].port == 80
        listed = core.list_service_for_all_namespaces(label_selector="app=web")
        assert [s.metadata.name for s in listed.items] == ["web"]
        rv = listed.metadata.resource_version

        core.patch_namespaced_service("web", "default", {"metadata": {"annotations": {"a": "b"}}})
        core.delete_namespaced_service("web", "default")
        w = watch.Watch()
        seen = []
        for event in w.stream(
            core.list_service_for_all_namespaces,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=5,
        ):
            if event["type"] != "BOOKMARK":
                seen.append((event["type"], event["object"].metadata.name))
            if event["type"] == "DELETED":
                w.stop()
        assert seen == [("MODIFIED", "web"), ("DELETED", "web")]

        # 410 reaches the client as an ApiException it can handle.
        threaded.compact()
        with pytest.raises(client.ApiException) as gone:
            for _ in watch.Watch().stream(
                core.list_namespaced_service, "default", resource_version=rv, timeout_seconds=1
            ):
                pass
        assert gone.value.status == 410

        # Optimistic concurrency on a Lease, as leader election does it.
        leases = client.CoordinationV1Api(api)
        body = {"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}}
        lease = leases.create_namespaced_lease("default", body)
        lease.spec.holder_identity = "b"
        leases.replace_namespaced_lease("leader", "default", lease)
        with pytest.raises(client.ApiException) as conflict:
            leases.replace_namespaced_lease("leader", "default", lease)  # stale version
        assert conflict.value.status == 409

        custom = client.CustomObjectsApi(api)
        custom.create_namespaced_custom_object(
            "shoal.io",
            "v1alpha1",
            "default",
            "trafficroutes",
            objects.traffic_route("default", "web", {"service": "web"}),
        )
        routes = custom.list_cluster_custom_object("shoal.io", "v1alpha1", "trafficroutes")
        assert routes["items"][0]["kind"] == "TrafficRoute"  # unstructured lists keep it


# ----------------------------------------------------------------------- strategic merge patch


def test_strategic_merge_patch_follows_the_schemas_merge_keys() -> None:
    from tests.kube.emulator import strategic_merge_patch

    pod = {
        "metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
        "spec": {
            "containers": [
                {"name": "app", "image": "app:1", "ports": [{"containerPort": 80}]},
                {"name": "side", "image": "side:1", "args": ["--a"]},
            ],
            "volumes": [{"name": "v", "emptyDir": {}}],
        },
    }
    patch = {
        "metadata": {"finalizers": ["b"], "labels": {"x": None, "y": "2"}},
        "spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "app"}],
            "containers": [
                {"name": "app", "image": "app:2"},
                {"name": "side", "args": ["--b"]},
                {"name": "new", "image": "new:1"},
            ],
            "volumes": [{"name": "v", "$patch": "delete"}],
        },
    }
    merged = strategic_merge_patch(pod, patch, {"$ref": "io.k8s.api.core.v1.Pod"})
    # finalizers: a merged primitive list (union); labels: a map.
    assert merged["metadata"] == {"finalizers": ["a", "b"], "labels": {"y": "2"}}
    containers = merged["spec"]["containers"]
    assert [c["name"] for c in containers] == ["side", "app", "new"]
    # Merged by name; each container a map merge; args (no strategy) replaced.
    assert containers[1] == {"name": "app", "image": "app:2", "ports": [{"containerPort": 80}]}
    assert containers[0] == {"name": "side", "image": "side:1", "args": ["--b"]}
    assert merged["spec"]["volumes"] == []
    # $patch: replace, $retainKeys and $deleteFromPrimitiveList.
    replaced = strategic_merge_patch(
        pod,
        {
            "metadata": {"$patch": "replace", "name": "p"},
            "$deleteFromPrimitiveList/x": [1],
            "x": [1, 2],
        },
        {"$ref": "io.k8s.api.core.v1.Pod"},
    )
    assert replaced["metadata"] == {"name": "p"}
    retained = strategic_merge_patch(
        {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}},
        {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}},
        {},
    )
    assert retained == {"strategy": {"type": "Recreate"}}


async def test_strategic_patch_over_http_and_unknown_fields(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    service = objects.service("default", "web", ports=[("http", 80), ("grpc", 90)])
    emu.create(service)
    patch = {"spec": {"ports": [{"port": 90, "name": "grpc2"}, {"port": 100, "name": "x"}]}}
    status, patched = await call(
        http,
        "PATCH",
        emu.url + SERVICES + "/web",
        patch,
        "application/strategic-merge-patch+json",
    )
    assert status == 200
    assert [(p["port"], p["name"]) for p in patched["spec"]["ports"]] == [
        (80, "http"),
        (90, "grpc2"),
        (100, "x"),
    ]
    bad = objects.service("default", "bad")
    bad["spec"]["portz"] = []
    status, body = await call(http, "POST", emu.url + SERVICES, bad, fieldValidation="Strict")
    assert status == 400 and 'unknown field "spec.portz"' in body["message"]
    async with http.post(emu.url + SERVICES, json=bad) as response:
        assert response.status == 201
        assert response.headers.getall("Warning") == ['299 - "unknown field \\"spec.portz\\""']
        assert "portz" not in (await response.json())["spec"]
