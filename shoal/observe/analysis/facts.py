"""What analyzers look at: one frozen picture of the mesh and its proxies."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.model import mesh, problems, proxy
from shoal.xds import server, status


@dataclass(frozen=True, slots=True)
class HeldCertificate:
    """The workload certificate a proxy last acknowledged over SDS."""

    serial: str
    not_before: float  # seconds since the epoch
    not_after: float


@dataclass(frozen=True, slots=True)
class ProxyFacts:
    """One connected proxy. `proxy` is what it stands for, as the control
    plane placed it (its namespace and service account are those its
    certificate proves); None if it could not be placed."""

    name: str
    identity: str  # SPIFFE ID its xDS client certificate proves; "" without mTLS
    proxy: proxy.Proxy | None
    types: tuple[status.TypeStatus, ...]
    connected_at: float  # time.time()
    admin_port: int = 0
    peer: str = ""
    certificate: HeldCertificate | None = None


@dataclass(frozen=True, slots=True)
class Facts:
    state: mesh.MeshState
    # What the sources (files, Kubernetes) and the controller found.
    found: tuple[problems.Problem, ...] = ()
    # Against a running control plane: its proxies, and what they report.
    live: bool = False
    proxies: tuple[ProxyFacts, ...] = ()
    now: float = 0.0
    debounce_max_s: float = 1.0
    # When the mesh state last changed (time.time()); 0 if unknown.
    changed_at: float = 0.0
    # Kubernetes: whether a mutating webhook that injects shoal's sidecar is
    # installed; None where that is not known (the manifests folder).
    injection_webhook: bool | None = None
    # Envoy counters and gauges per proxy name, read from the proxies that
    # can be reached (on this host); a proxy absent here was not reached.
    stats: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # Seconds each proxy's clock is ahead of the control plane's (negative:
    # behind), where its spans tell.
    clock_offsets: Mapping[str, float] = field(default_factory=dict)
    # Streams the xDS server refused lately (server.MAX_REFUSALS at most).
    refusals: tuple[server.Refusal, ...] = ()

    def proxies_of(self, key: mesh.ServiceKey) -> list[ProxyFacts]:
        """Local sidecars that say they serve the Service `key`."""
        return [
            p
            for p in self.proxies
            if isinstance(p.proxy, proxy.Sidecar) and p.proxy.service_key == key
        ]


# A proxy's facts as JSON, so that worker 0 of `shoal serve --workers N`
# analyzes every worker's proxies together: a problem such as "no proxy of
# this Service is connected" holds only of all of them.
_PROXY_KINDS: dict[str, type[proxy.Sidecar | proxy.Proxyless | proxy.CapturedSidecar]] = {
    "sidecar": proxy.Sidecar,
    "proxyless": proxy.Proxyless,
    "captured": proxy.CapturedSidecar,
}


def proxy_facts_json(p: ProxyFacts) -> dict[str, Any]:
    placed = None
    if p.proxy is not None:
        kind = next(k for k, c in _PROXY_KINDS.items() if isinstance(p.proxy, c))
        placed = {"kind": kind, **dataclasses.asdict(p.proxy)}
    return {
        **{f: getattr(p, f) for f in ("name", "identity", "connected_at", "admin_port", "peer")},
        "proxy": placed,
        "types": [dataclasses.asdict(t) for t in p.types],
        "certificate": dataclasses.asdict(p.certificate) if p.certificate else None,
    }


def proxy_facts_of_json(d: Mapping[str, Any]) -> ProxyFacts:
    placed = d["proxy"]
    certificate = d["certificate"]
    return ProxyFacts(
        name=d["name"],
        identity=d["identity"],
        proxy=_PROXY_KINDS[placed["kind"]](**{k: v for k, v in placed.items() if k != "kind"})
        if placed
        else None,
        types=tuple(status.TypeStatus(**t) for t in d["types"]),
        connected_at=d["connected_at"],
        admin_port=d["admin_port"],
        peer=d["peer"],
        certificate=HeldCertificate(**certificate) if certificate else None,
    )
