"""Gateway API routes for the mesh (GAMMA): HTTPRoute and GRPCRoute
(`gateway.networking.k8s.io/v1`) whose `parentRefs` name a Service.

A route becomes one `routing.AttachedRoute` per Service parent, its rules
one per match with the Gateway API's precedence as their sort key, so that
the routes on one Service merge by sorting (translate/routes.py). Beside
them comes the route's status per parent, as the Gateway API defines it
(`Accepted`, `ResolvedRefs` with their reasons), which `shoal analyze`
shows and the Kubernetes registry writes back.

A route that cannot be used at all (a malformed field, filters that
conflict) raises ManifestError naming the field and the reason; a backend
that cannot be reached does not: its share of requests is answered 500, as
the specification says, and `ResolvedRefs` says why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.model import mesh, routing
from shoal.registry import annotations as notes
from shoal.registry import manifests

CONTROLLER = "shoal.io/mesh-controller"
GROUP = "gateway.networking.k8s.io"

# GEP-2257 durations: 1 to 4 parts of up to 5 digits, h/m/s/ms.
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_PATH = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+$")
_GRPC_SERVICE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


@dataclass(frozen=True, slots=True)
class Condition:
    type: str  # Accepted, ResolvedRefs
    status: bool
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ParentStatus:
    """What shoal says of a route on one of its Service parents."""

    parent_ref: Mapping[str, Any]
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Finding:
    """A problem of a route that is used anyway: its code in the catalogue
    (model.problems), the field at fault, and what it does to traffic."""

    code: str
    field: str
    reason: str


@dataclass(frozen=True, slots=True)
class Parsed:
    attached: tuple[routing.AttachedRoute, ...]
    parents: tuple[ParentStatus, ...]
    findings: tuple[Finding, ...] = ()
    # The parentRef that attaches the route to each Service, as a field.
    parent_fields: tuple[tuple[mesh.ServiceKey, str], ...] = ()


class _Invalid(manifests.ManifestError):
    """A route shoal refuses whole; `reason` is the Gateway API's."""

    def __init__(self, message: str, reason: str = "UnsupportedValue") -> None:
        super().__init__(message, "SHL0004")
        self.reason = reason


def _map(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _Invalid(f"{where} must be a mapping")
    return value


def _list(value: Any, where: str, most: int = 64) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(f"{where} must be a list")
    if len(value) > most:
        raise _Invalid(f"{where} has {len(value)} items; at most {most}")
    return value


def _str(value: Any, where: str, most: int = 1024) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"{where} must be a non-empty string")
    if len(value) > most:
        raise _Invalid(f"{where} is longer than {most} characters")
    return value


def duration(value: Any, where: str) -> float:
    """A Gateway API duration (GEP-2257: `1h2m`, `500ms`, `0s`) in seconds."""
    text = _str(value, where, 64)
    if not _DURATION.match(text):
        raise _Invalid(f"{where}: {text!r} is not a Gateway API duration like 10s or 1m30s")
    return sum(int(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text))


def _regex(value: str, where: str) -> str:
    try:
        notes.check_regex(value, where)
    except notes.AnnotationError as err:
        raise _Invalid(str(err).replace("annotation ", "")) from err
    return value


def _kind(ref: Mapping[str, Any], default_group: str, default_kind: str) -> tuple[str, str]:
    group = ref.get("group", default_group)
    kind = ref.get("kind", default_kind)
    return (group if isinstance(group, str) else "?", kind if isinstance(kind, str) else "?")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _Invalid(f"{where} must be a port number from 1 to 65535")
    return value


# -- matches -------------------------------------------------------------------------


def _header_matches(raw: Any, where: str, *, headers: bool) -> tuple[routing.HeaderMatch, ...]:
    out: list[routing.HeaderMatch] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(raw, where, 16)):
        at = f"{where}[{i}]"
        m = _map(item, at)
        name = _str(m.get("name"), f"{at}.name", 256)
        if headers and not _HEADER_NAME.match(name):
            raise _Invalid(f"{at}.name: {name!r} is not an HTTP header name")
        value = _str(m.get("value"), f"{at}.value", 4096)
        kind = m.get("type", "Exact")
        if kind == "RegularExpression":
            match_kind = routing.MatchKind.REGEX
            _regex(value, f"{at}.value")
        elif kind == "Exact":
            match_kind = routing.MatchKind.EXACT
        else:
            raise _Invalid(f"{at}.type: {kind!r} is not Exact or RegularExpression")
        # Header names are case-insensitive, query parameter names are not;
        # of several entries for one name only the first counts.
        key = name.lower() if headers else name
        if key in seen:
            continue
        seen.add(key)
        out.append(routing.HeaderMatch(key, match_kind, value))
    return tuple(out)


def _path_match(raw: Any, where: str) -> routing.PathMatch:
    m = _map(raw, where)
    kind = m.get("type", "PathPrefix")
    value = m.get("value", "/")
    if kind == "RegularExpression":
        return routing.PathMatch(
            routing.MatchKind.REGEX, _regex(_str(value, f"{where}.value"), f"{where}.value")
        )
    if kind not in ("Exact", "PathPrefix"):
        raise _Invalid(f"{where}.type: {kind!r} is not Exact, PathPrefix or RegularExpression")
    text = _str(value, f"{where}.value")
    if not text.startswith("/") or not _PATH.match(text) or "//" in text or "/./" in text:
        raise _Invalid(f"{where}.value: {text!r} is not an absolute, normalised path")
    if kind == "Exact":
        return routing.PathMatch(routing.MatchKind.EXACT, text)
    # A trailing slash means nothing to a prefix of whole segments.
    return routing.PathMatch(routing.MatchKind.SEGMENTS, text.rstrip("/") or "/")


@dataclass(frozen=True, slots=True)
class _Match:
    path: routing.PathMatch | None
    headers: tuple[routing.HeaderMatch, ...]
    query: tuple[routing.HeaderMatch, ...]
    method: str | None
    # The Gateway API's precedence among matches, most specific first.
    rank: tuple[Any, ...]


def _http_match(raw: Any, where: str) -> _Match:
    m = _map(raw, where)
    path = (
        _path_match(m["path"], f"{where}.path")
        if "path" in m
        else routing.PathMatch(routing.MatchKind.SEGMENTS, "/")
    )
    headers = _header_matches(m.get("headers"), f"{where}.headers", headers=True)
    query = _header_matches(m.get("queryParams"), f"{where}.queryParams", headers=False)
    method = m.get("method")
    if method is not None and method not in _METHODS:
        raise _Invalid(f"{where}.method: {method!r} is not an HTTP method the Gateway API names")
    # Exact paths first, then (shoal's choice where the specification leaves
    # it open) regular expressions, then the longest prefix; then a method,
    # the most headers, the most query parameters.
    if path.kind is routing.MatchKind.EXACT:
        first: tuple[int, int] = (0, 0)
    elif path.kind is routing.MatchKind.REGEX:
        first = (1, -len(path.value))
    else:
        first = (2, -len(path.value) if path.value != "/" else 0)
    rank = (*first, 0 if method else 1, -len(headers), -len(query))
    return _Match(path, headers, query, method, rank)


def _grpc_match(raw: Any, where: str) -> _Match:
    m = _map(raw, where)
    headers = _header_matches(m.get("headers"), f"{where}.headers", headers=True)
    path: routing.PathMatch | None = None
    service = method = ""
    if "method" in m:
        at = f"{where}.method"
        spec = _map(m["method"], at)
        kind = spec.get("type", "Exact")
        service = spec.get("service") or ""
        method = spec.get("method") or ""
        if not isinstance(service, str) or not isinstance(method, str):
            raise _Invalid(f"{at}: service and method must be strings")
        if not service and not method:
            raise _Invalid(f"{at} needs a service, a method or both")
        if kind == "Exact":
            if service and not _GRPC_SERVICE.match(service):
                raise _Invalid(f"{at}.service: {service!r} is not a gRPC service name")
            if method and not _GRPC_METHOD.match(method):
                raise _Invalid(f"{at}.method: {method!r} is not a gRPC method name")
            if service and method:
                path = routing.PathMatch(routing.MatchKind.EXACT, f"/{service}/{method}")
            elif service:
                path = routing.PathMatch(routing.MatchKind.PREFIX, f"/{service}/")
            else:
                path = routing.PathMatch(routing.MatchKind.REGEX, f"/[^/]+/{re.escape(method)}")
        elif kind == "RegularExpression":
            for part, value in (("service", service), ("method", method)):
                if value:
                    _regex(value, f"{at}.{part}")
            path = routing.PathMatch(
                routing.MatchKind.REGEX, f"/{service or '[^/]+'}/{method or '[^/]+'}"
            )
        else:
            raise _Invalid(f"{at}.type: {kind!r} is not Exact or RegularExpression")
    rank = (-len(service), -len(method), -len(headers))
    return _Match(path, headers, (), None, rank)


# -- filters -------------------------------------------------------------------------


def _header_change(raw: Any, where: str) -> routing.HeaderChange:
    m = _map(raw, where)
    named: set[str] = set()

    def once(name: str, at: str) -> str:
        if not _HEADER_NAME.match(name):
            raise _Invalid(f"{at}: {name!r} is not an HTTP header name")
        if name.lower() in named:
            raise _Invalid(f"{at}: header {name!r} is changed twice in one filter")
        named.add(name.lower())
        return name.lower()

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, item in enumerate(_list(m.get(key), f"{where}.{key}", 16)):
            at = f"{where}.{key}[{i}]"
            h = _map(item, at)
            value = h.get("value")
            if not isinstance(value, str) or len(value) > 4096:
                raise _Invalid(f"{at}.value must be a string of at most 4096 characters")
            out.append((once(_str(h.get("name"), f"{at}.name", 256), f"{at}.name"), value))
        return tuple(out)

    changed = pairs("set"), pairs("add")
    removed = tuple(
        once(_str(name, f"{where}.remove[{i}]", 256), f"{where}.remove[{i}]")
        for i, name in enumerate(_list(m.get("remove"), f"{where}.remove", 16))
    )
    return routing.HeaderChange(*changed, removed)


def _path_change(raw: Any, where: str, matches: Sequence[_Match]) -> routing.PathChange:
    m = _map(raw, where)
    kind = m.get("type")
    if kind == "ReplaceFullPath":
        value = m.get("replaceFullPath")
        if not isinstance(value, str) or not value.startswith("/"):
            raise _Invalid(f"{where}.replaceFullPath must be a path starting with /")
        return routing.PathChange(True, value)
    if kind == "ReplacePrefixMatch":
        value = m.get("replacePrefixMatch")
        if not isinstance(value, str) or (value and not value.startswith("/")):
            raise _Invalid(f"{where}.replacePrefixMatch must be a path starting with /")
        if len(matches) != 1 or (
            matches[0].path is None or matches[0].path.kind is not routing.MatchKind.SEGMENTS
        ):
            raise _Invalid(
                f"{where}: ReplacePrefixMatch needs a rule with exactly one match, a PathPrefix"
            )
        return routing.PathChange(False, value)
    raise _Invalid(f"{where}.type: {kind!r} is not ReplaceFullPath or ReplacePrefixMatch")


@dataclass
class _Filters:
    request: routing.HeaderChange | None = None
    response: routing.HeaderChange | None = None
    redirect: routing.Redirect | None = None
    rewrite: routing.Rewrite | None = None
    mirrors: tuple[tuple[Mapping[str, Any], float, str], ...] = ()


def _filters(raw: Any, where: str, matches: Sequence[_Match], *, grpc: bool) -> _Filters:
    out = _Filters()
    allowed = (
        {"RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"}
        if grpc
        else {
            "RequestHeaderModifier",
            "ResponseHeaderModifier",
            "RequestMirror",
            "RequestRedirect",
            "URLRewrite",
        }
    )
    seen: set[str] = set()
    mirrors = []
    for i, item in enumerate(_list(raw, where, 16)):
        at = f"{where}[{i}]"
        f = _map(item, at)
        kind = f.get("type")
        if kind not in allowed:
            raise _Invalid(
                f"{at}.type: {kind!r} is not supported here ({', '.join(sorted(allowed))})"
            )
        if kind != "RequestMirror" and kind in seen:
            raise _Invalid(f"{at}: a second {kind} in one rule")
        seen.add(kind)
        field_name = "urlRewrite" if kind == "URLRewrite" else kind[0].lower() + kind[1:]
        body = f.get(field_name)
        if kind == "RequestHeaderModifier":
            out.request = _header_change(body, f"{at}.{field_name}")
        elif kind == "ResponseHeaderModifier":
            out.response = _header_change(body, f"{at}.{field_name}")
        elif kind == "RequestRedirect":
            r = _map(body, f"{at}.{field_name}")
            status = r.get("statusCode", 302)
            if status not in _REDIRECT_CODES:
                raise _Invalid(
                    f"{at}.{field_name}.statusCode: {status!r} is not 301, 302, 303, 307 or 308"
                )
            scheme = r.get("scheme")
            if scheme is not None and scheme not in ("http", "https"):
                raise _Invalid(f"{at}.{field_name}.scheme: {scheme!r} is not http or https")
            hostname = r.get("hostname")
            if hostname is not None:
                _str(hostname, f"{at}.{field_name}.hostname", 253)
            out.redirect = routing.Redirect(
                status=status,
                scheme=scheme,
                hostname=hostname,
                port=_port(r["port"], f"{at}.{field_name}.port") if "port" in r else None,
                path=_path_change(r["path"], f"{at}.{field_name}.path", matches)
                if "path" in r
                else None,
            )
        elif kind == "URLRewrite":
            r = _map(body, f"{at}.{field_name}")
            hostname = r.get("hostname")
            if hostname is not None:
                _str(hostname, f"{at}.{field_name}.hostname", 253)
            out.rewrite = routing.Rewrite(
                hostname=hostname,
                path=_path_change(r["path"], f"{at}.{field_name}.path", matches)
                if "path" in r
                else None,
            )
        else:
            r = _map(body, f"{at}.{field_name}")
            ref = _map(r.get("backendRef"), f"{at}.{field_name}.backendRef")
            percent = 100.0
            if "percent" in r and "fraction" in r:
                raise _Invalid(f"{at}.{field_name}: percent or fraction, not both")
            if "percent" in r:
                value = r["percent"]
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                    raise _Invalid(f"{at}.{field_name}.percent must be 0 to 100")
                percent = float(value)
            elif "fraction" in r:
                fr = _map(r["fraction"], f"{at}.{field_name}.fraction")
                num: Any = fr.get("numerator")
                den: Any = fr.get("denominator", 100)
                if not (_whole(num) and _whole(den) and 0 <= num <= den and den > 0):
                    raise _Invalid(f"{at}.{field_name}.fraction: 0 <= numerator <= denominator > 0")
                percent = 100.0 * num / den
            mirrors.append((ref, percent, f"{at}.{field_name}.backendRef"))
    if out.redirect is not None and out.rewrite is not None:
        raise _Invalid(
            f"{where}: RequestRedirect and URLRewrite cannot be in one rule", "IncompatibleFilters"
        )
    out.mirrors = tuple(mirrors)
    return out


# -- references ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Unresolved:
    """A backendRef or mirror that cannot be reached: the Gateway API's
    reason, where it is, why, and the problem's code and field."""

    reason: str
    where: str
    message: str
    code: str
    field: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class _Refs:
    """What the backendRefs and mirrors of a route resolved to, and why not."""

    unresolved: list[_Unresolved]

    def backend(
        self,
        ref: Mapping[str, Any],
        where: str,
        route_ns: str,
        known: Mapping[mesh.ServiceKey, mesh.Service],
    ) -> tuple[mesh.ServiceKey, int | None, bool]:
        """(Service, port, missing) of a backendRef."""
        group, kind = _kind(ref, "", "Service")
        name = _str(ref.get("name"), f"{where}.name", 253)
        namespace = ref.get("namespace", route_ns)
        if not isinstance(namespace, str) or not namespace:
            raise _Invalid(f"{where}.namespace must be a namespace name")
        key = mesh.ServiceKey(namespace, name)
        if (group, kind) != ("", "Service"):
            # Not a Service: the mesh knows no such backend.
            self.unresolved.append(
                _Unresolved(
                    "InvalidKind",
                    where,
                    f"{kind} ({group or 'core'}) is not a Service",
                    "SHL0101",
                    f"{where}.kind",
                )
            )
            return key, None, True
        if "port" not in ref:
            self.unresolved.append(
                _Unresolved(
                    "BackendNotFound",
                    where,
                    "a Service backend needs a port",
                    "SHL0102",
                    f"{where}.port",
                )
            )
            return key, None, True
        port = _port(ref["port"], f"{where}.port")
        service = known.get(key)
        if service is None:
            self.unresolved.append(
                _Unresolved(
                    "BackendNotFound", where, f"Service {key} does not exist", "SHL0101", where
                )
            )
            return key, port, True
        if not any(p.port == port for p in service.ports):
            self.unresolved.append(
                _Unresolved(
                    "BackendNotFound",
                    where,
                    f"Service {key} has no port {port}",
                    "SHL0102",
                    f"{where}.port",
                )
            )
            return key, port, True
        return key, port, False


# -- the route -----------------------------------------------------------------------


def _parent_ref_shown(ref: Mapping[str, Any], route_ns: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "group": ref.get("group", GROUP),
        "kind": ref.get("kind", "Gateway"),
        "name": ref.get("name"),
    }
    if "namespace" in ref:
        out["namespace"] = ref["namespace"]
    for key in ("sectionName", "port"):
        if key in ref:
            out[key] = ref[key]
    return out


def parse(
    obj: manifests.KubeObject, known: Mapping[mesh.ServiceKey, mesh.Service] | None
) -> Parsed:
    """The routes an HTTPRoute or GRPCRoute attaches to Services, and its
    status on each Service parent. Without `known`, only its own shape is
    checked (a watch checks each object as it arrives)."""
    grpc = obj.kind == "GRPCRoute"
    spec = _map(obj.body.get("spec") or {}, "spec")
    ns = obj.namespace
    meta = obj.body.get("metadata") or {}
    created = meta.get("creationTimestamp") if isinstance(meta, Mapping) else None
    created = created if isinstance(created, str) else ""
    origin = f"{obj.kind} {ns}/{obj.name}"

    # Every Service parent, with its port; Gateways are a gateway
    # controller's business, not the mesh's.
    parents: list[tuple[int, Mapping[str, Any], mesh.ServiceKey, int | None]] = []
    for i, raw in enumerate(_list(spec.get("parentRefs"), "spec.parentRefs", 32)):
        at = f"spec.parentRefs[{i}]"
        ref = _map(raw, at)
        group, kind = _kind(ref, GROUP, "Gateway")
        if group == GROUP and kind in ("Gateway", "ListenerSet"):
            continue
        if (group, kind) != ("", "Service"):
            raise _Invalid(
                f"{at}: {kind} ({group or 'core'}) is not a Service or a Gateway; "
                'a mesh route\'s parent is a Service (group "", kind Service)',
                "NoMatchingParent",
            )
        name = _str(ref.get("name"), f"{at}.name", 253)
        parent_ns = ref.get("namespace", ns)
        if not isinstance(parent_ns, str) or not parent_ns:
            raise _Invalid(f"{at}.namespace must be a namespace name")
        port = _port(ref["port"], f"{at}.port") if "port" in ref else None
        parents.append((i, ref, mesh.ServiceKey(parent_ns, name), port))

    rules: list[tuple[routing.RouteRule, tuple[Any, ...]]] = []
    refs = _Refs([])
    # (code, field, what is wrong) of rules that are used anyway.
    said: list[tuple[str, str, str]] = []
    raw_rules = _list(spec.get("rules") or [{}], "spec.rules", 16)
    names_seen: set[str] = set()
    for r, raw in enumerate(raw_rules):
        at = f"spec.rules[{r}]"
        rule = _map(raw, at)
        rule_name = rule.get("name", "")
        if rule_name:
            _str(rule_name, f"{at}.name", 253)
            if rule_name in names_seen:
                raise _Invalid(f"{at}.name: {rule_name!r} names two rules")
            names_seen.add(rule_name)
        raw_matches = _list(rule.get("matches"), f"{at}.matches", 8 if grpc else 64) or [{}]
        matches = [
            (_grpc_match if grpc else _http_match)(m, f"{at}.matches[{j}]")
            for j, m in enumerate(raw_matches)
        ]
        filters = _filters(rule.get("filters"), f"{at}.filters", matches, grpc=grpc)
        backends: list[routing.Backend] = []
        for b, item in enumerate(_list(rule.get("backendRefs"), f"{at}.backendRefs", 16)):
            bat = f"{at}.backendRefs[{b}]"
            ref = _map(item, bat)
            if ref.get("filters"):
                raise _Invalid(
                    f"{bat}.filters: filters on one backend are not supported; put them on the rule"
                )
            weight = ref.get("weight", 1)
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int)
                or not 0 <= weight <= 1_000_000
            ):
                raise _Invalid(f"{bat}.weight must be a whole number from 0 to 1000000")
            key, port, missing = (
                refs.backend(ref, bat, ns, known)
                if known is not None
                else (mesh.ServiceKey(ns, "unchecked"), None, False)
            )
            backends.append(routing.Backend(key, weight, port=port, missing=missing))
        if filters.redirect is not None and backends:
            raise _Invalid(
                f"{at}: a RequestRedirect rule cannot have backendRefs", "IncompatibleFilters"
            )
        mirrors = []
        for ref, percent, where in filters.mirrors:
            if known is None:
                continue
            key, port, missing = refs.backend(ref, where, ns, known)
            if not missing:
                mirrors.append(routing.Mirror(key, percent, port))
        timeouts = _map(rule.get("timeouts") or {}, f"{at}.timeouts")
        if grpc and timeouts:
            raise _Invalid(f"{at}.timeouts: GRPCRoute rules have no timeouts")
        request_s = (
            duration(timeouts["request"], f"{at}.timeouts.request")
            if "request" in timeouts
            else None
        )
        backend_s = (
            duration(timeouts["backendRequest"], f"{at}.timeouts.backendRequest")
            if "backendRequest" in timeouts
            else None
        )
        if request_s and backend_s and backend_s > request_s:
            raise _Invalid(f"{at}.timeouts.backendRequest is longer than timeouts.request")
        usable = [x for x in backends if not x.missing and x.weight > 0]
        # No redirect and nothing to send to: the rule answers itself, 500
        # (gRPC: UNAVAILABLE, which Envoy maps 503 to).
        status = None
        if filters.redirect is None and not usable and known is not None:
            status = 503 if grpc else 500
            answer = _answered(status)
            if not backends:
                said.append(
                    (
                        "SHL0103",
                        f"{at}.backendRefs",
                        f"{at} has no backendRefs and no redirect: it answers {answer} to "
                        "every request it matches",
                    )
                )
            elif all(x.weight == 0 for x in backends):
                said.append(
                    (
                        "SHL0103",
                        f"{at}.backendRefs",
                        f"every backendRef of {at} has weight 0: it answers {answer} to every "
                        "request it matches",
                    )
                )
        for j, match in enumerate(matches):
            rules.append(
                (
                    routing.RouteRule(
                        backends=tuple(backends) if status is None else (),
                        headers=match.headers,
                        path=match.path,
                        method=match.method,
                        query=match.query,
                        timeout_s=request_s,
                        name=rule_name if isinstance(rule_name, str) else "",
                        request_headers=filters.request,
                        response_headers=filters.response,
                        redirect=filters.redirect,
                        rewrite=filters.rewrite,
                        mirrors=tuple(mirrors),
                        backend_timeout_s=backend_s,
                        status=status,
                        unreachable_status=503 if grpc else 500,
                    ),
                    (*match.rank, created, f"{ns}/{obj.name}", r, j),
                )
            )

    attached = []
    statuses = []
    findings: list[Finding] = []
    parent_fields: list[tuple[mesh.ServiceKey, str]] = []
    for i, ref, key, port in parents:
        at = f"spec.parentRefs[{i}]"
        on = f"on Service {ref.get('name')}: "
        shown = _parent_ref_shown(ref, ns)
        conditions: list[Condition] = []
        service = known.get(key) if known is not None else None
        accepted: Condition
        section = ref.get("sectionName")
        if known is None:
            accepted = Condition("Accepted", True, "Accepted", "checked without the mesh")
        elif service is None:
            accepted = Condition(
                "Accepted", False, "NoMatchingParent", f"Service {key} does not exist"
            )
            findings.append(Finding("SHL0101", f"{at}.name", on + _said(accepted)))
        elif port is not None and not any(p.port == port for p in service.ports):
            accepted = Condition(
                "Accepted", False, "NoMatchingParent", f"Service {key} has no port {port}"
            )
            findings.append(Finding("SHL0102", f"{at}.port", on + _said(accepted)))
        elif section is not None and not any(p.name == section for p in service.ports):
            accepted = Condition(
                "Accepted",
                False,
                "NoMatchingParent",
                f"Service {key} has no port named {section!r}",
            )
            findings.append(Finding("SHL0102", f"{at}.sectionName", on + _said(accepted)))
        else:
            accepted = Condition("Accepted", True, "Accepted", "routes the Service's callers")
            if section is not None and port is None:
                port = next(p.port for p in service.ports if p.name == section)
            parent_fields.append((key, at))
            tcp = _tcp_only(service, port)
            if tcp:
                where = at + (".port" if "port" in ref else ".sectionName" if section else "")
                findings.append(
                    Finding(
                        "SHL0203",
                        where,
                        f"{on}{tcp} TCP: the {obj.kind}'s rules do not apply there (HTTP "
                        "routing needs an HTTP port), so it changes nothing for the "
                        "Service's callers",
                    )
                )
            attached.append(
                routing.AttachedRoute(
                    service=key,
                    origin=origin,
                    rules=tuple(rule for rule, _ in rules),
                    order=tuple(rank for _, rank in rules),
                    port=port,
                    consumer=ns if key.namespace != ns else None,
                    grpc=grpc,
                )
            )
        conditions.append(accepted)
        if refs.unresolved:
            reason = refs.unresolved[0].reason
            message = "; ".join(str(u) for u in refs.unresolved)
            conditions.append(Condition("ResolvedRefs", False, reason, message))
        else:
            conditions.append(
                Condition("ResolvedRefs", True, "ResolvedRefs", "every backend resolved")
            )
        statuses.append(ParentStatus(shown, tuple(conditions)))
    if parents and known is not None:
        # What is wrong with the rules is the same on every parent: said once.
        named = sorted({str(ref.get("name")) for _, ref, _, _ in parents})
        on = f"on Service{'s' if len(named) > 1 else ''} {', '.join(named)}: "
        answer = _answered(503 if grpc else 500)
        for u in refs.unresolved:
            effect = (
                "requests are not mirrored there"
                if ".requestMirror." in u.where
                else f"its share of the rule's requests is answered {answer}"
            )
            findings.append(Finding(u.code, u.field, f"{on}ResolvedRefs={u.reason}: {u}; {effect}"))
        findings.extend(Finding(code, where, on + why) for code, where, why in said)
    return Parsed(tuple(attached), tuple(statuses), tuple(findings), tuple(parent_fields))


def _said(condition: Condition) -> str:
    return f"{condition.type}={condition.reason}: {condition.message}"


def _answered(status: int) -> str:
    return "UNAVAILABLE (503)" if status == 503 else str(status)


def _tcp_only(service: mesh.Service, port: int | None) -> str:
    """How to say that the ports a route attaches to (`port`, else all of
    them) are all TCP, where routes never apply; "" if one is HTTP."""
    ports = [p for p in service.ports if port is None or p.port == port]
    if any(p.protocol.is_http for p in ports):
        return ""
    shown = ", ".join(f"{p.port}" + (f" ({p.name})" if p.name else "") for p in ports)
    if port is not None:
        return f"port {shown} is"
    return f"its only port {shown} is" if len(ports) == 1 else f"all its ports ({shown}) are"


def refused(obj: manifests.KubeObject, err: manifests.ManifestError) -> tuple[ParentStatus, ...]:
    """The status of a route shoal cannot use at all, on each Service parent."""
    reason = err.reason if isinstance(err, _Invalid) else "UnsupportedValue"
    spec = obj.body.get("spec")
    refs = spec.get("parentRefs") if isinstance(spec, Mapping) else None
    out = []
    for ref in refs if isinstance(refs, list) else ():
        if isinstance(ref, Mapping) and _kind(ref, GROUP, "Gateway") == ("", "Service"):
            out.append(
                ParentStatus(
                    _parent_ref_shown(ref, obj.namespace),
                    (Condition("Accepted", False, reason, str(err)),),
                )
            )
    return tuple(out)


def _signature(rule: routing.RouteRule) -> tuple[Any, ...]:
    return (rule.path, rule.headers, rule.query, rule.method)


def shadowed(attached: Sequence[routing.AttachedRoute]) -> list[tuple[str, str, str]]:
    """(origin, field, why) for each rule that can never match: an earlier one (by
    precedence) on the same Service, callers and port has the same match.
    One pass in precedence order, so a Service with many routes costs what
    its rules do, not their square."""
    entries = sorted(
        ((order, a, rule) for a in attached for order, rule in zip(a.order, a.rules, strict=True)),
        key=lambda entry: entry[0],
    )
    first: dict[tuple[Any, ...], tuple[tuple[Any, ...], str]] = {}
    out = set()
    for order, a, rule in entries:
        group = (a.consumer, a.grpc, _signature(rule))
        # A rule on one port is shadowed by one on that port or on every
        # port; a rule on every port only by one on every port.
        for port in (a.port, None) if a.port is not None else (None,):
            earlier = first.get((*group, port))
            if earlier is not None and earlier[0] != order:
                where = f"spec.rules[{order[-2]}].matches[{order[-1]}]"
                out.add(
                    (
                        a.origin,
                        where,
                        f"{where} never matches on "
                        f"Service {a.service}: rule {earlier[0][-2]} of {earlier[1]} has the "
                        "same match and comes first (older, or first by name)",
                    )
                )
                break
        first.setdefault((*group, a.port), (order, a.origin))
    return sorted(out)
