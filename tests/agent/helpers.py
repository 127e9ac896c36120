"""`shoal agent` as a process, as a Pod runs it, on free ports of 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from shoal import envoy


@dataclass
class Ports:
    health: int = field(default_factory=envoy.free_port)
    admin: int = field(default_factory=envoy.free_port)
    stats: int = field(default_factory=envoy.free_port)
    inbound: int = field(default_factory=envoy.free_port)
    outbound: int = field(default_factory=envoy.free_port)


@contextlib.contextmanager
def work_dir() -> Iterator[Path]:
    """A work dir the proxy's user (1337) can reach: pytest's tmp_path is
    under a folder only root may enter."""
    folder = Path(tempfile.mkdtemp(prefix="shoal-agent-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class AgentProcess:
    def __init__(
        self,
        *,
        work: Path,
        log: Path,
        xds_port: int,
        ca_port: int,
        root_pem: bytes,
        token_path: Path,
        env: Mapping[str, str],
        ports: Ports | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.work = work
        self.log = log
        self.ports = ports or Ports()
        self.args = [
            sys.executable,
            "-m",
            "shoal.cli",
            "agent",
            "--xds-address",
            f"127.0.0.1:{xds_port}",
            "--ca-address",
            f"127.0.0.1:{ca_port}",
            "--work-dir",
            str(work),
            "--token-path",
            str(token_path),
            "--health-address",
            "127.0.0.1",
            "--health-port",
            str(self.ports.health),
            "--admin-port",
            str(self.ports.admin),
            "--stats-port",
            str(self.ports.stats),
            "--inbound-port",
            str(self.ports.inbound),
            "--outbound-port",
            str(self.ports.outbound),
            "--drain-seconds",
            "0.5",
            "--concurrency",
            "1",
            *extra,
        ]
        self.env = {**os.environ, **env, "SHOAL_CA_ROOT_PEM": root_pem.decode()}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, env=self.env, stdout=out, stderr=out
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def envoy_pids(self) -> list[int]:
        """Its Envoy children (from /proc: their parent is the agent)."""
        if self.proc is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                exe = os.readlink(entry / "exe")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and exe.endswith("envoy"):
                found.append(int(entry.name))
        return found

    async def stop(self) -> None:
        """Kill it and its Envoy whatever state the test left them in."""
        for pid in self.envoy_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)

    async def get(self, path: str, port: int | None = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{port or self.ports.health}{path}"
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r,
            ):
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return 0, repr(err)
