"""More than one core for one control plane: `shoal serve --workers N`.

Worker 0 is the process the operator started. Once it listens on the xDS
port it starts workers 1 to N-1, each `shoal serve` again, handed worker 0's
options on its standard input and listening on the very same xDS address:
gRPC binds with SO_REUSEPORT, so the kernel spreads new connections over
every worker's socket. Each worker watches the registry and translates on
its own. Translation is deterministic and versions are digests of content,
so every worker holds the same snapshots under the same versions, and a
proxy that reconnects to another worker is not sent its configuration again.

Worker 0 alone serves the admin port, dashboard, webhook, join port and
collector. The other workers serve their admin API on a Unix socket of their
own (beside worker 0's), which worker 0 reads for proxy-status and config
dumps. A worker stops when its standard input reaches end of file: when
worker 0 exits, however it exits, no worker is left serving a mesh nobody
updates. A worker that exits by itself is started again, with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import signal
import struct
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

# The line a worker prints once it serves; worker 0 waits for it.
READY = "shoal: worker ready"
# Restarting a worker that exited: first after this long, doubling to the
# ceiling; a worker that ran this long without exiting starts again at once.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
RESTART_RESET_S = 60.0
# How long a worker may take to serve, and to stop when asked.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# Reading another worker's admin socket.
FETCH_TIMEOUT_S = 10.0
_LENGTH = struct.Struct("!Q")


def socket_of(admin_socket: Path, index: int) -> Path:
    """Worker `index`'s admin socket, beside worker 0's."""
    return admin_socket.with_name(f"{admin_socket.name}.{index}")


def send_options(options: object) -> bytes:
    """What a worker reads first on its standard input."""
    body = pickle.dumps(options, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_options(stdin: asyncio.StreamReader) -> Any:
    """The options worker 0 sent (its own process, over a pipe only it
    holds: nothing else can write there)."""
    (length,) = _LENGTH.unpack(await stdin.readexactly(_LENGTH.size))
    return pickle.loads(await stdin.readexactly(length))


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def until_parent_gone(stdin: asyncio.StreamReader) -> None:
    """Returns when worker 0 closed the pipe or exited."""
    while await stdin.read(4096):
        pass


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    output: asyncio.Task[None] | None = None
    exits: list[int] = field(default_factory=list)


class Pool:
    """Workers 1 to N-1 of one control plane, kept running until `stop`."""

    def __init__(
        self,
        count: int,
        command: Sequence[str],
        options_for: Callable[[int], object],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = lambda: asyncio.get_running_loop().time(),
    ) -> None:
        """`command` starts a worker (it reads its options from stdin);
        `options_for(index)` are what worker `index` is sent."""
        self._command = list(command)
        self._options_for = options_for
        self._sleep = sleep
        self._clock = clock
        self.workers = [_Worker(i) for i in range(1, count)]
        self._stopping = False

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None]

    def restarts(self) -> int:
        return sum(max(w.starts - 1, 0) for w in self.workers)

    async def start(self) -> None:
        """Every worker, each serving before this returns."""
        await asyncio.gather(*(self._start(w) for w in self.workers))

    async def _start(self, worker: _Worker) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # A worker's log lines go where worker 0's go.
            stderr=None,
        )
        worker.proc = proc
        worker.starts += 1
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(send_options(self._options_for(worker.index)))
        await proc.stdin.drain()
        grace = STOP_TIMEOUT_S
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line, grace = b"", 0.0
        if not line.startswith(READY.encode()):
            # Killed only if it does not exit: subprocess reaps an exited
            # process to check, and asyncio would lose its exit status.
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            raise RuntimeError(f"xDS worker {worker.index} did not start (exit {proc.returncode})")
        # Keep its stdout read, or a full pipe would stall it.
        worker.output = asyncio.create_task(_drain(proc.stdout))
        log.info("xDS worker %d serving (pid %d)", worker.index, proc.pid)

    async def supervise(self) -> None:
        """Start again any worker that exits, until cancelled."""
        await asyncio.gather(*(self._keep(w) for w in self.workers))

    async def _keep(self, worker: _Worker) -> None:
        delay = RESTART_FIRST_S
        while True:
            proc = worker.proc
            assert proc is not None
            started = self._clock()
            code = await proc.wait()
            if self._stopping:
                return
            worker.exits.append(code)
            ran = self._clock() - started
            if ran >= RESTART_RESET_S:
                delay = RESTART_FIRST_S
            log.warning(
                "xDS worker %d (pid %d) exited with %s after %.0f s; its proxies "
                "reconnect to the other workers; starting it again in %.1f s",
                worker.index,
                proc.pid,
                _described(code),
                ran,
                delay,
            )
            while True:
                await self._sleep(delay)
                delay = min(delay * 2, RESTART_MAX_S)
                try:
                    await self._start(worker)
                    break
                except (RuntimeError, OSError) as err:
                    log.warning("%s; trying again in %.1f s", err, delay)

    async def stop(self) -> None:
        """Every worker asked to stop (its stdin closed), then made to."""
        self._stopping = True
        await asyncio.gather(*(self._stop(w) for w in self.workers))

    async def _stop(self, worker: _Worker) -> None:
        proc = worker.proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        for ask in (None, signal.SIGTERM, signal.SIGKILL):
            if proc.returncode is not None:
                break
            if ask is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(ask)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        if worker.output is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(worker.output, STOP_TIMEOUT_S)


def _described(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def fetch(socket_path: Path, path: str) -> tuple[int, Any]:
    """GET `path` of a worker's admin API: (HTTP status, its JSON)."""
    connector = aiohttp.UnixConnector(path=str(socket_path))
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(f"http://worker{path}") as response,
    ):
        return response.status, json.loads(await response.text())


async def gather(sockets: Mapping[int, Path], path: str) -> dict[int, tuple[int, Any]]:
    """The same GET of every worker, by index; a worker that cannot answer
    (it is starting again) is left out, and logged."""
    found = await asyncio.gather(
        *(fetch(s, path) for s in sockets.values()), return_exceptions=True
    )
    out: dict[int, tuple[int, Any]] = {}
    for (index, socket_path), answer in zip(sockets.items(), found, strict=True):
        if isinstance(answer, BaseException):
            log.warning("reading xDS worker %d at %s: %s", index, socket_path, answer)
            continue
        out[index] = answer
    return out


async def every_proxy(
    own: list[dict[str, Any]], sockets: Mapping[int, Path]
) -> list[dict[str, Any]]:
    """proxy-status of the whole control plane: this worker's streams and
    every other worker's, each marked with the worker serving it."""
    found = [{**p, "worker": 0} for p in own]
    for index, (status, proxies) in (await gather(sockets, "/debug/syncz")).items():
        if status == 200 and isinstance(proxies, list):
            found += [{**p, "worker": index} for p in proxies]
    return sorted(found, key=lambda p: (str(p.get("id")), p["worker"], p.get("stream", 0)))


Query = Callable[[Mapping[str, str]], Any]


def found_anywhere(own: Query, path: str, sockets: Mapping[int, Path]) -> Query:
    """A query about one proxy answered by whichever worker serves it."""
    if not sockets:
        return own

    async def query(q: Mapping[str, str]) -> Any:
        found = own(q)
        if found is not None:
            return found
        answers = await gather(sockets, f"{path}?{urllib.parse.urlencode(dict(q))}")
        for status, body in answers.values():
            if status == 200:
                return body
            if status == 400:
                raise ValueError(body.get("error", "refused") if isinstance(body, dict) else body)
        return None

    return query


def worker_command(log_level: str) -> list[str]:
    """`shoal serve` as a worker, with the Python running this one."""
    return [sys.executable, "-m", "shoal.cli", "--log-level", log_level, "serve", "--worker"]
