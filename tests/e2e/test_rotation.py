"""Certificate rotation under continuous traffic: no request may notice."""

from __future__ import annotations

import asyncio
import datetime
import json
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from shoal import cli
from shoal.demo import mesh
from tests.e2e.test_mtls import _pair

TTL = datetime.timedelta(seconds=6)


@pytest.fixture
def workload_ttl() -> datetime.timedelta:
    # Renewed at half the lifetime minus up to 10 %: every 2.4-3 s.
    return TTL


def _serials(w: mesh.Workload) -> set[str]:
    with urllib.request.urlopen(f"{w.envoy.admin}/certs", timeout=5) as r:
        certs = json.load(r)["certificates"]
    return {chain["serial_number"] for c in certs for chain in c["cert_chain"]}


async def test_workload_certificates_rotate_under_traffic_without_a_failed_request(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    a, b = await _pair(control_plane, registry_dir, local_mesh)
    certificates = control_plane.certificates
    assert certificates is not None
    renewals_before = certificates.renewals
    seen_serials: set[str] = set()
    failures: list[str] = []
    ok = 0

    def enough() -> bool:
        # Both identities renewed at least three times each, and b's Envoy
        # served with at least four different certificates, under traffic.
        return certificates.renewals - renewals_before >= 6 and len(seen_serials) >= 4

    loop = asyncio.get_running_loop()
    give_up = loop.time() + 120.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while not (enough() and ok >= 300):
            assert loop.time() < give_up, (certificates.renewals - renewals_before, seen_serials)
            try:
                status, body = await mesh.get(session, a, "b")
                if status == 200:
                    ok += 1
                else:
                    failures.append(f"{status}: {body}")
            except aiohttp.ClientError as err:
                failures.append(repr(err))
            if ok % 50 == 0:
                seen_serials |= await asyncio.to_thread(_serials, b)
            await asyncio.sleep(0.01)
    assert failures == [], failures[:5]
