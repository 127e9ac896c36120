"""The command line: the coordinator by default, or one of the processes it
starts (a worker of the client fleet, the floor) with the hidden flags."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import clients, floor, mesh, processes, report, run

DESCRIPTION = "Fan-out benchmark: `shoal serve` and N simulated Envoy sidecars over real ADS."


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument(
        "--proxies", default="100,1000,2000", help="comma-separated proxy counts (100,1000,2000)"
    )
    p.add_argument(
        "--mode",
        choices=("delta", "sotw"),
        default="delta",
        help="incremental (DeltaAggregatedResources) or state of the world",
    )
    p.add_argument("--services", type=int, default=1000, help="Services in the mesh (1000)")
    p.add_argument(
        "--xds-security",
        choices=("mtls", "insecure"),
        default="mtls",
        help="xDS over mTLS with client certificates from the mesh CA, as shoal serve "
        "runs by default, or plain text (shoal serve --insecure-xds)",
    )
    p.add_argument("--pushes", type=int, default=5, help="one-endpoint pushes per proxy count")
    p.add_argument(
        "--warmup-pushes",
        type=int,
        default=0,
        help="pushes before those, not counted, for shoal and the floor alike (0): the "
        "clients' first push after they connect costs them more CPU than the later ones",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="client processes the proxies are spread over"
    )
    p.add_argument(
        "--serve-workers",
        type=int,
        default=1,
        metavar="N",
        help="shoal serve --workers N; server CPU and memory are then those of all N",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-floor", action="store_true", help="skip the bare gRPC server")
    p.add_argument("--no-reconnect", action="store_true", help="skip the reconnect storm")
    p.add_argument(
        "--tracemalloc",
        metavar="FILE",
        help="run shoal serve under tracemalloc; snapshots before and after the proxies "
        "connect go to FILE.0 and FILE.1 (compare them with tracemalloc.Snapshot.load)",
    )
    p.add_argument(
        "--instrument",
        action="store_true",
        help="run shoal serve in a wrapper that times its garbage collections, registry "
        "reloads and rebuilds, to split each push into its parts",
    )
    p.add_argument(
        "--server-profile",
        default="",
        metavar="FILE",
        help="cProfile shoal serve's event loop in one phase, in the loop thread's CPU time "
        "(gRPC's own threads and waits do not count; slows it down); pstats to FILE",
    )
    p.add_argument(
        "--server-profile-phase", choices=("connect", "push", "reconnect"), default="push"
    )
    p.add_argument(
        "--malloc",
        choices=("tuned", "glibc"),
        default="tuned",
        help="tuned: as shoal serve runs; glibc: without its malloc tuning",
    )
    # Internal: the processes this script starts.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--floor-server", type=int, help=argparse.SUPPRESS)
    p.add_argument("--floor-body", help=argparse.SUPPRESS)
    p.add_argument("--floor-tls", help=argparse.SUPPRESS)
    p.add_argument("--replay-server", type=int, help=argparse.SUPPRESS)
    p.add_argument("--replay-bodies", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    counts = args.proxies.split(",")
    if not all(c.strip().isdigit() and int(c) > 0 for c in counts):
        p.error("--proxies takes positive numbers, comma-separated")
    if mesh.FIRST_OUTBOUND_PORT + max(int(c) for c in counts) > 65535:
        p.error(f"at most {65535 - mesh.FIRST_OUTBOUND_PORT} proxies (one outbound port each)")
    if args.services < 1 or args.pushes < 1 or args.workers < 1:
        p.error("--services, --pushes and --workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if args.server_profile:
        args.server_profile = os.path.abspath(args.server_profile)
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(clients.worker_main())
        return 0
    if args.replay_server is not None:
        tls = Path(args.floor_tls) if args.floor_tls else None
        asyncio.run(floor.replay_main(args.replay_server, Path(args.replay_bodies), tls))
        return 0
    if args.floor_server is not None:
        tls = Path(args.floor_tls) if args.floor_tls else None
        asyncio.run(floor.floor_main(args.floor_server, Path(args.floor_body), tls))
        return 0
    try:
        results = asyncio.run(run.coordinator(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("fanout: interrupted", file=sys.stderr)
        return 130
    finally:
        processes.CHILDREN.kill_all_now()
    if args.json:
        print(json.dumps(report.json_rows(results)))
    return 0 if all(r.complete for r in results) else 1
