"""A Kubernetes Pod's sidecar (traffic captured by iptables) against the real
control plane and a real Envoy: its configuration is served, accepted and
put in place. Capture itself needs iptables and a network namespace, which
tests cannot have here; the listeners' behaviour is covered by golden files
and `envoy --mode validate` (tests/xds/test_capture.py)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from shoal import cli, envoy, sidecar_files
from shoal.model import proxy
from shoal.xds.translate import names
from tests.conftest import write
from tests.e2e.helpers import eventually

POD = """apiVersion: v1
kind: Pod
metadata: {name: reviews-1, namespace: shop, uid: 0f6c-11, labels: {app: reviews}}
spec: {serviceAccountName: reviews}
status: {podIP: 10.1.0.7}
"""

MESH = """apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 9080}, {name: tcp-metrics, port: 9100}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: reviews-1
  namespace: shop
  labels: {kubernetes.io/service-name: reviews}
addressType: IPv4
ports: [{name: http, port: 9080}, {name: tcp-metrics, port: 9100}]
endpoints:
  - addresses: [10.1.0.7]
    conditions: {ready: true}
    targetRef: {kind: Pod, name: reviews-1}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  ports: [{name: tcp-pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: tcp-pg, port: 5432}]
endpoints:
  - addresses: [10.1.0.9]
    conditions: {ready: true}
"""


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def _dump(admin: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(await _get(f"{admin}/config_dump"))
    return data


def _listeners(dump: dict[str, object]) -> dict[str, str]:
    """Active listeners by name, with their state ("active" or "warming")."""
    out: dict[str, str] = {}
    for config in dump["configs"]:  # type: ignore[attr-defined]
        if not config["@type"].endswith("ListenersConfigDump"):
            continue
        for item in config.get("dynamic_listeners", []):
            if "active_state" in item:
                out[item["name"]] = "active"
            elif "warming_state" in item:
                out.setdefault(item["name"], "warming")
            if "error_state" in item:
                out[item["name"]] = "error: " + json.dumps(item["error_state"])
    return out


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_captured_pods_sidecar_is_configured_and_accepts_it(
    registry_dir: Path, tmp_path: Path, control_plane: cli.ControlPlane, delta: bool
) -> None:
    write(registry_dir, "pod.yaml", POD)
    write(registry_dir, "mesh.yaml", MESH)
    s = proxy.CapturedSidecar(
        namespace="shop",
        pod="reviews-1",
        pod_uid="0f6c-11",
        service_account="reviews",
        ip="10.1.0.7",
        # Free ports, since this Envoy shares the machine with other tests.
        outbound_port=envoy.free_port(),
        inbound_port=envoy.free_port(),
    )
    admin_port = envoy.free_port()
    config = sidecar_files.write(
        tmp_path / "pod",
        s,
        xds_host="127.0.0.1",
        xds_port=control_plane.xds_port,
        admin_port=admin_port,
        delta=delta,
        authority=control_plane.authority,
        stats_port=envoy.free_port(),
        health_port=envoy.free_port(),
    )
    proc = envoy.EnvoyProcess(config, admin_port, tmp_path / "envoy.log")
    await proc.start()
    try:
        await proc.wait_ready()
        found: dict[str, str] = {}

        wanted = (names.VIRTUAL_OUTBOUND, names.VIRTUAL_INBOUND)

        async def both_active() -> bool:
            found.update(_listeners(await _dump(proc.admin)))
            return all(found.get(n) == "active" for n in wanted)

        await eventually(both_active)
        text = json.dumps(await _dump(proc.admin))
        assert "outbound|5432|original-dst|db.shop.svc.cluster.local" in text, "headless db"
        assert '"name": "9080"' in text, "the route table of the HTTP port"
        assert "spiffe://cluster.local/ns/shop/sa/reviews" in text
        stats = await _get(f"{proc.admin}/stats?filter=update_rejected")
        rejected = [line for line in stats.splitlines() if not line.endswith(": 0")]
        assert rejected == [], f"Envoy rejected configuration: {rejected}"
    finally:
        await proc.stop()
