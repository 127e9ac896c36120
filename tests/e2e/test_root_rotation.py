"""Rotating the root under traffic: old and new trusted side by side."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from cryptography import x509

from shoal import cli, envoy
from shoal.demo import mesh
from shoal.sds import ca
from tests.conftest import write
from tests.e2e.helpers import caught_up, eventually, rotate_root
from tests.e2e.test_mtls import _pair
from tests.manifests import workload


async def test_root_rotation_under_traffic_drops_no_request(
    registry_dir: Path,
    control_plane: cli.ControlPlane,
    local_mesh: mesh.LocalMesh,
    tmp_path: Path,
) -> None:
    a, _ = await _pair(control_plane, registry_dir, local_mesh)
    certificates = control_plane.certificates
    assert certificates is not None
    old_root = certificates.authority.signer.cert
    failures: list[str] = []
    ok = 0
    done = asyncio.Event()

    async def traffic() -> None:
        nonlocal ok
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while not done.is_set():
                try:
                    status, body = await mesh.get(session, a, "b")
                    if status == 200:
                        ok += 1
                    else:
                        failures.append(f"{status}: {body}")
                except aiohttp.ClientError as err:
                    failures.append(repr(err))
                await asyncio.sleep(0.01)

    async def answered(more: int) -> None:
        target = ok + more

        async def enough() -> bool:
            return ok >= target

        await eventually(enough)

    runner = asyncio.create_task(traffic())
    try:
        await answered(20)
        before = ok
        printed = await rotate_root(control_plane.admin_socket)
        for phase in ("trusting-both", "re-issuing", "dropping-old", "done"):
            assert phase in printed
        during = ok - before
        await answered(50)  # on the new root alone
    finally:
        done.set()
        await runner
    assert failures == [], failures[:5]
    assert during > 0

    authority = certificates.authority
    new_root = authority.signer.cert
    assert new_root.serial_number != old_root.serial_number
    # The mesh trusts the new root only; b's certificate comes from it.
    assert x509.load_pem_x509_certificates(authority.trust_bundle) == [new_root]
    held = certificates.get("default", "b-sa")
    held.cert.verify_directly_issued_by(new_root)
    # On disk: the new root is the root, the old one is retired.
    state = tmp_path / "state"
    on_disk, _ = ca.load_or_create(state, "cluster.local")
    assert on_disk.cert.serial_number == new_root.serial_number
    assert [r.cert.serial_number for r in ca.load_retired(state)] == [old_root.serial_number]

    # A sidecar bootstrapped after the rotation joins and talks to the others.
    c_in = envoy.free_port()
    write(registry_dir, "c.yaml", workload("c", "c-sa", c_in))
    await caught_up(control_plane, registry_dir)
    c = await local_mesh.add(
        "c-1", namespace="default", service="c", inbound_port=c_in, service_account="c-sa"
    )
    async with aiohttp.ClientSession() as session:
        assert (await mesh.get(session, c, "b"))[0] == 200

        async def a_reaches_c() -> bool:
            return (await mesh.get(session, a, "c"))[0] == 200

        await eventually(a_reaches_c)
