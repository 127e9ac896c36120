"""Kubernetes objects as YAML text, for tests of every layer."""

from __future__ import annotations


def service(name: str, namespace: str = "default", port: int = 80, extra: str = "") -> str:
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}{extra}
spec:
  ports:
    - name: http
      port: {port}
"""


def endpoint_slice(
    name: str,
    service: str,
    ports: list[int],
    namespace: str = "default",
    address: str = "127.0.0.1",
    ready: bool = True,
) -> str:
    """One slice per endpoint port: local sidecars share 127.0.0.1."""
    docs = []
    for i, port in enumerate(ports):
        docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-{i}
  namespace: {namespace}
  labels:
    kubernetes.io/service-name: {service}
addressType: IPv4
ports:
  - name: http
    port: {port}
endpoints:
  - addresses: ["{address}"]
    conditions: {{ready: {str(ready).lower()}}}
""")
    return "---\n".join(docs)


def service_with_endpoints(
    name: str, ports: list[int], *, slice_name: str | None = None, namespace: str = "default"
) -> str:
    """A Service and its EndpointSlices, as one multi-document file."""
    return (
        service(name, namespace)
        + "---\n"
        + endpoint_slice(slice_name or name, name, ports, namespace=namespace)
    )


def workload(name: str, account: str, port: int, notes: str = "") -> str:
    """A Service, its Pod (for the service account) and its EndpointSlice."""
    annotations = f"\n  annotations:\n{notes}" if notes else ""
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default{annotations}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}-1, namespace: default}}
spec: {{serviceAccountName: {account}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: ["127.0.0.1"]
    targetRef: {{kind: Pod, name: {name}-1}}
"""
