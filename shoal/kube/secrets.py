"""Secrets that shoal's replicas share (the mesh root): created once by
whichever replica gets there first, updated only from what was read."""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping

from shoal.kube import bodies, client, errors


def _path(namespace: str, name: str | None = None) -> str:
    return client.resource_path("v1", "secrets", namespace, name)


def _body(namespace: str, name: str, data: Mapping[str, bytes]) -> bodies.Secret:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "shoal"}},
        "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def _data(secret: bodies.Secret) -> dict[str, bytes]:
    data = secret.get("data") or {}
    return {k: base64.b64decode(v) for k, v in data.items() if isinstance(v, str)}


async def shared_secret(
    api: client.Api, namespace: str, name: str, make: Callable[[], dict[str, bytes]]
) -> tuple[dict[str, bytes], bool]:
    """A Secret every replica agrees on: read it, or create it from `make()`
    if absent. Two replicas starting together both try to create it; the
    API server lets one win (409 AlreadyExists for the other), which then
    reads the winner's. True if this call created it."""
    for _ in range(5):
        try:
            found: bodies.Secret = await api.call("GET", _path(namespace, name))
            return _data(found), False
        except errors.NotFound:
            pass
        data = make()
        try:
            await api.call("POST", _path(namespace), body=_body(namespace, name, data))
            return data, True
        except errors.Conflict:
            pass
    raise errors.Conflict(
        409, "Conflict", f"Secret {namespace}/{name} could not be read or created"
    )


async def read_secret(api: client.Api, namespace: str, name: str) -> tuple[dict[str, bytes], str]:
    """A Secret's data and the resourceVersion to update it from."""
    found: bodies.Secret = await api.call("GET", _path(namespace, name))
    return _data(found), bodies.resource_version(found)


async def replace_secret(
    api: client.Api, namespace: str, name: str, data: Mapping[str, bytes], resource_version: str
) -> str:
    """Replace a Secret's data if it is still at `resource_version`
    (errors.Conflict otherwise: someone else wrote it since it was read)."""
    body = _body(namespace, name, data)
    body["metadata"]["resourceVersion"] = resource_version
    written: bodies.Secret = await api.call("PUT", _path(namespace, name), body=body)
    return bodies.resource_version(written)
