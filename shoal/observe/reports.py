"""What `/debug/` shows of the mesh model."""

from __future__ import annotations

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


def _route(route: routing.ServiceRoute) -> dict[str, Any]:
    return {
        "source": route.source,
        "rules": [_rule(r) for r in route.rules],
        **_policies(route.timeout_s, route.retry, route.fault, route.mirror),
    }


def _rule(rule: routing.RouteRule) -> dict[str, Any]:
    return {
        "backends": [
            {
                "service": str(b.service),
                "weight": b.weight,
                **({"subset": dict(b.subset)} if b.subset else {}),
            }
            for b in rule.backends
        ],
        "headers": [_match(m) for m in rule.headers],
        "query": [_match(m) for m in rule.query],
        "path": {"kind": rule.path.kind.value, "value": rule.path.value} if rule.path else None,
        "method": rule.method,
        **_policies(rule.timeout_s, rule.retry, rule.fault, rule.mirror),
    }


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
