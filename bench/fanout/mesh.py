"""The simulated mesh: its manifests folder, and the node each proxy
presents (a sidecar of its own, so a snapshot key of its own)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from shoal.xds import node

ENDPOINTS_PER_SLICE = 3
ENDPOINT_PORT = 8080
APP_PORT = 8080
INBOUND_PORT = 15006
FIRST_OUTBOUND_PORT = 20000


def service_name(i: int) -> str:
    return f"svc-{i:05d}"


def _address(index: int) -> str:
    return f"10.{index >> 16 & 0xFF}.{index >> 8 & 0xFF}.{index & 0xFF}"


def service_yaml(i: int) -> str:
    return f"""apiVersion: v1
kind: Service
metadata:
  name: {service_name(i)}
  namespace: default
spec:
  ports:
    - name: http
      port: 80
"""


def slice_yaml(i: int, addresses: Sequence[str]) -> str:
    endpoints = "".join(
        f'  - addresses: ["{a}"]\n    conditions: {{ready: true}}\n' for a in addresses
    )
    return f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service_name(i)}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {service_name(i)}
addressType: IPv4
ports:
  - name: http
    port: {ENDPOINT_PORT}
endpoints:
{endpoints}"""


def addresses_of(i: int) -> list[str]:
    return [_address(i * ENDPOINTS_PER_SLICE + k + 1) for k in range(ENDPOINTS_PER_SLICE)]


def write_manifests(folder: Path, services: int) -> None:
    for i in range(services):
        (folder / f"{service_name(i)}.yaml").write_text(service_yaml(i))
        (folder / f"{service_name(i)}-slice.yaml").write_text(slice_yaml(i, addresses_of(i)))


def move_endpoint(folder: Path, i: int, address: str) -> None:
    """Replace the first endpoint of Service i, atomically (the registry ignores
    the temporary name)."""
    path = folder / f"{service_name(i)}-slice.yaml"
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(slice_yaml(i, [address, *addresses_of(i)[1:]]))
    os.replace(tmp, path)


def node_bytes(index: int, services: int) -> bytes:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            node.NAMESPACE: "default",
            node.SERVICE: service_name(index % services),
            node.APP_PORT: APP_PORT,
            node.INBOUND_PORT: INBOUND_PORT,
            node.OUTBOUND_PORT: FIRST_OUTBOUND_PORT + index,
        }
    )
    n = base_pb2.Node(
        id=f"sidecar~default~proxy-{index}",
        cluster=service_name(index % services),
        metadata=metadata,
    )
    data: bytes = n.SerializeToString()
    return data
