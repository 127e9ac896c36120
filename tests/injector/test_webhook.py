"""The webhook over real HTTPS, verified by the mesh root as the API server
verifies it with the caBundle: reviews answered, malformed and hostile
bodies refused with a 400 and a reason, never a 500."""

from __future__ import annotations

import base64
import copy
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonpatch
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shoal.injector import settings, webhook
from shoal.sds import ca, tls, workloads
from tests.injector import shapes


class Webhook:
    def __init__(self, url: str, certificates: workloads.WorkloadCertificates) -> None:
        self.url = url
        self.certificates = certificates
        self.outcomes: list[str] = []

    def client_context(self) -> ssl.SSLContext:
        """What the API server builds from the caBundle."""
        return ssl.create_default_context(cadata=self.certificates.authority.xds_trust.decode())

    async def post(self, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.url,
                data=body,
                headers={"Content-Type": content_type},
                ssl=self.client_context(),
            ) as response,
        ):
            return response.status, await response.text()

    async def review(self, request: dict[str, Any]) -> dict[str, Any]:
        status, text = await self.post(json.dumps(_review(request)).encode())
        assert status == 200, text
        answer: dict[str, Any] = json.loads(text)
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["response"]["uid"] == request["uid"]
        response: dict[str, Any] = answer["response"]
        return response


def _review(request: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def _pod_create(pod: dict[str, Any], namespace: str = "shop", **extra: Any) -> dict[str, Any]:
    return {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": namespace,
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        **extra,
    }


@pytest.fixture
async def hook() -> AsyncIterator[Webhook]:
    authority = ca.Authority(ca.new_root("cluster.local"))
    certificates = workloads.WorkloadCertificates(authority)
    found = Webhook("", certificates)
    application = webhook.app(
        lambda: shapes.SETTINGS,
        skip_namespaces=frozenset({"shoal-system"}),
        observe=lambda outcome, _: found.outcomes.append(outcome),
    )
    context = tls.serving_ssl_context(certificates, tls.serving_hosts("127.0.0.1"))
    async with webhook.serve(application, "127.0.0.1", 0, context) as port:
        found.url = f"https://127.0.0.1:{port}{webhook.PATH}"
        yield found


async def test_a_pod_is_answered_with_the_patch_that_injects_it(hook: Webhook) -> None:
    pod = shapes.load("named_probe_ports")
    response = await hook.review(_pod_create(copy.deepcopy(pod)))
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    injected = jsonpatch.apply_patch(pod, ops)
    names = [c["name"] for c in injected["spec"]["initContainers"]]
    assert names == [settings.INIT_CONTAINER, settings.PROXY_CONTAINER]
    assert response["auditAnnotations"] == {"injection": "injected"}
    # The API server calls again under reinvocation: nothing more to do.
    again = await hook.review(_pod_create(injected))
    assert "patch" not in again
    assert again["auditAnnotations"] == {"injection": "skipped: it is injected already"}
    assert hook.outcomes == ["injected", "skipped"]


async def test_a_dry_run_is_answered_the_same(hook: Webhook) -> None:
    pod = shapes.load("plain")
    wet = await hook.review(_pod_create(copy.deepcopy(pod)))
    dry = await hook.review(_pod_create(copy.deepcopy(pod), dryRun=True))
    assert dry == wet


@pytest.mark.parametrize(
    ("name", "namespace", "why"),
    [
        ("opt_out", "shop", 'skipped: annotation shoal.io/inject: "false"'),
        ("host_network", "shop", "skipped: it uses the host's network"),
        ("plain", "kube-system", "skipped: namespace kube-system is never injected"),
        ("plain", "shoal-system", "skipped: namespace shoal-system is never injected"),
    ],
)
async def test_a_pod_left_alone_is_allowed_with_the_reason(
    hook: Webhook, name: str, namespace: str, why: str
) -> None:
    response = await hook.review(_pod_create(shapes.load(name), namespace))
    assert response["allowed"] is True
    assert "patch" not in response
    assert response["auditAnnotations"]["injection"].startswith(why)


async def test_what_is_not_a_pod_create_is_allowed_untouched(hook: Webhook) -> None:
    update = _pod_create(shapes.load("plain"), operation="UPDATE")
    response = await hook.review(update)
    assert response["allowed"] is True and "patch" not in response
    service = _pod_create(
        {"kind": "Service"}, kind={"group": "", "version": "v1", "kind": "Service"}
    )
    assert "patch" not in await hook.review(service)


async def test_a_bad_annotation_refuses_the_pod_naming_it_and_the_reason(hook: Webhook) -> None:
    pod = shapes.load("plain")
    pod["metadata"]["annotations"] = {settings.EXCLUDE_OUTBOUND_CIDRS: "10.0.0.0/99"}
    response = await hook.review(_pod_create(pod))
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert response["status"]["message"] == (
        "shoal sidecar injection: Pod shop/web-1: annotation "
        "traffic.shoal.io/excludeOutboundIPRanges: "
        "'10.0.0.0/99' is not an IP range (like 10.0.0.0/8)"
    )
    assert hook.outcomes == ["refused"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "the body is not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}', "expected kind"),
        (json.dumps(_review({})).encode(), "request.uid"),
        (json.dumps({**_review({}), "request": 7}).encode(), "has no request"),
        (json.dumps(_review({"uid": "x" * 129})).encode(), "request.uid"),
        (
            json.dumps(_review({**_pod_create({}), "object": "a pod"})).encode(),
            "request.object is not a Pod",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "the body is not JSON"),
        (b"{" + b" " * (webhook.MAX_BODY + 1) + b"}", "over"),
    ],
)
async def test_a_malformed_review_gets_a_400_with_the_reason(
    hook: Webhook, body: bytes, reason: str
) -> None:
    status, text = await hook.post(body)
    assert status == 400
    assert reason in text
    assert hook.outcomes == ["malformed"]


async def test_a_body_that_is_not_json_by_its_type_is_refused(hook: Webhook) -> None:
    status, text = await hook.post(b"{}", content_type="text/plain")
    assert (status, text) == (400, "Content-Type 'text/plain' is not application/json\n")


async def test_a_non_pod_object_in_a_pod_review_is_refused_with_the_reason(hook: Webhook) -> None:
    response = await hook.review(
        _pod_create({"metadata": {"name": "x"}, "spec": {"containers": 3}})
    )
    assert response["allowed"] is False
    assert "spec.containers is not a list of objects" in response["status"]["message"]


async def test_the_certificate_follows_a_new_root(hook: Webhook) -> None:
    old = hook.client_context()
    hook.certificates.set_authority(ca.Authority(ca.new_root("cluster.local")), reissue=False)
    # A client of the new roots only is served: the new certificate.
    status, _ = await hook.post(json.dumps(_review(_pod_create(shapes.load("plain")))).encode())
    assert status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with (
            aiohttp.ClientSession() as session,
            session.post(hook.url, json={}, ssl=old),
        ):
            pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=30,
)
_hostile = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    _json.map(lambda v: json.dumps(_review(v if isinstance(v, dict) else {"uid": v})).encode()),
    st.builds(
        lambda obj, kind, op: json.dumps(
            _review({**_pod_create(obj), "kind": kind, "operation": op})
        ).encode(),
        _json,
        st.sampled_from([{"group": "", "version": "v1", "kind": "Pod"}, {}, "Pod", None]),
        st.sampled_from(["CREATE", "UPDATE", None, 3]),
    ),
    st.builds(
        lambda spec, meta: json.dumps(
            _review(_pod_create({"metadata": meta, "spec": spec}))
        ).encode(),
        _json,
        _json,
    ),
    st.binary(max_size=200),
)


@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_hostile)
async def test_hostile_bodies_get_a_400_or_an_answer_never_a_500(
    hook: Webhook, body: bytes
) -> None:
    status, text = await hook.post(body)
    assert status in (200, 400), text
    if status == 400:
        assert text.strip()
    else:
        assert json.loads(text)["response"]["uid"]
    assert "failed" not in hook.outcomes
