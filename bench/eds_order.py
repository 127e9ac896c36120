"""In what order real Envoys name their EDS resources, from one sidecar to the next.

    .venv/bin/python bench/eds_order.py [--services 200] [--proxies 10]
        [--modes sotw,delta] [--json]

The xDS server looks a long list of names up by its encoding (README,
"Bytes, not messages"): a list already read is found without reading it
again, but only when it comes in the same order. Whether a fleet of Envoys
sends one order, or one per process, decides how often that happens. Per
mode, a control plane in this process (`cli.control_plane`, mTLS, as `shoal
serve --registry` runs it) serves a folder of `--services` Services, and
`--proxies` real Envoy sidecars of one Service (`shoal.demo.mesh.LocalMesh`)
connect one after the other. A hook over the server's request handlers
(an instance attribute, no change to shoal) records the EDS names of every
request that carries 64 or more. Printed per mode: the requests, how many
distinct orders each sidecar used (its subscribe and its ACKs), how many
distinct orders the sidecars' first requests used, whether they were
sorted, and whether every sidecar asked for the same set.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import localmesh  # noqa: E402  (bench/, this script's folder)

from shoal import envoy  # noqa: E402
from shoal.xds import resources, server  # noqa: E402

KEYED_FROM = 64  # shoal.xds.server._KEYED_BY_WIRE_FROM
FIELDS = {"_on_sotw_request": "resource_names", "_on_delta_request": "resource_names_subscribe"}


def service_yaml(name: str, port: int) -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec: {{ports: [{{name: http, port: 80, targetPort: {port}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
"""


def record(ads: server.AdsServer, seen: list[tuple[str, tuple[str, ...]]]) -> None:
    """Each EDS request's long name list, with the proxy that sent it."""
    for method, field in FIELDS.items():
        handler: Callable[[Any, Any], None] = getattr(ads, method)

        def recording(
            conn: Any,
            request: Any,
            handler: Callable[[Any, Any], None] = handler,
            field: str = field,
        ) -> None:
            names = getattr(request, field)
            if request.type_url == resources.ENDPOINT and len(names) >= KEYED_FROM:
                seen.append((conn.node_id, tuple(names)))
            handler(conn, request)

        setattr(ads, method, recording)


async def run_mode(mode: str, services: int, proxies: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shoal-eds-order-") as tmp:
        work = Path(tmp)
        registry = work / "registry"
        registry.mkdir()
        for i in range(services):
            (registry / f"s{i}.yaml").write_text(service_yaml(f"s{i:04d}", 20000 + i))
        seen: list[tuple[str, tuple[str, ...]]] = []
        async with localmesh.control_plane(registry, work, services) as cp:
            record(cp.ads, seen)
            local = localmesh.local_mesh(cp, work, delta=mode == "delta")
            try:
                for k in range(proxies):
                    await local.add(
                        f"caller-{k}",
                        namespace="default",
                        service="s0000",
                        inbound_port=envoy.free_port(),
                        service_account="caller-sa",
                    )
            finally:
                await local.close()
    by_proxy: dict[str, list[tuple[str, ...]]] = collections.defaultdict(list)
    for node_id, names in seen:
        by_proxy[node_id].append(names)
    firsts = [lists[0] for lists in by_proxy.values()]
    return {
        "mode": mode,
        "services": services,
        "proxies": len(by_proxy),
        "requests": len(seen),
        "orders_per_proxy_max": max((len(set(v)) for v in by_proxy.values()), default=0),
        "first_request_orders": len(set(firsts)),
        "sorted": sum(list(f) == sorted(f) for f in firsts),
        "same_set": len({frozenset(f) for f in firsts}) == 1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=200)
    parser.add_argument("--proxies", type=int, default=10)
    parser.add_argument("--modes", default="sotw,delta")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.services < KEYED_FROM or args.proxies < 1:
        parser.error(f"--services must be at least {KEYED_FROM}, --proxies at least 1")
    rows = [asyncio.run(run_mode(m, args.services, args.proxies)) for m in args.modes.split(",")]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(
                f"{r['mode']:>5}: {r['proxies']} sidecars, {r['requests']} EDS requests of "
                f"{r['services']}+ names; at most {r['orders_per_proxy_max']} order(s) per "
                f"sidecar; {r['first_request_orders']} distinct order(s) across sidecars, "
                f"{r['sorted']} sorted; same set: {r['same_set']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
