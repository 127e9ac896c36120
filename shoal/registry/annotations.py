"""Routing and scope annotations on a Service, parsed and validated.

One-liners for `kubectl annotate`. Every error names the annotation and what
is wrong with it; the caller decides what stays in force.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from shoal.model import mesh, routing, scope

PREFIX = "shoal.io/"
EXPORT_TO = PREFIX + "export-to"
DEPENDENCIES = PREFIX + "dependencies"
SPLIT = PREFIX + "split"
ROUTE_HEADERS = PREFIX + "route-headers"
ROUTING = (SPLIT, ROUTE_HEADERS)
MTLS = PREFIX + "mtls"
ALLOW = PREFIX + "allow"
MTLS_MODES = ("strict", "permissive")

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


class AnnotationError(ValueError):
    def __init__(self, annotation: str, reason: str) -> None:
        super().__init__(f"annotation {annotation}: {reason}")
        self.annotation = annotation


def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def export_to(annotations: Mapping[str, str]) -> frozenset[str]:
    """`"*"` (default), `"."` (own namespace only) or a list of namespaces."""
    value = annotations.get(EXPORT_TO)
    if value is None:
        return frozenset({scope.EVERYONE})
    names = _names(value)
    if not names:
        raise AnnotationError(EXPORT_TO, "is empty; use '.' for this namespace only")
    for n in names:
        if n not in (scope.EVERYONE, scope.OWN_NAMESPACE) and not _NAME.match(n):
            raise AnnotationError(EXPORT_TO, f"{n!r} is not a namespace, '.' or '*'")
    return frozenset(n for n in names if n != scope.OWN_NAMESPACE)


def service_ref(text: str, namespace: str, annotation: str) -> mesh.ServiceKey:
    """`name` (this namespace), `name.namespace`, or `namespace/name`."""
    if "/" in text:
        ns, _, name = text.partition("/")
    elif "." in text:
        name, _, ns = text.partition(".")
        ns = ns.removesuffix(".svc.cluster.local").removesuffix(".svc")
    else:
        name, ns = text, namespace
    if not _NAME.match(name) or not _NAME.match(ns):
        raise AnnotationError(annotation, f"{text!r} is not a Service (name, name.namespace)")
    return mesh.ServiceKey(ns, name)


def dependencies(
    annotations: Mapping[str, str], namespace: str
) -> frozenset[tuple[str, str]] | None:
    """Services the workload calls: `name`, `name.ns`, or `ns/*` for a namespace."""
    value = annotations.get(DEPENDENCIES)
    if value is None:
        return None
    out: set[tuple[str, str]] = set()
    for item in _names(value):
        if item.endswith("/*"):
            ns = item[:-2]
            if not _NAME.match(ns):
                raise AnnotationError(DEPENDENCIES, f"{item!r}: {ns!r} is not a namespace")
            out.add((ns, scope.EVERYONE))
        else:
            key = service_ref(item, namespace, DEPENDENCIES)
            out.add((key.namespace, key.name))
    return frozenset(out)


def _weighted(text: str, namespace: str) -> tuple[routing.Backend, ...]:
    backends = []
    for item in _names(text):
        name, sep, weight_text = item.partition("=")
        if not sep or not weight_text.strip().isdigit():
            raise AnnotationError(SPLIT, f"{item!r} is not SERVICE=WEIGHT with a whole number")
        backends.append(
            routing.Backend(service_ref(name.strip(), namespace, SPLIT), int(weight_text))
        )
    if not backends:
        raise AnnotationError(SPLIT, "names no backend")
    seen = [b.service for b in backends]
    if len(set(seen)) != len(seen):
        raise AnnotationError(SPLIT, "names a backend twice")
    total = sum(b.weight for b in backends)
    if total != 100:
        raise AnnotationError(SPLIT, f"weights add up to {total}, not 100")
    return tuple(backends)


def _header_rule(text: str, namespace: str) -> routing.RouteRule:
    match_text, arrow, target = text.partition("->")
    if not arrow or not target.strip():
        raise AnnotationError(ROUTE_HEADERS, f"{text.strip()!r} is not HEADER=VALUE -> SERVICE")
    if "~=" in match_text:
        name, _, value = match_text.partition("~=")
        kind = routing.MatchKind.REGEX
        try:
            re.compile(value.strip())
        except re.error as err:
            raise AnnotationError(
                ROUTE_HEADERS, f"{value.strip()!r} is not a valid regular expression: {err}"
            ) from err
    else:
        name, eq, value = match_text.partition("=")
        if not eq:
            raise AnnotationError(ROUTE_HEADERS, f"{match_text.strip()!r} is not HEADER=VALUE")
        kind = routing.MatchKind.EXACT
    name, value = name.strip().lower(), value.strip()
    if not _HEADER.match(name):
        raise AnnotationError(ROUTE_HEADERS, f"{name!r} is not a header name")
    backend = routing.Backend(service_ref(target.strip(), namespace, ROUTE_HEADERS))
    return routing.RouteRule((backend,), (routing.HeaderMatch(name, kind, value),))


def service_route(
    service: mesh.Service, known: Mapping[mesh.ServiceKey, mesh.Service]
) -> routing.ServiceRoute | None:
    """The route the annotations ask for, or None when they ask for nothing."""
    notes = service.annotations
    if not any(a in notes for a in ROUTING):
        return None
    rules: list[routing.RouteRule] = []
    for part in notes.get(ROUTE_HEADERS, "").split(";"):
        if part.strip():
            rules.append(_header_rule(part, service.namespace))
    if SPLIT in notes:
        default = _weighted(notes[SPLIT], service.namespace)
    else:
        default = (routing.Backend(service.key),)
    rules.append(routing.RouteRule(default))
    for rule in rules:
        for backend in rule.backends:
            if backend.service not in known:
                which = SPLIT if not rule.headers else ROUTE_HEADERS
                raise AnnotationError(which, f"backend Service {backend.service} does not exist")
    return routing.ServiceRoute(service.key, tuple(rules), source="annotations")


def mtls(annotations: Mapping[str, str]) -> str | None:
    value = annotations.get(MTLS)
    if value is None:
        return None
    mode = value.strip().lower()
    if mode not in MTLS_MODES:
        raise AnnotationError(MTLS, f"{value!r} is not one of {', '.join(MTLS_MODES)}")
    return mode


def allow(annotations: Mapping[str, str]) -> frozenset[tuple[str, str]] | None:
    """Callers allowed: `ns/sa` or `ns/*`, comma separated."""
    value = annotations.get(ALLOW)
    if value is None:
        return None
    out: set[tuple[str, str]] = set()
    for item in _names(value):
        ns, slash, account = item.partition("/")
        if not slash or not _NAME.match(ns) or not (account == "*" or _NAME.match(account)):
            raise AnnotationError(ALLOW, f"{item!r} is not NAMESPACE/SERVICEACCOUNT or NAMESPACE/*")
        out.add((ns, account))
    if not out:
        raise AnnotationError(ALLOW, "names no caller; remove it to allow everyone")
    return frozenset(out)
