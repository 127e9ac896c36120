"""A control plane with small limits, so that abuse reaches them quickly."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shoal import cli
from shoal.xds import server
from tests.conftest import ADMIN_IDENTITY

# Small enough that an attack in a test reaches every one of them.
GUARDED = server.Limits(
    first_request_s=1.0,
    streams_per_identity=6,
    subscription_bytes=1 << 20,
    identity_bytes=3 << 20,
    unknown_types=3,
)


@pytest.fixture
async def guarded(registry_dir: Path, tmp_path: Path) -> AsyncIterator[cli.ControlPlane]:
    """`shoal serve` (mTLS) with the limits above."""
    options = cli.ServeOptions(
        registry=registry_dir,
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        state_dir=tmp_path / "state",
        join_address="127.0.0.1:0",
        debounce_quiet=0.05,
        debounce_max=0.5,
        workload_ttl=datetime.timedelta(hours=24),
        admin_identities=(ADMIN_IDENTITY,),
        limits=GUARDED,
    )
    async with cli.control_plane(options) as cp:
        yield cp
