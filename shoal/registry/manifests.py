"""Kubernetes objects (as parsed JSON/YAML) to mesh model objects.

One code path for every registry: the manifests folder and the Kubernetes
watch both hand the same object dictionaries to these functions, so a Service
means the same thing wherever it was read from.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal import spiffe
from shoal.model import mesh

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

# Kinds the mesh reads, as (apiVersion, kind).
SERVICE = ("v1", "Service")
ENDPOINT_SLICE = ("discovery.k8s.io/v1", "EndpointSlice")
NAMESPACE = ("v1", "Namespace")
SERVICE_ACCOUNT = ("v1", "ServiceAccount")
# On an EndpointSlice: the service account its endpoints without a Pod run as.
SERVICE_ACCOUNT_ANNOTATION = "shoal.io/service-account"
POD = ("v1", "Pod")
TRAFFIC_ROUTE = ("shoal.io/v1alpha1", "TrafficRoute")
# The Gateway API's mesh routes (README, "Gateway API").
HTTP_ROUTE = ("gateway.networking.k8s.io/v1", "HTTPRoute")
GRPC_ROUTE = ("gateway.networking.k8s.io/v1", "GRPCRoute")
GATEWAY_ROUTES = frozenset({HTTP_ROUTE, GRPC_ROUTE})
KNOWN_KINDS = frozenset(
    {SERVICE, ENDPOINT_SLICE, NAMESPACE, SERVICE_ACCOUNT, POD, TRAFFIC_ROUTE, *GATEWAY_ROUTES}
)
NAMESPACED = frozenset(
    {SERVICE, ENDPOINT_SLICE, SERVICE_ACCOUNT, POD, TRAFFIC_ROUTE, *GATEWAY_ROUTES}
)

# RFC 1123 label (Service and Namespace names) and subdomain (most other names).


class ManifestError(ValueError):
    """An object that cannot be part of the mesh, and why; `code` is the
    problem catalogue's entry for it (models.problems)."""

    def __init__(self, message: str, code: str = "SHL0001") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class KubeObject:
    """A Kubernetes object with the fields every kind shares pulled out."""

    api_version: str
    kind: str
    namespace: str
    name: str
    body: Mapping[str, Any]
    # Made once: a build of a large mesh asks for them per object, every time.
    type: tuple[str, str] = field(init=False, repr=False, compare=False)
    key: tuple[str, str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "type", (self.api_version, self.kind))
        object.__setattr__(self, "key", (self.kind, self.namespace, self.name))

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind} {self.name}")
        )


def describe(doc: Any) -> str:
    """Best-effort name of a document for error messages, even a broken one."""
    if not isinstance(doc, Mapping):
        return "document"
    kind = doc.get("kind") or "object"
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    if name and ns:
        return f"{kind} {ns}/{name}"
    return f"{kind} {name}" if name else str(kind)


def parse_object(doc: Any) -> KubeObject | None:
    """Validate the envelope of one document; None for kinds the mesh ignores."""
    if not isinstance(doc, Mapping):
        raise ManifestError(f"expected a mapping, got {type(doc).__name__}")
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not api_version:
        raise ManifestError("missing apiVersion")
    if not isinstance(kind, str) or not kind:
        raise ManifestError("missing kind")
    if (api_version, kind) not in KNOWN_KINDS:
        return None
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        raise ManifestError("missing metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ManifestError("missing metadata.name")
    # Kubernetes' rules: a Service or Namespace name is a DNS label (63
    # characters at most), other names DNS subdomains (253).
    valid = spiffe.is_dns_label if kind in ("Service", "Namespace") else spiffe.is_dns_subdomain
    if not valid(name):
        raise ManifestError(f"metadata.name {name!r} is not a valid DNS name")
    _, namespace, _ = key_of(doc)
    given = meta.get("namespace")
    if namespace and (not spiffe.is_dns_label(namespace) or not isinstance(given, str | None)):
        shown = given if given is not None else namespace
        raise ManifestError(f"metadata.namespace {shown!r} is not a valid DNS label")
    return KubeObject(api_version, kind, namespace, name, doc)


def key_of(doc: Mapping[str, Any]) -> tuple[str, str, str]:
    """(kind, namespace, name), as `KubeObject.key`, of a document not yet
    (or no longer) parsed: a namespaced object without a namespace is in
    `default`, as kubectl puts it."""
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    namespace = ""
    if (doc.get("apiVersion"), doc.get("kind")) in NAMESPACED:
        namespace = str(meta.get("namespace") or "default")
    return (str(doc.get("kind") or ""), namespace, str(meta.get("name") or ""))


def _string_map(value: Any, what: str) -> mesh.FrozenMap:
    if value is None:
        return mesh.frozen_map()
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestError(f"{what} must map strings to strings")
    return mesh.frozen_map(value)


def _metadata(obj: KubeObject) -> Mapping[str, Any]:
    meta = obj.body.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _port_number(value: Any, what: str) -> int:
    # bool is an int in Python; YAML `port: yes` must not become port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{what} must be an integer, got {value!r}")
    if not 1 <= value <= 65535:
        raise ManifestError(f"{what} {value} is out of range 1-65535")
    return value


_PROTOCOL_PREFIXES = (
    ("grpc", mesh.Protocol.GRPC),
    ("http2", mesh.Protocol.HTTP2),
    ("h2c", mesh.Protocol.HTTP2),
    ("http", mesh.Protocol.HTTP),
    ("tcp", mesh.Protocol.TCP),
)


def _protocol(app_protocol: Any, name: str) -> mesh.Protocol:
    """appProtocol first, then the port-name convention (`http-web`, `tcp-db`).

    A port that says nothing is HTTP: the mesh's features (routes, retries,
    traces) are HTTP features, and Istio and Linkerd make the same default.
    """
    hint = app_protocol if isinstance(app_protocol, str) and app_protocol else name
    hint = hint.lower().removeprefix("kubernetes.io/")
    for prefix, protocol in _PROTOCOL_PREFIXES:
        if hint == prefix or hint.startswith(prefix + "-"):
            return protocol
    return mesh.Protocol.HTTP


def to_service(obj: KubeObject) -> mesh.Service:
    spec = obj.body.get("spec")
    if not isinstance(spec, Mapping):
        raise ManifestError("missing spec")
    raw_ports = spec.get("ports")
    if not isinstance(raw_ports, list) or not raw_ports:
        raise ManifestError("spec.ports must be a non-empty list")
    ports: list[mesh.Port] = []
    seen_names: set[str] = set()
    seen_numbers: set[int] = set()
    for i, raw in enumerate(raw_ports):
        where = f"spec.ports[{i}]"
        if not isinstance(raw, Mapping):
            raise ManifestError(f"{where} must be a mapping")
        number = _port_number(raw.get("port"), f"{where}.port")
        name = raw.get("name") or ""
        if not isinstance(name, str):
            raise ManifestError(f"{where}.name must be a string")
        if len(raw_ports) > 1 and not name:
            raise ManifestError(f"{where}.name is required when a Service has several ports")
        if name in seen_names or number in seen_numbers:
            raise ManifestError(f"{where} repeats port {number} or name {name!r}")
        seen_names.add(name)
        seen_numbers.add(number)
        transport = raw.get("protocol", "TCP")
        if transport != "TCP":
            raise ManifestError(f"{where}.protocol {transport!r} is not supported (TCP only)")
        target = raw.get("targetPort")
        if target is not None and not isinstance(target, str):
            target = _port_number(target, f"{where}.targetPort")
        ports.append(
            mesh.Port(
                port=number,
                name=name,
                protocol=_protocol(raw.get("appProtocol"), name),
                target_port=target,
            )
        )
    meta = _metadata(obj)
    cluster_ip = spec.get("clusterIP")
    return mesh.Service(
        namespace=obj.namespace,
        name=obj.name,
        ports=tuple(ports),
        annotations=_string_map(meta.get("annotations"), "metadata.annotations"),
        labels=_string_map(meta.get("labels"), "metadata.labels"),
        cluster_ip=cluster_ip if isinstance(cluster_ip, str) and cluster_ip else None,
    )


# What the injector adds and what opts a Pod out (shoal/injector/settings.py,
# which the registry does not import; a test keeps the two equal).
SIDECAR_CONTAINER = "shoal-proxy"
INJECT_ANNOTATION = "shoal.io/inject"
# Pod phases after which no container runs again.
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})


def to_pod(obj: KubeObject) -> mesh.Pod:
    spec = obj.body.get("spec")
    spec = spec if isinstance(spec, Mapping) else {}
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if not isinstance(account, str):
        raise ManifestError("spec.serviceAccountName must be a string")
    meta = _metadata(obj)
    status = obj.body.get("status")
    status = status if isinstance(status, Mapping) else {}
    ip = status.get("podIP")
    uid = meta.get("uid")
    # The proxy is an init container with restartPolicy Always (a native
    # sidecar) when injected; a container of the same name counts too, as
    # the injector counts it.
    containers = [
        c
        for field_name in ("containers", "initContainers")
        if isinstance(spec.get(field_name), list)
        for c in spec[field_name]
        if isinstance(c, Mapping)
    ]
    annotations = meta.get("annotations")
    opt_out = annotations.get(INJECT_ANNOTATION) if isinstance(annotations, Mapping) else None
    return mesh.Pod(
        namespace=obj.namespace,
        name=obj.name,
        uid=uid if isinstance(uid, str) else "",
        ip=ip if isinstance(ip, str) else "",
        service_account=account,
        labels=_string_map(meta.get("labels"), "metadata.labels"),
        sidecar=any(c.get("name") == SIDECAR_CONTAINER for c in containers),
        opted_out=(isinstance(opt_out, str) and opt_out.strip().lower() == "false")
        or spec.get("hostNetwork") is True,
        finished=status.get("phase") in FINISHED_PHASES,
    )


def declared_service_account(obj: KubeObject) -> str:
    """The service account an EndpointSlice declares its Pod-less endpoints
    run as (`shoal.io/service-account`), else Kubernetes' `default`.

    Callers verify a Service's endpoints against these identities. Only
    the manifests (or the API server) say who an endpoint is, never the
    proxy that serves it: a proxy's claim to serve an address is not
    evidence, so a proxy could otherwise make callers accept any identity
    the CA ever gave it. A Pod named by the endpoint's `targetRef` still
    decides for that endpoint."""
    annotations = _metadata(obj).get("annotations")
    value = (
        annotations.get(SERVICE_ACCOUNT_ANNOTATION) if isinstance(annotations, Mapping) else None
    )
    if value is None:
        return "default"
    if not isinstance(value, str) or not spiffe.is_dns_subdomain(value):
        raise ManifestError(
            f"metadata.annotations[{SERVICE_ACCOUNT_ANNOTATION}]: {value!r} is not a "
            "service account name"
        )
    return value


def slice_service(obj: KubeObject) -> str:
    labels = _metadata(obj).get("labels")
    name = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ManifestError(f"missing label {SERVICE_NAME_LABEL} naming its Service")
    return name


def to_endpoints(
    obj: KubeObject, pods: Mapping[tuple[str, str], mesh.Pod]
) -> tuple[mesh.Endpoint, ...]:
    """One model Endpoint per (address, slice port)."""
    body = obj.body
    address_type = body.get("addressType", "IPv4")
    if address_type not in ("IPv4", "IPv6"):
        raise ManifestError(f"addressType {address_type!r} is not supported (IPv4, IPv6)")
    raw_ports = body.get("ports") or []
    if not isinstance(raw_ports, list):
        raise ManifestError("ports must be a list")
    ports: list[tuple[str, int]] = []
    for i, raw in enumerate(raw_ports):
        if not isinstance(raw, Mapping):
            raise ManifestError(f"ports[{i}] must be a mapping")
        name = raw.get("name") or ""
        if not isinstance(name, str):
            raise ManifestError(f"ports[{i}].name must be a string")
        ports.append((name, _port_number(raw.get("port"), f"ports[{i}].port")))
    raw_endpoints = body.get("endpoints") or []
    if not isinstance(raw_endpoints, list):
        raise ManifestError("endpoints must be a list")
    declared = declared_service_account(obj)
    out: list[mesh.Endpoint] = []
    for i, raw in enumerate(raw_endpoints):
        where = f"endpoints[{i}]"
        if not isinstance(raw, Mapping):
            raise ManifestError(f"{where} must be a mapping")
        addresses = raw.get("addresses")
        if not isinstance(addresses, list) or not addresses:
            raise ManifestError(f"{where}.addresses must be a non-empty list")
        for address in addresses:
            if not _is_ip(address, address_type):
                raise ManifestError(f"{where}.addresses: {address!r} is not an {address_type}")
        conditions = raw.get("conditions")
        conditions = conditions if isinstance(conditions, Mapping) else {}
        # Kubernetes: an unset `ready` means unknown and consumers treat it as ready.
        ready = conditions.get("ready") is not False
        pod_name = None
        target = raw.get("targetRef")
        if isinstance(target, Mapping) and target.get("kind") == "Pod":
            pod_name = target.get("name") if isinstance(target.get("name"), str) else None
        pod = pods.get((obj.namespace, pod_name)) if pod_name else None
        zone = raw.get("zone") if isinstance(raw.get("zone"), str) else None
        # Kubernetes keeps only the first address of an endpoint meaningful.
        for port_name, port in ports:
            out.append(
                mesh.Endpoint(
                    address=addresses[0],
                    port=port,
                    port_name=port_name,
                    ready=ready,
                    labels=pod.labels if pod else mesh.frozen_map(),
                    service_account=pod.service_account if pod else declared,
                    pod=pod_name,
                    zone=zone,
                )
            )
    return tuple(out)


def _is_ip(value: Any, address_type: str) -> bool:
    # inet_pton: twenty times faster than ipaddress, which counts at a
    # hundred thousand endpoints; it is as strict (no leading zeros).
    if not isinstance(value, str):
        return False
    try:
        socket.inet_pton(socket.AF_INET if address_type == "IPv4" else socket.AF_INET6, value)
    except (OSError, ValueError):
        return False
    return True


def to_namespace(obj: KubeObject) -> mesh.Namespace:
    meta = _metadata(obj)
    return mesh.Namespace(
        obj.name,
        labels=_string_map(meta.get("labels"), "metadata.labels"),
        annotations=_string_map(meta.get("annotations"), "metadata.annotations"),
    )


def check(obj: KubeObject) -> None:
    """Everything that can be said of one object without looking at others."""
    if obj.type == SERVICE:
        to_service(obj)
    elif obj.type == POD:
        to_pod(obj)
    elif obj.type == NAMESPACE:
        to_namespace(obj)
    elif obj.type == ENDPOINT_SLICE:
        slice_service(obj)
        to_endpoints(obj, {})
