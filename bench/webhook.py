"""Injection figures: webhook latency, and an agent's start to its first ready.

    .venv/bin/python bench/webhook.py [--rate 100] [--seconds 20] [--agent-starts 5] [--json]

Webhook latency: AdmissionReviews at a steady rate over HTTPS.

The webhook runs in a process of its own (as it does inside `shoal serve`),
serving HTTPS with a mesh CA certificate; this process sends a Pod CREATE
review (a Pod with three HTTP probes, so probe rewriting is part of the
work) every 1/RATE seconds, open loop: a slow answer does not delay the
next request, as the API server's requests do not wait for one another.
Each request's latency runs from its due time to the end of the answer, on
connections kept alive as kube-apiserver keeps them.

Agent start: `shoal agent` as a Pod's sidecar runs it (a subprocess, with a
Pod-bound token from the test API server, tests/kube/emulator.py) against a
control plane (`shoal serve --kubernetes`, in this process), timed from the
process's start to the first 200 of its /healthz/ready, which needs the
certificate (TokenReview, CSR), Envoy started and its first configuration
from the control plane in place. Polled every 10 ms.

Goals (issue #12): p99 under 20 ms at 100 requests per second; agent start
to first ready under 2 s, Envoy included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
POD = ROOT / "tests" / "injector" / "pods" / "named_probe_ports.yaml"


async def _serve(port_file: Path, root_file: Path) -> None:
    from shoal.injector import settings, webhook
    from shoal.sds import ca, tls, workloads

    certificates = workloads.WorkloadCertificates(ca.Authority(ca.new_root("cluster.local")))
    await asyncio.to_thread(root_file.write_bytes, certificates.authority.xds_trust)
    s = settings.Settings(trust_pem=certificates.authority.xds_trust.decode())
    context = tls.serving_ssl_context(certificates, tls.serving_hosts("127.0.0.1"))
    async with webhook.serve(webhook.app(lambda: s), "127.0.0.1", 0, context) as port:
        await asyncio.to_thread(port_file.write_text, str(port))
        await asyncio.Event().wait()


def _review(i: int, pod: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": f"bench-{i}",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "object": pod,
                "dryRun": False,
            },
        }
    ).encode()


async def _load(url: str, root: bytes, rate: float, seconds: float) -> dict[str, Any]:
    pod = yaml.safe_load(POD.read_text())
    context = ssl.create_default_context(cadata=root.decode())
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=64, ssl=context)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, due: float) -> None:
            nonlocal failures
            async with session.post(
                url, data=_review(i, pod), headers={"Content-Type": "application/json"}
            ) as response:
                body = await response.json()
            if response.status != 200 or "patch" not in body["response"]:
                failures += 1
            latencies.append(time.perf_counter() - due)

        # Warm-up: TLS handshakes and the first imports are not the figure.
        await asyncio.gather(*(one(-1 - i, time.perf_counter()) for i in range(8)))
        latencies.clear()
        count = int(rate * seconds)
        start = time.perf_counter()
        running: list[asyncio.Task[None]] = []
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            running.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*running)
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)

    def percentile(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    return {
        "requests": len(ordered),
        "failures": failures,
        "achieved_rate": round(len(ordered) / elapsed, 1),
        "p50_ms": round(percentile(50), 2),
        "p90_ms": round(percentile(90), 2),
        "p99_ms": round(percentile(99), 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.mean(ordered) * 1000, 2),
    }


async def _agent_starts(count: int) -> dict[str, Any]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from shoal import cli
    from tests.agent.helpers import AgentProcess, work_dir
    from tests.kube import objects, serving
    from tests.kube.emulator import running_emulator

    seconds: list[float] = []
    with tempfile.TemporaryDirectory() as folder, running_emulator(token="bench") as emu:
        for ns in ("shop", "shoal-system"):
            emu.create(objects.namespace(ns))
        pod = emu.create(objects.pod("shop", "web-1", service_account="web", ip="10.1.0.7"))
        async with cli.control_plane(serving.options(emu, Path(folder))) as cp:
            assert cp.authority is not None
            token = Path(folder) / "token"
            token.write_text(emu.token_for_pod("shop", "web-1"))
            env = {
                "POD_NAME": "web-1",
                "POD_NAMESPACE": "shop",
                "POD_UID": pod["metadata"]["uid"],
                "POD_IP": "10.1.0.7",
                "SERVICE_ACCOUNT": "web",
            }
            for i in range(count):
                with work_dir() as work:
                    agent = AgentProcess(
                        work=work,
                        log=Path(folder) / f"agent-{i}.log",
                        xds_port=cp.xds_port,
                        ca_port=cp.join_port,
                        root_pem=cp.authority.root_pem,
                        token_path=token,
                        env=env,
                    )
                    started = time.perf_counter()
                    await agent.start()
                    try:
                        while (await agent.get("/healthz/ready"))[0] != 200:
                            if time.perf_counter() - started > 30:
                                raise SystemExit(f"the agent was not ready:\n{agent.output}")
                            await asyncio.sleep(0.01)
                        seconds.append(time.perf_counter() - started)
                    finally:
                        await agent.stop()
    return {
        "agent_starts": count,
        "agent_ready_median_s": round(statistics.median(seconds), 3),
        "agent_ready_max_s": round(max(seconds), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--agent-starts", type=int, default=5, metavar="N")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--serve", nargs=2, metavar=("PORT_FILE", "ROOT_FILE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(Path(args.serve[0]), Path(args.serve[1])))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        port_file, root_file = Path(folder) / "port", Path(folder) / "root"
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port_file), str(root_file)],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        try:
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text()):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the webhook did not start")
                time.sleep(0.05)
            url = f"https://127.0.0.1:{port_file.read_text()}/inject"
            figures = asyncio.run(_load(url, root_file.read_bytes(), args.rate, args.seconds))
        finally:
            server.terminate()
            server.wait(timeout=10)
    figures["rate"] = args.rate
    if args.agent_starts > 0:
        figures.update(asyncio.run(_agent_starts(args.agent_starts)))
    figures["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:>20}: {value}")
    return 0 if figures["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
