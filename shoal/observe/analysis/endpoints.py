"""Analyzers: a Service's endpoints, as its callers' sidecars get them.

A sidecar sends a call for a Service port to that port's ready endpoints
(EndpointSlice ports are matched to Service ports by name, as Kubernetes
does); with none, Envoy answers 503 "no healthy upstream". So a port whose
endpoints are all not ready (SHL0201), a port no slice port is named like
(SHL0202), and a Service without endpoints that is used (SHL0204) each break
its callers. "Used" is what keeps the last one from naming every idle
Service: a route sends to it, or a caller's sidecar has counted calls on its
clusters (evidence.outbound).

One pass over the Services, their endpoints and the routes, and one over
each reachable proxy's counters: linear in the mesh.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from shoal.model import mesh, problems, routing
from shoal.observe.analysis import evidence, facts

NO_READY_ENDPOINTS = "SHL0201"
PORT_NAME_MISMATCH = "SHL0202"
NO_ENDPOINTS = "SHL0204"

# Counters of a caller's outbound cluster that say it was used: requests
# sent, requests answered 503, and requests that found no endpoint at all.
_CALLED = ("upstream_rq_total", "upstream_rq_503", "upstream_cx_none_healthy")

# (Service, port) -> caller workload -> counter -> value
Calls = Mapping[tuple[mesh.ServiceKey, int], Mapping[str, Mapping[str, float]]]


def analyze(found: facts.Facts) -> Iterator[problems.Problem]:
    state = found.state
    calls = called(found)
    routed = routed_to(state.routes)
    for svc in state.sorted_services():
        eps = state.endpoints.get(svc.key, ())
        if not eps:
            problem = _without_endpoints(svc, calls, routed.get(svc.key, ()))
            if problem is not None:
                yield problem
            continue
        by_name: dict[str, list[mesh.Endpoint]] = {}
        for e in eps:
            by_name.setdefault(e.port_name, []).append(e)
        # Slice port names no Service port takes: where the endpoints went.
        stray = sorted(by_name.keys() - {p.name for p in svc.ports})
        for i, port in enumerate(svc.ports):
            serving = by_name.get(port.name)
            if serving is None:
                if stray:
                    yield _mismatch(svc, i, port, stray, calls)
            elif not any(e.ready for e in serving):
                yield _none_ready(svc, port, serving, calls)


def called(found: facts.Facts) -> Calls:
    """Who called which Service port, from the counters of the callers'
    outbound clusters."""
    out: dict[tuple[mesh.ServiceKey, int], dict[str, dict[str, float]]] = {}
    by_name = {p.name: p for p in found.proxies}
    for name, stats in found.stats.items():
        p = by_name.get(name)
        caller = evidence.workload_of(p) if p is not None else name
        for c in evidence.outbound(stats):
            if c.stat in _CALLED and c.value > 0:
                counters = out.setdefault((c.service, c.port), {}).setdefault(caller, {})
                counters[c.stat] = counters.get(c.stat, 0.0) + c.value
    return out


def routed_to(
    routes: Mapping[mesh.ServiceKey, routing.ServiceRoute],
) -> dict[mesh.ServiceKey, tuple[mesh.ServiceKey, ...]]:
    """For each Service another Service's route sends calls to, those
    Services. Mirrors are left out: a mirrored copy that fails is dropped,
    and no caller sees it."""
    out: dict[mesh.ServiceKey, set[mesh.ServiceKey]] = {}
    for key, route in routes.items():
        rules = [*route.rules, *(r for a in route.attached for r in a.rules)]
        for rule in rules:
            for b in rule.backends:
                if b.service != key and not b.missing:
                    out.setdefault(b.service, set()).add(key)
    return {k: tuple(sorted(v)) for k, v in out.items()}


def _callers(svc: mesh.Service, ports: tuple[mesh.Port, ...], calls: Calls) -> str:
    """`default/a (3 requests answered 503)`, for whoever called these ports."""
    totals: dict[str, dict[str, float]] = {}
    for port in ports:
        for caller, counters in calls.get((svc.key, port.port), {}).items():
            mine = totals.setdefault(caller, {})
            for stat, value in counters.items():
                mine[stat] = mine.get(stat, 0.0) + value
    if not totals:
        return ""
    failed = sum(c.get("upstream_rq_503", 0.0) for c in totals.values())
    said = f"called by {evidence.listed(totals)}"
    return f"{said} ({evidence.counted(failed, 'request')} answered 503)" if failed else said


def _without_endpoints(
    svc: mesh.Service, calls: Calls, routers: tuple[mesh.ServiceKey, ...]
) -> problems.Problem | None:
    callers = _callers(svc, svc.ports, calls)
    if not callers and not routers:
        return None  # idle: nothing sends it anything, so nothing breaks
    users = [
        *([callers] if callers else []),
        *([f"routed to by {evidence.listed(f'Service {r}' for r in routers)}"] if routers else []),
    ]
    return problems.Problem(
        "",
        f"Service {svc.key}",
        f"has no endpoints (no EndpointSlice, or none with an endpoint), yet is "
        f"{' and '.join(users)}: those calls get 503 (no healthy upstream)",
        NO_ENDPOINTS,
    )


def _mismatch(
    svc: mesh.Service, index: int, port: mesh.Port, stray: list[str], calls: Calls
) -> problems.Problem:
    names = evidence.listed(repr(n) for n in stray)
    callers = _callers(svc, (port,), calls)
    return problems.Problem(
        "",
        f"Service {svc.key}",
        f"port {port.port} is named {port.name!r} but its EndpointSlices name their ports "
        f"{names}: endpoints match Service ports by name, so port {port.port} has none and "
        f"its callers get 503" + (f"; {callers}" if callers else ""),
        PORT_NAME_MISMATCH,
        f"spec.ports[{index}].name",
        fix=f"Name the EndpointSlice port {port.name!r} (or rename the Service port to "
        f"{stray[0]!r}) so the two agree.",
    )


def _none_ready(
    svc: mesh.Service, port: mesh.Port, serving: list[mesh.Endpoint], calls: Calls
) -> problems.Problem:
    where = evidence.listed(
        (f"{e.address}:{e.port}" + (f" (Pod {e.pod})" if e.pod else "") for e in serving), 3
    )
    label = f"port {port.port}" + (f" ({port.name})" if port.name else "")
    callers = _callers(svc, (port,), calls)
    said = (
        f"its one endpoint ({where}) is not ready"
        if len(serving) == 1
        else f"none of its {len(serving)} endpoints is ready ({where})"
    )
    return problems.Problem(
        "",
        f"Service {svc.key}",
        f"{label}: {said}, so its callers get 503 (no healthy upstream)"
        + (f"; {callers}" if callers else ""),
        NO_READY_ENDPOINTS,
    )
