"""The shapes of what shoal reads from and writes to the API server.

These describe the JSON as the server sends it; nothing converts or checks
it on the way in (at ten thousand objects a list, that would cost more than
the list). Fields Kubernetes may omit make `total=False` types, so a reader
must use `.get()`. An object of a kind the mesh reads as it is (Services,
EndpointSlices, Pods, ...) stays a `RawObject`: the manifests parser checks
every field it reads, as it does for the manifests folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

# Any kind's object, as the server sent it.
RawObject = dict[str, Any]


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    labels: dict[str, str]
    annotations: dict[str, str]
    # Opaque: compared for equality and sent back, never ordered.
    resourceVersion: str
    deletionTimestamp: str


# `continue` is a Python keyword, hence the functional form.
ListMeta = TypedDict(
    "ListMeta",
    {"resourceVersion": str, "continue": str, "remainingItemCount": int},
    total=False,
)


class ObjectList(TypedDict, total=False):
    """One page of a list. Items lack their kind and apiVersion (except
    custom resources'): the list says them once."""

    apiVersion: str
    kind: str
    metadata: ListMeta
    items: list[RawObject]


# What a watch event says happened; BOOKMARK only moves the
# resourceVersion on, ERROR carries a Status.
EventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]


class WatchEvent(TypedDict):
    type: EventType
    object: RawObject


class Status(TypedDict, total=False):
    """What the server answers a failed request with."""

    apiVersion: str
    kind: str
    status: str  # "Failure"
    message: str
    reason: str  # NotFound, AlreadyExists, Conflict, Expired, ...
    code: int
    details: dict[str, Any]


class Secret(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    type: str
    # base64 of each value
    data: dict[str, str]


class LeaseSpec(TypedDict, total=False):
    # None once released: the lease is free.
    holderIdentity: str | None
    leaseDurationSeconds: int
    # MicroTime: RFC 3339 with microseconds, in UTC.
    acquireTime: str
    renewTime: str
    leaseTransitions: int


class Lease(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: LeaseSpec


def resource_version(obj: Mapping[str, Any]) -> str:
    """An object's resourceVersion, "" if it has none (or a malformed one)."""
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return rv if isinstance(rv, str) else ""
