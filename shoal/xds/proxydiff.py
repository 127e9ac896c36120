"""What one proxy holds against what the control plane wants it to have now:
`shoal proxy-status PROXY`, in the spirit of `istioctl proxy-status POD`.

Per type, the resources the proxy last acknowledged (its held view) are
compared by name and version with the current snapshot's view for its
subscription: added, removed, changed, and for a few changed resources a
unified diff of their JSON, bounded in size. A NACKed type says Envoy's
error and what the rejected version would have changed. Secrets are
compared by version and certificate serial only: their bodies hold private
keys, which this report never decodes, let alone prints.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from shoal import terminal
from shoal.xds import cache, resources, server, status

# Bounds on what one report carries: a mesh-wide change can touch thousands
# of resources, and the answer is read on a terminal.
MAX_LISTED = 50  # resources named per type and kind of change
MAX_CONTENT_DIFFS = 3  # changed resources per type shown line by line
MAX_DIFF_LINES = 60  # lines of one resource's diff
MAX_LINE = 200  # characters of one line of a diff
# A resource whose JSON is longer than this is not diffed line by line:
# difflib's cost grows with the product of the two lengths.
MAX_JSON_LINES = 20_000
SHORT_VERSION = 8

NAMES = {
    "CDS": "Clusters",
    "EDS": "Endpoints",
    "LDS": "Listeners",
    "RDS": "Routes",
    "SDS": "Secrets",
}


def short(version: str) -> str:
    return version[:SHORT_VERSION]


@dataclass(frozen=True)
class ResourceChange:
    """One resource that the proxy holds at another version than wanted, or
    lacks, or holds but should not."""

    name: str
    held: str  # short version the proxy holds; "" if it lacks it
    wanted: str  # short version the control plane wants; "" if it should go
    # Lines of a unified diff of the JSON, held to wanted; for a secret, its
    # certificates' serials instead.
    detail: tuple[str, ...] = ()
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "held": self.held,
            "wanted": self.wanted,
            "detail": list(self.detail),
            "note": self.note,
        }


@dataclass(frozen=True)
class Changes:
    """What would take a proxy from what it holds of one type to what it
    should hold."""

    added: tuple[ResourceChange, ...] = ()
    removed: tuple[ResourceChange, ...] = ()
    changed: tuple[ResourceChange, ...] = ()
    # How many of each: the tuples above are cut at MAX_LISTED.
    totals: tuple[int, int, int] = (0, 0, 0)

    def __bool__(self) -> bool:
        return any(self.totals)


@dataclass(frozen=True)
class TypeDiff:
    type_url: str
    status: str
    held_version: str
    held_count: int
    # Whether the proxy asked for this type on its stream at all.
    asked: bool = True
    # "" when there is nothing to compare against (no snapshot for the proxy yet).
    wanted_version: str = ""
    wanted_count: int = 0
    changes: Changes = Changes()
    # The version sent and not answered yet, and for how long.
    in_flight: str = ""
    in_flight_s: float = 0.0
    error: str = ""  # Envoy's, for the version it rejected
    rejected: str = ""  # that version
    # Whether the rejected version is what the control plane still wants:
    # then `changes` are exactly what it would have made.
    rejected_is_wanted: bool = False

    @property
    def matches(self) -> bool:
        return bool(self.wanted_version) and not self.changes and not self.rejected

    def as_dict(self) -> dict[str, object]:
        added, removed, changed = self.changes.totals
        return {
            "type": resources.short(self.type_url),
            "status": self.status,
            "asked": self.asked,
            "match": self.matches,
            "held": short(self.held_version),
            "wanted": short(self.wanted_version),
            "held_resources": self.held_count,
            "wanted_resources": self.wanted_count,
            "added": [c.as_dict() for c in self.changes.added],
            "removed": [c.as_dict() for c in self.changes.removed],
            "changed": [c.as_dict() for c in self.changes.changed],
            "added_total": added,
            "removed_total": removed,
            "changed_total": changed,
            "in_flight": short(self.in_flight),
            "in_flight_s": round(self.in_flight_s, 1),
            "error": self.error,
            "rejected": short(self.rejected),
            "rejected_is_wanted": self.rejected_is_wanted,
        }


@dataclass(frozen=True)
class ProxyDiff:
    node_id: str
    identity: str
    mode: str
    mesh: str  # the label of the snapshot compared against
    types: tuple[TypeDiff, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.node_id,
            "identity": self.identity,
            "mode": self.mode,
            "mesh": self.mesh,
            "match": all(t.matches for t in self.types if t.asked)
            and any(t.asked for t in self.types),
            "types": [t.as_dict() for t in self.types],
        }


def certificates_of(body: bytes) -> str:
    """A Secret's certificates by serial and expiry, read from its
    certificate fields only: its private key is never parsed."""
    try:
        secret = secret_pb2.Secret.FromString(body)
        if secret.HasField("tls_certificate"):
            pem = secret.tls_certificate.certificate_chain.inline_bytes
            what = "certificate"
        elif secret.HasField("validation_context"):
            pem = secret.validation_context.trusted_ca.inline_bytes
            what = "trusted root"
        else:
            return ""
        certs = x509.load_pem_x509_certificates(pem) if pem else []
    except (DecodeError, ValueError):
        return "certificates unreadable"
    if not certs:
        return ""
    # A workload chain's leaf is what identifies it; a bundle is all roots.
    shown = certs[:1] if what == "certificate" else certs
    return ", ".join(
        f"{what} serial {c.serial_number:x} until "
        f"{c.not_valid_after_utc.isoformat(timespec='seconds')}"
        for c in shown
    )


def _json_lines(r: cache.Resource) -> list[str] | None:
    try:
        found = json_format.MessageToDict(r.as_any(), preserving_proto_field_name=True)
    except (TypeError, KeyError, json_format.Error):
        return None
    return json.dumps(found, indent=2, sort_keys=True).splitlines()


def content_diff(held: cache.Resource, wanted: cache.Resource) -> tuple[tuple[str, ...], str]:
    """A unified diff of two versions of one resource as JSON, cut at
    MAX_DIFF_LINES; or no lines and why not. Never for a secret."""
    if held.type_url == resources.SECRET:
        return (), "secrets are compared by version and certificate, never by content"
    if not held.size:
        # A delta proxy that reconnected names what it holds by version only.
        return (), "the proxy announced only this version when it reconnected: content unknown"
    before, after = _json_lines(held), _json_lines(wanted)
    if before is None or after is None:
        return (), "not a type this control plane can show"
    if max(len(before), len(after)) > MAX_JSON_LINES:
        return (), f"over {MAX_JSON_LINES} lines as JSON: see `shoal config-dump`"
    lines = list(
        difflib.unified_diff(
            before,
            after,
            f"held {short(held.version)}",
            f"wanted {short(wanted.version)}",
            n=2,
            lineterm="",
        )
    )
    shown = [terminal.printable(line, MAX_LINE) for line in lines[:MAX_DIFF_LINES]]
    if len(lines) > MAX_DIFF_LINES:
        shown.append(f"... {len(lines) - MAX_DIFF_LINES} more lines")
    return tuple(shown), ""


def _by_name(view: cache.View) -> dict[str, cache.Resource]:
    return {r.name: r for r in view.resources}


def _secret_detail(held: cache.Resource, wanted: cache.Resource) -> tuple[tuple[str, ...], str]:
    """Which certificates each side carries: what tells two versions of a
    secret apart without showing what is in it."""
    after = certificates_of(wanted.body)
    if not held.body:
        return (
            (f"wanted: {after}",) if after else ()
        ), "held content unknown: announced at reconnect"
    before = certificates_of(held.body)
    return tuple(f"{side}: {c}" for side, c in (("held", before), ("wanted", after)) if c), ""


def changes(type_url: str, held: cache.View, wanted: cache.View) -> Changes:
    have, want = _by_name(held), _by_name(wanted)
    added = sorted(want.keys() - have.keys())
    removed = sorted(have.keys() - want.keys())
    changed = sorted(n for n in have.keys() & want.keys() if have[n].version != want[n].version)
    secret = type_url == resources.SECRET

    def certificates(r: cache.Resource) -> tuple[str, ...]:
        found = certificates_of(r.body) if secret and r.body else ""
        return (found,) if found else ()

    shown_changed = []
    for i, n in enumerate(changed[:MAX_LISTED]):
        before, after = have[n], want[n]
        if secret:
            detail, note = _secret_detail(before, after)
        elif i < MAX_CONTENT_DIFFS:
            detail, note = content_diff(before, after)
        else:
            detail, note = (), f"content shown for the first {MAX_CONTENT_DIFFS} only"
        shown_changed.append(
            ResourceChange(n, short(before.version), short(after.version), detail, note)
        )
    return Changes(
        tuple(
            ResourceChange(n, "", short(want[n].version), certificates(want[n]))
            for n in added[:MAX_LISTED]
        ),
        tuple(
            ResourceChange(n, short(have[n].version), "", certificates(have[n]))
            for n in removed[:MAX_LISTED]
        ),
        tuple(shown_changed),
        (len(added), len(removed), len(changed)),
    )


def type_diff(conn: server.Connection, type_url: str, now: float) -> TypeDiff:
    state = conn.types.get(type_url)
    shown = status.type_status(conn, type_url).status
    if state is None:
        return TypeDiff(type_url, shown, "", 0, asked=False)
    held = state.held
    snapshot = conn.snapshot
    if snapshot is None:
        # Nothing to compare against yet: what it holds is not called wrong.
        return TypeDiff(type_url, shown, held.version, len(held.resources))
    wanted = snapshot.view(type_url, state.subscription)
    pending = state.pending
    rejected = state.nacked_version if state.error else ""
    return TypeDiff(
        type_url,
        shown,
        held.version,
        len(held.resources),
        wanted_version=wanted.version,
        wanted_count=len(wanted.resources),
        changes=changes(type_url, held, wanted),
        in_flight=pending.version if pending is not None else "",
        in_flight_s=max(0.0, now - state.sent_at) if pending is not None else 0.0,
        error=terminal.printable(state.error, server.MAX_ERROR),
        rejected=rejected,
        rejected_is_wanted=bool(rejected) and wanted.version == rejected,
    )


def diff(conn: server.Connection, now: float | None = None) -> ProxyDiff:
    """Every type the proxy asked for (and the types every proxy gets), held
    against wanted."""
    now = time.time() if now is None else now
    snapshot = conn.snapshot
    return ProxyDiff(
        conn.node_id,
        status.identity_of(conn),
        "delta" if conn.delta else "sotw",
        snapshot.label if snapshot is not None else "",
        tuple(
            type_diff(conn, t, now)
            for t in resources.PUSH_ORDER
            if t in conn.types or t != resources.SECRET
        ),
    )


def diff_of(ads: server.AdsServer, query: Mapping[str, str]) -> dict[str, object] | None:
    """`/debug/proxy_diff?proxy=ID[&identity=NS/SA]`."""
    proxy_id = query.get("proxy")
    if not proxy_id:
        raise ValueError("name a proxy: /debug/proxy_diff?proxy=ID[&identity=NS/SA]")
    conn = status.find(ads, proxy_id, query.get("identity", ""))
    return diff(conn).as_dict() if conn is not None else None


# -- as `shoal proxy-status PROXY` prints it -----------------------------------


def _listed(kind: str, changes: Sequence[Mapping[str, Any]], total: int) -> list[str]:
    out = []
    for c in changes:
        name = terminal.printable(str(c["name"]), MAX_LINE)
        if kind == "+":
            out.append(f"  + {name}  (added, {c['wanted']})")
        elif kind == "-":
            out.append(f"  - {name}  (removed, was {c['held']})")
        else:
            out.append(f"  ~ {name}  {c['held'] or '?'} -> {c['wanted']}")
        out += [f"      {terminal.printable(str(line), MAX_LINE)}" for line in c["detail"]]
        if c["note"]:
            out.append(f"      ({terminal.printable(str(c['note']), MAX_LINE)})")
    if total > len(changes):
        word = {"+": "added", "-": "removed", "~": "changed"}[kind]
        out.append(f"  ... and {total - len(changes)} more {word}")
    return out


def _count(n: int) -> str:
    return f"{n} resource" if n == 1 else f"{n} resources"


def text(found: Mapping[str, Any]) -> str:
    """Per type "Match" or "Don't Match" with what differs, like `istioctl
    proxy-status POD`; then one line saying whether everything matches."""
    who = terminal.printable(str(found["id"]), MAX_LINE)
    identity = f" ({found['identity']})" if found.get("identity") else ""
    mesh = f" ({found['mesh']})" if found.get("mesh") else ""
    lines = [
        f"{who}{identity}, {found['mode']}: what it holds against what the control plane "
        f"wants it to have now{mesh}"
    ]
    for t in found["types"]:
        label = f"{NAMES.get(t['type'], t['type'])} ({t['type']})"
        in_flight = (
            f"; version {t['in_flight']} sent {t['in_flight_s']:.1f}s ago, not acknowledged yet"
            if t["in_flight"]
            else ""
        )
        if not t["asked"]:
            lines.append(f"{label}: not asked for on this stream")
        elif not t["wanted"]:
            lines.append(f"{label}: the control plane has no configuration for this proxy yet")
        elif t["match"]:
            lines.append(
                f"{label} Match: version {t['held']}, {_count(t['held_resources'])}{in_flight}"
            )
        else:
            held = f"version {t['held']}" if t["held"] else "nothing"
            lines.append(
                f"{label} Don't Match: holds {held} ({_count(t['held_resources'])}), "
                f"wants {t['wanted']} ({_count(t['wanted_resources'])}){in_flight}"
            )
        if t["rejected"]:
            lines.append(
                f"  NACKED version {t['rejected']}: " + terminal.printable(str(t["error"]), 2000)
            )
            if t["added_total"] or t["removed_total"] or t["changed_total"]:
                lines.append(
                    "  what the rejected version would change:"
                    if t["rejected_is_wanted"]
                    else f"  the control plane has moved on since; what {t['wanted']} would change:"
                )
        lines += _listed("+", t["added"], t["added_total"])
        lines += _listed("-", t["removed"], t["removed_total"])
        lines += _listed("~", t["changed"], t["changed_total"])
    if found.get("match"):
        lines.append("Everything matches: the proxy holds what the control plane wants it to have.")
    return "\n".join(lines)
