"""Problems found in the mesh, reported with the object and the reason.

Every problem carries a stable code from the catalogue below (`SHL0101`),
as Istio's analyzers carry `IST0101`: scripts and alerts match on the code,
people read the reason. A code, once published, keeps its meaning; a code
that is no longer produced is retired, never reused. The README's table of
codes is generated from `CODES` (a test keeps the two equal).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Severity(enum.IntEnum):
    """Ordered: an error sorts first, and `shoal analyze` exits 1 on one."""

    ERROR = 0
    WARNING = 1
    INFO = 2

    @property
    def label(self) -> str:
        return self.name.capitalize()


@dataclass(frozen=True, slots=True)
class Code:
    """One kind of problem: what it means for traffic, and how to fix it."""

    id: str
    name: str
    severity: Severity
    meaning: str
    fix: str


E, W = Severity.ERROR, Severity.WARNING

# The catalogue. Numbers group by what is wrong: 0xxx input, 1xx routing,
# 2xx endpoints and ports, 3xx identity and policy, 4xx proxies and
# certificates.
CODES: tuple[Code, ...] = (
    Code(
        "SHL0001",
        "InvalidManifest",
        E,
        "A file, document or object cannot be read; its last good version stays in force.",
        "Correct the field the reason names.",
    ),
    Code(
        "SHL0002",
        "DuplicateObject",
        W,
        "The same object is defined twice; the first one read is used.",
        "Delete one of the two definitions.",
    ),
    Code(
        "SHL0003",
        "InvalidAnnotation",
        E,
        "A `shoal.io/` annotation is malformed; its last good value (an `allow`: deny "
        "everyone) stays in force.",
        "Correct the annotation as the reason says (`kubectl annotate --overwrite`).",
    ),
    Code(
        "SHL0004",
        "RouteNotAccepted",
        E,
        "A TrafficRoute, HTTPRoute or GRPCRoute is refused whole; its last good version "
        "stays in force.",
        "Correct the field the reason names.",
    ),
    Code(
        "SHL0005",
        "OrphanEndpointSlice",
        W,
        "An EndpointSlice names a Service that does not exist; its endpoints serve nothing.",
        "Create the Service, or correct the slice's `kubernetes.io/service-name` label.",
    ),
    Code(
        "SHL0101",
        "UnknownBackend",
        E,
        "A split or route sends traffic to a Service that does not exist: that share fails.",
        "Create the Service, or name an existing one in the route.",
    ),
    Code(
        "SHL0102",
        "UnknownPort",
        E,
        "A route or backend names a port its Service does not have: the route does not "
        "apply there, or that share fails.",
        "Name one of the Service's ports (by number, or by name in `sectionName`).",
    ),
    Code(
        "SHL0103",
        "ZeroWeights",
        E,
        "Every backend of a rule has weight 0, or it has none: the rule answers 500 (gRPC: "
        "UNAVAILABLE) to every request.",
        "Give at least one backend a weight above 0.",
    ),
    Code(
        "SHL0104",
        "ShadowedRule",
        W,
        "A rule never matches: an earlier rule of the same Service takes every request it would.",
        "Make the rule more specific than the earlier one, or move it before it.",
    ),
    Code(
        "SHL0105",
        "RoutingConflict",
        W,
        "Two routing sources (annotations, TrafficRoute, HTTPRoute) route one Service; "
        "only one applies.",
        "Keep one routing source per Service (precedence: HTTPRoute, then TrafficRoute, "
        "then annotations).",
    ),
    Code(
        "SHL0106",
        "RegexRejected",
        E,
        "Envoy refused a regular expression (too large for its RE2 limit): the proxy keeps "
        "its last configuration and gets no change.",
        "Simplify the expression (fewer alternatives or repetitions), or match a prefix.",
    ),
    Code(
        "SHL0201",
        "NoReadyEndpoints",
        E,
        "A Service has endpoints but none is ready: callers get 503 (no healthy upstream).",
        "Find why the workloads are not ready (`kubectl describe pod`), or mark them ready.",
    ),
    Code(
        "SHL0202",
        "PortNameMismatch",
        E,
        "A Service port has no endpoints because its name differs from every port name in "
        "the Service's EndpointSlices: callers of that port get 503.",
        "Give the Service port and the EndpointSlice port the same name.",
    ),
    Code(
        "SHL0203",
        "ProtocolConflict",
        W,
        "HTTP routing on a Service port treated as TCP (it applies nowhere there), or one "
        "endpoint serving an HTTP/1.1 and an HTTP/2 port (its proxy speaks only one of them "
        "to the app).",
        "Set `appProtocol` (or a port name like `http-web`, `grpc`, `tcp-db`) so both agree.",
    ),
    Code(
        "SHL0204",
        "NoEndpoints",
        W,
        "A Service that is called or routed to has no endpoints: callers get 503.",
        "Start its workloads, or correct the Service's selector or EndpointSlices.",
    ),
    Code(
        "SHL0301",
        "IdentityMismatch",
        E,
        "A proxy serving a Service proves an identity its callers do not expect: every call "
        "fails its certificate check (503, `ssl.fail_verify_san`).",
        "Declare the identity the Service's endpoints run as (a Pod's serviceAccountName, or "
        "the EndpointSlice annotation `shoal.io/service-account`), or bootstrap the sidecar "
        "with that service account.",
    ),
    Code(
        "SHL0302",
        "PlaintextCallerRefused",
        E,
        "A Service requires mutual TLS (STRICT) and is called by a workload without a "
        "sidecar: those connections are refused.",
        "Inject a sidecar into the caller, or set `shoal.io/mtls: permissive` on the "
        "Service while it migrates.",
    ),
    Code(
        "SHL0303",
        "CallerDenied",
        E,
        "A Service's `allow` policy denies callers that call it (403 RBAC).",
        "Add the caller's namespace/service-account to `shoal.io/allow`, or stop the call.",
    ),
    Code(
        "SHL0304",
        "ServiceNotExported",
        E,
        "A Service's `export-to` hides it from a namespace whose workloads call or route "
        "to it: their calls get 404 (no route).",
        "Add the caller's namespace to `shoal.io/export-to` (or `*`).",
    ),
    Code(
        "SHL0305",
        "SidecarMissing",
        W,
        "A Pod in a namespace with injection enabled runs without a sidecar: its traffic "
        "is neither encrypted nor routed by the mesh.",
        "Restart the Pod (`kubectl rollout restart`) once the webhook is installed; a Pod "
        'annotated `shoal.io/inject: "false"` is left out on purpose.',
    ),
    Code(
        "SHL0306",
        "InjectionNotInstalled",
        E,
        "A namespace is labelled `shoal.io/inject=enabled` but no shoal injection webhook "
        "is installed: new Pods start without a sidecar.",
        "Install the webhook (`kubectl apply -f examples/kubernetes/`).",
    ),
    Code(
        "SHL0401",
        "ConfigRejected",
        E,
        "A proxy rejected (NACKed) its configuration: it keeps its last accepted version "
        "and gets no change until the input changes.",
        "Correct the object and field the reason traces the error to.",
    ),
    Code(
        "SHL0402",
        "ProxyStale",
        W,
        "A proxy has not acknowledged the current configuration for longer than the "
        "debounce maximum: it routes by an older mesh.",
        "Check the proxy's log and its connection to the control plane.",
    ),
    Code(
        "SHL0403",
        "CertificateExpiring",
        E,
        "A proxy's workload certificate is close to expiry and has not been renewed: when "
        "it expires, every mutual-TLS call to and from it fails.",
        "Check the proxy's SDS status (`shoal proxy-status PROXY`) and the CA (`shoal ca status`).",
    ),
    Code(
        "SHL0404",
        "ClockSkew",
        W,
        "A proxy's clock differs from the control plane's: certificates look expired or "
        "not yet valid to it, so its mutual-TLS handshakes fail.",
        "Synchronise the machine's clock (NTP).",
    ),
    Code(
        "SHL0405",
        "Unconfigurable",
        E,
        "The control plane cannot build a proxy's configuration: the proxy keeps its last one.",
        "Correct what the reason names (for a Pod: the Pod, or the proxy's certificate).",
    ),
)

BY_ID: dict[str, Code] = {c.id: c for c in CODES}


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """`source` says where (file and document, or API object); `subject` names
    the object (`Service default/web`); `reason` says what is wrong; `code`
    is its entry in the catalogue; `field` the field of the object at fault
    where one is; `fix` a fix for this case, where it says more than the
    catalogue's."""

    source: str
    subject: str
    reason: str
    code: str
    field: str = ""
    fix: str = ""

    @property
    def kind(self) -> Code:
        return BY_ID[self.code]

    @property
    def severity(self) -> Severity:
        return self.kind.severity

    def as_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "name": self.kind.name,
            "severity": self.severity.label,
            "source": self.source,
            "object": self.subject,
            "field": self.field,
            "reason": self.reason,
            "fix": self.fix or self.kind.fix,
        }

    def __str__(self) -> str:
        # As logs and the README have always said it; the code and field
        # are in as_dict, which `shoal analyze` prints.
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.subject}: {self.reason}"


def sort_key(p: Problem) -> tuple[int, str, str, str, str]:
    return (p.severity, p.code, p.subject, p.source, p.reason)
