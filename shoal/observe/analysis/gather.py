"""The facts of a running control plane, for its analyzers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography import x509

from shoal import workers
from shoal.model import mesh, problems
from shoal.observe.analysis import evidence, facts
from shoal.sds import report
from shoal.xds import controller, resources, server, status


def held_certificate(conn: server.Connection) -> facts.HeldCertificate | None:
    body = status.held_secret(conn, "default")
    chain = report.chain_of_secret(body) if body else None
    if not chain:
        return None
    cert = x509.load_pem_x509_certificate(chain)
    return facts.HeldCertificate(
        f"{cert.serial_number:x}",
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
    )


def proxies(ads: server.AdsServer, ctl: controller.Controller) -> tuple[facts.ProxyFacts, ...]:
    named = status.names(ads)
    out = []
    for conn in sorted(ads.connections.values(), key=lambda c: (c.node_id, c.stream_id)):
        out.append(
            facts.ProxyFacts(
                name=named[conn.stream_id],
                identity=conn.identity or "",
                proxy=ctl.proxy_of(conn.key),
                types=tuple(
                    status.type_status(conn, t) for t in resources.PUSH_ORDER if t in conn.types
                ),
                connected_at=conn.connected_at,
                admin_port=conn.admin_port,
                peer=conn.peer,
                certificate=held_certificate(conn),
            )
        )
    return tuple(out)


async def with_workers(
    own: tuple[facts.ProxyFacts, ...], sockets: Mapping[int, Path]
) -> tuple[facts.ProxyFacts, ...]:
    """This worker's proxies and every other worker's (`serve --workers`)."""
    found = list(own)
    for code, body in (await workers.gather(sockets, PROXY_FACTS)).values():
        if code == 200:
            found += [facts.proxy_facts_of_json(d) for d in json.loads(body)]
    return tuple(sorted(found, key=lambda p: (p.name, p.connected_at)))


# Where each worker says what its proxies are (its admin API, /debug/...).
PROXY_FACTS = "/debug/proxy_facts"


async def live(
    state: mesh.MeshState,
    found: tuple[problems.Problem, ...],
    ads: server.AdsServer,
    ctl: controller.Controller,
    *,
    debounce_max_s: float,
    injection_webhook: Callable[[], bool | None] = lambda: None,
    clock_offsets: Callable[[], Mapping[str, float]] = dict,
    connected: tuple[facts.ProxyFacts, ...] | None = None,
) -> facts.Facts:
    """Everything a running control plane knows now, and the counters of
    the proxies it can reach; `connected`: its proxies, if not only those
    of `ads`."""
    connected = proxies(ads, ctl) if connected is None else connected
    stats = await evidence.scrape((p.name, p.admin_port, p.peer) for p in connected)
    return facts.Facts(
        state=state,
        found=found,
        live=True,
        proxies=connected,
        now=time.time(),
        debounce_max_s=debounce_max_s,
        changed_at=ctl.changed_at_wall,
        injection_webhook=injection_webhook(),
        stats=stats,
        refusals=tuple(ads.refusals.values()),
        clock_offsets=clock_offsets(),
    )
