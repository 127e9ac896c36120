"""Who a connected Envoy is, in mesh terms."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.model import mesh


@dataclass(frozen=True, slots=True)
class Sidecar:
    """A local-mode sidecar: one workload's inbound and outbound ports.

    Everything translation needs to know about a proxy; two proxies with equal
    Sidecars get byte-identical configuration.
    """

    namespace: str
    service: str
    service_account: str = "default"
    app_port: int = 8080
    inbound_port: int = 15006
    outbound_port: int = 15001
    inbound_address: str = "127.0.0.1"

    @property
    def service_key(self) -> mesh.ServiceKey:
        return mesh.ServiceKey(self.namespace, self.service)

    @property
    def identity(self) -> mesh.Identity:
        return mesh.Identity(self.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class Proxyless:
    """A gRPC application speaking xDS itself: no ports of its own, only
    what it may call."""

    namespace: str
    service: str = ""

    @property
    def service_key(self) -> mesh.ServiceKey:
        return mesh.ServiceKey(self.namespace, self.service)


# Where iptables sends a captured Pod's TCP (DESIGN.md, sidecar ports).
CAPTURE_OUTBOUND_PORT = 15001
CAPTURE_INBOUND_PORT = 15006


@dataclass(frozen=True, slots=True)
class CapturedSidecar:
    """A Kubernetes sidecar whose Pod's traffic iptables redirects to it.

    It has no ports of its own to configure: it serves whatever ports its Pod
    serves and calls whatever the Pod calls. The Pod, not a Service, is what
    it stands for: one Pod may back several Services, or none."""

    namespace: str
    pod: str
    pod_uid: str
    service_account: str = "default"
    ip: str = ""
    outbound_port: int = CAPTURE_OUTBOUND_PORT
    inbound_port: int = CAPTURE_INBOUND_PORT

    @property
    def pod_key(self) -> tuple[str, str]:
        """Its key in MeshState.pods."""
        return (self.namespace, self.pod)

    @property
    def identity(self) -> mesh.Identity:
        return mesh.Identity(self.namespace, self.service_account)


Proxy = Sidecar | Proxyless | CapturedSidecar
