"""Routing and scope annotations on a Service, parsed and validated.

One-liners for `kubectl annotate`. Every error names the annotation and what
is wrong with it; the caller decides what stays in force.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import re2

from shoal import spiffe
from shoal.model import mesh, routing, scope

PREFIX = "shoal.io/"
EXPORT_TO = PREFIX + "export-to"
DEPENDENCIES = PREFIX + "dependencies"
SPLIT = PREFIX + "split"
ROUTE_HEADERS = PREFIX + "route-headers"
TIMEOUT = PREFIX + "timeout"
RETRIES = PREFIX + "retries"
RETRY_ON = PREFIX + "retry-on"
FAULT = PREFIX + "fault"
MIRROR = PREFIX + "mirror"
OUTLIER = PREFIX + "outlier"
ROUTING = (SPLIT, ROUTE_HEADERS, TIMEOUT, RETRIES, RETRY_ON, FAULT, MIRROR)
RETRY_ON_VALUES = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "envoy-ratelimited",
        "http3-post-connect-failure",
    }
)
MAX_RETRIES = 10
# Envoy refuses regular expressions whose RE2 program is larger than this
# (runtime key re2.max_program_size.error_level): check the same here.
MAX_REGEX_PROGRAM = 100
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MTLS = PREFIX + "mtls"
ALLOW = PREFIX + "allow"
MTLS_MODES = ("strict", "permissive")
TRACE_SAMPLING = PREFIX + "trace-sampling"
ACCESS_LOG = PREFIX + "access-log"
_SWITCH = {"on": True, "off": False}

# ASCII digits only: float() also reads "1_0", "1e1" and other scripts' digits.
_DECIMAL = re.compile(r"^[0-9]+(?:\.[0-9]+)?\Z")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")


class AnnotationError(ValueError):
    def __init__(self, annotation: str, reason: str, code: str = "SHL0003") -> None:
        super().__init__(f"annotation {annotation}: {reason}")
        self.annotation = annotation
        self.code = code


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
        weight = whole_number(weight_text.strip())
        if not sep or weight is None:
            raise AnnotationError(SPLIT, f"{item!r} is not SERVICE=WEIGHT with a whole number")
        backends.append(routing.Backend(service_ref(name.strip(), namespace, SPLIT), weight))
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
        check_regex(value.strip(), ROUTE_HEADERS)
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


def check_regex(pattern: str, annotation: str) -> None:
    """Accept exactly what Envoy accepts: RE2 syntax, within its size limit."""
    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as err:
        reason = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else err
        raise AnnotationError(
            annotation, f"{pattern!r} is not a valid RE2 regular expression: {reason}"
        ) from err
    if compiled.programsize > MAX_REGEX_PROGRAM:
        raise AnnotationError(
            annotation,
            f"{pattern!r} is too complex for Envoy (RE2 program size "
            f"{compiled.programsize} > {MAX_REGEX_PROGRAM})",
        )


def whole_number(text: str) -> int | None:
    """A whole number in at most 9 ASCII digits, else None. str.isdigit()
    also takes "²" (which int() refuses) and Arabic-Indic digits (which it
    takes): found by fuzzing the annotations."""
    if not text or len(text) > 9 or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def duration(text: str, annotation: str, *, most: float = 3600.0) -> float:
    """`200ms`, `2s`, `1.5m`, `1h` in seconds, more than 0 and at most `most`."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise AnnotationError(annotation, f"{text.strip()!r} is not a duration like 200ms or 2s")
    seconds = float(found.group(1)) * _UNITS[found.group(2)]
    if not 0 < seconds <= most:
        raise AnnotationError(annotation, f"{text.strip()!r} is out of range (0 to {most:g}s)")
    return seconds


def percent(text: str, annotation: str) -> float:
    value = text.strip().removesuffix("%")
    if _DECIMAL.match(value) is None:
        raise AnnotationError(annotation, f"{text.strip()!r} is not a percentage")
    number = float(value)
    if not 0 <= number <= 100:
        raise AnnotationError(annotation, f"{text.strip()!r} is not between 0% and 100%")
    return number


def _retry(notes: Mapping[str, str]) -> routing.Retry | None:
    if RETRIES not in notes:
        if RETRY_ON in notes:
            raise AnnotationError(RETRY_ON, f"needs {RETRIES} (how many attempts)")
        return None
    text = notes[RETRIES].strip()
    attempts = whole_number(text)
    if attempts is None or attempts > MAX_RETRIES:
        raise AnnotationError(RETRIES, f"{text!r} is not a whole number from 0 to {MAX_RETRIES}")
    retry_on = routing.Retry(0).retry_on
    if RETRY_ON in notes:
        wanted = _names(notes[RETRY_ON])
        unknown = [w for w in wanted if w not in RETRY_ON_VALUES]
        if unknown or not wanted:
            known = ", ".join(sorted(RETRY_ON_VALUES))
            raise AnnotationError(
                RETRY_ON, f"{', '.join(unknown) or 'nothing'} is not one of {known}"
            )
        retry_on = ",".join(wanted)
    return routing.Retry(attempts, retry_on)


def _fault(text: str) -> routing.Fault:
    abort_status, abort_percent, delay, delay_percent = None, 0.0, None, 0.0
    for item in _names(text):
        kind, eq, rest = item.partition("=")
        what, at, share = rest.partition("@")
        if not eq or not at:
            raise AnnotationError(
                FAULT, f"{item!r} is not abort=STATUS@PERCENT or delay=DURATION@PERCENT"
            )
        if kind == "abort":
            status = whole_number(what)
            if status is None or not 200 <= status <= 599:
                raise AnnotationError(FAULT, f"{what!r} is not an HTTP status from 200 to 599")
            abort_status, abort_percent = status, percent(share, FAULT)
        elif kind == "delay":
            delay, delay_percent = duration(what, FAULT, most=60.0), percent(share, FAULT)
        else:
            raise AnnotationError(FAULT, f"{kind!r} is neither abort nor delay")
    if abort_status is None and delay is None:
        raise AnnotationError(FAULT, "names no fault")
    return routing.Fault(abort_status, abort_percent, delay, delay_percent)


def _mirror(
    text: str, service: mesh.Service, known: Mapping[mesh.ServiceKey, mesh.Service]
) -> routing.Mirror:
    target, at, share = text.strip().partition("@")
    key = service_ref(target.strip(), service.namespace, MIRROR)
    if key == service.key:
        raise AnnotationError(MIRROR, "a Service cannot mirror to itself")
    if key not in known:
        raise AnnotationError(MIRROR, f"Service {key} does not exist", "SHL0101")
    return routing.Mirror(key, percent(share, MIRROR) if at else 100.0)


def outlier(annotations: Mapping[str, str]) -> mesh.OutlierPolicy | None:
    """`consecutive-5xx=5,ejection=30s[,max-ejection=50%]`."""
    value = annotations.get(OUTLIER)
    if value is None:
        return None
    fields: dict[str, str] = {}
    for item in _names(value):
        key, eq, rest = item.partition("=")
        if not eq or key not in ("consecutive-5xx", "ejection", "max-ejection"):
            raise AnnotationError(
                OUTLIER, f"{item!r}: expected consecutive-5xx=N, ejection=DURATION, max-ejection=P%"
            )
        fields[key] = rest
    count = fields.get("consecutive-5xx", "5")
    consecutive = whole_number(count)
    if consecutive is None or not 1 <= consecutive <= 1000:
        raise AnnotationError(OUTLIER, f"consecutive-5xx {count!r} is not from 1 to 1000")
    ejection = duration(fields.get("ejection", "30s"), OUTLIER)
    share = percent(fields.get("max-ejection", "50%"), OUTLIER)
    return mesh.OutlierPolicy(consecutive, ejection, round(share))


def service_route(
    service: mesh.Service, known: Mapping[mesh.ServiceKey, mesh.Service]
) -> routing.ServiceRoute | None:
    """The route the annotations ask for, or None when they ask for nothing."""
    notes = service.annotations
    if notes.keys().isdisjoint(ROUTING):
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
                raise AnnotationError(
                    which, f"backend Service {backend.service} does not exist", "SHL0101"
                )
    return routing.ServiceRoute(
        service.key,
        tuple(rules),
        source="annotations",
        timeout_s=duration(notes[TIMEOUT], TIMEOUT) if TIMEOUT in notes else None,
        retry=_retry(notes),
        fault=_fault(notes[FAULT]) if FAULT in notes else None,
        mirror=_mirror(notes[MIRROR], service, known) if MIRROR in notes else None,
    )


def mtls(annotations: Mapping[str, str]) -> str | None:
    value = annotations.get(MTLS)
    if value is None:
        return None
    mode = value.strip().lower()
    if mode not in MTLS_MODES:
        raise AnnotationError(MTLS, f"{value!r} is not one of {', '.join(MTLS_MODES)}")
    return mode


# A malformed `allow` admits nobody: authorization fails closed.
DENY_EVERYONE: frozenset[tuple[str, str]] = frozenset()


def allow(annotations: Mapping[str, str]) -> frozenset[tuple[str, str]] | None:
    """Callers allowed: `ns/sa` or `ns/*`, comma separated (service accounts
    are DNS-1123 subdomains, so `api.v2` is one). None: everyone."""
    value = annotations.get(ALLOW)
    if value is None:
        return None
    out: set[tuple[str, str]] = set()
    for item in _names(value):
        ns, slash, account = item.partition("/")
        if (
            not slash
            or not spiffe.is_dns_label(ns)
            or not (account == "*" or spiffe.is_dns_subdomain(account))
        ):
            raise AnnotationError(ALLOW, f"{item!r} is not NAMESPACE/SERVICEACCOUNT or NAMESPACE/*")
        out.add((ns, account))
    if not out:
        raise AnnotationError(ALLOW, "names no caller; remove it to allow everyone")
    return frozenset(out)


def trace_sampling(annotations: Mapping[str, str]) -> float | None:
    """Percent of requests to the Service that start a trace, 0-100."""
    value = annotations.get(TRACE_SAMPLING)
    if value is None:
        return None
    return percent(value.strip(), TRACE_SAMPLING)


def access_log(annotations: Mapping[str, str]) -> bool | None:
    """`on` or `off`: the sidecars' access logs (Service or Namespace)."""
    value = annotations.get(ACCESS_LOG)
    if value is None:
        return None
    switch = _SWITCH.get(value.strip().lower())
    if switch is None:
        raise AnnotationError(ACCESS_LOG, f"{value!r} is not 'on' or 'off'")
    return switch
