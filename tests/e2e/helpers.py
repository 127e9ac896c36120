"""Waiting and counting helpers for end-to-end tests."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from shoal import cli
from shoal.demo import mesh
from shoal.model import mesh as model_mesh
from shoal.registry import files
from shoal.sds import ca


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> float:
    """Seconds until `check` holds; fails the test after `timeout`, which is
    a guard against a hang, never the subject of a test: speed is measured
    by the benchmarks (bench/)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        if await check():
            return loop.time() - started
        if loop.time() - started > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def caught_up(cp: cli.ControlPlane, folder: Path, timeout: float = 30.0) -> None:
    """Until the control plane's mesh state is what `folder` says now: a
    sidecar started after this gets that state, however busy the machine."""

    def parts(state: model_mesh.MeshState) -> tuple[object, ...]:
        return (state.services, state.endpoints, state.routes, state.pods, state.namespaces)

    async def same() -> bool:
        return parts(files.FolderRegistry(folder).load()) == parts(cp.controller.state)

    await eventually(same, timeout)


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


async def rotate_root(admin_socket: str, timeout: float = 60.0) -> str:
    """`shoal ca rotate-root --wait`, as an operator types it; what it printed."""
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "shoal.cli",
            "ca",
            "rotate-root",
            "--wait",
            "--admin",
            admin_socket,
            "--timeout",
            str(timeout),
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class ServeProcess:
    """`shoal serve` as a separate process, killable like a crashed control plane."""

    def __init__(
        self,
        registry: Path | None,
        xds_port: int,
        state_dir: Path,
        *,
        kubeconfig: Path | None = None,
        admin_port: int = 0,
        extra: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        """From a manifests folder, or with `kubeconfig` from an API server."""
        self.registry = registry
        self.xds_port = xds_port
        self.state_dir = state_dir
        self.kubeconfig = kubeconfig
        self.admin_port = admin_port
        self.extra = extra
        # Runs it under another command (in a network namespace, say).
        self.prefix = prefix
        self.proc: asyncio.subprocess.Process | None = None
        self.banner = ""
        self.output: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.prefix,
            sys.executable,
            "-m",
            "shoal.cli",
            "--log-level",
            "warning",
            "serve",
            *(
                ["--kubernetes", "--kubeconfig", str(self.kubeconfig)]
                if self.kubeconfig is not None
                else ["--registry", str(self.registry)]
            ),
            *self.extra,
            "--xds-address",
            f"127.0.0.1:{self.xds_port}",
            "--admin-address",
            f"127.0.0.1:{self.admin_port}",
            "--state-dir",
            str(self.state_dir),
            "--join-address",
            "127.0.0.1:0",
            # Beside other control planes: the collector (and the dashboard
            # `--kubernetes` serves) on free ports.
            "--collector-address",
            "127.0.0.1:0",
            *(["--dashboard-address", "127.0.0.1:0"] if self.kubeconfig is not None else []),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        self.banner = line.decode()
        # Keep reading, or a full pipe would stall the control plane.
        self._drain = asyncio.create_task(self._read_rest())
        assert f"xDS on 127.0.0.1:{self.xds_port} (mTLS" in self.banner, self.banner

    def authority(self) -> ca.Authority:
        """The CA the process created (or found) in its state directory."""
        root, _ = ca.load_or_create(self.state_dir, "cluster.local")
        return ca.Authority(root)

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output.append(line.decode())

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> None:
        """Kill it if it runs, and reap it and its output pipe either way (a
        pipe left open outlives the test's event loop)."""
        if self.proc is None:
            return
        self.kill()
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await self.wait()

    async def wait(self) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), 10)
        if self._drain is not None:
            await asyncio.wait_for(self._drain, 5)
        return code
