"""Asking the API server who a token belongs to (TokenReview), and whether a
Pod still exists: what the CA needs to certify a sidecar agent.

TokenReview ("authentication.k8s.io/v1", Kubernetes API reference): POST a
TokenReview with spec.token and spec.audiences; status.authenticated,
status.user (username, uid, groups, extra) and status.audiences say what the
API server found. A projected service-account token bound to a Pod carries
the Pod's name and uid in user.extra. The caller needs RBAC `create` on
tokenreviews.authentication.k8s.io (and `get` on pods).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.kube import client, errors

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class Review:
    authenticated: bool
    error: str = ""
    username: str = ""
    audiences: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)


def request_body(token: str, audiences: Sequence[str]) -> dict[str, Any]:
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": list(audiences)},
    }


def parse(body: Any) -> Review:
    """The review in an answer; a malformed one is taken as unauthenticated."""
    status = body.get("status") if isinstance(body, dict) else None
    if not isinstance(status, dict):
        return Review(False, "the TokenReview answer has no status")
    user = _dict(status.get("user"))
    extra = {
        str(k): tuple(str(v) for v in values)
        for k, values in _dict(user.get("extra")).items()
        if isinstance(values, list)
    }
    found = status.get("audiences")
    audiences = found if isinstance(found, list) else []
    return Review(
        authenticated=status.get("authenticated") is True,
        error=str(status.get("error") or ""),
        username=str(user.get("username") or ""),
        audiences=tuple(str(a) for a in audiences),
        extra=extra,
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class TokenReviews:
    """TokenReview and Pod reads over one API session."""

    def __init__(self, api: client.Api) -> None:
        self._api = api

    async def review(self, token: str, audience: str) -> Review:
        body = await self._api.call("POST", PATH, body=request_body(token, [audience]))
        return parse(body)

    async def pod_uid(self, namespace: str, name: str) -> str | None:
        try:
            pod = await self._api.call("GET", client.resource_path("v1", "pods", namespace, name))
        except errors.NotFound:
            return None
        uid = (pod.get("metadata") or {}).get("uid") if isinstance(pod, dict) else None
        return str(uid) if uid else ""
