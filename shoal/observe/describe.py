"""`shoal describe service NAME`: one screen about one Service.

Its ports, its endpoints and the identities behind them (what callers
verify), the proxies that serve it and whether they are in sync, how calls
to it are routed, its policies (who may call it, who may see it, mTLS,
outlier detection) and the problems that name it. Built from the mesh state
and the connected proxies' status, as `/debug/describe?service=NS/NAME`;
the problems come from `/debug/problems` and are matched here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal import spiffe, terminal
from shoal.model import mesh, proxy, scope
from shoal.observe import reports
from shoal.observe.analysis import facts
from shoal.xds import resources, status

# Callers listed by name; a mesh of thousands of proxies is summed up past this.
MAX_CALLERS = 50
MAX_SUGGESTIONS = 3
# What a Service is without a shoal.io/mtls of its own or of its namespace
# (as translation decides it: shoal.xds.translate.sidecar.security).
DEFAULT_MTLS = "strict"


class UnknownService(ValueError):
    """No Service of that name: says which names are close."""


@dataclass(frozen=True)
class Caller:
    """A connected proxy that is not the Service's own, and whether a call
    from it would get through: it must see the Service (export-to, its
    dependencies) and be allowed by it."""

    name: str
    identity: str  # namespace/service-account
    sees: bool
    allowed: bool


def parse_key(query: Mapping[str, str]) -> mesh.ServiceKey:
    """`service=NS/NAME`, or `service=NAME&namespace=NS`."""
    given = query.get("service", "")
    if "/" in given:
        namespace, _, name = given.partition("/")
    else:
        namespace, name = query.get("namespace", "default"), given
    if not name or not namespace:
        raise ValueError("name a Service: /debug/describe?service=NAMESPACE/NAME")
    return mesh.ServiceKey(namespace, name)


def suggestions(state: mesh.MeshState, key: mesh.ServiceKey) -> list[str]:
    """Names close to it in its namespace, then Services of that very name
    in other namespaces, then close names anywhere."""
    here = [k.name for k in state.services if k.namespace == key.namespace]
    close_here = [
        str(mesh.ServiceKey(key.namespace, name))
        for name in difflib.get_close_matches(key.name, here, n=MAX_SUGGESTIONS, cutoff=0.6)
    ]
    same_name = sorted(str(k) for k in state.services if k.name == key.name)
    names = difflib.get_close_matches(
        key.name, sorted({k.name for k in state.services}), n=MAX_SUGGESTIONS, cutoff=0.8
    )
    anywhere = sorted(str(k) for k in state.services if k.name in names)
    return list(dict.fromkeys([*close_here, *same_name, *anywhere]))[:MAX_SUGGESTIONS]


def unknown(state: mesh.MeshState, key: mesh.ServiceKey) -> UnknownService:
    close = suggestions(state, key)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return UnknownService(
        terminal.printable(f"no Service {key} in the mesh (version {state.version}){hint}", 1000)
    )


def _account(identity: str) -> tuple[str, str] | None:
    """(namespace, service account) of a SPIFFE ID, None if it is not one."""
    try:
        _, namespace, account = spiffe.parse(identity)
    except spiffe.IdentityError:
        return None
    return namespace, account


def mtls_mode(state: mesh.MeshState, svc: mesh.Service) -> tuple[str, str]:
    """The Service's inbound mTLS mode and who set it."""
    if svc.mtls is not None:
        return svc.mtls, "the Service's shoal.io/mtls"
    namespace = state.namespaces.get(svc.namespace)
    if namespace is not None and namespace.mtls is not None:
        return namespace.mtls, f"namespace {svc.namespace}'s shoal.io/mtls"
    return DEFAULT_MTLS, "the mesh default"


def peers(
    state: mesh.MeshState, svc: mesh.Service, trust_domain: str | None
) -> frozenset[str] | None:
    """SPIFFE IDs callers verify behind the Service (the rule translation
    uses); None in a plain-text mesh."""
    if trust_domain is None:
        return None
    return frozenset(
        spiffe.workload_id(trust_domain, svc.namespace, account)
        for account in state.service_accounts_of(svc.key)
    )


def serves(p: proxy.Proxy | None, svc: mesh.Service, endpoint: mesh.Endpoint) -> bool:
    """Whether the proxy stands in front of that endpoint of the Service."""
    if isinstance(p, proxy.Sidecar):
        return p.service_key == svc.key and (p.inbound_address, p.inbound_port) == (
            endpoint.address,
            endpoint.port,
        )
    if isinstance(p, proxy.CapturedSidecar):
        return p.namespace == svc.namespace and (
            (endpoint.pod is not None and endpoint.pod == p.pod)
            or (bool(p.ip) and p.ip == endpoint.address)
        )
    return False


def _serving(p: facts.ProxyFacts, svc: mesh.Service, endpoints: Iterable[mesh.Endpoint]) -> bool:
    # A local sidecar says which Service it is for, with or without endpoints.
    if isinstance(p.proxy, proxy.Sidecar):
        return p.proxy.service_key == svc.key
    return any(serves(p.proxy, svc, e) for e in endpoints)


def sync_of(types: Iterable[status.TypeStatus]) -> str:
    """SYNCED when every type is, else the types that are not, by state."""
    behind: dict[str, list[str]] = {}
    for t in types:
        if t.status not in (status.SYNCED, status.NOT_SENT):
            behind.setdefault(t.status, []).append(resources.short(t.type_url))
    if not behind:
        return status.SYNCED
    return ", ".join(f"{state} ({' '.join(kinds)})" for state, kinds in sorted(behind.items()))


def _allowed(svc: mesh.Service, namespace: str, account: str) -> bool:
    if svc.allow is None:
        return True
    return (namespace, account) in svc.allow or (namespace, scope.EVERYONE) in svc.allow


def callers(
    state: mesh.MeshState, svc: mesh.Service, proxies: Sequence[facts.ProxyFacts]
) -> list[Caller]:
    """Connected proxies other than its own, with whether they may call it."""
    services = state.sorted_services()
    seen_by: dict[tuple[str, frozenset[tuple[str, str]] | None], bool] = {}
    out = []
    for p in proxies:
        placed = p.proxy
        if placed is None:
            continue
        if isinstance(placed, proxy.Sidecar) and placed.service_key == svc.key:
            continue
        namespace = placed.namespace
        account = placed.service_account if not isinstance(placed, proxy.Proxyless) else ""
        proven = _account(p.identity) if p.identity else None
        if proven is not None:
            namespace, account = proven
        own = (
            state.services.get(placed.service_key)
            if isinstance(placed, proxy.Sidecar | proxy.Proxyless)
            else None
        )
        dependencies = own.dependencies if own is not None else None
        key = (placed.namespace, dependencies)
        if key not in seen_by:
            seen_by[key] = svc.key in scope.visible(
                services, state.routes, placed.namespace, dependencies
            )
        out.append(
            Caller(
                p.name, f"{namespace}/{account}", seen_by[key], _allowed(svc, namespace, account)
            )
        )
    return out


def _limits(svc: mesh.Service) -> dict[str, int] | None:
    if svc.limits is None:
        return None
    found = {
        "max_connections": svc.limits.max_connections,
        "max_pending_requests": svc.limits.max_pending_requests,
        "max_requests": svc.limits.max_requests,
    }
    return {k: v for k, v in found.items() if v is not None}


def service(
    state: mesh.MeshState,
    key: mesh.ServiceKey,
    proxies: Sequence[facts.ProxyFacts],
    trust_domain: str | None,
) -> dict[str, Any]:
    """Everything about one Service that `shoal describe service` shows.
    UnknownService (a ValueError) if there is none of that name."""
    svc = state.services.get(key)
    if svc is None:
        raise unknown(state, key)
    endpoints = state.endpoints.get(key, ())
    expected = peers(state, svc, trust_domain)
    serving = [p for p in proxies if _serving(p, svc, endpoints)]
    mode, mode_from = (
        mtls_mode(state, svc)
        if trust_domain is not None
        else ("off", "a plain-text mesh: shoal serve --insecure-xds")
    )
    found_callers = callers(state, svc, proxies)

    def identity_of(account: str) -> str:
        return spiffe.workload_id(trust_domain, key.namespace, account) if trust_domain else ""

    return {
        "service": str(key),
        "mesh_version": state.version,
        "hostname": key.fqdn,
        "cluster_ip": svc.cluster_ip or "",
        "ports": [
            {
                "port": p.port,
                "name": p.name,
                "protocol": p.protocol.value,
                "target_port": p.target_port,
                "endpoints": len(state.endpoints_of(key, p)),
            }
            for p in svc.ports
        ],
        "endpoints": [
            {
                "address": e.address,
                "port": e.port,
                "port_name": e.port_name,
                "ready": e.ready,
                "service_account": e.service_account,
                "identity": identity_of(e.service_account),
                "pod": e.pod or "",
                "zone": e.zone or "",
                "proxies": [p.name for p in serving if serves(p.proxy, svc, e)],
            }
            for e in sorted(endpoints, key=lambda e: (e.port_name, e.address, e.port))
        ],
        # What a caller's sidecar checks the other end's certificate against.
        "identities": sorted(expected) if expected is not None else None,
        "proxies": [
            {
                "name": p.name,
                "identity": p.identity,
                "sync": sync_of(p.types),
                "types": {resources.short(t.type_url): t.status for t in p.types},
                # Whether callers will accept the certificate it serves with.
                "verified": None if expected is None else p.identity in expected,
            }
            for p in serving
        ],
        "routing": reports.route_of(state, key),
        "routed_from": sorted(
            str(k) for k, r in state.routes.items() if k != key and key in r.backends()
        ),
        "policies": {
            "mtls": {"mode": mode, "from": mode_from},
            "allow": None
            if svc.allow is None
            else [
                {
                    "namespace": ns,
                    "service_account": sa,
                    "identity": spiffe.workload_id(trust_domain, ns, sa)
                    if trust_domain and sa != scope.EVERYONE
                    else "",
                }
                for ns, sa in sorted(svc.allow)
            ],
            "export_to": sorted(svc.export_to),
            "dependencies": None
            if svc.dependencies is None
            else sorted(f"{ns}/{name}" for ns, name in svc.dependencies),
            "outlier": None
            if svc.outlier is None
            else {
                "consecutive_5xx": svc.outlier.consecutive_5xx,
                "ejection_s": svc.outlier.ejection_s,
                "max_ejection_percent": svc.outlier.max_ejection_percent,
            },
            "limits": _limits(svc),
        },
        "callers": [
            {"name": c.name, "identity": c.identity, "sees": c.sees, "allowed": c.allowed}
            for c in found_callers[:MAX_CALLERS]
        ],
        "callers_total": len(found_callers),
        "annotations": {
            k: v for k, v in sorted(svc.annotations.items()) if k.startswith("shoal.io/")
        },
    }


def service_of(
    state: mesh.MeshState,
    query: Mapping[str, str],
    proxies: Sequence[facts.ProxyFacts],
    trust_domain: str | None,
) -> dict[str, Any]:
    """`/debug/describe?service=NS/NAME`."""
    return service(state, parse_key(query), proxies, trust_domain)


def _names_service(text: str, key: mesh.ServiceKey) -> bool:
    # `shop/reviews` or `reviews.shop[.svc...]`, not `shop/reviews-v2`.
    ns, name = re.escape(key.namespace), re.escape(key.name)
    return bool(
        re.search(rf"(?<![\w.-]){ns}/{name}(?![\w-])", text)
        or re.search(rf"(?<![\w.-]){name}\.{ns}(?![\w-])", text)
    )


def concerns(problem: Mapping[str, str], key: mesh.ServiceKey) -> bool:
    """Whether a problem of `/debug/problems` names the Service, in its
    object or its reason."""
    return _names_service(problem.get("object", ""), key) or _names_service(
        problem.get("reason", ""), key
    )


# -- as `shoal describe service` prints it -------------------------------------


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f}ms" if s < 1 else f"{s:g}s"


def _match(rule: Mapping[str, Any]) -> str:
    parts = []
    if rule.get("path"):
        parts.append(f"path {rule['path']['kind']} {rule['path']['value']}")
    if rule.get("method"):
        parts.append(f"method {rule['method']}")
    for kind, matches in (("header", rule.get("headers", [])), ("query", rule.get("query", []))):
        for m in matches:
            value = "" if m["kind"] == "present" else f" {m['value']}"
            parts.append(f"{kind} {m['name']} {m['kind']}{value}")
    return ", ".join(parts) or "every request"


def _backends(rule: Mapping[str, Any]) -> str:
    backends = rule.get("backends", [])
    if not backends:
        if rule.get("redirect"):
            return f"redirect {rule['redirect']}"
        return f"answered {rule.get('status', '')}".rstrip()
    total = sum(b["weight"] for b in backends) or 1
    out = []
    for b in backends:
        where = b["service"]
        if b.get("subset"):
            where += "{" + ",".join(f"{k}={v}" for k, v in sorted(b["subset"].items())) + "}"
        if b.get("port") is not None:
            where += f":{b['port']}"
        missing = " (missing: its share is refused)" if b.get("missing") else ""
        out.append(f"{where} weight {b['weight']} ({100 * b['weight'] / total:.0f}%){missing}")
    return ", ".join(out)


def _policies(found: Mapping[str, Any]) -> list[str]:
    out = []
    if "timeout_s" in found:
        out.append(f"timeout {_seconds(found['timeout_s'])}")
    if found.get("retry"):
        r = found["retry"]
        per_try = (
            f", {_seconds(r['per_try_timeout_s'])} per try" if r.get("per_try_timeout_s") else ""
        )
        out.append(f"retries {r['attempts']} on {r['retry_on']}{per_try}")
    if found.get("fault"):
        f = found["fault"]
        if f.get("abort_status"):
            out.append(f"fault: abort {f['abort_status']} to {f['abort_percent']:g}%")
        if f.get("delay_s"):
            out.append(f"fault: delay {_seconds(f['delay_s'])} to {f['delay_percent']:g}%")
    if found.get("mirror"):
        out.append(f"mirror {found['mirror']['percent']:g}% to {found['mirror']['service']}")
    return out


def _rules(rules: Sequence[Mapping[str, Any]], indent: str) -> list[str]:
    out = []
    for i, rule in enumerate(rules, 1):
        name = f" [{rule['name']}]" if rule.get("name") else ""
        out.append(f"{indent}{i}.{name} {_match(rule)} -> {_backends(rule)}")
        extra = _policies(rule) + [
            f"{k.replace('_', ' ')} {rule[k]}"
            for k in ("rewrite", "request_headers", "response_headers", "mirrors")
            if rule.get(k)
        ]
        if extra:
            out.append(f"{indent}   {'; '.join(extra)}")
    return out


def _routing(found: Mapping[str, Any]) -> list[str]:
    routing = found["routing"]
    if routing is None:
        return ["Routing:      every call to its own endpoints"]
    out = [f"Routing:      from {routing['source'] or 'its routes'}, first match wins"]
    out += _rules(routing["rules"], "  ")
    policies = _policies(routing)
    if policies:
        out.append(f"  for every rule: {'; '.join(policies)}")
    for a in routing.get("attached", []):
        port = f"port {a['port']}" if a.get("port") is not None else "every port"
        who = f"callers in {a['consumer']}" if a.get("consumer") else "every caller"
        out.append(f"  {a['origin']} ({port}, {who}) routes instead:")
        out += _rules(a["rules"], "    ")
    return out


def _allow(found: Mapping[str, Any]) -> str:
    allow = found["policies"]["allow"]
    if allow is None:
        return "everyone (no shoal.io/allow)"
    if not allow:
        return "nobody (an allow list that cannot be read denies every caller)"
    return ", ".join(f"{a['namespace']}/{a['service_account']}" for a in allow)


def _export(found: Mapping[str, Any]) -> str:
    targets = found["policies"]["export_to"]
    if scope.EVERYONE in targets:
        return "every namespace (*)"
    namespace = found["service"].split("/", 1)[0]
    names = [namespace if t == scope.OWN_NAMESPACE else t for t in targets]
    return ", ".join(dict.fromkeys([namespace, *names])) + " only"


def _plural(n: int, one: str, many: str = "") -> str:
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"


def _columns(rows: Iterable[Sequence[str]]) -> list[str]:
    """Rows of cells, aligned, indented under their heading."""
    listed = [list(r) for r in rows]
    if not listed:
        return []
    widths = [max(len(r[i]) for r in listed) for i in range(len(listed[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in listed
    ]


def _verdict(caller: Mapping[str, Any]) -> str:
    if not caller["sees"]:
        return "does not see it (export-to, or its own dependencies)"
    if not caller["allowed"]:
        return "REFUSED by its allow list"
    return "may call it"


def text(found: Mapping[str, Any], problems: Sequence[Mapping[str, str]]) -> str:
    """The report, like `kubectl describe`: one heading per part."""
    namespace, name = found["service"].split("/", 1)
    out = [
        f"Name:         {name}",
        f"Namespace:    {namespace}",
        f"Hostname:     {found['hostname']}"
        + (f" ({found['cluster_ip']})" if found["cluster_ip"] else ""),
        f"Mesh:         version {found['mesh_version']}",
        "Ports:        "
        + (
            ", ".join(
                f"{p['name'] or '(unnamed)'} {p['port']}/{p['protocol']}"
                + (f" -> {p['target_port']}" if p.get("target_port") is not None else "")
                + f" ({_plural(p['endpoints'], 'endpoint')})"
                for p in found["ports"]
            )
            or "none"
        ),
    ]
    ready = sum(1 for e in found["endpoints"] if e["ready"])
    out.append(f"Endpoints:    {ready} ready of {len(found['endpoints'])}")
    for e in found["endpoints"]:
        who = e["identity"] or f"service account {e['service_account']}"
        extras = [f"pod {e['pod']}"] if e["pod"] else []
        extras += [f"zone {e['zone']}"] if e["zone"] else []
        extras += [f"proxy {', '.join(e['proxies'])}"] if e["proxies"] else ["no proxy connected"]
        out.append(
            f"  {e['address']}:{e['port']} ({e['port_name'] or 'unnamed'})  "
            f"{'ready' if e['ready'] else 'NOT READY'}  {who}  {'  '.join(extras)}"
        )
    identities = found["identities"]
    out.append(
        "Identities:   "
        + (
            "none: plain-text mesh, callers verify nobody"
            if identities is None
            else "callers accept " + ", ".join(identities)
        )
    )
    out.append(f"Proxies:      {len(found['proxies'])} connected in front of its endpoints")
    out += _columns(
        [
            p["name"],
            p["identity"] or "(no identity)",
            p["sync"] + ("  CALLERS REFUSE THIS IDENTITY" if p["verified"] is False else ""),
        ]
        for p in found["proxies"]
    )
    out += _routing(found)
    if found["routed_from"]:
        out.append(f"Routed from:  {', '.join(found['routed_from'])} (their routes send here)")
    policies = found["policies"]
    out.append("Policies:")
    out.append(f"  mTLS:        {policies['mtls']['mode']} (from {policies['mtls']['from']})")
    out.append(f"  May call it: {_allow(found)}")
    out.append(f"  Visible to:  {_export(found)}")
    if policies["dependencies"] is not None:
        out.append(f"  Its workloads call only: {', '.join(policies['dependencies'])}")
    if policies["outlier"] is not None:
        o = policies["outlier"]
        out.append(
            f"  Outlier:     eject after {o['consecutive_5xx']} consecutive 5xx for "
            f"{_seconds(o['ejection_s'])}, at most {o['max_ejection_percent']}% of endpoints"
        )
    if policies["limits"]:
        out.append("  Limits:      " + ", ".join(f"{k} {v}" for k, v in policies["limits"].items()))
    callers_shown = found["callers"]
    out.append(
        f"Callers:      {_plural(found['callers_total'], 'other proxy', 'other proxies')} connected"
    )
    out += _columns([c["name"], c["identity"], _verdict(c)] for c in callers_shown)
    if found["callers_total"] > len(callers_shown):
        out.append(f"  ... and {found['callers_total'] - len(callers_shown)} more")
    if found["annotations"]:
        out.append("Annotations:")
        out += [f"  {k}: {v}" for k, v in found["annotations"].items()]
    out.append(f"Problems:     {len(problems) or 'none'}")
    for p in problems:
        field = f" ({p['field']})" if p.get("field") else ""
        out.append(f"  {p['severity']} [{p['code']}] {p['object']}{field}")
        out.append(f"    {p['reason']}")
        out.append(f"    fix: {p['fix']}")
    return terminal.lines("\n".join(out))
