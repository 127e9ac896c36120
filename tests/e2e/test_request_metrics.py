"""Request metrics from real sidecars, the istio_requests_total of shoal:
N requests from client to frontend are exactly N in the caller's counter
and in the callee's, labelled by who called whom, and errors are counted
under their response code. Read as Prometheus reads them (each sidecar's
/stats/prometheus: the admin's in local mode, 15090's in a Pod)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from shoal import cli
from shoal.demo import mesh
from tests.conftest import write
from tests.e2e.helpers import caught_up, eventually
from tests.manifests import workload

SPIFFE = "spiffe://cluster.local/ns/default/sa/"
REQUESTS = "envoy_shoal_requests_total"
DURATION_COUNT = "envoy_shoal_request_duration_milliseconds_count"
OK = 20
FAILED = 3  # fewer than outlier detection's consecutive 5xx: no ejection
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\} (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Labels = frozenset[tuple[str, str]]


async def _samples(
    session: aiohttp.ClientSession, w: mesh.Workload
) -> dict[str, dict[Labels, float]]:
    async with session.get(f"{w.envoy.admin}/stats/prometheus") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, dict[Labels, float]] = {}
    for line in text.splitlines():
        found = SAMPLE.match(line)
        if found is not None:
            labels = frozenset(LABEL.findall(found["labels"]))
            out.setdefault(found["name"], {})[labels] = float(found["value"])
    return out


def _delta(
    after: dict[str, dict[Labels, float]], before: dict[str, dict[Labels, float]], name: str
) -> dict[Labels, float]:
    """What `name` counted between two scrapes, by label set."""
    was = before.get(name, {})
    out = {}
    for labels, value in after.get(name, {}).items():
        if value - was.get(labels, 0.0):
            out[labels] = value - was.get(labels, 0.0)
    return out


def _series(**labels: str) -> Labels:
    return frozenset(labels.items())


async def test_requests_are_counted_by_source_destination_and_code(
    registry_dir: Path, control_plane: cli.ControlPlane, local_mesh: mesh.LocalMesh
) -> None:
    ports = {"client": 0, "frontend": 0}
    for name in ports:
        ports[name] = mesh.envoy.free_port()
        write(registry_dir, f"{name}.yaml", workload(name, f"{name}-sa", ports[name]))
    await caught_up(control_plane, registry_dir)
    w = {
        name: await local_mesh.add(
            f"{name}-1",
            namespace="default",
            service=name,
            inbound_port=port,
            service_account=f"{name}-sa",
        )
        for name, port in ports.items()
    }
    client, frontend = w["client"], w["frontend"]
    async with aiohttp.ClientSession() as session:

        async def answered() -> bool:
            status, _ = await mesh.get(session, client, "frontend")
            return status == 200

        await eventually(answered)
        # Counted from here: whatever the warm-up cost is in the baseline.
        before = {name: await _samples(session, x) for name, x in w.items()}
        for _ in range(OK):
            status, _ = await mesh.get(session, client, "frontend")
            assert status == 200
        frontend.app.fail_percent = 100.0
        for _ in range(FAILED):
            status, _ = await mesh.get(session, client, "frontend")
            assert status == 503
        frontend.app.fail_percent = 0.0

        caller = dict(
            reporter="source",
            source_workload="client.default",
            source_identity=f"{SPIFFE}client-sa",
            destination_service="frontend.default",
            destination_identity=f"{SPIFFE}frontend-sa",
            response_flags="-",
        )
        callee = dict(
            reporter="destination",
            source_workload="unknown",
            source_identity=f"{SPIFFE}client-sa",
            destination_service="frontend.default",
            destination_identity=f"{SPIFFE}frontend-sa",
            response_flags="-",
        )
        expected = {
            "client": {
                _series(**caller, response_code="200"): OK,
                _series(**caller, response_code="503"): FAILED,
            },
            "frontend": {
                _series(**callee, response_code="200"): OK,
                _series(**callee, response_code="503"): FAILED,
            },
        }
        # Counters are exact at once.
        after = {name: await _samples(session, x) for name, x in w.items()}
        for name in w:
            assert _delta(after[name], before[name], REQUESTS) == expected[name], name

        # Every counted request has its duration: histograms show what Envoy
        # merged at its last stats flush (every 5 s), so the warm-up's may
        # land after the baseline; their count is the counter's, series by
        # series.
        async def durations_flushed() -> bool:
            for name, x in w.items():
                now = await _samples(session, x)
                for series in expected[name]:
                    counted = now[REQUESTS][series]
                    if now.get(DURATION_COUNT, {}).get(series) != counted:
                        return False
            return True

        await eventually(durations_flushed, 15)
