"""shoal.kube against the API emulator over real HTTP: refusals raised as
classes by status, lists in pages, watch ERROR events, and the Secrets and
Leases shoal writes, as the server keeps them."""

from __future__ import annotations

import asyncio
import base64
import datetime
from collections.abc import AsyncIterator, Callable

import pytest

from shoal import kube
from tests.kube import objects
from tests.kube.emulator import KubeEmulator

HOME = "shoal-system"
TOKEN = "t0ken"
SECRETS = kube.resource_path("v1", "secrets", HOME)
CA_SECRET = kube.resource_path("v1", "secrets", HOME, "shoal-ca")


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    emulator = KubeEmulator(bookmark_interval=0.1, token=TOKEN)
    await emulator.start()
    try:
        emulator.create(objects.namespace(HOME))
        yield emulator
    finally:
        await emulator.stop()


def _api(emu: KubeEmulator, token: str = TOKEN) -> kube.Api:
    return kube.Api(
        kube.ApiServer(emu.url, False, lambda: f"Bearer {token}", HOME),
        kube.Backoff(initial=0.05, maximum=0.5),
    )


@pytest.fixture
async def api(emu: KubeEmulator) -> AsyncIterator[kube.Api]:
    client = _api(emu)
    try:
        yield client
    finally:
        await client.close()


def _secret(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": HOME},
        "data": {"k": base64.b64encode(name.encode()).decode()},
    }


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "error"),
    [
        (401, "Unauthorized", kube.Unauthorized),
        (403, "Forbidden", kube.Forbidden),
        (404, "NotFound", kube.NotFound),
        (409, "Conflict", kube.Conflict),
        (410, "Expired", kube.Gone),
        (422, "Invalid", kube.Invalid),
        (429, "TooManyRequests", kube.TooManyRequests),
        (500, "InternalError", kube.ServerError),
        (503, "ServiceUnavailable", kube.ServerError),
        (504, "Timeout", kube.ServerError),
    ],
)
async def test_a_refusal_is_raised_as_the_class_of_its_status(
    emu: KubeEmulator, api: kube.Api, status: int, reason: str, error: type[kube.ApiError]
) -> None:
    emu.fail_next(status=status, resource="secrets", verb="get", message="injected")
    with pytest.raises(error) as raised:
        await api.call("GET", CA_SECRET)
    err = raised.value
    assert (err.code, err.reason, err.message) == (status, reason, "injected")
    assert str(err) == f"{status} {reason}: injected"
    others = {kube.NotFound, kube.Conflict, kube.Gone, kube.ServerError} - {error}
    assert not isinstance(err, tuple(others))


async def test_the_servers_own_refusals(emu: KubeEmulator, api: kube.Api) -> None:
    with pytest.raises(kube.NotFound):
        await api.call("GET", CA_SECRET)
    await api.call("POST", SECRETS, body=_secret("shoal-ca"))
    with pytest.raises(kube.Conflict) as exists:
        await api.call("POST", SECRETS, body=_secret("shoal-ca"))
    assert exists.value.reason == "AlreadyExists"
    found = await api.call("GET", CA_SECRET)
    await api.call("PUT", CA_SECRET, body={**found, "data": {"k": "Mg=="}})
    with pytest.raises(kube.Conflict) as stale:
        await api.call("PUT", CA_SECRET, body={**found, "data": {"k": "Mw=="}})
    assert stale.value.reason == "Conflict"
    with pytest.raises(kube.Invalid) as invalid:
        await api.call("POST", SECRETS, body=_secret("Not_A_Name"))
    assert "metadata.name" in invalid.value.message
    stranger = _api(emu, token="not-the-token")
    try:
        with pytest.raises(kube.Unauthorized):
            await stranger.call("GET", CA_SECRET)
    finally:
        await stranger.close()


async def test_statuses_without_a_class_are_plain_api_errors(api: kube.Api) -> None:
    # A namespaced kind cannot be created across namespaces: 405.
    with pytest.raises(kube.ApiError) as refused:
        await api.call("POST", kube.resource_path("v1", "secrets"), body=_secret("x"))
    assert type(refused.value) is kube.ApiError and refused.value.code == 405
    with pytest.raises(kube.ApiError) as bad:
        await api.call("GET", SECRETS, params={"limit": "1", "continue": "garbage"})
    assert type(bad.value) is kube.ApiError and bad.value.code == 400


def test_a_body_that_is_no_status_still_names_the_refusal() -> None:
    # A proxy in front of the API server may answer in HTML.
    err = kube.errors.from_status("<html>bad gateway</html>", code=502, reason="Bad Gateway")
    assert isinstance(err, kube.ServerError) and (err.code, err.reason) == (502, "Bad Gateway")
    # A watch ERROR event whose object lacks a code.
    assert type(kube.errors.from_status({"message": "?"})) is kube.ServerError


# -- lists and watches ---------------------------------------------------------------


async def test_a_list_comes_in_pages(emu: KubeEmulator, api: kube.Api) -> None:
    for i in range(5):
        emu.create(_secret(f"s{i}"))
    emu.clear_requests()
    pages = [page async for page in api.pages(SECRETS, 2)]
    assert [len(p.get("items") or ()) for p in pages] == [2, 2, 1]
    names = [i["metadata"]["name"] for p in pages for i in p.get("items") or ()]
    assert names == [f"s{i}" for i in range(5)]
    last = pages[-1].get("metadata") or {}
    assert "continue" not in last and last.get("resourceVersion") == emu.resource_version
    assert emu.count(verb="list") == 3


async def test_a_continue_token_older_than_the_history_is_gone(
    emu: KubeEmulator, api: kube.Api
) -> None:
    for i in range(3):
        emu.create(_secret(f"s{i}"))
    pages = api.pages(SECRETS, 2)
    try:
        await anext(pages)
        emu.create(_secret("later"))
        emu.compact()
        with pytest.raises(kube.Gone):
            await anext(pages)
    finally:
        await pages.aclose()


async def test_a_watch_error_event_is_raised_as_the_class_of_its_status(
    emu: KubeEmulator, api: kube.Api
) -> None:
    listed = await api.call("GET", SECRETS)
    old = listed["metadata"]["resourceVersion"]
    emu.create(_secret("a"))
    emu.compact()
    # The 410 comes inside an HTTP 200, as an ERROR event.
    with pytest.raises(kube.Gone) as raised:
        async for _ in api.watch(SECRETS, {"resourceVersion": old}, 30):
            pass
    assert raised.value.reason == "Expired"
    events: list[kube.bodies.WatchEvent] = []
    emu.fail_next(status=500, resource="secrets", verb="watch")
    with pytest.raises(kube.ServerError):
        async for event in api.watch(SECRETS, {"resourceVersion": old}, 30):
            events.append(event)
    assert events == []


async def test_watch_events_carry_their_objects(emu: KubeEmulator, api: kube.Api) -> None:
    listed = await api.call("GET", SECRETS)
    params = {"resourceVersion": listed["metadata"]["resourceVersion"], "timeoutSeconds": "5"}
    emu.create(_secret("a"))
    emu.delete("secrets", "a", namespace=HOME)
    seen: list[tuple[str, str | None]] = []
    async for event in api.watch(SECRETS, params, 30):
        seen.append((event["type"], event["object"]["metadata"].get("name")))
        if len(seen) == 2:
            break
    assert seen == [("ADDED", "a"), ("DELETED", "a")]


# -- Secrets --------------------------------------------------------------------------


async def test_replicas_starting_together_share_one_secret(
    emu: KubeEmulator, api: kube.Api
) -> None:
    def maker(replica: int) -> Callable[[], dict[str, bytes]]:
        return lambda: {"root": f"replica-{replica}".encode()}

    results = await asyncio.gather(
        *(kube.shared_secret(api, HOME, "shoal-ca", maker(i)) for i in range(3))
    )
    assert sum(created for _, created in results) == 1
    (winner,) = [data for data, created in results if created]
    assert all(data == winner for data, _ in results)
    stored = emu.get("secrets", "shoal-ca", namespace=HOME)
    assert stored is not None
    assert stored["type"] == "kubernetes.io/tls"
    assert stored["metadata"]["labels"] == {"app": "shoal"}
    assert base64.b64decode(stored["data"]["root"]) == winner["root"]


async def test_a_secret_is_replaced_only_from_the_version_read(api: kube.Api) -> None:
    await kube.shared_secret(api, HOME, "shoal-ca", lambda: {"root": b"one"})
    data, version = await kube.read_secret(api, HOME, "shoal-ca")
    assert data == {"root": b"one"} and version
    written = await kube.replace_secret(api, HOME, "shoal-ca", {"root": b"two"}, version)
    assert written and written != version
    with pytest.raises(kube.Conflict):
        await kube.replace_secret(api, HOME, "shoal-ca", {"root": b"three"}, version)
    assert await kube.read_secret(api, HOME, "shoal-ca") == ({"root": b"two"}, written)


# -- Leases ---------------------------------------------------------------------------


async def test_a_lease_is_held_by_one_replica_until_released_or_expired(
    emu: KubeEmulator, api: kube.Api
) -> None:
    clock = [datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)]

    def lease(holder: str) -> kube.Lease:
        return kube.Lease(api, HOME, "shoal-leader", holder, duration_s=30, now=lambda: clock[0])

    a, b = lease("a"), lease("b")

    def spec() -> dict[str, object]:
        stored = emu.get("leases", "shoal-leader", namespace=HOME)
        assert stored is not None
        found: dict[str, object] = stored["spec"]
        return found

    # Both try at once; the API server lets one create it, and the other
    # is told who holds it.
    taken = await asyncio.gather(a.acquire(), b.acquire())
    first, second = (a, b) if taken[0] is None else (b, a)
    assert list(taken) == ([None, "a"] if first is a else ["b", None])
    assert spec()["holderIdentity"] == first.holder
    # The whole spec is written, as bodies.LeaseSpec says it.
    assert set(spec()) == set(kube.bodies.LeaseSpec.__annotations__)
    assert await second.acquire() == first.holder
    clock[0] += datetime.timedelta(seconds=20)
    assert await first.acquire() is None, "renewed by its holder"
    clock[0] += datetime.timedelta(seconds=20)
    assert await second.acquire() == first.holder, "renewed 20 s ago: not expired"
    await first.release()
    assert spec()["holderIdentity"] is None
    assert await second.acquire() is None
    assert (spec()["holderIdentity"], spec()["leaseTransitions"]) == (second.holder, 1)
    clock[0] += datetime.timedelta(seconds=31)
    assert await first.acquire() is None, "expired: taken over"
    assert (spec()["holderIdentity"], spec()["leaseTransitions"]) == (first.holder, 2)
    await second.release()
    assert spec()["holderIdentity"] == first.holder, "only its holder lets it go"
