"""More than one core for one control plane: `shoal serve --workers N`.

Worker 0 is the process the operator started. Once it listens on the xDS
port it starts workers 1 to N-1, each `shoal serve` again, handed worker 0's
options on its standard input and listening on the very same xDS address:
gRPC binds with SO_REUSEPORT, so the kernel spreads new connections over
every worker's socket. Each worker watches the registry and translates on
its own. Translation is deterministic and versions are digests of content,
so every worker holds the same snapshots under the same versions, and a
proxy that reconnects to another worker is not sent its configuration again
(its workload certificate excepted: each worker issues its own proxies').

Worker 0 alone serves the admin port, dashboard, webhook, join port and
collector. The other workers serve their admin API on a Unix socket of their
own (beside worker 0's), which worker 0 reads for what its own admin API
says of proxies: proxy-status, config dumps, analysis, metrics, readiness,
and what a root rotation waits on. A worker stops when its standard input reaches end of file: when
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
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

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
STOP_TIMEOUT_S = 5.0
# Reading another worker's admin socket.
FETCH_TIMEOUT_S = 10.0
_LENGTH = struct.Struct("!Q")
MAX_OPTIONS = 1 << 20
_CREATED = "_created"


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
    if length > MAX_OPTIONS:
        raise ValueError(f"{length} bytes of options: not worker 0's")
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


class WorkerFailed(RuntimeError):
    """A worker did not start serving."""


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
        self._supervising: asyncio.Task[None] | None = None

    def restarts(self) -> int:
        return sum(max(w.starts - 1, 0) for w in self.workers)

    async def start(self) -> None:
        """Every worker, each serving before this returns; if one fails, the
        others are stopped too."""
        try:
            async with asyncio.TaskGroup() as group:
                for worker in self.workers:
                    group.create_task(self._start(worker))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None

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
        grace = STOP_TIMEOUT_S
        try:
            proc.stdin.write(send_options(self._options_for(worker.index)))
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line, grace = b"", 0.0
        except ConnectionError:
            line = b""  # it exited before it read its options
        except asyncio.CancelledError:
            await self._stop(worker, grace=0.0)
            raise
        if not line.startswith(READY.encode()):
            await self._stop(worker, grace=grace)
            raise WorkerFailed(
                f"xDS worker {worker.index} did not start (exit {proc.returncode}); "
                "its log is above"
            )
        # Keep its stdout read, or a full pipe would stall it.
        worker.output = asyncio.create_task(_drain(proc.stdout))
        log.info("xDS worker %d serving (pid %d)", worker.index, proc.pid)

    async def supervise(self) -> None:
        """Start again any worker that exits, until cancelled or stopped."""
        self._supervising = asyncio.current_task()
        async with asyncio.TaskGroup() as group:
            for worker in self.workers:
                group.create_task(self._keep(worker))

    async def _keep(self, worker: _Worker) -> None:
        delay = RESTART_FIRST_S
        while not self._stopping:
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
            while not self._stopping:
                await self._sleep(delay)
                delay = min(delay * 2, RESTART_MAX_S)
                if self._stopping:
                    return
                try:
                    await self._start(worker)
                    break
                except Exception as err:  # whatever it was, try again later
                    log.warning("%s; trying again in %.1f s", err, delay)

    async def stop(self) -> None:
        """No more restarts; every worker asked to stop (its stdin closed),
        then made to."""
        self._stopping = True
        if self._supervising is not None and self._supervising is not asyncio.current_task():
            self._supervising.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervising
        await asyncio.gather(*(self._stop(w) for w in self.workers))

    async def _stop(self, worker: _Worker, grace: float = STOP_TIMEOUT_S) -> None:
        """Close its stdin, wait `grace`, then SIGTERM, then SIGKILL. No
        signal goes to a process that has exited: subprocess would reap it
        to check, and asyncio would lose its exit status."""
        proc = worker.proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        for ask, wait in ((None, grace), (signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, None)):
            if proc.returncode is not None:
                break
            if ask is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(ask)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), wait)
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


async def fetch(socket_path: Path, path: str) -> tuple[int, str]:
    """GET `path` of a worker's admin API: (HTTP status, the body)."""
    connector = aiohttp.UnixConnector(path=str(socket_path))
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        session.get(f"http://worker{path}") as response,
    ):
        return response.status, await response.text()


async def gather(sockets: Mapping[int, Path], path: str) -> dict[int, tuple[int, str]]:
    """The same GET of every worker, by index; a worker that cannot answer
    (it is starting again) is left out, and logged."""
    found = await asyncio.gather(
        *(fetch(s, path) for s in sockets.values()), return_exceptions=True
    )
    out: dict[int, tuple[int, str]] = {}
    for (index, socket_path), answer in zip(sockets.items(), found, strict=True):
        if isinstance(answer, BaseException):
            log.warning("reading xDS worker %d at %s: %s", index, socket_path, answer)
            continue
        out[index] = answer
    return out


async def every_ready(own: tuple[bool, str], sockets: Mapping[int, Path]) -> tuple[bool, str]:
    """Ready when every worker is: a new connection may land on any."""
    if not own[0]:
        return own
    answers = await gather(sockets, "/ready")
    for index in sockets:
        code, body = answers.get(index, (0, "it does not answer"))
        if code != 200:
            return False, f"xDS worker {index}: {body.strip()}"
    return own


async def every_proxy(
    own: list[dict[str, Any]], sockets: Mapping[int, Path]
) -> list[dict[str, Any]]:
    """proxy-status of the whole control plane: this worker's streams and
    every other worker's, each marked with the worker serving it."""
    found = [{**p, "worker": 0} for p in own]
    for index, (status, body) in (await gather(sockets, "/debug/syncz")).items():
        proxies = json.loads(body) if status == 200 else []
        found += [{**p, "worker": index} for p in proxies]
    return sorted(found, key=lambda p: (str(p.get("id")), p["worker"], p.get("stream", 0)))


Query = Callable[[Mapping[str, str]], Any]


def found_anywhere(own: Query, path: str, sockets: Mapping[int, Path]) -> Query:
    """A query about one proxy (`proxy=ID`, its id or a part of it) answered
    by whichever worker serves it. An exact id wins over a part; a part
    that names proxies on several workers is refused, naming them."""
    if not sockets:
        return own

    async def query(q: Mapping[str, str]) -> Any:
        found: list[dict[str, Any]] = []
        mine = own(q)
        if mine is not None:
            found.append(mine)
        answers = await gather(sockets, f"{path}?{urllib.parse.urlencode(dict(q))}")
        for status, body in answers.values():
            if status == 200:
                found.append(json.loads(body))
            elif status == 400:
                raise ValueError(json.loads(body).get("error", "refused"))
        exact = [f for f in found if f.get("id") == q.get("proxy")]
        if exact or len(found) == 1:
            return (exact or found)[0]
        if found:
            names = ", ".join(sorted(f"{f.get('id')} ({f.get('identity')})" for f in found))
            raise ValueError(f"{q.get('proxy')!r} names {len(found)} proxies: {names}")
        return None

    return query


async def every_metric(own: CollectorRegistry, sockets: Mapping[int, Path]) -> bytes:
    """/metrics of the whole control plane: each family once, each sample
    labelled `worker` with the worker that counted it."""
    merged: dict[str, Metric] = {}

    def add(families: Iterable[Metric], index: int) -> None:
        for family in families:
            # A counter's or histogram's `_created` comes back from the text
            # as a gauge family of its own: left out, not shown twice.
            if family.name.endswith(_CREATED):
                continue
            into = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            into.samples += [
                s._replace(labels={**s.labels, "worker": str(index)})
                for s in family.samples
                if not s.name.endswith(_CREATED)
            ]

    add(own.collect(), 0)
    for index, (status, body) in (await gather(sockets, "/metrics")).items():
        if status == 200:
            add(text_string_to_metric_families(body), index)
    return generate_latest(_Families(list(merged.values())))


class _Families(CollectorRegistry):
    def __init__(self, families: list[Metric]) -> None:
        super().__init__(auto_describe=False)
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def worker_command(log_level: str) -> list[str]:
    """`shoal serve` as a worker, with the Python running this one."""
    # -P: not the current directory first on the import path, as `-m`
    # would put it; a worker holds the CA's key.
    return [sys.executable, "-P", "-m", "shoal.cli", "--log-level", log_level, "serve", "--worker"]
