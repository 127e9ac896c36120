"""One run of the benchmark for each proxy count: shoal serve and its
proxies (connect, pushes, reconnect storm), then the floor with the same
clients and the same bytes."""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import clients, figures, floor, harness, mesh, processes, report

# Between pushes: more than the debounce's 1 s ceiling, so pushes never merge.
PUSH_GAP_S = 1.2
SETTLE_S = 1.0
PUSH_TIMEOUT_S = 30.0
OTHER_CPU_WARNING_S = 5.0


async def push_once(
    workers: clients.Workers,
    trigger: Callable[[], None],
    server_cpu_s: Callable[[], list[float]],
) -> tuple[figures.Push, bytes]:
    """`trigger()` starts a push; the clock starts just before it."""
    await workers.every({"op": "mark"})
    cpu0, client0 = server_cpu_s(), await workers.cpu_s()
    started = time.monotonic()
    trigger()
    replies = await workers.every({"op": "wait_push", "timeout": PUSH_TIMEOUT_S}, PUSH_TIMEOUT_S)
    await asyncio.sleep(0.3)  # let the server take the last ACKs
    cpu1, client1 = server_cpu_s(), await workers.cpu_s()
    acked_at = [t for r in replies for t in r["acked_at"]]
    latencies = [(t - started) * 1000 for t in acked_at]
    sample = next((bytes.fromhex(r["sample"]) for r in replies if r["sample"]), b"")
    push = figures.Push(
        p50_ms=figures.percentile(latencies, 50),
        p99_ms=figures.percentile(latencies, 99),
        first_ms=min(latencies, default=math.nan),
        last_ms=max(latencies, default=math.nan),
        acked=len(latencies),
        missing=sum(r["missing"] for r in replies),
        server_cpu_s=sum(cpu1) - sum(cpu0),
        server_cpu_each_s=tuple(b - a for a, b in zip(cpu0, cpu1, strict=False)),
        client_cpu_s=client1 - client0,
        bytes=len(sample),
        resources=figures.resource_count(sample),
        window=(started, max(acked_at, default=started)),
    )
    return push, sample


async def measure_shoal(
    args: argparse.Namespace,
    r: figures.Result,
    workers: clients.Workers,
    work: Path,
    timeout: float,
    tls: harness.Tls,
    bodies: dict[str, bytes],
) -> bytes:
    """Connect, push, reconnect; the bytes of one push, for the floor, and
    (into `bodies`) the responses a connecting proxy is handed, by type."""
    proxies = r.proxies
    registry = work / f"registry-{proxies}"
    registry.mkdir()
    mesh.write_manifests(registry, args.services)
    extra_env = {"FANOUT_MALLOC": "glibc"} if args.malloc == "glibc" else {}
    server = await harness.start_shoal(
        registry, work, harness.ServeOptions.from_args(args), extra_env=extra_env
    )
    target = f"127.0.0.1:{server.xds_port}"
    phase = args.server_profile_phase if args.server_profile else ""

    def profile(which: str) -> None:
        if which == phase:
            server.proc.send_signal(signal.SIGUSR2)

    sample = b""
    try:
        await asyncio.sleep(SETTLE_S)
        base_rss, _ = server.rss_kib()

        if args.tracemalloc:
            server.proc.send_signal(signal.SIGUSR1)
        # Every proxy connects at once.
        profile("connect")
        cpu0, client0 = server.cpu_s(), await workers.cpu_s()
        setup = {"mode": args.mode, "services": args.services, "tls": tls.client(), "floor": False}
        r.connect_all_s, connected, errors = await workers.connect(target, proxies, timeout, setup)
        r.connect_server_cpu_s = server.cpu_s() - cpu0
        r.connect_client_cpu_s = await workers.cpu_s() - client0
        profile("connect")
        if connected != proxies:
            _problem(r, f"{connected} of {proxies} connected; {errors[:3]}")
            stderr = processes.tail(server.stderr, 600)
            _problem(r, f"shoal serve (exit {server.proc.returncode}): {stderr}")
        await asyncio.sleep(SETTLE_S * 2)
        if args.tracemalloc:
            server.proc.send_signal(signal.SIGUSR1)
        rss, _ = server.rss_kib()
        r.rss_base_mb = base_rss / 1024
        r.rss_mb = rss / 1024
        r.rss_per_stream_kb = (rss - base_rss) / proxies

        # Not counted (`--warmup-pushes`): the first push after a connect.
        for k in range(args.warmup_pushes if connected else 0):
            await push_once(
                workers,
                functools.partial(mesh.move_endpoint, registry, 1, f"172.17.{k}.1"),
                server.cpu_each_s,
            )
            await asyncio.sleep(PUSH_GAP_S)
        # One endpoint moves, `--pushes` times, in Services spread over the mesh.
        profile("push")
        for k in range(args.pushes if connected else 0):
            service = k * (args.services - 1) // max(args.pushes - 1, 1)
            address = f"172.16.{k}.{proxies % 250 + 1}"
            push, body = await push_once(
                workers,
                functools.partial(mesh.move_endpoint, registry, service, address),
                server.cpu_each_s,
            )
            r.pushes.append(push)
            sample = sample or body
            if push.missing:
                _problem(r, f"push {k}: {push.missing} proxies did not ACK in {PUSH_TIMEOUT_S} s")
            await asyncio.sleep(PUSH_GAP_S)
        profile("push")

        # What one proxy is handed on connect, for the floor's storm.
        if not args.no_reconnect and not args.no_floor:
            bodies.update(await record_configuration(target, proxies, setup, timeout))

        # Reconnect storm: every stream drops, every proxy comes back at once.
        if not args.no_reconnect:
            await workers.every({"op": "close"}, timeout)
            profile("reconnect")
            cpu0, client0 = server.cpu_s(), await workers.cpu_s()
            r.reconnect_all_s, connected, errors = await workers.connect(
                target, proxies, timeout, setup
            )
            r.reconnect_server_cpu_s = server.cpu_s() - cpu0
            r.reconnect_client_cpu_s = await workers.cpu_s() - client0
            profile("reconnect")
            if connected != proxies:
                _problem(r, f"reconnect: {connected} of {proxies} connected; {errors[:3]}")
                _problem(r, f"shoal serve: {processes.tail(server.stderr, 600)}")
        _, peak = server.rss_kib()
        r.rss_peak_mb = peak / 1024
        await workers.every({"op": "close"}, timeout)
    finally:
        await processes.CHILDREN.stop(server.proc)
    if server.events is not None:
        figures.attach_events(r, harness.server_events(server.events))
    return sample


async def record_configuration(
    target: str, index: int, setup: dict[str, Any], timeout: float
) -> dict[str, bytes]:
    """The responses one more proxy is handed as it connects, by type."""
    fleet = clients.Fleet()
    fleet.configure({**setup, "target": target})
    try:
        reply = await fleet.add(index, 1, timeout, make=clients.Recorded)
        proxy = fleet.proxies[-1]
        assert isinstance(proxy, clients.Recorded)
        return proxy.bodies if reply["connected"] == 1 else {}
    finally:
        await fleet.close()


async def measure_floor(
    args: argparse.Namespace,
    r: figures.Result,
    workers: clients.Workers,
    work: Path,
    timeout: float,
    sample: bytes,
    tls: harness.Tls,
) -> None:
    """The same clients and the same bytes, from a server that does nothing else."""
    body_file = work / f"floor-body-{r.proxies}"
    body_file.write_bytes(sample)
    bare, port = await floor.start(
        work, f"floor-{r.proxies}", "--floor-server", ["--floor-body", str(body_file)], tls
    )
    try:
        await asyncio.sleep(SETTLE_S)
        base_rss, _ = processes.rss_kib(bare.pid)
        setup = {"mode": args.mode, "services": args.services, "tls": tls.client(), "floor": True}
        _, connected, errors = await workers.connect(f"127.0.0.1:{port}", r.proxies, timeout, setup)
        if connected != r.proxies:
            _problem(r, f"floor: {connected} of {r.proxies} connected; {errors[:3]}")
        await asyncio.sleep(SETTLE_S)
        rss, _ = processes.rss_kib(bare.pid)
        r.floor_rss_per_stream_kb = (rss - base_rss) / r.proxies
        for k in range(args.warmup_pushes + args.pushes):
            push, _ = await push_once(
                workers,
                functools.partial(os.kill, bare.pid, signal.SIGUSR1),
                lambda: [processes.cpu_s(bare.pid)],
            )
            if k < args.warmup_pushes:
                await asyncio.sleep(0.3)
                continue  # as for shoal: not counted
            r.floor_pushes.append(push)
            if push.missing:
                counted = k - args.warmup_pushes
                _problem(r, f"floor push {counted}: {push.missing} proxies did not ACK")
            await asyncio.sleep(0.3)
        await workers.every({"op": "close"}, timeout)
    finally:
        await processes.CHILDREN.stop(bare)


async def measure_floor_storm(
    args: argparse.Namespace,
    r: figures.Result,
    workers: clients.Workers,
    work: Path,
    timeout: float,
    bodies: dict[str, bytes],
    tls: harness.Tls,
) -> None:
    """The reconnect storm's floor: every proxy connects at once to a bare
    gRPC server that hands each the configuration recorded from shoal, as
    ready bytes (floor.ReplayFloor)."""
    replay, port = await floor.start_replay(work, str(r.proxies), bodies, tls)
    try:
        await asyncio.sleep(SETTLE_S)
        setup = {"mode": args.mode, "services": args.services, "tls": tls.client(), "floor": False}
        cpu0 = processes.cpu_s(replay.pid)
        r.floor_reconnect_all_s, connected, errors = await workers.connect(
            f"127.0.0.1:{port}", r.proxies, timeout, setup
        )
        r.floor_reconnect_server_cpu_s = processes.cpu_s(replay.pid) - cpu0
        if connected != r.proxies:
            _problem(r, f"floor storm: {connected} of {r.proxies} connected; {errors[:3]}")
        await workers.every({"op": "close"}, timeout)
    finally:
        await processes.CHILDREN.stop(replay)


def _problem(r: figures.Result, problem: str) -> None:
    r.complete = False
    r.errors.append(problem)
    print(f"fanout: {r.proxies} proxies: {problem}", file=sys.stderr)


async def run_one(
    args: argparse.Namespace, proxies: int, work: Path, tls: harness.Tls
) -> figures.Result:
    r = figures.Result(
        proxies,
        args.mode,
        args.xds_security,
        args.services,
        args.workers,
        args.instrument,
        args.serve_workers,
    )
    timeout = 60.0 + proxies * 0.05
    machine0, ours0 = processes.machine_cpu_s(), processes.own_cpu_s()
    workers = await clients.Workers.start(args.workers, work)
    try:
        bodies: dict[str, bytes] = {}
        sample = await measure_shoal(args, r, workers, work, timeout, tls, bodies)
        if not args.no_floor and sample:
            await measure_floor(args, r, workers, work, timeout, sample, tls)
        if bodies:
            await measure_floor_storm(args, r, workers, work, timeout, bodies, tls)
    finally:
        await workers.stop()
    # Every child has been waited for, so its CPU time is in own_cpu_s().
    r.other_cpu_s = max(
        0.0, (processes.machine_cpu_s() - machine0) - (processes.own_cpu_s() - ours0)
    )
    if r.other_cpu_s > OTHER_CPU_WARNING_S:
        print(
            f"fanout: {proxies} proxies: other processes used {r.other_cpu_s:.0f} CPU seconds "
            "during the run; the figures are disturbed",
            file=sys.stderr,
        )
    figures.summarize(r)
    return r


async def coordinator(args: argparse.Namespace) -> list[figures.Result]:
    processes.raise_open_files()
    # SIGTERM stops the run as Ctrl-C does: cancelled, every child stopped.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    results = []
    with tempfile.TemporaryDirectory(prefix="shoal-fanout-") as tmp:
        work = Path(tmp)
        tls = (
            harness.Tls.from_state(work / "state")
            if args.xds_security == "mtls"
            else harness.Tls(False)
        )
        try:
            for n in [int(p) for p in args.proxies.split(",")]:
                results.append(await run_one(args, n, work, tls))
                if not args.json:
                    report.print_row(results[-1], header=len(results) == 1)
        finally:
            await processes.CHILDREN.stop_all()
    return results
