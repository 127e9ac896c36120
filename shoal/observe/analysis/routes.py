"""Analyzers: routes.

What the registry cannot see one object at a time: rules of a Service's
annotations or TrafficRoute that an earlier rule of the same Service makes
unreachable (SHL0104), backends with no port to stand in for the one called
(SHL0102), HTTP routing on a Service with no HTTP port, and endpoints that
serve one port in two protocols (SHL0203). Unknown backends and ports named
by a route, rules whose weights are all 0, the Gateway API's shadowed
matches and conflicts between routing sources are found while the registry
parses (shoal/registry), and come here among `Facts.found`.

Every check is one pass over the routes or the endpoints: the cost grows
with the mesh, never with its square. Comparing a rule with the earlier
rules of its own Service is the one square, of a Service's rules.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import re2

from shoal.model import mesh, problems, routing
from shoal.observe.analysis import facts
from shoal.registry import annotations as notes
from shoal.xds.translate import routes as translate

# A rule is compared with at most this many earlier rules of its Service: a
# TrafficRoute of thousands of rules is checked in part, never slowly.
MOST_EARLIER_RULES = 128


def analyze(found: facts.Facts) -> Iterator[problems.Problem]:
    state = found.state
    for key, route in state.routes.items():
        service = state.services.get(key)
        if service is None or not route.rules:
            continue
        origin = _Origin.of(route, service)
        yield from _shadowed(route, origin)
        yield from _no_port_to_stand_in(route, origin, service, state.services)
        yield from _routing_on_tcp(route, origin, service)
    yield from _shared_endpoints(state)


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a Service's rules come from, to name the object and its fields."""

    subject: str
    annotations: bool  # else a TrafficRoute
    service: mesh.Service

    @staticmethod
    def of(route: routing.ServiceRoute, service: mesh.Service) -> _Origin:
        if route.source == "annotations":
            return _Origin(f"Service {service.key}", True, service)
        return _Origin(route.source, False, service)

    def rule_field(self, index: int, rule: routing.RouteRule) -> str:
        if not self.annotations:
            return f"spec.rules[{index}].match"
        return _note(notes.ROUTE_HEADERS if rule.headers else notes.SPLIT)

    def backend_field(self, index: int, rule: routing.RouteRule, backend: int) -> str:
        if not self.annotations:
            return f"spec.rules[{index}].backends[{backend}].service"
        return _note(notes.ROUTE_HEADERS if rule.headers else notes.SPLIT)

    def mirror_field(self, index: int | None) -> str:
        if self.annotations or index is None:
            return _note(notes.MIRROR)
        return f"spec.rules[{index}].mirror.service"

    def routing_field(self) -> str:
        if not self.annotations:
            return "spec.service"
        present = [n for n in notes.ROUTING if n in self.service.annotations]
        return ", ".join(_note(n) for n in present)

    def rule_name(self, index: int, rule: routing.RouteRule) -> str:
        if not self.annotations:
            return f"spec.rules[{index}]"
        if not rule.headers:
            return "the default route"
        return f"header route {_shown_header_rule(rule)!r}"


def _note(name: str) -> str:
    return f"metadata.annotations[{name}]"


def _shown_header_rule(rule: routing.RouteRule) -> str:
    (h,) = rule.headers
    op = "~=" if h.kind is routing.MatchKind.REGEX else "="
    return f"{h.name}{op}{h.value} -> {_shown_backends(rule)}"


def _shown_backends(rule: routing.RouteRule) -> str:
    def one(b: routing.Backend) -> str:
        subset = ",".join(f"{k}={v}" for k, v in b.subset.items())
        name = b.service.name + (f"{{{subset}}}" if subset else "")
        return name if len(rule.backends) == 1 else f"{name}={b.weight}"

    return ", ".join(one(b) for b in rule.backends) or "nothing"


# -- SHL0104: a rule an earlier one makes unreachable --------------------------------


def _shadowed(route: routing.ServiceRoute, origin: _Origin) -> Iterator[problems.Problem]:
    """Rules that can never match, with the earlier rule that takes their
    requests. Only what is certain: the earlier rule's every condition
    follows from the later one's (see `_covers`)."""
    for j, later in enumerate(route.rules):
        for i, earlier in enumerate(route.rules[: min(j, MOST_EARLIER_RULES)]):
            if not _covers(earlier, later):
                continue
            how = "matches every request" if _matches_all(earlier) else "matches all of them"
            yield problems.Problem(
                "",
                origin.subject,
                f"{origin.rule_name(j, later)} never matches on Service {route.service}: "
                f"{origin.rule_name(i, earlier)} comes first and {how}, so the requests "
                f"meant for {_shown_backends(later)} go to {_shown_backends(earlier)}",
                "SHL0104",
                origin.rule_field(j, later),
            )
            break


def _matches_all(rule: routing.RouteRule) -> bool:
    return (
        not rule.headers
        and not rule.query
        and rule.method is None
        and (rule.path is None or _is_root_prefix(rule.path))
    )


def _is_root_prefix(path: routing.PathMatch) -> bool:
    # How translation writes "no path condition": a prefix of "/".
    return path.kind is routing.MatchKind.PREFIX and path.value == "/"


def _covers(earlier: routing.RouteRule, later: routing.RouteRule) -> bool:
    """Whether every request `later` matches, `earlier` matches too (as
    Envoy matches them: translate/routes.py `_match`)."""
    if earlier.method is not None and earlier.method != later.method:
        return False
    if (
        earlier.path is not None
        and not _is_root_prefix(earlier.path)
        and (later.path is None or not _path_implies(later.path, earlier.path))
    ):
        return False
    return _all_implied(later.headers, earlier.headers) and _all_implied(later.query, earlier.query)


def _all_implied(
    given: tuple[routing.HeaderMatch, ...], wanted: tuple[routing.HeaderMatch, ...]
) -> bool:
    return all(any(_value_implies(g, w) for g in given if g.name == w.name) for w in wanted)


def _value_implies(given: routing.HeaderMatch, wanted: routing.HeaderMatch) -> bool:
    """Whether a value (of one header or query parameter) that satisfies
    `given` satisfies `wanted`. Envoy's regular expressions match the whole
    value, as RE2's full match does."""
    kind = routing.MatchKind
    if wanted.kind is kind.PRESENT:
        return True  # every other kind needs the value to be there
    if given.kind is wanted.kind and given.value == wanted.value:
        return True
    if given.kind is kind.EXACT:
        if wanted.kind is kind.PREFIX:
            return given.value.startswith(wanted.value)
        if wanted.kind is kind.REGEX:
            return _full_match(wanted.value, given.value)
    if given.kind is kind.PREFIX and wanted.kind is kind.PREFIX:
        return given.value.startswith(wanted.value)
    return False


def _path_implies(given: routing.PathMatch, wanted: routing.PathMatch) -> bool:
    """As `_value_implies`, for paths: a prefix is of the whole `:path`, an
    exact path or a regular expression of the path without its query, so an
    exact path within a prefix still implies it."""
    kind = routing.MatchKind
    if given.kind is wanted.kind and given.value == wanted.value:
        return True
    if wanted.kind is kind.PREFIX and given.kind in (kind.EXACT, kind.PREFIX):
        return given.value.startswith(wanted.value)
    if wanted.kind is kind.REGEX and given.kind is kind.EXACT:
        return _full_match(wanted.value, given.value)
    return False


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error:
        return None  # the registry refuses it; nothing is certain about it


def _full_match(pattern: str, value: str) -> bool:
    compiled = _compiled(pattern)
    return compiled is not None and compiled.fullmatch(value) is not None


# -- SHL0102: a backend with no port to stand in for the one called ----------------


def _no_port_to_stand_in(
    route: routing.ServiceRoute,
    origin: _Origin,
    service: mesh.Service,
    services: Mapping[mesh.ServiceKey, mesh.Service],
) -> Iterator[problems.Problem]:
    """A backend of a split or header route (or a mirror) is called on the
    port of the same number, else name, else its default HTTP port
    (translate.backend_port); with none of them, its share goes to a
    cluster that does not exist."""
    http = [p for p in service.ports if p.protocol.is_http]
    named: list[tuple[str, routing.Backend | routing.Mirror, bool]] = []
    for i, rule in enumerate(route.rules):
        named += [(origin.backend_field(i, rule, j), b, False) for j, b in enumerate(rule.backends)]
        if rule.mirror is not None:
            named.append((origin.mirror_field(i), rule.mirror, True))
    if route.mirror is not None:
        named.append((origin.mirror_field(None), route.mirror, True))
    reported: set[tuple[str, mesh.ServiceKey]] = set()
    for field, target, mirror in named:
        backend = services.get(target.service)
        if backend is None or target.port is not None or (field, target.service) in reported:
            continue  # a Service that does not exist is the registry's SHL0101
        lacking = [p for p in http if translate.backend_port(backend, p) is None]
        if not lacking:
            continue
        reported.add((field, target.service))
        ports = ", ".join(_shown_port(p) for p in lacking)
        effect = (
            "copies of those calls are not mirrored"
            if mirror
            else "its share of those calls fails (503, no cluster)"
        )
        yield problems.Problem(
            "",
            origin.subject,
            f"backend Service {target.service} has no port to stand in for port {ports} of "
            f"Service {service.key} (none of that number or name, and no HTTP port): {effect}",
            "SHL0102",
            field,
        )


def _shown_port(port: mesh.Port) -> str:
    return f"{port.port} ({port.name})" if port.name else str(port.port)


# -- SHL0203: HTTP routing where the protocol is TCP; one endpoint, two protocols ---


def _routing_on_tcp(
    route: routing.ServiceRoute, origin: _Origin, service: mesh.Service
) -> Iterator[problems.Problem]:
    """Rules route only on HTTP ports (translate.virtual_hosts): on a
    Service with none, they route nothing. (A Gateway API route on a TCP
    port is reported by the registry, with its parentRef.)"""
    if any(p.protocol.is_http for p in service.ports):
        return
    ports = ", ".join(_shown_port(p) for p in service.ports)
    which = f"its only port {ports} is" if len(service.ports) == 1 else f"its ports {ports} are"
    yield problems.Problem(
        "",
        origin.subject,
        f"routes Service {service.key}, but {which} TCP: HTTP routing (splits, header routes, "
        "retries, timeouts, faults, mirrors) applies only on HTTP ports, so none of it takes "
        "effect and HTTP calls to the Service are not routed",
        "SHL0203",
        origin.routing_field(),
    )


_Use = tuple[mesh.Service, mesh.Port]
_SPOKEN = {
    mesh.Protocol.HTTP: "HTTP/1.1",
    mesh.Protocol.HTTP2: "HTTP/2",
    mesh.Protocol.GRPC: "gRPC (HTTP/2)",
}


def _spoken_as(protocol: mesh.Protocol) -> str:
    """What a proxy speaks to the app for a port of `protocol`."""
    if protocol is mesh.Protocol.TCP:
        return "tcp"
    return "h2" if protocol in (mesh.Protocol.HTTP2, mesh.Protocol.GRPC) else "h1"


def _shared_endpoints(state: mesh.MeshState) -> Iterator[problems.Problem]:
    """An address:port that serves an HTTP/1.1 port of one Service and an
    HTTP/2 port of another (or of the same one): the proxy in front of it
    speaks one protocol to the app (a local sidecar its own Service's, a
    captured Pod the first Service's by name), so the other's calls reach
    the app in a protocol it may not speak. Services that only share a
    port number do not conflict: each has its own cluster and, captured,
    its own filter chain. Nor does an endpoint one of whose ports is TCP:
    a captured Pod's proxy then passes the bytes as they come."""
    # HTTP/2 ports are the rare ones: only their endpoints can conflict, so
    # the hundred thousand endpoints of an HTTP/1.1 mesh are looked at only
    # when one exists (0.5 s at 10,000 Services otherwise).
    spoken_by_service: dict[mesh.ServiceKey, dict[str, tuple[str, mesh.Port]]] = {}
    any_h2 = False
    for key, service in state.services.items():
        by_name = {p.name: (_spoken_as(p.protocol), p) for p in service.ports}
        spoken_by_service[key] = by_name
        any_h2 = any_h2 or any(spoken == "h2" for spoken, _ in by_name.values())
    if not any_h2:
        return
    first: dict[tuple[str, int], dict[str, _Use]] = {}
    for key, endpoints in state.endpoints.items():
        served = state.services.get(key)
        if served is None:
            continue
        by_name = spoken_by_service[key]
        for e in endpoints:
            found = by_name.get(e.port_name)
            if found is not None:
                spoken, port = found
                users = first.setdefault((e.address, e.port), {})
                users.setdefault(spoken, (served, port))
    # Each pair of Service ports that share endpoints, once, with those endpoints.
    shared: dict[tuple[_Use, _Use], list[tuple[str, int]]] = {}
    for address, users in first.items():
        if "h1" in users and "h2" in users and "tcp" not in users:
            one, other = sorted((users["h1"], users["h2"]), key=lambda u: (u[0].key, u[1].port))
            shared.setdefault((one, other), []).append(address)
    for ((s1, p1), (s2, p2)), addresses in shared.items():
        host, number = min(addresses)
        more = f" and {len(addresses) - 1} more" if len(addresses) > 1 else ""
        yield problems.Problem(
            "",
            f"Service {s1.key}",
            f"port {_shown_port(p1)} is {_SPOKEN[p1.protocol]} but port {_shown_port(p2)} of "
            f"Service {s2.key} is {_SPOKEN[p2.protocol]}, and both are served at endpoint "
            f"{host}:{number}{more}: the proxy there speaks one protocol to its app, so the "
            "calls of one of the two reach it in a protocol it may not speak (HTTP/1.1 to a "
            "gRPC server fails)",
            "SHL0203",
            f"spec.ports[{s1.ports.index(p1)}]",
        )
