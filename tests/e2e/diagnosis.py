"""Asking a running control plane what is wrong, as `shoal analyze` does,
and timing how long after a misconfiguration it says so.

Set SHOAL_DIAGNOSIS_TIMES=FILE to append one JSON line per diagnosis
(code, seconds from the misconfiguration to the diagnosis): the figures of
the catalogue's closing note come from there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp

from shoal import cli
from tests.e2e.helpers import eventually

Found = list[dict[str, str]]


async def problems(cp: cli.ControlPlane) -> Found:
    """`/debug/problems` of the control plane, over its admin socket."""
    connector = aiohttp.UnixConnector(path=cp.admin_socket)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://shoal/debug/problems") as r,
    ):
        assert r.status == 200, await r.text()
        found: Found = await r.json()
        return found


def of_code(found: Found, code: str, about: str = "") -> list[dict[str, str]]:
    """The problems with `code` whose object, field or reason mention `about`."""
    return [
        p
        for p in found
        if p["code"] == code and about in f"{p['object']} {p['field']} {p['reason']}"
    ]


async def diagnosed(
    cp: cli.ControlPlane,
    code: str,
    about: str = "",
    *,
    since: float | None = None,
    timeout: float = 60.0,
) -> dict[str, str]:
    """Waits until the control plane names a problem of `code` (about
    `about`) and returns it; `since` (loop time of the misconfiguration)
    makes the wait a recorded figure."""
    loop = asyncio.get_running_loop()
    started = loop.time() if since is None else since
    seen: list[dict[str, str]] = []

    async def named() -> bool:
        seen[:] = of_code(await problems(cp), code, about)
        return bool(seen)

    await eventually(named, timeout)
    record(code, loop.time() - started)
    return seen[0]


async def cleared(cp: cli.ControlPlane, code: str, about: str = "", timeout: float = 60.0) -> None:
    """Waits until no problem of `code` (about `about`) is named."""

    async def gone() -> bool:
        return not of_code(await problems(cp), code, about)

    await eventually(gone, timeout)


def record(code: str, seconds: float) -> None:
    target = os.environ.get("SHOAL_DIAGNOSIS_TIMES")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps({"code": code, "seconds": round(seconds, 3)}) + "\n")


def analyze_cli(cp: cli.ControlPlane, *flags: str) -> subprocess.CompletedProcess[str]:
    """`shoal analyze` as a user runs it, against this control plane."""
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli", "analyze", "--admin", cp.admin_socket, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
