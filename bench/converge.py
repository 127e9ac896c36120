"""Convergence with real Envoys: one endpoint change, time until every caller's
requests reach the new endpoint.

    .venv/bin/python bench/converge.py [--modes delta,sotw] [--callers 30] [--reps 5]
        [--pause 0.02] [--trace-sampling PERCENT] [--json]

Per xDS mode (delta, then state of the world, each with a fresh control plane
and fresh sidecars):

- The control plane runs in this process (`cli.control_plane`, what `shoal
  serve --registry` runs: mTLS xDS, the default debounce of 0.1 s quiet / 1 s
  at most, the default trace sampling (1 %) to its embedded collector unless
  --trace-sampling says otherwise) on a manifests folder holding Service
  `target` with one EndpointSlice of one endpoint, and Service `caller` with
  one EndpointSlice per caller.
- Two backend instances of `target`, A and B: each a real Envoy sidecar
  (`shoal.demo.mesh.LocalMesh` bootstrap) in front of the demo app
  (`shoal.demo.apps`, which answers JSON with its instance name). Only A is
  the endpoint at first.
- CALLERS caller workloads (LocalMesh: a real Envoy sidecar each, identity
  default/caller-sa).
- The demo apps A and B run in one helper process, the callers' request
  loops in another (both this file, `--worker apps|callers`): the control
  plane's event loop serves no request, so what delays it is CPU, as it would
  be on a shared machine, not the benchmark's own callbacks.

Warm-up: every caller gets 200 from A through its sidecar, then WARM_TRAFFIC
seconds of traffic as below (past the sidecars' first span flush, 5 s after
they start, which opens TLS connections to the collector all at once). Then
REPS switches, alternating A->B and B->A. In each, every caller runs its own
closed loop (one keep-alive HTTP/1.1 connection to its sidecar's outbound
port, `Host: target`, one request in flight, PAUSE seconds between requests)
for LEAD seconds; then the EndpointSlice file is rewritten (atomically: a
temporary file renamed over it) so that the new instance replaces the old
one, and T0 is taken right after the rename. The loops go on until every
caller has had an answer from the new instance, then TAIL seconds more,
checking that no caller is answered by the old one again.

The figure: T0 to the last caller's first answer from the new instance (the
time the answer was read). Also its p50 / p90 over callers, the answers that
were not 200 (make-before-break: should be 0), answers from the old instance
after one from the new, and the request interval per caller (the resolution
of "first answer": a caller learns of the switch only with its next request).

The breakdown, from hooks this file puts on the in-process control plane
(instance attributes set over its methods, no change to shoal): when the
folder watcher handed the change to the registry (`FolderRegistry.reload`
entered), when the registry gave the new mesh state to the controller
(`Controller.update`), when the rebuild began and ended (`Controller.on_push`,
with the push's own build time and debounce wait), when the EDS response went
to each caller's stream and when its ACK was read (`AdsServer.connections`,
per stream), then each caller's first answer from the new instance. And what
the machine did from T0 to the end of the loops: busy cores (/proc/stat), the
share of processes this benchmark did not start, the control plane's CPU,
its main thread's time on a CPU and waiting for one (schedstat), its event
loop's lateness, and the span reports its collector received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import localmesh

from shoal import envoy, sidecar_files
from shoal.demo import apps, mesh
from shoal.model import mesh as model_mesh
from shoal.model import proxy
from shoal.xds import resources

NAMESPACE = "default"
TARGET = "target"
REQUEST = b"GET / HTTP/1.1\r\nHost: target\r\nUser-Agent: shoal-converge\r\n\r\n"


# -- manifests --------------------------------------------------------------------


def target_yaml(port: int) -> str:
    """Service `target` and its one EndpointSlice: one endpoint, `port`."""
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {TARGET}, namespace: {NAMESPACE}}}
spec:
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {TARGET}-1
  namespace: {NAMESPACE}
  labels: {{kubernetes.io/service-name: {TARGET}}}
  annotations: {{shoal.io/service-account: target-sa}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: ["127.0.0.1"]
"""


def callers_yaml(ports: Sequence[int]) -> str:
    """Service `caller` and one EndpointSlice per caller (local sidecars share
    127.0.0.1, so each port is its own slice)."""
    docs = [
        f"""apiVersion: v1
kind: Service
metadata: {{name: caller, namespace: {NAMESPACE}}}
spec:
  ports: [{{name: http, port: 80}}]
"""
    ]
    for i, port in enumerate(ports):
        docs.append(f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: caller-{i}
  namespace: {NAMESPACE}
  labels: {{kubernetes.io/service-name: caller}}
  annotations: {{shoal.io/service-account: caller-sa}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints:
  - addresses: ["127.0.0.1"]
""")
    return "---\n".join(docs)


def write_atomically(path: Path, text: str) -> None:
    """As editors and `kubectl` users do: a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- the helper processes -------------------------------------------------------------


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def read_command() -> dict[str, Any] | None:
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        return None  # the parent is gone: stop
    found: dict[str, Any] = json.loads(line)
    return found


async def apps_worker(spec: dict[str, Any]) -> None:
    """The demo apps of A and B, until stdin closes."""
    runners = []
    served: dict[str, apps.App] = {}
    try:
        for instance, port in spec["apps"].items():
            app = apps.App(TARGET, instance, namespace=NAMESPACE)
            served[instance] = app
            runners.append(await apps.start(app, port))
        emit({"ready": True})
        while (command := await read_command()) is not None:
            if command.get("cmd") == "quit":
                break
        emit({"served": {name: app.served for name, app in served.items()}})
    finally:
        for runner in runners:
            await runner.cleanup()


class Connection:
    """One keep-alive HTTP/1.1 connection to a caller's sidecar: a minimal
    client, since 30 loops share two cores with 32 Envoys, two apps and the
    control plane."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def get(self) -> tuple[int, str]:
        """(status, instance that answered); status 0 for a transport error."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            self.writer.write(REQUEST)
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                body = await self._chunked(self.reader)
            else:
                body = await self.reader.read()
                self.close()
            if headers.get("connection") == "close":
                self.close()
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            self.close()
            return 0, type(err).__name__
        except ValueError as err:
            self.close()
            return 0, f"bad response: {err}"
        if status != 200:
            return status, body[:80].decode("utf-8", "replace")
        try:
            return status, str(json.loads(body).get("instance", "?"))
        except ValueError:
            return status, "?"

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()


@dataclass
class Seen:
    """What one caller saw during one switch (time.monotonic; CLOCK_MONOTONIC
    is the same clock in every process of the machine)."""

    requests: int = 0
    # Seconds from sending to reading the answer, summed over requests.
    latency: float = 0.0
    first_sent: float = 0.0
    last_got: float = 0.0
    # The last answer of the old instance before the first of the new.
    last_old_sent: float | None = None
    last_old_got: float | None = None
    first_new_sent: float | None = None
    first_new_got: float | None = None
    # Answers of the old instance after one of the new: should not happen.
    went_back: list[float] = field(default_factory=list)
    # (time, status, what) of every answer that was not 200; status 0: no answer.
    failures: list[tuple[float, int, str]] = field(default_factory=list)
    # 200s from neither instance.
    other: int = 0


async def warm(conns: Sequence[Connection], expect: str, timeout: float) -> dict[str, Any]:
    """Until every caller got 200 from `expect` through its sidecar."""
    started = time.monotonic()

    async def one(c: Connection) -> int:
        tries = 0
        while True:
            tries += 1
            status, who = await c.get()
            if status == 200 and who == expect:
                return tries
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"caller on :{c.port} got {status} {who!r}, not {expect}")
            await asyncio.sleep(0.05)

    tries = await asyncio.gather(*(one(c) for c in conns))
    return {"warm_seconds": time.monotonic() - started, "tries": sum(tries)}


async def switch(conns: Sequence[Connection], command: dict[str, Any]) -> dict[str, Any]:
    old, new = command["old"], command["new"]
    pause, lead, tail, timeout = (command[k] for k in ("pause", "lead", "tail", "timeout"))
    seen = [Seen() for _ in conns]
    waiting = len(conns)
    everyone = asyncio.Event()
    stop = asyncio.Event()

    async def loop(c: Connection, s: Seen) -> None:
        nonlocal waiting
        s.first_sent = time.monotonic()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status, who = await asyncio.wait_for(c.get(), 5)
            except TimeoutError:
                c.close()
                status, who = 0, "no answer in 5 s"
            got = s.last_got = time.monotonic()
            s.requests += 1
            s.latency += got - sent
            if status != 200:
                s.failures.append((got, status, who))
            elif who == new:
                if s.first_new_got is None:
                    s.first_new_sent, s.first_new_got = sent, got
                    waiting -= 1
                    if waiting == 0:
                        everyone.set()
            elif who == old:
                if s.first_new_got is None:
                    s.last_old_sent, s.last_old_got = sent, got
                else:
                    s.went_back.append(got)
            else:
                s.other += 1
            await asyncio.sleep(pause)

    tasks = [asyncio.create_task(loop(c, s)) for c, s in zip(conns, seen, strict=True)]
    try:
        await asyncio.sleep(lead)
        emit({"running": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everyone.wait(), timeout)
        await asyncio.sleep(tail)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"seen": [asdict(s) for s in seen]}


async def callers_worker(spec: dict[str, Any]) -> None:
    """Request loops through the callers' sidecars, on command."""
    conns = [Connection(port) for port in spec["outbound_ports"]]
    try:
        emit({"ready": True})
        while (command := await read_command()) is not None:
            if command["cmd"] == "warm":
                emit(await warm(conns, command["expect"], command["timeout"]))
            elif command["cmd"] == "switch":
                emit(await switch(conns, command))
            else:
                break
    finally:
        for c in conns:
            c.close()


class Worker:
    """A helper process (this file, `--worker KIND SPEC`), spoken to in JSON lines."""

    def __init__(self, kind: str, spec: dict[str, Any]) -> None:
        self.kind = kind
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--worker",
            self.kind,
            json.dumps(self.spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        await self.receive(30)

    async def send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        await self.proc.stdin.drain()

    async def receive(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"the {self.kind} worker exited ({await self.proc.wait()})")
        found: dict[str, Any] = json.loads(line)
        return found

    async def close(self) -> dict[str, Any] | None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return None
        last = None
        try:
            with contextlib.suppress(Exception):
                await self.send({"cmd": "quit"})
                assert proc.stdin is not None
                proc.stdin.close()
                if self.kind == "apps":
                    last = await self.receive(5)
            await asyncio.wait_for(proc.wait(), 5)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise
        return last

    def kill_now(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


# -- hooks on the in-process control plane -------------------------------------------


class Probe:
    """Timestamps (time.monotonic) of what the control plane did: instance
    attributes set over its methods, each calling the original."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.reloads: list[tuple[float, float]] = []  # (entered, returned)
        self.updates: list[float] = []
        self.pushes: list[tuple[float, Any]] = []  # (on_push called, Push)
        registry, ctl = cp.registry, cp.controller
        reload, update, on_push = registry.reload, ctl.update, ctl.on_push

        def timed_reload(paths: Any) -> Any:
            entered = time.monotonic()
            try:
                return reload(paths)
            finally:
                self.reloads.append((entered, time.monotonic()))

        def timed_update(state: Any) -> None:
            self.updates.append(time.monotonic())
            update(state)

        def timed_push(push: Any) -> None:
            self.pushes.append((time.monotonic(), push))
            on_push(push)

        registry.reload = timed_reload
        ctl.update = timed_update
        ctl.on_push = timed_push
        # Span reports to the embedded trace collector, in this process too:
        # (arrived, spans).
        self.reports: list[tuple[float, int]] = []
        store = cp.traces
        if store is not None:
            add = store.add

            def counted_add(spans: Any, **kwargs: Any) -> int:
                self.reports.append(
                    (time.monotonic(), len(spans) if isinstance(spans, list) else 0)
                )
                kept: int = add(spans, **kwargs)
                return kept

            store.add = counted_add
        # What else held this process up: the event loop's lateness (a 10 ms
        # sleep that took 10 ms longer) and garbage collections, (start, ms).
        self.stalls: list[tuple[float, float]] = []
        self.collections: list[tuple[float, float, int]] = []
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)
        self._lag = asyncio.create_task(self._watch_lag())

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_started = now
        else:
            self.collections.append(
                (self._gc_started, (now - self._gc_started) * 1000, info["generation"])
            )

    async def _watch_lag(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            late = time.monotonic() - before - 0.01
            if late > 0.01:
                self.stalls.append((before + 0.01, late * 1000))

    def close(self) -> None:
        self._lag.cancel()
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def eds_streams(self) -> dict[str, tuple[float, float]]:
        """Per caller node: (EDS last sent, last ACKed), time.time()."""
        out = {}
        for conn in list(self.cp.ads.connections.values()):
            state = conn.types.get(resources.ENDPOINT)
            if state is not None and conn.node_id.startswith(f"sidecar~{NAMESPACE}~caller-"):
                out[conn.node_id.rsplit("~", 1)[1]] = (state.sent_at, state.acked_at)
        return out


# -- one mode ------------------------------------------------------------------------


async def start_backend(local: mesh.LocalMesh, name: str, inbound_port: int) -> mesh.Workload:
    """A `target` sidecar whose app runs in the apps worker, not here (what
    LocalMesh.add does, less the app)."""
    s = proxy.Sidecar(
        namespace=NAMESPACE,
        service=TARGET,
        service_account="target-sa",
        app_port=envoy.free_port(),
        inbound_port=inbound_port,
        outbound_port=envoy.free_port(),
    )
    admin_port = envoy.free_port()
    path = sidecar_files.write(
        local.workdir / name,
        s,
        xds_host="127.0.0.1",
        xds_port=local.xds_port,
        admin_port=admin_port,
        node_id=f"sidecar~{NAMESPACE}~{name}",
        delta=local.delta,
        authority=local.authority,
        collector=("127.0.0.1", local.collector_port) if local.collector_port else None,
    )
    w = mesh.Workload(s, apps.App(TARGET, name), envoy.EnvoyProcess(path, admin_port))
    local.workloads[name] = w
    await w.envoy.start()
    return w


def cpu_times() -> tuple[float, ...]:
    """(wall, machine busy CPU-seconds from /proc/stat, this process's
    CPU-seconds, its main thread's seconds on a CPU and waiting for one, the
    seconds the hypervisor took from this machine's CPUs, CPU-seconds of
    this process tree)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields]
    # user nice system idle iowait irq softirq steal (guest is within user)
    busy = sum(ticks[:7]) - ticks[3] - ticks[4]
    steal = ticks[7]
    t = os.times()
    # schedstat: ns on the CPU, ns runnable but waiting on a run queue, slices.
    on_cpu, waiting, _ = Path(f"/proc/self/task/{os.getpid()}/schedstat").read_text().split()
    return (
        time.monotonic(),
        busy / os.sysconf("SC_CLK_TCK"),
        t.user + t.system,
        int(on_cpu) / 1e9,
        int(waiting) / 1e9,
        steal / os.sysconf("SC_CLK_TCK"),
        tree_cpu_seconds(),
    )


def tree_cpu_seconds() -> float:
    """CPU-seconds of this process and every live descendant (the workers,
    the Envoys): what the machine spent on anything else is the rest."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # After the command's closing parenthesis: state, ppid, ...
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def cpu_share(before: tuple[float, ...], after: tuple[float, ...]) -> dict[str, float]:
    wall = after[0] - before[0]
    return {
        "seconds": round(wall, 3),
        "machine_busy_cores": round((after[1] - before[1]) / wall, 2),
        "control_plane_process_cores": round((after[2] - before[2]) / wall, 2),
        "main_thread_on_cpu_ms": round((after[3] - before[3]) * 1000, 1),
        "main_thread_runqueue_wait_ms": round((after[4] - before[4]) * 1000, 1),
        "steal_cores": round((after[5] - before[5]) / wall, 2),
        # Processes not started by this benchmark (other work on the machine).
        "others_cores": round(max(0.0, (after[1] - before[1]) - (after[6] - before[6])) / wall, 2),
    }


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, -(-len(ordered) * p // 100) - 1))
    return ordered[int(k)]


def analyse(
    probe: Probe,
    seen: list[dict[str, Any]],
    names: Sequence[str],
    t0: float,
    t0_wall: float,
    running_at: float,
) -> dict[str, Any]:
    """One switch's figures, in ms from T0."""

    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - t0) * 1000, 1)

    def wall_ms(t: float) -> float | None:
        return round((t - t0_wall) * 1000, 1) if t >= t0_wall else None

    reloads = [r for r in probe.reloads if r[0] >= t0]
    last = max((t for t in (s["first_new_got"] for s in seen) if t is not None), default=t0)
    stalls = [(ms(at), round(late, 1)) for at, late in probe.stalls if t0 <= at <= last]
    collections = [
        (ms(at), round(took, 1), gen) for at, took, gen in probe.collections if t0 <= at <= last
    ]
    updates = [u for u in probe.updates if u >= t0]
    reports = [n for at, n in probe.reports if t0 <= at <= last]
    pushes = [(at, p) for at, p in probe.pushes if at >= t0]
    first_new = [s["first_new_got"] for s in seen]
    converged = [ms(t) for t in first_new if t is not None]
    streams = probe.eds_streams()
    sent = {n: wall_ms(streams[n][0]) for n in names if n in streams}
    acked = {n: wall_ms(streams[n][1]) for n in names if n in streams}
    # Per caller: from its EDS ACK to its first answer from the new instance,
    # and the request interval while it was switching.
    ack_to_answer, intervals, windows, first_latency, latency = [], [], [], [], []
    for name, s in zip(names, seen, strict=True):
        a = acked.get(name)
        got = ms(s["first_new_got"])
        if a is not None and got is not None:
            ack_to_answer.append(got - a)
        if s["requests"]:
            intervals.append((s["last_got"] - s["first_sent"]) * 1000 / s["requests"])
            latency.append(s["latency"] * 1000 / s["requests"])
        if s["first_new_got"] is not None:
            first_latency.append((s["first_new_got"] - s["first_new_sent"]) * 1000)
        if s["last_old_sent"] is not None and s["first_new_got"] is not None:
            windows.append((s["first_new_got"] - s["last_old_sent"]) * 1000)
    failures = [f for s in seen for f in s["failures"]]
    out: dict[str, Any] = {
        "callers_switched": len(converged),
        "callers": len(seen),
        "converged_ms": max(converged) if len(converged) == len(seen) else None,
        "first_new_ms": {
            "min": min(converged, default=None),
            "p50": pct(converged, 50) if converged else None,
            "p90": pct(converged, 90) if converged else None,
            "max": max(converged, default=None),
        },
        "non_200": len(failures),
        "non_200_detail": [[ms(t), status, what] for t, status, what in failures[:10]],
        "went_back": sum(len(s["went_back"]) for s in seen),
        "callers_went_back": sum(1 for s in seen if s["went_back"]),
        "other_instance": sum(s["other"] for s in seen),
        "new_before_t0": sum(1 for t in first_new if t is not None and t < t0),
        "requests": sum(s["requests"] for s in seen),
        "loops_running_ms": ms(running_at),
        "interval_ms_p50": round(pct(intervals, 50), 1) if intervals else None,
        # A request's latency, on average per caller, and that of each
        # caller's first request the new instance answered (its sidecar
        # opens an mTLS connection to the new instance for it): p50 over callers.
        "latency_ms_p50": round(pct(latency, 50), 1) if latency else None,
        "first_new_latency_ms_p50": round(pct(first_latency, 50), 1) if first_latency else None,
        # Last request the old instance answered (sent) to the first answer
        # of the new one, per caller: the switch happened inside it.
        "switch_window_ms_p50": round(pct(windows, 50), 1) if windows else None,
        # This process (the control plane) from T0 to the last switch: event
        # loop late by more than 10 ms (when, how late) and garbage collections
        # (when, ms, generation).
        "loop_stalls": stalls,
        "loop_late_ms_total": round(sum(late for _, late in stalls), 1),
        "gc": collections,
        "collector_reports": len(reports),
        "collector_spans": sum(reports),
        "reloads": len(reloads),
        "updates": len(updates),
        "pushes": len(pushes),
        "t": {
            "watch_event": ms(reloads[0][0]) if reloads else None,
            "registry_update": ms(updates[0]) if updates else None,
        },
    }
    if pushes:
        at, push = pushes[0]
        out["t"]["build_start"] = ms(at - push.seconds)
        out["t"]["build_end"] = ms(at)
        out["debounce_ms"] = round(push.debounce_seconds * 1000, 1)
        out["build_ms"] = round(push.seconds * 1000, 1)
        out["push_proxies"] = push.proxies
    sent_v = [v for v in sent.values() if v is not None]
    acked_v = [v for v in acked.values() if v is not None]
    out["eds_streams_updated"] = len(acked_v)
    out["t"].update(
        {
            "eds_sent_first": min(sent_v, default=None),
            "eds_sent_last": max(sent_v, default=None),
            "eds_ack_first": min(acked_v, default=None),
            "eds_ack_p50": pct(acked_v, 50) if acked_v else None,
            "eds_ack_last": max(acked_v, default=None),
            "first_new_p50": out["first_new_ms"]["p50"],
            "first_new_last": out["first_new_ms"]["max"],
        }
    )
    out["ack_to_first_new_ms"] = {
        "p50": round(pct(ack_to_answer, 50), 1) if ack_to_answer else None,
        "max": round(max(ack_to_answer), 1) if ack_to_answer else None,
    }
    return out


async def run_mode(mode: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    registry = work / "registry"
    registry.mkdir(parents=True)
    inbound = {"A": envoy.free_port(), "B": envoy.free_port()}
    caller_ports = [envoy.free_port() for _ in range(args.callers)]
    (registry / "callers.yaml").write_text(callers_yaml(caller_ports))
    target_file = registry / "target.yaml"
    target_file.write_text(target_yaml(inbound["A"]))
    names = [f"caller-{i}" for i in range(args.callers)]
    reps: list[dict[str, Any]] = []
    setup: dict[str, float] = {}
    served = None
    started = time.monotonic()
    telemetry = model_mesh.Telemetry()
    if args.trace_sampling is not None:
        telemetry = dataclasses.replace(telemetry, trace_sampling=args.trace_sampling)
    async with localmesh.control_plane(registry, work, 2, telemetry=telemetry) as cp:
        probe = Probe(cp)
        local = localmesh.local_mesh(cp, work, delta=mode == "delta")
        workers: list[Worker] = []
        try:
            backends = {n: await start_backend(local, n, p) for n, p in inbound.items()}
            callers = [
                await local.add(
                    name,
                    namespace=NAMESPACE,
                    service="caller",
                    inbound_port=port,
                    service_account="caller-sa",
                    wait=False,
                )
                for name, port in zip(names, caller_ports, strict=True)
            ]
            everyone = [*backends.values(), *callers]
            await asyncio.gather(*(w.envoy.wait_ready(60) for w in everyone))
            setup["envoys_ready_s"] = round(time.monotonic() - started, 1)
            app_ports = {n: w.sidecar.app_port for n, w in backends.items()}
            workers.append(Worker("apps", {"apps": app_ports}))
            workers.append(
                Worker("callers", {"outbound_ports": [w.sidecar.outbound_port for w in callers]})
            )
            apps_worker_, callers_worker_ = workers
            for w in workers:
                await w.start()
            await callers_worker_.send({"cmd": "warm", "expect": "A", "timeout": 30})
            warmed = await callers_worker_.receive(40)
            setup["warm_s"] = round(warmed["warm_seconds"], 2)
            if args.warm_traffic > 0:
                # Traffic at the measured rate until start-up is over: the
                # sidecars' first span flush (5 s after they start) opens
                # TLS connections to the collector all at once.
                await callers_worker_.send(
                    {
                        "cmd": "switch",
                        "old": "A",
                        "new": "-",
                        "pause": args.pause,
                        "lead": 0,
                        "tail": 0,
                        "timeout": args.warm_traffic,
                    }
                )
                await callers_worker_.receive(30)
                busy = await callers_worker_.receive(args.warm_traffic + 30)
                setup["warm_traffic_non_200"] = sum(len(s["failures"]) for s in busy["seen"])
                setup["warm_traffic_requests"] = sum(s["requests"] for s in busy["seen"])
            current = "A"
            for rep in range(args.reps):
                await asyncio.sleep(args.settle)
                new = "B" if current == "A" else "A"
                await callers_worker_.send(
                    {
                        "cmd": "switch",
                        "old": current,
                        "new": new,
                        "pause": args.pause,
                        "lead": args.lead,
                        "tail": args.tail,
                        "timeout": args.timeout,
                    }
                )
                running = await callers_worker_.receive(args.lead + 30)
                assert running.get("running")
                running_at = time.monotonic()
                cpu_before = cpu_times()
                write_atomically(target_file, target_yaml(inbound[new]))
                t0, t0_wall = time.monotonic(), time.time()
                result = await callers_worker_.receive(args.lead + args.timeout + args.tail + 30)
                cpu = cpu_share(cpu_before, cpu_times())
                found = analyse(probe, result["seen"], names, t0, t0_wall, running_at)
                found["cpu_t0_to_end"] = cpu
                found.update({"rep": rep + 1, "from": current, "to": new})
                reps.append(found)
                print(
                    f"{mode} rep {rep + 1} {current}->{new}: last caller on {new} at "
                    f"{found['converged_ms']} ms (p50 {found['first_new_ms']['p50']}), "
                    f"non-200 {found['non_200']}, went back {found['went_back']}; "
                    f"t {found['t']}",
                    file=sys.stderr,
                )
                if found["callers_switched"] < args.callers:
                    print(f"{mode}: not every caller switched; stopping", file=sys.stderr)
                    break
                current = new
            served = await apps_worker_.close()
        finally:
            try:
                for w in reversed(workers):
                    with contextlib.suppress(Exception):
                        await w.close()
                await local.close()
            finally:
                for w in workers:
                    w.kill_now()
                local.kill_all()
                probe.close()
    return summarise(mode, reps, setup, served)


def summarise(
    mode: str, reps: list[dict[str, Any]], setup: dict[str, float], served: dict[str, Any] | None
) -> dict[str, Any]:
    def spread(get: Callable[[dict[str, Any]], float | None]) -> dict[str, float | None]:
        values = [v for v in (get(r) for r in reps) if v is not None]
        if not values:
            return {"median": None, "min": None, "max": None}
        return {
            "median": round(statistics.median(values), 1),
            "min": min(values),
            "max": max(values),
        }

    def t(key: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda r: r["t"].get(key)

    def step(later: str, earlier: str) -> Callable[[dict[str, Any]], float | None]:
        def get(r: dict[str, Any]) -> float | None:
            a, b = r["t"].get(later), r["t"].get(earlier)
            return None if a is None or b is None else round(a - b, 1)

        return get

    return {
        "mode": mode,
        "setup": setup,
        "served": served,
        "converged_ms": spread(lambda r: r["converged_ms"]),
        "first_new_p50_ms": spread(lambda r: r["first_new_ms"]["p50"]),
        "first_new_p90_ms": spread(lambda r: r["first_new_ms"]["p90"]),
        "non_200": sum(r["non_200"] for r in reps),
        "went_back": sum(r["went_back"] for r in reps),
        "interval_ms_p50": spread(lambda r: r["interval_ms_p50"]),
        "latency_ms_p50": spread(lambda r: r["latency_ms_p50"]),
        "first_new_latency_ms_p50": spread(lambda r: r["first_new_latency_ms_p50"]),
        "ack_to_first_new_ms_p50": spread(lambda r: r["ack_to_first_new_ms"]["p50"]),
        # From T0 to the end of the loops, medians over switches.
        "cpu": {
            key: spread(lambda r, key=key: r["cpu_t0_to_end"][key])
            for key in (
                "machine_busy_cores",
                "steal_cores",
                "others_cores",
                "control_plane_process_cores",
                "main_thread_on_cpu_ms",
                "main_thread_runqueue_wait_ms",
            )
        },
        "control_plane_loop_late_ms": spread(lambda r: r["loop_late_ms_total"]),
        "collector_spans": spread(lambda r: r["collector_spans"]),
        # Where the time goes: each step from the one before, medians over reps.
        "breakdown_ms": {
            "file write -> watcher hands it over": spread(t("watch_event")),
            "-> registry update (parse, new state)": spread(step("registry_update", "watch_event")),
            "-> rebuild starts (debounce)": spread(step("build_start", "registry_update")),
            "-> rebuild ends (translate, publish)": spread(step("build_end", "build_start")),
            "-> EDS written to the last caller": spread(step("eds_sent_last", "build_end")),
            "-> last caller's EDS ACK": spread(step("eds_ack_last", "eds_sent_last")),
            "-> last caller answered by new": spread(step("first_new_last", "eds_ack_last")),
        },
        "reps": reps,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    # Ctrl-C or a kill: every process this started is stopped on the way out.
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    load_before = os.getloadavg()
    results = []
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-converge-") as tmp:
        for mode in args.modes:
            results.append(await run_mode(mode, Path(tmp) / mode, args))
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "envoy": envoy.binary(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "callers": args.callers,
        "reps": args.reps,
        "pause_s": args.pause,
        "lead_s": args.lead,
        "tail_s": args.tail,
        "control_plane": "in this process (cli.control_plane), mTLS, debounce 0.1 s / 1 s",
        "trace_sampling_percent": (
            model_mesh.Telemetry().trace_sampling
            if args.trace_sampling is None
            else args.trace_sampling
        ),
        "total_seconds": round(time.monotonic() - wall, 1),
        "modes": results,
    }


def fmt(s: dict[str, float | None]) -> str:
    if s["median"] is None:
        return "-"
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def print_table(found: dict[str, Any]) -> None:
    m = found["machine"]
    print(
        f"{found['callers']} callers, {found['reps']} switches per mode, pause "
        f"{found['pause_s'] * 1000:g} ms; {m['cpus']} CPUs, load before "
        f"{m['loadavg_before']}, after {m['loadavg_after']}; {found['total_seconds']} s"
    )
    print()
    print(
        "| mode | last caller on new (ms) | p50 caller (ms) | p90 caller (ms) "
        "| non-200 | back to old | request interval (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in found["modes"]:
        print(
            f"| {r['mode']} | {fmt(r['converged_ms'])} | {fmt(r['first_new_p50_ms'])} | "
            f"{fmt(r['first_new_p90_ms'])} | {r['non_200']} | {r['went_back']} | "
            f"{fmt(r['interval_ms_p50'])} |"
        )
    print()
    modes = found["modes"]
    print(
        "| step, ms (median (range) over switches) | " + " | ".join(r["mode"] for r in modes) + " |"
    )
    print("|---|" + "---:|" * len(modes))
    for key in modes[0]["breakdown_ms"]:
        print(f"| {key} | " + " | ".join(fmt(r["breakdown_ms"][key]) for r in modes) + " |")
    print()
    for r in modes:
        print(
            f"{r['mode']}: request latency {fmt(r['latency_ms_p50'])} ms, the first one the new "
            f"instance answered {fmt(r['first_new_latency_ms_p50'])} ms; a caller's EDS ACK "
            f"(as the control plane read it) to its first answer from the new instance "
            f"{fmt(r['ack_to_first_new_ms_p50'])} ms (p50 over callers; median (range) over "
            "switches)"
        )
    for r in modes:
        cpu = r["cpu"]
        print(
            f"{r['mode']}, T0 to the end of the loops (median over switches): machine busy "
            f"{cpu['machine_busy_cores']['median']} of {m['cpus']} cores (processes not "
            f"started by this benchmark {cpu['others_cores']['median']}, steal "
            f"{cpu['steal_cores']['median']}); control plane process "
            f"{cpu['control_plane_process_cores']['median']} cores, its main thread "
            f"{cpu['main_thread_on_cpu_ms']['median']} ms on a CPU and "
            f"{cpu['main_thread_runqueue_wait_ms']['median']} ms waiting for one; its event "
            f"loop late by {fmt(r['control_plane_loop_late_ms'])} ms in all until the last "
            f"switch; spans received by its collector meanwhile {fmt(r['collector_spans'])}; "
            f"set-up {r['setup']}"
        )
    print()
    for r in modes:
        for rep in r["reps"]:
            print(
                f"{r['mode']} {rep['rep']} {rep['from']}->{rep['to']}: converged "
                f"{rep['converged_ms']} ms, p50 {rep['first_new_ms']['p50']}, "
                f"p90 {rep['first_new_ms']['p90']}, non-200 {rep['non_200']}, "
                f"back {rep['went_back']}, requests {rep['requests']}, "
                f"pushes {rep['pushes']}, debounce {rep.get('debounce_ms')} ms, "
                f"build {rep.get('build_ms')} ms; t {rep['t']}"
            )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, spec = sys.argv[2], json.loads(sys.argv[3])
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(apps_worker(spec) if kind == "apps" else callers_worker(spec))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--modes",
        type=lambda v: [m for m in v.split(",") if m],
        default=["delta", "sotw"],
        help="xDS modes, in order (delta,sotw)",
    )
    parser.add_argument("--callers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5, help="switches per mode (A->B, B->A, ...)")
    parser.add_argument(
        "--pause", type=float, default=0.02, help="seconds each caller waits between requests"
    )
    parser.add_argument(
        "--lead", type=float, default=0.5, help="seconds the loops run before the change"
    )
    parser.add_argument(
        "--tail", type=float, default=0.3, help="seconds the loops go on after the last switch"
    )
    parser.add_argument(
        "--warm-traffic",
        type=float,
        default=6.0,
        help="seconds of traffic after the warm-up, before the first switch",
    )
    parser.add_argument("--settle", type=float, default=0.5, help="seconds between switches")
    parser.add_argument(
        "--timeout", type=float, default=15.0, help="seconds to wait for every caller to switch"
    )
    parser.add_argument(
        "--trace-sampling",
        type=float,
        default=None,
        help="percent of requests traced (default: shoal serve's, 1 %%, to its embedded collector)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if any(m not in ("delta", "sotw") for m in args.modes):
        parser.error("--modes: delta and/or sotw")
    try:
        found = asyncio.run(main_async(args))
    except asyncio.CancelledError:
        print("interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print_table(found)


if __name__ == "__main__":
    main()
