"""What proxies report about their own traffic: Envoy's counters, read from
the admin page of each sidecar on this host when the analysis runs.

Only evidence, never configuration: a proxy says where its admin page is
(node metadata), so a lying proxy can at most mislead a diagnosis, and
only about itself. Proxies on other hosts (Pods) are not reached; their
analyzers fall back to what the configuration alone says.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping

import aiohttp

# The counters analyzers read; the admin filters on this, so a sidecar of a
# large mesh answers with a few hundred stats, not a hundred thousand.
PATTERNS: tuple[str, ...] = (
    r"cluster\.outbound\|.*\.ssl\.fail_verify_(san|error|no_cert)$",
    r"cluster\.outbound\|.*\.upstream_cx_connect_fail$",
    r"cluster\.outbound\|.*\.upstream_rq_(total|5xx|403|404|503)$",
    r"listener\..*\.(no_filter_chain_match|downstream_cx_total)$",
    r"listener\..*\.ssl\.(connection_error|fail_verify_.*|handshake)$",
    r"http\..*\.(rbac\.(allowed|denied)|no_route|downstream_rq_(4xx|5xx))$",
)
FILTER = "|".join(f"(^{p})" for p in PATTERNS)
TIMEOUT_S = 2.0


def reachable(peer: str) -> bool:
    """Whether a proxy whose xDS stream came from `peer` runs on this host."""
    kind, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return kind == "unix"


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
