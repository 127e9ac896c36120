"""SHL0301: sidecars serving a Service under an identity its callers refuse.

The case a new user met: local sidecars bootstrapped with
`--service-account inventory` (and `storefront`), the Services and
EndpointSlices written as the README shows, no Pods. Callers expected
`sa/default` behind `inventory` and every call failed its certificate check,
while every proxy was SYNCED and `shoal analyze` said nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from shoal import cli, envoy
from shoal.demo import mesh
from tests.conftest import write
from tests.e2e import diagnosis
from tests.e2e.helpers import caught_up, eventually


def _service(name: str, port: int, account: str | None) -> str:
    """A Service and its EndpointSlice as the README writes them; `account`
    declares the endpoints' service account (None: not declared)."""
    declared = f"\n  annotations: {{shoal.io/service-account: {account}}}" if account else ""
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: shop
  labels: {{kubernetes.io/service-name: {name}}}{declared}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: ["127.0.0.1"]
"""


async def _status(session: aiohttp.ClientSession, via: mesh.Workload, host: str) -> int:
    try:
        status, _ = await mesh.get(session, via, host)
    except aiohttp.ClientError:
        return 0
    return status


async def test_a_service_served_under_an_identity_its_callers_refuse_is_named(
    control_plane: cli.ControlPlane, registry_dir: Path, local_mesh: mesh.LocalMesh
) -> None:
    ports = {"inventory": envoy.free_port(), "storefront": envoy.free_port()}
    # The storefront's slice declares its service account; inventory's, as
    # the README's first example, does not.
    write(
        registry_dir, "storefront.yaml", _service("storefront", ports["storefront"], "storefront")
    )
    write(registry_dir, "inventory.yaml", _service("inventory", ports["inventory"], None))
    await caught_up(control_plane, registry_dir)
    loop = asyncio.get_running_loop()
    misconfigured = loop.time()
    storefront = await local_mesh.add(
        "storefront-1",
        namespace="shop",
        service="storefront",
        inbound_port=ports["storefront"],
        service_account="storefront",
    )
    await local_mesh.add(
        "inventory-1",
        namespace="shop",
        service="inventory",
        inbound_port=ports["inventory"],
        service_account="inventory",
    )
    async with aiohttp.ClientSession() as session:
        # The symptom: the caller's sidecar refuses the certificate of
        # inventory's sidecar, whatever it is asked.
        async def refused() -> bool:
            return await _status(session, storefront, "inventory") == 503

        await eventually(refused)
        assert all([await refused() for _ in range(5)])

        # The diagnosis names the Service, the proxy, both identities and the fix.
        found = await diagnosis.diagnosed(
            control_plane, "SHL0301", "shop/inventory", since=misconfigured
        )
        assert found["object"] == "Service shop/inventory"
        assert found["severity"] == "Error"
        assert "sidecar~shop~inventory-1" in found["reason"]
        assert "spiffe://cluster.local/ns/shop/sa/inventory" in found["reason"]
        assert "callers expect spiffe://cluster.local/ns/shop/sa/default" in found["reason"]
        assert "shoal.io/service-account: inventory" in found["fix"]
        # The callers' sidecars counted the failed checks: the analyzer says so.
        await diagnosis.diagnosed(control_plane, "SHL0301", "already failed that check")
        # The storefront is served as the identity it declares: silent.
        assert not diagnosis.of_code(
            await diagnosis.problems(control_plane), "SHL0301", "storefront"
        )

        shown = await asyncio.to_thread(diagnosis.analyze_cli, control_plane)
        assert shown.returncode == 1, shown.stdout
        assert "Error [SHL0301] Service shop/inventory" in shown.stdout
        print(shown.stdout)  # the README's example comes from here (pytest -s)
        as_json = await asyncio.to_thread(diagnosis.analyze_cli, control_plane, "-o", "json")
        assert [p["code"] for p in json.loads(as_json.stdout)] == ["SHL0301"]

        # The fix the analyzer gave: the slice declares who its endpoints are.
        write(
            registry_dir, "inventory.yaml", _service("inventory", ports["inventory"], "inventory")
        )

        async def served() -> bool:
            return await _status(session, storefront, "inventory") == 200

        await eventually(served)
        await diagnosis.cleared(control_plane, "SHL0301")
        shown = await asyncio.to_thread(diagnosis.analyze_cli, control_plane)
        assert shown.returncode == 0, shown.stdout


def _bootstrap(state_dir: Path, out: Path, inbound_port: int, account: str) -> tuple[int, str]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "bootstrap",
            "--namespace",
            "shop",
            "--service",
            "inventory",
            "--service-account",
            account,
            "--app-port",
            "1",
            "--inbound-port",
            str(inbound_port),
            "--outbound-port",
            "2",
            "--admin-port",
            "3",
            "--state-dir",
            str(state_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stderr


async def test_bootstrap_refuses_an_identity_the_manifests_do_not_declare(
    control_plane: cli.ControlPlane, registry_dir: Path, tmp_path: Path
) -> None:
    port = envoy.free_port()
    write(registry_dir, "inventory.yaml", _service("inventory", port, "inventory"))
    await caught_up(control_plane, registry_dir)
    state_dir = Path(control_plane.admin_socket).parent
    code, said = await asyncio.to_thread(_bootstrap, state_dir, tmp_path / "a", port, "default")
    assert code == 1
    assert (
        f"the endpoint 127.0.0.1:{port} of Service shop/inventory is declared as service "
        "account 'inventory', so its callers will refuse this sidecar's certificate "
        "('default')" in said
    )
    assert not (tmp_path / "a").exists()
    code, said = await asyncio.to_thread(_bootstrap, state_dir, tmp_path / "b", port, "inventory")
    assert code == 0 and said == ""
    assert (tmp_path / "b" / "envoy.yaml").is_file()


def test_bootstrap_without_a_control_plane_says_how_callers_will_know_the_account(
    tmp_path: Path,
) -> None:
    code, said = _bootstrap(tmp_path / "state", tmp_path / "out", 16001, "inventory")
    assert code == 0
    assert "callers of shop/inventory verify the service account its endpoints declare" in said
    assert "shoal.io/service-account: inventory" in said
