"""Certificate figures: issuing workload certificates, and a rotation wave.

    .venv/bin/python bench/certs.py [--count 1000] [--json]

- issue: seconds (wall and CPU) to issue COUNT workload certificates, each
  with a fresh ECDSA P-256 key, as the CA does on first use;
- rotation wave: COUNT proxies, each of its own identity, connected to a real
  Controller over a SnapshotCache; every certificate is renewed at once (the
  worst case: a fleet issued together, renewed together without jitter) and
  the controller rebuilds. CPU seconds for renewing plus rebuilding, and how
  many secrets were serialized (two per identity: its certificate and the
  trust bundle, which is shared but part of each identity's group).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import resource
import time

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from shoal.model import mesh
from shoal.sds import ca, workloads
from shoal.xds import cache, controller, debounce, node


def _node(i: int) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update(
        {
            node.NAMESPACE: "bench",
            node.SERVICE: f"svc-{i}",
            node.SERVICE_ACCOUNT: f"sa-{i}",
            node.APP_PORT: 8080,
            node.INBOUND_PORT: 15006,
            node.OUTBOUND_PORT: 15001,
        }
    )
    return base_pb2.Node(id=f"proxy-{i}", metadata=meta)


def _state(count: int) -> mesh.MeshState:
    services = {
        mesh.ServiceKey("bench", f"svc-{i}"): mesh.Service(
            "bench", f"svc-{i}", (mesh.Port(80, "http"),)
        )
        for i in range(count)
    }
    return mesh.MeshState(version=1, services=services)


async def run(count: int) -> dict[str, object]:
    authority = ca.Authority(ca.new_root("cluster.local"))
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        authority.workload("bench", f"issue-{i}")
    issue_wall, issue_cpu = time.perf_counter() - wall, time.process_time() - cpu

    certs = workloads.WorkloadCertificates(authority, ttl=datetime.timedelta(hours=24))
    snapshots = cache.SnapshotCache(controller.Controller.key_of)
    ctl = controller.Controller(snapshots, debounce.Debouncer(0.1, 1.0), certs)
    ctl.update(_state(count))
    ctl.rebuild()
    trust_domain = authority.trust_domain
    for i in range(count):
        identity = f"spiffe://{trust_domain}/ns/bench/sa/sa-{i}"
        snapshots.watch(cache.Client(_node(i), identity), asyncio.Event())

    # Everything due at once: move every renewal time to now.
    now = ca.utcnow()
    for issued in certs.issued():
        certs._issued[issued.identity] = workloads.Issued(issued.identity, issued.pair, now)
    before = cache.serialization_count()
    wall, cpu = time.perf_counter(), time.process_time()
    renewed = certs.renew_due()
    renew_cpu = time.process_time() - cpu
    ctl.rebuild()
    wave_wall, wave_cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "count": count,
        "issue_s": round(issue_wall, 3),
        "issue_cpu_s": round(issue_cpu, 3),
        "issue_per_cert_ms": round(issue_wall / count * 1000, 3),
        "rotation_wave_proxies": count,
        "rotation_renewed": len(renewed),
        "rotation_renew_cpu_s": round(renew_cpu, 3),
        "rotation_wave_cpu_s": round(wave_cpu, 3),
        "rotation_wave_wall_s": round(wave_wall, 3),
        "rotation_serializations": cache.serialization_count() - before,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "python": platform.python_version(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    figures = asyncio.run(run(args.count))
    if args.json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{key:>28}  {value}")


if __name__ == "__main__":
    main()
