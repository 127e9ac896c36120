"""Analyzers: proxies and their certificates.

What each connected proxy did with what it was sent (acknowledged it,
rejected it, not answered yet), the workload certificate it holds, and how
far its clock is from the control plane's. A proxy that rejects its
configuration says only what Envoy says (`:-prefixed or host headers may
not be modified`); the control plane knows which object produced the
resource, so the rejection is traced back to that object and its field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from shoal.model import mesh, problems, proxy, routing
from shoal.observe.analysis import evidence, facts
from shoal.registry import annotations as notes
from shoal.sds import ca
from shoal.xds import resources, status

CONFIG_REJECTED = "SHL0401"
REGEX_REJECTED = "SHL0106"
PROXY_STALE = "SHL0402"
CERTIFICATE_EXPIRING = "SHL0403"
CLOCK_SKEW = "SHL0404"

# An ACK can lag a push by a moment (a large configuration on a busy
# machine); a proxy this far past the debounce maximum is not catching up.
STALE_MARGIN_S = 5.0
# Certificates are renewed at about half their lifetime: with a quarter
# left, the renewal is late.
EXPIRING_SHARE = 0.25
# Envoy sends spans every few seconds, so their arrival trails their end by
# that much; a clock further off than this is not that wait.
SKEW_THRESHOLD_S = 60.0
# Proxies named in one problem; the others are counted.
NAMED_PROXIES = 3
# Envoy's error is quoted up to this long: a validation error carries a dump
# of the whole resource.
QUOTED_ERROR = 300

# Envoy's words for a regular expression over its RE2 program size limit.
_REGEX_TOO_LARGE = re.compile(
    r"regex '(?P<regex>.*)' RE2 program size of (?P<size>\d+) > max program size of (?P<max>\d+)",
    re.DOTALL,
)
_REGEX_INVALID = re.compile(r"[Ii]nvalid regex '(?P<regex>.*)': ", re.DOTALL)
# Envoy refuses to add, set or remove pseudo-headers and Host.
_NOT_MODIFIABLE = ":-prefixed or host headers may not be"
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
# Names translation gives resources (xds/translate/names.py, routes.py):
# a route `web.shop:80#1`, a virtual host or cluster ending in the
# Service's `web.shop.svc.<domain>`.
_ROUTE_NAME = re.compile(rf"\b(?P<name>{_LABEL})\.(?P<ns>{_LABEL}):(?P<port>\d+)#(?P<rule>\d+)")
_HOST_NAME = re.compile(
    rf"\b(?P<name>{_LABEL})\.(?P<ns>{_LABEL})\.svc\.[-a-z0-9.]*(?::(?P<port>\d+))?"
)
_CLUSTER_NAME = re.compile(
    rf"\boutbound\|(?P<port>\d+)\|[^|]*\|(?P<name>{_LABEL})\.(?P<ns>{_LABEL})\.svc\."
)
# Envoy's proto validation points at the element it refused by index
# (`VirtualHosts[2] ... Routes[0]`) and prints the resource.
_VALIDATION_FAILED = "Proto constraint validation failed"
_DUMP_MARK = "goo.gle/debug"
_VHOST_INDEX = re.compile(r"VirtualHosts\[(\d+)\]")
_ROUTE_INDEX = re.compile(r"\bRoutes\[(\d+)\]")


def analyze(found: facts.Facts) -> Iterator[problems.Problem]:
    yield from rejected(found)
    yield from stale(found)
    yield from expiring(found)
    yield from skewed(found)


def subject_of(p: facts.ProxyFacts) -> str:
    """The object a proxy's own problems are about: its Pod, else itself."""
    if isinstance(p.proxy, proxy.CapturedSidecar):
        return f"Pod {p.proxy.namespace}/{p.proxy.pod}"
    return f"Proxy {p.name}"


def _proxies(named: list[str]) -> str:
    shown = ", ".join(named[:NAMED_PROXIES])
    more = len(named) - NAMED_PROXIES
    return (
        f"proxy {shown}"
        if len(named) == 1
        else f"proxies {shown}" + (f" and {more} more" if more > 0 else "")
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.3g} h"


# -- rejected configuration (SHL0401, SHL0106) -------------------------------------


@dataclass(frozen=True, slots=True)
class Culprit:
    """Where a rejected resource came from: an object, its field, and what
    of the resource it made (for the reason)."""

    subject: str
    field: str = ""
    made: str = ""


def rejected(found: facts.Facts) -> Iterator[problems.Problem]:
    """One problem per object that a NACK traces to, naming the proxies
    that rejected it. A certificate a proxy rejects is SHL0403's."""
    by_error: dict[
        tuple[str, str, str | None], list[tuple[facts.ProxyFacts, status.TypeStatus]]
    ] = {}
    for p in found.proxies:
        for t in p.types:
            if t.status == status.NACKED and t.type_url != resources.SECRET:
                where = p.proxy.namespace if p.proxy is not None else None
                by_error.setdefault((t.type_url, t.error, where), []).append((p, t))
    # Traced once per error and caller namespace, whatever the number of
    # proxies: a bad route is usually rejected by every caller at once.
    by_culprit: dict[
        tuple[str, Culprit, str, str], list[tuple[facts.ProxyFacts, status.TypeStatus]]
    ] = {}
    for (type_url, error, namespace), nacks in by_error.items():
        code = REGEX_REJECTED if _REGEX_TOO_LARGE.search(error) else CONFIG_REJECTED
        culprits = trace(found.state, error, namespace)
        if not culprits:
            for p, t in nacks:
                culprit = Culprit(subject_of(p))
                by_culprit.setdefault((code, culprit, type_url, error), []).append((p, t))
            continue
        for culprit in culprits:
            by_culprit.setdefault((code, culprit, type_url, error), []).extend(nacks)
    for (code, culprit, type_url, error), nacks in by_culprit.items():
        kind = resources.short(type_url)
        first = nacks[0][1]
        names = sorted({p.name for p, _ in nacks})
        made = f" ({culprit.made})" if culprit.made else ""
        one = len(names) == 1
        kept = (
            f"{'it keeps' if one else 'they keep'} {kind} version {first.acked_version}"
            if first.acked_version
            else f"{'it has' if one else 'they have'} no {kind} yet"
        )
        yield problems.Problem(
            source="",
            subject=culprit.subject,
            reason=(
                f"{_proxies(names)} rejected {kind} version {first.sent_version}{made}: "
                f"Envoy says {_quoted(error)}; {kept} and get{'s' if one else ''} no {kind} "
                "change until this is corrected"
            ),
            code=code,
            field=culprit.field,
        )


def _quoted(error: str) -> str:
    """Envoy's error on one line, shortened. A validation error prints the
    whole resource (after protobuf's `goo.gle/debugonly` mark) before what
    failed: only what failed is quoted."""
    failed = error.find(_VALIDATION_FAILED)
    text = error[failed:] if failed > 0 and _DUMP_MARK in error[:failed] else error
    text = " ".join(text.split())
    return repr(text if len(text) <= QUOTED_ERROR else text[: QUOTED_ERROR - 1] + "…")


def trace(state: mesh.MeshState, error: str, namespace: str | None) -> list[Culprit]:
    """The objects (and fields) that made what Envoy's `error` refuses, for
    a proxy in `namespace`: by what the error quotes (a regular expression,
    a header), else by the resource names it mentions; [] if neither
    leads to an object of the mesh."""
    regex = _REGEX_TOO_LARGE.search(error) or _REGEX_INVALID.search(error)
    if regex is not None:
        pattern = regex.group("regex")
        found = list(_rules_where(state, lambda rule: _regex_spots(rule, pattern)))
        if found:
            return found
    if _NOT_MODIFIABLE in error:
        found = list(_rules_where(state, _unmodifiable_spots))
        if found:
            return found
    named = _named(state, error)
    if named is None:
        return []
    key, port, rule, resource = named
    return [_route_culprit(state, key, port, rule, namespace, resource)]


# A spot in a rule: the part of its match or filters, and the index there.
Spot = tuple[str, int]


def _regex_spots(rule: routing.RouteRule, pattern: str) -> list[Spot]:
    out: list[Spot] = []
    path = rule.path
    if path is not None and path.kind is routing.MatchKind.REGEX and path.value == pattern:
        out.append(("path", 0))
    for i, h in enumerate(rule.headers):
        if h.kind is routing.MatchKind.REGEX and h.value == pattern:
            out.append(("headers", i))
    for i, q in enumerate(rule.query):
        if q.kind is routing.MatchKind.REGEX and q.value == pattern:
            out.append(("queryParams", i))
    return out


def _unmodifiable(name: str) -> bool:
    return name.startswith(":") or name.lower() == "host"


def _unmodifiable_spots(rule: routing.RouteRule) -> list[Spot]:
    out: list[Spot] = []
    for part, change in (
        ("requestHeaderModifier", rule.request_headers),
        ("responseHeaderModifier", rule.response_headers),
    ):
        if change is None:
            continue
        names = [n for n, _ in change.set] + [n for n, _ in change.add] + list(change.remove)
        if any(_unmodifiable(n) for n in names):
            out.append((part, 0))
    return out


def _rules_where(
    state: mesh.MeshState, spots_of: Callable[[routing.RouteRule], list[Spot]]
) -> Iterator[Culprit]:
    """Every rule of every route with a spot `spots_of` finds, as culprits."""
    seen: set[Culprit] = set()
    for route in state.routes.values():
        for attached in route.attached:
            for order, rule in zip(attached.order, attached.rules, strict=True):
                for spot in spots_of(rule):
                    culprit = Culprit(
                        attached.origin,
                        _attached_field(order, spot, attached.grpc),
                        f"its routes to Service {route.service}",
                    )
                    if culprit not in seen:
                        seen.add(culprit)
                        yield culprit
        for i, rule in enumerate(route.rules):
            for spot in spots_of(rule):
                culprit = Culprit(
                    _source_subject(route),
                    _own_field(route, i, rule, spot),
                    f"its routes to Service {route.service}",
                )
                if culprit not in seen:
                    seen.add(culprit)
                    yield culprit


def _source_subject(route: routing.ServiceRoute) -> str:
    """`TrafficRoute ns/name`; the Service itself for its annotations."""
    if route.source.startswith("TrafficRoute "):
        return route.source
    return f"Service {route.service}"


def _attached_field(order: tuple[object, ...], spot: Spot, grpc: bool) -> str:
    """The field of an HTTPRoute or GRPCRoute that holds `spot`: its
    order ends with the rule's and the match's index (registry/gatewayapi)."""
    r, j = order[-2], order[-1]
    part, k = spot
    if part in ("requestHeaderModifier", "responseHeaderModifier"):
        return f"spec.rules[{r}].filters[].{part}"
    if part == "path" and grpc:
        # A GRPCRoute's path is made of its method match.
        return f"spec.rules[{r}].matches[{j}].method"
    if part == "path":
        return f"spec.rules[{r}].matches[{j}].path.value"
    return f"spec.rules[{r}].matches[{j}].{part}[{k}].value"


def _own_field(route: routing.ServiceRoute, i: int, rule: routing.RouteRule, spot: Spot) -> str:
    part, k = spot
    if route.source.startswith("TrafficRoute "):
        if part == "path":
            return f"spec.rules[{i}].match.path.regex"
        return f"spec.rules[{i}].match.{part}[{k}].regex"
    if route.source == "annotations":
        which = notes.ROUTE_HEADERS if rule.headers else notes.SPLIT
        return f"metadata.annotations[{which}]"
    return ""


def _named(
    state: mesh.MeshState, error: str
) -> tuple[mesh.ServiceKey, int | None, int | None, str] | None:
    """The Service (with the port and rule number where they show) whose
    resource Envoy's error names, and that resource: the route or virtual
    host its validation points at in the dump it prints, else the first
    name of a Service's route, cluster or virtual host in the error."""
    for text in (*_pointed_at(error), error):
        for pattern, what in (
            (_ROUTE_NAME, "route"),
            (_CLUSTER_NAME, "cluster"),
            (_HOST_NAME, "virtual host"),
        ):
            for m in pattern.finditer(text):
                key = mesh.ServiceKey(m.group("ns"), m.group("name"))
                if key not in state.services:
                    continue
                port = int(m.group("port")) if m.group("port") else None
                rule = int(m.group("rule")) if "rule" in pattern.groupindex else None
                if what == "cluster":
                    # The whole name, to the end of the Service's domain.
                    name = text[m.start() :].split()[0].strip("\"',:;()")
                else:
                    name = m.group(0)
                return key, port, rule, f"{what} {name}"
    return None


def _pointed_at(error: str) -> list[str]:
    """The names (`name: "..."` lines) of the route, else the virtual host,
    that Envoy's proto validation points at (`VirtualHosts[i]`, `Routes[j]`)
    in the resource it prints; [] when it does not."""
    vhost = _VHOST_INDEX.search(error)
    if vhost is None:
        return []
    route = _ROUTE_INDEX.search(error, vhost.end())
    hosts = _blocks(error, "virtual_hosts")
    if int(vhost.group(1)) >= len(hosts):
        return []
    host_lines = hosts[int(vhost.group(1))]
    out = []
    if route is not None:
        routes = _blocks("\n".join(host_lines), "routes")
        if int(route.group(1)) < len(routes):
            out.extend(_names_of(routes[int(route.group(1))]))
    out.extend(_names_of(host_lines))
    return out


def _blocks(dump: str, key: str) -> list[list[str]]:
    """The lines of each `key { ... }` block of a protobuf text dump, at
    the depth where the first one opens; the block's own fields unindented."""
    out: list[list[str]] = []
    level: int | None = None
    depth = 0
    for line in dump.splitlines():
        text = line.strip()
        if text == "}":
            depth -= 1
        if level is not None and depth > level and out:
            out[-1].append("  " * (depth - level - 1) + text)
        if text.endswith("{"):
            if text == f"{key} {{" and (level is None or depth == level):
                level = depth
                out.append([])
            depth += 1
    return out


def _names_of(lines: Iterable[str]) -> list[str]:
    """The block's own `name:` (not those of blocks inside it)."""
    return [line for line in lines if line.startswith("name: ")]


def _route_culprit(
    state: mesh.MeshState,
    key: mesh.ServiceKey,
    port: int | None,
    rule: int | None,
    namespace: str | None,
    resource: str,
) -> Culprit:
    """The object behind rule `rule` of `key`'s routes on `port` for a
    caller in `namespace`, as translation chose it (`resource` is what of
    it Envoy named); the Service when the rule or its source is not known."""
    route = state.routes.get(key)
    made = resource
    if route is None:
        return Culprit(f"Service {key}", made=made)
    if port is not None:
        attached = routing.attached_rules(route.attached, port, namespace)
        if attached is not None:
            if rule is not None and rule < len(attached):
                chosen = attached[rule]
                for a in route.attached:
                    for order, r in zip(a.order, a.rules, strict=True):
                        if r is chosen:
                            return Culprit(
                                a.origin, f"spec.rules[{order[-2]}].matches[{order[-1]}]", made
                            )
            origins = sorted({a.origin for a in route.attached if a.applies(port, namespace)})
            return Culprit(origins[0], made=made)
    if rule is not None and rule < len(route.rules):
        if route.source.startswith("TrafficRoute "):
            return Culprit(route.source, f"spec.rules[{rule}]", made)
        if route.source == "annotations":
            which = notes.ROUTE_HEADERS if route.rules[rule].headers else notes.SPLIT
            return Culprit(f"Service {key}", f"metadata.annotations[{which}]", made)
    return Culprit(_source_subject(route), made=made)


# -- stale proxies (SHL0402) ----------------------------------------------------------


def stale_since(t: status.TypeStatus, changed_at: float) -> float:
    """When `t` started lagging: when the response it has not acknowledged
    was sent, else (nothing sent yet) the later of the mesh's last change
    and its last exchange; 0 if not known."""
    if t.sent_version and t.sent_version != t.acked_version:
        return t.sent_at
    return max(changed_at, t.sent_at, t.acked_at)


def stale(found: facts.Facts) -> Iterator[problems.Problem]:
    limit = found.debounce_max_s + STALE_MARGIN_S
    for p in found.proxies:
        behind = [
            (found.now - since, t)
            for t in p.types
            if t.status == status.STALE and (since := stale_since(t, found.changed_at))
        ]
        longest = max((s for s, _ in behind), default=0.0)
        if longest <= limit:
            continue
        unanswered = [(s, t) for s, t in behind if t.sent_version != t.acked_version]
        unsent = [t for _, t in behind if t.sent_version == t.acked_version]
        parts = [
            f"was sent {resources.short(t.type_url)} {_duration(s)} ago and has not acknowledged it"
            for s, t in unanswered
        ]
        if unsent:
            kinds = ", ".join(resources.short(t.type_url) for t in unsent)
            parts.append(f"has not been sent the current {kinds} yet")
        yield problems.Problem(
            source="",
            subject=subject_of(p),
            reason=(
                f"proxy {p.name} has been behind for {_duration(longest)} (debounce maximum "
                f"{found.debounce_max_s:g} s): it {'; it '.join(parts)}, so it routes by an "
                "older mesh"
            ),
            code=PROXY_STALE,
        )


# -- certificates (SHL0403) -----------------------------------------------------------


def lifetime_of(held: facts.HeldCertificate) -> tuple[float, float]:
    """When a certificate was issued and for how long: the CA starts its
    validity BACKDATE early (for clocks a little behind), which is not
    part of the lifetime it was issued for."""
    backdate = ca.BACKDATE.total_seconds()
    validity = held.not_after - held.not_before
    if validity > backdate:
        return held.not_before + backdate, validity - backdate
    return held.not_before, validity


def expiring(found: facts.Facts) -> Iterator[problems.Problem]:
    for p in found.proxies:
        sds = next((t for t in p.types if t.type_url == resources.SECRET), None)
        held = p.certificate
        rejected_update = sds is not None and sds.status == status.NACKED
        if held is None:
            if rejected_update and sds is not None:
                yield _certificate_problem(p, f"it rejected its certificate ({_quoted(sds.error)})")
            continue
        _, lifetime = lifetime_of(held)
        left = held.not_after - found.now
        late = left < lifetime * EXPIRING_SHARE
        if not (late or rejected_update):
            continue
        if left <= 0:
            state = (
                f"its workload certificate (serial {held.serial}) expired {_duration(-left)} ago"
            )
        else:
            state = (
                f"its workload certificate (serial {held.serial}) expires in {_duration(left)}, "
                f"{left / lifetime:.0%} of its {_duration(lifetime)} lifetime left (renewal is due "
                "at about half)"
            )
        yield _certificate_problem(p, f"{state}; {_renewal(found, sds)}")


def _renewal(found: facts.Facts, sds: status.TypeStatus | None) -> str:
    if sds is None:
        return "it has not asked for a certificate update (SDS)"
    if sds.status == status.NACKED:
        return f"it rejected the renewed one (SDS version {sds.sent_version}): {_quoted(sds.error)}"
    if sds.status == status.STALE and sds.sent_version != sds.acked_version:
        waited = _duration(found.now - sds.sent_at)
        return f"the renewed one was sent {waited} ago and not acknowledged"
    return "the control plane has not sent it a renewed one (check `shoal ca status`)"


def _certificate_problem(p: facts.ProxyFacts, what: str) -> problems.Problem:
    return problems.Problem(
        source="",
        subject=subject_of(p),
        reason=(
            f"proxy {p.name}: {what}; once it expires, every mutual-TLS call to and from it fails"
        ),
        code=CERTIFICATE_EXPIRING,
    )


# -- clocks (SHL0404) -----------------------------------------------------------------


def offset_of(found: facts.Facts, p: facts.ProxyFacts) -> float | None:
    """Its clock's offset, by its name or (when several identities share
    its node id, and so its spans' `node_id`) by its node id."""
    offsets = found.clock_offsets
    if p.name in offsets:
        return offsets[p.name]
    return offsets.get(p.name.split(" [", 1)[0])


def skewed(found: facts.Facts) -> Iterator[problems.Problem]:
    for p in found.proxies:
        offset = offset_of(found, p)
        if offset is None or abs(offset) <= SKEW_THRESHOLD_S:
            continue
        way = "ahead of" if offset > 0 else "behind"
        yield problems.Problem(
            source="",
            subject=subject_of(p),
            reason=(
                f"proxy {p.name}'s clock is {_duration(abs(offset))} {way} the control plane's (by "
                f"the spans it reports): {_skew_effect(found, p, offset)}"
            ),
            code=CLOCK_SKEW,
        )


def _skew_effect(found: facts.Facts, p: facts.ProxyFacts, offset: float) -> str:
    """What the offset does to certificates as that proxy sees them. Its
    peers hold certificates from new to about half their lifetime old
    (renewal is at about half), valid from BACKDATE before they were issued.
    Ahead by a lifetime, every one looks expired to it; by half, the older
    ones. Behind by more than the backdating, a new one looks not yet valid
    for the difference; by that plus half a lifetime, every one does."""
    held = p.certificate or next(
        (q.certificate for q in found.proxies if q.certificate is not None), None
    )
    failed = _failed_verifications(found, p)
    seen = f"; it has already failed {failed:.0f} certificate checks" if failed else ""
    if held is None:
        looks = "expired" if offset > 0 else "not yet valid"
        return f"certificates may look {looks} to it" + seen
    issued, lifetime = lifetime_of(held)
    backdate = issued - held.not_before
    if offset > 0:
        if offset >= lifetime:
            what = (
                f"workload certificates live {_duration(lifetime)}, so every one looks expired to "
                "it and all its mutual-TLS handshakes fail"
            )
        elif offset >= lifetime / 2:
            what = (
                f"workload certificates live {_duration(lifetime)}, so those older than "
                f"{_duration(lifetime - offset)} look expired to it and its mutual-TLS handshakes "
                "with their proxies fail"
            )
        else:
            what = (
                f"certificates look expired to it {_duration(offset)} early; they live "
                f"{_duration(lifetime)} and are renewed at about half, so none fails yet"
            )
    else:
        early = -offset - backdate
        if early <= 0:
            what = (
                f"certificates still look valid to it (their validity starts {_duration(backdate)} "
                "before they are issued), but little more skew makes new ones fail"
            )
        elif early >= lifetime / 2:
            what = (
                f"workload certificates live {_duration(lifetime)} and are renewed at about half, "
                "so every one looks not yet valid to it and all its mutual-TLS handshakes fail"
            )
        else:
            what = (
                f"a certificate looks not yet valid to it for {_duration(early)} after it is "
                "issued, so its mutual-TLS handshakes with freshly renewed proxies fail"
            )
    return what + seen


def _failed_verifications(found: facts.Facts, p: facts.ProxyFacts) -> float:
    stats = found.stats.get(p.name, {})
    return evidence.matching(stats, "cluster.outbound|", ".ssl.fail_verify_error") + (
        evidence.matching(stats, "listener.", ".ssl.fail_verify_error")
    )
