"""Analyzers: who may call a Service, against who does.

A policy is only wrong against the callers it meets, so these read what the
sidecars counted (evidence): connections a STRICT inbound refused because
they brought no mesh certificate (SHL0302), requests an `allow` policy
answered 403 and from whom (SHL0303), requests a caller's sidecar answered
404 because the Service it called is not exported to its namespace
(SHL0304). Where the configuration alone says it, they say it without
evidence too: an `allow` that names no identity any workload of the mesh
has, and a workload that declares (`shoal.io/dependencies`) it calls a
Service hidden from it.

Evidence comes from the local sidecars the control plane can reach
(evidence.scrape); Pods on other hosts are judged on configuration alone.
Counters only grow, so a problem is named only while the configuration
that explains it is still in force: once it is fixed, old counts say
nothing and the problem clears.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from shoal import spiffe
from shoal.model import mesh, problems, proxy, scope
from shoal.observe.analysis import evidence, facts
from shoal.registry import annotations as notes
from shoal.xds.translate import telemetry

PLAINTEXT_CALLER_REFUSED = "SHL0302"
CALLER_DENIED = "SHL0303"
SERVICE_NOT_EXPORTED = "SHL0304"

# Correlating a namespace's "no route for this Host" 404s with the Services
# hidden from it names a Service only when there are few to choose from:
# past this, any one of them is a guess (the 404s may be a typo).
MOST_SUSPECTS = 3
# How the reason names a caller that brought no certificate.
NO_CERTIFICATE = "callers without a mesh certificate"


def analyze(found: facts.Facts) -> Iterator[problems.Problem]:
    seen = _Seen.of(found)
    yield from plaintext_refused(found, seen)
    yield from callers_denied(found, seen)
    yield from not_exported(found, seen)


@dataclass(frozen=True, slots=True)
class _Seen:
    """The counters every analyzer here reads, parsed once per analysis."""

    # Request metrics per proxy name.
    requests: Mapping[str, tuple[evidence.Requests, ...]]
    # Handshakes callers' sidecars aborted because the Service's server
    # certificate failed their check, per Service (those fail on the
    # server's side too, and are no plain-text caller).
    aborted: Mapping[mesh.ServiceKey, float]

    @classmethod
    def of(cls, found: facts.Facts) -> _Seen:
        requests: dict[str, tuple[evidence.Requests, ...]] = {}
        aborted: dict[mesh.ServiceKey, float] = {}
        for name, stats in found.stats.items():
            requests[name] = tuple(evidence.requests(stats))
            for c in evidence.outbound(stats):
                if c.stat.startswith("ssl.fail_verify_"):
                    aborted[c.service] = aborted.get(c.service, 0.0) + c.value
        return cls(requests, aborted)


def mtls_mode(svc: mesh.Service, state: mesh.MeshState) -> tuple[str, str]:
    """The Service's inbound mode and where it comes from (as
    translate.sidecar.security decides it)."""
    if svc.mtls is not None:
        return svc.mtls, "its shoal.io/mtls"
    namespace = state.namespaces.get(svc.namespace)
    if namespace is not None and namespace.mtls is not None:
        return namespace.mtls, f"the shoal.io/mtls of Namespace {svc.namespace}"
    return "strict", "the default"


# -- SHL0302 -------------------------------------------------------------------


def plaintext_refused(found: facts.Facts, seen: _Seen) -> Iterator[problems.Problem]:
    """A STRICT Service whose sidecars' inbound listeners failed handshakes
    that no certificate check explains: the caller spoke plain text (or TLS
    without a client certificate), as a caller without a sidecar does."""
    refused: dict[mesh.ServiceKey, list[tuple[facts.ProxyFacts, float]]] = {}
    for p in found.proxies:
        sidecar = p.proxy
        stats = found.stats.get(p.name)
        if not isinstance(sidecar, proxy.Sidecar) or not stats:
            continue
        ssl = evidence.listener_prefix(sidecar.inbound_address, sidecar.inbound_port) + "ssl."
        failed = stats.get(ssl + "connection_error", 0.0)
        # A certificate of another CA, or of an unexpected identity: a
        # caller with a certificate, which is another problem.
        checked = sum(stats.get(ssl + f"fail_verify_{k}", 0.0) for k in ("error", "san"))
        if failed - checked > 0:
            refused.setdefault(sidecar.service_key, []).append((p, failed - checked))
    for key, by_proxy in sorted(refused.items()):
        svc = found.state.services.get(key)
        if svc is None:
            continue
        mode, origin = mtls_mode(svc, found.state)
        # Mesh callers that gave up on the handshake themselves also show
        # here; whatever is left over came from something else.
        total = sum(n for _, n in by_proxy) - seen.aborted.get(key, 0.0)
        if mode != "strict" or total <= 0:
            continue
        where = evidence.listed(
            f"{p.name} (inbound port {p.proxy.inbound_port})"
            for p, _ in by_proxy
            if isinstance(p.proxy, proxy.Sidecar)
        )
        yield problems.Problem(
            "",
            f"Service {key}",
            f"requires mutual TLS (STRICT, {origin}), and its "
            f"{'sidecar' if len(by_proxy) == 1 else 'sidecars'} {where} refused "
            f"{evidence.counted(total, 'connection')} that brought no mesh certificate (plain "
            f"text, as from a caller without a sidecar): those callers cannot reach it",
            PLAINTEXT_CALLER_REFUSED,
            f"metadata.annotations[{notes.MTLS}]" if svc.mtls is not None else "",
        )


# -- SHL0303 -------------------------------------------------------------------


def admitted(identity: str, allow: frozenset[tuple[str, str]]) -> bool:
    """Whether `allow` (namespace, service account or "*") admits a caller
    with this SPIFFE ID ("" for none: never)."""
    try:
        _, namespace, account = spiffe.parse(identity)
    except spiffe.IdentityError:
        return False
    return (namespace, account) in allow or (namespace, "*") in allow


def callers_denied(found: facts.Facts, seen: _Seen) -> Iterator[problems.Problem]:
    state = found.state
    guarded = [s for s in state.sorted_services() if s.allow]
    if not guarded:
        return
    denied = _denied(found, seen, {s.key: s for s in guarded})
    known = _known_identities(found)
    enforced = _mtls_enforced(found)
    for svc in guarded:
        assert svc.allow is not None
        denial = denied.get(svc.key, _Denial())
        by_caller, anonymous = denial.callers, denial.anonymous
        # (namespace, "*") is known where the namespace has any workload.
        nobody = enforced and not any(entry in known for entry in svc.allow)
        annotation = f"metadata.annotations[{notes.ALLOW}]"
        allows = evidence.listed(f"{ns}/{account}" for ns, account in svc.allow)
        if by_caller or anonymous:
            if by_caller:
                who = evidence.listed(
                    f"{caller} ({evidence.counted(n, 'request')}{denial.from_(caller)})"
                    for caller, n in by_caller.items()
                )
                reason = (
                    f"allows only {allows}, and denied {who}: those calls get 403 (RBAC: "
                    f"access denied)"
                )
            else:
                reason = (
                    f"allows only {allows}, and its sidecars denied {anonymous:.0f} requests or "
                    f"connections and allowed none: every caller that calls it is refused (403, "
                    f"or for TCP the connection closed)"
                )
            if nobody:
                reason += "; no workload in the mesh runs as an identity it allows"
            callers = sorted(c for c in by_caller if c != NO_CERTIFICATE)
            fix = (
                f"Add {evidence.listed(_allow_entry(c) for c in callers)} to "
                f"{notes.ALLOW} if they should call it, or stop those calls."
                if callers
                else ""
            )
            yield problems.Problem("", f"Service {svc.key}", reason, CALLER_DENIED, annotation, fix)
        elif nobody:
            yield problems.Problem(
                "",
                f"Service {svc.key}",
                f"allows only {allows}, and no workload in the mesh runs as one of them (no "
                f"endpoint, Pod, ServiceAccount or connected proxy): every caller is denied (403)",
                CALLER_DENIED,
                annotation,
            )


def _allow_entry(identity: str) -> str:
    try:
        _, namespace, account = spiffe.parse(identity)
    except spiffe.IdentityError:
        return identity
    return f"{namespace}/{account}"


@dataclass(frozen=True, slots=True)
class _Denial:
    """What a guarded Service's policy denied: the callers (by SPIFFE ID,
    with their requests), the workloads behind them where the callers'
    sidecars told, and, where no request metric names anyone, how many
    requests and connections its sidecars denied with none allowed."""

    callers: Mapping[str, float] = field(default_factory=dict)
    workloads: Mapping[str, frozenset[str]] = field(default_factory=dict)
    anonymous: float = 0.0

    def from_(self, caller: str) -> str:
        known = self.workloads.get(caller)
        return f", from {evidence.listed(known, 3)}" if known else ""


def _denied(
    found: facts.Facts, seen: _Seen, guarded: Mapping[mesh.ServiceKey, mesh.Service]
) -> dict[mesh.ServiceKey, _Denial]:
    by_metric_name = {telemetry.service_name(k): k for k in guarded}
    # What the callee's sidecar saw, and what the callers' sidecars saw: the
    # same requests told twice where both are reached, so the larger count.
    at_callee: dict[mesh.ServiceKey, dict[str, float]] = {}
    at_caller: dict[mesh.ServiceKey, dict[str, float]] = {}
    workloads: dict[mesh.ServiceKey, dict[str, set[str]]] = {}
    for series in seen.requests.values():
        for r in series:
            key = by_metric_name.get(r.destination_service)
            if key is None or r.response_code != 403:
                continue
            allow = guarded[key].allow
            assert allow is not None
            # A 403 to an admitted caller is the app's own answer.
            if admitted(r.source_identity, allow):
                continue
            side = at_callee if r.reporter == "destination" else at_caller
            caller = r.source_identity or NO_CERTIFICATE
            counts = side.setdefault(key, {})
            counts[caller] = counts.get(caller, 0.0) + r.count
            if r.reporter == "source" and r.source_workload != telemetry.UNKNOWN:
                workloads.setdefault(key, {}).setdefault(caller, set()).add(
                    evidence.workload_named(r.source_workload)
                )
    out: dict[mesh.ServiceKey, _Denial] = {}
    for key in guarded:
        inbound, outbound = at_callee.get(key, {}), at_caller.get(key, {})
        named = {
            c: max(inbound.get(c, 0.0), outbound.get(c, 0.0)) for c in inbound.keys() | outbound
        }
        anonymous = 0.0
        if not named:
            # TCP has no request metrics: the RBAC filter's own counters,
            # which name nobody; they tell a policy that lets no caller in.
            denied = allowed = 0.0
            for p in found.proxies_of(key):
                stats = found.stats.get(p.name, {})
                for prefix in ("http.inbound.rbac.", "inbound.rbac."):
                    denied += stats.get(prefix + "denied", 0.0)
                    allowed += stats.get(prefix + "allowed", 0.0)
            anonymous = denied if allowed == 0 else 0.0
        if named or anonymous:
            told = {c: frozenset(w) for c, w in workloads.get(key, {}).items()}
            out[key] = _Denial(named, told, anonymous)
    return out


def _known_identities(found: facts.Facts) -> set[tuple[str, str]]:
    """(namespace, service account) of every workload the mesh knows, and
    (namespace, "*") of every namespace that has one."""
    state = found.state
    known: set[tuple[str, str]] = set(state.service_accounts)
    for key, eps in state.endpoints.items():
        known.update((key.namespace, e.service_account) for e in eps)
    known.update((pod.namespace, pod.service_account) for pod in state.pods.values())
    for p in found.proxies:
        if isinstance(p.proxy, proxy.Sidecar | proxy.CapturedSidecar):
            known.add((p.proxy.namespace, p.proxy.service_account))
        try:
            _, namespace, account = spiffe.parse(p.identity)
        except spiffe.IdentityError:
            continue
        known.add((namespace, account))
    known.update({(ns, "*") for ns, _ in known})
    return known


def _mtls_enforced(found: facts.Facts) -> bool:
    """Whether `allow` is enforced at all: a control plane without mutual
    TLS (`--insecure-xds`) gives its proxies no identity, and no RBAC.
    Offline, assume the default (mTLS)."""
    if not found.live or not found.proxies:
        return True
    return any(p.identity for p in found.proxies)


# -- SHL0304 -------------------------------------------------------------------


def not_exported(found: facts.Facts, seen: _Seen) -> Iterator[problems.Problem]:
    state = found.state
    # Only Services that narrow their export: in most meshes a few.
    narrowed = [s for s in state.sorted_services() if scope.EVERYONE not in s.export_to]
    if not narrowed:
        return
    # Hidden Service -> caller namespace -> what shows it calls from there.
    why: dict[mesh.ServiceKey, dict[str, list[str]]] = {}
    narrowed_keys = {s.key: s for s in narrowed}
    for svc in state.services.values():
        for ns, name in svc.dependencies or ():
            target = narrowed_keys.get(mesh.ServiceKey(ns, name))
            if target is not None and not scope.exported_to(target, svc.namespace):
                why.setdefault(target.key, {}).setdefault(svc.namespace, []).append(
                    f"Service {svc.key} declares it calls it ({notes.DEPENDENCIES})"
                )
    for namespace, (callers, count) in sorted(_unrouted(found, seen).items()):
        suspects = [s for s in narrowed if not scope.exported_to(s, namespace)]
        if not 0 < len(suspects) <= MOST_SUSPECTS:
            continue
        said = (
            f"{evidence.listed(callers)} got {evidence.counted(count, 'answer')} 404 (no "
            f"service in the mesh matches this Host) from its sidecar"
        )
        for s in suspects:
            why.setdefault(s.key, {}).setdefault(namespace, []).append(said)
    for key, by_namespace in sorted(why.items()):
        svc = narrowed_keys[key]
        exported = (
            f"only to {', '.join(sorted(svc.export_to))}"
            if svc.export_to
            else "to its own namespace only"
        )
        namespaces = sorted(by_namespace)
        if len(namespaces) == 1:
            hidden = f"namespace {namespaces[0]}"
            shown = " and ".join(by_namespace[namespaces[0]])
        else:
            hidden = f"namespaces {evidence.listed(namespaces)}"
            shown = "; ".join(f"{ns}: {' and '.join(by_namespace[ns])}" for ns in namespaces)
        yield problems.Problem(
            "",
            f"Service {key}",
            f"is exported {exported}, hiding it from {hidden}, whose workloads call it "
            f"({shown}): their sidecars have no route to it and answer 404",
            SERVICE_NOT_EXPORTED,
            f"metadata.annotations[{notes.EXPORT_TO}]",
            fix=f"Add {evidence.listed(namespaces)} to {notes.EXPORT_TO} (or '*'), or "
            f"stop calling it from there.",
        )


def _unrouted(found: facts.Facts, seen: _Seen) -> dict[str, tuple[list[str], float]]:
    """Per caller namespace, the workloads whose sidecars answered requests
    404 with no upstream cluster (the route table's catch-all: no Service
    it knows has that Host), and how many."""
    out: dict[str, tuple[list[str], float]] = {}
    for p in found.proxies:
        if p.proxy is None:
            continue
        count = sum(
            r.count
            for r in seen.requests.get(p.name, ())
            if r.reporter == "source" and r.response_code == 404 and not r.destination_service
        )
        if count > 0:
            callers, total = out.get(p.proxy.namespace, ([], 0.0))
            out[p.proxy.namespace] = ([*callers, evidence.workload_of(p)], total + count)
    return out
