"""The mutating admission webhook: AdmissionReview v1 in, a JSONPatch out.

Served over HTTPS with a certificate from the mesh CA; the API server
verifies it with the caBundle the control plane keeps in the
MutatingWebhookConfiguration (see `bundle`). A request that is not an
AdmissionReview gets a 400 that says what is wrong; a Pod that is not
injected is allowed, with the reason in the API server's audit log; a Pod
whose annotations cannot be honoured is refused with the reason, which
`kubectl apply` prints. The webhook has no side effects, so dry-run
requests are answered like any other.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from shoal.injector import patch, settings

log = logging.getLogger(__name__)

PATH = "/inject"
API_VERSION = "admission.k8s.io/v1"
# etcd keeps objects of at most 1.5 MiB; with the review's envelope and an
# oldObject, 3 MiB is more than a real review can be.
MAX_BODY = 3 * 1024 * 1024
AUDIT_KEY = "injection"
POD_KIND = {"group": "", "version": "v1", "kind": "Pod"}

# outcome ("injected", "skipped", "refused", "malformed", "failed") and seconds
Observe = Callable[[str, float], None]


class Malformed(ValueError):
    """Not an AdmissionReview this webhook can answer: a 400."""


def _review(body: bytes) -> tuple[str, Mapping[str, Any]]:
    """The request's uid and the request; Malformed says why not."""
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise Malformed(f"the body is not JSON ({str(err)[:120]})") from None
    if not isinstance(review, dict):
        raise Malformed("the body is not a JSON object")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise Malformed(f"expected kind AdmissionReview of apiVersion {API_VERSION}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise Malformed("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > 128:
        raise Malformed("request.uid is not a string of 1 to 128 characters")
    return uid, request


def _review_of(uid: str, response: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, **response},
    }


def _allowed(uid: str, why: str) -> dict[str, Any]:
    return _review_of(uid, {"allowed": True, "auditAnnotations": {AUDIT_KEY: why[:1000]}})


def _refused(uid: str, code: int, message: str) -> dict[str, Any]:
    return _review_of(uid, {"allowed": False, "status": {"code": code, "message": message[:4000]}})


def decide(
    uid: str, request: Mapping[str, Any], s: settings.Settings, skip: frozenset[str]
) -> tuple[str, dict[str, Any]]:
    """The outcome and the AdmissionReview answering one well-formed request."""
    kind = request.get("kind")
    operation = request.get("operation")
    if kind != POD_KIND or operation != "CREATE":
        what = f"{str(operation)[:40]} of {str(kind)[:200]}"
        return "skipped", _allowed(uid, f"skipped: {what} is not a Pod create")
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise Malformed("request.object is not a Pod")
    namespace = request.get("namespace")
    namespace = namespace if isinstance(namespace, str) else ""
    what = patch.describe(pod, namespace)
    dry = " (dry run)" if request.get("dryRun") is True else ""
    try:
        outcome = patch.inject(pod, s, namespace, skip)
    except patch.InjectionError as err:
        log.warning("injection refused%s: %s", dry, err)
        return "refused", _refused(uid, 400, f"shoal sidecar injection: {err}")
    if isinstance(outcome, patch.Skipped):
        log.info("%s not injected%s: %s", what, dry, outcome.reason)
        return "skipped", _allowed(uid, f"skipped: {outcome.reason}")
    log.info("%s injected%s", what, dry)
    encoded = base64.b64encode(json.dumps(outcome.patch, separators=(",", ":")).encode())
    return "injected", _review_of(
        uid,
        {
            "allowed": True,
            "patchType": "JSONPatch",
            "patch": encoded.decode(),
            "auditAnnotations": {AUDIT_KEY: "injected"},
        },
    )


@dataclass(frozen=True, slots=True)
class Answer:
    """What the webhook answers to one request: 200 with an AdmissionReview,
    or 400 with the reason in plain text."""

    status: int
    outcome: str
    review: dict[str, Any] | None = None
    reason: str = ""


def answer(body: bytes, content_type: str, s: settings.Settings, skip: frozenset[str]) -> Answer:
    """The whole webhook but HTTP itself, for any bytes."""
    try:
        if content_type != "application/json":
            raise Malformed(f"Content-Type {content_type[:100]!r} is not application/json")
        if len(body) > MAX_BODY:
            raise Malformed(f"the body is over {MAX_BODY} bytes")
        uid, request = _review(body)
        outcome, review = decide(uid, request, s, skip)
        return Answer(200, outcome, review)
    except Malformed as err:
        return Answer(400, "malformed", reason=str(err))
    except Exception:
        # A bug of ours must not look like the API server's fault: it sees
        # a refusal (what failurePolicy Fail would make of an error too).
        log.exception("admission request: injection failed")
        return Answer(400, "failed", reason="injection failed; see the control plane's log")


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise Malformed(f"the body is over {MAX_BODY} bytes")
    body = await request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise Malformed(f"the body is over {MAX_BODY} bytes")
    return body


def app(
    current: Callable[[], settings.Settings],
    *,
    skip_namespaces: frozenset[str] = frozenset(),
    observe: Observe = lambda outcome, seconds: None,
) -> web.Application:
    async def inject(request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            body = await _body(request)
        except Malformed as err:
            result = Answer(400, "malformed", reason=str(err))
        else:
            result = answer(body, request.content_type, current(), skip_namespaces)
        observe(result.outcome, time.perf_counter() - started)
        if result.review is None:
            log.warning("admission request from %s refused: %s", request.remote, result.reason)
            return web.Response(status=result.status, text=f"{result.reason}\n")
        return web.json_response(result.review)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    application = web.Application(client_max_size=MAX_BODY + 1)
    application.router.add_post(PATH, inject)
    application.router.add_get("/healthz", healthz)
    return application


@contextlib.asynccontextmanager
async def serve(
    application: web.Application, host: str, port: int, context: ssl.SSLContext
) -> AsyncIterator[int]:
    """The webhook on host:port over HTTPS; yields the port bound."""
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=context).start()
        bound: int = runner.addresses[0][1]
        yield bound
    finally:
        await runner.cleanup()
