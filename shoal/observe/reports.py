"""What `/debug/` shows of the mesh model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoal.model import mesh, routing


def services(state: mesh.MeshState) -> dict[str, Any]:
    """`/debug/services`: every Service's ports and endpoints, and how calls
    to it are routed (rules, weighted backends, header matches, policies),
    with where that routing came from (annotations or a TrafficRoute)."""
    return {
        "version": state.version,
        "services": {
            str(k): {
                "ports": [f"{p.port}/{p.protocol.value}" for p in s.ports],
                "endpoints": [
                    f"{e.address}:{e.port}{'' if e.ready else ' (not ready)'}"
                    for e in state.endpoints.get(k, ())
                ],
                "routing": _route(state.routes[k]) if k in state.routes else None,
            }
            for k, s in sorted(state.services.items())
        },
    }


def route_of(state: mesh.MeshState, key: mesh.ServiceKey) -> dict[str, Any] | None:
    """How calls to one Service are routed, as `/debug/services` says it;
    None when they all go to its own endpoints."""
    found = state.routes.get(key)
    return _route(found) if found is not None else None


def _route(route: routing.ServiceRoute) -> dict[str, Any]:
    out = {
        "source": route.source,
        "rules": [_rule(r) for r in route.rules],
        **_policies(route.timeout_s, route.retry, route.fault, route.mirror),
    }
    if route.attached:
        # Gateway API routes, each with whom it routes; where one applies,
        # its rules are used instead of `rules`.
        out["attached"] = [
            {
                "origin": a.origin,
                "port": a.port,
                "consumer": a.consumer,
                "kind": "GRPCRoute" if a.grpc else "HTTPRoute",
                "rules": [_rule(r) for _, r in sorted(zip(a.order, a.rules, strict=True))],
            }
            for a in route.attached
        ]
    return out


def _rule(rule: routing.RouteRule) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if rule.name:
        extra["name"] = rule.name
    if rule.status is not None:
        extra["status"] = rule.status
    if rule.redirect is not None:
        r = rule.redirect
        extra["redirect"] = {
            "status": r.status,
            **{
                k: v
                for k, v in (("scheme", r.scheme), ("hostname", r.hostname), ("port", r.port))
                if v
            },
            **({"path": _path_change(r.path)} if r.path else {}),
        }
    if rule.rewrite is not None:
        extra["rewrite"] = {
            **({"hostname": rule.rewrite.hostname} if rule.rewrite.hostname else {}),
            **({"path": _path_change(rule.rewrite.path)} if rule.rewrite.path else {}),
        }
    for key, change in (
        ("request_headers", rule.request_headers),
        ("response_headers", rule.response_headers),
    ):
        if change is not None:
            extra[key] = {
                "set": dict(change.set),
                "add": dict(change.add),
                "remove": list(change.remove),
            }
    if rule.mirrors:
        extra["mirrors"] = [{"service": str(m.service), "percent": m.percent} for m in rule.mirrors]
    return {
        **extra,
        "backends": [
            {
                "service": str(b.service),
                "weight": b.weight,
                **({"subset": dict(b.subset)} if b.subset else {}),
                **({"port": b.port} if b.port is not None else {}),
                **({"missing": True} if b.missing else {}),
            }
            for b in rule.backends
        ],
        "headers": [_match(m) for m in rule.headers],
        "query": [_match(m) for m in rule.query],
        "path": {"kind": rule.path.kind.value, "value": rule.path.value} if rule.path else None,
        "method": rule.method,
        **_policies(rule.timeout_s, rule.retry, rule.fault, rule.mirror),
    }


def _path_change(change: routing.PathChange) -> str:
    return change.value if change.full else f"prefix -> {change.value or '/'}"


def _match(m: routing.HeaderMatch) -> dict[str, str]:
    return {"name": m.name, "kind": m.kind.value, "value": m.value}


def _policies(
    timeout_s: float | None,
    retry: routing.Retry | None,
    fault: routing.Fault | None,
    mirror: routing.Mirror | None,
) -> dict[str, Any]:
    """Only the policies that are set."""
    out: dict[str, Any] = {}
    if timeout_s is not None:
        out["timeout_s"] = timeout_s
    if retry is not None:
        out["retry"] = {
            "attempts": retry.attempts,
            "retry_on": retry.retry_on,
            "per_try_timeout_s": retry.per_try_timeout_s,
        }
    if fault is not None:
        out["fault"] = {
            "abort_status": fault.abort_status,
            "abort_percent": fault.abort_percent,
            "delay_s": fault.delay_s,
            "delay_percent": fault.delay_percent,
        }
    if mirror is not None:
        out["mirror"] = {"service": str(mirror.service), "percent": mirror.percent}
    return out


def identities(state: mesh.MeshState, query: Mapping[str, str]) -> dict[str, Any] | None:
    """`/debug/identities?service=NS/NAME`: the service account each endpoint
    of the Service declares, which its callers verify (None: no such
    Service)."""
    named = query.get("service", "")
    namespace, _, name = named.partition("/")
    if not namespace or not name:
        raise ValueError("name a Service: /debug/identities?service=NAMESPACE/NAME")
    key = mesh.ServiceKey(namespace, name)
    if key not in state.services:
        return None
    return {
        "service": str(key),
        "service_accounts": sorted(state.service_accounts_of(key)),
        "endpoints": [
            {
                "address": e.address,
                "port": e.port,
                "service_account": e.service_account,
                "pod": e.pod,
            }
            for e in state.endpoints.get(key, ())
        ],
    }
