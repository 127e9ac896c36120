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
