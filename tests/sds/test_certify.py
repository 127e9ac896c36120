"""Certify on the join port: a Pod's sidecar agent proves itself with its
projected service-account token, checked by the API server (the emulator's
TokenReview, over real HTTP), and gets an xDS client certificate for its
Pod's identity only."""

from __future__ import annotations

import datetime
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from shoal import cli
from shoal._gen import ca_pb2, ca_pb2_grpc
from shoal.kube import tokenreview
from shoal.sds import ca, join
from tests.kube import objects, serving
from tests.kube.emulator import (
    DEFAULT_TOKEN_SECONDS,
    POD_NAME_EXTRA,
    POD_UID_EXTRA,
    TOKEN_LEEWAY,
    KubeEmulator,
    running_emulator,
)

NS = "shop"
HOME = "shoal-system"
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
AGENT_TTL = datetime.timedelta(minutes=10)


class Clock:
    """The API server's time, moved only by the test (tokens expire)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(clock: Clock) -> Iterator[KubeEmulator]:
    with running_emulator(bookmark_interval=0.5, token="cp-token", clock=clock) as emulator:
        for ns in (NS, HOME):
            emulator.create(objects.namespace(ns))
        emulator.create(objects.pod(NS, "web-1", service_account="web"))
        emulator.create(objects.pod(NS, "db-1", service_account="db"))
        yield emulator


@pytest.fixture
async def kube_cp(emu: KubeEmulator, tmp_path: Path) -> AsyncIterator[cli.ControlPlane]:
    async with cli.control_plane(serving.options(emu, tmp_path, agent_ttl=AGENT_TTL)) as cp:
        yield cp


async def _certify(cp: cli.ControlPlane, token: str, csr: bytes) -> ca_pb2.JoinResponse:
    assert cp.authority is not None
    return await join.certify(f"127.0.0.1:{cp.join_port}", token, csr, cp.authority.root_pem)


def _csr(identity: str = WEB_ID) -> bytes:
    return ca.csr(ca.new_key(), identity)


async def _refused(cp: cli.ControlPlane, token: str, csr: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _certify(cp, token, csr)
    return info.value


async def test_a_pods_own_token_gets_a_client_certificate_for_its_identity(
    emu: KubeEmulator, kube_cp: cli.ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    token = emu.token_for_pod(NS, "web-1")
    caplog.set_level(logging.INFO)
    answer = await _certify(kube_cp, token, _csr())
    assert answer.spiffe_id == WEB_ID
    cert = x509.load_pem_x509_certificate(answer.certificate_chain_pem)
    assert ca.spiffe_ids(cert) == [WEB_ID]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH], "a client certificate only"
    lifetime = cert.not_valid_after_utc - ca.utcnow()
    assert AGENT_TTL - datetime.timedelta(minutes=1) < lifetime <= AGENT_TTL
    assert kube_cp.authority is not None
    assert kube_cp.authority.root_pem in answer.xds_trust_pem
    assert "certified" in caplog.text and "shop/web-1" in caplog.text
    assert token not in caplog.text
    # The API server was asked, with the audience "shoal".
    reviews = [r for r in emu.requests() if "tokenreviews" in r.path]
    assert reviews, "TokenReview was not called"


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("another pod's token", grpc.StatusCode.INVALID_ARGUMENT, "CSR refused"),
        ("expired", grpc.StatusCode.PERMISSION_DENIED, "expired"),
        ("wrong audience", grpc.StatusCode.PERMISSION_DENIED, "not authenticated"),
        ("deleted pod", grpc.StatusCode.PERMISSION_DENIED, "not authenticated"),
        ("recreated pod", grpc.StatusCode.PERMISSION_DENIED, "not authenticated"),
        ("not bound to a pod", grpc.StatusCode.PERMISSION_DENIED, "not bound to a Pod"),
        ("garbage token", grpc.StatusCode.PERMISSION_DENIED, "not authenticated"),
        ("two identities", grpc.StatusCode.INVALID_ARGUMENT, "CSR refused"),
        ("garbage CSR", grpc.StatusCode.INVALID_ARGUMENT, "not a PEM"),
        ("no token", grpc.StatusCode.INVALID_ARGUMENT, "no kubernetes_token"),
    ],
)
async def test_tokens_that_do_not_prove_the_identity_are_refused(
    emu: KubeEmulator,
    kube_cp: cli.ControlPlane,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    case: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    token = emu.token_for_pod(NS, "web-1")
    csr = _csr()
    if case == "another pod's token":
        # db-1's own, valid token, asking for web's identity.
        token = emu.token_for_pod(NS, "db-1")
    elif case == "expired":
        clock.now += DEFAULT_TOKEN_SECONDS + TOKEN_LEEWAY + 1
    elif case == "wrong audience":
        token = emu.token_for_pod(NS, "web-1", audience="vault")
    elif case == "deleted pod":
        emu.delete("pods", "web-1", namespace=NS)
    elif case == "recreated pod":
        emu.delete("pods", "web-1", namespace=NS)
        emu.create(objects.pod(NS, "web-1", service_account="web"))
    elif case == "not bound to a pod":
        token = emu.mint_token(NS, "web")
    elif case == "garbage token":
        token = "not.a.token"
    elif case == "two identities":
        key = ca.new_key()
        both = x509.SubjectAlternativeName(
            [
                x509.UniformResourceIdentifier(WEB_ID),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/db"),
            ]
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(both, critical=True)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )
    elif case == "garbage CSR":
        csr = b"-----BEGIN CERTIFICATE REQUEST-----\nnonsense\n-----END CERTIFICATE REQUEST-----\n"
    elif case == "no token":
        token = ""
    caplog.set_level(logging.INFO)
    err = await _refused(kube_cp, token, csr)
    assert err.code() == code, err.details()
    assert reason in (err.details() or ""), err.details()
    assert "certify refused" in caplog.text
    if token:
        assert token not in caplog.text, "the token must never be logged"
    if code == grpc.StatusCode.INVALID_ARGUMENT and token:
        assert "shop/" in caplog.text, "a refusal names the Pod"


async def test_failed_certifications_count_against_the_caller(
    emu: KubeEmulator, kube_cp: cli.ControlPlane
) -> None:
    for _ in range(join.MAX_FAILURES):
        err = await _refused(kube_cp, "not.a.token", _csr())
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # Now even a good token from this address waits.
    err = await _refused(kube_cp, emu.token_for_pod(NS, "web-1"), _csr())
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_without_kubernetes_certify_says_why_not(control_plane: cli.ControlPlane) -> None:
    assert control_plane.authority is not None
    creds = grpc.ssl_channel_credentials(control_plane.authority.root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{control_plane.join_port}", creds) as ch:
        stub = ca_pb2_grpc.CertificateServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Certify(
                ca_pb2.CertifyRequest(kubernetes_token="t", csr_pem=_csr()), timeout=10
            )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--kubernetes" in (info.value.details() or "")


# The pure parts.


def _review(**status: object) -> tokenreview.Review:
    return tokenreview.parse({"status": status})


GOOD = {
    "authenticated": True,
    "audiences": ["shoal"],
    "user": {
        "username": "system:serviceaccount:shop:web",
        "extra": {POD_NAME_EXTRA: ["web-1"], POD_UID_EXTRA: ["u-1"]},
    },
}


def test_a_review_names_the_pod_and_service_account() -> None:
    who = join.pod_identity(_review(**GOOD))
    assert who == join.PodIdentity("shop", "web", "web-1", "u-1")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"authenticated": False, "error": "boom"}, "not authenticated: boom"),
        ({"audiences": ["vault"]}, "audience"),
        ({"audiences": None}, "audience"),
        ({"user": {"username": "kubernetes-admin"}}, "not a service account"),
        ({"user": {"username": "system:serviceaccount:shop"}}, "not a service account"),
        ({"user": {"username": "system:serviceaccount:Shop!:web"}}, "no valid"),
        ({"user": {"username": "system:serviceaccount:shop:web"}}, "not bound to a Pod"),
        (
            {
                "user": {
                    "username": "system:serviceaccount:shop:web",
                    "extra": {POD_NAME_EXTRA: ["a", "b"], POD_UID_EXTRA: ["u"]},
                }
            },
            "not bound to a Pod",
        ),
    ],
)
def test_a_review_that_vouches_for_no_pod_is_refused(
    change: dict[str, object], reason: str
) -> None:
    with pytest.raises(join.Refused) as info:
        join.pod_identity(_review(**{**GOOD, **change}))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert reason in str(info.value)


@pytest.mark.parametrize("body", [None, [], {"status": None}, {"status": {"user": 3}}, "x"])
def test_a_malformed_review_answer_authenticates_nobody(body: object) -> None:
    assert not tokenreview.parse(body).authenticated


def test_the_review_request_asks_for_the_audience() -> None:
    assert tokenreview.request_body("t", ["shoal"]) == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": "t", "audiences": ["shoal"]},
    }
