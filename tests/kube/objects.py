"""Kubernetes objects as the API serves them (JSON dictionaries), for tests.

Each builder returns a fresh dictionary with the fields the shoal registry
reads (shoal/registry/manifests.py, trafficroute.py) set the way a cluster
sets them, ready for `KubeEmulator.create()` or a POST body.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

JSON = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
SLICE_CONTROLLER = "endpointslice-controller.k8s.io"


def _meta(
    name: str,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> JSON:
    meta: JSON = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def namespace(
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": _meta(name, labels=labels, annotations=annotations),
    }


def service(
    namespace: str,
    name: str,
    *,
    ports: Sequence[int | tuple[str, int] | Mapping[str, Any]] = (80,),
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    cluster_ip: str | None = None,
    selector: Mapping[str, str] | None = None,
) -> JSON:
    """Ports: 80 (named "http", or "http-80" among several), ("grpc", 9090),
    or a full ServicePort mapping. cluster_ip "None" makes it headless; unset,
    the API server allocates one."""
    spec: JSON = {"ports": _service_ports(ports)}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    if selector is not None:
        spec["selector"] = dict(selector)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, labels, annotations),
        "spec": spec,
    }


def _service_ports(ports: Sequence[int | tuple[str, int] | Mapping[str, Any]]) -> list[JSON]:
    out: list[JSON] = []
    for port in ports:
        if isinstance(port, Mapping):
            out.append(dict(port))
        elif isinstance(port, tuple):
            out.append({"name": port[0], "port": port[1], "protocol": "TCP"})
        else:
            name = "http" if len(ports) == 1 else f"http-{port}"
            out.append({"name": name, "port": port, "protocol": "TCP"})
    return out


def endpoint_slice(
    namespace: str,
    service: str,
    *,
    addresses: Sequence[str] = ("127.0.0.1",),
    ports: Sequence[int | tuple[str, int]] = (8080,),
    ready: bool | Sequence[bool] = True,
    pods: Sequence[str | None] | None = None,
    zone: str | None = None,
    name: str | None = None,
    address_type: str = "IPv4",
) -> JSON:
    """One endpoint per address, as the EndpointSlice controller writes it.

    ports: the endpoints' (target) ports; an int is named "http", matching
    `service()`'s single port; a (name, port) pair matches a named port.
    ready: one value for every endpoint, or one per address.
    pods: the Pod behind each address (targetRef), None for none.
    name: defaults to "<service>-<hash of the contents>", standing in for the
    controller's random suffix.
    """
    readiness = [ready] * len(addresses) if isinstance(ready, bool) else list(ready)
    owners = list(pods) if pods is not None else [None] * len(addresses)
    if len(readiness) != len(addresses) or len(owners) != len(addresses):
        raise ValueError("ready and pods need one value per address")
    slice_ports: list[JSON] = []
    for port in ports:
        port_name, number = port if isinstance(port, tuple) else ("http", port)
        slice_ports.append({"name": port_name, "port": number, "protocol": "TCP"})
    if len({p["name"] for p in slice_ports}) != len(slice_ports):
        raise ValueError("slice port names must be unique: give (name, port) pairs")
    endpoints: list[JSON] = []
    for address, is_ready, pod_name in zip(addresses, readiness, owners, strict=True):
        endpoint: JSON = {
            "addresses": [address],
            "conditions": {"ready": is_ready, "serving": is_ready, "terminating": False},
        }
        if pod_name is not None:
            endpoint["targetRef"] = {"kind": "Pod", "name": pod_name, "namespace": namespace}
        if zone is not None:
            endpoint["zone"] = zone
        endpoints.append(endpoint)
    if name is None:
        digest = hashlib.sha1(repr((addresses, ports)).encode()).hexdigest()[:5]
        name = f"{service}-{digest}"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": _meta(
            name,
            namespace,
            labels={SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: SLICE_CONTROLLER},
        ),
        "addressType": address_type,
        "ports": slice_ports,
        "endpoints": endpoints,
    }


def pod(
    namespace: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    service_account: str = "default",
    ip: str | None = "127.0.0.1",
    ready: bool = True,
) -> JSON:
    """A running Pod (status as the kubelet reports it)."""
    status: JSON = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "serviceAccountName": service_account,
            "containers": [{"name": "app", "image": "example.test/app:1"}],
        },
        "status": status,
    }


def service_account(namespace: str, name: str) -> JSON:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, namespace)}


def traffic_route(namespace: str, name: str, spec: Mapping[str, Any]) -> JSON:
    """A shoal.io/v1alpha1 TrafficRoute; spec as documented in
    shoal/registry/trafficroute.py."""
    return {
        "apiVersion": "shoal.io/v1alpha1",
        "kind": "TrafficRoute",
        "metadata": _meta(name, namespace),
        "spec": dict(spec),
    }
