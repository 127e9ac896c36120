"""Fuzz every outside input of shoal for minutes per target, and report.

    .venv/bin/python bench/fuzz.py                 # 10 minutes per target
    .venv/bin/python bench/fuzz.py --minutes 1 --targets sotw,delta

The targets and what each example must hold are in tests/security/fuzzing.py
(the same ones CI runs for seconds). While the xDS, join, manifest and admin
targets run against one real control plane, a healthy proxy stays connected
and the endpoint it watches changes every two seconds: the report gives how
long each change took to reach it, so an attack that starves other streams
shows. It also gives the control plane's RSS and the Python heap before,
during and after, and every failure hypothesis found (none is the goal).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from shoal.xds import resources
from tests import manifests
from tests.security import clients, fuzzing

CHUNK = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def targets(h: fuzzing.Harness) -> dict[str, Callable[[], None]]:
    """Each target as a function that runs one chunk of examples."""

    @CHUNK
    @given(requests=fuzzing.discovery_requests(delta=False))
    def sotw(requests: list[Any]) -> None:
        fuzzing.discovery_stream(h, requests, delta=False)

    @CHUNK
    @given(requests=fuzzing.discovery_requests(delta=True))
    def delta(requests: list[Any]) -> None:
        fuzzing.discovery_stream(h, requests, delta=True)

    @CHUNK
    @given(token=fuzzing.hostile_text, csr=fuzzing.csr_inputs, valid_token=st.booleans())
    def joins(token: str, csr: bytes, valid_token: bool) -> None:
        fuzzing.join_request(h, token, csr, valid_token)

    @CHUNK
    @given(csr=fuzzing.csr_inputs)
    def csrs(csr: bytes) -> None:
        fuzzing.sign_csr(csr)
        h.examples += 1

    @CHUNK
    @given(value=fuzzing.annotation_values())
    def annotations(value: dict[str, str]) -> None:
        fuzzing.annotations_only(value)
        h.examples += 1

    @CHUNK
    @given(text=fuzzing.manifest_texts())
    def manifests_(text: str) -> None:
        fuzzing.manifest(h, text)

    @CHUNK
    @given(request=fuzzing.admission_reviews())
    def admission(request: tuple[bytes, str]) -> None:
        fuzzing.admission_review(h, *request)
        h.examples += 1

    @CHUNK
    @given(request=fuzzing.admin_requests(), on_socket=st.booleans())
    def admin(request: tuple[str, str, dict[str, str], bytes], on_socket: bool) -> None:
        fuzzing.admin_request(h, *request, on_socket)

    return {
        "sotw": sotw,
        "delta": delta,
        "joins": joins,
        "csrs": csrs,
        "annotations": annotations,
        "manifests": manifests_,
        "admin": admin,
        "admission": admission,
    }


class Watcher:
    """A healthy proxy subscribed to web's endpoints, and a registry edit
    every `every` seconds: how long each took to reach the proxy."""

    def __init__(self, h: fuzzing.Harness, every: float = 2.0) -> None:
        self.h = h
        self.every = every
        self.latencies: list[float] = []
        self.missed = 0
        self._task: asyncio.Future[None] | None = None

    def start(self) -> None:
        self._task = asyncio.run_coroutine_threadsafe(self._run(), self.h.loop)  # type: ignore[assignment]

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        cp = self.h.control_plane
        cluster = "outbound|80||web.demo.svc.cluster.local"
        registry = cp.registry.root  # type: ignore[union-attr]
        pair = clients.workload(cp, "demo", "watcher")
        async with clients.channel(cp, pair) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    node=fuzzing.sidecar("watcher", "demo", "watcher"),
                    type_url=resources.ENDPOINT,
                    resource_names=[cluster],
                )
            )
            response = await call.read()
            port = 20001
            while True:
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        type_url=resources.ENDPOINT,
                        resource_names=[cluster],
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                    )
                )
                await asyncio.sleep(self.every)
                port = 20002 if port == 20001 else 20001
                started = time.monotonic()
                (registry / "web.yaml").write_text(
                    manifests.service_with_endpoints("web", [port], namespace="demo")
                )
                try:
                    async with asyncio.timeout(30):
                        response = await call.read()
                except TimeoutError:
                    self.missed += 1
                    continue
                self.latencies.append(time.monotonic() - started)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="per target (default 10)")
    parser.add_argument("--targets", default="", help="comma separated (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tracemalloc.start()
    report: dict[str, Any] = {"minutes_per_target": args.minutes, "targets": {}}
    with fuzzing.harness() as h:
        chosen = targets(h)
        names = [n for n in args.targets.split(",") if n] or list(chosen)
        watcher = Watcher(h)
        watcher.start()
        gc.collect()
        report["rss_start_mib"] = round(rss_mib(), 1)
        report["heap_start_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
        for name in names:
            run = chosen[name]
            before = h.examples
            failures: list[str] = []
            deadline = time.monotonic() + args.minutes * 60
            peak_rss = rss_mib()
            while time.monotonic() < deadline:
                try:
                    run()
                except Exception as err:  # a falsifying example: keep going, report it
                    failures.append(f"{type(err).__name__}: {str(err)[:2000]}")
                    h.crashes.records.clear()
                peak_rss = max(peak_rss, rss_mib())
            gc.collect()
            report["targets"][name] = {
                "examples": h.examples - before,
                "failures": failures,
                "rss_after_mib": round(rss_mib(), 1),
                "rss_peak_mib": round(peak_rss, 1),
                "heap_after_mib": round(tracemalloc.get_traced_memory()[0] / 2**20, 1),
            }
            print(f"{name}: {report['targets'][name]}", flush=True)
        watcher.stop()
        lat = sorted(watcher.latencies)
        report["watcher"] = {
            "pushes": len(lat),
            "missed": watcher.missed,
            "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 1) if lat else None,
            "max_ms": round(lat[-1] * 1000, 1) if lat else None,
        }
        report["crash_log_records"] = len(h.crashes.records)
    report["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"watcher: {report['watcher']}")
        print(f"rss start {report['rss_start_mib']} MiB, max {report['max_rss_mib']} MiB")
    failed = any(t["failures"] for t in report["targets"].values()) or report["watcher"]["missed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
