"""What proxies report about their own traffic: Envoy's counters, read from
the admin page of each sidecar on this host when the analysis runs.

Only evidence, never configuration: a proxy says where its admin page is
(node metadata), so a lying proxy can at most mislead a diagnosis, and
only about itself. Proxies on other hosts (Pods) are not reached; their
analyzers fall back to what the configuration alone says.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import aiohttp

from shoal.model import mesh, proxy
from shoal.observe import peers
from shoal.observe.analysis import facts
from shoal.xds.translate import telemetry

# The counters analyzers read; the admin filters on this, so a sidecar of a
# large mesh answers with a few hundred stats, not a hundred thousand.
PATTERNS: tuple[str, ...] = (
    r"cluster\.outbound\|.*\.ssl\.fail_verify_(san|error|no_cert)$",
    r"cluster\.outbound\|.*\.upstream_cx_connect_fail$",
    r"cluster\.outbound\|.*\.upstream_rq_(total|5xx|403|404|503)$",
    # Requests that found no endpoint to go to (no ready endpoint at all).
    r"cluster\.outbound\|.*\.upstream_cx_none_healthy$",
    r"listener\..*\.(no_filter_chain_match|downstream_cx_total)$",
    r"listener\..*\.ssl\.(connection_error|fail_verify_.*|handshake)$",
    r"http\..*\.(rbac\.(allowed|denied)|no_route|downstream_rq_(4xx|5xx))$",
    # The TCP inbound's RBAC (stat prefix `inbound`): connections, not requests.
    r"inbound(_passthrough)?\.rbac\.(allowed|denied)$",
    # The request metrics: who called whom, and what came back. Only the
    # counter, and only series that saw traffic exist.
    rf"{telemetry.STAT_PREFIX}\.{telemetry.REQUESTS}\.",
)
FILTER = "|".join(f"(^{p})" for p in PATTERNS)
TIMEOUT_S = 2.0


# Whether a proxy whose xDS stream came from a peer runs on this host.
reachable = peers.on_this_host


async def _read(session: aiohttp.ClientSession, port: int) -> dict[str, float] | None:
    try:
        async with session.get(
            f"http://127.0.0.1:{port}/stats", params={"format": "json", "filter": FILTER}
        ) as r:
            if r.status != 200:
                return None
            found = await r.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
    out: dict[str, float] = {}
    for stat in found.get("stats", ()) if isinstance(found, dict) else ():
        if isinstance(stat, dict) and isinstance(stat.get("value"), int | float):
            out[str(stat["name"])] = float(stat["value"])
    return out


async def scrape(targets: Iterable[tuple[str, int, str]]) -> Mapping[str, Mapping[str, float]]:
    """Counters by proxy name, for (name, admin port, peer) of each proxy;
    those not on this host or not answering are left out."""
    local = [(name, port) for name, port, peer in targets if port and reachable(peer)]
    if not local:
        return {}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        read = await asyncio.gather(*(_read(session, port) for _, port in local))
    return {name: stats for (name, _), stats in zip(local, read, strict=True) if stats is not None}


def matching(stats: Mapping[str, float], prefix: str, suffix: str) -> float:
    """The sum of the counters named `prefix...suffix`."""
    return sum(v for k, v in stats.items() if k.startswith(prefix) and k.endswith(suffix))


# cluster.outbound|80||web.shop.svc.cluster.local.upstream_rq_503, and
# `outbound|80|version=v2|...` for a subset. The domain is spelled out: the
# same stats also exist as `...cluster.local.external.upstream_rq_503`.
_OUTBOUND = re.compile(
    r"^cluster\.outbound\|(?P<port>\d+)\|[^|]*\|(?P<name>[^.|]+)\.(?P<ns>[^.|]+)"
    rf"\.svc\.{re.escape(mesh.CLUSTER_DOMAIN)}\.(?P<stat>[a-z0-9_.]+)$"
)


@dataclass(frozen=True, slots=True)
class Outbound:
    """One counter of a caller's outbound cluster of a Service port."""

    service: mesh.ServiceKey
    port: int
    stat: str  # `upstream_rq_503`, `ssl.fail_verify_san`, ...
    value: float


def outbound(stats: Mapping[str, float]) -> Iterator[Outbound]:
    """The counters of one proxy's outbound clusters of mesh Services (every
    subset of a port counted under that port)."""
    for name, value in stats.items():
        if not name.startswith("cluster.outbound|"):
            continue
        found = _OUTBOUND.match(name)
        if found is not None:
            key = mesh.ServiceKey(found["ns"], found["name"])
            yield Outbound(key, int(found["port"]), found["stat"], value)


# The tags of the request metrics, in the order Envoy writes them into the
# name (telemetry._metric_tags). Each tag name has an underscore, which the
# values (DNS names, SPIFFE IDs whose namespace and account are DNS names,
# status codes) do not, so the name splits on them; only a trust domain
# spelling a whole `.tag_name.` could mislead it.
_REQUESTS = re.compile(
    rf"^{telemetry.STAT_PREFIX}\.{telemetry.REQUESTS}"
    r"\.reporter\.(?P<reporter>[a-z]+)"
    r"\.source_workload\.(?P<source_workload>.*?)"
    r"\.source_identity\.(?P<source_identity>.*?)"
    r"\.destination_service\.(?P<destination_service>.*?)"
    r"\.destination_identity\.(?P<destination_identity>.*?)"
    r"\.response_code\.(?P<response_code>[0-9]*)"
    r"\.response_flags\.(?P<response_flags>.*)$"
)


@dataclass(frozen=True, slots=True)
class Requests:
    """One series of the request metrics: how many requests `reporter`'s
    sidecar ("source": the caller's, "destination": the callee's) saw
    between these two ends with this response. A value Envoy could not
    fill is "" (no upstream cluster, no peer certificate); the caller's
    workload is never known at the destination ("unknown")."""

    reporter: str
    source_workload: str  # `web.shop`, as telemetry.service_name spells it
    source_identity: str
    destination_service: str
    destination_identity: str
    response_code: int  # 0: no response (the caller went away first)
    response_flags: str
    count: float


def requests(stats: Mapping[str, float]) -> Iterator[Requests]:
    """The request metrics one proxy reports."""
    prefix = f"{telemetry.STAT_PREFIX}.{telemetry.REQUESTS}."
    for name, value in stats.items():
        if not name.startswith(prefix):
            continue
        found = _REQUESTS.match(name)
        if found is None:
            continue
        yield Requests(
            found["reporter"],
            found["source_workload"],
            found["source_identity"],
            found["destination_service"],
            found["destination_identity"],
            int(found["response_code"] or 0),
            found["response_flags"],
            value,
        )


def listener_prefix(address: str, port: int) -> str:
    """Where Envoy counts a listener bound to address:port: `listener.127.0.0.1_15006.`
    (an IPv6 address in brackets, its colons made underscores)."""
    where = f"[{address}]_{port}" if ":" in address else f"{address}_{port}"
    return f"listener.{where.replace(':', '_')}."


def workload_of(p: facts.ProxyFacts) -> str:
    """How a reason names the workload behind a proxy: its Service (local
    sidecar), its Pod (captured), else the proxy's own name."""
    placed = p.proxy
    if isinstance(placed, proxy.Sidecar | proxy.Proxyless) and placed.service:
        return str(placed.service_key)
    if isinstance(placed, proxy.CapturedSidecar):
        return f"Pod {placed.namespace}/{placed.pod}"
    return p.name


def listed(names: Iterable[str], most: int = 5) -> str:
    """`a, b and c`; past `most` names, `a, b, c, d, e and 3 more`: a reason
    stays one line however many callers a Service has."""
    items = sorted(set(names))
    if len(items) > most:
        return f"{', '.join(items[:most])} and {len(items) - most} more"
    if len(items) > 1:
        return f"{', '.join(items[:-1])} and {items[-1]}"
    return items[0] if items else ""


def counted(n: float, what: str) -> str:
    """`1 request`, `3 requests`: counters are whole numbers held as floats."""
    return f"{n:.0f} {what}" + ("" if round(n) == 1 else "s")


def workload_named(metric_name: str) -> str:
    """`shop/web` for the request metrics' `web.shop` (telemetry.service_name)."""
    name, _, namespace = metric_name.partition(".")
    return f"{namespace}/{name}" if namespace else name
