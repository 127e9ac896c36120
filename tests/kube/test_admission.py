"""The emulator's mutating admission chain against a real HTTPS webhook:
AdmissionReview v1 over TLS verified with the caBundle, rules, selectors,
failurePolicy, timeouts, reinvocation, dry-run, as kube-apiserver does it
("Dynamic Admission Control", Kubernetes docs)."""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime
import ipaddress
import json
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.kube import objects
from tests.kube.emulator import KubeEmulator, running_emulator

JSON = dict[str, Any]
Behaviour = Callable[[JSON], Awaitable[web.StreamResponse]]
SERVICE_DNS = "webhook.hooks.svc"
PODS = "/api/v1/namespaces/{ns}/pods"
CONFIGS = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
POD_CREATE = [
    {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}
]


# ----------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Tls:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def ca_bundle(self) -> str:
        return base64.b64encode(self.ca_pem).decode()


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_tls(common_name: str = "test CA") -> Tls:
    """A CA and a server certificate for 127.0.0.1 and the webhook Service's name."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVICE_DNS)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(SERVICE_DNS),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Tls(_pem(ca), _pem(cert), key_pem)


# ----------------------------------------------------------------------- the webhook


def answer(
    review: JSON,
    *,
    allowed: bool = True,
    patch: list[JSON] | None = None,
    status: JSON | None = None,
    warnings: list[str] | None = None,
) -> web.Response:
    response: JSON = {"uid": review["request"]["uid"], "allowed": allowed}
    if patch is not None:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if status is not None:
        response["status"] = status
    if warnings is not None:
        response["warnings"] = warnings
    return web.json_response(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
    )


def add_label(key: str, value: str) -> Behaviour:
    """Adds a label unless it is there already (idempotent, as webhooks
    under reinvocation must be)."""

    async def behave(review: JSON) -> web.Response:
        obj = review["request"]["object"]
        labels = obj["metadata"].get("labels")
        if labels is not None and labels.get(key) == value:
            return answer(review)
        escaped = key.replace("~", "~0").replace("/", "~1")
        ops = (
            [{"op": "add", "path": f"/metadata/labels/{escaped}", "value": value}]
            if labels is not None
            else [{"op": "add", "path": "/metadata/labels", "value": {key: value}}]
        )
        return answer(review, patch=ops)

    return behave


async def allow(review: JSON) -> web.Response:
    return answer(review)


class WebhookServer:
    """HTTPS on 127.0.0.1; each path answers with its behaviour and keeps
    the AdmissionReviews it was sent."""

    def __init__(self, tls: Tls) -> None:
        self.tls = tls
        self.behaviours: dict[str, Behaviour] = {}
        self.received: collections.defaultdict[str, list[JSON]] = collections.defaultdict(list)
        self.release = asyncio.Event()  # lets hanging handlers go at the end
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}/{path}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        review = await request.json()
        self.received[path].append(review)
        return await self.behaviours[path](review)

    async def hang(self, review: JSON) -> web.Response:
        await self.release.wait()
        return answer(review)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # ssl loads keys from files only: a private directory, gone at once.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(self.tls.cert_pem)
            key.write_bytes(self.tls.key_pem)
            context.load_cert_chain(cert, key)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, ssl_context=context)
        await site.start()

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="module")
def tls() -> Tls:
    return make_tls()


@pytest.fixture
async def webhook(tls: Tls) -> AsyncIterator[WebhookServer]:
    server = WebhookServer(tls)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def emu() -> AsyncIterator[KubeEmulator]:
    emulator = KubeEmulator(bookmark_interval=0.1)
    await emulator.start()
    try:
        emulator.create(objects.namespace("meshed", labels={"shoal.io/inject": "enabled"}))
        emulator.create(objects.namespace("plain"))
        yield emulator
    finally:
        await emulator.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def hook(
    name: str,
    server: WebhookServer,
    path: str,
    **fields: Any,
) -> JSON:
    """A webhook by URL on `server`; `fields` override or add any field."""
    out: JSON = {
        "name": name,
        "clientConfig": {"url": server.url(path), "caBundle": server.tls.ca_bundle},
        "rules": POD_CREATE,
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        **fields,
    }
    return out


def configuration(name: str, *hooks: JSON) -> JSON:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": list(hooks),
    }


async def post(
    http: aiohttp.ClientSession, url: str, body: JSON, **params: str
) -> tuple[int, JSON, list[str]]:
    async with http.post(url, json=body, params=params) as response:
        return response.status, await response.json(), response.headers.getall("Warning", [])


async def create_pod(
    http: aiohttp.ClientSession, emu: KubeEmulator, pod: JSON, **params: str
) -> tuple[int, JSON]:
    path = PODS.format(ns=pod["metadata"]["namespace"])
    status, body, _ = await post(http, emu.url + path, pod, **params)
    return status, body


# ----------------------------------------------------------------------- the call


async def test_a_pod_create_is_reviewed_and_patched_over_https(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    async def behave(review: JSON) -> web.Response:
        return answer(
            review,
            patch=[{"op": "add", "path": "/metadata/annotations", "value": {"injected": "yes"}}],
            warnings=["sidecar added"],
        )

    webhook.behaviours["inject"] = behave
    emu.create(configuration("injector", hook("inject.shoal.io", webhook, "inject")))
    pod = objects.pod("meshed", "web-1", labels={"app": "web"})
    status, created, warnings = await post(http, emu.url + PODS.format(ns="meshed"), pod)
    assert status == 201, created
    assert created["metadata"]["annotations"] == {"injected": "yes"}
    assert warnings == ['299 - "sidecar added"']
    stored = emu.get("pods", "web-1", namespace="meshed")
    assert stored is not None and stored["metadata"]["annotations"] == {"injected": "yes"}

    (review,) = webhook.received["inject"]
    assert (review["apiVersion"], review["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    request = review["request"]
    assert request["kind"] == {"group": "", "version": "v1", "kind": "Pod"}
    assert request["resource"] == {"group": "", "version": "v1", "resource": "pods"}
    assert request["requestKind"] == request["kind"]
    assert (request["name"], request["namespace"], request["operation"]) == (
        "web-1",
        "meshed",
        "CREATE",
    )
    assert request["userInfo"]["username"] == "kubernetes-admin"
    assert request["oldObject"] is None and request["dryRun"] is False
    assert request["options"] == {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
    # What the webhook sees is what was sent: no uid, no resourceVersion yet.
    assert request["object"]["metadata"]["labels"] == {"app": "web"}
    assert "uid" not in request["object"]["metadata"]
    assert "resourceVersion" not in request["object"]["metadata"]

    (call,) = emu.admission_calls()
    assert (call.configuration, call.webhook, call.round) == ("injector", "inject.shoal.io", 1)
    assert call.allowed is True and call.patched is True and call.error is None
    assert call.url == webhook.url("inject") + "?timeout=10s"
    assert call.request == review

    # Only Pods: the rules say so.
    emu.create(objects.service("meshed", "web"))
    assert len(emu.admission_calls()) == 1


async def test_a_service_reference_is_verified_against_the_service_name(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    webhook.behaviours["inject"] = add_label("injected", "true")
    service_hook = hook(
        "inject.shoal.io",
        webhook,
        "inject",
        clientConfig={
            "service": {"namespace": "hooks", "name": "webhook", "path": "/inject", "port": 443},
            "caBundle": webhook.tls.ca_bundle,
        },
    )
    emu.create(configuration("injector", service_hook))
    status, body = await create_pod(http, emu, objects.pod("meshed", "a"))
    assert status == 500
    assert "has no address" in body["message"], "no mapping yet: nowhere to send it"

    emu.map_service("hooks", "webhook", 443, f"127.0.0.1:{webhook.port}")
    status, created = await create_pod(http, emu, objects.pod("meshed", "a"))
    assert status == 201, created
    assert created["metadata"]["labels"] == {"injected": "true"}
    assert emu.admission_calls()[-1].url == "https://webhook.hooks.svc:443/inject?timeout=10s"

    # A Service whose name the certificate does not carry: TLS refuses it.
    other = {"namespace": "hooks", "name": "impostor", "path": "/inject", "port": 443}
    service_hook["clientConfig"]["service"] = other
    emu.update(configuration("injector", service_hook))
    emu.map_service("hooks", "impostor", 443, f"127.0.0.1:{webhook.port}")
    status, body = await create_pod(http, emu, objects.pod("meshed", "b"))
    assert status == 500 and "certificate" in body["message"].lower(), body


async def test_a_certificate_from_another_ca_fails_by_the_failure_policy(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    webhook.behaviours["inject"] = add_label("injected", "true")
    stranger = make_tls("another CA").ca_bundle
    strict = hook("inject.shoal.io", webhook, "inject")
    strict["clientConfig"]["caBundle"] = stranger
    emu.create(configuration("injector", strict))
    status, body = await create_pod(http, emu, objects.pod("meshed", "a"))
    assert (status, body["reason"]) == (500, "InternalError")
    assert body["message"].startswith(
        'Internal error occurred: failed calling webhook "inject.shoal.io": failed to call webhook'
    )
    assert emu.get("pods", "a", namespace="meshed") is None
    assert not webhook.received["inject"], "the TLS handshake failed: nothing was sent"

    strict["failurePolicy"] = "Ignore"
    emu.update(configuration("injector", strict))
    status, created = await create_pod(http, emu, objects.pod("meshed", "a"))
    assert status == 201 and "labels" not in created["metadata"]
    assert emu.admission_calls()[-1].error is not None


async def test_a_denial_carries_the_webhooks_status(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    async def deny(review: JSON) -> web.Response:
        return answer(review, allowed=False, status={"message": "no sidecar for you"})

    async def deny_invalid(review: JSON) -> web.Response:
        return answer(review, allowed=False, status={"code": 422, "reason": "Invalid"})

    async def deny_bare(review: JSON) -> web.Response:
        return answer(review, allowed=False, status={"code": 200})

    webhook.behaviours.update(deny=deny, invalid=deny_invalid, bare=deny_bare)
    for path, code, message in (
        ("deny", 403, 'admission webhook "x.shoal.io" denied the request: no sidecar for you'),
        ("invalid", 422, 'admission webhook "x.shoal.io" denied the request: Invalid'),
        ("bare", 403, 'admission webhook "x.shoal.io" denied the request without explanation'),
    ):
        # Ignore is about failing to call, not about a webhook that says no.
        emu.apply(configuration("c", hook("x.shoal.io", webhook, path, failurePolicy="Ignore")))
        status, body = await create_pod(http, emu, objects.pod("meshed", "a"))
        assert (status, body["message"]) == (code, message)
        assert emu.get("pods", "a", namespace="meshed") is None


async def test_a_webhook_that_does_not_answer_in_time(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    webhook.behaviours["slow"] = webhook.hang
    emu.create(configuration("c", hook("slow.shoal.io", webhook, "slow", timeoutSeconds=1)))
    started = time.monotonic()
    status, body = await create_pod(http, emu, objects.pod("meshed", "a"))
    took = time.monotonic() - started
    assert status == 500
    assert body["message"].endswith(
        f'Post "{webhook.url("slow")}?timeout=1s": context deadline exceeded'
    )
    assert took >= 1.0
    assert len(webhook.received["slow"]) == 1, "it was sent, and never answered"

    emu.apply(
        configuration(
            "c", hook("slow.shoal.io", webhook, "slow", timeoutSeconds=1, failurePolicy="Ignore")
        )
    )
    status, _ = await create_pod(http, emu, objects.pod("meshed", "a"))
    assert status == 201
    call = emu.admission_calls()[-1]
    assert call.error is not None and "deadline" in call.error
    assert call.duration is not None and call.duration >= 1.0


async def test_bad_answers_are_failures_to_call(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    async def wrong_uid(review: JSON) -> web.Response:
        return answer({"request": {"uid": "not-it"}})

    async def not_json(review: JSON) -> web.Response:
        return web.Response(text="<html>oops</html>")

    async def error_500(review: JSON) -> web.Response:
        return web.Response(status=500, text="boom")

    async def no_patch_type(review: JSON) -> web.Response:
        patch = base64.b64encode(b"[]").decode()
        body = {"uid": review["request"]["uid"], "allowed": True, "patch": patch}
        return web.json_response(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": body}
        )

    async def wrong_kind(review: JSON) -> web.Response:
        return web.json_response({"apiVersion": "v1", "kind": "Status"})

    cases = {
        "uid": (wrong_uid, 'expected response.uid="'),
        "json": (not_json, "received invalid webhook response"),
        "500": (error_500, "HTTP 500"),
        "patchtype": (no_patch_type, "but not response.patchType"),
        "kind": (wrong_kind, "expected webhook response of admission.k8s.io/v1"),
    }
    for path, (behave, why) in cases.items():
        webhook.behaviours[path] = behave
        emu.apply(configuration("c", hook("bad.shoal.io", webhook, path)))
        status, body = await create_pod(http, emu, objects.pod("meshed", "a"))
        assert status == 500 and why in body["message"], (path, body)
        emu.apply(configuration("c", hook("bad.shoal.io", webhook, path, failurePolicy="Ignore")))
        status, _ = await create_pod(http, emu, objects.pod("meshed", "a"))
        assert status == 201, path
        emu.delete("pods", "a", namespace="meshed")


async def test_a_patch_that_does_not_apply_refuses_the_request(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    async def broken(review: JSON) -> web.Response:
        return answer(review, patch=[{"op": "replace", "path": "/spec/nothing/here", "value": 1}])

    webhook.behaviours["broken"] = broken
    # Not a failure to call: Ignore does not apply (kube-apiserver: InternalError).
    emu.create(configuration("c", hook("b.shoal.io", webhook, "broken", failurePolicy="Ignore")))
    status, body = await create_pod(http, emu, objects.pod("meshed", "a"))
    assert (status, body["reason"]) == (500, "InternalError")


# ----------------------------------------------------------------------- which requests


async def test_namespace_and_object_selectors(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    webhook.behaviours["inject"] = add_label("injected", "true")
    emu.create(
        configuration(
            "injector",
            hook(
                "inject.shoal.io",
                webhook,
                "inject",
                namespaceSelector={"matchLabels": {"shoal.io/inject": "enabled"}},
                objectSelector={
                    "matchExpressions": [
                        {"key": "shoal.io/inject", "operator": "NotIn", "values": ["false"]}
                    ]
                },
            ),
        )
    )
    cases = [
        (objects.pod("meshed", "in"), True),
        (objects.pod("plain", "unlabelled-namespace"), False),
        (objects.pod("meshed", "opted-out", labels={"shoal.io/inject": "false"}), False),
        (objects.pod("meshed", "other-label", labels={"shoal.io/inject": "true"}), True),
    ]
    for pod, sent in cases:
        status, created = await create_pod(http, emu, pod)
        assert status == 201
        labels = created["metadata"].get("labels") or {}
        assert (labels.get("injected") == "true") == sent, pod["metadata"]["name"]
    assert [c.name for c in emu.admission_calls()] == ["in", "other-label"]

    # The namespace's labels as they are now: labelling a namespace turns it on.
    emu.patch("namespaces", "plain", {"metadata": {"labels": {"shoal.io/inject": "enabled"}}})
    _, created = await create_pod(http, emu, objects.pod("plain", "now"))
    assert created["metadata"]["labels"] == {"injected": "true"}


async def test_rules_choose_operations_resources_and_scope(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    for path in ("create", "update", "cluster", "everything"):
        webhook.behaviours[path] = allow

    def rule(ops: list[str], resources: list[str], scope: str = "*") -> list[JSON]:
        return [
            {
                "operations": ops,
                "apiGroups": ["*"],
                "apiVersions": ["*"],
                "resources": resources,
                "scope": scope,
            }
        ]

    emu.create(
        configuration(
            "rules",
            hook("create.shoal.io", webhook, "create", rules=rule(["CREATE"], ["pods"])),
            hook("update.shoal.io", webhook, "update", rules=rule(["UPDATE"], ["pods/*"])),
            hook("cluster.shoal.io", webhook, "cluster", rules=rule(["*"], ["*"], "Cluster")),
            hook("all.shoal.io", webhook, "everything", rules=rule(["*"], ["*/*"], "Namespaced")),
        )
    )
    await create_pod(http, emu, objects.pod("meshed", "a"))
    await emu.apatch("pods", "a", {"metadata": {"labels": {"x": "y"}}}, namespace="meshed")
    await emu.acreate(objects.namespace("new", labels={"team": "a"}))
    await emu.acreate(objects.service("meshed", "web"))
    seen = [(c.webhook.split(".")[0], c.operation, c.resource) for c in emu.admission_calls()]
    assert seen == [
        ("create", "CREATE", "pods"),
        ("all", "CREATE", "pods"),
        ("update", "UPDATE", "pods"),
        ("all", "UPDATE", "pods"),
        ("cluster", "CREATE", "namespaces"),
        ("all", "CREATE", "services"),
    ]
    (update,) = webhook.received["update"]
    request = update["request"]
    assert request["oldObject"]["metadata"].get("labels") is None
    assert request["object"]["metadata"]["labels"] == {"x": "y"}
    assert request["object"]["metadata"]["uid"] == request["oldObject"]["metadata"]["uid"]
    assert request["options"]["kind"] == "PatchOptions"
    # The webhook configurations themselves never go to webhooks.
    assert all(c.resource != "mutatingwebhookconfigurations" for c in emu.admission_calls())


async def test_generate_name_is_reviewed_without_a_name(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    webhook.behaviours["inject"] = add_label("injected", "true")
    emu.create(configuration("c", hook("inject.shoal.io", webhook, "inject")))
    pod = objects.pod("meshed", "x")
    pod["metadata"] = {"generateName": "web-", "namespace": "meshed"}
    status, created = await create_pod(http, emu, pod)
    assert status == 201 and created["metadata"]["name"].startswith("web-")
    assert "name" not in webhook.received["inject"][0]["request"]


# ----------------------------------------------------------------------- reinvocation


async def test_reinvocation_if_needed_after_a_later_change(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    webhook.behaviours["first"] = add_label("first", "1")
    webhook.behaviours["second"] = add_label("second", "2")
    # Configurations run in name order whatever order they were made in.
    emu.create(configuration("b-second", hook("second.shoal.io", webhook, "second")))
    emu.create(
        configuration(
            "a-first",
            hook("first.shoal.io", webhook, "first", reinvocationPolicy="IfNeeded"),
        )
    )
    status, created = await create_pod(http, emu, objects.pod("meshed", "a"))
    assert status == 201
    assert created["metadata"]["labels"] == {"first": "1", "second": "2"}
    calls = [(c.webhook, c.round, c.patched) for c in emu.admission_calls()]
    assert calls == [
        ("first.shoal.io", 1, True),
        ("second.shoal.io", 1, True),
        ("first.shoal.io", 2, False),  # saw the second's label, changed nothing
    ]
    assert webhook.received["first"][1]["request"]["object"]["metadata"]["labels"] == {
        "first": "1",
        "second": "2",
    }

    # Nothing changed after it: no second round.
    emu.clear_admission_calls()
    status, _ = await create_pod(http, emu, objects.pod("meshed", "b", labels={"second": "2"}))
    assert [(c.webhook, c.round) for c in emu.admission_calls()] == [
        ("first.shoal.io", 1),
        ("second.shoal.io", 1),
    ]

    # Never: never called again.
    emu.apply(configuration("a-first", hook("first.shoal.io", webhook, "first")))
    emu.clear_admission_calls()
    await create_pod(http, emu, objects.pod("meshed", "c"))
    assert [c.round for c in emu.admission_calls()] == [1, 1]


# ----------------------------------------------------------------------- dry run


async def test_a_dry_run_is_admitted_and_not_stored(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    webhook.behaviours["inject"] = add_label("injected", "true")
    emu.create(
        configuration("c", hook("inject.shoal.io", webhook, "inject", sideEffects="NoneOnDryRun"))
    )
    rv = emu.resource_version
    status, created = await create_pod(http, emu, objects.pod("meshed", "a"), dryRun="All")
    assert status == 201
    assert created["metadata"]["labels"] == {"injected": "true"}
    assert created["metadata"]["uid"] and "resourceVersion" not in created["metadata"]
    assert emu.get("pods", "a", namespace="meshed") is None
    assert emu.resource_version == rv, "nothing was written"
    request = webhook.received["inject"][0]["request"]
    assert request["dryRun"] is True and request["options"]["dryRun"] == ["All"]

    status, body = await create_pod(http, emu, objects.pod("meshed", "a"), dryRun="Some")
    assert status == 400 and "dryRun" in body["message"]


async def test_a_dry_run_is_refused_by_a_webhook_with_side_effects(
    webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    # v1 validation refuses sideEffects Some; a cluster may still hold one
    # written through v1beta1, which is what validate_webhooks=False stands for.
    emu = KubeEmulator(validate_webhooks=False)
    await emu.start()
    try:
        webhook.behaviours["inject"] = add_label("injected", "true")
        emu.create(objects.namespace("meshed"))
        emu.create(configuration("c", hook("se.shoal.io", webhook, "inject", sideEffects="Some")))
        status, body = await create_pod(http, emu, objects.pod("meshed", "a"), dryRun="All")
        assert (status, body["message"]) == (
            400,
            'admission webhook "se.shoal.io" does not support dry run',
        )
        assert not webhook.received["inject"]
        status, _ = await create_pod(http, emu, objects.pod("meshed", "a"))
        assert status == 201
    finally:
        await emu.stop()


# ----------------------------------------------------------------------- configurations


async def test_configurations_are_defaulted_and_validated(
    emu: KubeEmulator, webhook: WebhookServer, http: aiohttp.ClientSession
) -> None:
    service = {"namespace": "hooks", "name": "webhook"}
    created = emu.create(
        configuration(
            "c",
            hook("a.shoal.io", webhook, "a"),
            hook("b.shoal.io", webhook, "b", clientConfig={"service": dict(service)}),
        )
    )
    first, second = created["webhooks"]
    assert (
        first["failurePolicy"],
        first["matchPolicy"],
        first["timeoutSeconds"],
        first["reinvocationPolicy"],
        first["namespaceSelector"],
        first["objectSelector"],
        first["rules"][0]["scope"],
    ) == ("Fail", "Equivalent", 10, "Never", {}, {}, "*")
    assert second["clientConfig"]["service"] == {**service, "port": 443}

    def without(field: str) -> JSON:
        h = hook("a.shoal.io", webhook, "a")
        del h[field]
        return h

    invalid = [
        (without("sideEffects"), "webhooks[0].sideEffects: Required value"),
        (hook("a.shoal.io", webhook, "a", sideEffects="Some"), "sideEffects: Unsupported"),
        (without("admissionReviewVersions"), "admissionReviewVersions: Required value"),
        (hook("a.shoal.io", webhook, "a", timeoutSeconds=31), "between 1 and 30 seconds"),
        (hook("a.shoal.io", webhook, "a", failurePolicy="Maybe"), "failurePolicy"),
        (hook("two.segments", webhook, "a"), "at least three segments"),
        (
            hook("a.shoal.io", webhook, "a", clientConfig={"url": "http://127.0.0.1/"}),
            "'https' is the only allowed URL scheme",
        ),
        (
            hook(
                "a.shoal.io", webhook, "a", clientConfig={"url": "https://x/", "service": service}
            ),
            "exactly one of url or service",
        ),
    ]
    for bad, why in invalid:
        status, body, _ = await post(http, emu.url + CONFIGS, configuration("bad", bad))
        assert (status, body["reason"]) == (422, "Invalid"), body
        assert why in body["message"], (why, body["message"])
        assert body["message"].startswith(
            'MutatingWebhookConfiguration.admissionregistration.k8s.io "bad" is invalid'
        )
    dup = configuration("bad", hook("a.shoal.io", webhook, "a"), hook("a.shoal.io", webhook, "b"))
    status, body, _ = await post(http, emu.url + CONFIGS, dup)
    assert status == 422 and "Duplicate value" in body["message"]


# ----------------------------------------------------------------------- from Python


async def test_in_process_writes_go_through_admission(
    emu: KubeEmulator, webhook: WebhookServer
) -> None:
    webhook.behaviours["inject"] = add_label("injected", "true")
    emu.create(configuration("c", hook("inject.shoal.io", webhook, "inject")))
    # On the emulator's own loop a blocking create would wait for itself.
    with pytest.raises(RuntimeError, match="await"):
        emu.create(objects.pod("meshed", "a"))
    created = await emu.acreate(objects.pod("meshed", "a"))
    assert created["metadata"]["labels"] == {"injected": "true"}
    # Objects no webhook wants need no loop at all.
    emu.create(objects.service("meshed", "web"))
    dry = await emu.acreate(objects.pod("meshed", "b"), dry_run=True)
    assert dry["metadata"]["labels"] == {"injected": "true"}
    assert emu.get("pods", "b", namespace="meshed") is None


@pytest.fixture
def threaded() -> Iterator[KubeEmulator]:
    with running_emulator() as emulator:
        emulator.create(objects.namespace("meshed"))
        yield emulator


async def test_blocking_writes_from_another_thread(
    threaded: KubeEmulator, webhook: WebhookServer
) -> None:
    webhook.behaviours["inject"] = add_label("injected", "true")
    threaded.create(configuration("c", hook("inject.shoal.io", webhook, "inject")))
    # The webhook lives in this loop, the emulator in its own thread: a
    # blocking create in a worker thread leaves this loop free to answer.
    created = await asyncio.to_thread(threaded.create, objects.pod("meshed", "a"))
    assert created["metadata"]["labels"] == {"injected": "true"}
