"""Cost of one new proxy: server CPU to hand a new sidecar its whole configuration.

Writes the same mesh as bench/fanout.py (`--services` Services in namespace
`default`, one port each, one EndpointSlice of 3 endpoints), starts `shoal
serve` on it as fanout does (its own process, mTLS xDS by default, log level
warning), then connects simulated sidecars one at a time: each opens its own
channel and ADS stream with the mesh CA's client certificate, subscribes as
Envoy does (CDS and LDS wildcard; on CDS, EDS to its outbound clusters and SDS
to its two secrets; on LDS, RDS to "outbound"), and ACKs every response until
it holds CDS, EDS, LDS, RDS and SDS (fanout's clients.Proxy, in this process).
Proxy i is a sidecar of Service i mod S with its own outbound port, so every
connect is a snapshot key the server has not seen.

For each connect, the server process's CPU is read before the stream opens
and `--settle` seconds after the proxy ACKed its last type (so the server's
handling of the last ACKs, and its heap keeper's freeze after a burst, are
counted):

* cpu: the sum over the server's threads of /proc/PID/task/TID/schedstat
  (nanoseconds on a CPU; utime + stime, not rounded to clock ticks), less
  what the server spends idle over the same window (shoal serve idles at
  5-8 ms of CPU a second: its file watcher's and heap keeper's timers, the
  gRPC poller thread; measured for `--idle-window` seconds before and after the
  connects; `raw` in the table is before this). The median and p90 over
  `--connects` connects are the figures.
* stat: utime + stime from /proc/PID/stat (clock ticks of 10 ms, converted
  to ms), summed over the measured connects and divided by their number,
  less idling the same way; the user / system columns are that split as
  measured (idling in them). One connect is less than a tick, so only the
  mean is given from it, and it checks the schedstat sums (threads that
  exit are counted there only).
* loop: the event loop's thread alone (the process's main thread), net of
  its own idling; other: the other threads (gRPC's).
* wall: from opening the channel to the ACK of the last type (client side).
* disc: a disconnect, net of idling (without --keep).

By default each proxy disconnects (and the server is left `--settle` seconds)
before the next connects: every connect is then the only stream of its
identity (all proxies are default/default), which is how a workload's first
proxy finds the server, and shoal issues that identity's key and certificate
on it. With `--keep`, proxies stay connected and only the first of the
identity is issued one. `--warmup` connects come first, not counted.

The floor (`--no-floor` to skip): a bare grpc.aio server in its own process
(fanout/floor.py ReplayFloor, started as `bench/fanout.py --replay-server`),
with shoal's gRPC options and the same mTLS, answering each subscription with
the bytes shoal sent the last measured proxy for that type (the same five
responses: CDS, EDS, LDS, RDS, SDS), parsing every request into the same
messages shoal parses. Measured with the same clients the same way.

    .venv/bin/python bench/connect.py [--services 100,1000,10000] [--mode sotw,delta]
        [--connects 30] [--warmup 5] [--keep] [--json]

prints a table (with --json: JSON on stdout, the table on stderr as it goes).

Looking inside, over the measured connects only (each run as
fanout/instrumented_serve.py where it needs to be; shoal is not changed):
`--server-timing FILE` (the loop thread's CPU time in each step of a connect,
TIMED below, to FILE.S-MODE as JSON), `--server-profile FILE` (cProfile of
the loop thread, pstats to FILE.S-MODE; it triples the cost), `--py-spy FILE`
(py-spy samples of the server's Python threads, collapsed stacks;
`--py-spy-bin`), `--perf FILE` (perf record -g of every thread, native and
kernel code included). Variants: `--log-level info` (shoal serve's own
default), `--malloc glibc` (without the malloc tuning shoal serve does at
start), `--xds-security insecure`.
Nothing else should run on the machine: `other_cpu_s` says how much did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fanout import clients, floor, harness, mesh, processes
from fanout.figures import percentile

import shoal

SCRIPT = Path(__file__).resolve()
# What --server-timing times in the server's loop thread: the synchronous
# steps of a connect (and of a disconnect). Some hold others (noted).
TIMED = (
    "shoal.xds.server:peer_pem",
    "shoal.xds.server:AdsServer._identity_of",
    "shoal.xds.cache:SnapshotCache.watch",  # holds Controller._on_watch
    "shoal.xds.controller:Controller._on_watch",  # holds _publish
    "shoal.xds.controller:Controller._publish",  # holds the two below
    "shoal.xds.generators:SidecarGenerator._own",
    "shoal.xds.identities:SecretGroups.group",  # holds _issue
    "shoal.sds.workloads:WorkloadCertificates._issue",
    "shoal.xds.server:AdsServer._on_sotw_request",  # holds _names_of, _subscribe
    "shoal.xds.server:AdsServer._on_delta_request",  # the same
    "shoal.xds.server:_names_of",
    "shoal.xds.server:AdsServer._subscribe",
    "shoal.xds.server:AdsServer._desired",  # holds make_view (a view's first use)
    "shoal.xds.cache:make_view",
    "shoal.xds.server:AdsServer._waiting_for_subscription",
    "shoal.xds.server:AdsServer._absent",
    "shoal.xds.server:AdsServer._diff",
    "shoal.xds.cache:View.chunks",
    "shoal.xds.cache:View.resources",
    "shoal.xds.wire:sotw_response",
    "shoal.xds.wire:delta_response",
    "shoal.xds.cache:SnapshotCache.cancel",  # a disconnect: holds Controller._on_idle
    "shoal.xds.server:AdsServer._release",
    "logging:Logger.info",
    "shoal.heap:HeapKeeper.settle",
)
CONNECT_TIMEOUT_S = 180.0
QUIET_WINDOW_S = 0.5
QUIET_MS = 5.0  # server CPU per QUIET_WINDOW_S below which it is idle
QUIET_TIMEOUT_S = 300.0


# -- the client --------------------------------------------------------------


# -- readings of the server ----------------------------------------------------


@dataclass
class Reading:
    at: float  # time.monotonic()
    ticks: tuple[int, int]
    threads: dict[int, tuple[str, int]]


def read(pid: int) -> Reading:
    return Reading(time.monotonic(), processes.cpu_ticks(pid), processes.threads_cpu_ns(pid))


@dataclass
class Spent:
    """Server CPU between two readings, in ms."""

    cpu_ms: float  # every thread, schedstat
    loop_ms: float  # the main thread (the event loop)
    user_ticks: int
    system_ticks: int
    by_thread: dict[str, float]
    seconds: float  # between the readings


def spent(pid: int, a: Reading, b: Reading) -> Spent:
    by_name: dict[str, float] = {}
    total = loop = 0.0
    for tid, (name, ns) in b.threads.items():
        before = a.threads.get(tid, (name, 0))[1]
        ms = (ns - before) / 1e6
        total += ms
        if tid == pid:
            loop = ms
            name = "main (event loop)"
        by_name[name] = by_name.get(name, 0.0) + ms
    ticks = (b.ticks[0] - a.ticks[0], b.ticks[1] - a.ticks[1])
    return Spent(total, loop, *ticks, by_name, b.at - a.at)


@dataclass
class Idle:
    """What the server spends doing nothing, per second (timers, pollers)."""

    cpu_ms_per_s: float = 0.0
    loop_ms_per_s: float = 0.0

    def net(self, s: Spent) -> tuple[float, float]:
        """(all threads, loop thread) of `s` less what idling would have cost."""
        return s.cpu_ms - self.cpu_ms_per_s * s.seconds, s.loop_ms - self.loop_ms_per_s * s.seconds


async def idle(pid: int, seconds: float) -> Spent:
    a = read(pid)
    await asyncio.sleep(seconds)
    return spent(pid, a, read(pid))


async def quiesce(pid: int) -> float:
    """Wait until the server is idle (start-up build, first collections);
    seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < QUIET_TIMEOUT_S:
        a = read(pid)
        await asyncio.sleep(QUIET_WINDOW_S)
        if spent(pid, a, read(pid)).cpu_ms < QUIET_MS:
            break
    return time.monotonic() - started


# -- one series of connects -----------------------------------------------------


@dataclass
class Row:
    server: str  # shoal, or floor
    services: int
    mode: str
    xds_security: str
    keep: bool
    log_level: str
    malloc: str
    connects: int = 0
    warmup: int = 0
    settle_s: float = 0.0
    # Net of idling (idle_ms_per_s times the connect's window): the figures.
    cpu_ms_median: float = math.nan
    cpu_ms_p90: float = math.nan
    cpu_ms_mean: float = math.nan
    cpu_ms_min: float = math.nan
    cpu_ms_max: float = math.nan
    # /proc/PID/stat over all measured connects, per connect, net of idling.
    stat_ms_mean: float = math.nan
    stat_user_ms_mean: float = math.nan  # user and system as measured (idling in them)
    stat_system_ms_mean: float = math.nan
    loop_ms_median: float = math.nan
    loop_ms_p90: float = math.nan
    other_threads_ms_median: float = math.nan
    # As measured, idling included.
    raw_cpu_ms_median: float = math.nan
    raw_cpu_ms_p90: float = math.nan
    window_s_median: float = math.nan
    by_thread_ms_mean: dict[str, float] = field(default_factory=dict)
    wall_ms_median: float = math.nan
    wall_ms_p90: float = math.nan
    disconnect_cpu_ms_median: float = math.nan  # net of idling
    # Measured before and after the connects, `--idle-window` each; the mean.
    idle_ms_per_s: float = math.nan
    idle_loop_ms_per_s: float = math.nan
    idle_ms_per_s_before_after: tuple[float, float] = (math.nan, math.nan)
    config_bytes: int = 0
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    startup_s: float = math.nan
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    other_cpu_s: float = math.nan
    per_connect_cpu_ms: list[float] = field(default_factory=list)
    per_connect_wall_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


async def series(
    args: argparse.Namespace,
    row: Row,
    pid: int,
    target: str,
    tls: harness.Tls,
    *,
    toggled: bool = False,
    samplers: Sequence[list[str]] = (),
) -> dict[str, bytes]:
    """Connect `--warmup` + `--connects` proxies one at a time to `target`,
    measuring the server `pid`; the responses of the last proxy, by type.
    `toggled`: the server is instrumented_serve.py with cProfile or timings,
    switched on (SIGUSR2) for the measured connects; `samplers`: commands
    (py-spy, perf) attached to it over them, stopped with SIGINT."""
    fleet = clients.Fleet()
    fleet.configure(
        {
            "target": target,
            "mode": row.mode,
            "services": row.services,
            "tls": tls.client(),
            "floor": False,
        }
    )
    row.connects, row.warmup, row.settle_s = args.connects, args.warmup, args.settle
    row.startup_s = await quiesce(pid)
    idle_before = await idle(pid, args.idle_window)
    measured: list[Spent] = []
    walls: list[float] = []
    disconnects: list[Spent] = []
    bodies: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    previous: clients.Proxy | None = None
    sampling: list[asyncio.subprocess.Process] = []
    profiling = False
    try:
        for i in range(args.warmup + args.connects):
            counted = i >= args.warmup
            if i == args.warmup:
                if toggled:
                    os.kill(pid, signal.SIGUSR2)  # cProfile or timings on
                    profiling = True
                for cmd in samplers:
                    sampling.append(await _start_sampler(cmd))
                if sampling:
                    await asyncio.sleep(1.0)  # attached
            if previous is not None and not args.keep:
                before = read(pid)
                await fleet.remove(previous)
                await asyncio.sleep(args.settle)
                if counted:
                    disconnects.append(spent(pid, before, read(pid)))
            before = read(pid)
            started = time.monotonic()
            reply = await fleet.add(i, 1, CONNECT_TIMEOUT_S, make=clients.Recorded)
            if reply["connected"] != 1:
                row.errors.append(f"proxy {i} did not connect: {reply['errors'][:3]}")
                break
            wall_ms = (reply["last_at"] - started) * 1000
            await asyncio.sleep(args.settle)
            after = read(pid)
            proxy = fleet.proxies[-1]
            assert isinstance(proxy, clients.Recorded)
            if counted:
                measured.append(spent(pid, before, after))
                walls.append(wall_ms)
                bodies = proxy.bodies
                sizes = {}
                for type_url, n in proxy.sizes:
                    sizes[type_url] = sizes.get(type_url, 0) + n
            proxy.bodies = {}
            previous = proxy
    except BaseException:
        await fleet.close()
        raise
    finally:
        if profiling:
            os.kill(pid, signal.SIGUSR2)  # cProfile or timings off
        for proc in sampling:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)  # it writes its file and exits
        for proc in sampling:
            await processes.CHILDREN.stop(proc, grace=60.0)
    # The last proxy, left connected until now (with --keep, all of them).
    await fleet.close()
    await asyncio.sleep(args.settle)
    idle_after = await idle(pid, args.idle_window)
    rates = [s.cpu_ms / s.seconds for s in (idle_before, idle_after)]
    row.idle_ms_per_s_before_after = (rates[0], rates[1])
    quiet = Idle(
        sum(rates) / 2,
        (idle_before.loop_ms / idle_before.seconds + idle_after.loop_ms / idle_after.seconds) / 2,
    )
    _summarize(row, quiet, measured, walls, disconnects, sizes)
    return bodies


def _summarize(
    row: Row,
    quiet: Idle,
    measured: list[Spent],
    walls: list[float],
    disconnects: list[Spent],
    sizes: dict[str, int],
) -> None:
    row.idle_ms_per_s, row.idle_loop_ms_per_s = quiet.cpu_ms_per_s, quiet.loop_ms_per_s
    if not measured:
        return
    net = [quiet.net(s) for s in measured]
    cpu = [c for c, _ in net]
    loop = [lp for _, lp in net]
    n = len(measured)
    row.per_connect_cpu_ms = cpu
    row.per_connect_wall_ms = walls
    row.cpu_ms_median = _median(cpu)
    row.cpu_ms_p90 = percentile(cpu, 90)
    row.cpu_ms_mean = sum(cpu) / n
    row.cpu_ms_min, row.cpu_ms_max = min(cpu), max(cpu)
    row.raw_cpu_ms_median = _median([s.cpu_ms for s in measured])
    row.raw_cpu_ms_p90 = percentile([s.cpu_ms for s in measured], 90)
    row.window_s_median = _median([s.seconds for s in measured])
    user = sum(s.user_ticks for s in measured) * processes.TICK_MS / n
    system = sum(s.system_ticks for s in measured) * processes.TICK_MS / n
    row.stat_user_ms_mean, row.stat_system_ms_mean = user, system
    windows = sum(s.seconds for s in measured) / n
    row.stat_ms_mean = user + system - quiet.cpu_ms_per_s * windows
    row.loop_ms_median = _median(loop)
    row.loop_ms_p90 = percentile(loop, 90)
    row.other_threads_ms_median = _median([c - lp for c, lp in net])
    names = {name for s in measured for name in s.by_thread}
    row.by_thread_ms_mean = {
        name: sum(s.by_thread.get(name, 0.0) for s in measured) / n for name in sorted(names)
    }
    row.wall_ms_median = _median(walls)
    row.wall_ms_p90 = percentile(walls, 90)
    row.disconnect_cpu_ms_median = _median([quiet.net(s)[0] for s in disconnects])
    row.bytes_by_type = {k.rsplit(".", 1)[-1]: v for k, v in sizes.items()}
    row.config_bytes = sum(sizes.values())


# -- profiles -------------------------------------------------------------------


def py_spy_command(args: argparse.Namespace, pid: int, output: Path) -> list[str]:
    cmd = [
        args.py_spy_bin,
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(args.py_spy_rate),
        "--format",
        "raw",
        "--threads",
        # Without it py-spy stops the server at every sample, which costs it
        # system time of its own.
        "--nonblocking",
        "--output",
        str(output),
    ]
    if args.py_spy_native:
        cmd.append("--native")
    return cmd


def perf_command(args: argparse.Namespace, pid: int, output: Path) -> list[str]:
    return ["perf", "record", "-F", str(args.perf_rate), "-g", "-p", str(pid), "-o", str(output)]


async def _start_sampler(cmd: list[str]) -> asyncio.subprocess.Process:
    return processes.CHILDREN.add(
        await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
    )


# -- shoal, then the floor ---------------------------------------------------------


async def measure_shoal(
    args: argparse.Namespace, row: Row, registry: Path, work: Path, tls: harness.Tls
) -> dict[str, bytes]:
    tag = f"{row.services}-{row.mode}"
    cprofile = f"{args.server_profile}.{tag}" if args.server_profile else ""
    extra_env: dict[str, str] = {}
    if args.malloc == "glibc":
        extra_env["FANOUT_MALLOC"] = "glibc"
    if args.server_timing:
        extra_env["FANOUT_TIMED"] = f"{args.server_timing}.{tag}"
        extra_env["FANOUT_TIMED_FUNCS"] = ",".join(TIMED)
    server = await harness.start_shoal(
        registry,
        work,
        harness.ServeOptions(insecure_xds=args.xds_security == "insecure", server_profile=cprofile),
        log_level=args.log_level,
        extra_env=extra_env,
    )
    samplers = []
    if args.py_spy:
        samplers.append(py_spy_command(args, server.pid, Path(f"{args.py_spy}.{tag}")))
    if args.perf:
        samplers.append(perf_command(args, server.pid, Path(f"{args.perf}.{tag}")))
    try:
        return await series(
            args,
            row,
            server.pid,
            f"127.0.0.1:{server.xds_port}",
            tls,
            toggled=bool(cprofile or args.server_timing),
            samplers=samplers,
        )
    finally:
        await processes.CHILDREN.stop(server.proc)


async def measure_floor(
    args: argparse.Namespace, row: Row, bodies: dict[str, bytes], work: Path, tls: harness.Tls
) -> None:
    proc, port = await floor.start_replay(work, f"{row.services}-{row.mode}", bodies, tls)
    try:
        await series(args, row, proc.pid, f"127.0.0.1:{port}", tls)
    finally:
        await processes.CHILDREN.stop(proc)


async def _timed(row: Row, run: Any) -> Any:
    """Run `run` (a coroutine), noting the load and other processes' CPU."""
    row.load_before = os.getloadavg()
    machine0, ours0 = processes.machine_cpu_s(), processes.own_cpu_s()
    try:
        return await run
    finally:
        # Every child has been waited for, so its CPU time is in own_cpu_s().
        row.other_cpu_s = max(
            0.0, (processes.machine_cpu_s() - machine0) - (processes.own_cpu_s() - ours0)
        )
        row.load_after = os.getloadavg()


async def coordinator(args: argparse.Namespace) -> list[Row]:
    processes.raise_open_files()
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="shoal-connect-") as tmp:
        work = Path(tmp)
        tls = (
            harness.Tls.from_state(work / "state")
            if args.xds_security == "mtls"
            else harness.Tls(False)
        )
        try:
            for services in args.services:
                registry = work / f"registry-{services}"
                registry.mkdir()
                mesh.write_manifests(registry, services)
                for mode in args.mode:
                    common = (
                        services,
                        mode,
                        args.xds_security,
                        args.keep,
                        args.log_level,
                        args.malloc,
                    )
                    row = Row("shoal", *common)
                    bodies = await _timed(row, measure_shoal(args, row, registry, work, tls))
                    rows.append(row)
                    _report(args, row, header=len(rows) == 1)
                    if args.no_floor or row.errors or not bodies:
                        continue
                    floor_row = Row("floor", *common)
                    await _timed(floor_row, measure_floor(args, floor_row, bodies, work, tls))
                    rows.append(floor_row)
                    _report(args, floor_row, header=False)
        finally:
            await processes.CHILDREN.stop_all()
    return rows


# -- output -------------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


COLUMNS = (
    ("services", 8),
    ("mode", 5),
    ("server", 6),
    ("cpu p50", 7),
    ("cpu p90", 7),
    ("mean", 6),
    ("/stat", 6),
    ("user", 5),
    ("sys", 5),
    ("loop p50", 8),
    ("other p50", 9),
    ("wall p50", 8),
    ("wall p90", 8),
    ("disc p50", 8),
    ("config KB", 9),
    ("idle/s", 6),
    ("raw p50", 7),
    ("other s", 7),
)


def _report(args: argparse.Namespace, row: Row, header: bool) -> None:
    # With --json the table goes to stderr, row by row, and JSON to stdout.
    out = sys.stderr if args.json else sys.stdout
    if header:
        print(
            f"connects one at a time: {args.connects} measured after {args.warmup} warm-up; "
            f"xDS {row.xds_security}; {'earlier proxies stay' if row.keep else 'each alone'}; "
            f"log level {row.log_level}; malloc {row.malloc}; settle {args.settle} s; "
            "server CPU in ms per connect, net of idling (idle/s x window; raw: as measured)",
            file=out,
        )
        print(" ".join(f"{name:>{width}}" for name, width in COLUMNS), file=out)
    cells = (
        f"{row.services:,}",
        row.mode,
        row.server,
        _f(row.cpu_ms_median),
        _f(row.cpu_ms_p90),
        _f(row.cpu_ms_mean),
        _f(row.stat_ms_mean),
        _f(row.stat_user_ms_mean),
        _f(row.stat_system_ms_mean),
        _f(row.loop_ms_median),
        _f(row.other_threads_ms_median),
        _f(row.wall_ms_median),
        _f(row.wall_ms_p90),
        _f(row.disconnect_cpu_ms_median),
        _f(row.config_bytes / 1000, 0),
        _f(row.idle_ms_per_s, 2),
        _f(row.raw_cpu_ms_median),
        _f(row.other_cpu_s, 1),
    )
    line = " ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True))
    print(line, file=out, flush=True)
    for e in row.errors:
        print(f"  problem: {e}", file=out)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def json_rows(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [
        {
            **_rounded(asdict(r)),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "shoal": str(Path(shoal.__file__).resolve().parent.parent),
        }
        for r in rows
    ]


# -- the command line -------------------------------------------------------------


def _numbers(text: str) -> list[int]:
    values = [int(x.replace("_", "")) for x in text.split(",")]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("positive numbers, comma-separated")
    return values


def _modes(text: str) -> list[str]:
    values = text.split(",")
    if not values or any(v not in ("sotw", "delta") for v in values):
        raise argparse.ArgumentTypeError("sotw and/or delta, comma-separated")
    return values


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Cost of one new proxy: shoal serve's CPU per sidecar connecting alone."
    )
    p.add_argument("--services", type=_numbers, default=[100, 1000, 10000], help="100,1000,10000")
    p.add_argument("--mode", type=_modes, default=["sotw", "delta"], help="sotw,delta")
    p.add_argument("--connects", type=int, default=30, help="measured connects (30)")
    p.add_argument("--warmup", type=int, default=5, help="connects first, not counted (5)")
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds after each connect (and disconnect) before the server's CPU is read "
        "(1.0: past the heap keeper's freeze, 0.5 s after a burst)",
    )
    p.add_argument(
        "--idle-window",
        type=float,
        default=3.0,
        help="seconds the idle server's CPU is read, before and after the connects (3.0)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="earlier proxies stay connected (default: each disconnects before the next)",
    )
    p.add_argument("--xds-security", choices=("mtls", "insecure"), default="mtls")
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        help="shoal serve's --log-level (warning, as bench/fanout.py; shoal's default is info)",
    )
    p.add_argument(
        "--malloc",
        choices=("tuned", "glibc"),
        default="tuned",
        help="tuned: as shoal serve runs; glibc: without its malloc tuning",
    )
    p.add_argument("--no-floor", action="store_true", help="skip the bare gRPC server")
    p.add_argument(
        "--json", action="store_true", help="print JSON (and the table to stderr, as it goes)"
    )
    p.add_argument(
        "--server-profile",
        default="",
        metavar="FILE",
        help="cProfile shoal serve's loop thread (its CPU time) over the measured connects; "
        "pstats to FILE.SERVICES-MODE",
    )
    p.add_argument(
        "--server-timing",
        default="",
        metavar="FILE",
        help="time the steps of a connect in shoal serve's loop thread (its CPU time) over "
        "the measured connects; {function: [calls, seconds]} to FILE.SERVICES-MODE",
    )
    p.add_argument(
        "--py-spy",
        default="",
        metavar="FILE",
        help="py-spy record every server thread over the measured connects; collapsed "
        "stacks to FILE.SERVICES-MODE",
    )
    p.add_argument("--py-spy-bin", default="py-spy")
    p.add_argument("--py-spy-rate", type=int, default=250, help="samples per second (250)")
    p.add_argument("--py-spy-native", action="store_true", help="native frames too")
    p.add_argument(
        "--perf",
        default="",
        metavar="FILE",
        help="perf record -g the server over the measured connects, to FILE.SERVICES-MODE",
    )
    p.add_argument("--perf-rate", type=int, default=999, help="samples per second (999)")
    args = p.parse_args(argv)
    if args.connects < 1 or args.warmup < 0 or args.settle < 0 or args.idle_window <= 0:
        p.error(
            "--connects must be at least 1, --warmup and --settle at least 0, --idle-window above 0"
        )
    if mesh.FIRST_OUTBOUND_PORT + args.warmup + args.connects > 65535:
        p.error("too many connects (one outbound port each)")
    # The server runs in a temporary directory.
    args.server_profile = os.path.abspath(args.server_profile) if args.server_profile else ""
    args.py_spy = os.path.abspath(args.py_spy) if args.py_spy else ""
    args.perf = os.path.abspath(args.perf) if args.perf else ""
    args.server_timing = os.path.abspath(args.server_timing) if args.server_timing else ""
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        rows = asyncio.run(coordinator(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("connect: interrupted", file=sys.stderr)
        return 130
    finally:
        processes.CHILDREN.kill_all_now()
    if args.json:
        print(json.dumps(json_rows(rows)))
    return 0 if rows and not any(r.errors for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
