"""The processes a run starts, stopped whatever happens, and what /proc
says of them and of the machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PYTHON = sys.executable
# The script every child of the benchmark but the server is started from
# (bench/fanout.py, beside this package): workers with --worker, the floor
# with --floor-server.
ENTRY = Path(__file__).resolve().parent.parent / "fanout.py"
BANNER_TIMEOUT_S = 60.0
_TICK = os.sysconf("SC_CLK_TCK")


def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in found:
            found[parts[0]] = int(parts[1])
    return found["VmRSS:"], found["VmHWM:"]


def cpu_s(pid: int) -> float:
    """utime + stime of a process, all threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


TICK_MS = 1000.0 / _TICK


def children(pid: int) -> list[int]:
    """The processes `pid` started that still run."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process, all threads, in clock ticks (TICK_MS each)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


def threads_cpu_ns(pid: int) -> dict[int, tuple[str, int]]:
    """Each live thread of a process: (name, nanoseconds on a CPU), from
    /proc/PID/task/TID/schedstat (not rounded to clock ticks). A thread
    that has exited is no longer counted: cpu_ticks() still is."""
    found: dict[int, tuple[str, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns = int((task / "schedstat").read_text().split()[0])
            name = (task / "comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile
        found[int(task.name)] = (name, ns)
    return found


class Children:
    """Every process this run starts; all are stopped at the end, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    def add(self, proc: asyncio.subprocess.Process) -> asyncio.subprocess.Process:
        self.procs.append(proc)
        return proc

    async def stop(
        self, proc: asyncio.subprocess.Process, timeout: float = 10.0, grace: float = 0.0
    ) -> None:
        """Wait `grace` seconds for it to exit by itself, then SIGTERM, then SIGKILL."""
        if grace and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), grace)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    async def stop_all(self) -> None:
        for proc in list(self.procs):
            await self.stop(proc)

    def kill_all_now(self) -> None:
        """Last resort, outside the event loop."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


CHILDREN = Children()


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _line_starting(path: Path, marker: str) -> str | None:
    return next((x for x in tail(path, 1 << 20).splitlines() if x.startswith(marker)), None)


async def _await_banner(
    proc: asyncio.subprocess.Process, stdout: Path, stderr: Path, marker: str
) -> str:
    deadline = time.monotonic() + BANNER_TIMEOUT_S
    while time.monotonic() < deadline:
        line = _line_starting(stdout, marker)
        if line is not None:
            return line
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no {marker!r} banner (exit {proc.returncode}); stderr:\n{tail(stderr)}")


async def start_process(
    args: Sequence[str], logs: Path, name: str, marker: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = CHILDREN.add(
            await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=o,
                stderr=e,
                cwd=logs,
                env={**os.environ, **(env or {})},
            )
        )
    banner = await _await_banner(proc, out, err, marker)
    return proc, banner


# Runs `shoal serve` in place of `python -m shoal.cli`, for a look inside
# (shoal itself is not changed): tracemalloc snapshots on SIGUSR1; the start and length
# of every garbage collection, registry reload and controller rebuild, and the
# start of every write of a response to a stream, written
# to a JSON file on exit; cProfile of the event-loop thread, switched on and
