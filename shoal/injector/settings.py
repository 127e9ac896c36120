"""What the injector puts into a Pod, and the annotations that change it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

# Opt-in is the namespace label, opt-out the Pod annotation (DESIGN.md).
INJECT_LABEL = "shoal.io/inject"
INJECT_ENABLED = "enabled"
INJECT_ANNOTATION = "shoal.io/inject"
# Written on an injected Pod: what was injected, so that a second pass
# (reinvocation, or `shoal inject` run twice) changes nothing.
STATUS_ANNOTATION = "shoal.io/status"
REWRITE_PROBES_ANNOTATION = "shoal.io/rewrite-app-probes"

# Capture, with Istio's traffic.sidecar.istio.io/* meanings.
TRAFFIC = "traffic.shoal.io/"
INCLUDE_INBOUND_PORTS = TRAFFIC + "includeInboundPorts"
EXCLUDE_INBOUND_PORTS = TRAFFIC + "excludeInboundPorts"
INCLUDE_OUTBOUND_CIDRS = TRAFFIC + "includeOutboundIPRanges"
EXCLUDE_OUTBOUND_CIDRS = TRAFFIC + "excludeOutboundIPRanges"
EXCLUDE_OUTBOUND_PORTS = TRAFFIC + "excludeOutboundPorts"

# The proxy's resources, as Istio's sidecar.istio.io/proxyCPU and friends.
SIDECAR = "sidecar.shoal.io/"
PROXY_CPU = SIDECAR + "proxyCPU"
PROXY_MEMORY = SIDECAR + "proxyMemory"
PROXY_CPU_LIMIT = SIDECAR + "proxyCPULimit"
PROXY_MEMORY_LIMIT = SIDECAR + "proxyMemoryLimit"

INIT_CONTAINER = "shoal-init"
PROXY_CONTAINER = "shoal-proxy"
TOKEN_VOLUME = "shoal-token"
WORK_VOLUME = "shoal-work"
TOKEN_DIR = "/var/run/secrets/shoal/tokens"
TOKEN_FILE = "token"
WORK_DIR = "/var/run/shoal"

# The sidecar's ports (DESIGN.md).
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HEALTH_PORT = 15021
# The control plane's webhook (DESIGN.md).
WEBHOOK_PORT = 15017
STATS_PORT = 15090
PROXY_UID = 1337

# A Kubernetes resource.Quantity (k8s.io/apimachinery/pkg/api/resource).
_QUANTITY = re.compile(
    r"^[+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?:[eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?\Z"
)


def is_quantity(text: str) -> bool:
    return len(text) <= 64 and _QUANTITY.match(text) is not None


@dataclass(frozen=True, slots=True)
class Resources:
    cpu: str = "100m"
    memory: str = "128Mi"
    cpu_limit: str = "2"
    memory_limit: str = "1Gi"


@dataclass(frozen=True, slots=True)
class Settings:
    """What every injected Pod gets; the control plane's flags set it."""

    image: str = "shoal:latest"
    image_pull_policy: str = "IfNotPresent"
    # Where the agent reaches the control plane: xDS, and the certificate
    # API it proves the Pod's identity to.
    xds_address: str = "shoal.shoal-system.svc:15010"
    ca_address: str = "shoal.shoal-system.svc:15012"
    trust_domain: str = "cluster.local"
    # Roots the agent verifies the control plane by until it has a newer
    # trust bundle from it; PEM.
    trust_pem: str = ""
    audience: str = "shoal"
    token_ttl_s: int = 3600
    resources: Resources = dataclasses.field(default_factory=Resources)
    proxy_uid: int = PROXY_UID
    # Seconds Envoy drains for on SIGTERM; the Pod's grace period should
    # cover it.
    drain_s: int = 5
    delta: bool = True
