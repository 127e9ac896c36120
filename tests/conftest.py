"""Shared fixtures: a real control plane and real Envoy sidecars on 127.0.0.1."""

from __future__ import annotations

import datetime
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal import cli
from shoal.demo import mesh
from shoal.model import mesh as model_mesh

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The identity the test control planes take as an admin's (namespace/service account).
ADMIN_IDENTITY = "shoal-system/shoal-admin"


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "registry"
    folder.mkdir()
    return folder


@pytest.fixture
def xds_security() -> str:
    """mTLS, as `shoal serve` runs by default. Suites that speak the xDS
    protocol itself with a bare client override this with "insecure"."""
    return "mtls"


@pytest.fixture
def workload_ttl() -> datetime.timedelta:
    """Lifetime of workload certificates; rotation tests shorten it."""
    return datetime.timedelta(hours=24)


@pytest.fixture
def telemetry() -> model_mesh.Telemetry:
    """The mesh-wide tracing and access-log settings (`shoal serve` flags);
    a test parametrizes `telemetry` to change them."""
    return model_mesh.Telemetry()


@pytest.fixture
async def control_plane(
    registry_dir: Path,
    tmp_path: Path,
    xds_security: str,
    workload_ttl: datetime.timedelta,
    telemetry: model_mesh.Telemetry,
) -> AsyncIterator[cli.ControlPlane]:
    """`shoal serve --registry` on free ports, with a short debounce."""
    options = cli.ServeOptions(
        registry=registry_dir,
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        state_dir=tmp_path / "state",
        join_address="127.0.0.1:0",
        collector_address="127.0.0.1:0",
        debounce_quiet=0.05,
        debounce_max=0.5,
        insecure_xds=xds_security == "insecure",
        workload_ttl=workload_ttl,
        admin_identities=(ADMIN_IDENTITY,),
        telemetry=telemetry,
    )
    async with cli.control_plane(options) as cp:
        yield cp


@pytest.fixture(params=["sotw", "delta"])
def xds_mode(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs with both state-of-the-world and delta Envoys."""
    mode: str = request.param
    return mode


@pytest.fixture
async def local_mesh(
    tmp_path: Path, control_plane: cli.ControlPlane, xds_mode: str
) -> AsyncIterator[mesh.LocalMesh]:
    """Apps and Envoy sidecars, every one stopped when the test ends."""
    m = mesh.LocalMesh(
        tmp_path / "sidecars",
        control_plane.xds_port,
        delta=xds_mode == "delta",
        authority=control_plane.authority,
        collector_port=control_plane.collector_port,
    )
    try:
        yield m
    finally:
        try:
            await m.close()
        finally:
            m.kill_all()


def write(folder: Path, name: str, text: str) -> Path:
    """Write a manifest atomically, as editors and `kubectl` users do."""
    path = folder / name
    tmp = folder / f".{name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)
    return path


def copy_example(name: str, target: Path) -> None:
    shutil.copytree(EXAMPLES / name, target, dirs_exist_ok=True)
