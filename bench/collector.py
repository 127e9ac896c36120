"""The embedded trace collector's memory at its bound, and its ingest rate.

    .venv/bin/python bench/collector.py [--traces 40000] [--json]

Spans are Zipkin v2 JSON as Envoy's Zipkin tracer reports them: 3-span traces
(the caller's sidecar CLIENT span, the callee's sidecar SERVER span, and the
callee's CLIENT span to a third Service), with the tags Envoy and shoal's
connection managers put on them (`shoal.*` tags, guid:x-request-id,
upstream_cluster, http.url, peer.address, ...), random 128-bit trace ids,
distinct services among 50. Reports carry 5 spans, as Envoy flushes them.

- in-process: a `traces.SpanStore` with its defaults (20,000 spans, 32 MiB)
  is fed TRACES traces (3 x TRACES spans, several times its bound) by the
  collector's own request path (`json.loads` of the report body, then
  `SpanStore.add`). Figures: spans/s, the spans/traces/bytes kept, and the
  store's memory at the bound: tracemalloc (allocations made since the store
  was created and still alive after `gc.collect()`, i.e. the store) and the
  growth of the process's VmRSS.
- HTTPS: the real collector endpoint (`traces.serve` with the mutual-TLS
  context `shoal serve` gives it) in a child process, fed the same reports
  by 8 keep-alive client connections (aiohttp, a mesh client certificate)
  from this process, until it has taken 3 x TRACES spans. Figures: spans/s
  end to end, and the child's VmRSS (the collector process alone: Python,
  aiohttp and the store) before and at the bound, and VmHWM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import resource
import signal
import ssl
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from shoal import sidecar_files
from shoal.model import proxy
from shoal.observe import traces
from shoal.sds import ca, tls, workloads

SERVICES = [f"svc-{i:02d}" for i in range(50)]
REPORT = 5  # spans per report: Envoy's default flush size
CONNECTIONS = 8
SPIFFE = "spiffe://cluster.local/ns/default/sa/"


def _rss_kib(pid: int | str = "self") -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _span(
    rng: random.Random,
    trace_id: str,
    span_id: str,
    parent: str | None,
    kind: str,
    own: str,
    other: str,
    at: int,
    took: int,
) -> dict[str, Any]:
    """One span as Envoy's Zipkin tracer sends it from a shoal sidecar."""
    outbound = kind == "CLIENT"
    dest = other if outbound else own
    tags = {
        "component": "proxy",
        "node_id": f"sidecar~default~{own}-{rng.randrange(3)}",
        "zone": "",
        "guid:x-request-id": f"{rng.getrandbits(128):032x}"[:36],
        "http.url": f"http://{dest}/api/items/{rng.randrange(10_000)}?page=2",
        "http.method": "GET",
        "http.protocol": "HTTP/1.1",
        "downstream_cluster": "-",
        "user_agent": "Python/3.11 aiohttp/3.9.5",
        "peer.address": f"127.0.0.1:{rng.randrange(20000, 60000)}",
        "request_size": "0",
        "response_size": str(rng.randrange(200, 4000)),
        "response_flags": "-",
        "http.status_code": "200",
        "upstream_cluster": (
            f"outbound|80||{dest}.default.svc.cluster.local"
            if outbound
            else f"inbound|{rng.randrange(20000, 30000)}||"
        ),
        "upstream_cluster.name": f"outbound|80||{dest}.default" if outbound else "inbound",
        "shoal.destination.service": f"{dest}.default",
        "shoal.route": f"{dest}.default:80#0",
        f"shoal.{'source' if outbound else 'destination'}.service": f"{own}.default",
        "shoal.source.identity": f"{SPIFFE}{own if outbound else other}-sa",
        "shoal.destination.identity": f"{SPIFFE}{dest}-sa",
    }
    span: dict[str, Any] = {
        "traceId": trace_id,
        "id": span_id,
        "name": f"{dest}.default:80/*",
        "kind": kind,
        "timestamp": at,
        "duration": took,
        "localEndpoint": {"serviceName": f"{own}.default", "ipv4": "127.0.0.1"},
        "tags": tags,
        "shared": False,
    }
    if parent is not None:
        span["parentId"] = parent
    if outbound:
        span["remoteEndpoint"] = {"ipv4": "127.0.0.1", "port": 15006}
    return span


def spans(count_traces: int, seed: int = 1) -> Iterator[dict[str, Any]]:
    """3-span traces: a -> b (client, server), b -> c (client)."""
    rng = random.Random(seed)
    now = int(time.time() * 1_000_000)
    for i in range(count_traces):
        a, b, c = rng.sample(SERVICES, 3)
        trace_id = f"{rng.getrandbits(128):032x}"
        # Envoy's Zipkin tracer shares a span id between the caller's CLIENT
        # span and the callee's SERVER span (shared_span_context).
        s1, s3 = (f"{rng.getrandbits(64):016x}" for _ in range(2))
        at = now + i * 1000
        yield _span(rng, trace_id, s1, None, "CLIENT", a, b, at, 9_000)
        yield _span(rng, trace_id, s1, None, "SERVER", b, a, at + 300, 8_200)
        yield _span(rng, trace_id, s3, s1, "CLIENT", b, c, at + 900, 5_000)


def reports(count_traces: int) -> Iterator[bytes]:
    batch: list[dict[str, Any]] = []
    for span in spans(count_traces):
        batch.append(span)
        if len(batch) == REPORT:
            yield json.dumps(batch).encode()
            batch = []
    if batch:
        yield json.dumps(batch).encode()


# -- in-process ---------------------------------------------------------------------


def in_process(count_traces: int) -> dict[str, Any]:
    bodies = list(reports(count_traces))
    sample = json.loads(bodies[0])[0]
    gc.collect()
    rss_before = _rss_kib()["VmRSS"]
    store = traces.SpanStore()
    started = time.perf_counter()
    for body in bodies:
        store.add(json.loads(body))
    took = time.perf_counter() - started
    gc.collect()
    rss_after = _rss_kib()["VmRSS"]
    total_spans = 3 * count_traces
    # The store's own memory: a second store, filled under tracemalloc.
    del store
    gc.collect()
    tracemalloc.start()
    store = traces.SpanStore()
    for body in bodies:
        store.add(json.loads(body))
    gc.collect()
    traced, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stats = store.stats()
    # A query the dashboard makes, at the bound.
    t0 = time.perf_counter()
    store.summaries(limit=20)
    list_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    store.summaries(service="no-such-service", limit=20)
    scan_ms = (time.perf_counter() - t0) * 1000
    return {
        "sent_spans": total_spans,
        "sent_traces": count_traces,
        "span_json_bytes": len(json.dumps(sample, separators=(",", ":"))),
        "spans_per_s": round(total_spans / took),
        "store": stats,
        "tracemalloc_mib": round(traced / 2**20, 1),
        "tracemalloc_bytes_per_span": round(traced / max(1, stats["spans"])),
        "rss_growth_mib": round((rss_after - rss_before) / 1024, 1),
        "list_20_ms": round(list_ms, 2),
        "filtered_scan_ms": round(scan_ms, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# -- over HTTPS (the collector in a child process) ----------------------------------


def serve_main(folder: Path) -> None:
    """The collector alone, as `shoal serve` runs it: writes its port, then
    serves until SIGTERM; SIGUSR1 writes the store's stats."""
    authority = ca.Authority(ca.new_root("cluster.local"))
    certificates = workloads.WorkloadCertificates(authority)
    creds = sidecar_files.issue(
        authority,
        proxy.Sidecar(
            namespace="default",
            service="bench",
            service_account="bench",
            app_port=1,
            inbound_port=2,
            outbound_port=3,
        ),
    )
    (folder / "cert.pem").write_bytes(creds.cert_pem)
    (folder / "key.pem").write_bytes(creds.key_pem)
    (folder / "roots.pem").write_bytes(creds.trust_pem)
    context = tls.mutual_ssl_context(certificates, tls.serving_hosts("127.0.0.1"))
    store = traces.SpanStore()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(
            signal.SIGUSR1,
            lambda: (folder / "stats.json").write_text(json.dumps({**store.stats(), **_rss_kib()})),
        )
        async with traces.serve(store, "127.0.0.1", 0, context) as port:
            gc.collect()
            (folder / "rss.json").write_text(json.dumps(_rss_kib()))
            (folder / ".port").write_text(str(port))
            (folder / ".port").rename(folder / "port")
            await stop.wait()

    asyncio.run(main())


async def over_https(count_traces: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-collector-") as tmp:
        folder = Path(tmp)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", str(folder)
        )
        try:
            deadline = time.monotonic() + 30
            while not (folder / "port").exists():
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the collector did not start")
                await asyncio.sleep(0.05)
            port = int((folder / "port").read_text())
            rss_empty = json.loads((folder / "rss.json").read_text())
            context = ssl.create_default_context(cafile=str(folder / "roots.pem"))
            context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
            url = f"https://127.0.0.1:{port}{traces.SPANS_PATH}"
            bodies = list(reports(count_traces))
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            for body in bodies:
                queue.put_nowait(body)
            accepted = 0
            connector = aiohttp.TCPConnector(limit=CONNECTIONS, ssl=context)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def worker() -> None:
                    nonlocal accepted
                    while not queue.empty():
                        body = queue.get_nowait()
                        async with session.post(
                            url, data=body, headers={"Content-Type": "application/json"}
                        ) as r:
                            if r.status != 202:
                                raise RuntimeError(f"collector answered {r.status}")
                            accepted += (await r.json())["accepted"]

                # One report per connection first: the TLS handshakes.
                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
                took = time.perf_counter() - started
            os.kill(proc.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not (folder / "stats.json").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("no stats from the collector")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            at_bound = json.loads((folder / "stats.json").read_text())
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    return {
        "sent_spans": 3 * count_traces,
        "accepted_spans": accepted,
        "reports": len(bodies),
        "connections": CONNECTIONS,
        "spans_per_s": round(3 * count_traces / took),
        "reports_per_s": round(len(bodies) / took),
        "store": {k: at_bound[k] for k in ("spans", "traces", "bytes", "evicted_traces")},
        "collector_rss_empty_mib": round(rss_empty["VmRSS"] / 1024, 1),
        "collector_rss_at_bound_mib": round(at_bound["VmRSS"] / 1024, 1),
        "collector_hwm_mib": round(at_bound["VmHWM"] / 1024, 1),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve_main(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=40_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    found = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "bounds": {"max_spans": traces.DEFAULT_MAX_SPANS, "max_bytes": traces.DEFAULT_MAX_BYTES},
        "in_process": in_process(args.traces),
        "https": asyncio.run(over_https(args.traces)),
    }
    if args.json:
        print(json.dumps(found, indent=2))
        return
    for part in ("in_process", "https"):
        print(f"{part}:")
        for key, value in found[part].items():
            print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
