"""The TrafficRoute custom resource (shoal.io/v1alpha1): routing in full.

    spec:
      service: reviews
      rules:
        - match:
            headers: [{name: x-user-group, exact: internal}]   # prefix, regex, present
            path: {prefix: /api}                                # exact, prefix, regex
            method: GET
            queryParams: [{name: debug, exact: "1"}]
          backends:
            - {service: reviews, subset: {version: v2}, weight: 100}
          timeout: 2s
          retries: {attempts: 3, retryOn: "5xx,reset", perTryTimeout: 500ms}
          fault: {abort: {status: 503, percent: 10}, delay: {duration: 200ms, percent: 5}}
          mirror: {service: reviews-shadow, percent: 25}
      policy:
        outlier: {consecutive5xx: 5, ejection: 30s, maxEjectionPercent: 50}
        connections: {maxConnections: 100, maxPendingRequests: 100, maxRequests: 1000}

Errors name the field (`spec.rules[1].backends[0].weight`) and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.model import mesh, routing
from shoal.registry import annotations as notes
from shoal.registry import manifests


class UnknownService(manifests.ManifestError):
    """A Service the TrafficRoute names does not exist; `field` is where."""

    def __init__(self, field: str, service: mesh.ServiceKey) -> None:
        super().__init__(f"{field}: Service {service} does not exist", "SHL0101")
        self.field = field


@dataclass(frozen=True)
class Parsed:
    route: routing.ServiceRoute
    outlier: mesh.OutlierPolicy | None
    limits: mesh.ConnectionLimits | None


def _map(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise manifests.ManifestError(f"{where} must be a mapping")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise manifests.ManifestError(f"{where} must be a list")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise manifests.ManifestError(f"{where} must be a non-empty string")
    return value


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise manifests.ManifestError(f"{where} must be a whole number from {low} to {high}")
    return value


def _percent(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise manifests.ManifestError(f"{where} must be a percentage from 0 to 100")
    return float(value)


def _seconds(value: Any, where: str, most: float = 3600.0) -> float:
    try:
        return notes.duration(_str(value, where), where, most=most)
    except notes.AnnotationError as err:
        raise manifests.ManifestError(str(err).replace("annotation ", "")) from err


def _matches(items: Any, where: str) -> tuple[routing.HeaderMatch, ...]:
    out = []
    for i, raw in enumerate(_list(items, where)):
        at = f"{where}[{i}]"
        item = _map(raw, at)
        name = _str(item.get("name"), f"{at}.name")
        kinds = [k for k in ("exact", "prefix", "regex", "present") if k in item]
        if len(kinds) != 1:
            raise manifests.ManifestError(
                f"{at} needs exactly one of exact, prefix, regex, present"
            )
        kind = routing.MatchKind(kinds[0])
        value = (
            "" if kind is routing.MatchKind.PRESENT else _str(item[kinds[0]], f"{at}.{kinds[0]}")
        )
        if kind is routing.MatchKind.REGEX:
            _regex(value, f"{at}.regex")
        out.append(
            routing.HeaderMatch(name.lower() if where.endswith("headers") else name, kind, value)
        )
    return tuple(out)


def _regex(value: str, where: str) -> None:
    try:
        notes.check_regex(value, where)
    except notes.AnnotationError as err:
        raise manifests.ManifestError(str(err).replace("annotation ", "")) from err


def _path(raw: Any, where: str) -> routing.PathMatch:
    item = _map(raw, where)
    kinds = [k for k in ("exact", "prefix", "regex") if k in item]
    if len(kinds) != 1:
        raise manifests.ManifestError(f"{where} needs exactly one of exact, prefix, regex")
    value = _str(item[kinds[0]], f"{where}.{kinds[0]}")
    if kinds[0] != "regex" and not value.startswith("/"):
        raise manifests.ManifestError(f"{where}.{kinds[0]} must start with /")
    if kinds[0] == "regex":
        _regex(value, f"{where}.regex")
    return routing.PathMatch(routing.MatchKind(kinds[0]), value)


def _backends(raw: Any, where: str, namespace: str) -> tuple[routing.Backend, ...]:
    out = []
    items = _list(raw, where)
    if not items:
        raise manifests.ManifestError(f"{where} names no backend")
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        b = _map(item, at)
        service = _service(b.get("service"), f"{at}.service", namespace)
        weight = _int(b.get("weight", 100 if len(items) == 1 else None), f"{at}.weight", 0, 100)
        subset = b.get("subset") or {}
        labels = _map(subset, f"{at}.subset")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise manifests.ManifestError(f"{at}.subset must map label names to strings")
        out.append(routing.Backend(service, weight, mesh.frozen_map(labels)))
    total = sum(b.weight for b in out)
    if total != 100:
        raise manifests.ManifestError(f"{where}: weights add up to {total}, not 100")
    return tuple(out)


def _service(value: Any, where: str, namespace: str) -> mesh.ServiceKey:
    try:
        return notes.service_ref(_str(value, where), namespace, where)
    except notes.AnnotationError as err:
        raise manifests.ManifestError(str(err).replace("annotation ", "")) from err


def _retry(raw: Any, where: str) -> routing.Retry:
    item = _map(raw, where)
    attempts = _int(item.get("attempts"), f"{where}.attempts", 0, notes.MAX_RETRIES)
    retry_on = item.get("retryOn", routing.Retry(0).retry_on)
    wanted = [w.strip() for w in _str(retry_on, f"{where}.retryOn").split(",") if w.strip()]
    unknown = [w for w in wanted if w not in notes.RETRY_ON_VALUES]
    if unknown:
        raise manifests.ManifestError(
            f"{where}.retryOn: {', '.join(unknown)} is not a retry condition"
        )
    per_try = item.get("perTryTimeout")
    return routing.Retry(
        attempts,
        ",".join(wanted),
        _seconds(per_try, f"{where}.perTryTimeout") if per_try is not None else None,
    )


def _fault(raw: Any, where: str) -> routing.Fault:
    item = _map(raw, where)
    status, abort_pct, delay, delay_pct = None, 0.0, None, 0.0
    if "abort" in item:
        abort = _map(item["abort"], f"{where}.abort")
        status = _int(abort.get("status"), f"{where}.abort.status", 200, 599)
        abort_pct = _percent(abort.get("percent"), f"{where}.abort.percent")
    if "delay" in item:
        d = _map(item["delay"], f"{where}.delay")
        delay = _seconds(d.get("duration"), f"{where}.delay.duration", most=60.0)
        delay_pct = _percent(d.get("percent"), f"{where}.delay.percent")
    if status is None and delay is None:
        raise manifests.ManifestError(f"{where} needs abort or delay")
    return routing.Fault(status, abort_pct, delay, delay_pct)


def _mirror(raw: Any, where: str, namespace: str) -> routing.Mirror:
    item = _map(raw, where)
    return routing.Mirror(
        _service(item.get("service"), f"{where}.service", namespace),
        _percent(item.get("percent", 100), f"{where}.percent"),
    )


def _policy(raw: Any) -> tuple[mesh.OutlierPolicy | None, mesh.ConnectionLimits | None]:
    if raw is None:
        return None, None
    policy = _map(raw, "spec.policy")
    outlier = limits = None
    if "outlier" in policy:
        o = _map(policy["outlier"], "spec.policy.outlier")
        outlier = mesh.OutlierPolicy(
            _int(o.get("consecutive5xx", 5), "spec.policy.outlier.consecutive5xx", 1, 1000),
            _seconds(o.get("ejection", "30s"), "spec.policy.outlier.ejection"),
            round(
                _percent(o.get("maxEjectionPercent", 50), "spec.policy.outlier.maxEjectionPercent")
            ),
        )
    if "connections" in policy:
        c = _map(policy["connections"], "spec.policy.connections")

        def opt(name: str) -> int | None:
            value = c.get(name)
            return (
                None if value is None else _int(value, f"spec.policy.connections.{name}", 1, 10**9)
            )

        limits = mesh.ConnectionLimits(
            opt("maxConnections"), opt("maxPendingRequests"), opt("maxRequests")
        )
    return outlier, limits


def parse(
    obj: manifests.KubeObject, known: Mapping[mesh.ServiceKey, mesh.Service] | None
) -> Parsed:
    """The route a TrafficRoute asks for. With `known`, every Service it
    names must exist; without, only its own shape is checked."""
    spec = _map(obj.body.get("spec"), "spec")
    ns = obj.namespace
    service = _service(spec.get("service"), "spec.service", ns)
    if service.namespace != ns:
        raise manifests.ManifestError("spec.service must be in the TrafficRoute's namespace")
    rules = []
    for i, raw in enumerate(_list(spec.get("rules"), "spec.rules")):
        at = f"spec.rules[{i}]"
        rule = _map(raw, at)
        match = _map(rule.get("match") or {}, f"{at}.match")
        method = match.get("method")
        rules.append(
            routing.RouteRule(
                backends=_backends(rule.get("backends"), f"{at}.backends", ns),
                headers=_matches(match.get("headers") or [], f"{at}.match.headers"),
                path=_path(match["path"], f"{at}.match.path") if "path" in match else None,
                method=_str(method, f"{at}.match.method").upper() if method is not None else None,
                query=_matches(match.get("queryParams") or [], f"{at}.match.queryParams"),
                timeout_s=_seconds(rule["timeout"], f"{at}.timeout") if "timeout" in rule else None,
                retry=_retry(rule["retries"], f"{at}.retries") if "retries" in rule else None,
                fault=_fault(rule["fault"], f"{at}.fault") if "fault" in rule else None,
                mirror=_mirror(rule["mirror"], f"{at}.mirror", ns) if "mirror" in rule else None,
            )
        )
    if not rules:
        raise manifests.ManifestError("spec.rules is empty")
    route = routing.ServiceRoute(service, tuple(rules), source=f"TrafficRoute {ns}/{obj.name}")
    if known is not None:
        if service not in known:
            raise UnknownService("spec.service", service)
        for i, made in enumerate(route.rules):
            for j, backend in enumerate(made.backends):
                if backend.service not in known:
                    raise UnknownService(f"spec.rules[{i}].backends[{j}].service", backend.service)
            if made.mirror is not None and made.mirror.service not in known:
                raise UnknownService(f"spec.rules[{i}].mirror.service", made.mirror.service)
    outlier, limits = _policy(spec.get("policy"))
    return Parsed(route, outlier, limits)
