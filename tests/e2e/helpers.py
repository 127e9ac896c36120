"""Waiting and counting helpers for end-to-end tests."""

from __future__ import annotations

import asyncio
import collections
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from shoal.demo import mesh


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until `check` holds; fails the test after `timeout`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        if await check():
            return loop.time() - started
        if loop.time() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def who_answers(
    session: aiohttp.ClientSession, via: mesh.Workload, host: str, count: int
) -> collections.Counter[str]:
    """Instances that answered `count` requests from `via` to `host` ('!<status>' for errors)."""
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        try:
            status, body = await mesh.get(session, via, host)
        except aiohttp.ClientError as err:
            seen[f"!{type(err).__name__}"] += 1
            continue
        if status == 200 and isinstance(body, dict):
            seen[str(body["instance"])] += 1
        else:
            seen[f"!{status}"] += 1
    return seen


class ServeProcess:
    """`shoal serve` as a separate process, killable like a crashed control plane."""

    def __init__(self, registry: Path, xds_port: int) -> None:
        self.registry = registry
        self.xds_port = xds_port
        self.proc: asyncio.subprocess.Process | None = None
        self.banner = ""

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "shoal.cli",
            "--log-level",
            "warning",
            "serve",
            "--registry",
            str(self.registry),
            "--xds-address",
            f"127.0.0.1:{self.xds_port}",
            "--admin-address",
            "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        self.banner = line.decode()
        assert f"xDS on 127.0.0.1:{self.xds_port}" in self.banner, self.banner

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def wait(self) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), 10)
