"""The cost of tracing and access logging on request latency through two sidecars.

    .venv/bin/python bench/telemetry.py [--requests 5000] [--warmup 1000] [--rounds 2] [--json]

A real control plane (`cli.control_plane`, in this process, mTLS xDS, the
embedded trace collector on) and two workloads of `shoal.demo.mesh.LocalMesh`
(each a demo app in this process and a real Envoy sidecar): `client` and
`server`. A load generator in its own process (`--client`, blocking
`http.client`, one keep-alive connection, closed loop: one request in flight)
sends `GET /` with `Host: server` to the client's sidecar outbound port, so
each request goes

    load generator -> sidecar A (outbound) -> mTLS -> sidecar B (inbound) -> app B

and back. Four configurations, each with a fresh control plane and fresh
sidecars, set as `shoal serve --trace-sampling P --access-log on|off` set them
(`ServeOptions.telemetry`):

- off: sampling 0 %, access log off;
- trace: sampling 100 %, spans to the embedded collector (in this process);
- log: access log on (one JSON line per request per sidecar, to its log file);
- both.

Per configuration: WARMUP requests not counted, then REQUESTS timed ones
(time.perf_counter_ns around send + full read). The configurations run in
order, ROUNDS times (the second round in reverse order), and the figures of
one configuration are pooled over its rounds. The two vCPUs are shared by the
load generator, both Envoys (one worker thread each), the apps and the control
plane, so the figures are latency on a busy small machine, not Envoy's floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import localmesh

# The manifests the tests write, from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shoal import envoy
from shoal.demo import mesh
from shoal.model import mesh as model_mesh
from tests import manifests

CONFIGS: dict[str, model_mesh.Telemetry] = {
    "off": model_mesh.Telemetry(trace_sampling=0.0, access_log=False),
    "trace": model_mesh.Telemetry(trace_sampling=100.0, access_log=False),
    "log": model_mesh.Telemetry(trace_sampling=0.0, access_log=True),
    "both": model_mesh.Telemetry(trace_sampling=100.0, access_log=True),
}


def _workload(name: str, port: int, sampling: float | None) -> str:
    """A Service, its Pod (for the service account) and its EndpointSlice;
    `sampling`: the Service's `shoal.io/trace-sampling` annotation, if any."""
    notes = f'    shoal.io/trace-sampling: "{sampling:g}"\n' if sampling is not None else ""
    return manifests.workload(name, f"{name}-sa", port, notes)


# -- the load generator (its own process) ---------------------------------------


def client_main(port: int, host: str, warmup: int, count: int) -> None:
    """Closed loop on one keep-alive connection; prints the latencies (µs)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out: list[int] = []
    errors = 0
    started = time.perf_counter()
    for i in range(warmup + count):
        t0 = time.perf_counter_ns()
        conn.request("GET", "/", headers={"Host": host})
        r = conn.getresponse()
        r.read()
        t1 = time.perf_counter_ns()
        if r.status != 200:
            errors += 1
        if i == warmup:
            started = time.perf_counter()
        if i >= warmup:
            out.append((t1 - t0) // 1000)
    wall = time.perf_counter() - started
    conn.close()
    json.dump({"latencies_us": out, "errors": errors, "wall": wall}, sys.stdout)


async def _load(port: int, warmup: int, count: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        str(port),
        "server",
        str(warmup),
        str(count),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator exited with {proc.returncode}")
    found: dict[str, Any] = json.loads(out)
    return found


# -- one configuration ------------------------------------------------------------


async def _until_200(session: aiohttp.ClientSession, via: mesh.Workload) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            status, _ = await mesh.get(session, via, "server")
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError("no 200 through the two sidecars after 30 s")
        await asyncio.sleep(0.1)


async def run_config(
    name: str, work: Path, warmup: int, count: int, annotate_sampling: bool
) -> dict[str, Any]:
    annotate = CONFIGS[name].trace_sampling if annotate_sampling else None
    registry = work / "registry"
    registry.mkdir(parents=True)
    ports = {"client": envoy.free_port(), "server": envoy.free_port()}
    for svc, port in ports.items():
        (registry / f"{svc}.yaml").write_text(_workload(svc, port, annotate))
    async with localmesh.control_plane(
        registry,
        work,
        len(ports),
        debounce_quiet=0.05,
        debounce_max=0.5,
        telemetry=CONFIGS[name],
    ) as cp:
        local = localmesh.local_mesh(cp, work)
        try:
            workloads = await localmesh.sidecars(local, ports)
            async with aiohttp.ClientSession() as session:
                await _until_200(session, workloads["client"])
            result = await _load(workloads["client"].sidecar.outbound_port, warmup, count)
            # Spans are flushed every 5 s or 5 spans, access logs every 1 s:
            # give the last ones time before counting.
            await asyncio.sleep(1.5)
            spans = cp.traces.spans if cp.traces is not None else 0
            log_lines = sum(
                sum(
                    1
                    for line in w.envoy.log_path.read_text(errors="replace").splitlines()
                    if line.startswith("{")
                )
                for w in workloads.values()
            )
        finally:
            try:
                await local.close()
            finally:
                local.kill_all()
    result["spans_in_store"] = spans
    result["access_log_lines"] = log_lines
    return result


def _pct(values: list[int], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[k] / 1000


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    pooled: dict[str, dict[str, Any]] = {
        n: {"latencies_us": [], "errors": 0, "wall": 0.0, "spans": [], "log_lines": []}
        for n in CONFIGS
    }
    order = list(CONFIGS)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-telemetry-") as tmp:
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else reversed(order):
                found = await run_config(
                    name,
                    Path(tmp) / f"{r}-{name}",
                    args.warmup,
                    args.requests,
                    annotate_sampling=not args.flags_only,
                )
                p = pooled[name]
                p["latencies_us"] += found["latencies_us"]
                p["errors"] += found["errors"]
                p["wall"] += found["wall"]
                p["spans"].append(found["spans_in_store"])
                p["log_lines"].append(found["access_log_lines"])
                print(
                    f"round {r + 1} {name}: p50 {_pct(found['latencies_us'], 50):.3f} ms, "
                    f"p99 {_pct(found['latencies_us'], 99):.3f} ms",
                    file=sys.stderr,
                )
    rows = []
    base = _pct(pooled["off"]["latencies_us"], 50)
    base99 = _pct(pooled["off"]["latencies_us"], 99)
    for name, p in pooled.items():
        lat = p["latencies_us"]
        rows.append(
            {
                "config": name,
                "trace_sampling": CONFIGS[name].trace_sampling,
                "access_log": CONFIGS[name].access_log,
                "requests": len(lat),
                "errors": p["errors"],
                "p50_ms": _pct(lat, 50),
                "p90_ms": _pct(lat, 90),
                "p99_ms": _pct(lat, 99),
                "mean_ms": round(statistics.fmean(lat) / 1000, 3),
                "req_per_s": round(len(lat) / p["wall"], 1),
                "p50_delta_ms": round(_pct(lat, 50) - base, 3),
                "p99_delta_ms": round(_pct(lat, 99) - base99, 3),
                "spans_in_store_per_round": p["spans"],
                "access_log_lines_per_round": p["log_lines"],
            }
        )
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "envoy": envoy.binary(),
        },
        "requests": args.requests,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "sampling_by": "flag" if args.flags_only else "flag and Service annotation",
        "rows": rows,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, host, warmup, count = sys.argv[2:6]
        client_main(int(port), host, int(warmup), int(count))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--flags-only",
        action="store_true",
        help="set sampling by --trace-sampling alone (no shoal.io/trace-sampling annotation)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(found, indent=2))
        return
    print(
        "| config | requests | p50 (ms) | p90 (ms) | p99 (ms) | mean (ms) | req/s | Δp50 | Δp99 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in found["rows"]:
        print(
            f"| {r['config']} | {r['requests']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['mean_ms']:.3f} | {r['req_per_s']} | "
            f"{r['p50_delta_ms']:+.3f} | {r['p99_delta_ms']:+.3f} |"
        )
    for r in found["rows"]:
        print(
            f"{r['config']}: errors {r['errors']}, spans in store {r['spans_in_store_per_round']}, "
            f"access log lines {r['access_log_lines_per_round']}"
        )


if __name__ == "__main__":
    main()
