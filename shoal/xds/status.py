"""Every connected proxy's sync state, per type, as `shoal proxy-status` shows it.

SYNCED: the proxy ACKed what the control plane wants it to have now.
STALE: a response is on its way, or the control plane has moved on and the
push has not gone out yet. NACKED: the proxy rejected the last version.
NOT SENT: nothing of that type was sent (or asked for) on this stream.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf import json_format

from shoal import spiffe
from shoal.xds import cache, resources, server

SYNCED = "SYNCED"
STALE = "STALE"
NACKED = "NACKED"
NOT_SENT = "NOT SENT"


@dataclass(frozen=True)
class TypeStatus:
    type_url: str
    status: str
    sent_version: str
    acked_version: str
    nonce: str
    sent_at: float
    acked_at: float
    error: str
    resources: int

    def as_dict(self) -> dict[str, object]:
        return {
            "type": resources.short(self.type_url),
            "status": self.status,
            "sent": self.sent_version,
            "acked": self.acked_version,
            "nonce": self.nonce,
            "sent_at": self.sent_at,
            "acked_at": self.acked_at,
            "error": self.error,
            "resources": self.resources,
        }


def of_type(state: server.TypeState | None, snapshot: cache.Snapshot | None) -> str:
    if state is None or (not state.sent_version and not state.acked_version):
        return NOT_SENT
    if state.error and state.nacked_version == state.sent_version:
        return NACKED
    if state.in_flight:
        return STALE
    if snapshot is not None and state.type_url in resources.PUSH_ORDER:
        wanted = snapshot.view(state.type_url, state.subscription).version
        if wanted != state.held.version:
            return STALE
    return SYNCED


def type_status(conn: server.Connection, type_url: str) -> TypeStatus:
    state = conn.types.get(type_url)
    snapshot = conn.snapshot
    if state is None:
        return TypeStatus(type_url, NOT_SENT, "", "", "", 0.0, 0.0, "", 0)
    shown = state.pending or state.held
    return TypeStatus(
        type_url,
        of_type(state, snapshot),
        state.sent_version,
        state.acked_version,
        state.nonce,
        state.sent_at,
        state.acked_at,
        state.error,
        len(shown.resources),
    )


def identity_of(conn: server.Connection) -> str:
    """`namespace/service-account` of the stream's certificate ("" without)."""
    if conn.identity is None:
        return ""
    _, namespace, account = spiffe.parse(conn.identity)
    return f"{namespace}/{account}"


def names(ads: server.AdsServer) -> dict[int, str]:
    """A name per stream that no other identity's stream shares: the node id,
    and where proxies of several identities use one node id (a node id is
    what a proxy says it is), the identity too."""
    by_id: dict[str, set[str]] = {}
    for conn in ads.connections.values():
        by_id.setdefault(conn.node_id, set()).add(identity_of(conn))
    return {
        conn.stream_id: conn.node_id
        if len(by_id[conn.node_id]) == 1
        else f"{conn.node_id} [{identity_of(conn)}]"
        for conn in ads.connections.values()
    }


def proxies(ads: server.AdsServer, now: float | None = None) -> list[dict[str, object]]:
    """One entry per connected stream, sorted by proxy id."""
    now = time.time() if now is None else now
    out: list[dict[str, object]] = []
    for conn in sorted(ads.connections.values(), key=lambda c: (c.node_id, c.stream_id)):
        snapshot = conn.snapshot
        out.append(
            {
                "id": conn.node_id,
                "identity": identity_of(conn),
                "cluster": conn.cluster,
                "stream": conn.stream_id,
                "peer": conn.peer,
                # Where its Envoy admin page is, as the proxy says.
                "admin_port": conn.admin_port,
                "pod": conn.pod,
                "mode": "delta" if conn.delta else "sotw",
                "connected_s": round(now - conn.connected_at, 1),
                "mesh": snapshot.label if snapshot is not None else "",
                "types": [
                    type_status(conn, t).as_dict()
                    for t in resources.PUSH_ORDER
                    if t in conn.types or t != resources.SECRET
                ],
            }
        )
    return out


class Ambiguous(ValueError):
    """More than one proxy answers to that name."""


def find(ads: server.AdsServer, proxy_id: str, identity: str = "") -> server.Connection | None:
    """The newest stream of a proxy: by exact id, else by a part of the id
    (`frontend-1`, `sidecar~demo~front`) that names one proxy only; of the
    `identity` given (`namespace/service-account`) when proxies of several
    identities use that id. Ambiguous says which to choose from."""
    conns = sorted(ads.connections.values(), key=lambda c: c.stream_id)
    if identity:
        conns = [c for c in conns if identity_of(c) == identity]
    for matches in (
        lambda c: c.node_id == proxy_id,
        lambda c: c.node_id.startswith(proxy_id),
        lambda c: proxy_id in c.node_id,
    ):
        found = [c for c in conns if matches(c)]
        if len({(c.node_id, identity_of(c)) for c in found}) == 1:
            return found[-1]
        if found:
            choices = sorted({f"{c.node_id} ({identity_of(c)})" for c in found})
            raise Ambiguous(f"{proxy_id!r} names {len(choices)} proxies: {', '.join(choices)}")
    return None


REDACTED = "[redacted: private key material is never dumped]"


def _resource_json(r: cache.Resource) -> object:
    if r.type_url == resources.SECRET:
        return {"name": r.name, "secret": REDACTED}
    try:
        return json_format.MessageToDict(r.as_any(), preserving_proto_field_name=True)
    except (TypeError, KeyError, json_format.Error):
        # A type this process never imported: still show that it is there.
        return {"name": r.name, "version": r.version, "bytes": r.size}


def config_dump(conn: server.Connection) -> dict[str, object]:
    """What the control plane last sent this proxy, type by type."""
    types: dict[str, object] = {}
    for type_url in resources.PUSH_ORDER:
        state = conn.types.get(type_url)
        if state is None:
            continue
        shown = type_status(conn, type_url)
        view = state.pending or state.held
        types[resources.short(type_url)] = {
            **shown.as_dict(),
            "resources": [_resource_json(r) for r in view.resources],
        }
    return {
        "id": conn.node_id,
        "identity": identity_of(conn),
        "stream": conn.stream_id,
        "mode": "delta" if conn.delta else "sotw",
        "types": types,
    }


def held_secret(conn: server.Connection, name: str) -> bytes | None:
    """The body of a secret as the proxy last acknowledged it."""
    state = conn.types.get(resources.SECRET)
    if state is None:
        return None
    for r in state.held.resources:
        if r.name == name:
            return r.body
    return None


def held_by_proxy(ads: server.AdsServer, secret: str) -> dict[str, bytes | None]:
    """A secret each proxy holds, by a name unique to it (see names)."""
    named = names(ads)
    return {
        named[c.stream_id]: held_secret(c, secret)
        for c in sorted(ads.connections.values(), key=lambda c: c.stream_id)
    }


def config_dump_of(ads: server.AdsServer, query: Mapping[str, str]) -> dict[str, object] | None:
    """`/debug/config_dump?proxy=ID[&identity=NS/SA]`."""
    proxy_id = query.get("proxy")
    if not proxy_id:
        raise ValueError("name a proxy: /debug/config_dump?proxy=ID[&identity=NS/SA]")
    conn = find(ads, proxy_id, query.get("identity", ""))
    return config_dump(conn) if conn is not None else None
