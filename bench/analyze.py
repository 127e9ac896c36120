"""What `shoal analyze` costs the control plane: every analyzer over one
mesh, as `/debug/problems` and the Kubernetes Events writer run them.

The mesh is bench/translate.py's (Services with 10 ready endpoints each, in
10 namespaces), plus what makes the analyzers work: a Pod per endpoint
(with its sidecar), a weighted split on one Service in ten, and live facts
for `--proxies` local sidecars, each reporting the counters evidence.py
reads for 20 upstream Services. Nothing in it is misconfigured, so the
figures are the cost of finding nothing, which is the common case; the
script exits 1 if any analyzer reports a problem.

    .venv/bin/python bench/analyze.py [--sizes 1000,10000] [--proxies 100] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace

import translate

from shoal.model import mesh, proxy, routing
from shoal.observe.analysis import facts, run

REPEATS = 5


@dataclass
class Figures:
    services: int
    proxies: int
    whole_s: float
    per_analyzer_s: dict[str, float]
    problems: int


def mesh_of(services: int) -> mesh.MeshState:
    state = translate.build_state(services)
    pods: dict[tuple[str, str], mesh.Pod] = {}
    for key, eps in state.endpoints.items():
        for e in eps:
            assert e.pod is not None
            pods[(key.namespace, e.pod)] = mesh.Pod(
                key.namespace, e.pod, f"uid-{e.pod}", e.address, sidecar=True
            )
    routes: dict[mesh.ServiceKey, routing.ServiceRoute] = {}
    keys = sorted(state.services)
    for i, key in enumerate(keys[::10]):
        other = keys[(i * 10 + 1) % len(keys)]
        routes[key] = routing.ServiceRoute(
            key,
            (routing.RouteRule((routing.Backend(key, 90), routing.Backend(other, 10))),),
            source="annotations",
        )
    return replace(state, pods=pods, routes=routes)


def live_facts(state: mesh.MeshState, proxies: int) -> facts.Facts:
    keys = sorted(state.services)
    connected = []
    stats: dict[str, dict[str, float]] = {}
    now = time.time()
    for i in range(proxies):
        key = keys[i % len(keys)]
        name = f"sidecar~{key.namespace}~{key.name}-{i}"
        first = state.endpoints[key][0]
        sidecar = proxy.Sidecar(
            key.namespace,
            key.name,
            inbound_port=first.port,
            inbound_address=first.address,
        )
        connected.append(
            facts.ProxyFacts(
                name=name,
                identity=f"spiffe://cluster.local/ns/{key.namespace}/sa/default",
                proxy=sidecar,
                types=(),
                connected_at=now - 60,
                admin_port=20000 + i,
                peer="ipv4:127.0.0.1:40000",
            )
        )
        counters: dict[str, float] = {}
        for j in range(20):
            upstream = keys[(i + j) % len(keys)]
            prefix = f"cluster.outbound|80||{upstream.fqdn}"
            counters[f"{prefix}.upstream_rq_total"] = 100.0
            counters[f"{prefix}.upstream_rq_5xx"] = 0.0
            counters[f"{prefix}.ssl.fail_verify_san"] = 0.0
        stats[name] = counters
    return facts.Facts(
        state,
        live=True,
        proxies=tuple(connected),
        now=now,
        stats=stats,
    )


def measure(services: int, proxies: int) -> Figures:
    state = mesh_of(services)
    found = live_facts(state, proxies)
    problems = run.analyze(found)
    whole = []
    for _ in range(REPEATS):
        gc.collect()
        started = time.perf_counter()
        run.analyze(found)
        whole.append(time.perf_counter() - started)
    per: dict[str, float] = {}
    for analyzer in run.ANALYZERS:
        name = analyzer.__module__.rsplit(".", 1)[-1]
        times = []
        for _ in range(REPEATS):
            gc.collect()
            started = time.perf_counter()
            list(analyzer(found))
            times.append(time.perf_counter() - started)
        per[name] = statistics.median(times)
    return Figures(services, proxies, statistics.median(whole), per, len(problems))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--proxies", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [measure(int(s), args.proxies) for s in args.sizes.split(",")]
    if args.json:
        print(json.dumps([r.__dict__ for r in runs], indent=2))
    else:
        for r in runs:
            slowest = ", ".join(
                f"{k} {v * 1000:.0f} ms"
                for k, v in sorted(r.per_analyzer_s.items(), key=lambda kv: -kv[1])
            )
            print(
                f"{r.services:>6} Services, {r.proxies} proxies: all analyzers "
                f"{r.whole_s * 1000:.0f} ms (median of {REPEATS}); {slowest}; "
                f"{r.problems} problems"
            )
    return 1 if any(r.problems for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
