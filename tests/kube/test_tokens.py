"""TokenRequest and TokenReview in the emulator, over real HTTP: signed,
audience-bound, expiring, Pod-bound service-account tokens, checked as
kube-apiserver checks them."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from tests.kube import objects
from tests.kube.emulator import (
    DEFAULT_ISSUER,
    POD_NAME_EXTRA,
    POD_UID_EXTRA,
    TOKEN_LEEWAY,
    KubeEmulator,
)

JSON = dict[str, Any]
NS = "shop"
REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


class Clock:
    """Time that moves only when the test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def emu(clock: Clock) -> AsyncIterator[KubeEmulator]:
    emulator = KubeEmulator(bookmark_interval=0.1, clock=clock)
    await emulator.start()
    try:
        emulator.create(objects.namespace(NS))
        emulator.create(objects.service_account(NS, "web"))
        emulator.create(objects.pod(NS, "web-1", service_account="web"))
        yield emulator
    finally:
        await emulator.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, token: str = ""
) -> tuple[int, JSON]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, json=body, headers=headers) as response:
        return response.status, await response.json()


def token_path(account: str, namespace: str = NS) -> str:
    return f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"


def request(
    audiences: list[str] | None = None, seconds: int | None = 3600, pod: JSON | None = None
) -> JSON:
    spec: JSON = {}
    if audiences is not None:
        spec["audiences"] = audiences
    if seconds is not None:
        spec["expirationSeconds"] = seconds
    if pod is not None:
        spec["boundObjectRef"] = pod
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}


def review(token: str, audiences: list[str] | None = None) -> JSON:
    spec: JSON = {"token": token}
    if audiences is not None:
        spec["audiences"] = audiences
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}


def claims_of(token: str) -> JSON:
    payload = token.split(".")[1]
    decoded: JSON = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return decoded


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def pod_ref(emu: KubeEmulator, name: str = "web-1") -> JSON:
    pod = emu.get("pods", name, namespace=NS)
    assert pod is not None
    return {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": pod["metadata"]["uid"]}


# ----------------------------------------------------------------------- TokenRequest


async def test_a_token_request_bound_to_a_pod_is_a_signed_jwt_with_kubes_claims(
    emu: KubeEmulator, http: aiohttp.ClientSession, clock: Clock
) -> None:
    ref = pod_ref(emu)
    status, answer = await call(
        http, "POST", emu.url + token_path("web"), request(["shoal"], 3600, ref)
    )
    assert status == 201, answer
    assert answer["kind"] == "TokenRequest"
    assert answer["spec"]["boundObjectRef"] == ref
    token = answer["status"]["token"]
    claims = claims_of(token)
    account = emu.get("serviceaccounts", "web", namespace=NS)
    assert account is not None
    assert claims["iss"] == DEFAULT_ISSUER
    assert claims["sub"] == "system:serviceaccount:shop:web"
    assert claims["aud"] == ["shoal"]
    assert claims["iat"] == claims["nbf"] == int(clock.now)
    assert claims["exp"] == int(clock.now) + 3600
    assert claims["kubernetes.io"] == {
        "namespace": NS,
        "serviceaccount": {"name": "web", "uid": account["metadata"]["uid"]},
        "pod": {"name": "web-1", "uid": ref["uid"]},
    }
    assert answer["status"]["expirationTimestamp"] == "2027-01-15T09:00:00Z"

    # The signature verifies with the key the issuer publishes (JWKS), as an
    # OIDC relying party would check it.
    _, jwks = await call(http, "GET", emu.url + "/openid/v1/jwks")
    _, oidc = await call(http, "GET", emu.url + "/.well-known/openid-configuration")
    assert oidc["issuer"] == DEFAULT_ISSUER and oidc["jwks_uri"].endswith("/openid/v1/jwks")
    (key,) = jwks["keys"]
    header = json.loads(unb64(token.split(".")[0]))
    assert header == {"alg": "ES256", "kid": key["kid"]}
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(unb64(key["x"]), "big"),
        int.from_bytes(unb64(key["y"]), "big"),
        ec.SECP256R1(),
    ).public_key()
    signature = unb64(token.split(".")[2])
    der = utils.encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    signed = token.rsplit(".", 1)[0].encode()
    public.verify(der, signed, ec.ECDSA(hashes.SHA256()))


async def test_token_request_defaults_and_refusals(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    # No audiences: the API server's own (the issuer); no expiry: an hour.
    status, answer = await call(http, "POST", emu.url + token_path("web"), request(None, None))
    assert status == 201
    assert answer["spec"] == {"audiences": [DEFAULT_ISSUER], "expirationSeconds": 3600}
    assert "pod" not in claims_of(answer["status"]["token"])["kubernetes.io"]

    refusals = [
        (token_path("nobody"), request(["shoal"]), 404, "NotFound"),
        (token_path("web"), request(["shoal"], 60), 422, "Invalid"),
        (token_path("web"), request(["shoal"], 2**33), 422, "Invalid"),
        (
            token_path("web"),
            request(["shoal"], pod={"kind": "Pod", "apiVersion": "v1", "name": "gone"}),
            404,
            "NotFound",
        ),
        (
            token_path("web"),
            request(["shoal"], pod={**pod_ref(emu), "uid": "0000"}),
            409,
            "Conflict",
        ),
        (
            token_path("web"),
            request(["shoal"], pod={"kind": "Secret", "apiVersion": "v1", "name": "x"}),
            400,
            "BadRequest",
        ),
    ]
    for path, body, code, reason in refusals:
        status, answer = await call(http, "POST", emu.url + path, body)
        assert (status, answer["reason"]) == (code, reason), (path, body, answer)
    assert (
        "less than 10 minutes"
        in (await call(http, "POST", emu.url + token_path("web"), request(["shoal"], 60)))[1][
            "message"
        ]
    )

    # A token for one service account cannot be bound to another's Pod.
    emu.create(objects.service_account(NS, "other"))
    status, answer = await call(
        http, "POST", emu.url + token_path("other"), request(["shoal"], pod=pod_ref(emu))
    )
    assert status == 400 and "different serviceaccount" in answer["message"]
    # The subresource is create-only.
    status, answer = await call(http, "GET", emu.url + token_path("web"))
    assert status == 405


# ----------------------------------------------------------------------- TokenReview


async def test_a_review_of_a_pod_bound_token_names_the_pod(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    token = emu.token_for_pod(NS, "web-1", audience="shoal")
    status, answer = await call(http, "POST", emu.url + REVIEWS, review(token, ["shoal"]))
    assert status == 201, answer
    assert answer["kind"] == "TokenReview"
    result = answer["status"]
    account = emu.get("serviceaccounts", "web", namespace=NS)
    pod = emu.get("pods", "web-1", namespace=NS)
    assert account is not None and pod is not None
    assert result["authenticated"] is True
    assert result["audiences"] == ["shoal"]
    user = result["user"]
    assert user["username"] == "system:serviceaccount:shop:web"
    assert user["uid"] == account["metadata"]["uid"]
    assert user["groups"] == [
        "system:serviceaccounts",
        "system:serviceaccounts:shop",
        "system:authenticated",
    ]
    assert user["extra"][POD_NAME_EXTRA] == ["web-1"]
    assert user["extra"][POD_UID_EXTRA] == [pod["metadata"]["uid"]]
    assert user["extra"]["authentication.kubernetes.io/credential-id"][0].startswith("JTI=")


async def test_audiences_must_intersect(emu: KubeEmulator, http: aiohttp.ClientSession) -> None:
    token = emu.mint_token(NS, "web", audiences=("shoal", "vault"), pod="web-1")
    for wanted, good in (
        (["vault", "other"], ["vault"]),
        (["shoal", "vault"], ["shoal", "vault"]),
    ):
        _, answer = await call(http, "POST", emu.url + REVIEWS, review(token, wanted))
        assert answer["status"]["audiences"] == good
    _, answer = await call(http, "POST", emu.url + REVIEWS, review(token, ["kafka"]))
    result = answer["status"]
    # A failed review has no "authenticated" field (Go's omitempty), an empty user.
    assert "authenticated" not in result and result["user"] == {}
    assert 'token audiences ["shoal" "vault"] is invalid' in result["error"]
    # No audiences in the review: the API server's own, which this token lacks.
    _, answer = await call(http, "POST", emu.url + REVIEWS, review(token))
    assert "authenticated" not in answer["status"]
    api_token = emu.mint_token(NS, "web", audiences=(DEFAULT_ISSUER,))
    _, answer = await call(http, "POST", emu.url + REVIEWS, review(api_token))
    assert answer["status"]["audiences"] == [DEFAULT_ISSUER]
    assert POD_NAME_EXTRA not in answer["status"]["user"]["extra"]


async def test_a_token_expires_after_its_lifetime_and_the_leeway(
    emu: KubeEmulator, clock: Clock
) -> None:
    token = emu.token_for_pod(NS, "web-1", ttl=600)
    assert emu.review_token(token, ["shoal"])["authenticated"] is True
    clock.now += 600 + TOKEN_LEEWAY
    assert emu.review_token(token, ["shoal"])["authenticated"] is True
    clock.now += 1
    result = emu.review_token(token, ["shoal"])
    assert "authenticated" not in result and "expired" in result["error"]
    # Not valid before it was issued either (beyond the leeway).
    clock.now -= 2 * 3600
    assert "not valid yet" in emu.review_token(token, ["shoal"])["error"]


async def test_a_deleted_pods_token_is_refused_even_if_the_name_comes_back(
    emu: KubeEmulator,
) -> None:
    token = emu.token_for_pod(NS, "web-1")
    emu.delete("pods", "web-1", namespace=NS)
    result = emu.review_token(token, ["shoal"])
    assert "authenticated" not in result and "invalidated" in result["error"]
    emu.create(objects.pod(NS, "web-1", service_account="web"))
    result = emu.review_token(token, ["shoal"])
    assert "authenticated" not in result and "does not match claim" in result["error"]
    # The new Pod's token works.
    assert emu.review_token(emu.token_for_pod(NS, "web-1"), ["shoal"])["authenticated"]


async def test_a_deleted_service_accounts_token_is_refused(emu: KubeEmulator) -> None:
    token = emu.mint_token(NS, "web")
    emu.delete("serviceaccounts", "web", namespace=NS)
    assert "invalidated" in emu.review_token(token, ["shoal"])["error"]
    emu.create(objects.service_account(NS, "web"))
    assert "does not match claim" in emu.review_token(token, ["shoal"])["error"]


async def test_forged_and_malformed_tokens(emu: KubeEmulator, http: aiohttp.ClientSession) -> None:
    token = emu.token_for_pod(NS, "web-1")
    header, payload, signature = token.split(".")
    claims = claims_of(token)
    claims["sub"] = "system:serviceaccount:kube-system:admin"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    other = KubeEmulator(clock=emu.clock)  # another issuer's key, same issuer name
    other.create(objects.namespace(NS))
    other.create(objects.service_account(NS, "web"))
    for bad in (
        f"{header}.{forged_payload}.{signature}",
        f"{header}.{payload}.{signature[:-4]}AAAA",
        other.mint_token(NS, "web"),
        "not-a-jwt",
        "a.b.c",
    ):
        result = emu.review_token(bad, ["shoal"])
        assert "authenticated" not in result and result["error"], bad
    status, answer = await call(http, "POST", emu.url + REVIEWS, review(""))
    assert status == 400 and "token is required" in answer["message"]
    status, answer = await call(http, "GET", emu.url + REVIEWS)
    assert status == 405


async def test_discovery_lists_the_token_apis(
    emu: KubeEmulator, http: aiohttp.ClientSession
) -> None:
    _, core = await call(http, "GET", emu.url + "/api/v1")
    (sub,) = [r for r in core["resources"] if r["name"] == "serviceaccounts/token"]
    assert (sub["group"], sub["kind"], sub["verbs"]) == (
        "authentication.k8s.io",
        "TokenRequest",
        ["create"],
    )
    _, group = await call(http, "GET", emu.url + "/apis/authentication.k8s.io/v1")
    assert [(r["name"], r["verbs"]) for r in group["resources"]] == [("tokenreviews", ["create"])]


async def test_service_account_tokens_authenticate_api_requests(
    http: aiohttp.ClientSession,
) -> None:
    emu = KubeEmulator(token="admin-token")
    await emu.start()
    try:
        emu.create(objects.namespace(NS))
        emu.create(objects.service_account(NS, "web"))
        url = emu.url + "/api/v1/namespaces/shop/pods"
        status, _ = await call(http, "GET", url, token=emu.mint_token(NS, "web"))
        assert status == 401, "a token for another audience is not for the API server"
        api_token = emu.mint_token(NS, "web", audiences=(DEFAULT_ISSUER,))
        status, _ = await call(http, "GET", url, token=api_token)
        assert status == 200
        assert emu.requests(resource="pods")[-1].user == "system:serviceaccount:shop:web"
        status, _ = await call(http, "GET", url, token="admin-token")
        assert status == 200
        assert emu.requests(resource="pods")[-1].user == "kubernetes-admin"
        status, answer = await call(http, "GET", url, token="wrong")
        assert (status, answer["reason"]) == (401, "Unauthorized")
    finally:
        await emu.stop()
